//! Room to recover from a full disk.
//!
//! The store keeps a reserve file (`DATA_DIR/reserve`, 1/16 of the
//! filesystem, at most 64 MiB). When a write of the store fails because the
//! disk is full, the reserve is given back to the filesystem and the store
//! turns *full*: writes of new file data and received chunks are refused
//! with ENOSPC, as a full filesystem refuses them, while what frees space
//! (deleting files, `reset --hard`, deleting branches and dots, GC) and
//! commits of what was already written run in the room the reserve left.
//! Once the filesystem has twice the reserve free again (checked at most
//! once a second, when a write asks), the reserve is made again and writes
//! are taken again.

use crate::error::{libc_consts::ENOSPC, Error, Result};
use parking_lot::Mutex;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The largest reserve.
const RESERVE_MAX: u64 = 64 << 20;
/// How often a full store looks at the free space again.
const RECHECK: Duration = Duration::from_secs(1);

/// How often writers look at the free space while the store takes data.
const WATCH: Duration = Duration::from_millis(50);

/// The reserve file and whether the store is full.
pub(crate) struct Space {
    dir: PathBuf,
    path: PathBuf,
    size: u64,
    full: AtomicBool,
    checked: Mutex<Option<Instant>>,
    /// When the store opened, and when a writer last looked at the free
    /// space (milliseconds after it), for [`Space::watch`].
    opened: Instant,
    watched: AtomicU64,
    /// Whether the log said that the data directory is gone.
    gone_said: AtomicBool,
}

/// Total and available bytes of the filesystem holding `dir`.
fn statvfs(dir: &Path) -> std::io::Result<(u64, u64)> {
    let s = nix::sys::statvfs::statvfs(dir)?;
    let frsize = s.fragment_size() as u64;
    Ok((
        (s.blocks() as u64).saturating_mul(frsize),
        (s.blocks_available() as u64).saturating_mul(frsize),
    ))
}

/// Whether an I/O error means the disk is full.
pub(crate) fn is_enospc(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(ENOSPC)
}

/// Whether a RocksDB error means the disk is full (RocksDB gives the
/// errno only in its message).
pub(crate) fn is_no_space(e: &rocksdb::Error) -> bool {
    e.as_ref().contains("No space left on device")
}

impl Space {
    /// Makes the reserve in `dir` if it is missing; a store that cannot
    /// make it starts full.
    pub(crate) fn open(dir: &Path) -> Space {
        let total = statvfs(dir).map(|(t, _)| t).unwrap_or(0);
        let size = (total / 16).clamp(1 << 20, RESERVE_MAX);
        let space = Space {
            dir: dir.to_path_buf(),
            path: dir.join("reserve"),
            size,
            full: AtomicBool::new(false),
            checked: Mutex::new(None),
            opened: Instant::now(),
            watched: AtomicU64::new(0),
            gone_said: AtomicBool::new(false),
        };
        // A store that gave its reserve back to open starts full.
        let free = space.free_bytes();
        if !space.reserve_kept(free) {
            tracing::warn!(
                "the disk holding {} has {} MiB free: could not keep {} MiB free for deletions; \
                 new data is refused until it has {} MiB free",
                dir.display(),
                free >> 20,
                size >> 20,
                space.room_needed() >> 20
            );
            space.turn_full();
        }
        space
    }

    /// Whether the reserve is there, making it if it is missing (or
    /// smaller than now wanted) and `free` leaves room to spare, as a full
    /// store makes it again.
    fn reserve_kept(&self, free: u64) -> bool {
        std::fs::metadata(&self.path).is_ok_and(|m| m.len() >= self.size)
            || (free >= self.room_needed() && self.make().is_ok())
    }

    /// Turns the store full, as if it had just looked at the disk.
    fn turn_full(&self) {
        self.full.store(true, Ordering::Release);
        *self.checked.lock() = Some(Instant::now());
    }

    /// Removes the reserve of the store in `dir` before it opens (its
    /// database found the disk full); returns whether there was one.
    pub(crate) fn give_back(dir: &Path) -> bool {
        let given = std::fs::remove_file(dir.join("reserve")).is_ok();
        if given {
            tracing::warn!(
                "the disk holding {} is full: gave back the room kept for deletions to open the \
                 store",
                dir.display()
            );
        }
        given
    }

    /// Allocates the reserve file (posix_fallocate: blocks the filesystem
    /// gives back when it is removed; a filesystem that does not reserve
    /// blocks that way, such as ZFS, keeps nothing for it).
    fn make(&self) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let tmp = self.dir.join("reserve.tmp");
        let result = (|| {
            let f = std::fs::File::create(&tmp)?;
            nix::fcntl::posix_fallocate(f.as_raw_fd(), 0, self.size as i64)
                .map_err(std::io::Error::from)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Called when a write found the disk full: gives the reserve back
    /// (if it is still there) and turns the store full. Returns whether
    /// room was freed, so that the write may be tried once more.
    pub(crate) fn release(&self) -> bool {
        self.turn_full();
        match std::fs::remove_file(&self.path) {
            Ok(()) => {
                tracing::warn!(
                    "the disk holding {} is full: gave back the {} MiB kept for deletions; new \
                     data is refused until it has {} MiB free (delete files, branches or dots, \
                     then `dm gc`)",
                    self.dir.display(),
                    self.size >> 20,
                    self.room_needed() >> 20
                );
                true
            }
            Err(_) => false,
        }
    }

    /// Called by writes of the store (chunk log writes, RocksDB batches):
    /// every 50 ms at most, looks at the free space. Below the reserve's
    /// size the store turns full before the disk does, keeping the last
    /// of it for what was already written and for deletions (RocksDB,
    /// once it meets a full disk, takes writes again only when it has
    /// room for a whole memtable), and a reserve deleted by hand is made
    /// again.
    pub(crate) fn watch(&self) {
        if self.full.load(Ordering::Acquire) {
            return;
        }
        let now = self.opened.elapsed().as_millis() as u64;
        let last = self.watched.load(Ordering::Relaxed);
        if now.saturating_sub(last) < WATCH.as_millis() as u64
            || self
                .watched
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        // A data directory moved or deleted while the server runs is no
        // full disk (the log and `dm version` said so, with advice to
        // delete files).
        if std::fs::metadata(&self.dir).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound) {
            if !self.gone_said.swap(true, Ordering::Relaxed) {
                tracing::error!(
                    "the data directory {} is gone (moved or deleted while the server runs?): \
                     stop the server and start it with --data-dir where the directory is now",
                    self.dir.display()
                );
            }
            return;
        }
        let free = self.free_bytes();
        if self.reserve_kept(free) && free >= self.size {
            return;
        }
        self.turn_full();
        tracing::warn!(
            "the disk holding {} has {} MiB free: new data is refused until it has {} MiB free \
             (delete files, branches or dots, then `dm gc`)",
            self.dir.display(),
            free >> 20,
            self.room_needed() >> 20
        );
    }

    /// Whether new data must be refused. A full store looks at the free
    /// space at most once a second, and takes writes again (after making
    /// the reserve again) once twice the reserve is free.
    pub(crate) fn is_full(&self) -> bool {
        self.full_looking_after(RECHECK)
    }

    /// Whether the disk has less room than dm needs to take new data now,
    /// whether or not a write met that yet (another program filled it).
    pub(crate) fn short_of_room(&self) -> bool {
        self.free_bytes() < self.room_needed()
    }

    /// Whether the store is full, looking at the free space now if it was.
    pub(crate) fn check_now(&self) -> bool {
        self.full_looking_after(Duration::ZERO)
    }

    /// Whether the store is full; a full store looks at the free space if
    /// it last did `every` ago or more, and takes writes again if there is
    /// room (after making the reserve again, if it is gone).
    fn full_looking_after(&self, every: Duration) -> bool {
        if !self.full.load(Ordering::Acquire) {
            return false;
        }
        let mut checked = self.checked.lock();
        if checked.is_some_and(|t| t.elapsed() < every) {
            return true;
        }
        *checked = Some(Instant::now());
        let free = self.free_bytes();
        if free < self.room_needed() || !self.reserve_kept(free) {
            return true;
        }
        self.full.store(false, Ordering::Release);
        tracing::info!(
            "the disk holding {} has room again: taking new data",
            self.dir.display()
        );
        false
    }

    /// Refuses new data (`what`, e.g. "writing to app@master") with ENOSPC
    /// while the store is full.
    pub(crate) fn refuse_when_full(&self, what: impl FnOnce() -> String) -> Result<()> {
        if !self.is_full() {
            return Ok(());
        }
        Err(Error::Io {
            context: format!(
                "{}: dm keeps the last of the disk free for deletions and takes new data once \
                 {} MiB are free",
                what(),
                self.room_needed() >> 20
            ),
            cause: std::io::Error::from_raw_os_error(ENOSPC),
        })
    }

    /// Bytes free on the filesystem (0 if it cannot tell).
    /// Free bytes of the filesystem holding the store; when that cannot
    /// be told (the directory is gone), not a full disk.
    pub(crate) fn free_bytes(&self) -> u64 {
        statvfs(&self.dir).map_or(u64::MAX, |(_, free)| free)
    }

    /// Free bytes the filesystem needs before a full store takes new data.
    pub(crate) fn room_needed(&self) -> u64 {
        2 * self.size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_reserve_comes_back_when_there_is_room() {
        let dir = tempfile::tempdir().unwrap();
        let space = Space::open(dir.path());
        let reserve = dir.path().join("reserve");
        assert_eq!(std::fs::metadata(&reserve).unwrap().len(), space.size);
        assert!(!space.is_full());
        assert!(space.release());
        assert!(!reserve.exists());
        // Within a second of the release it stays full without looking.
        assert!(space.is_full());
        assert!(space
            .refuse_when_full(|| "writing".into())
            .is_err_and(|e| e.errno() == ENOSPC));
        // Released again: nothing left to give.
        assert!(!space.release());
        *space.checked.lock() = Some(Instant::now() - RECHECK);
        // The test's disk has room: the reserve is made again.
        assert!(!space.is_full());
        assert_eq!(std::fs::metadata(&reserve).unwrap().len(), space.size);
        assert!(space.refuse_when_full(|| "writing".into()).is_ok());
    }

    /// A data directory moved away while the server runs is no full disk
    /// (writes were refused with ENOSPC, and the log advised deletions).
    #[test]
    fn a_data_dir_moved_away_is_no_full_disk() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let space = Space::open(&data);
        std::fs::rename(&data, dir.path().join("moved")).unwrap();
        space.watch();
        assert!(!space.is_full());
        assert!(!space.short_of_room());
        assert!(space.refuse_when_full(|| "writing".into()).is_ok());
    }
}
