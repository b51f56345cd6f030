//! The chunk log: chunks' stored forms appended to segment files, outside
//! RocksDB. RocksDB keeps only the index (chunk id -> where its record is).
//!
//! Why not RocksDB values: a value is written twice (the write-ahead log,
//! then the blob file at memtable flush) and copied four times on the way.
//! Here a chunk is copied once (into the staging buffer below) and written
//! once.
//!
//! Records are `magic:4 || stored len:4 || crc32c:4 || id:32 || stored`
//! (integers LE; the CRC covers the id and the stored bytes). A reader checks
//! the magic, length, id and CRC, so a location that does not hold the chunk
//! (a torn or lost append after a power failure) is an error, never wrong
//! bytes.
//!
//! Writes: an append copies its record into a staging buffer in memory;
//! the buffer goes to the segment in one write of about [`STAGE_BYTES`]
//! when full, and at [`ChunkLog::sync`]. Every write starts and ends on a
//! multiple of [`ALIGN`] (a write's tail is padded with zeros) and bypasses
//! the page cache (`O_DIRECT`) where the filesystem allows it: a block is
//! then copied once, into the warm staging buffer, instead of into fresh
//! page-cache pages that the kernel must also write back and reclaim. No
//! write ever covers bytes written before, so a torn write cannot damage a
//! record that was already durable. Readers find staged records in memory.
//!
//! Durability: [`ChunkLog::sync`] writes out what is staged and makes every
//! append so far durable. The store calls it before every RocksDB write
//! while appends are unsynced, so an index entry can never reach the disk
//! before the record it names (the kernel writes RocksDB's log back in any
//! order). Small chunks skip the log (see [`INLINE_MAX`]): a fsync of
//! 8 KiB pages costs one sync, not two.
//! Each open starts a new segment: a segment is appended to by one process
//! lifetime only, and a torn tail of a crashed one is never written after.

use crate::error::{Error, Result};
use crate::id::Id;
use crate::space::{is_enospc, Space};
use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::IoSliceMut;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

const MAGIC: u32 = 0x4b43_4d44; // "DMCK"
/// Bytes before a record's stored form.
pub const HEADER: usize = 44;
/// Bytes of records gathered in memory before they are written out in one
/// write. Measured on this project's disk (fio, O_DIRECT, one writer):
/// 64 KiB writes 593 MiB/s, 256 KiB 1407, 1 MiB 2169.
pub const STAGE_BYTES: usize = 1 << 20;
/// Every write to a segment starts and ends on a multiple of this: O_DIRECT
/// needs the device's logical block size, and 4096 covers every device and
/// the page size.
pub const ALIGN: u64 = 4096;

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

/// A buffer whose bytes start at a multiple of [`ALIGN`] in memory (what
/// O_DIRECT asks of the buffers it writes from).
struct AlignedBuf {
    raw: Vec<u8>,
    /// Where the aligned bytes start in `raw`.
    at: usize,
    len: usize,
    /// The capacity asked for (there is room for [`ALIGN`] more, to pad).
    cap: usize,
}

impl AlignedBuf {
    fn with_capacity(cap: usize) -> AlignedBuf {
        let align = ALIGN as usize;
        // Up to ALIGN - 1 bytes to reach an aligned start, ALIGN to pad.
        let raw = vec![0u8; cap + 2 * align];
        let at = (align - raw.as_ptr() as usize % align) % align;
        AlignedBuf {
            raw,
            at,
            len: 0,
            cap,
        }
    }

    fn capacity(&self) -> usize {
        self.raw.len() - self.at
    }

    fn bytes(&self) -> &[u8] {
        &self.raw[self.at..self.at + self.len]
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `parts`, growing the buffer when they do not fit.
    fn push(&mut self, parts: &[&[u8]]) {
        let n: usize = parts.iter().map(|p| p.len()).sum();
        if self.len + n > self.capacity() {
            let mut bigger = AlignedBuf::with_capacity(self.len + n);
            bigger.push(&[self.bytes()]);
            *self = bigger;
        }
        for p in parts {
            let at = self.at + self.len;
            self.raw[at..at + p.len()].copy_from_slice(p);
            self.len += p.len();
        }
    }

    /// Zero-fills the tail up to the next multiple of [`ALIGN`].
    fn pad(&mut self) {
        let padded = align_up(self.len as u64) as usize;
        let zeros = padded - self.len;
        self.push(&[&[0u8; ALIGN as usize][..zeros]]);
    }

    fn clear(&mut self) {
        self.len = 0;
    }
}

/// `n` rounded up to a multiple of [`ALIGN`].
fn align_up(n: u64) -> u64 {
    n.div_ceil(ALIGN) * ALIGN
}

/// Records on their way to a segment: written out from `start`.
struct Out {
    seg: u32,
    /// The segment's write descriptor (O_DIRECT when available).
    file: Arc<File>,
    start: u64,
    buf: AlignedBuf,
}

impl Out {
    /// Fills `head` then `body` from the bytes at `off` of segment `seg`, if
    /// this buffer holds them all.
    fn copy(&self, seg: u32, off: u64, head: &mut [u8], body: &mut [u8]) -> bool {
        let len = (head.len() + body.len()) as u64;
        let held = self.start..self.start + self.buf.len as u64;
        if seg != self.seg || off < held.start || off.saturating_add(len) > held.end {
            return false;
        }
        let from = (off - self.start) as usize;
        let (h, b) = self.buf.bytes()[from..].split_at(head.len());
        head.copy_from_slice(h);
        body.copy_from_slice(&b[..body.len()]);
        true
    }
}

struct Active {
    /// Records staged since the last write, for the active segment
    /// (`staged.seg`); `staged.start` is where the next write goes.
    staged: Out,
    /// Segments appended to since the last sync.
    dirty: BTreeSet<u32>,
}

impl Active {
    /// The offset the next record goes to.
    fn len(&self) -> u64 {
        self.staged.start + self.staged.buf.len as u64
    }
}

/// Append-only segment files of chunk records.
pub struct ChunkLog {
    dir: PathBuf,
    segment_bytes: u64,
    /// Whether segments are written with O_DIRECT (false where the
    /// filesystem refuses it, at open, e.g. tmpfs, or at a write).
    direct: std::sync::atomic::AtomicBool,
    /// The active segment's number, readable without its lock.
    active_seg: std::sync::atomic::AtomicU32,
    /// Held for a whole sync: a sync that finds nothing dirty because
    /// another is still syncing the same appends must wait for it, or it
    /// would return before they are durable.
    syncing: Mutex<()>,
    active: Mutex<Active>,
    /// Held while a staged buffer is written out, so that writes reach a
    /// segment one at a time and in order (the segment's end never passes
    /// bytes not yet written, so the page cache never holds a stale page
    /// of a record). Taken after `active`, never before it.
    writing: Mutex<()>,
    /// The buffer being written (or whose write failed and is retried
    /// first by the next one); readers find its records here meanwhile.
    out: Mutex<Option<Arc<Out>>>,
    /// A written buffer kept for reuse (fresh memory is slow to touch).
    spare: Mutex<Option<AlignedBuf>>,
    /// Open segments, read by many threads at once (pread).
    files: RwLock<HashMap<u32, Arc<File>>>,
    /// The store's reserve, given back when a write finds the disk full
    /// (see `space`); unset in tests of the log alone.
    space: std::sync::OnceLock<Arc<Space>>,
    /// Tests: this many writes fail with ENOSPC.
    #[cfg(test)]
    pub(crate) fail_writes: std::sync::atomic::AtomicU32,
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> Error {
    move |cause| Error::Io { context, cause }
}

pub(crate) fn segment_name(seg: u32) -> String {
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

/// Opens a segment for writing: with O_DIRECT when `direct`, else through
/// the page cache (a plain clone of `file`).
fn writer(path: &Path, file: &Arc<File>, direct: bool) -> std::io::Result<Arc<File>> {
    if !direct {
        return Ok(file.clone());
    }
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map(Arc::new)
}

impl ChunkLog {
    /// Opens the log in `dir` and starts a new segment after the last one.
    /// Segments take appends until they reach `segment_bytes`. They are
    /// written with O_DIRECT unless the filesystem refuses it (tmpfs) or
    /// `DM_CHUNKLOG_DIRECT=0` is set (for measuring).
    /// The new segment's number is above every segment file there and at
    /// least `lowest` (the number after every segment the index ever named:
    /// one whose file is missing is not taken again).
    pub fn open(dir: &Path, segment_bytes: u64, lowest: u32) -> Result<ChunkLog> {
        let direct = std::env::var("DM_CHUNKLOG_DIRECT").as_deref() != Ok("0");
        Self::open_with(dir, segment_bytes, direct, lowest)
    }

    /// [`ChunkLog::open`], asking for O_DIRECT or not.
    fn open_with(dir: &Path, segment_bytes: u64, wanted: bool, lowest: u32) -> Result<ChunkLog> {
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
        let seg = last
            .map_or(Ok(1), |s| {
                s.checked_add(1)
                    .ok_or_else(|| Error::Corrupt("chunk segment numbers are exhausted".into()))
            })?
            .max(lowest);
        let file = Arc::new(Self::create(dir, seg)?);
        let path = dir.join(segment_name(seg));
        let (direct, out) = match writer(&path, &file, wanted) {
            Ok(out) => (wanted, out),
            Err(e) => {
                tracing::debug!("chunk log without O_DIRECT in {}: {e}", dir.display());
                (false, file.clone())
            }
        };
        let log = ChunkLog {
            dir: dir.to_path_buf(),
            segment_bytes,
            direct: direct.into(),
            active_seg: seg.into(),
            syncing: Mutex::new(()),
            active: Mutex::new(Active {
                staged: Out {
                    seg,
                    file: out,
                    start: 0,
                    buf: AlignedBuf::with_capacity(STAGE_BYTES),
                },
                dirty: BTreeSet::new(),
            }),
            writing: Mutex::new(()),
            out: Mutex::new(None),
            spare: Mutex::new(None),
            files: RwLock::new(HashMap::new()),
            space: Default::default(),
            #[cfg(test)]
            fail_writes: 0.into(),
        };
        log.files.write().insert(seg, file);
        // The new segment's directory entry must survive a crash before
        // anything durable names it.
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(format!("syncing {}", dir.display())))?;
        Ok(log)
    }

    /// Gives the log the store's reserve, released (and the failed write
    /// tried once more) when a write finds the disk full.
    pub(crate) fn set_space(&self, space: Arc<Space>) {
        let _ = self.space.set(space);
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
        self.active_seg.load(Ordering::Acquire)
    }

    /// Appends a chunk's record (stored form `codec || payload`); it is
    /// readable on return, durable after the next [`ChunkLog::sync`].
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
        let total = HEADER + 1 + payload.len();
        let mut a = self.active.lock();
        if a.len() > 0 && a.len() + total as u64 > self.segment_bytes {
            self.rotate(&mut a)?;
        }
        // A full buffer goes out first (this record may not fit after it);
        // it is written below, once the lock on the active segment is let go.
        let full = !a.staged.buf.is_empty() && a.staged.buf.len + total > STAGE_BYTES;
        let writing = match full {
            true => Some(self.hand_out(&mut a)?),
            false => None,
        };
        let off = a.len();
        a.staged.buf.push(&[&head, payload]);
        let seg = a.staged.seg;
        a.dirty.insert(seg);
        drop(a);
        if let Some(w) = writing {
            // This record is staged; the full buffer before it stays in
            // `out`, readable, and the next write or sync tries it again
            // (and reports the error to whoever needs it durable).
            if let Err(e) = self.write_out(&w) {
                tracing::warn!("{e}");
            }
        }
        Ok(Loc { seg, off, len })
    }

    /// Moves the staged records (padded to [`ALIGN`]) to `out`, to be
    /// written by [`ChunkLog::write_out`] with the returned guard held;
    /// the next records are staged after them. A write that failed before
    /// is retried first. Called with the active segment locked.
    fn hand_out(&self, a: &mut Active) -> Result<parking_lot::MutexGuard<'_, ()>> {
        let w = self.writing.lock();
        self.write_out(&w)?;
        if a.staged.buf.is_empty() {
            return Ok(w);
        }
        let spare = self
            .spare
            .lock()
            .take()
            .unwrap_or_else(|| AlignedBuf::with_capacity(STAGE_BYTES));
        let mut full = std::mem::replace(&mut a.staged.buf, spare);
        full.pad();
        let out = Out {
            seg: a.staged.seg,
            file: a.staged.file.clone(),
            start: a.staged.start,
            buf: full,
        };
        a.staged.start += out.buf.len as u64;
        *self.out.lock() = Some(Arc::new(out));
        Ok(w)
    }

    /// Writes the buffer in `out`, if any (the caller holds `writing`).
    /// It stays there, readable, until its write succeeds.
    fn write_out(&self, writing: &parking_lot::MutexGuard<'_, ()>) -> Result<()> {
        if let Some(space) = self.space.get() {
            space.watch();
        }
        match self.write_out_once(writing) {
            // The disk is full: with the reserve given back, once more.
            Err(Error::Io { cause, .. })
                if is_enospc(&cause) && self.space.get().is_some_and(|s| s.release()) =>
            {
                self.write_out_once(writing)
            }
            r => r,
        }
    }

    /// One try of [`ChunkLog::write_out`].
    fn write_out_once(&self, _writing: &parking_lot::MutexGuard<'_, ()>) -> Result<()> {
        let Some(out) = self.out.lock().clone() else {
            return Ok(());
        };
        let context = || {
            format!(
                "writing {} bytes of chunk records to segment {} at offset {}",
                out.buf.len,
                segment_name(out.seg),
                out.start
            )
        };
        #[cfg(test)]
        if self
            .fail_writes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
        {
            let e = std::io::Error::from_raw_os_error(libc::ENOSPC);
            return Err(io(context())(e));
        }
        let mut written = false;
        if self.direct.load(Ordering::Relaxed) {
            match out.file.write_all_at(out.buf.bytes(), out.start) {
                Ok(()) => written = true,
                // A filesystem that took O_DIRECT at open but refuses the
                // write: the page cache from now on.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::warn!("{}: {e}; writing the chunk log without O_DIRECT", context());
                    self.direct.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(io(context())(e)),
            }
        }
        if !written {
            let f = self
                .file(out.seg)?
                .ok_or_else(|| Error::Corrupt(format!("{}: the segment is gone", context())))?;
            f.write_all_at(out.buf.bytes(), out.start)
                .map_err(io(context()))?;
            // Start writing back what was written (without waiting), so the
            // sync that must precede an index write finds it mostly done.
            start_writeback(&f, out.start, out.buf.len as u64);
        }
        drop(self.out.lock().take());
        // Kept for the next buffer, unless a reader still holds it.
        if let Ok(mut o) = Arc::try_unwrap(out) {
            if o.buf.cap == STAGE_BYTES {
                o.buf.clear();
                *self.spare.lock() = Some(o.buf);
            }
        }
        Ok(())
    }

    fn rotate(&self, a: &mut Active) -> Result<()> {
        // The old segment's staged records are written before it is left.
        let w = self.hand_out(a)?;
        self.write_out(&w)?;
        drop(w);
        let seg = a
            .staged
            .seg
            .checked_add(1)
            .ok_or_else(|| Error::Corrupt("chunk segment numbers are exhausted".into()))?;
        let file = Arc::new(Self::create(&self.dir, seg)?);
        let path = self.dir.join(segment_name(seg));
        // Nothing may fail from here on: the segment exists now.
        let out = writer(&path, &file, self.direct.load(Ordering::Relaxed)).unwrap_or_else(|e| {
            tracing::warn!("opening {} with O_DIRECT: {e}", path.display());
            file.clone()
        });
        // The old segment stays dirty until the next sync; the directory
        // entry of the new one is synced with it.
        a.dirty.insert(u32::MAX);
        self.files.write().insert(seg, file.clone());
        self.active_seg.store(seg, Ordering::Release);
        a.staged.seg = seg;
        a.staged.file = out;
        a.staged.start = 0;
        Ok(())
    }

    /// Starts a new segment if the active one holds at least `min_bytes`,
    /// so that GC may compact what was the active segment (it leaves the
    /// active one alone). Returns whether it did.
    pub fn seal(&self, min_bytes: u64) -> Result<bool> {
        let mut a = self.active.lock();
        if a.len() == 0 || a.len() < min_bytes {
            return Ok(false);
        }
        self.rotate(&mut a)?;
        Ok(true)
    }

    /// Whether appends were made since the last sync.
    pub fn has_unsynced(&self) -> bool {
        !self.active.lock().dirty.is_empty()
    }

    /// Makes every append so far durable.
    pub fn sync(&self) -> Result<()> {
        let _one_at_a_time = self.syncing.lock();
        let (dirty, files, w) = {
            let mut a = self.active.lock();
            if a.dirty.is_empty() {
                // Every append was made durable by an earlier sync, which
                // has ended (`syncing`), or put its segments back here.
                return Ok(());
            }
            // Waits for a write in progress, then hands the staged records out.
            let w = self.hand_out(&mut a)?;
            let dirty = std::mem::take(&mut a.dirty);
            let files = self.files.read();
            let fs: Vec<_> = dirty
                .iter()
                .filter_map(|s| files.get(s).map(|f| (*s, f.clone())))
                .collect();
            (dirty, fs, w)
        };
        let result = (|| {
            self.write_out(&w)?;
            drop(w);
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

    /// Fills `head` then `body` from the bytes at `off` of segment `seg`
    /// if they are still in memory (staged, or being written).
    fn in_memory(&self, seg: u32, off: u64, head: &mut [u8], body: &mut [u8]) -> bool {
        // Only the active segment has staged records (an older one's were
        // written when it was left).
        if seg == self.active_seg.load(Ordering::Acquire)
            && self.active.lock().staged.copy(seg, off, head, body)
        {
            return true;
        }
        // Checked second: records move from `staged` to `out` under the
        // active lock, and leave `out` only once written.
        let out = self.out.lock().clone();
        out.is_some_and(|o| o.copy(seg, off, head, body))
    }

    /// Whether segment `seg` is there (its file, or the active one).
    pub fn has_segment(&self, seg: u32) -> Result<bool> {
        Ok(seg == self.active_segment() || self.file(seg)?.is_some())
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
                cause: e,
            }),
        }
    }

    /// Reads the stored form of `id` at `loc` as its codec byte and payload,
    /// read straight into its own buffer (copied there when the record is
    /// still in memory), checked against the record's header and CRC. `Ok(None)`: the
    /// segment is gone (moved by a compaction; look the chunk up again).
    pub fn read_parts(&self, id: &Id, loc: Loc) -> Result<Option<(u8, Vec<u8>)>> {
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
        if !self.in_memory(loc.seg, loc.off, &mut head, &mut payload) {
            let Some(f) = self.file(loc.seg)? else {
                return Ok(None);
            };
            match read_all_at(&f, &mut head, &mut payload, loc.off) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Err(bad("the segment ends before the record"))
                }
                Err(e) => {
                    return Err(Error::Io {
                        context: format!("reading chunk {}", id.short()),
                        cause: e,
                    })
                }
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

    /// Bytes a segment holds on the disk (its allocated blocks: holes
    /// punched by [`ChunkLog::punch`] do not count), 0 if it is gone.
    pub fn allocated(&self, seg: u32) -> Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let path = self.dir.join(segment_name(seg));
        match std::fs::metadata(&path) {
            Ok(m) => Ok(m.blocks() * 512),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(io(format!("reading {}", path.display()))(e)),
        }
    }

    /// Gives the disk blocks of a sealed segment between its live records
    /// back to the filesystem (a hole reads as zeros; nothing names those
    /// bytes), keeping the file's size and every live record where it is.
    /// `live` is every (offset, length) still indexed in the segment.
    /// Returns `Ok(false)` where the filesystem cannot punch holes.
    pub fn punch(&self, seg: u32, live: &mut [(u64, u64)]) -> Result<bool> {
        use std::os::fd::AsRawFd;
        if seg == self.active_segment() {
            return Ok(true);
        }
        let path = self.dir.join(segment_name(seg));
        let f = match OpenOptions::new().write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(true),
            Err(e) => return Err(io(format!("opening {}", path.display()))(e)),
        };
        let end = f
            .metadata()
            .map_err(io(format!("reading {}", path.display())))?
            .len();
        live.sort_unstable();
        let mut at = 0;
        let mut gaps = Vec::new();
        for &(off, len) in live.iter() {
            if off > at {
                gaps.push((at, off));
            }
            at = at.max(off + len);
        }
        if end > at {
            gaps.push((at, end));
        }
        for (from, to) in gaps {
            // Whole filesystem blocks only: the rest may hold a live
            // record's first or last bytes.
            let (from, to) = (from.next_multiple_of(ALIGN), to / ALIGN * ALIGN);
            if to <= from {
                continue;
            }
            let (Ok(off), Ok(len)) = (
                libc::off_t::try_from(from),
                libc::off_t::try_from(to - from),
            ) else {
                continue;
            };
            // SAFETY: fallocate only reads its integer arguments; the
            // range holds no record any index entry names.
            let rc = unsafe {
                libc::fallocate(
                    f.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    off,
                    len,
                )
            };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                    return Ok(false);
                }
                return Err(io(format!("punching a hole in {}", path.display()))(e));
            }
        }
        Ok(true)
    }

    /// Deletes a segment no index entry names any more.
    pub fn remove(&self, seg: u32) -> Result<()> {
        if seg == self.active_segment() {
            return Ok(());
        }
        // Unlinked under the map's lock: a reader holding an old location
        // must not open the file again (and keep it in the map, and its
        // space on the disk) between the two.
        let mut files = self.files.write();
        files.remove(&seg);
        let path = self.dir.join(segment_name(seg));
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::Io {
                context: format!("removing chunk segment {}", path.display()),
                cause: e,
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
            let log = ChunkLog::open(dir.path(), SEGMENT_BYTES, 0).unwrap();
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
        let log = ChunkLog::open(dir.path(), SEGMENT_BYTES, 0).unwrap();
        assert_eq!(
            log.active_segment(),
            la.seg + 1,
            "a reopen starts a segment"
        );
        drop(log);
        let log = ChunkLog::open(dir.path(), SEGMENT_BYTES, 0).unwrap();
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
        let log = ChunkLog::open(dir.path(), SEGMENT_BYTES, 0).unwrap();
        let err = log.read_parts(&a, la).unwrap_err().to_string();
        assert!(err.contains("checksum"), "{err}");
        // A removed segment reads as gone, not as an error.
        log.remove(la.seg).unwrap();
        assert!(log.read_parts(&a, la).unwrap().is_none());
    }

    /// A chunk-like payload of `n` bytes, different for each `i`.
    fn payload(i: u32, n: usize) -> Vec<u8> {
        (0..n as u32)
            .map(|j| (i.wrapping_mul(31) ^ j) as u8)
            .collect()
    }

    #[test]
    fn staged_records_are_readable_and_every_write_is_aligned() {
        for direct in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let log = ChunkLog::open_with(dir.path(), SEGMENT_BYTES, direct, 0).unwrap();
            let seg_path = dir.path().join(segment_name(log.active_segment()));
            let mut locs = Vec::new();
            // 100 records of 20-84 KiB: several buffers' worth, each record
            // read back right after its append, while staged or being written.
            for i in 0..100u32 {
                let p = payload(i, 20_000 + (i as usize * 653) % 65_536);
                let id = Id::of(&p);
                let loc = log.append(&id, 0, &p).unwrap();
                assert_eq!(log.read_parts(&id, loc).unwrap().unwrap().1, p);
                locs.push((id, p, loc));
                let on_disk = std::fs::metadata(&seg_path).unwrap().len();
                assert_eq!(on_disk % ALIGN, 0, "direct={direct}: unaligned write");
            }
            assert!(
                std::fs::metadata(&seg_path).unwrap().len() > STAGE_BYTES as u64,
                "full buffers were written before any sync"
            );
            log.sync().unwrap();
            let len = std::fs::metadata(&seg_path).unwrap().len();
            assert_eq!(len % ALIGN, 0);
            let last = &locs.last().unwrap().2;
            assert_eq!(len, align_up(last.off + last.record_len()));
            // After a sync the next record starts on a new aligned block, so
            // no write ever covers bytes an earlier one wrote.
            let p = payload(1000, 30_000);
            let next = log.append(&Id::of(&p), 0, &p).unwrap();
            assert_eq!(next.off, len);
            log.sync().unwrap();
            drop(log);
            let log = ChunkLog::open_with(dir.path(), SEGMENT_BYTES, direct, 0).unwrap();
            for (id, p, loc) in &locs {
                assert_eq!(&log.read_parts(id, *loc).unwrap().unwrap().1, p);
            }
            assert_eq!(log.read_parts(&Id::of(&p), next).unwrap().unwrap().1, p);
        }
    }

    #[test]
    fn concurrent_appends_and_reads_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        // Small segments: rotations happen under the concurrent appends.
        let log = Arc::new(ChunkLog::open(dir.path(), 3 << 20, 0).unwrap());
        let threads: Vec<_> = (0..4u32)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    let mut mine = Vec::new();
                    for i in 0..60u32 {
                        let p = payload(t * 1000 + i, 16_384 + ((t + i) as usize * 997) % 50_000);
                        let id = Id::of(&p);
                        let loc = log.append(&id, 0, &p).unwrap();
                        mine.push((id, p, loc));
                        // Read back an earlier record of this thread.
                        let (id, p, loc) = &mine[(i as usize * 7) % mine.len()];
                        assert_eq!(&log.read_parts(id, *loc).unwrap().unwrap().1, p);
                        if i % 25 == 24 {
                            log.sync().unwrap();
                        }
                    }
                    mine
                })
            })
            .collect();
        let all: Vec<_> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        log.sync().unwrap();
        assert!(log.segments().unwrap().len() > 2, "the segments rotated");
        drop(log);
        let log = ChunkLog::open(dir.path(), 3 << 20, 0).unwrap();
        for (id, p, loc) in &all {
            assert_eq!(&log.read_parts(id, *loc).unwrap().unwrap().1, p);
        }
    }

    #[test]
    fn a_failed_write_keeps_its_records_readable_and_fails_syncs_until_retried() {
        let dir = tempfile::tempdir().unwrap();
        let log = ChunkLog::open(dir.path(), SEGMENT_BYTES, 0).unwrap();
        let mut recs = Vec::new();
        let mut add = |log: &ChunkLog, i: u32| {
            let p = payload(i, 60_000);
            let loc = log.append(&Id::of(&p), 0, &p).unwrap();
            recs.push((Id::of(&p), p, loc));
        };
        add(&log, 0);
        log.sync().unwrap();
        log.fail_writes.store(u32::MAX, Ordering::Relaxed);
        // Past a buffer's worth: the full buffer's write fails, the appends
        // do not (their records are staged), and every record reads back.
        for i in 1..26 {
            add(&log, i);
        }
        for (id, p, loc) in &recs {
            assert_eq!(&log.read_parts(id, *loc).unwrap().unwrap().1, p);
        }
        // Memory stays bounded: once the next buffer is full too, appends
        // fail until the first one is written.
        let refused = (26..60).find_map(|i| {
            let p = payload(i, 60_000);
            log.append(&Id::of(&p), 0, &p).err()
        });
        assert!(refused.is_some(), "a third buffer was never refused");
        let err = log.sync().unwrap_err().to_string();
        assert!(err.contains("writing") && err.contains("segment"), "{err}");
        assert!(log.sync().is_err(), "still not durable");
        assert!(log.has_unsynced());
        log.fail_writes.store(0, Ordering::Relaxed);
        log.sync().unwrap();
        assert!(!log.has_unsynced());
        drop(log);
        let log = ChunkLog::open(dir.path(), SEGMENT_BYTES, 0).unwrap();
        for (id, p, loc) in &recs {
            assert_eq!(&log.read_parts(id, *loc).unwrap().unwrap().1, p);
        }
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
