//! The chunk log: chunks' stored forms appended to segment files, outside
//! RocksDB. RocksDB keeps only the index (chunk id -> where its record is).
//!
//! Why not RocksDB values: a value is written twice (the write-ahead log,
//! then the blob file at memtable flush) and copied four times on the way.
//! Here a chunk is copied once into the page cache and written once.
//!
//! Records are `magic:4 || stored len:4 || crc32c:4 || id:32 || stored`
//! (integers LE; the CRC covers the id and the stored bytes). A reader checks
//! the magic, length, id and CRC, so a location that does not hold the chunk
//! (a torn or lost append after a power failure) is an error, never wrong
//! bytes.
//!
//! Durability: appends land in the page cache; [`ChunkLog::sync`] makes every
//! append so far durable. The store calls it before every RocksDB write
//! while appends are unsynced, so an index entry can never reach the disk
//! before the record it names (the kernel writes RocksDB's log back in any
//! order). Small chunks skip the log (see [`INLINE_MAX`]): a fsync of
//! 8 KiB pages costs one sync, not two.
//! Each open starts a new segment: a segment is appended to by one process
//! lifetime only, and a torn tail of a crashed one is never written after.

use crate::error::{Error, Result};
use crate::id::Id;
use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{IoSlice, IoSliceMut};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const MAGIC: u32 = 0x4b43_4d44; // "DMCK"
/// Bytes before a record's stored form.
pub const HEADER: usize = 44;
/// Appended bytes after which their writeback to the disk is started.
const WRITEBACK_BYTES: u64 = 1 << 20;

/// Asks the kernel to start writing `len` bytes at `off` back to the disk,
/// without waiting (sync_file_range with SYNC_FILE_RANGE_WRITE, as RocksDB's
/// `bytes_per_sync`). Only a hint: durability still comes from
/// [`ChunkLog::sync`].
fn start_writeback(f: &File, off: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(len)) = (libc::off64_t::try_from(off), libc::off64_t::try_from(len)) else {
        return;
    };
    // SAFETY: sync_file_range only reads its integer arguments; a failure
    // leaves the data to the next sync.
    unsafe {
        libc::sync_file_range(f.as_raw_fd(), off, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Default size at which a segment stops taking appends.
pub const SEGMENT_BYTES: u64 = 256 << 20;

/// Where a chunk's record is: segment number, offset of the record, and the
/// length of its stored form.
/// Stored forms up to this size are kept inline in the chunk index (in
/// RocksDB, whose write-ahead log makes them durable with the batch that
/// names them, with no second sync); larger ones go to the log.
pub const INLINE_MAX: usize = 16 << 10;

/// A chunk index value: where a chunk's stored form is.
#[derive(Debug, PartialEq, Eq)]
pub enum Placement<'a> {
    /// The stored form itself (`codec || payload`): below [`INLINE_MAX`],
    /// or any size when an fsync of a few blocks stored it.
    Inline(&'a [u8]),
    /// A record in the log.
    Log(Loc),
}

const TAG_LOG: u8 = 0;
const TAG_INLINE: u8 = 1;

impl Placement<'_> {
    /// Index value of a chunk in the log: `0 || loc`.
    pub fn log_value(loc: Loc) -> [u8; 17] {
        let mut v = [0u8; 17];
        v[0] = TAG_LOG;
        v[1..].copy_from_slice(&loc.encode());
        v
    }

    /// Index value of an inline chunk: `1 || codec || payload`.
    pub fn inline_value(codec: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(payload.len() + 2);
        v.push(TAG_INLINE);
        v.push(codec);
        v.extend_from_slice(payload);
        v
    }

    pub fn decode(v: &[u8]) -> Option<Placement<'_>> {
        match v.split_first()? {
            (&TAG_LOG, rest) => Loc::decode(rest).map(Placement::Log),
            (&TAG_INLINE, rest) if !rest.is_empty() => Some(Placement::Inline(rest)),
            _ => None,
        }
    }

    /// Length of the stored form.
    pub fn stored_len(&self) -> u64 {
        match self {
            Placement::Inline(b) => b.len() as u64,
            Placement::Log(l) => u64::from(l.len),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loc {
    pub seg: u32,
    pub off: u64,
    pub len: u32,
}

impl Loc {
    /// Index value: `seg:4 || off:8 || len:4`, LE.
    pub fn encode(&self) -> [u8; 16] {
        let mut v = [0u8; 16];
        v[..4].copy_from_slice(&self.seg.to_le_bytes());
        v[4..12].copy_from_slice(&self.off.to_le_bytes());
        v[12..].copy_from_slice(&self.len.to_le_bytes());
        v
    }

    pub fn decode(v: &[u8]) -> Option<Loc> {
        if v.len() != 16 {
            return None;
        }
        Some(Loc {
            seg: u32::from_le_bytes(v[..4].try_into().ok()?),
            off: u64::from_le_bytes(v[4..12].try_into().ok()?),
            len: u32::from_le_bytes(v[12..].try_into().ok()?),
        })
    }

    /// Bytes the record takes in its segment.
    pub fn record_len(&self) -> u64 {
        HEADER as u64 + self.len as u64
    }
}

struct Active {
    seg: u32,
    file: Arc<File>,
    len: u64,
    /// Start of the bytes of the active segment not yet handed to the disk
    /// (see `WRITEBACK_BYTES`).
    unstarted: u64,
    /// Segments appended to since the last sync.
    dirty: BTreeSet<u32>,
}

/// Append-only segment files of chunk records.
pub struct ChunkLog {
    dir: PathBuf,
    segment_bytes: u64,
    /// Held for a whole sync: a sync that finds nothing dirty because
    /// another is still syncing the same appends must wait for it, or it
    /// would return before they are durable.
    syncing: Mutex<()>,
    active: Mutex<Active>,
    /// Open segments, read by many threads at once (pread).
    files: RwLock<HashMap<u32, Arc<File>>>,
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { context, source }
}

fn segment_name(seg: u32) -> String {
    format!("{seg:08}.log")
}

/// The CRC of a record holding `id` with stored form `codec || payload`.
pub fn record_crc(id: &Id, codec: u8, payload: &[u8]) -> u32 {
    crc32c::crc32c_append(
        crc32c::crc32c_append(crc32c::crc32c(&id.0), &[codec]),
        payload,
    )
}

/// A file offset as `off_t` (`errno` when it does not fit).
fn off_t(off: u64, errno: i32) -> std::io::Result<libc::off_t> {
    libc::off_t::try_from(off).map_err(|_| std::io::Error::from_raw_os_error(errno))
}

/// Fills `head` then `body` from `off` with one preadv(2); a short read is
/// finished piece by piece (EOF before both are full: UnexpectedEof).
fn read_all_at(f: &File, head: &mut [u8], body: &mut [u8], off: u64) -> std::io::Result<()> {
    let at = off_t(off, libc::EINVAL)?;
    let n = {
        let mut iov = [IoSliceMut::new(head), IoSliceMut::new(body)];
        nix::sys::uio::preadv(f, &mut iov, at)?
    };
    if n < head.len() {
        f.read_exact_at(&mut head[n..], off + n as u64)?;
        f.read_exact_at(body, off + head.len() as u64)
    } else {
        let done = n - head.len();
        f.read_exact_at(&mut body[done..], off + n as u64)
    }
}

/// Writes `head` then `body` at `off` with one pwritev(2) (no copy into a
/// contiguous record); a short write is finished piece by piece.
fn write_all_at(f: &File, head: &[u8], body: &[u8], off: u64) -> std::io::Result<()> {
    let at = off_t(off, libc::EFBIG)?;
    let n = nix::sys::uio::pwritev(f, &[IoSlice::new(head), IoSlice::new(body)], at)?;
    if n < head.len() {
        f.write_all_at(&head[n..], off + n as u64)?;
        f.write_all_at(body, off + head.len() as u64)
    } else {
        let done = n - head.len();
        f.write_all_at(&body[done..], off + n as u64)
    }
}

impl ChunkLog {
    /// Opens the log in `dir` and starts a new segment after the last one.
    /// Segments take appends until they reach `segment_bytes`.
    pub fn open(dir: &Path, segment_bytes: u64) -> Result<ChunkLog> {
        std::fs::create_dir_all(dir).map_err(io(format!(
            "creating the chunk directory {}",
            dir.display()
        )))?;
        let segments = Self::list(dir)?;
        let last = segments.iter().map(|(s, _)| *s).max();
        // Segments left empty by earlier runs hold no record, so nothing
        // names them: one would pile up per restart otherwise.
        for (seg, len) in &segments {
            if *len == 0 {
                let path = dir.join(segment_name(*seg));
                std::fs::remove_file(&path)
                    .map_err(io(format!("removing the empty segment {}", path.display())))?;
            }
        }
        let seg = last.map_or(Ok(1), |s| {
            s.checked_add(1)
                .ok_or_else(|| Error::Corrupt("chunk segment numbers are exhausted".into()))
        })?;
        let log = ChunkLog {
            dir: dir.to_path_buf(),
            segment_bytes,
            syncing: Mutex::new(()),
            active: Mutex::new(Active {
                seg,
                file: Arc::new(Self::create(dir, seg)?),
                len: 0,
                unstarted: 0,
                dirty: BTreeSet::new(),
            }),
            files: RwLock::new(HashMap::new()),
        };
        let file = log.active.lock().file.clone();
        log.files.write().insert(seg, file);
        // The new segment's directory entry must survive a crash before
        // anything durable names it.
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(format!("syncing {}", dir.display())))?;
        Ok(log)
    }

    fn create(dir: &Path, seg: u32) -> Result<File> {
        let path = dir.join(segment_name(seg));
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io(format!("creating chunk segment {}", path.display())))
    }

    /// Every segment file in `dir` with its size.
    fn list(dir: &Path) -> Result<Vec<(u32, u64)>> {
        let mut out = Vec::new();
        let rd = std::fs::read_dir(dir).map_err(io(format!("listing {}", dir.display())))?;
        for e in rd {
            let e = e.map_err(io(format!("listing {}", dir.display())))?;
            let name = e.file_name();
            let Some(seg) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".log"))
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let len = e
                .metadata()
                .map_err(io(format!("reading {}", e.path().display())))?
                .len();
            out.push((seg, len));
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Every segment with its size (the active one included).
    pub fn segments(&self) -> Result<Vec<(u32, u64)>> {
        Self::list(&self.dir)
    }

    /// The directory of the segment files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The segment taking appends.
    pub fn active_segment(&self) -> u32 {
        self.active.lock().seg
    }

    /// Appends a chunk's record (stored form `codec || payload`); the bytes
    /// are in the page cache on return.
    pub fn append(&self, id: &Id, codec: u8, payload: &[u8]) -> Result<Loc> {
        self.append_with_crc(id, codec, payload, record_crc(id, codec, payload))
    }

    /// [`ChunkLog::append`] with the record's CRC computed beforehand
    /// ([`record_crc`]).
    pub fn append_with_crc(&self, id: &Id, codec: u8, payload: &[u8], sum: u32) -> Result<Loc> {
        let len = u32::try_from(payload.len() + 1)
            .map_err(|_| Error::Corrupt(format!("chunk {} is too large", id.short())))?;
        let mut head = [0u8; HEADER + 1];
        head[..4].copy_from_slice(&MAGIC.to_le_bytes());
        head[4..8].copy_from_slice(&len.to_le_bytes());
        head[8..12].copy_from_slice(&sum.to_le_bytes());
        head[12..HEADER].copy_from_slice(&id.0);
        head[HEADER] = codec;
        let total = (HEADER + 1 + payload.len()) as u64;
        let mut a = self.active.lock();
        if a.len > 0 && a.len + total > self.segment_bytes {
            self.rotate(&mut a)?;
        }
        let off = a.len;
        write_all_at(&a.file, &head, payload, off).map_err(io(format!(
            "appending chunk {} to segment {}",
            id.short(),
            segment_name(a.seg)
        )))?;
        a.len += total;
        let seg = a.seg;
        a.dirty.insert(seg);
        if a.len - a.unstarted >= WRITEBACK_BYTES {
            // Start writing back what was appended (without waiting), so the
            // sync that must precede the index write finds it mostly done.
            start_writeback(&a.file, a.unstarted, a.len - a.unstarted);
            a.unstarted = a.len;
        }
        Ok(Loc { seg, off, len })
    }

    fn rotate(&self, a: &mut Active) -> Result<()> {
        let seg = a
            .seg
            .checked_add(1)
            .ok_or_else(|| Error::Corrupt("chunk segment numbers are exhausted".into()))?;
        let file = Arc::new(Self::create(&self.dir, seg)?);
        // The old segment stays dirty until the next sync; the directory
        // entry of the new one is synced with it.
        a.dirty.insert(u32::MAX);
        self.files.write().insert(seg, file.clone());
        a.seg = seg;
        a.file = file;
        a.len = 0;
        a.unstarted = 0;
        Ok(())
    }

    /// Whether appends were made since the last sync.
    pub fn has_unsynced(&self) -> bool {
        !self.active.lock().dirty.is_empty()
    }

    /// Makes every append so far durable.
    pub fn sync(&self) -> Result<()> {
        let _one_at_a_time = self.syncing.lock();
        let (dirty, files) = {
            let mut a = self.active.lock();
            let dirty = std::mem::take(&mut a.dirty);
            let files = self.files.read();
            let fs: Vec<_> = dirty
                .iter()
                .filter_map(|s| files.get(s).map(|f| (*s, f.clone())))
                .collect();
            (dirty, fs)
        };
        let result = (|| {
            for (seg, f) in &files {
                f.sync_data()
                    .map_err(io(format!("syncing chunk segment {}", segment_name(*seg))))?;
            }
            if dirty.contains(&u32::MAX) {
                File::open(&self.dir)
                    .and_then(|d| d.sync_all())
                    .map_err(io(format!("syncing {}", self.dir.display())))?;
            }
            Ok(())
        })();
        if result.is_err() {
            // Not durable: the next sync tries again.
            self.active.lock().dirty.extend(dirty);
        }
        result
    }

    fn file(&self, seg: u32) -> Result<Option<Arc<File>>> {
        if let Some(f) = self.files.read().get(&seg) {
            return Ok(Some(f.clone()));
        }
        let path = self.dir.join(segment_name(seg));
        match File::open(&path) {
            Ok(f) => {
                let f = Arc::new(f);
                self.files.write().entry(seg).or_insert(f.clone());
                Ok(Some(f))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::Io {
                context: format!("opening chunk segment {}", path.display()),
                source: e,
            }),
        }
    }

    /// Reads the stored form of `id` at `loc` as its codec byte and payload,
    /// read straight into its own buffer (no copy of the data in user
    /// space), checked against the record's header and CRC. `Ok(None)`: the
    /// segment is gone (moved by a compaction; look the chunk up again).
    pub fn read_parts(&self, id: &Id, loc: Loc) -> Result<Option<(u8, Vec<u8>)>> {
        let Some(f) = self.file(loc.seg)? else {
            return Ok(None);
        };
        let bad = |why: &str| {
            Error::Corrupt(format!(
                "chunk {} in segment {} at offset {}: {why}",
                id.short(),
                segment_name(loc.seg),
                loc.off
            ))
        };
        if loc.len == 0 {
            return Err(bad("the index names an empty record"));
        }
        let mut head = [0u8; HEADER + 1];
        let mut payload = vec![0u8; loc.len as usize - 1];
        match read_all_at(&f, &mut head, &mut payload, loc.off) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(bad("the segment ends before the record"))
            }
            Err(e) => {
                return Err(Error::Io {
                    context: format!("reading chunk {}", id.short()),
                    source: e,
                })
            }
        }
        let word = |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
        let (magic, len, sum) = (word(0), word(4), word(8));
        if magic != MAGIC || len != loc.len || head[12..HEADER] != id.0 {
            return Err(bad("no such record there"));
        }
        let codec = head[HEADER];
        if record_crc(id, codec, &payload) != sum {
            return Err(bad("checksum mismatch"));
        }
        Ok(Some((codec, payload)))
    }

    /// Deletes a segment no index entry names any more.
    pub fn remove(&self, seg: u32) -> Result<()> {
        if seg == self.active_segment() {
            return Ok(());
        }
        self.files.write().remove(&seg);
        let path = self.dir.join(segment_name(seg));
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::Io {
                context: format!("removing chunk segment {}", path.display()),
                source: e,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_read_sync_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let a = Id::of(b"a");
        let b = Id::of(b"b");
        let (la, lb) = {
            let log = ChunkLog::open(dir.path(), SEGMENT_BYTES).unwrap();
            let la = log.append(&a, 0, b"aaaa").unwrap();
            let lb = log.append(&b, 0, b"bb").unwrap();
            log.sync().unwrap();
            assert_eq!(
                log.read_parts(&a, la).unwrap().unwrap(),
                (0, b"aaaa".to_vec())
            );
            assert_eq!(
                log.read_parts(&b, lb).unwrap().unwrap(),
                (0, b"bb".to_vec())
            );
            (la, lb)
        };
        let log = ChunkLog::open(dir.path(), SEGMENT_BYTES).unwrap();
        assert_eq!(
            log.active_segment(),
            la.seg + 1,
            "a reopen starts a segment"
        );
        drop(log);
        let log = ChunkLog::open(dir.path(), SEGMENT_BYTES).unwrap();
        assert_eq!(log.active_segment(), la.seg + 2);
        assert_eq!(
            log.segments().unwrap().len(),
            2,
            "the empty segment of the last run was removed"
        );
        assert_eq!(
            log.read_parts(&b, lb).unwrap().unwrap(),
            (0, b"bb".to_vec())
        );
        // A location that does not hold the named chunk is an error.
        assert!(log.read_parts(&b, la).is_err());
        let wrong = Loc { len: 2, ..lb };
        assert!(log.read_parts(&b, wrong).is_err());
        // Flipped bytes are caught by the CRC.
        let path = dir.path().join(segment_name(la.seg));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER + 2] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let log = ChunkLog::open(dir.path(), SEGMENT_BYTES).unwrap();
        let err = log.read_parts(&a, la).unwrap_err().to_string();
        assert!(err.contains("checksum"), "{err}");
        // A removed segment reads as gone, not as an error.
        log.remove(la.seg).unwrap();
        assert!(log.read_parts(&a, la).unwrap().is_none());
    }

    #[test]
    fn loc_round_trips() {
        let l = Loc {
            seg: 7,
            off: 1 << 40,
            len: 65537,
        };
        assert_eq!(Loc::decode(&l.encode()), Some(l));
        assert_eq!(Loc::decode(&[0u8; 4]), None);
    }
}
