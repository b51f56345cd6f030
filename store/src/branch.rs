//! A branch's working state as a POSIX-shaped filesystem ([`BranchFs`]).
//!
//! Metadata changes go straight to the branch's overlay in RocksDB, each
//! operation one atomic batch. File data is buffered per block in memory and
//! turned into chunks at flush, fsync, close, commit, or when the buffers
//! grow past a bound.
//!
//! Lock order: `state` (read by every call, written by commit/reset) ->
//! a file's buffer -> `meta` (serialises metadata changes) -> `files` map.

use crate::db::Db;
use crate::error::{libc_consts::*, Error, Result};
use crate::id::Id;
use crate::inode::*;
use crate::keys;
use crate::names::{validate_file_name, DotName, ROOT_SUBDOT};
use crate::patch::{Patched, Ranges};
use crate::stage;
use crate::view::{Tx, View};
use parking_lot::{Mutex, RwLock, RwLockReadGuard};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// The identities (kind, birth time) of the files open as a reset began
/// (see [`BranchFs::before_reset`]).
pub(crate) struct Discarded {
    born: HashMap<Ino, (FileKind, Timestamp)>,
}

/// Largest xattr value accepted.
const XATTR_MAX: usize = 64 * 1024;
/// Clean block copies kept per file (see `FileBuf::clean`).
const CLEAN_BLOCKS: usize = 2;
/// Directories removed that [`BranchFs`] remembers (see its `removed_dirs`).
const REMOVED_DIRS_KEPT: usize = 1024;

/// A file's buffered blocks are chunked once they pass this many bytes.
const FILE_BUFFER_MAX: usize = 8 << 20;
/// Spilled blocks a file's buffer may hold before a flush indexes them.
const SPILLED_MAX: usize = 1 << 16;
/// Blocks at least this large are hashed on the stage worker when written
/// whole; smaller ones are hashed at flush (waking the worker for an 8 KiB
/// block cost PostgreSQL more than hashing it: 0.55x native TPS with it,
/// 0.75x without).
const STAGE_MIN: usize = 32 << 10;
/// Patched blocks of one file that [`BranchFs::materialize_patches`] stores
/// whole while holding the file's buffer.
const MATERIALIZE_GROUP: usize = 32;
/// Largest file size (2^50 bytes).
const MAX_FILE_SIZE: u64 = 1 << 50;
/// Stored blocks a file's buffer remembers (see `FileBuf::known`); past
/// this it forgets them all (about 64 bytes each: 1 MiB).
const KNOWN_MAX: usize = 1 << 14;

/// A dirty block's origin: the chunk it was read from and the byte ranges
/// written since (over every fsync since that chunk was stored).
#[derive(Clone, Debug)]
struct Origin {
    base: Option<(Id, u32)>,
    ranges: Ranges,
    /// The buffer holds only the bytes within `ranges`: the base has not
    /// been read (a small write needs no read of its block; an fsync
    /// stores the ranges as patches). Filled before anything else needs
    /// the whole block.
    sparse: bool,
    /// The block is stored as patches on `base` already: an fsync adds
    /// only the ranges written into this buffer (`fresh`), as a merge
    /// operand, instead of writing every patch again. Nothing else
    /// rewrites the block's value while the buffer holds it (the patch
    /// writer skips dirty blocks; truncates, commits and resets flush or
    /// drop the buffer first).
    merge: bool,
    /// Ranges written into this buffer: `ranges` without the patches the
    /// block was stored with.
    fresh: Ranges,
    /// The block is stored as patches that were not read (the buffer knew
    /// the block was patched, see `FileBuf::known`): `ranges` holds only
    /// the fresh ranges, and the bytes outside them are the stored
    /// value's (base and patches), read when something needs them.
    unread: bool,
}

impl Origin {
    /// The origin of a block stored as `base` (`None`: a hole).
    fn of(base: Option<(Id, u32)>, sparse: bool) -> Origin {
        Origin {
            base,
            ranges: Ranges::default(),
            sparse,
            merge: false,
            fresh: Ranges::default(),
            unread: false,
        }
    }
}

/// What the working state holds for a block, as a file's buffer last
/// stored it (see `FileBuf::known`).
#[derive(Clone, Copy, Debug)]
enum Known {
    Chunk(Id, u32),
    /// Patches on this base.
    Patched(Option<(Id, u32)>),
}

/// What a working state holds for one block.
enum Stored {
    Chunk(Id, u32),
    Patched(Patched),
}

/// The mutable part of a branch: which snapshot its overlay sits on.
#[derive(Clone, Debug)]
pub(crate) struct BranchState {
    pub head: Option<Id>,
    pub root: Id,
    /// Overlay id of the working state. A commit or reset starts a fresh
    /// overlay (and range-deletes the old one), so scans of the working
    /// state never wade through the keys the last commit absorbed.
    pub bid: u64,
    pub deleted: bool,
    /// The server is stopping: every operation is refused (see
    /// [`BranchFs::stop`]).
    pub stopped: bool,
}

/// Buffered writes of one file.
struct FileBuf {
    db: Arc<Db>,
    /// The branch's count of buffered bytes, kept exact: blocks are added
    /// with `insert_block`, taken by flushes, and released on drop.
    counter: Arc<AtomicUsize>,
    block_size: usize,
    /// Removed from the branch's map (clean at the last release); a writer
    /// that finds this set takes a fresh buffer instead.
    detached: bool,
    /// Dirty blocks (full block size, zeros past the data). Shared with the
    /// stage worker while it prepares them; a write to a shared block
    /// copies it.
    blocks: BTreeMap<u64, Arc<Vec<u8>>>,
    /// Preparations (hash, compression) of blocks written whole, started
    /// on the stage worker; dropped when the block changes again.
    staged: HashMap<u64, Arc<stage::Slot>>,
    /// Copies of the last blocks stored, exactly as stored, so that the next
    /// partial write to them (a log append after an fsync) needs no read.
    clean: Vec<(u64, Arc<Vec<u8>>)>,
    /// Origins of dirty blocks that were partly rewritten, for storing them
    /// as patches at an fsync; a block without one is stored whole.
    origins: HashMap<u64, Origin>,
    /// Whole blocks spilled to the chunk log under memory pressure but not
    /// yet referenced by the branch: index -> chunk id (pinned against GC
    /// while here). The next flush writes them with the file's other
    /// changes, after one sync of the log (see `BranchFs::spill_locked`).
    spilled: BTreeMap<u64, Id>,
    /// The file's size including buffered writes (authoritative while the
    /// buffer exists).
    size: u64,
    /// mtime of the last buffered write, not yet stored.
    mtime: Option<Timestamp>,
    /// What the working state (overlay `known_bid`) holds for blocks this
    /// buffer stored and nothing rewrote since, so that the next partial
    /// write into one needs no lookup: reading a patched block's value
    /// (the patches, merged by RocksDB) cost a random 8 KiB write into
    /// 64 KiB blocks about 50 of its 56 us. Kept by this buffer's flushes
    /// (chunks only for blocks it knew as patches) and the patch writer,
    /// both holding the buffer; cleared by a truncate; a commit or reset
    /// starts another overlay. Other writers of block values (unlink,
    /// reset) drop the buffer.
    known: HashMap<u64, Known>,
    known_bid: u64,
}

impl FileBuf {
    fn new(db: Arc<Db>, counter: Arc<AtomicUsize>, block_size: usize) -> FileBuf {
        FileBuf {
            db,
            counter,
            block_size,
            detached: false,
            blocks: BTreeMap::new(),
            staged: HashMap::new(),
            origins: HashMap::new(),
            clean: Vec::new(),
            spilled: BTreeMap::new(),
            size: 0,
            mtime: None,
            known: HashMap::new(),
            known_bid: 0,
        }
    }

    /// Records that block `idx` is stored as `k` in overlay `bid`.
    fn know(&mut self, bid: u64, idx: u64, k: Known) {
        if self.known_bid != bid || self.known.len() >= KNOWN_MAX {
            self.known = HashMap::new();
            self.known_bid = bid;
        }
        self.known.insert(idx, k);
    }

    /// How block `idx` is stored in overlay `bid`, if this buffer knows.
    fn known(&self, bid: u64, idx: u64) -> Option<Known> {
        if self.known_bid != bid {
            return None;
        }
        self.known.get(&idx).copied()
    }

    fn insert_block(&mut self, idx: u64, data: Arc<Vec<u8>>) {
        if self.blocks.insert(idx, data).is_none() {
            self.counter.fetch_add(self.block_size, Ordering::Relaxed);
            (self.db.buffered_total).fetch_add(self.block_size, Ordering::Relaxed);
        }
    }

    /// `blocks` blocks left the buffer: taken off the branch's and the
    /// store's counts.
    fn released(&self, blocks: usize) {
        let n = blocks * self.block_size;
        self.counter.fetch_sub(n, Ordering::Relaxed);
        (self.db.buffered_total).fetch_sub(n, Ordering::Relaxed);
    }

    fn remove_block(&mut self, idx: u64) -> Option<Arc<Vec<u8>>> {
        self.staged.remove(&idx);
        self.origins.remove(&idx);
        let b = self.blocks.remove(&idx);
        if b.is_some() {
            self.released(1);
        }
        b
    }

    /// Forgets a spilled block (it is being written again).
    fn unspill(&mut self, idx: u64) -> Option<Id> {
        let id = self.spilled.remove(&idx)?;
        self.db.unpin([&id]);
        Some(id)
    }

    /// Forgets every spilled block (now referenced by the branch, or gone).
    fn clear_spilled(&mut self) {
        let spilled = std::mem::take(&mut self.spilled);
        self.db.unpin(spilled.values());
    }

    fn take_blocks(&mut self) -> BTreeMap<u64, Arc<Vec<u8>>> {
        self.staged.clear();
        self.origins.clear();
        let blocks = std::mem::take(&mut self.blocks);
        self.released(blocks.len());
        blocks
    }

    /// Blocks whose buffer holds only their written ranges (see `Origin::sparse`).
    fn sparse_blocks(&self) -> Vec<u64> {
        self.origins
            .iter()
            .filter(|(_, o)| o.sparse)
            .map(|(i, _)| *i)
            .collect()
    }

    fn is_clean(&self) -> bool {
        self.blocks.is_empty() && self.spilled.is_empty() && self.mtime.is_none()
    }
}

/// What a branch's write buffers hold that its working state does not
/// have yet ([`BranchFs::unflushed`]).
#[derive(Default)]
pub(crate) struct Unflushed {
    /// Bytes of the blocks buffered.
    pub bytes: u64,
    /// The blocks (inode, index) buffered: the working state may hold an
    /// older version of those, which the buffer's replaces (counted both,
    /// 100 bytes written and 50 more said 250).
    pub blocks: HashSet<(Ino, u64)>,
    /// The size of each file with buffered writes: its record's is older
    /// (a file being written showed 0 B in `dm list` until closed).
    pub sizes: HashMap<Ino, u64>,
}

impl Drop for FileBuf {
    fn drop(&mut self) {
        self.released(self.blocks.len());
        self.clear_spilled();
    }
}

/// The working state of one branch of one dot, with filesystem calls.
pub struct BranchFs {
    pub(crate) db: Arc<Db>,
    pub(crate) dot: DotName,
    pub(crate) branch: String,
    pub(crate) block_size: u32,
    pub(crate) data_dir: PathBuf,
    pub(crate) state: RwLock<BranchState>,
    meta: Mutex<()>,
    files: Mutex<HashMap<Ino, Arc<Mutex<FileBuf>>>>,
    buffered: Arc<AtomicUsize>,
    open: Mutex<HashMap<Ino, u32>>,
    /// Files the kernels of this branch's mounts know (looked up and not
    /// yet forgotten; [`BranchFs::hold`]), by how many mounts: a last link
    /// removed leaves such a file an orphan, as an open one, until the
    /// last kernel forgets it. Freed at once, a reader that had looked the
    /// name up just before a save by rename replaced it got ESTALE, where
    /// a native file system opens the file it found.
    held: Mutex<HashMap<Ino, u32>>,
    /// Orphans (no link left, kept for an open handle or a kernel that
    /// knows them) made since the branch was opened: those a last release
    /// or forget may free.
    orphans: Mutex<std::collections::HashSet<Ino>>,
    /// The directories removed last in this working state, with their
    /// attributes as they went (at most [`REMOVED_DIRS_KEPT`]; a reset
    /// empties it): an operation in one fails with ENOENT, as in a removed
    /// directory of a local file system, where ESTALE (a number the state
    /// does not have) sent `rm -rf` racing another `rm -rf` into "Stale
    /// file handle"; its attributes are those of an empty directory with
    /// no link left (see [`BranchFs::getattr`]).
    removed_dirs: Mutex<std::collections::VecDeque<(Ino, Attr)>>,
    /// Blocks an fsync stored as patches, for [`BranchFs::materialize_patches`]
    /// (may name blocks stored whole since: it checks).
    patched: Mutex<HashMap<Ino, std::collections::BTreeSet<u64>>>,
    /// Lowest inode number a new file may get: a reset raises it past every
    /// number the discarded state used, so that a number a process may
    /// still hold open (its kernel inode, its handle) never names another
    /// file of this branch. In memory only: open files end with the server.
    ino_floor: AtomicU64,
    /// Resets of this branch since it was opened (see [`BranchFs::open_at`]).
    resets: AtomicU64,
    /// Open files a reset discarded, with the reset count from which their
    /// handles are stale (see [`BranchFs::is_revoked`]); dropped with the
    /// last release.
    revoked: Mutex<HashMap<Ino, u64>>,
    /// Held (read) by I/O through an open handle from its check of
    /// [`BranchFs::is_revoked`] to its end, and (write) by a reset around
    /// its switch of the state: a write that passed the check while the
    /// reset swapped the state landed in the file it brought back.
    io: Arc<parking_lot::RwLock<()>>,
}

/// A hold on a branch that a reset waits for (see [`BranchFs::io_guard`]).
pub type IoGuard = parking_lot::ArcRwLockReadGuard<parking_lot::RawRwLock, ()>;

type StateGuard<'a> = RwLockReadGuard<'a, BranchState>;

/// `perm` without S_ISUID, and without S_ISGID when the group may execute
/// (S_ISGID without group execute marks mandatory locking, and stays).
fn cleared_setid(perm: u32) -> u32 {
    const S_ISUID: u32 = 0o4000;
    const S_ISGID: u32 = 0o2000;
    const S_IXGRP: u32 = 0o0010;
    let mut p = perm & !S_ISUID;
    if p & S_IXGRP != 0 {
        p &= !S_ISGID;
    }
    p
}

fn now() -> Timestamp {
    Timestamp::now()
}

impl BranchFs {
    #[allow(clippy::too_many_arguments)] // internal constructor, called once
    pub(crate) fn new(
        db: Arc<Db>,
        dot: DotName,
        branch: String,
        bid: u64,
        block_size: u32,
        data_dir: PathBuf,
        head: Option<Id>,
        root: Id,
    ) -> Result<BranchFs> {
        let fs = BranchFs {
            db,
            dot,
            branch,
            block_size,
            data_dir,
            state: RwLock::new(BranchState {
                head,
                root,
                bid,
                deleted: false,
                stopped: false,
            }),
            meta: Mutex::new(()),
            files: Mutex::new(HashMap::new()),
            buffered: Arc::new(AtomicUsize::new(0)),
            open: Mutex::new(HashMap::new()),
            held: Mutex::new(HashMap::new()),
            orphans: Mutex::new(std::collections::HashSet::new()),
            removed_dirs: Mutex::new(std::collections::VecDeque::new()),
            resets: AtomicU64::new(0),
            revoked: Mutex::new(HashMap::new()),
            io: Arc::new(parking_lot::RwLock::new(())),
            patched: Mutex::new(HashMap::new()),
            ino_floor: AtomicU64::new(0),
        };
        fs.purge_orphans()?;
        Ok(fs)
    }

    /// The dot this branch belongs to.
    pub fn dot(&self) -> &DotName {
        &self.dot
    }

    /// The branch name.
    pub fn branch(&self) -> &str {
        &self.branch
    }

    /// The dot's block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// The commit the working state is based on.
    pub fn head(&self) -> Option<Id> {
        self.state.read().head
    }

    fn state(&self) -> Result<StateGuard<'_>> {
        let st = self.state.read();
        if st.stopped {
            return Err(Error::fs(
                "the dm server is stopping",
                crate::error::libc_consts::ESHUTDOWN,
            ));
        }
        if st.deleted {
            return Err(Error::NotFound {
                what: "branch",
                name: format!("{}@{} (deleted)", self.dot, self.branch),
            });
        }
        Ok(st)
    }

    pub(crate) fn view<'a>(&'a self, st: &BranchState) -> View<'a> {
        View {
            db: &self.db,
            bid: st.bid,
            root: st.root,
        }
    }

    // ---- record helpers ----

    // An inode number the caller holds but the working state does not:
    // the file went away behind the caller's cache (a reset or a checkout
    // replaced the working state). ESTALE, as NFS says it: the kernel then
    // looks the path up again once (an open(O_CREAT) racing a reset opens
    // or creates the file instead of failing with ENOENT).
    fn load(tx: &Tx, ino: Ino) -> Result<InodeRec> {
        match tx.get(&keys::inode(ino))? {
            Some(b) => InodeRec::decode(ino, &b),
            None => Err(Error::fs("inode", ESTALE)),
        }
    }

    fn load_view(view: &View, ino: Ino) -> Result<InodeRec> {
        match view.get(&keys::inode(ino))? {
            Some(b) => InodeRec::decode(ino, &b),
            None => Err(Error::fs("inode", ESTALE)),
        }
    }

    fn store(tx: &mut Tx, ino: Ino, rec: &InodeRec) {
        tx.put(keys::inode(ino), rec.encode());
    }

    /// `e`, or ENOENT where it is ESTALE for a directory just removed
    /// (see `removed_dirs`).
    fn in_removed_dir(&self, e: Error, ino: Ino, what: &'static str) -> Error {
        match self.is_removed_dir(&e, ino) {
            true => Error::fs(what, ENOENT),
            false => e,
        }
    }

    /// Whether `e`, met on `ino`, is that of a directory just removed.
    fn is_removed_dir(&self, e: &Error, ino: Ino) -> bool {
        self.removed_dir_attr(e, ino).is_some()
    }

    /// The attributes `ino` had as it was removed, where `e` (met on it)
    /// is that of a directory just removed.
    fn removed_dir_attr(&self, e: &Error, ino: Ino) -> Option<Attr> {
        if e.errno() != ESTALE {
            return None;
        }
        let removed = self.removed_dirs.lock();
        removed.iter().find(|(i, _)| *i == ino).map(|(_, a)| *a)
    }

    fn dir(&self, tx: &Tx, ino: Ino) -> Result<InodeRec> {
        let rec = Self::load(tx, ino).map_err(|e| self.in_removed_dir(e, ino, "directory"))?;
        if rec.kind != FileKind::Dir {
            return Err(Error::fs("directory", ENOTDIR));
        }
        Ok(rec)
    }

    fn entry(tx: &Tx, parent: Ino, name: &[u8]) -> Result<Option<Dirent>> {
        match tx.get(&keys::dirent(parent, name))? {
            Some(b) => Ok(Some(Dirent::decode(&b)?)),
            None => Ok(None),
        }
    }

    fn superblock(tx: &Tx) -> Result<Super> {
        match tx.get(&keys::superblock())? {
            Some(b) => postcard::from_bytes::<Super>(&b)
                .map_err(|e| Error::Corrupt(format!("superblock does not decode: {e}"))),
            None => Err(Error::Corrupt("superblock is missing".into())),
        }
    }

    fn alloc_ino(&self, tx: &mut Tx) -> Result<Ino> {
        let ino = Self::superblock(tx)?
            .next_ino
            .max(self.ino_floor.load(Ordering::Relaxed));
        let next = Super { next_ino: ino + 1 };
        tx.put(
            keys::superblock(),
            postcard::to_stdvec(&next).expect("postcard into Vec cannot fail"),
        );
        Ok(ino)
    }

    /// The records every fresh tree starts with: the superblock and the root
    /// directory, owned by `owner` (uid, gid).
    pub(crate) fn fresh_entries(owner: (u32, u32)) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut root = InodeRec::new(FileKind::Dir, 0o755, owner.0, owner.1, ROOT_INO);
        root.parent = ROOT_INO;
        vec![
            (
                keys::superblock(),
                postcard::to_stdvec(&Super { next_ino: 2 }).expect("postcard into Vec"),
            ),
            (keys::inode(ROOT_INO), root.encode()),
        ]
    }

    /// What a file's write buffer holds that its record may not yet.
    fn buffered_attr(a: &mut Attr, g: &FileBuf) {
        a.size = g.size;
        a.blocks = g.size.div_ceil(512);
        if let Some(m) = g.mtime {
            a.mtime = m;
            // A chmod after the write changed it later.
            a.ctime = a.ctime.max(m);
        }
    }

    // ---- lookups ----

    /// The inode of a subdot (a top-level directory), made when `create`.
    /// `__root__` is the whole dot tree.
    pub fn subdot_ino(&self, subdot: &str, create: bool) -> Result<Ino> {
        if subdot == ROOT_SUBDOT {
            return Ok(ROOT_INO);
        }
        match self.lookup(ROOT_INO, subdot.as_bytes()) {
            Ok(a) if a.kind == FileKind::Dir => Ok(a.ino),
            Ok(_) => Err(Error::fs("subdot", ENOTDIR)),
            Err(e) if e.errno() == ENOENT && create => {
                let (uid, gid) = self.db.opts.owner;
                match self.mkdir(ROOT_INO, subdot.as_bytes(), 0o755, uid, gid) {
                    Ok(a) => Ok(a.ino),
                    Err(e) if e.errno() == EEXIST => {
                        self.lookup(ROOT_INO, subdot.as_bytes()).map(|a| a.ino)
                    }
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Attr> {
        if name.len() > 255 {
            return Err(Error::fs("lookup", ENAMETOOLONG));
        }
        let st = self.state()?;
        let tx = Tx::new(self.view(&st));
        if name == b"." {
            return self.getattr_in(&tx, parent);
        }
        let pdir = self.dir(&tx, parent)?;
        if name == b".." {
            return self.getattr_in(&tx, pdir.parent);
        }
        // The entry and its inode are read one after the other: another
        // mount may remove or replace the file in between (ESTALE made
        // `rm -rf` racing another mount's fail with "Stale file handle").
        // Read the entry again then: gone, ENOENT.
        let mut tries = 0;
        loop {
            let e = Self::entry(&tx, parent, name)?.ok_or(Error::fs("lookup", ENOENT))?;
            match self.getattr_in(&tx, e.ino) {
                Err(err) if err.errno() == ESTALE && tries < 3 => tries += 1,
                r => return r,
            }
        }
    }

    fn getattr_in(&self, tx: &Tx, ino: Ino) -> Result<Attr> {
        self.attr_fresh(ino, || Self::load(tx, ino))
    }

    pub fn getattr(&self, ino: Ino) -> Result<Attr> {
        let st = self.state()?;
        let view = self.view(&st);
        // The kernel asks for a directory's attributes before it removes
        // an entry in it. One removed through another mount, which this
        // one's kernel may still list for a moment, is a directory with no
        // link left, as fstat(2) shows one on a local file system: ENOENT
        // made `rm -rf` racing another mount's take it for a file and fail
        // with "Is a directory" (the kernel's entry said directory), and
        // leave part of the tree.
        self.attr_fresh(ino, || Self::load_view(&view, ino))
            .or_else(|e| self.removed_dir_attr(&e, ino).ok_or(e))
    }

    /// The attributes of `ino` for a reader that holds no `meta` lock: the
    /// write buffer is looked up before the record is read. The other way
    /// round, a release (which the kernel sends after close(2) without
    /// waiting) could store the buffer's size and drop the buffer between
    /// the two, and a stat(2) right after close(2) got the size from
    /// before the writes, which the kernel then kept (appends went to the
    /// old end). A buffer dropped after the look-up was stored first: the
    /// record is read again.
    fn attr_fresh(&self, ino: Ino, load: impl Fn() -> Result<InodeRec>) -> Result<Attr> {
        let fb = self.files.lock().get(&ino).cloned();
        let mut a = load()?.attr(ino, self.block_size);
        if let Some(fb) = fb {
            let g = fb.lock();
            if g.detached || g.is_clean() {
                // Nothing buffered: the record (read again, as a flush may
                // have stored it since) is the file. A clean buffer's size
                // may not be loaded yet (one a writer or the patch writer
                // has just created).
                return Ok(load()?.attr(ino, self.block_size));
            }
            // Held locked: while it holds writes, the buffer's size is the file's.
            Self::buffered_attr(&mut a, &g);
        }
        Ok(a)
    }

    // ---- creation ----

    /// Refuses (ENOSPC) a new file, link or extended attribute while the
    /// store refuses new data: they grow RocksDB too, and creating files on
    /// a full disk used up the room dm keeps for deletions, then its
    /// reserve, until RocksDB itself met the full disk (and then nothing,
    /// deletions included, worked until space was freed outside dm).
    fn refuse_new_records_when_full(&self, op: &str) -> Result<()> {
        self.db
            .space
            .refuse_when_full(|| format!("{op} in {}@{}", self.dot, self.branch))
    }

    fn create_node(
        &self,
        parent: Ino,
        name: &[u8],
        mut rec: InodeRec,
        op: &'static str,
    ) -> Result<Attr> {
        validate_file_name(name).map_err(|e| Error::fs(op, e.errno()))?;
        let st = self.state()?;
        let _m = self.meta.lock();
        let mut tx = Tx::new(self.view(&st));
        let mut p = self.dir(&tx, parent)?;
        if Self::entry(&tx, parent, name)?.is_some() {
            return Err(Error::fs(op, EEXIST));
        }
        self.refuse_new_records_when_full(op)?;
        let ino = self.alloc_ino(&mut tx)?;
        let t = now();
        rec.parent = parent;
        if rec.kind == FileKind::Dir {
            p.nlink += 1;
        }
        // setgid directories pass their group (and the bit, to directories) on.
        if p.perm & 0o2000 != 0 {
            rec.gid = p.gid;
            if rec.kind == FileKind::Dir {
                rec.perm |= 0o2000;
            }
        }
        p.mtime = t;
        p.ctime = t;
        tx.put(
            keys::dirent(parent, name),
            Dirent {
                ino,
                kind: rec.kind,
            }
            .encode(),
        );
        Self::store(&mut tx, parent, &p);
        Self::store(&mut tx, ino, &rec);
        tx.commit(false, "creating a file")?;
        Ok(rec.attr(ino, self.block_size))
    }

    /// Creates a file of any kind but directory and symlink (mknod(2) plus
    /// the caller's credentials).
    #[allow(clippy::too_many_arguments)]
    pub fn mknod(
        &self,
        parent: Ino,
        name: &[u8],
        kind: FileKind,
        perm: u32,
        rdev: u32,
        uid: u32,
        gid: u32,
    ) -> Result<Attr> {
        if matches!(kind, FileKind::Dir | FileKind::Symlink) {
            return Err(Error::fs("mknod", EINVAL));
        }
        let mut rec = InodeRec::new(kind, perm, uid, gid, 0);
        rec.rdev = rdev;
        self.create_node(parent, name, rec, "mknod")
    }

    pub fn mkdir(&self, parent: Ino, name: &[u8], perm: u32, uid: u32, gid: u32) -> Result<Attr> {
        let rec = InodeRec::new(FileKind::Dir, perm, uid, gid, parent);
        self.create_node(parent, name, rec, "mkdir")
    }

    pub fn symlink(
        &self,
        parent: Ino,
        name: &[u8],
        target: &[u8],
        uid: u32,
        gid: u32,
    ) -> Result<Attr> {
        if target.is_empty() || target.len() > 4095 {
            return Err(Error::fs(
                "symlink",
                if target.is_empty() {
                    ENOENT
                } else {
                    ENAMETOOLONG
                },
            ));
        }
        let mut rec = InodeRec::new(FileKind::Symlink, 0o777, uid, gid, 0);
        rec.target = target.to_vec();
        rec.size = target.len() as u64;
        self.create_node(parent, name, rec, "symlink")
    }

    pub fn readlink(&self, ino: Ino) -> Result<Vec<u8>> {
        let st = self.state()?;
        let rec = Self::load_view(&self.view(&st), ino)?;
        if rec.kind != FileKind::Symlink {
            return Err(Error::fs("readlink", EINVAL));
        }
        Ok(rec.target)
    }

    pub fn link(&self, ino: Ino, new_parent: Ino, new_name: &[u8]) -> Result<Attr> {
        validate_file_name(new_name).map_err(|e| Error::fs("link", e.errno()))?;
        let st = self.state()?;
        let m = self.meta.lock();
        let mut tx = Tx::new(self.view(&st));
        let mut rec = Self::load(&tx, ino)?;
        if rec.kind == FileKind::Dir {
            return Err(Error::fs("link", EPERM));
        }
        if rec.nlink >= 65_000 {
            return Err(Error::fs("link", EMLINK));
        }
        self.refuse_new_records_when_full("link")?;
        let mut p = self.dir(&tx, new_parent)?;
        if Self::entry(&tx, new_parent, new_name)?.is_some() {
            return Err(Error::fs("link", EEXIST));
        }
        let t = now();
        rec.nlink += 1;
        rec.ctime = t;
        p.mtime = t;
        p.ctime = t;
        tx.put(
            keys::dirent(new_parent, new_name),
            Dirent {
                ino,
                kind: rec.kind,
            }
            .encode(),
        );
        Self::store(&mut tx, ino, &rec);
        Self::store(&mut tx, new_parent, &p);
        tx.commit(false, "linking a file")?;
        // The file's buffer is taken without `meta` (flushes hold a buffer,
        // then take `meta`: holding both the other way round deadlocked).
        drop(m);
        self.attr_fresh(ino, || Self::load_view(&self.view(&st), ino))
    }

    // ---- removal ----

    /// Deletes every key of inode `ino` (record, entries, blocks, xattrs).
    fn destroy(&self, tx: &mut Tx, ino: Ino) -> Result<()> {
        let mut doomed = Vec::new();
        tx.view
            .scan(&keys::inode(ino), &keys::inode(ino + 1), &mut |k, _| {
                doomed.push(k.to_vec());
                Ok(true)
            })?;
        for k in doomed {
            tx.delete(k);
        }
        tx.delete(keys::inode(ino));
        // Called with `meta` held: drop the buffer without locking it
        // (a flush holds a buffer, then takes `meta`). Its bytes leave the
        // count when the last holder lets go (FileBuf::drop).
        self.files.lock().remove(&ino);
        Ok(())
    }

    /// Drops one link to `ino` (a non-directory); frees it when the last link
    /// goes and nobody has it open.
    fn drop_link(&self, tx: &mut Tx, ino: Ino, t: Timestamp) -> Result<()> {
        let mut rec = Self::load(tx, ino)?;
        rec.nlink = rec.nlink.saturating_sub(1);
        rec.ctime = t;
        if rec.nlink == 0 {
            if self.in_use(ino) {
                Self::store(tx, ino, &rec);
                tx.put(keys::orphan(ino), Vec::new());
                self.orphans.lock().insert(ino);
            } else {
                self.destroy(tx, ino)?;
            }
        } else {
            Self::store(tx, ino, &rec);
        }
        Ok(())
    }

    fn dir_is_empty(tx: &Tx, ino: Ino) -> Result<bool> {
        let mut empty = true;
        tx.view.scan(
            &keys::prefix(ino, keys::TAG_DIRENT),
            &keys::prefix_end(ino, keys::TAG_DIRENT),
            &mut |_, _| {
                empty = false;
                Ok(false)
            },
        )?;
        Ok(empty)
    }

    pub fn unlink(&self, parent: Ino, name: &[u8]) -> Result<()> {
        let st = self.state()?;
        let _m = self.meta.lock();
        let mut tx = Tx::new(self.view(&st));
        let mut p = self.dir(&tx, parent)?;
        let e = Self::entry(&tx, parent, name)?.ok_or(Error::fs("unlink", ENOENT))?;
        if e.kind == FileKind::Dir {
            return Err(Error::fs("unlink", EISDIR));
        }
        let t = now();
        tx.delete(keys::dirent(parent, name));
        p.mtime = t;
        p.ctime = t;
        Self::store(&mut tx, parent, &p);
        self.drop_link(&mut tx, e.ino, t)?;
        tx.commit(false, "unlinking a file")
    }

    pub fn rmdir(&self, parent: Ino, name: &[u8]) -> Result<()> {
        if name == b"." {
            return Err(Error::fs("rmdir", EINVAL));
        }
        if name == b".." {
            return Err(Error::fs("rmdir", ENOTEMPTY));
        }
        let st = self.state()?;
        let _m = self.meta.lock();
        let mut tx = Tx::new(self.view(&st));
        let mut p = self.dir(&tx, parent)?;
        let e = Self::entry(&tx, parent, name)?.ok_or(Error::fs("rmdir", ENOENT))?;
        if e.kind != FileKind::Dir {
            return Err(Error::fs("rmdir", ENOTDIR));
        }
        if !Self::dir_is_empty(&tx, e.ino)? {
            return Err(Error::fs("rmdir", ENOTEMPTY));
        }
        let t = now();
        let mut gone = Self::load(&tx, e.ino)?.attr(e.ino, self.block_size);
        (gone.nlink, gone.size, gone.blocks, gone.ctime) = (0, 0, 0, t);
        tx.delete(keys::dirent(parent, name));
        p.nlink = p.nlink.saturating_sub(1);
        p.mtime = t;
        p.ctime = t;
        Self::store(&mut tx, parent, &p);
        self.destroy(&mut tx, e.ino)?;
        // Recorded before the removal is seen: readers hold no `meta`
        // lock, and one in between found the directory neither there nor
        // removed (ESTALE: "Stale file handle" in `rm -rf` racing another
        // mount's). Only read where the directory is missing.
        {
            let mut removed = self.removed_dirs.lock();
            if removed.len() >= REMOVED_DIRS_KEPT {
                removed.pop_front();
            }
            removed.push_back((e.ino, gone));
        }
        tx.commit(false, "removing a directory")
    }

    /// True when `ino` is `ancestor` or inside it.
    fn is_within(tx: &Tx, mut ino: Ino, ancestor: Ino) -> Result<bool> {
        for _ in 0..100_000 {
            if ino == ancestor {
                return Ok(true);
            }
            if ino == ROOT_INO {
                return Ok(false);
            }
            ino = Self::load(tx, ino)?.parent;
        }
        Err(Error::Corrupt("directory parent chain loops".into()))
    }

    pub fn rename(
        &self,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        flags: u32,
    ) -> Result<()> {
        validate_file_name(new_name).map_err(|e| Error::fs("rename", e.errno()))?;
        if name == b"." || name == b".." {
            return Err(Error::fs("rename", EINVAL));
        }
        if flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE) != 0
            || flags == RENAME_NOREPLACE | RENAME_EXCHANGE
        {
            return Err(Error::fs("rename", EINVAL));
        }
        let st = self.state()?;
        let _m = self.meta.lock();
        let mut tx = Tx::new(self.view(&st));
        self.dir(&tx, parent)?;
        self.dir(&tx, new_parent)?;
        let src = Self::entry(&tx, parent, name)?.ok_or(Error::fs("rename", ENOENT))?;
        let dst = Self::entry(&tx, new_parent, new_name)?;
        if parent == new_parent && name == new_name {
            return Ok(());
        }
        let t = now();
        if flags & RENAME_EXCHANGE != 0 {
            let dst = dst.ok_or(Error::fs("rename", ENOENT))?;
            if src.kind == FileKind::Dir && Self::is_within(&tx, new_parent, src.ino)? {
                return Err(Error::fs("rename", EINVAL));
            }
            if dst.kind == FileKind::Dir && Self::is_within(&tx, parent, dst.ino)? {
                return Err(Error::fs("rename", EINVAL));
            }
            tx.put(keys::dirent(parent, name), dst.encode());
            tx.put(keys::dirent(new_parent, new_name), src.encode());
            if parent != new_parent {
                for (e, from, to) in [(src, parent, new_parent), (dst, new_parent, parent)] {
                    let mut r = Self::load(&tx, e.ino)?;
                    r.parent = to;
                    Self::store(&mut tx, e.ino, &r);
                    if e.kind == FileKind::Dir {
                        let mut f = Self::load(&tx, from)?;
                        f.nlink = f.nlink.saturating_sub(1);
                        Self::store(&mut tx, from, &f);
                        let mut tr = Self::load(&tx, to)?;
                        tr.nlink += 1;
                        Self::store(&mut tx, to, &tr);
                    }
                }
            }
            for ino in [src.ino, dst.ino] {
                let mut r = Self::load(&tx, ino)?;
                r.ctime = t;
                Self::store(&mut tx, ino, &r);
            }
        } else {
            if let Some(d) = dst {
                if flags & RENAME_NOREPLACE != 0 {
                    return Err(Error::fs("rename", EEXIST));
                }
                if d.ino == src.ino {
                    return Ok(());
                }
            }
            if src.kind == FileKind::Dir && Self::is_within(&tx, new_parent, src.ino)? {
                return Err(Error::fs("rename", EINVAL));
            }
            if let Some(d) = dst {
                match (src.kind == FileKind::Dir, d.kind == FileKind::Dir) {
                    (true, false) => return Err(Error::fs("rename", ENOTDIR)),
                    (false, true) => return Err(Error::fs("rename", EISDIR)),
                    (true, true) => {
                        if !Self::dir_is_empty(&tx, d.ino)? {
                            return Err(Error::fs("rename", ENOTEMPTY));
                        }
                        self.destroy(&mut tx, d.ino)?;
                        let mut np = Self::load(&tx, new_parent)?;
                        np.nlink = np.nlink.saturating_sub(1);
                        Self::store(&mut tx, new_parent, &np);
                    }
                    (false, false) => self.drop_link(&mut tx, d.ino, t)?,
                }
            }
            tx.delete(keys::dirent(parent, name));
            tx.put(keys::dirent(new_parent, new_name), src.encode());
            let mut r = Self::load(&tx, src.ino)?;
            r.ctime = t;
            // Of a file, the directory it was last moved to (a hint for
            // finding its path, see `InodeRec::parent`).
            r.parent = new_parent;
            if src.kind == FileKind::Dir && parent != new_parent {
                let mut p = Self::load(&tx, parent)?;
                p.nlink = p.nlink.saturating_sub(1);
                Self::store(&mut tx, parent, &p);
                let mut np = Self::load(&tx, new_parent)?;
                np.nlink += 1;
                Self::store(&mut tx, new_parent, &np);
            }
            Self::store(&mut tx, src.ino, &r);
        }
        for d in [parent, new_parent] {
            let mut r = Self::load(&tx, d)?;
            r.mtime = t;
            r.ctime = t;
            Self::store(&mut tx, d, &r);
        }
        tx.commit(false, "renaming")
    }

    // ---- attributes ----

    pub fn setattr(&self, ino: Ino, set: &SetAttr) -> Result<Attr> {
        let st = self.state()?;
        // Hold the file's buffer so buffered writes are stored first and
        // its size follows a truncate. A truncate takes one even when the
        // file has none, so that writers (through another mount of the
        // branch) wait for it: a block a writer loaded as patches and a
        // truncate then rewrote would get the writer's later patches
        // merged onto the wrong value.
        loop {
            let (fb, created) = match self.buffer_of(ino, set.size.is_some()) {
                Some((fb, created)) => (Some(fb), created),
                None => (None, false),
            };
            let mut fbg = fb.as_ref().map(|f| f.lock());
            if fbg.as_ref().is_some_and(|g| g.detached) {
                continue;
            }
            let result = self.setattr_in(&st, ino, set, fbg.as_deref_mut());
            if let (true, Some(fb), Some(g)) = (created, &fb, fbg.as_mut()) {
                self.forget_if_clean(ino, fb, g);
            }
            return result;
        }
    }

    fn setattr_in(
        &self,
        st: &BranchState,
        ino: Ino,
        set: &SetAttr,
        mut fbg: Option<&mut FileBuf>,
    ) -> Result<Attr> {
        // A truncate stores buffered writes first (it cuts blocks they may
        // be in). Other changes leave them buffered: a time, mode or owner
        // change needs no block, and storing a buffer of partly written
        // blocks reads and stores each whole (the kernel's writeback cache
        // sends a time update with every fsync). The buffer's own size and
        // write time then still win over the record's (see flush_locked),
        // except a time set here explicitly.
        if set.size.is_some() {
            if let Some(g) = fbg.as_mut() {
                self.flush_locked(st, ino, g, false)?;
            }
        }
        // A truncate may store a chunk that is already present (see Db::gc_barrier).
        let _barrier = self.db.gc_barrier.read_recursive();
        let _m = self.meta.lock();
        let mut tx = Tx::new(self.view(st));
        let mut rec = Self::load(&tx, ino)?;
        let t = now();
        let mut changed = false;
        if let Some(mode) = set.mode {
            rec.perm = (mode & 0o7777) as u16;
            changed = true;
        }
        if let Some(uid) = set.uid {
            rec.uid = uid;
            changed = true;
        }
        if let Some(gid) = set.gid {
            rec.gid = gid;
            changed = true;
        }
        let chown = set.uid.is_some() || set.gid.is_some();
        if set.mode.is_none() && rec.kind != FileKind::Dir && (set.kill_setid || chown) {
            let perm = u32::from(rec.perm);
            let killed = cleared_setid(perm);
            if killed != perm {
                rec.perm = killed as u16;
                changed = true;
            }
        }
        if let Some(size) = set.size.filter(|&s| !set.grow_only || s > rec.size) {
            match rec.kind {
                FileKind::File => {}
                FileKind::Dir => return Err(Error::fs("truncate", EISDIR)),
                _ => return Err(Error::fs("truncate", EINVAL)),
            }
            if size > MAX_FILE_SIZE {
                return Err(Error::fs("truncate", EFBIG));
            }
            self.truncate_in(&mut tx, ino, rec.size, size)?;
            rec.size = size;
            if set.mtime.is_none() {
                rec.mtime = t;
            }
            changed = true;
            if let Some(g) = fbg.as_mut() {
                g.size = size;
                g.clean.clear();
                g.known.clear();
            }
        }
        if let Some(a) = set.atime {
            rec.atime = match a {
                TimeSet::Now => t,
                TimeSet::At(x) => x,
            };
            changed = true;
        }
        if let Some(m) = set.mtime {
            rec.mtime = match m {
                TimeSet::Now => t,
                TimeSet::At(x) => x,
            };
            changed = true;
        }
        if changed {
            rec.ctime = set.ctime.unwrap_or(t);
        } else if let Some(c) = set.ctime {
            rec.ctime = c;
        }
        Self::store(&mut tx, ino, &rec);
        tx.commit(false, "setting attributes")?;
        let mut a = rec.attr(ino, self.block_size);
        if let Some(g) = fbg {
            if set.mtime.is_some() {
                g.mtime = None;
            }
            Self::buffered_attr(&mut a, g);
        }
        Ok(a)
    }

    /// Clears S_ISUID and S_ISGID of a regular file as a write by a process
    /// without CAP_FSETID does (see [`SetAttr::kill_setid`]). Costs one read
    /// when there is nothing to clear. Returns whether a bit was cleared.
    pub fn kill_setid(&self, ino: Ino) -> Result<bool> {
        let st = self.state()?;
        let rec = Self::load_view(&self.view(&st), ino)?;
        let perm = u32::from(rec.perm);
        if rec.kind != FileKind::File || cleared_setid(perm) == perm {
            return Ok(false);
        }
        drop(st);
        self.setattr(
            ino,
            &SetAttr {
                kill_setid: true,
                ..SetAttr::default()
            },
        )
        .map(|_| true)
    }

    /// Drops the blocks past `new` and zeroes the tail of the new last block.
    fn truncate_in(&self, tx: &mut Tx, ino: Ino, old: u64, new: u64) -> Result<()> {
        if new >= old {
            return Ok(());
        }
        let bs = self.block_size as u64;
        let first_gone = new.div_ceil(bs);
        let mut doomed = Vec::new();
        tx.view.scan(
            &keys::block(ino, first_gone),
            &keys::prefix_end(ino, keys::TAG_BLOCK),
            &mut |k, _| {
                doomed.push(k.to_vec());
                Ok(true)
            },
        )?;
        for k in doomed {
            tx.delete(k);
        }
        if !new.is_multiple_of(bs) {
            let idx = new / bs;
            let keep = (new % bs) as usize;
            if let Some(v) = tx.get(&keys::block(ino, idx))? {
                match self.parse_stored(&v, ino, idx)? {
                    Stored::Chunk(id, len) => {
                        if len as usize > keep {
                            let data = self.db.read_chunk(&id)?;
                            let nid = self.db.store_chunk(&data[..keep.min(data.len())])?;
                            tx.put(keys::block(ino, idx), keys::block_value(&nid, keep as u32));
                        }
                    }
                    Stored::Patched(p) => {
                        let data = self.patched_block(&p)?;
                        let len = keep.min(p.len as usize);
                        let nid = self.db.store_chunk(&data[..len])?;
                        tx.put(keys::block(ino, idx), keys::block_value(&nid, len as u32));
                    }
                }
            }
        }
        Ok(())
    }

    // ---- data ----

    /// Marks `ino` open (unlinked files live until their last release).
    pub fn open(&self, ino: Ino) -> Result<()> {
        self.open_at(ino).map(|_| ())
    }

    /// [`BranchFs::open`], returning the branch's count of resets at the
    /// open, for [`BranchFs::is_revoked`].
    pub fn open_at(&self, ino: Ino) -> Result<u64> {
        let st = self.state()?;
        {
            // Under `meta`, as an unlink or a rename decides under it
            // whether the file's last link frees it or leaves it to its
            // open handles: checked and counted apart, an open racing a
            // save by rename over the file got a handle on a freed file
            // (reads failed with ESTALE).
            let _m = self.meta.lock();
            Self::load_view(&self.view(&st), ino)?;
            *self.open.lock().entry(ino).or_insert(0) += 1;
        }
        // Read under the state lock, which a reset holds while it counts.
        Ok(self.resets.load(Ordering::Acquire))
    }

    /// Whether a handle of `ino` opened at reset count `opened_at` is
    /// stale: a reset since discarded its file. Its number may name another
    /// file by now (one that a later reset or pull brought from another
    /// branch or server numbers its files on its own), which the handle
    /// reached: writes landed in that other file.
    pub fn is_revoked(&self, ino: Ino, opened_at: u64) -> bool {
        self.revoked
            .lock()
            .get(&ino)
            .is_some_and(|r| opened_at < *r)
    }

    /// A hold that a reset of this branch waits for: taken before a
    /// handle's [`BranchFs::is_revoked`] check and kept until its I/O ends,
    /// it keeps a reset from discarding the file in between (the write
    /// then landed in the file the reset brought back). Not taken again
    /// while held (a reset waiting in between would deadlock).
    pub fn io_guard(&self) -> IoGuard {
        self.io.read_arc()
    }

    /// What a reset or a pull that moves the branch holds while it
    /// replaces the working state: the hold I/O through handles waits for
    /// (see [`BranchFs::io_guard`]), then the state's write lock.
    pub(crate) fn lock_for_reset(
        &self,
    ) -> (
        parking_lot::RwLockWriteGuard<'_, ()>,
        parking_lot::RwLockWriteGuard<'_, BranchState>,
    ) {
        let io = self.io.write();
        (io, self.state.write())
    }

    /// After a reset to the working state `st` (under its write lock):
    /// counts the reset and revokes the handles of the open files it
    /// discarded (see [`BranchFs::is_revoked`]): those it has no file for,
    /// those whose number it gives another file (of another kind or birth
    /// time: a reset onto another branch's commit, whose new files were
    /// numbered on their own, or a pull; writes through the handle landed
    /// in that file), and those that had no link left (deleted while open,
    /// or replaced by a rename), also where it brings back the file of
    /// that number (the one deleted): their holders had a file no one else
    /// could reach, and wrote into the restored one. A new working state
    /// has no orphans.
    pub(crate) fn reset_done(&self, st: &BranchState, before: Discarded) {
        let n = self.resets.fetch_add(1, Ordering::AcqRel) + 1;
        let orphans = std::mem::take(&mut *self.orphans.lock());
        self.removed_dirs.lock().clear();
        let open: Vec<Ino> = self.open.lock().keys().copied().collect();
        let view = self.view(st);
        for ino in open {
            let same = Self::load_view(&view, ino)
                .is_ok_and(|r| before.born.get(&ino) == Some(&(r.kind, r.crtime)));
            if orphans.contains(&ino) || !same {
                self.revoked.lock().insert(ino, n);
            }
        }
    }

    /// Drops one open reference; flushes and frees what is no longer needed.
    pub fn release(&self, ino: Ino) -> Result<()> {
        let last = {
            let mut open = self.open.lock();
            match open.get_mut(&ino) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                Some(_) => {
                    open.remove(&ino);
                    self.revoked.lock().remove(&ino);
                    true
                }
                None => false,
            }
        };
        self.flush(ino)?;
        if last {
            let st = self.state()?;
            {
                let _m = self.meta.lock();
                // Reopened since (the kernel releases in the background
                // after close(2)): the new handle's release does all
                // this. Checked under `meta`, as unlink decides under it.
                if self.open.lock().contains_key(&ino) {
                    return Ok(());
                }
                // An orphan a kernel still knows is freed by its forget.
                if !self.in_use(ino) && self.free_orphan_in(&st, ino)? {
                    return Ok(());
                }
            }
            // Forget the buffer if it is clean, also while a kernel knows
            // the file (it may for as long as it likes: buffers kept for
            // those, each with copies of its last blocks, took 64 KiB per
            // file written, 22 GiB for 340,000 small files); a writer
            // racing with this sees `detached` and starts a fresh one.
            // Locks in the order above: the buffer (no `meta` held), then
            // the `files` map.
            let fb = self.files.lock().get(&ino).cloned();
            if let Some(fb) = fb {
                let mut g = fb.lock();
                self.forget_if_clean(ino, &fb, &mut g);
            }
        }
        Ok(())
    }

    /// Frees `ino` if it is an orphan (no link left); call under `meta`,
    /// with no open handle or kernel holding it. True when it was freed.
    fn free_orphan_in(&self, st: &BranchState, ino: Ino) -> Result<bool> {
        let mut tx = Tx::new(self.view(st));
        let freed = match Self::load(&tx, ino) {
            Ok(rec) if rec.nlink == 0 => {
                self.destroy(&mut tx, ino)?;
                tx.delete(keys::orphan(ino));
                tx.commit(false, "freeing an unlinked file")?;
                true
            }
            _ => false,
        };
        self.orphans.lock().remove(&ino);
        Ok(freed)
    }

    /// Before a commit or a GC (under the state lock `st`): frees the
    /// orphans no handle has open, kept only for kernels that may still
    /// know them, so that a file deleted just before the commit is not in
    /// it (with its data) for want of the kernel's forget. A kernel that
    /// uses one after all gets ESTALE, and looks the name up again.
    pub(crate) fn free_unopened_orphans(&self, st: &BranchState) -> Result<()> {
        let candidates: Vec<Ino> = self.orphans.lock().iter().copied().collect();
        if candidates.is_empty() {
            return Ok(());
        }
        let _m = self.meta.lock();
        for ino in candidates {
            if !self.open.lock().contains_key(&ino) {
                self.free_orphan_in(st, ino)?;
            }
        }
        Ok(())
    }

    /// [`Self::free_unopened_orphans`] of the current working state, before
    /// a GC: a file just deleted was kept for the kernel's forget, which
    /// comes when the kernel likes, and `rm BIG; dm gc` freed nothing (1 in
    /// 3 tries after a restart). A deleted branch has none.
    pub(crate) fn free_unopened_orphans_now(&self) -> Result<()> {
        match self.state() {
            Ok(st) => self.free_unopened_orphans(&st),
            Err(_) => Ok(()),
        }
    }

    /// The files with no link left kept for an open handle or a kernel
    /// (after [`Self::free_unopened_orphans`], for an open handle).
    pub(crate) fn orphan_set(&self) -> std::collections::HashSet<Ino> {
        self.orphans.lock().clone()
    }

    /// Files with no link left that are kept for an open handle or for a
    /// kernel that knows them.
    pub fn orphan_count(&self) -> usize {
        self.orphans.lock().len()
    }

    /// A mount's kernel got `ino` (a lookup, a create, a readdirplus entry)
    /// and holds it until it forgets it ([`BranchFs::unhold`]): removing
    /// its last link leaves it an orphan until then.
    pub fn hold(&self, ino: Ino) {
        *self.held.lock().entry(ino).or_insert(0) += 1;
    }

    /// A mount's kernel forgot `ino`: frees it if it was an orphan that no
    /// other kernel knows and nothing has open.
    pub fn unhold(&self, ino: Ino) -> Result<()> {
        {
            let mut held = self.held.lock();
            match held.get_mut(&ino) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    return Ok(());
                }
                Some(_) => {
                    held.remove(&ino);
                    // The map keeps its largest size otherwise (a kernel
                    // that once knew a million files).
                    if held.capacity() > 4096 && held.len() * 4 < held.capacity() {
                        let len = held.len();
                        held.shrink_to(len * 2);
                    }
                }
                None => return Ok(()),
            }
        }
        // Most forgotten files are not orphans: no lock, no read.
        if !self.orphans.lock().contains(&ino) {
            return Ok(());
        }
        let st = self.state()?;
        let _m = self.meta.lock();
        if self.in_use(ino) {
            return Ok(());
        }
        self.free_orphan_in(&st, ino).map(|_| ())
    }

    /// Whether a handle has `ino` open or a mount's kernel knows it (check
    /// under `meta`, as unlink decides under it).
    fn in_use(&self, ino: Ino) -> bool {
        self.open.lock().contains_key(&ino) || self.held.lock().contains_key(&ino)
    }

    /// An empty write buffer for a file of this branch.
    /// The file's buffer, or with `create` a new one put in its place
    /// (the bool: created here; [`Self::forget_if_clean`] it when done).
    /// Holding its lock keeps the file's writers and truncates out.
    fn buffer_of(&self, ino: Ino, create: bool) -> Option<(Arc<Mutex<FileBuf>>, bool)> {
        let mut files = self.files.lock();
        match files.get(&ino) {
            Some(fb) => Some((fb.clone(), false)),
            None if create => {
                let fb = self.new_buffer();
                files.insert(ino, fb.clone());
                Some((fb, true))
            }
            None => None,
        }
    }

    fn new_buffer(&self) -> Arc<Mutex<FileBuf>> {
        Arc::new(Mutex::new(FileBuf::new(
            self.db.clone(),
            self.buffered.clone(),
            self.block_size as usize,
        )))
    }

    /// Drops `fb` (locked as `g`) from the branch's buffers if it is clean;
    /// a writer that got it meanwhile sees `detached` and takes a fresh one.
    fn forget_if_clean(&self, ino: Ino, fb: &Arc<Mutex<FileBuf>>, g: &mut FileBuf) {
        if g.is_clean() {
            g.detached = true;
            let mut files = self.files.lock();
            if files.get(&ino).is_some_and(|cur| Arc::ptr_eq(cur, fb)) {
                files.remove(&ino);
            }
        }
    }

    /// Frees files that were unlinked while open when the process died.
    fn purge_orphans(&self) -> Result<()> {
        let st = self.state.read();
        let view = self.view(&st);
        // Only the working state's own: a commit made before commits left
        // orphans out holds some, which the next commit drops (freed
        // here, they made every branch from that commit dirty).
        let mut orphans = Vec::new();
        for ino in crate::diff::orphan_inos(&view)? {
            if crate::tree::get(&*self.db, &st.root, &keys::orphan(ino))?.is_none() {
                orphans.push(ino);
            }
        }
        if orphans.is_empty() {
            return Ok(());
        }
        let mut tx = Tx::new(view);
        for ino in orphans {
            if let Ok(rec) = Self::load(&tx, ino) {
                if rec.nlink == 0 {
                    self.destroy(&mut tx, ino)?;
                }
            }
            tx.delete(keys::orphan(ino));
        }
        tx.commit(true, "freeing orphaned files")
    }

    /// What the working state holds for a block, if anything.
    fn stored_ref(&self, view: &View, ino: Ino, idx: u64) -> Result<Option<Stored>> {
        match view.get(&keys::block(ino, idx))? {
            Some(v) => self.parse_stored(&v, ino, idx).map(Some),
            None => Ok(None),
        }
    }

    /// A working-state block value (block `idx` of `ino`, for errors).
    fn parse_stored(&self, v: &[u8], ino: Ino, idx: u64) -> Result<Stored> {
        if let Some((id, len)) = keys::parse_block_value(v) {
            return Ok(Stored::Chunk(id, len));
        }
        Patched::parse(v, self.block_size)
            .map(Stored::Patched)
            .map_err(|e| Error::Corrupt(format!("block {idx} of inode {ino}: {e}")))
    }

    /// A patched block's bytes: its base chunk with the patches applied.
    fn patched_block(&self, p: &Patched) -> Result<Vec<u8>> {
        match &p.base {
            Some((id, _)) => Ok(p.apply(&self.db.read_chunk(id)?, self.block_size)),
            None => Ok(p.apply(&[], self.block_size)),
        }
    }

    /// Block `idx` of `ino` as the working state holds it, padded with
    /// zeros to the block size.
    fn stored_block(&self, view: &View, ino: Ino, idx: u64) -> Result<Vec<u8>> {
        match self.stored_ref(view, ino, idx)? {
            None => Ok(vec![0u8; self.block_size as usize]),
            Some(Stored::Chunk(id, len)) => self.chunk_block(&id, len),
            Some(Stored::Patched(p)) => self.patched_block(&p),
        }
    }

    /// A sparse buffered block's bytes (block `idx` of `ino`): its base, or
    /// its stored value when its patches were not read, with the written
    /// ranges copied from the buffer over it.
    fn merged(&self, view: &View, ino: Ino, idx: u64, o: &Origin, buf: &[u8]) -> Result<Vec<u8>> {
        let mut full = match &o.base {
            _ if o.unread => self.stored_block(view, ino, idx)?,
            Some((id, len)) => self.chunk_block(id, *len)?,
            None => vec![0u8; self.block_size as usize],
        };
        for (a, e) in o.ranges.iter() {
            full[a as usize..e as usize].copy_from_slice(&buf[a as usize..e as usize]);
        }
        Ok(full)
    }

    /// Makes sparse buffered block `idx` of `ino` whole (reads its base).
    fn fill(&self, view: &View, ino: Ino, g: &mut FileBuf, idx: u64) -> Result<()> {
        let (Some(o), Some(b)) = (g.origins.get(&idx), g.blocks.get(&idx)) else {
            return Ok(());
        };
        if !o.sparse {
            return Ok(());
        }
        let full = self.merged(view, ino, idx, o, b)?;
        g.blocks.insert(idx, Arc::new(full));
        if let Some(o) = g.origins.get_mut(&idx) {
            o.sparse = false;
            o.unread = false;
        }
        Ok(())
    }

    /// Makes every sparse buffered block of file `ino` whole.
    fn fill_all(&self, view: &View, ino: Ino, g: &mut FileBuf) -> Result<()> {
        let sparse = g.sparse_blocks();
        for idx in sparse {
            self.fill(view, ino, g, idx)?;
        }
        Ok(())
    }

    /// The value a patched block has once stored as a chunk (added to
    /// `batch`; hold `gc_barrier` until it is written): a commit stores
    /// no patches.
    pub(crate) fn materialize(
        &self,
        batch: &mut rocksdb::WriteBatch,
        value: &[u8],
    ) -> Result<Vec<u8>> {
        let p = Patched::parse(value, self.block_size)?;
        let data = self.patched_block(&p)?;
        let len = (p.len as usize).min(data.len());
        let id = self.db.stage_chunk(batch, &data[..len])?;
        Ok(keys::block_value(&id, len as u32))
    }

    /// A block's bytes from its chunk (`len` of them valid), padded with
    /// zeros to the block size.
    fn chunk_block(&self, id: &Id, len: u32) -> Result<Vec<u8>> {
        let mut out = vec![0u8; self.block_size as usize];
        let data = self.db.read_chunk(id)?;
        let n = (len as usize).min(data.len()).min(out.len());
        out[..n].copy_from_slice(&data[..n]);
        Ok(out)
    }

    pub fn read(&self, ino: Ino, offset: u64, size: u32) -> Result<Vec<u8>> {
        let st = self.state()?;
        let view = self.view(&st);
        let fb = self.files.lock().get(&ino).cloned();
        // A detached buffer is no longer the file's (its clean copies may
        // be stale).
        let guard = fb.as_ref().map(|f| f.lock()).filter(|g| !g.detached);
        let file_size = match &guard {
            // A buffer holding writes has the file's size; a clean one may
            // not have loaded it (see `attr_fresh`).
            Some(g) if !g.is_clean() => g.size,
            _ => {
                let rec = Self::load_view(&view, ino)?;
                if rec.kind == FileKind::Dir {
                    return Err(Error::fs("read", EISDIR));
                }
                rec.size
            }
        };
        if offset >= file_size {
            return Ok(Vec::new());
        }
        let end = (offset + size as u64).min(file_size);
        let bs = self.block_size as u64;
        let mut out = Vec::with_capacity((end - offset) as usize);
        let mut pos = offset;
        while pos < end {
            let idx = pos / bs;
            let within = (pos % bs) as usize;
            let n = ((bs - pos % bs).min(end - pos)) as usize;
            let buffered = guard.as_ref().and_then(|g| {
                g.blocks
                    .get(&idx)
                    .or_else(|| g.clean.iter().find(|(i, _)| *i == idx).map(|(_, b)| b))
            });
            let sparse = guard
                .as_ref()
                .and_then(|g| g.origins.get(&idx))
                .filter(|o| o.sparse);
            if let (Some(b), Some(o)) = (buffered, sparse) {
                out.extend_from_slice(&self.merged(&view, ino, idx, o, b)?[within..within + n]);
            } else if let Some(b) = buffered {
                out.extend_from_slice(&b[within..within + n]);
            } else {
                let spilled = guard.as_ref().and_then(|g| g.spilled.get(&idx));
                let stored = match spilled {
                    Some(id) => Some(Stored::Chunk(*id, self.block_size)),
                    None => self.stored_ref(&view, ino, idx)?,
                };
                match stored {
                    None => out.resize(out.len() + n, 0),
                    Some(Stored::Patched(p)) => {
                        out.extend_from_slice(&self.patched_block(&p)?[within..within + n]);
                    }
                    Some(Stored::Chunk(id, len)) => {
                        // A whole block goes to the kernel's page cache;
                        // part of one is likely read again soon.
                        let data = if within == 0 && n as u64 == bs {
                            self.db.read_chunk_once(&id)?
                        } else {
                            self.db.read_chunk(&id)?
                        };
                        let valid = (len as usize).min(data.len());
                        let from = within.min(valid);
                        let to = (within + n).min(valid);
                        out.extend_from_slice(&data[from..to]);
                        out.resize(out.len() + n - (to - from), 0);
                    }
                }
            }
            pos += n as u64;
        }
        Ok(out)
    }

    /// Makes bytes `[offset, offset + len)` of file `ino` read as zeros,
    /// keeping its size (fallocate's PUNCH_HOLE and ZERO_RANGE; a range
    /// past the end is cut at it): the pieces of blocks at the range's
    /// ends are written as zeros, and the whole blocks within it are
    /// dropped, as past a truncate (holes), so the time it takes follows
    /// the blocks the file holds there, not the range's length (zeros
    /// written over a 1 TiB range took minutes and stored a block for
    /// each 64 KiB of it). The file's writers wait meanwhile.
    pub fn punch(&self, ino: Ino, offset: u64, len: u64) -> Result<()> {
        let st = self.state()?;
        loop {
            let (fb, created) = self
                .buffer_of(ino, true)
                .expect("buffer_of creates one when asked to");
            let mut g = fb.lock();
            if g.detached {
                continue;
            }
            let result = self.punch_locked(&st, ino, offset, len, &mut g);
            if created {
                self.forget_if_clean(ino, &fb, &mut g);
            }
            return result;
        }
    }

    /// [`Self::punch`] with the file's buffer held.
    fn punch_locked(
        &self,
        st: &BranchState,
        ino: Ino,
        offset: u64,
        len: u64,
        g: &mut FileBuf,
    ) -> Result<()> {
        let view = self.view(st);
        if g.is_clean() {
            let rec = Self::load_view(&view, ino)?;
            if rec.kind != FileKind::File {
                return Err(Error::fs("punch", EINVAL));
            }
            g.size = rec.size;
        }
        let end = offset.saturating_add(len).min(g.size);
        if offset >= end {
            return Ok(());
        }
        let bs = self.block_size as u64;
        // Whole blocks [first, last); none when the range is inside one.
        let (first, last) = (offset.div_ceil(bs), end / bs);
        let mut zeros = |from: u64, to: u64| -> Result<()> {
            let mut at = from;
            while at < to {
                let n = (to - at).min(bs);
                self.write_locked(st, &view, ino, Some(at), &vec![0u8; n as usize], g)?;
                at += n;
            }
            Ok(())
        };
        if first >= last {
            return zeros(offset, end);
        }
        zeros(offset, first * bs)?;
        zeros(last * bs, end)?;
        let whole = first..last;
        let buffered: Vec<u64> = g.blocks.range(whole.clone()).map(|(i, _)| *i).collect();
        for idx in buffered {
            g.remove_block(idx);
        }
        let spilled: Vec<u64> = g.spilled.range(whole.clone()).map(|(i, _)| *i).collect();
        for idx in spilled {
            g.unspill(idx);
        }
        g.clean.retain(|(i, _)| !whole.contains(i));
        g.known.retain(|i, _| !whole.contains(i));
        // The stored blocks, a bounded batch at a time (a punch of a
        // large written file drops millions).
        const BATCH: usize = 1 << 16;
        let mut from = keys::block(ino, first);
        let to = keys::block(ino, last);
        loop {
            let mut doomed = Vec::new();
            view.scan(&from, &to, &mut |k, _| {
                doomed.push(k.to_vec());
                Ok(doomed.len() < BATCH)
            })?;
            let Some(next) = doomed.last().map(|k| keys::next_key(k)) else {
                return Ok(());
            };
            let more = doomed.len() == BATCH;
            let _m = self.meta.lock();
            let mut tx = Tx::new(view);
            for k in doomed {
                tx.delete(k);
            }
            tx.commit(false, "punching a hole")?;
            if !more {
                return Ok(());
            }
            from = next;
        }
    }

    pub fn write(&self, ino: Ino, offset: u64, data: &[u8]) -> Result<u32> {
        self.write_at(ino, Some(offset), data).map(|(_, n)| n)
    }

    /// Writes `data` at the end of the file as the store knows it, in one
    /// step with finding that end (O_APPEND): a kernel's cached size may
    /// be stale (a reset, or a writer on another mount of the branch, moved
    /// the end), and writing at it would leave a hole of zeros or overwrite
    /// the other writer's data. Returns where it wrote, and how much.
    pub fn append(&self, ino: Ino, data: &[u8]) -> Result<(u64, u32)> {
        self.write_at(ino, None, data)
    }

    /// [`BranchFs::write`] at `offset`, or at the end of the file.
    fn write_at(&self, ino: Ino, offset: Option<u64>, data: &[u8]) -> Result<(u64, u32)> {
        let st = self.state()?;
        self.db
            .space
            .refuse_when_full(|| format!("writing to {}@{}", self.dot, self.branch))?;
        let view = self.view(&st);
        loop {
            let fb = {
                let mut files = self.files.lock();
                files
                    .entry(ino)
                    .or_insert_with(|| self.new_buffer())
                    .clone()
            };
            let mut g = fb.lock();
            if g.detached {
                continue;
            }
            return self.write_locked(&st, &view, ino, offset, data, &mut g);
        }
    }

    /// The parts of [`BranchFs::write_at`] with the buffer held.
    fn write_locked(
        &self,
        st: &BranchState,
        view: &View,
        ino: Ino,
        offset: Option<u64>,
        data: &[u8],
        g: &mut FileBuf,
    ) -> Result<(u64, u32)> {
        if g.is_clean() {
            // (Re)load the size: the buffer is fresh or fully flushed.
            let rec = Self::load_view(view, ino)?;
            if rec.kind != FileKind::File {
                return Err(Error::fs(
                    "write",
                    if rec.kind == FileKind::Dir {
                        EISDIR
                    } else {
                        EINVAL
                    },
                ));
            }
            g.size = rec.size;
        }
        let offset = offset.unwrap_or(g.size);
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|e| *e <= MAX_FILE_SIZE)
            .ok_or(Error::fs("write", EFBIG))?;
        let bs = self.block_size as u64;
        let mut pos = offset;
        let mut src = data;
        while !src.is_empty() {
            let idx = pos / bs;
            let within = (pos % bs) as usize;
            let n = ((bs as usize) - within).min(src.len());
            if within == 0 && n == bs as usize {
                // Written whole: no zero fill, no read, and (for large
                // blocks) its hashing starts now on the stage worker.
                let block = Arc::new(src[..n].to_vec());
                // A clean or spilled copy of the block is stale now.
                g.clean.retain(|(i, _)| *i != idx);
                g.unspill(idx);
                g.origins.remove(&idx);
                if n >= STAGE_MIN {
                    g.staged.insert(idx, stage::submit(&self.db, block.clone()));
                } else {
                    g.staged.remove(&idx);
                }
                g.insert_block(idx, block);
                pos += n as u64;
                src = &src[n..];
                continue;
            }
            g.staged.remove(&idx);
            if !g.blocks.contains_key(&idx) {
                let block_start = idx * bs;
                let clean = g.clean.iter().position(|(i, _)| *i == idx);
                let hole = Origin::of(None, false);
                // A spilled block has no origin: it is stored whole.
                let (block, origin) = if let Some(id) = g.spilled.get(&idx).copied() {
                    let b = Arc::new(self.chunk_block(&id, self.block_size)?);
                    g.unspill(idx);
                    (b, None)
                } else if block_start >= g.size {
                    g.clean.retain(|(i, _)| *i != idx);
                    (Arc::new(vec![0u8; bs as usize]), Some(hole))
                } else {
                    // A clean copy is the whole block; otherwise only the
                    // patches are read, the base chunk when needed, and
                    // nothing when this buffer knows how the block is
                    // stored and it is a chunk or patches.
                    let sparse = clean.is_none();
                    let mut block = match clean {
                        Some(pos) => g.clean.swap_remove(pos).1,
                        None => Arc::new(vec![0u8; bs as usize]),
                    };
                    let origin = match g.known(view.bid, idx) {
                        Some(Known::Chunk(id, len)) => Origin::of(Some((id, len)), sparse),
                        Some(Known::Patched(base)) => Origin {
                            merge: true,
                            unread: sparse,
                            ..Origin::of(base, sparse)
                        },
                        None => match self.stored_ref(view, ino, idx)? {
                            None => hole,
                            Some(Stored::Chunk(id, len)) => Origin::of(Some((id, len)), sparse),
                            Some(Stored::Patched(p)) => {
                                if sparse {
                                    let b = Arc::make_mut(&mut block);
                                    for (off, data) in &p.patches {
                                        let off = *off as usize;
                                        b[off..off + data.len()].copy_from_slice(data);
                                    }
                                }
                                Origin {
                                    ranges: Ranges::from_ranges(p.ranges()),
                                    merge: true,
                                    ..Origin::of(p.base, sparse && p.base.is_some())
                                }
                            }
                        },
                    };
                    (block, Some(origin))
                };
                g.insert_block(idx, block);
                if let Some(o) = origin {
                    g.origins.insert(idx, o);
                }
            }
            if let Some(b) = g.blocks.get_mut(&idx) {
                Arc::make_mut(b)[within..within + n].copy_from_slice(&src[..n]);
            }
            if let Some(o) = g.origins.get_mut(&idx) {
                o.ranges.add(within as u32, (within + n) as u32);
                o.fresh.add(within as u32, (within + n) as u32);
            }
            pos += n as u64;
            src = &src[n..];
        }
        g.size = g.size.max(end);
        g.mtime = Some(now());
        let mine = g.blocks.len() * bs as usize;
        let pressed = self.buffered.load(Ordering::Relaxed) >= self.db.opts.write_buffer_bytes
            || self.db.buffered_total.load(Ordering::Relaxed)
                >= self.db.opts.total_write_buffer_bytes;
        if mine >= FILE_BUFFER_MAX || pressed {
            if g.spilled.len() < SPILLED_MAX {
                // Blocks the stage workers are still on stay buffered (the
                // writer does not wait for them) until the buffer reaches
                // twice its bound or all buffers together reach theirs.
                self.spill_locked(view, ino, g, pressed || mine >= 2 * FILE_BUFFER_MAX)?;
            } else {
                self.flush_locked(st, ino, g, false)?;
            }
        }
        Ok((offset, data.len() as u32))
    }

    /// Frees a file's buffer under memory pressure without waiting for the
    /// disk: its whole blocks are appended to the chunk log, unsynced and
    /// unindexed (see [`Db::spill_prepared`]), and the buffer keeps only
    /// their ids. A flush then writes them like buffered blocks, after one
    /// sync of the log. Flushing here instead made a sequential writer wait
    /// for the disk every `FILE_BUFFER_MAX` bytes, where a native one
    /// writes into the page cache until its fsync. Without `wait`, blocks
    /// the stage workers are still preparing stay in the buffer (the writer
    /// does not wait for them; a later spill or the flush takes them).
    fn spill_locked(&self, view: &View, ino: Ino, g: &mut FileBuf, wait: bool) -> Result<()> {
        self.fill_all(view, ino, g)?;
        let bs = self.block_size as u64;
        let whole: Vec<(u64, Arc<Vec<u8>>)> = g
            .blocks
            .iter()
            .filter(|(idx, _)| (*idx + 1) * bs <= g.size)
            .map(|(idx, data)| (*idx, data.clone()))
            .collect();
        let _barrier = self.db.gc_barrier.read_recursive();
        for (idx, data) in whole {
            let p = match g.staged.get(&idx) {
                Some(slot) => match slot.try_take() {
                    Some(p) => p,
                    None if !wait => continue,
                    None => slot.take(&data),
                },
                None => stage::Prepared::of(&data),
            };
            let id = self.db.spill_prepared(&p, &data)?;
            // Recorded before the block leaves the buffer, so an error on
            // a later block loses nothing.
            if let Some(old) = g.spilled.insert(idx, id) {
                self.db.unpin([&old]);
            }
            g.remove_block(idx);
            g.clean.retain(|(i, _)| *i != idx);
            self.db.cache_chunk(id, data);
        }
        Ok(())
    }

    /// Turns a file's buffered blocks into chunks and stores them with the
    /// file's new size and mtime, in one batch.
    /// Returns whether anything was written.
    fn flush_locked(
        &self,
        st: &BranchState,
        ino: Ino,
        g: &mut FileBuf,
        sync: bool,
    ) -> Result<bool> {
        if g.is_clean() {
            return Ok(false);
        }
        let bs = self.block_size as u64;
        if !sync {
            // Stored as chunks: whole blocks needed.
            self.fill_all(&self.view(st), ino, g)?;
        }
        // Stored as patches: not whole, so not kept as clean copies.
        let sparse = g.sparse_blocks();
        let _barrier = self.db.gc_barrier.read_recursive();
        let mut batch = rocksdb::WriteBatch::default();
        let mut block_values = Vec::with_capacity(g.blocks.len() + g.spilled.len());
        let mut merges = Vec::new();
        // How each block is stored, for the buffer's `known` once written.
        let mut known = Vec::with_capacity(g.blocks.len() + g.spilled.len());
        for (&idx, id) in &g.spilled {
            let start = idx * bs;
            if start < g.size {
                let len = (g.size - start).min(bs) as u32;
                block_values.push((keys::block(ino, idx), keys::block_value(id, len)));
                known.push((idx, Known::Chunk(*id, len)));
            }
        }
        let mut cached = Vec::new();
        // An fsync of a few blocks keeps their chunks inline: one disk
        // sync (RocksDB's log) instead of two.
        let inline = sync && g.spilled.is_empty() && g.staged.is_empty() && g.blocks.len() <= 16;
        for (&idx, data) in &g.blocks {
            let start = idx * bs;
            if start >= g.size {
                continue;
            }
            let len = (g.size - start).min(bs) as usize;
            if sync {
                if let Some(o) = g.origins.get(&idx) {
                    // Patches within the block's valid length (the ranges
                    // end within it: writes extend the size), written into
                    // this buffer: all of them, unless the block is stored
                    // as patches already (then merged onto those).
                    let p = Patched {
                        base: o.base,
                        len: len as u32,
                        patches: o
                            .fresh
                            .iter()
                            .filter(|&(a, _)| (a as usize) < len)
                            .map(|(a, e)| (a, data[a as usize..(e as usize).min(len)].to_vec()))
                            .collect(),
                    };
                    // Referenced again: GC, if running, must keep it.
                    if let Some((base, _)) = &p.base {
                        self.db.note_young(base);
                    }
                    let v = (keys::block(ino, idx), p.encode());
                    known.push((idx, Known::Patched(p.base)));
                    if o.merge {
                        merges.push(v);
                    } else {
                        block_values.push(v);
                    }
                    self.patched.lock().entry(ino).or_default().insert(idx);
                    continue;
                }
            }
            let id = match g.staged.get(&idx) {
                // Prepared whole; valid while the file still covers it.
                Some(slot) if len == data.len() => {
                    let p = slot.take(data);
                    self.db.stage_prepared(&mut batch, &p, data)?
                }
                _ if inline => self.db.stage_chunk_inline(&mut batch, &data[..len])?,
                _ => self.db.stage_chunk(&mut batch, &data[..len])?,
            };
            block_values.push((keys::block(ino, idx), keys::block_value(&id, len as u32)));
            known.push((idx, Known::Chunk(id, len as u32)));
            if len == data.len() {
                cached.push((id, data.clone()));
            }
        }
        // Chunks appended to the log reach the disk before any index entry
        // naming them can; synced here, not under `meta` (see Db::write).
        self.db.sync_chunks()?;
        {
            let _m = self.meta.lock();
            let mut tx = Tx::new(self.view(st));
            // A file removed meanwhile keeps nothing; any other failure to
            // read its record fails the flush (and keeps the buffer).
            let rec = match Self::load(&tx, ino) {
                Ok(rec) => Some(rec),
                Err(e) if e.is_not_found() => None,
                Err(e) => return Err(e),
            };
            if let Some(mut rec) = rec {
                rec.size = g.size;
                if let Some(m) = g.mtime {
                    rec.mtime = m;
                    rec.ctime = rec.ctime.max(m);
                }
                Self::store(&mut tx, ino, &rec);
                for (k, v) in block_values {
                    tx.put(k, v);
                }
                for (k, v) in merges {
                    tx.merge(k, v);
                }
                tx.write_into(&mut batch);
                self.db.write(batch, sync, "storing written data")?;
                for (idx, k) in known {
                    // Chunks only for blocks known already (patched
                    // before): a sequential writer would otherwise fill
                    // `known` with every block of the file.
                    if matches!(k, Known::Patched(_)) || g.known(st.bid, idx).is_some() {
                        g.know(st.bid, idx, k);
                    }
                }
            }
        }
        for (id, data) in cached {
            self.db.cache_chunk(id, data);
        }
        g.clear_spilled();
        // Keep the last blocks just stored (within the file) as clean
        // copies, then older clean copies, up to CLEAN_BLOCKS.
        let size = g.size;
        let mut flushed = g.take_blocks();
        let mut keep = Vec::with_capacity(CLEAN_BLOCKS);
        while keep.len() < CLEAN_BLOCKS {
            match flushed.pop_last() {
                Some((idx, data)) if idx * bs < size && !sparse.contains(&idx) => {
                    keep.push((idx, data))
                }
                Some(_) => continue,
                None => break,
            }
        }
        for old in std::mem::take(&mut g.clean) {
            if keep.len() >= CLEAN_BLOCKS {
                break;
            }
            // An older copy of a block just stored is stale.
            if !keep.iter().any(|(i, _)| *i == old.0) {
                keep.push(old);
            }
        }
        g.clean = keep;
        g.mtime = None;
        Ok(true)
    }

    /// Stores the blocks that fsyncs left as patches as whole chunks again
    /// (not durably: like a close, this changes no content). Called now
    /// and then by the server, as ZFS writes out what its intent log holds
    /// every few seconds, so that patches neither pile up nor make the
    /// next commit store them all. Blocks being written are left to their
    /// own flush. Returns how many blocks it stored.
    pub fn materialize_patches(&self) -> Result<usize> {
        let todo = std::mem::take(&mut *self.patched.lock());
        let mut done = 0;
        let mut first_error = None;
        for (ino, blocks) in todo {
            // A few blocks at a time: writers of the file wait while its
            // buffer is held, and a file written at random can have
            // thousands of patched blocks.
            let blocks: Vec<u64> = blocks.into_iter().collect();
            for (i, group) in blocks.chunks(MATERIALIZE_GROUP).enumerate() {
                match self.materialize_file(ino, group) {
                    Ok(n) => done += n,
                    Err(e) => {
                        // Tried again next time (a commit stores them anyway).
                        let rest = blocks[i * MATERIALIZE_GROUP..].iter().copied();
                        self.patched.lock().entry(ino).or_default().extend(rest);
                        first_error.get_or_insert(e);
                        break;
                    }
                }
            }
        }
        first_error.map_or(Ok(done), Err)
    }

    fn materialize_file(&self, ino: Ino, blocks: &[u64]) -> Result<usize> {
        let st = self.state()?;
        // A buffer of our own if the file has none, so that writers and
        // truncates of this file take the same lock as we do.
        let (fb, created) = self
            .buffer_of(ino, true)
            .expect("buffer_of creates one when asked to");
        let result = self.materialize_in(&st, ino, &fb, blocks);
        if created {
            self.forget_if_clean(ino, &fb, &mut fb.lock());
        }
        result
    }

    /// [`Self::materialize_file`] with the file's buffer `fb`. The reads,
    /// hashing and compression happen without holding the buffer, so the
    /// file's writers do not wait for them (a group of 32 held them up to
    /// 15-18 ms); a block written, flushed or truncated meanwhile is left
    /// as that left it.
    fn materialize_in(
        &self,
        st: &BranchState,
        ino: Ino,
        fb: &Mutex<FileBuf>,
        blocks: &[u64],
    ) -> Result<usize> {
        // Dirty: its own flush stores it (and records it again if that is
        // an fsync that patches it).
        let dirty =
            |g: &FileBuf, idx: u64| g.blocks.contains_key(&idx) || g.spilled.contains_key(&idx);
        let todo: Vec<u64> = {
            let g = fb.lock();
            if g.detached {
                return Ok(0);
            }
            blocks.iter().copied().filter(|&i| !dirty(&g, i)).collect()
        };
        let view = self.view(st);
        let _barrier = self.db.gc_barrier.read_recursive();
        let mut batch = rocksdb::WriteBatch::default();
        let mut values = Vec::new();
        for idx in todo {
            let key = keys::block(ino, idx);
            if let Some(v) = view.get(&key)? {
                if crate::patch::is_patched(&v) {
                    let whole = self.materialize(&mut batch, &v)?;
                    values.push((idx, key, v, whole));
                }
            }
        }
        if values.is_empty() {
            return Ok(0);
        }
        // The staged chunks reach the disk before their index entries, as
        // in a flush, and not while the file's writers wait.
        self.db.sync_chunks()?;
        let mut g = fb.lock();
        if g.detached {
            // Forgotten meanwhile (released clean): tried again next time.
            self.patched.lock().entry(ino).or_default().extend(blocks);
            return Ok(0);
        }
        let _m = self.meta.lock();
        let mut tx = Tx::new(view);
        // A file removed meanwhile keeps nothing.
        if Self::load(&tx, ino).is_err() {
            return Ok(0);
        }
        let mut n = 0;
        let mut known = Vec::new();
        for (idx, k, patched, whole) in values {
            // Being written again, or stored since by a flush or a
            // truncate: what was staged for it stays unreferenced (GC).
            if dirty(&g, idx) || tx.get(&k)?.as_deref() != Some(patched.as_slice()) {
                continue;
            }
            if let Some((id, len)) = keys::parse_block_value(&whole) {
                known.push((idx, Known::Chunk(id, len)));
            }
            tx.put(k, whole);
            n += 1;
        }
        tx.write_into(&mut batch);
        self.db
            .write(batch, false, "storing patched blocks whole")?;
        for (idx, k) in known {
            g.know(st.bid, idx, k);
        }
        Ok(n)
    }

    /// Stores a file's buffered writes (close).
    pub fn flush(&self, ino: Ino) -> Result<()> {
        let st = self.state()?;
        self.flush_in(&st, ino)
    }

    fn flush_in(&self, st: &BranchState, ino: Ino) -> Result<()> {
        self.flush_in_sync(st, ino, false).map(|_| ())
    }

    /// Flushes one file; with `sync` the batch is durable. Returns whether
    /// anything was written.
    fn flush_in_sync(&self, st: &BranchState, ino: Ino, sync: bool) -> Result<bool> {
        let fb = self.files.lock().get(&ino).cloned();
        match fb {
            Some(fb) => self.flush_locked(st, ino, &mut fb.lock(), sync),
            None => Ok(false),
        }
    }

    /// Stores every buffered write of this branch.
    pub(crate) fn flush_all_in(&self, st: &BranchState) -> Result<()> {
        let inos: Vec<Ino> = self.files.lock().keys().copied().collect();
        for ino in inos {
            self.flush_in(st, ino)?;
        }
        Ok(())
    }

    /// Stores every buffered write of this branch (syncfs without the sync).
    pub fn flush_all(&self) -> Result<()> {
        let st = self.state()?;
        self.flush_all_in(&st)
    }

    /// Refuses every operation from now on (ESHUTDOWN), once those in
    /// progress are done, then flushes what was written: what the branch
    /// acknowledged is in the store when this returns. For a server that
    /// stops while a mount it detached lazily (files were open) still
    /// takes writes: a write acknowledged after its last flush was lost.
    pub fn stop(&self) -> Result<()> {
        let mut st = self.state.write();
        st.stopped = true;
        let st = parking_lot::RwLockWriteGuard::downgrade(st);
        if st.deleted {
            return Ok(());
        }
        self.flush_all_in(&st)
    }

    /// Makes the file's data and metadata durable before returning.
    pub fn fsync(&self, ino: Ino, _datasync: bool) -> Result<()> {
        let st = self.state()?;
        // One synced batch when there is buffered data (its WAL sync also
        // covers every earlier write); a plain WAL sync otherwise.
        if !self.flush_in_sync(&st, ino, true)? {
            self.db.sync_wal()?;
        }
        Ok(())
    }

    /// Bytes buffered in memory, not yet chunked.
    pub fn buffered_bytes(&self) -> usize {
        self.buffered.load(Ordering::Relaxed)
    }

    /// Bytes written to open files that the working state does not name
    /// yet: buffered in memory, or spilled to the chunk log under memory
    /// pressure (named only by their file's buffer until its flush), in
    /// whole blocks but not past each file's end (a small file counted as
    /// a whole block: 300 files of 150 bytes said 18.75 MiB). Not those of
    /// files with no link left: no one's work (see `commit`), they made
    /// `dm status` say there was some until they were flushed.
    pub fn unflushed_bytes(&self) -> u64 {
        self.unflushed().bytes
    }

    /// [`Self::unflushed_bytes`], the blocks they are in, and the sizes of
    /// the files buffered.
    pub(crate) fn unflushed(&self) -> Unflushed {
        let orphans = self.orphan_set();
        let buffers: Vec<_> = self
            .files
            .lock()
            .iter()
            .filter(|(ino, _)| !orphans.contains(ino))
            .map(|(ino, b)| (*ino, b.clone()))
            .collect();
        let bs = u64::from(self.block_size);
        let mut out = Unflushed::default();
        for (ino, b) in &buffers {
            let g = b.lock();
            if !g.detached && !g.is_clean() {
                out.sizes.insert(*ino, g.size);
            }
            for idx in g.blocks.keys().chain(g.spilled.keys()) {
                if out.blocks.insert((*ino, *idx)) {
                    out.bytes += g.size.saturating_sub(idx * bs).min(bs);
                }
            }
        }
        out
    }

    /// Before a reset discards the working state `st` (under its write
    /// lock): new files will get numbers above every one it used (see
    /// [`BranchFs::ino_floor`]), and the open files' identities are kept
    /// for [`BranchFs::reset_done`].
    pub(crate) fn before_reset(&self, st: &BranchState) -> Result<Discarded> {
        let view = self.view(st);
        let next = Self::superblock(&Tx::new(view))?.next_ino;
        self.ino_floor.fetch_max(next, Ordering::Relaxed);
        let open: Vec<Ino> = self.open.lock().keys().copied().collect();
        let mut born = HashMap::new();
        for ino in open {
            if let Ok(rec) = Self::load_view(&view, ino) {
                born.insert(ino, (rec.kind, rec.crtime));
            }
        }
        Ok(Discarded { born })
    }

    /// Drops every buffer (reset): the working state is being replaced.
    pub(crate) fn drop_buffers(&self) {
        // Their bytes leave the count as the buffers are dropped.
        self.files.lock().clear();
    }

    // ---- directories ----

    pub fn readdir(&self, ino: Ino, offset: i64, max: usize) -> Result<Vec<DirEntry>> {
        let st = self.state()?;
        let view = self.view(&st);
        let rec = match Self::load_view(&view, ino) {
            Ok(rec) => rec,
            // Removed (through another mount: this one's kernel knows it
            // is dead and does not ask): nothing in it, as a local file
            // system lists a removed directory still open. ESTALE made
            // two `rm -rf` racing on two mounts fail.
            Err(e) if self.is_removed_dir(&e, ino) => {
                return Ok(Vec::new());
            }
            Err(e) => return Err(e),
        };
        if rec.kind != FileKind::Dir {
            return Err(Error::fs("readdir", ENOTDIR));
        }
        let mut out = Vec::new();
        if offset < 1 && out.len() < max {
            out.push(DirEntry {
                ino,
                offset: 1,
                kind: FileKind::Dir,
                name: b".".to_vec(),
            });
        }
        if offset < 2 && out.len() < max {
            out.push(DirEntry {
                ino: rec.parent,
                offset: 2,
                kind: FileKind::Dir,
                name: b"..".to_vec(),
            });
        }
        if out.len() >= max {
            return Ok(out);
        }
        let from = if offset < 2 { 0 } else { offset as u64 + 1 };
        view.scan(
            &keys::dirent_from(ino, from),
            &keys::prefix_end(ino, keys::TAG_DIRENT),
            &mut |k, v| {
                let (cookie, name) =
                    keys::parse_dirent(k).ok_or_else(|| Error::Corrupt("dirent key".into()))?;
                let d = Dirent::decode(v)?;
                out.push(DirEntry {
                    ino: d.ino,
                    offset: cookie as i64,
                    kind: d.kind,
                    name: name.to_vec(),
                });
                Ok(out.len() < max)
            },
        )?;
        Ok(out)
    }

    // ---- extended attributes ----

    pub fn getxattr(&self, ino: Ino, name: &[u8]) -> Result<Vec<u8>> {
        let st = self.state()?;
        let view = self.view(&st);
        Self::load_view(&view, ino)?;
        view.get(&keys::xattr(ino, name))?
            .ok_or(Error::fs("getxattr", ENODATA))
    }

    pub fn setxattr(&self, ino: Ino, name: &[u8], value: &[u8], flags: i32) -> Result<()> {
        if name.is_empty() || name.len() > 255 {
            return Err(Error::fs(
                "setxattr",
                if name.is_empty() { EINVAL } else { ERANGE },
            ));
        }
        if value.len() > XATTR_MAX {
            return Err(Error::fs("setxattr", E2BIG));
        }
        self.refuse_new_records_when_full("setxattr")?;
        let st = self.state()?;
        let _m = self.meta.lock();
        let mut tx = Tx::new(self.view(&st));
        let mut rec = Self::load(&tx, ino)?;
        let exists = tx.get(&keys::xattr(ino, name))?.is_some();
        if flags & XATTR_CREATE != 0 && exists {
            return Err(Error::fs("setxattr", EEXIST));
        }
        if flags & XATTR_REPLACE != 0 && !exists {
            return Err(Error::fs("setxattr", ENODATA));
        }
        tx.put(keys::xattr(ino, name), value.to_vec());
        rec.ctime = now();
        Self::store(&mut tx, ino, &rec);
        tx.commit(false, "setting an extended attribute")
    }

    pub fn listxattr(&self, ino: Ino) -> Result<Vec<Vec<u8>>> {
        let st = self.state()?;
        let view = self.view(&st);
        Self::load_view(&view, ino)?;
        let mut names = Vec::new();
        view.scan(
            &keys::prefix(ino, keys::TAG_XATTR),
            &keys::prefix_end(ino, keys::TAG_XATTR),
            &mut |k, _| {
                names.push(k[9..].to_vec());
                Ok(true)
            },
        )?;
        Ok(names)
    }

    pub fn removexattr(&self, ino: Ino, name: &[u8]) -> Result<()> {
        let st = self.state()?;
        let _m = self.meta.lock();
        let mut tx = Tx::new(self.view(&st));
        let mut rec = Self::load(&tx, ino)?;
        if tx.get(&keys::xattr(ino, name))?.is_none() {
            return Err(Error::fs("removexattr", ENODATA));
        }
        tx.delete(keys::xattr(ino, name));
        rec.ctime = now();
        Self::store(&mut tx, ino, &rec);
        tx.commit(false, "removing an extended attribute")
    }

    /// Space figures of the filesystem holding the store.
    pub fn statfs(&self) -> Result<StatFs> {
        let st = self.state()?;
        // Inode numbers handed out so far (those of deleted files too): an
        // upper bound of the files in use, which nothing counts.
        let used = Self::superblock(&Tx::new(self.view(&st)))?.next_ino;
        let path = std::ffi::CString::new(self.data_dir.as_os_str().as_encoded_bytes())
            .map_err(|_| Error::fs("statfs", EINVAL))?;
        // SAFETY: statvfs writes into the zeroed struct we own; path is a
        // valid NUL-terminated string.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::statvfs(path.as_ptr(), &mut s) };
        if rc != 0 {
            return Err(Error::Io {
                context: format!("statfs of {}", self.data_dir.display()),
                cause: std::io::Error::last_os_error(),
            });
        }
        let frsize = s.f_frsize as u64;
        let scale = |n: u64| n * frsize / 4096;
        Ok(StatFs {
            blocks: scale(s.f_blocks as u64),
            bfree: scale(s.f_bfree as u64),
            bavail: scale(s.f_bavail as u64),
            files: 1 << 40,
            ffree: (1u64 << 40).saturating_sub(used),
            bsize: 4096,
            namelen: 255,
            frsize: 4096,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::chunk::tests::pseudo_random as noise;
    use crate::{DotName, FileKind, Store, ROOT_INO};
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    /// A store with one dot `app` (default block size) and its master's
    /// working state.
    fn fresh() -> (tempfile::TempDir, Arc<Store>, Arc<crate::BranchFs>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let dot = DotName::new("app").unwrap();
        store.create_dot(&dot, None).unwrap();
        let fs = store.branch_fs(&dot, "master").unwrap();
        (dir, store, fs)
    }

    /// A growing-only size (fallocate) never cuts what a writer appended
    /// after the caller read the size.
    #[test]
    fn grow_only_sizes_never_shrink() {
        let (_dir, _store, fs) = fresh();
        let f = fs
            .mknod(ROOT_INO, b"f", FileKind::File, 0o644, 0, 0, 0)
            .unwrap()
            .ino;
        fs.write(f, 0, &[1u8; 100]).unwrap();
        let grow = |size| crate::SetAttr {
            size: Some(size),
            grow_only: true,
            ..Default::default()
        };
        assert_eq!(fs.setattr(f, &grow(50)).unwrap().size, 100);
        assert_eq!(fs.setattr(f, &grow(200)).unwrap().size, 200);
        fs.flush(f).unwrap();
        assert_eq!(fs.getattr(f).unwrap().size, 200);
    }

    /// A file written and closed leaves no buffer behind, also while a
    /// mount's kernel knows it (as it knows every file it created until
    /// it forgets): each such buffer kept copies of the file's last
    /// blocks, 64 KiB per small file, until the server stopped.
    #[test]
    fn closed_files_leave_no_buffers_while_kernels_know_them() {
        let (_dir, _store, fs) = fresh();
        for i in 0..100u32 {
            let name = format!("f{i}");
            let f = fs
                .mknod(ROOT_INO, name.as_bytes(), FileKind::File, 0o644, 0, 0, 0)
                .unwrap()
                .ino;
            fs.hold(f);
            fs.open(f).unwrap();
            fs.write(f, 0, name.as_bytes()).unwrap();
            fs.release(f).unwrap();
        }
        assert_eq!(fs.files.lock().len(), 0, "buffers kept after close");
        // Open files keep theirs, and their data reads back.
        let f = fs.lookup(ROOT_INO, b"f7").unwrap().ino;
        fs.open(f).unwrap();
        fs.write(f, 2, b"X").unwrap();
        fs.open(f).unwrap();
        fs.release(f).unwrap();
        assert_eq!(fs.files.lock().len(), 1);
        fs.release(f).unwrap();
        assert_eq!(fs.files.lock().len(), 0);
        assert_eq!(fs.read(f, 0, 10).unwrap(), b"f7X");
    }

    /// `df -i` shows the inode numbers used, not half of them.
    #[test]
    fn statfs_counts_inodes_handed_out() {
        let (_dir, _store, fs) = fresh();
        let before = fs.statfs().unwrap();
        assert!(
            before.files - before.ffree < 16,
            "{} used",
            before.files - before.ffree
        );
        for i in 0..10u8 {
            fs.mknod(ROOT_INO, &[b'f', b'0' + i], FileKind::File, 0o644, 0, 0, 0)
                .unwrap();
        }
        let after = fs.statfs().unwrap();
        assert_eq!(before.ffree - after.ffree, 10);
    }

    /// A chunk log write that finds the disk full gives the store's
    /// reserve back and is tried again, so the fsync succeeds; the store
    /// then refuses new data with ENOSPC but still deletes and commits,
    /// and takes data again once the disk has room (here at once: the
    /// test's disk is not full).
    #[test]
    fn a_full_disk_gives_back_the_reserve_and_refuses_new_data() {
        let (dir, store, fs) = fresh();
        let reserve = dir.path().join("reserve");
        assert!(reserve.exists());
        let ino = fs
            .mknod(ROOT_INO, b"f", FileKind::File, 0o644, 0, 0, 0)
            .unwrap()
            .ino;
        let data = noise(3 << 20, 5);
        fs.write(ino, 0, &data).unwrap();
        fs.db.log.fail_writes.store(1, Ordering::Relaxed);
        fs.fsync(ino, false).unwrap();
        assert_eq!(fs.db.log.fail_writes.load(Ordering::Relaxed), 0);
        assert!(!reserve.exists(), "the reserve was not given back");
        let err = fs.write(ino, 0, b"more").unwrap_err();
        assert_eq!(err.errno(), crate::error::libc_consts::ENOSPC, "{err}");
        assert!(fs.read(ino, 0, 4 << 20).unwrap() == data);
        store
            .commit(
                &DotName::new("app").unwrap(),
                "master",
                crate::CommitRequest {
                    message: "while full".into(),
                    ..Default::default()
                },
            )
            .unwrap();
        fs.unlink(ROOT_INO, b"f").unwrap();
        // The disk has room: the next look makes the reserve again.
        assert_eq!(store.disk_full(), None);
        assert!(reserve.exists());
        fs.mknod(ROOT_INO, b"g", FileKind::File, 0o644, 0, 0, 0)
            .unwrap();
        let g = fs.lookup(ROOT_INO, b"g").unwrap().ino;
        fs.write(g, 0, b"taken again").unwrap();
        fs.fsync(g, false).unwrap();
    }

    /// A buffer that holds no writes (one a writer has just created and not
    /// yet loaded, or the patch writer's own) does not hide the file's size
    /// from reads and getattr. It did: the patch writer's buffer, size 0,
    /// made reads racing with it return end of file (PostgreSQL: "could not
    /// read block ... read only 0 of 8192 bytes").
    #[test]
    fn a_buffer_without_writes_does_not_hide_the_file_size() {
        let (_dir, _store, fs) = fresh();
        let data = noise(100_000, 4);
        let ino = fs
            .mknod(ROOT_INO, b"f", FileKind::File, 0o644, 0, 0, 0)
            .unwrap()
            .ino;
        fs.open(ino).unwrap();
        fs.write(ino, 0, &data).unwrap();
        fs.release(ino).unwrap();
        assert!(fs.files.lock().get(&ino).is_none(), "forgotten at release");
        // As write() and materialize_file() insert one, before loading.
        let fresh = fs.new_buffer();
        fs.files.lock().insert(ino, fresh.clone());
        assert!(fs.read(ino, 0, 1 << 20).unwrap() == data, "read");
        assert_eq!(fs.getattr(ino).unwrap().size, data.len() as u64, "getattr");
        assert_eq!(
            fs.lookup(ROOT_INO, b"f").unwrap().size,
            data.len() as u64,
            "lookup"
        );
        // Detached (forgotten while a reader held it): not the file's.
        fresh.lock().detached = true;
        assert!(fs.read(ino, 0, 1 << 20).unwrap() == data, "read, detached");
    }

    /// A time or mode change leaves buffered writes in the buffer (storing
    /// partly written blocks whole is what made them slow): the size and
    /// data stay visible, an explicit mtime wins over the writes' own when
    /// they are stored later, and ctime never goes back.
    #[test]
    fn setattr_without_truncate_keeps_writes_buffered() {
        use crate::{SetAttr, TimeSet, Timestamp};
        let (_dir, _store, fs) = fresh();
        let ino = fs
            .mknod(ROOT_INO, b"f", FileKind::File, 0o644, 0, 0, 0)
            .unwrap()
            .ino;
        fs.open(ino).unwrap();
        let data = noise(20_000, 5);
        fs.write(ino, 4096, &data).unwrap();
        let old = Timestamp {
            secs: 1_000_000,
            nanos: 5,
        };
        let a = fs
            .setattr(
                ino,
                &SetAttr {
                    mtime: Some(TimeSet::At(old)),
                    ..SetAttr::default()
                },
            )
            .unwrap();
        assert_eq!(a.size, 4096 + data.len() as u64);
        assert_eq!(a.mtime, old);
        assert!(
            !fs.files.lock()[&ino].lock().is_clean(),
            "stored by setattr"
        );
        let chmod = fs
            .setattr(
                ino,
                &SetAttr {
                    mode: Some(0o600),
                    ..SetAttr::default()
                },
            )
            .unwrap();
        fs.fsync(ino, false).unwrap();
        let a = fs.getattr(ino).unwrap();
        assert_eq!(
            (a.size, a.mtime, a.perm),
            (4096 + data.len() as u64, old, 0o600)
        );
        assert!(a.ctime >= chmod.ctime, "ctime went back");
        assert_eq!(fs.read(ino, 4096, 1 << 20).unwrap(), data);
        fs.release(ino).unwrap();
    }

    /// The patch writer stores many patched blocks of one file in groups
    /// (so writers wait for one group at a time) and stores every one.
    #[test]
    fn the_patch_writer_stores_every_group_of_patched_blocks() {
        let (_dir, _store, fs) = fresh();
        let bs = fs.block_size as usize;
        let n = 3 * super::MATERIALIZE_GROUP + 5;
        let mut expect = noise(n * bs, 6);
        let ino = fs
            .mknod(ROOT_INO, b"f", FileKind::File, 0o644, 0, 0, 0)
            .unwrap()
            .ino;
        fs.write(ino, 0, &expect).unwrap();
        fs.fsync(ino, false).unwrap();
        for b in 0..n {
            let off = b * bs + 100;
            fs.write(ino, off as u64, b"patched").unwrap();
            expect[off..off + 7].copy_from_slice(b"patched");
        }
        fs.fsync(ino, false).unwrap();
        assert_eq!(fs.materialize_patches().unwrap(), n);
        assert_eq!(fs.materialize_patches().unwrap(), 0, "none left");
        assert!(fs.read(ino, 0, (n * bs) as u32).unwrap() == expect);
    }

    /// A link(2) does not hold `meta` while it waits for the file's buffer
    /// (a flush, a truncate or the patch writer holds the buffer and then
    /// takes `meta`: a link during an fsync of the same file deadlocked).
    #[test]
    fn a_link_takes_no_file_buffer_under_meta() {
        let (_dir, _store, fs) = fresh();
        let ino = fs
            .mknod(ROOT_INO, b"f", FileKind::File, 0o644, 0, 0, 0)
            .unwrap()
            .ino;
        fs.write(ino, 0, b"buffered").unwrap();
        let fb = fs.files.lock().get(&ino).cloned().unwrap();
        // As a flush does: the buffer first, `meta` next.
        let g = fb.lock();
        let linker = {
            let fs = fs.clone();
            std::thread::spawn(move || fs.link(ino, ROOT_INO, b"g").map(|a| a.size))
        };
        std::thread::sleep(std::time::Duration::from_millis(200));
        let meta = fs.meta.try_lock_for(std::time::Duration::from_secs(5));
        assert!(
            meta.is_some(),
            "link held meta while waiting for the buffer"
        );
        drop(meta);
        drop(g);
        assert_eq!(linker.join().unwrap().unwrap(), 8, "the buffered size");
    }

    /// The origin of block `idx` of `ino` in its buffer: (unread, merge).
    fn origin(fs: &crate::BranchFs, ino: u64, idx: u64) -> (bool, bool) {
        let fb = fs.files.lock().get(&ino).cloned().expect("a buffer");
        let g = fb.lock();
        let o = g.origins.get(&idx).expect("an origin");
        (o.unread, o.merge)
    }

    /// A write into a block that the file's buffer stored as patches reads
    /// nothing (its origin comes from what the buffer knows), and one into
    /// a block the patch writer stored whole reads no value either; reads
    /// before the next fsync, truncates and commits (another overlay: what
    /// the buffer knew no longer holds) all keep the file's bytes.
    #[test]
    fn writes_into_blocks_the_buffer_stored_read_no_value() {
        let (dir, store, fs) = fresh();
        let dot = DotName::new("app").unwrap();
        let bs = fs.block_size as usize;
        let mut expect = noise(4 * bs, 7);
        let ino = fs
            .mknod(ROOT_INO, b"f", FileKind::File, 0o644, 0, 0, 0)
            .unwrap()
            .ino;
        fs.open(ino).unwrap();
        let put = |fs: &crate::BranchFs, off: usize, data: &[u8], expect: &mut Vec<u8>| {
            fs.write(ino, off as u64, data).unwrap();
            expect[off..off + data.len()].copy_from_slice(data);
        };
        let check = |fs: &crate::BranchFs, expect: &[u8], what: &str| {
            assert!(
                fs.read(ino, 0, 1 << 20).unwrap() == expect,
                "{what}: whole file"
            );
            let part = fs.read(ino, (bs + 4000) as u64, 3000).unwrap();
            assert!(
                part == expect[bs + 4000..bs + 7000],
                "{what}: within a block"
            );
        };
        fs.write(ino, 0, &expect).unwrap();
        fs.fsync(ino, false).unwrap();
        for b in 0..4 {
            put(&fs, b * bs + 100, b"first", &mut expect);
        }
        fs.fsync(ino, false).unwrap();
        for b in 0..4 {
            put(&fs, b * bs + 5000, b"second", &mut expect);
            // The last CLEAN_BLOCKS have clean copies (whole, nothing to read).
            let unread = b < 4 - super::CLEAN_BLOCKS;
            assert_eq!(origin(&fs, ino, b as u64), (unread, true), "block {b}");
        }
        check(&fs, &expect, "patches not read, before the fsync");
        fs.fsync(ino, false).unwrap();
        check(&fs, &expect, "after the fsync");
        // The patch writer stores them whole; the buffer knows the chunks.
        assert_eq!(fs.materialize_patches().unwrap(), 4);
        put(&fs, bs + 9000, b"third", &mut expect);
        assert_eq!(origin(&fs, ino, 1), (false, false));
        check(&fs, &expect, "a chunk the patch writer stored");
        // A truncate within block 2 rewrites it: the buffer forgets.
        fs.fsync(ino, false).unwrap();
        put(&fs, 2 * bs + 20, b"fourth", &mut expect);
        fs.fsync(ino, false).unwrap();
        fs.setattr(
            ino,
            &crate::SetAttr {
                size: Some((2 * bs + 50) as u64),
                ..Default::default()
            },
        )
        .unwrap();
        expect.truncate(2 * bs + 50);
        put(&fs, 2 * bs + 10, b"fifth", &mut expect);
        assert_eq!(origin(&fs, ino, 2), (false, false), "read after a truncate");
        check(&fs, &expect, "after a truncate");
        // Block 0 patched and fsynced, then committed: the commit stores
        // it whole in another overlay, so a write must look it up again.
        put(&fs, 300, b"sixth", &mut expect);
        fs.fsync(ino, false).unwrap();
        let req = crate::CommitRequest {
            message: "c".into(),
            author: "t".into(),
            ..Default::default()
        };
        store.commit(&dot, "master", req).unwrap();
        put(&fs, 700, b"seventh", &mut expect);
        assert_eq!(
            origin(&fs, ino, 0),
            (false, false),
            "looked up after a commit"
        );
        fs.fsync(ino, false).unwrap();
        check(&fs, &expect, "after a commit");
        fs.release(ino).unwrap();
        drop(fs);
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        let fs = store.branch_fs(&dot, "master").unwrap();
        check(&fs, &expect, "reopened");
    }

    /// fsyncs of small writes into a block already stored as patches write
    /// only the new bytes (merge operands), not every patch again; the
    /// block reads back the same before and after a reopen (the log
    /// replayed) and after RocksDB flushed and compacted the operands.
    #[test]
    fn fsyncs_add_only_new_patches_to_a_patched_block() {
        let dir = tempfile::tempdir().unwrap();
        let dot = DotName::new("app").unwrap();
        let mut expect = noise(2 * 65536 + 300, 3);
        let ino;
        {
            let store = Store::open(dir.path()).unwrap();
            store.create_dot(&dot, None).unwrap();
            let fs = store.branch_fs(&dot, "master").unwrap();
            let bs = fs.block_size as usize;
            ino = fs
                .mknod(ROOT_INO, b"f", FileKind::File, 0o644, 0, 0, 0)
                .unwrap()
                .ino;
            fs.write(ino, 0, &expect).unwrap();
            fs.fsync(ino, false).unwrap();
            // 24 fsyncs of 300 bytes each in block 1, some overlapping
            // earlier ones, some growing the file within its last block.
            let before = fs.db.synced_bytes.load(Ordering::Relaxed);
            let mut written = 0;
            for i in 0..24usize {
                let off = bs + (i * 2477) % (bs - 300) + if i % 5 == 0 { 150 } else { 0 };
                let off = off.min(bs + bs - 300);
                let data = vec![i as u8 + 1; 300];
                fs.write(ino, off as u64, &data).unwrap();
                expect[off..off + 300].copy_from_slice(&data);
                fs.fsync(ino, false).unwrap();
                written += 300;
                let end = 2 * bs + 300 + i * 10;
                fs.write(ino, end as u64, b"0123456789").unwrap();
                if expect.len() < end + 10 {
                    expect.resize(end + 10, 0);
                }
                expect[end..end + 10].copy_from_slice(b"0123456789");
                fs.fsync(ino, false).unwrap();
                written += 10;
            }
            let synced = fs.db.synced_bytes.load(Ordering::Relaxed) - before;
            // Every patch written again at each fsync would be about
            // 24 * 12 * 300 = 86 KiB; only the new ones plus the inode
            // and keys are well under 2x the bytes written plus 300 per fsync.
            assert!(
                synced < 2 * written + 48 * 300,
                "fsyncs wrote {synced} bytes for {written} new"
            );
            assert!(
                fs.read(ino, 0, 4 * bs as u32).unwrap() == expect,
                "read back before a reopen"
            );
        }
        // Reopened: the log replays the operands.
        let store = Store::open(dir.path()).unwrap();
        let fs = store.branch_fs(&dot, "master").unwrap();
        assert!(
            fs.read(ino, 0, 1 << 20).unwrap() == expect,
            "after a reopen"
        );
        // Flushed to a table and compacted: the operands merged for good.
        let db = &fs.db.db;
        let cf = fs.db.cf(crate::db::CF_WORK);
        db.flush_cf(cf).unwrap();
        db.compact_range_cf(cf, None::<&[u8]>, None::<&[u8]>);
        assert!(
            fs.read(ino, 0, 1 << 20).unwrap() == expect,
            "after a compaction"
        );
        assert!(store.fsck().unwrap().is_clean());
    }

    #[test]
    fn whole_block_reads_bypass_the_chunk_cache_and_partial_ones_fill_it() {
        let (_dir, _store, fs) = fresh();
        let bs = fs.block_size as usize;
        let data = noise(3 * bs + 100, 9);
        let ino = fs
            .mknod(ROOT_INO, b"f", FileKind::File, 0o644, 0, 0, 0)
            .unwrap()
            .ino;
        fs.write(ino, 0, &data).unwrap();
        fs.flush(ino).unwrap();
        fs.release(ino).unwrap();
        fs.db.clear_chunk_cache();
        // Whole blocks (what the kernel's readahead asks for): the bytes,
        // and nothing kept.
        let all = fs.read(ino, 0, (2 * bs) as u32).unwrap();
        assert_eq!(all, data[..2 * bs]);
        assert_eq!(fs.db.cached_chunks(), 0, "whole blocks are not cached");
        // Part of a block: cached (the next small read of it needs no disk).
        let part = fs.read(ino, (bs + 8192) as u64, 8192).unwrap();
        assert_eq!(part, data[bs + 8192..bs + 16384]);
        assert_eq!(fs.db.cached_chunks(), 1);
        let tail = fs.read(ino, (3 * bs) as u64, bs as u32).unwrap();
        assert_eq!(tail, data[3 * bs..]);
        // A cached block read whole again comes from the cache, unchanged.
        assert_eq!(
            fs.read(ino, bs as u64, bs as u32).unwrap(),
            data[bs..2 * bs]
        );
    }
}
