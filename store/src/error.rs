//! Typed errors of the store. Every error says what was attempted and on what.

use std::fmt;

/// Result alias used across the store.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors returned by the store. Filesystem-shaped calls map them to errno
/// values with [`Error::errno`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A dot, branch, subdot or namespace name breaks the naming rule.
    #[error("invalid {kind} name {name:?}: {rule}")]
    InvalidName {
        kind: &'static str,
        name: String,
        rule: &'static str,
    },
    /// A dot, branch or commit does not exist.
    #[error("{what} not found: {name}")]
    NotFound { what: &'static str, name: String },
    /// A dot or branch of that name already exists.
    #[error("{what} already exists: {name}")]
    AlreadyExists { what: &'static str, name: String },
    /// A revision (HEAD^, HEAD~3, an id prefix) does not resolve.
    #[error("{0}")]
    BadRevision(String),
    /// The operation would lose uncommitted changes or break a rule the user
    /// can fix; the message says how.
    #[error("{0}")]
    Refused(String),
    /// A POSIX filesystem error (ENOENT, EEXIST, ENOTEMPTY, ...).
    #[error("{op}: {}", errno_name(*.errno))]
    Fs { op: &'static str, errno: i32 },
    /// Stored data does not match its id, or an object cannot be decoded.
    #[error("corrupt store: {0}")]
    Corrupt(String),
    /// RocksDB failed.
    /// (The cause is in the message, not a `source`: shown by a chain of
    /// causes, it read twice.)
    #[error("database error while {context}: {cause}")]
    Db {
        context: String,
        cause: rocksdb::Error,
    },
    /// An I/O error outside RocksDB (opening the data directory, ...).
    #[error("I/O error while {context}: {cause}")]
    Io {
        context: String,
        cause: std::io::Error,
    },
}

impl Error {
    /// The errno a filesystem call should return for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Fs { errno, .. } => *errno,
            Error::NotFound { .. } => libc_consts::ENOENT,
            Error::AlreadyExists { .. } => libc_consts::EEXIST,
            Error::InvalidName { .. } => libc_consts::EINVAL,
            Error::Refused(_) | Error::BadRevision(_) => libc_consts::EINVAL,
            Error::Io { cause, .. } => cause.raw_os_error().unwrap_or(libc_consts::EIO),
            Error::Db { cause, .. } if crate::space::is_no_space(cause) => libc_consts::ENOSPC,
            Error::Db { .. } | Error::Corrupt(_) => libc_consts::EIO,
        }
    }

    /// Shorthand for a filesystem error.
    pub fn fs(op: &'static str, errno: i32) -> Error {
        Error::Fs { op, errno }
    }

    pub(crate) fn db(context: impl fmt::Display) -> impl FnOnce(rocksdb::Error) -> Error {
        let context = context.to_string();
        move |cause| Error::Db { context, cause }
    }

    /// True for "does not exist" errors, and for inode numbers that name
    /// nothing any more.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound { .. })
            || matches!(self.errno(), libc_consts::ENOENT | libc_consts::ESTALE)
    }
}

/// The errno values the store uses (Linux numbering), so that the store
/// does not depend on libc.
pub mod libc_consts {
    pub const EPERM: i32 = 1;
    pub const ENOENT: i32 = 2;
    pub const EIO: i32 = 5;
    pub const E2BIG: i32 = 7;
    pub const EBADF: i32 = 9;
    pub const EACCES: i32 = 13;
    pub const EEXIST: i32 = 17;
    pub const EXDEV: i32 = 18;
    pub const ENOTDIR: i32 = 20;
    pub const EISDIR: i32 = 21;
    pub const EINVAL: i32 = 22;
    pub const EFBIG: i32 = 27;
    pub const ENOSPC: i32 = 28;
    pub const EMLINK: i32 = 31;
    pub const ERANGE: i32 = 34;
    pub const ENAMETOOLONG: i32 = 36;
    pub const ENOTEMPTY: i32 = 39;
    pub const ELOOP: i32 = 40;
    pub const ENODATA: i32 = 61;
    pub const EOPNOTSUPP: i32 = 95;
    pub const ESHUTDOWN: i32 = 108;
    pub const ESTALE: i32 = 116;
}

fn errno_name(errno: i32) -> &'static str {
    use libc_consts::*;
    match errno {
        EPERM => "operation not permitted (EPERM)",
        ENOENT => "no such file or directory (ENOENT)",
        EIO => "I/O error (EIO)",
        ESHUTDOWN => "the dm server is stopping (ESHUTDOWN)",
        E2BIG => "argument list too long (E2BIG)",
        EBADF => "bad file descriptor (EBADF)",
        EACCES => "permission denied (EACCES)",
        EEXIST => "file exists (EEXIST)",
        EXDEV => "cross-device link (EXDEV)",
        ENOTDIR => "not a directory (ENOTDIR)",
        EISDIR => "is a directory (EISDIR)",
        EINVAL => "invalid argument (EINVAL)",
        EFBIG => "file too large (EFBIG)",
        ENOSPC => "no space left on device (ENOSPC)",
        EMLINK => "too many links (EMLINK)",
        ERANGE => "result too large (ERANGE)",
        ENAMETOOLONG => "file name too long (ENAMETOOLONG)",
        ENOTEMPTY => "directory not empty (ENOTEMPTY)",
        ELOOP => "too many levels of symbolic links (ELOOP)",
        ENODATA => "no such attribute (ENODATA)",
        EOPNOTSUPP => "operation not supported (EOPNOTSUPP)",
        ESTALE => "stale file handle (ESTALE)",
        _ => "error",
    }
}
