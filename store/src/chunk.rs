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

/// Leading bytes compressed first to tell incompressible data (random,
/// already compressed, encrypted) cheaply.
const SAMPLE: usize = 4096;

thread_local! {
    // Contexts are reused: creating one per chunk cost as much as
    // compressing a small chunk.
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// zstd-compresses `data` with this thread's context.
fn zstd_compress(data: &[u8]) -> Option<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok();
        }
        slot.as_mut()?.compress(data).ok()
    })
}

/// Whether compression pays: like ZFS, keep the compressed form only when it
/// saves at least an eighth (and 16 bytes). Data that compresses less (media,
/// encrypted or already compressed files, fio's buffers) is stored raw, and
/// reads of it skip decompression.
fn saves(compressed: usize, raw: usize) -> bool {
    compressed + 16 < raw && compressed <= raw - raw / 8
}

/// Order-0 entropy (bits per byte) above which a sample counts as random
/// without asking zstd. Uniformly random 4 KiB samples measure 7.955 on
/// average and 7.94 at least (20,000 tried); a random 1 KiB pattern
/// repeated (which zstd compresses well) at most 7.85. Patterns repeating
/// every 2 KiB or more may be taken for random and stored raw.
const RANDOM_BITS: f64 = 7.93;

/// Whether `sample` looks like random bytes: its byte histogram is nearly
/// flat. About a fifth of the cost of compressing it, which for random data
/// was as much CPU as hashing it.
fn looks_random(sample: &[u8]) -> bool {
    // Four histograms: consecutive equal bytes would stall one.
    let mut h = [[0u32; 256]; 4];
    let mut quads = sample.chunks_exact(4);
    for q in &mut quads {
        h[0][q[0] as usize] += 1;
        h[1][q[1] as usize] += 1;
        h[2][q[2] as usize] += 1;
        h[3][q[3] as usize] += 1;
    }
    for &b in quads.remainder() {
        h[0][b as usize] += 1;
    }
    let n = sample.len() as f64;
    let [a, b, c, d] = &h;
    let sum: f64 = (0..256)
        .map(|i| f64::from(a[i] + b[i] + c[i] + d[i]))
        .filter(|&c| c > 0.0)
        .map(|c| c * c.log2())
        .sum();
    n.log2() - sum / n >= RANDOM_BITS
}

/// Encodes `data` into its stored form, as its two parts: the codec byte
/// and the payload (borrowed when raw, so a raw block is never copied here).
/// zstd when that saves at least an eighth, raw otherwise. A block whose
/// first 4 KiB look random, or do not save that much, is stored raw without
/// trying the rest (deterministic: the same bytes always get the same
/// stored form).
pub fn encode_parts(data: &[u8]) -> (u8, std::borrow::Cow<'_, [u8]>) {
    if data.len() >= 64 {
        let sample_ok = data.len() < 2 * SAMPLE
            || (!looks_random(&data[..SAMPLE])
                && zstd_compress(&data[..SAMPLE]).is_some_and(|z| saves(z.len(), SAMPLE)));
        if sample_ok {
            if let Some(z) = zstd_compress(data) {
                if saves(z.len(), data.len()) {
                    return (CODEC_ZSTD, z.into());
                }
            }
        }
    }
    (CODEC_RAW, data.into())
}

/// Encodes `data` into its stored form, `codec byte || payload`.
pub fn encode(data: &[u8]) -> Vec<u8> {
    let (codec, payload) = encode_parts(data);
    stored_form(codec, &payload)
}

/// The stored form `codec || payload` of a chunk kept as its two parts.
pub fn stored_form(codec: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 1);
    out.push(codec);
    out.extend_from_slice(payload);
    out
}

/// Decodes a stored chunk; `max_len` bounds its size (the block size): a
/// raw chunk larger is refused, and a hostile zstd frame cannot make us
/// allocate without limit.
pub fn decode(stored: &[u8], max_len: usize) -> Result<Vec<u8>> {
    match stored.split_first() {
        Some((&CODEC_RAW, rest)) if rest.len() <= max_len => Ok(rest.to_vec()),
        Some((&CODEC_RAW, rest)) => Err(Error::Corrupt(format!(
            "raw chunk of {} bytes is larger than {max_len}",
            rest.len()
        ))),
        Some((&CODEC_ZSTD, rest)) => zstd_decompress(rest, max_len),
        Some((c, _)) => Err(Error::Corrupt(format!("unknown chunk codec {c}"))),
        None => Err(Error::Corrupt("empty stored chunk".into())),
    }
}

/// zstd-decompresses a chunk's payload with this thread's context, into a
/// buffer of the size its frame gives (dm writes it in every frame): one of
/// `max_len` (4 MiB) for each chunk read kept that much allocated for as
/// long as the chunk cache held a chunk of a few hundred bytes (a million
/// small files read back: a terabyte allocated, gigabytes resident).
fn zstd_decompress(payload: &[u8], max_len: usize) -> Result<Vec<u8>> {
    let capacity = match zstd::zstd_safe::get_frame_content_size(payload) {
        Ok(Some(n)) if n <= max_len as u64 => n as usize,
        Ok(Some(n)) => {
            return Err(Error::Corrupt(format!(
                "zstd chunk of {n} bytes is larger than {max_len}"
            )))
        }
        // No size in the frame (not written by dm): the bound, trimmed after.
        _ => max_len,
    };
    let mut data = DECOMPRESSOR
        .with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = Some(zstd::bulk::Decompressor::new()?);
            }
            match slot.as_mut() {
                Some(d) => d.decompress(payload, capacity),
                None => zstd::bulk::decompress(payload, capacity),
            }
        })
        .map_err(|e| Error::Corrupt(format!("zstd chunk does not decompress: {e}")))?;
    data.shrink_to_fit();
    Ok(data)
}

/// [`decode`] of a stored form given as its codec byte and payload; a raw
/// payload is returned as it is (no copy).
pub fn decode_parts(codec: u8, payload: Vec<u8>, max_len: usize) -> Result<Vec<u8>> {
    match codec {
        CODEC_RAW if payload.len() <= max_len => Ok(payload),
        CODEC_RAW => Err(Error::Corrupt(format!(
            "raw chunk of {} bytes is larger than {max_len}",
            payload.len()
        ))),
        CODEC_ZSTD => zstd_decompress(&payload, max_len),
        c => Err(Error::Corrupt(format!("unknown chunk codec {c}"))),
    }
}

/// Decodes a stored chunk and checks it against `id`.
pub fn decode_verified(id: &Id, stored: &[u8], max_len: usize) -> Result<Vec<u8>> {
    let data = decode(stored, max_len)
        .map_err(|e| Error::Corrupt(format!("chunk {}: {e}", id.short())))?;
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Incompressible test bytes (xorshift), the same for the same seed.
    pub(crate) fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn random_samples_skip_zstd_and_compressible_ones_do_not() {
        let random = pseudo_random(65536, 3);
        assert!(looks_random(&random[..SAMPLE]));
        assert_eq!(encode_parts(&random).0, CODEC_RAW);
        // High order-0 entropy, yet compressible: a random 1 KiB pattern
        // repeated, as zstd finds the repeats.
        let pattern = pseudo_random(1024, 4);
        let repeated: Vec<u8> = pattern.iter().copied().cycle().take(65536).collect();
        assert!(!looks_random(&repeated[..SAMPLE]));
        assert_eq!(encode_parts(&repeated).0, CODEC_ZSTD);
        let text: Vec<u8> = b"the quick brown fox jumps over the lazy dog 0123456789\n"
            .iter()
            .copied()
            .cycle()
            .take(65536)
            .collect();
        assert!(!looks_random(&text[..SAMPLE]));
        assert_eq!(encode_parts(&text).0, CODEC_ZSTD);
        assert!(!looks_random(&[0u8; SAMPLE]));
        assert_eq!(encode_parts(&[0u8; 65536]).0, CODEC_ZSTD);
    }

    #[test]
    fn round_trips_every_shape() {
        let text: Vec<u8> = b"postgres page header and tuples "
            .iter()
            .cycle()
            .take(65536)
            .copied()
            .collect();
        let mut mixed = pseudo_random(65536, 7);
        mixed[8192..].fill(0); // random head, zero tail
        let mut zero_head = vec![0u8; 65536];
        zero_head[32768..].copy_from_slice(&pseudo_random(32768, 9));
        for data in [
            Vec::new(),
            vec![1u8; 10],
            vec![0u8; 65536],
            text,
            pseudo_random(65536, 3),
            pseudo_random(5000, 5),
            mixed,
            zero_head,
        ] {
            let stored = encode(&data);
            assert_eq!(decode(&stored, MAX_CHUNK).unwrap(), data);
            assert!(stored.len() <= data.len() + 1);
            // Deterministic stored form.
            assert_eq!(encode(&data), stored);
        }
    }

    #[test]
    fn compressible_data_is_compressed_and_random_is_not() {
        assert_eq!(encode(&vec![0u8; 65536])[0], CODEC_ZSTD);
        assert_eq!(encode(&pseudo_random(65536, 11))[0], CODEC_RAW);
        // A block whose head compresses is compressed even if its tail does not.
        let mut half = vec![0u8; 65536];
        half[32768..].copy_from_slice(&pseudo_random(32768, 13));
        assert_eq!(encode(&half)[0], CODEC_ZSTD);
    }

    #[test]
    fn decode_bounds_and_rejects_garbage() {
        let stored = encode(&vec![0u8; 65536]);
        assert!(decode(&stored, 1024).is_err(), "larger than max_len");
        assert!(decode(&[], MAX_CHUNK).is_err());
        assert!(decode(&[9, 1, 2], MAX_CHUNK).is_err());
        assert!(decode(&[CODEC_ZSTD, 1, 2, 3], MAX_CHUNK).is_err());
    }

    /// A decompressed chunk takes what it holds, not the 4 MiB bound:
    /// every small chunk read kept 4 MiB allocated while cached.
    #[test]
    fn decompressed_chunks_take_their_size() {
        let data = b"unique words, again and again; ".repeat(20);
        let stored = encode(&data);
        assert_eq!(stored[0], CODEC_ZSTD, "compressible data is compressed");
        let back = decode(&stored, MAX_CHUNK).unwrap();
        assert_eq!(back, data);
        assert!(back.capacity() < 4096, "capacity {}", back.capacity());
        // A frame that says more than the bound is refused at once.
        let big = encode(&vec![7u8; 1 << 20]);
        assert!(decode(&big, 1000).is_err());
        // Raw chunks are bounded too, as decode_parts bounds them.
        let raw = stored_form(CODEC_RAW, &pseudo_random(2000, 1));
        assert!(decode(&raw, 1999).is_err(), "raw larger than max_len");
        assert_eq!(decode(&raw, 2000).unwrap().len(), 2000);
    }
}
