//! Chunks: blocks of file data, addressed by the blake3 of their uncompressed
//! bytes and stored zstd-compressed when that saves space.
//!
//! The stored form (`codec byte || payload`) is also the wire form, so a
//! transfer never recompresses. Storage sits behind [`ChunkStore`], a narrow
//! trait, so a hub can later keep chunks in an object store.

use crate::error::{Error, Result};
use crate::id::Id;

/// Stored-form codec byte: payload is the raw bytes.
pub const CODEC_RAW: u8 = 0;
/// Stored-form codec byte: payload is a zstd frame.
pub const CODEC_ZSTD: u8 = 1;
/// zstd level used for chunks: fast, and most of the gain.
pub const ZSTD_LEVEL: i32 = 1;

/// Encodes `data` into its stored form: zstd when that is smaller, raw otherwise.
pub fn encode(data: &[u8]) -> Vec<u8> {
    if data.len() >= 64 {
        if let Ok(z) = zstd::bulk::compress(data, ZSTD_LEVEL) {
            if z.len() + 16 < data.len() {
                let mut out = Vec::with_capacity(z.len() + 1);
                out.push(CODEC_ZSTD);
                out.extend_from_slice(&z);
                return out;
            }
        }
    }
    let mut out = Vec::with_capacity(data.len() + 1);
    out.push(CODEC_RAW);
    out.extend_from_slice(data);
    out
}

/// Decodes a stored chunk; `max_len` bounds the decompressed size (the
/// block size), so a hostile frame cannot make us allocate without limit.
pub fn decode(stored: &[u8], max_len: usize) -> Result<Vec<u8>> {
    match stored.split_first() {
        Some((&CODEC_RAW, rest)) => Ok(rest.to_vec()),
        Some((&CODEC_ZSTD, rest)) => zstd::bulk::decompress(rest, max_len)
            .map_err(|e| Error::Corrupt(format!("zstd chunk does not decompress: {e}"))),
        Some((c, _)) => Err(Error::Corrupt(format!("unknown chunk codec {c}"))),
        None => Err(Error::Corrupt("empty stored chunk".into())),
    }
}

/// Decodes a stored chunk and checks it against `id`.
pub fn decode_verified(id: &Id, stored: &[u8], max_len: usize) -> Result<Vec<u8>> {
    let data = decode(stored, max_len)?;
    if Id::of(&data) != *id {
        return Err(Error::Corrupt(format!(
            "chunk {} does not match its content",
            id.short()
        )));
    }
    Ok(data)
}

/// The largest chunk the store accepts (the largest block size).
pub const MAX_CHUNK: usize = 4 << 20;

/// Where chunks live. Implementations must be safe to call from many threads.
pub trait ChunkStore: Send + Sync {
    /// Stores `stored` (the stored form) under `id` unless present. Returns
    /// true when it was newly written.
    fn put_if_absent(&self, id: &Id, stored: &[u8]) -> Result<bool>;
    /// The stored form of `id`, if present.
    fn get(&self, id: &Id) -> Result<Option<Vec<u8>>>;
    /// Which of `ids` are present, in order.
    fn has_many(&self, ids: &[Id]) -> Result<Vec<bool>>;
    /// Removes `id` (GC only).
    fn delete(&self, id: &Id) -> Result<()>;
    /// Calls `f` with every stored id (GC and fsck).
    fn for_each_id(&self, f: &mut dyn FnMut(Id) -> Result<()>) -> Result<()>;
}
