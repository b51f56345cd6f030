//! Inode records, directory entries and the attributes handed to callers.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::time::{SystemTime, UNIX_EPOCH};

/// Inode number.
pub type Ino = u64;
/// The root directory of a dot's tree.
pub const ROOT_INO: Ino = 1;

/// rename(2) flag: fail if the target exists.
pub const RENAME_NOREPLACE: u32 = 1;
/// rename(2) flag: swap source and target.
pub const RENAME_EXCHANGE: u32 = 2;
/// setxattr flag: fail if the attribute exists.
pub const XATTR_CREATE: i32 = 1;
/// setxattr flag: fail if the attribute does not exist.
pub const XATTR_REPLACE: i32 = 2;

/// The type of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Fifo,
    CharDev,
    BlockDev,
    Socket,
}

/// A point in time, seconds and nanoseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

impl Timestamp {
    pub fn now() -> Timestamp {
        match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => Timestamp {
                secs: d.as_secs() as i64,
                nanos: d.subsec_nanos(),
            },
            Err(_) => Timestamp::default(),
        }
    }

    /// Nanoseconds since the epoch (0 before it).
    pub fn as_nanos(&self) -> u64 {
        (self.secs.max(0) as u64) * 1_000_000_000 + self.nanos as u64
    }
}

/// How setattr sets a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeSet {
    Now,
    At(Timestamp),
}

/// The stored record of an inode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InodeRec {
    pub kind: FileKind,
    /// Permission bits including setuid, setgid and sticky (07777).
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub size: u64,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub crtime: Timestamp,
    /// Parent directory (the root is its own parent). Of other files, a
    /// hint: the directory they were created in or last moved to (a hard
    /// link elsewhere does not change it), or 0 (stores before 2026-12).
    pub parent: Ino,
    /// Symlink target (symlinks only).
    pub target: Vec<u8>,
}

impl InodeRec {
    pub fn new(kind: FileKind, perm: u32, uid: u32, gid: u32, parent: Ino) -> InodeRec {
        let now = Timestamp::now();
        InodeRec {
            kind,
            perm: (perm & 0o7777) as u16,
            nlink: if kind == FileKind::Dir { 2 } else { 1 },
            uid,
            gid,
            rdev: 0,
            size: 0,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            parent,
            target: Vec::new(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        // Serialising into a Vec cannot fail (see object::encode).
        postcard::to_stdvec(self).expect("postcard into Vec cannot fail")
    }

    pub fn decode(ino: Ino, bytes: &[u8]) -> Result<InodeRec> {
        postcard::from_bytes(bytes)
            .map_err(|e| Error::Corrupt(format!("inode {ino} record does not decode: {e}")))
    }

    /// The attributes of this record as inode `ino`.
    pub fn attr(&self, ino: Ino, blksize: u32) -> Attr {
        Attr {
            ino,
            kind: self.kind,
            perm: self.perm,
            nlink: self.nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: self.rdev,
            size: self.size,
            blocks: self.size.div_ceil(512),
            atime: self.atime,
            mtime: self.mtime,
            ctime: self.ctime,
            crtime: self.crtime,
            blksize,
        }
    }
}

/// A directory entry's stored value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dirent {
    pub ino: Ino,
    pub kind: FileKind,
}

impl Dirent {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("postcard into Vec cannot fail")
    }
    pub fn decode(bytes: &[u8]) -> Result<Dirent> {
        postcard::from_bytes(bytes)
            .map_err(|e| Error::Corrupt(format!("directory entry does not decode: {e}")))
    }
}

/// Per-snapshot counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Super {
    /// The next inode number to hand out.
    pub next_ino: Ino,
}

/// File attributes as returned by lookup/getattr.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: Ino,
    pub kind: FileKind,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub size: u64,
    /// 512-byte units.
    pub blocks: u64,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub crtime: Timestamp,
    pub blksize: u32,
}

/// setattr's changes; None leaves a field as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeSet>,
    pub mtime: Option<TimeSet>,
    pub ctime: Option<Timestamp>,
    /// Also clear S_ISUID, and S_ISGID when the group may execute, as Linux
    /// does when a process without CAP_FSETID writes or truncates a file
    /// (regular files only; ignored when `mode` is set). A change of
    /// `uid` or `gid` of a non-directory clears them regardless, as chown does.
    pub kill_setid: bool,
    /// `size` only grows the file (fallocate): at or below the file's
    /// size, decided under the file's lock, it changes nothing.
    pub grow_only: bool,
}

/// One entry of readdir.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: Ino,
    /// Pass this back to readdir to continue after this entry.
    pub offset: i64,
    pub kind: FileKind,
    pub name: Vec<u8>,
}

/// Filesystem statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}
