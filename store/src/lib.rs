//! dm-store: the versioned, content-addressed store behind dm.
//!
//! A *dot* holds a tree of files; its *branches* each have a working state
//! (an overlay of changes in RocksDB over a base snapshot) that
//! [`BranchFs`] exposes with POSIX-shaped calls; *commits* are
//! content-addressed snapshots sharing structure with their parents; file
//! data lives in deduplicated, compressed *chunks*. The store knows nothing
//! of FUSE or the network. See docs/format.md for the on-disk format.

pub mod branch;
pub mod chunk;
pub mod chunklog;
pub mod db;
pub mod diff;
pub mod error;
pub mod gc;
pub mod id;
pub mod inode;
pub mod keys;
mod meta;
pub mod names;
pub mod object;
pub mod patch;
mod space;
mod stage;
pub mod store;
pub mod transfer;
pub mod tree;
pub mod view;

pub use branch::{BranchFs, IoGuard};
pub use chunk::ChunkStore;
pub use db::StoreOptions;
pub use diff::{Change, ChangeKind};
pub use error::{Error, Result};
pub use gc::{FsckReport, GcReport};
pub use id::Id;
pub use inode::{
    Attr, DirEntry, FileKind, Ino, SetAttr, StatFs, TimeSet, Timestamp, RENAME_EXCHANGE,
    RENAME_NOREPLACE, ROOT_INO, XATTR_CREATE, XATTR_REPLACE,
};
pub use names::{DotName, VolumeName};
pub use store::{BranchInfo, CommitInfo, CommitRequest, DotInfo, Store, DEFAULT_BLOCK_SIZE};
pub use transfer::{divergence, plan_trees, Divergence, Hold, ImportSession, SetHead, TreePlan};
