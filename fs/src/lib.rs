//! dm-fs: the FUSE adapter of dm.
//!
//! Translates kernel FUSE requests into calls on a [`dm_store::BranchFs`]
//! (the working state of one branch of a dot). The adapter is thin: it maps
//! inode numbers (the FUSE root is the mounted subdot's directory; a number a
//! switch left the kernel holding for another file is dead, and that file
//! gets an alias: see `Ids`), converts
//! attributes and errors, and keeps just enough bookkeeping (which inodes and
//! directory entries the kernel has cached) to invalidate the kernel's caches
//! when the mount is switched to another branch or the branch is reset.
//!
//! We are the only writer of a mounted branch, so attribute and entry TTLs are
//! long, absent names are cached too (negative entries), and
//! [`Mount::switch`] invalidates everything the kernel knows; other mounts of
//! the same branch are told of each change (`peers`). While requests keep
//! coming, one request loop polls the device instead of sleeping (`spin`).

use std::collections::{HashMap, HashSet};
use std::ffi::{CString, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dm_store::{Attr, BranchFs, DirEntry, FileKind, SetAttr, TimeSet, Timestamp};
use fuser::{
    AccessFlags, BackgroundSession, BsdFileFlags, Config, Errno, FileAttr, FileHandle, FileType,
    FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, MountOption, Notifier,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, SessionACL, TimeOrNow,
    WriteFlags,
};
use parking_lot::{Mutex, RwLock};
use tracing::{debug, warn};

mod peers;
mod spin;
use peers::Change;

/// How long the kernel may cache attributes and directory entries. We are
/// the only writer of a mount and invalidate explicitly on [`Mount::switch`].
const TTL: Duration = Duration::from_secs(24 * 3600);

/// Largest write the kernel sends in one request (needs max_pages, Linux >= 4.20).
const MAX_WRITE: u32 = 1024 * 1024;

/// Default for the kernel writeback cache (see [`writeback_wanted`]).
const WRITEBACK_DEFAULT: bool = false;

/// Default of [`MountOptions::spin`], chosen by measurement (README).
const SPIN_DEFAULT: bool = true;

/// Longest file name (bytes), as statfs reports it.
const NAME_MAX: usize = 255;

/// The subdot name that mounts the whole dot tree.
pub const ROOT_SUBDOT: &str = "__root__";

/// Options for [`Mount::mount`].
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Let every user (not only the mounting one) use the mount, with the
    /// kernel enforcing permissions (`default_permissions`). Other users
    /// than root need `user_allow_other` in /etc/fuse.conf for it.
    pub allow_other: bool,
    /// Number of request loops (threads), each with its own `/dev/fuse` fd.
    pub n_threads: usize,
    /// The source name shown in `/proc/mounts`.
    pub fsname: String,
    /// Poll `/dev/fuse` without blocking while requests keep coming (see
    /// the `spin` module): fewer wakeups per request, a CPU busy meanwhile.
    pub spin: bool,
    /// Who the files are shown as belonging to, whatever their stored
    /// owner (`None`: as stored). A server run by a user other than root
    /// shows that user as every file's owner, and a file's group as stored
    /// only when the user is in it, else the user's group: a dot cloned
    /// from elsewhere keeps other uids (root's, a colleague's), which
    /// would put its files out of this user's reach (as tar does for a
    /// user extracting an archive of root's files). The stored owners stay
    /// for commits and pushes.
    pub owner: Option<Owner>,
}

/// The owner shown by a mount of a server run by a user other than root
/// (see [`MountOptions::owner`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    /// The user's uid.
    pub uid: u32,
    /// The user's group.
    pub gid: u32,
    /// The groups the user is in (shown as stored).
    pub groups: Vec<u32>,
}

impl Owner {
    /// The calling process's user, group and supplementary groups.
    pub fn this_process() -> Owner {
        // SAFETY: geteuid/getegid have no preconditions and cannot fail.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let groups = nix::unistd::getgroups()
            .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
            .unwrap_or_default();
        Owner { uid, gid, groups }
    }

    fn shown(&self, gid: u32) -> (u32, u32) {
        if gid == self.gid || self.groups.contains(&gid) {
            (self.uid, gid)
        } else {
            (self.uid, self.gid)
        }
    }
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            allow_other: is_root() || fuse_conf_allows_other() || {
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| {
                    warn!(
                        "mounts are this user's alone (root and containers get EACCES): \
                         /etc/fuse.conf has no `user_allow_other` line, which lets them be shared"
                    )
                });
                false
            },
            // `DM_FUSE_THREADS` overrides it, for measuring.
            n_threads: std::env::var("DM_FUSE_THREADS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(2),
            fsname: "dm".to_string(),
            // `DM_FUSE_SPIN=0|1` overrides it, for measuring.
            spin: match std::env::var("DM_FUSE_SPIN").as_deref() {
                Ok("0") => false,
                Ok("1") => true,
                _ => SPIN_DEFAULT,
            },
            owner: (!is_root()).then(Owner::this_process),
        }
    }
}

/// The branch a mount currently shows, and the store inode of its root.
struct View {
    fs: Arc<BranchFs>,
    /// Store inode number of the mounted subdot's directory (FUSE inode 1).
    root: u64,
    /// The mount's dead node ids and aliases (kept across switches).
    ids: Arc<Ids>,
}

/// First node id given as an alias. Store inode numbers stay far below
/// (each branch counts up from 2), and aliases below 2^53, which
/// JavaScript (Node's `fs.stat`) reads exactly: from 2^63, every alias
/// read as the same number.
const ALIAS_BASE: u64 = 1 << 52;

/// Node ids that a checkout or reset made name nothing, and the node ids
/// given instead to the files of the new state that have their numbers.
///
/// The kernel keeps one inode per node id, found again by the number a
/// lookup answers. Each branch numbers its new files on its own, and a
/// reset brings back files deleted while open under their old numbers, so
/// after a switch a number the kernel still holds (a shell's working
/// directory, a descriptor) may belong to another file: a shell left in a
/// directory of one branch created its files in the other branch's
/// directory of that number, and `fchmod` through a descriptor of a
/// discarded file changed the file brought back. Such node ids are dead:
/// every request on one fails with ESTALE until the kernel forgets it, and
/// the new state's file of that number gets an alias (from [`ALIAS_BASE`]
/// up), a node id of its own (and so another `st_ino`, as the kernel
/// shows the node id).
///
/// [`Mount::switch`] kills at once the node ids it knows to be stale (a
/// file the reset discarded, a directory removed through this mount, a
/// number the new root of a subdot takes); the others it holds are
/// suspects, checked at their first use (one store read): alive while the
/// new state's inode of that number has the kind and birth time the kernel
/// was given. Checking them all at the switch took a store read per inode
/// the kernel knew, and doubled the time of a checkout with 150,000 files
/// known.
#[derive(Default)]
struct Ids {
    /// Whether `maps` holds anything: until a switch, ids map without
    /// taking the lock.
    any: std::sync::atomic::AtomicBool,
    maps: Mutex<IdMaps>,
}

/// A file's identity, as the kernel was given it: its kind and birth time.
type Born = (FileType, SystemTime);

#[derive(Default)]
struct IdMaps {
    /// Node ids the kernel holds that name nothing any more.
    dead: HashSet<u64>,
    /// Node ids to check at their first use since a switch, with the
    /// identity the kernel knows them by.
    suspects: HashMap<u64, Born>,
    /// Store inode -> its alias, and back.
    aliases: HashMap<u64, u64>,
    stores: HashMap<u64, u64>,
    next: u64,
}

impl IdMaps {
    fn is_empty(&self) -> bool {
        self.dead.is_empty() && self.stores.is_empty() && self.suspects.is_empty()
    }

    /// Node id `f`, the kernel's for store inode `s`, names nothing now.
    fn kill(&mut self, f: u64, s: u64) {
        self.suspects.remove(&f);
        self.dead.insert(f);
        if self.stores.remove(&f).is_some() {
            self.aliases.remove(&s);
        }
    }
}

impl Ids {
    fn maps(&self) -> Option<parking_lot::MutexGuard<'_, IdMaps>> {
        use std::sync::atomic::Ordering;
        self.any.load(Ordering::Acquire).then(|| self.maps.lock())
    }

    /// Records the maps' emptiness for the lock-free path (call with the
    /// lock held, after a change).
    fn settle(&self, maps: &IdMaps) {
        self.any
            .store(!maps.is_empty(), std::sync::atomic::Ordering::Release);
    }

    /// The kernel forgot node id `f`: it names nothing from now on.
    fn forget(&self, f: u64, still_known: impl Fn(u64) -> bool) {
        let Some(mut m) = self.maps() else { return };
        m.suspects.remove(&f);
        if m.dead.remove(&f) {
            // The alias of the file that has this number now is not
            // needed once the kernel holds neither.
            if let Some(a) = m.aliases.get(&f).copied() {
                if !still_known(a) {
                    m.aliases.remove(&f);
                    m.stores.remove(&a);
                }
            }
        }
        if let Some(s) = m.stores.remove(&f) {
            m.aliases.remove(&s);
        }
        shrink_set(&mut m.dead);
        shrink_map(&mut m.suspects);
        shrink_map(&mut m.aliases);
        shrink_map(&mut m.stores);
        self.settle(&m);
    }
}

impl View {
    /// The root swap: FUSE inode 1 is the mounted subdot's directory, and
    /// that directory's number is the store's root (its own inverse).
    fn swap(&self, ino: u64) -> u64 {
        if ino == fuser::INodeNo::ROOT.0 {
            self.root
        } else if ino == self.root {
            dm_store::ROOT_INO
        } else {
            ino
        }
    }

    /// Whether store inode `s` (its attributes `attr`, read when None) is
    /// the file known as `born`, with a link: a directory the new state
    /// has as removed (through a mount of it) is dead, as a reset makes
    /// one dead.
    fn is(&self, s: u64, born: Born, attr: Option<&Attr>) -> bool {
        let same = |a: &Attr| {
            file_type(a.kind) == born.0 && to_system_time(a.crtime) == born.1 && a.nlink > 0
        };
        match attr {
            Some(a) => same(a),
            None => self.fs.getattr(s).is_ok_and(|a| same(&a)),
        }
    }

    /// FUSE inode -> store inode; ESTALE for a node id that names nothing
    /// since a switch (see [`Ids`]).
    fn to_store(&self, ino: INodeNo) -> Result<u64, Errno> {
        let f = ino.0;
        let Some(mut m) = self.ids.maps() else {
            return Ok(self.swap(f));
        };
        let s = match m.stores.get(&f) {
            Some(s) => *s,
            None if m.dead.contains(&f) => return Err(Errno::ESTALE),
            None => self.swap(f),
        };
        if let Some(born) = m.suspects.remove(&f) {
            let alive = self.is(s, born, None);
            if !alive {
                m.kill(f, s);
            }
            self.ids.settle(&m);
            if !alive {
                return Err(Errno::ESTALE);
            }
        }
        Ok(s)
    }

    /// Store inode -> FUSE inode: its alias where the kernel holds its
    /// number dead (one is made then). `attr`: the inode's attributes, if
    /// at hand (a suspect is checked against them).
    fn to_fuse_of(&self, ino: u64, attr: Option<&Attr>) -> INodeNo {
        let f = self.swap(ino);
        let Some(mut m) = self.ids.maps() else {
            return INodeNo(f);
        };
        let mut id = m.aliases.get(&ino).copied().unwrap_or(f);
        if let Some(born) = m.suspects.remove(&id) {
            if !self.is(ino, born, attr) {
                m.kill(id, ino);
                id = f;
            }
        }
        if m.dead.contains(&id) {
            id = ALIAS_BASE + m.next;
            m.next += 1;
            m.aliases.insert(ino, id);
            m.stores.insert(id, ino);
        }
        self.ids.settle(&m);
        INodeNo(id)
    }

    /// [`Self::to_fuse_of`] without the attributes at hand.
    fn to_fuse(&self, ino: u64) -> INodeNo {
        self.to_fuse_of(ino, None)
    }

    fn attr(&self, a: &Attr) -> FileAttr {
        FileAttr {
            ino: self.to_fuse_of(a.ino, Some(a)),
            size: a.size,
            blocks: a.blocks,
            atime: to_system_time(a.atime),
            mtime: to_system_time(a.mtime),
            ctime: to_system_time(a.ctime),
            crtime: to_system_time(a.crtime),
            kind: file_type(a.kind),
            perm: a.perm,
            nlink: a.nlink,
            uid: a.uid,
            gid: a.gid,
            rdev: a.rdev,
            blksize: a.blksize,
            flags: 0,
        }
    }
}

/// What the kernel has cached: lookup counts per FUSE inode and the names
/// (parent FUSE inode, name) under which it knows each inode.
#[derive(Default)]
struct Known {
    lookups: HashMap<u64, u64>,
    /// Files (not directories) the kernel knows, with the branch and store
    /// inode it got them from ([`BranchFs::hold`]), to let go of at its
    /// forget or at the unmount (the branch may have switched meanwhile).
    held: HashMap<u64, (Arc<BranchFs>, u64)>,
    names: HashMap<u64, Vec<(u64, Vec<u8>)>>,
    /// Names the kernel caches as absent (negative entries), by parent, so
    /// that [`Mount::switch`] can drop them with the rest. At most
    /// [`NEGATIVE_MAX`] in all (`n_negatives`); past that, absent names are
    /// answered without a cache time. A parent's set goes when the kernel
    /// forgets the parent (its dentries went first).
    negatives: HashMap<u64, HashSet<Vec<u8>>>,
    n_negatives: usize,
    /// Inodes the kernel got as directories: their entries outlive a
    /// switch that leaves them where they were (see [`Mount::switch`]).
    dirs: HashSet<u64>,
    /// Directories removed through this mount (rmdir, or replaced by a
    /// rename) while the kernel knew them. The kernel keeps such an inode
    /// dead (it lists nothing and creates nothing in it) for as long as
    /// something holds it: a file in it open, a working directory.
    removed_dirs: HashSet<u64>,
    /// The kind and birth time of each node id given, to tell at a switch
    /// whether the new state's inode of its number is the same file (see
    /// [`Ids`]).
    born: HashMap<u64, Born>,
}

impl Known {
    /// Records `name` in `parent` as a name of `ino` (once), and drops a
    /// negative entry recorded for it.
    fn add_name(&mut self, parent: u64, name: &[u8], ino: u64) {
        self.drop_negative(parent, name);
        let names = self.names.entry(ino).or_default();
        if !names.iter().any(|(p, n)| *p == parent && n == name) {
            names.push((parent, name.to_vec()));
        }
    }

    /// Gives back the room of the maps once the kernel forgot most of what
    /// they held (a map keeps its largest size: a mount whose kernel once
    /// knew a million files kept about 200 MiB for them).
    fn shrink(&mut self) {
        shrink_map(&mut self.lookups);
        shrink_map(&mut self.held);
        shrink_map(&mut self.names);
        shrink_set(&mut self.dirs);
        shrink_map(&mut self.born);
    }

    /// Drops the record of a negative entry (the name now exists).
    fn drop_negative(&mut self, parent: u64, name: &[u8]) {
        if self.n_negatives == 0 {
            return;
        }
        if let Some(names) = self.negatives.get_mut(&parent) {
            if names.remove(name) {
                self.n_negatives -= 1;
                if names.is_empty() {
                    self.negatives.remove(&parent);
                }
            }
        }
    }
}

/// Most negative entries a mount lets the kernel cache (about 5 MiB of
/// names).
const NEGATIVE_MAX: usize = 1 << 16;

/// Maps of [`Known`] at most this large keep their room (shrinking costs a
/// copy; small ones cost little).
const SHRINK_FLOOR: usize = 4096;

/// Shrinks a map using a quarter or less of its room to twice its length
/// (see [`Known::shrink`]).
fn shrink_map<K: std::hash::Hash + Eq, V>(m: &mut HashMap<K, V>) {
    if m.capacity() > SHRINK_FLOOR && m.len() * 4 < m.capacity() {
        m.shrink_to(m.len() * 2);
    }
}

/// [`shrink_map`] for a set.
fn shrink_set<K: std::hash::Hash + Eq>(m: &mut HashSet<K>) {
    if m.capacity() > SHRINK_FLOOR && m.len() * 4 < m.capacity() {
        m.shrink_to(m.len() * 2);
    }
}

/// State shared between the FUSE request loops and the [`Mount`] handle.
struct Shared {
    view: RwLock<View>,
    /// The views' dead node ids and aliases (see [`Ids`]); taken after
    /// `known` where both are.
    ids: Arc<Ids>,
    /// Ask for the kernel writeback cache in init (dirty pages then live in
    /// the kernel until written back; see [`Mount::sync`]).
    writeback: bool,
    subdot: String,
    known: Mutex<Known>,
    /// Store inodes known to have no `security.capability` xattr. The kernel
    /// asks for it before every write(2) (to drop file capabilities), so we
    /// answer from memory; we are the only writer of the xattrs.
    no_caps: Mutex<NoCaps>,
    /// Open files: FUSE file handle -> the branch and store inode it was
    /// opened on. I/O and release on a handle go to that branch even after
    /// switch(), so open counts (unlinked-but-open files) stay balanced.
    handles: RwLock<HashMap<u64, Handle>>,
    /// Directories open through this mount (opendir without releasedir):
    /// a use an unprivileged server's busy check must see.
    open_dirs: std::sync::atomic::AtomicUsize,
    next_fh: std::sync::atomic::AtomicU64,
    /// Set once the session exists; used by other mounts of the same branch
    /// to invalidate this mount's kernel caches (see `peers`).
    notifier: std::sync::OnceLock<Notifier>,
    /// Adaptive polling of the device, when on (see `spin`).
    spin: std::sync::OnceLock<Arc<spin::Spin>>,
    /// [`MountOptions::owner`].
    owner: Option<Owner>,
}

/// An open file handle: the branch and store inode it was opened on, and
/// the branch's count of resets at the open (see [`BranchFs::is_revoked`]).
type Handle = (Arc<BranchFs>, u64, u64);

/// Negative cache for `security.capability` (see [`Shared::no_caps`]).
#[derive(Default)]
struct NoCaps {
    inos: HashSet<u64>,
    /// Bumped by every change of a `security.capability` xattr, so that a
    /// lookup that raced with a change does not cache a stale answer.
    generation: u64,
}

const XATTR_CAPS: &[u8] = b"security.capability";

/// The namespaces of xattr names Linux knows.
const XATTR_NAMESPACES: [&str; 4] = ["user.", "trusted.", "security.", "system."];

/// The errno for an xattr name dm does not take, as ext4 answers it: a
/// name outside [`XATTR_NAMESPACES`] (FUSE passes any name through; `foo`
/// was stored and listed) or an ACL's, EOPNOTSUPP; a namespace alone
/// (`user.`), EINVAL.
fn bad_xattr_name(name: &OsStr) -> Option<Errno> {
    let b = name.as_bytes();
    match XATTR_NAMESPACES
        .iter()
        .find(|ns| b.starts_with(ns.as_bytes()))
    {
        None => Some(Errno::EOPNOTSUPP),
        _ if is_acl(name) => Some(Errno::EOPNOTSUPP),
        Some(ns) if b.len() == ns.len() => Some(Errno::EINVAL),
        Some(_) => None,
    }
}

/// POSIX ACLs are not supported, as on a filesystem mounted `noacl`: their
/// xattrs are refused with EOPNOTSUPP. Stored as plain values they took no
/// effect, and `cp -p`, `cp -a` and `mv`, which set the access ACL instead
/// of calling chmod when that works, left every copied file mode 600.
fn is_acl(name: &OsStr) -> bool {
    matches!(
        name.as_bytes(),
        b"system.posix_acl_access" | b"system.posix_acl_default"
    )
}

impl Shared {
    /// Records that the kernel got an entry for `attr` under `(parent, name)`
    /// from `view` (an inode of the store, by [`View::to_fuse`]).
    fn remember(&self, view: &View, parent: INodeNo, name: &[u8], attr: &FileAttr) {
        let ino = attr.ino;
        let mut known = self.known.lock();
        let count = known.lookups.entry(ino.0).or_insert(0);
        *count += 1;
        if *count == 1 {
            known.born.insert(ino.0, (attr.kind, attr.crtime));
            if attr.kind != FileType::Directory {
                // Given by to_fuse under the view held: it names a file.
                if let Ok(sino) = view.to_store(ino) {
                    view.fs.hold(sino);
                    known.held.insert(ino.0, (view.fs.clone(), sino));
                }
            }
        }
        known.add_name(parent.0, name, ino.0);
        if attr.kind == FileType::Directory {
            known.dirs.insert(ino.0);
        }
    }

    /// Records that directory `ino` was removed through this mount (see
    /// [`Known::removed_dirs`]).
    fn removed_dir(&self, ino: INodeNo) {
        let mut known = self.known.lock();
        if known.lookups.contains_key(&ino.0) {
            known.removed_dirs.insert(ino.0);
        }
    }

    /// Records a name for `ino` without a lookup count (rename: the kernel
    /// moves its dentry without a new lookup).
    fn remember_name(&self, parent: INodeNo, name: &[u8], ino: INodeNo) {
        self.known.lock().add_name(parent.0, name, ino.0);
    }

    /// Records that the kernel is about to cache `name` in `parent` as
    /// absent; false when the record is full (then answer without caching).
    fn remember_negative(&self, parent: INodeNo, name: &[u8]) -> bool {
        let mut known = self.known.lock();
        if known.n_negatives >= NEGATIVE_MAX {
            return false;
        }
        if known
            .negatives
            .entry(parent.0)
            .or_default()
            .insert(name.to_vec())
        {
            known.n_negatives += 1;
        }
        true
    }

    fn forget(&self, ino: INodeNo, n: u64) {
        let mut known = self.known.lock();
        let gone = match known.lookups.get_mut(&ino.0) {
            Some(count) => {
                *count = count.saturating_sub(n);
                *count == 0
            }
            None => false,
        };
        let mut held = None;
        if gone {
            known.lookups.remove(&ino.0);
            known.names.remove(&ino.0);
            known.dirs.remove(&ino.0);
            known.removed_dirs.remove(&ino.0);
            known.born.remove(&ino.0);
            self.ids.forget(ino.0, |a| known.lookups.contains_key(&a));
            if let Some(names) = known.negatives.remove(&ino.0) {
                known.n_negatives -= names.len();
            }
            held = known.held.remove(&ino.0);
            known.shrink();
        }
        drop(known);
        if let Some((fs, sino)) = held {
            // Only files are written, and the next write looks the file
            // up again (the set kept every file ever written).
            let mut nc = self.no_caps.lock();
            nc.inos.remove(&sino);
            shrink_set(&mut nc.inos);
            drop(nc);
            if let Err(e) = fs.unhold(sino) {
                debug!("forget({}): {e}", ino.0);
            }
        }
    }

    /// Lets go of every file the kernel knew (the mount is gone).
    fn unhold_all(&self) {
        let held = std::mem::take(&mut self.known.lock().held);
        for (fs, sino) in held.into_values() {
            if let Err(e) = fs.unhold(sino) {
                debug!("unmount: letting go of {sino}: {e}");
            }
        }
    }
}

/// An open file, for one request on its handle (see [`DmFs::open_file`]).
struct OpenFile<'a> {
    _view: parking_lot::RwLockReadGuard<'a, View>,
    /// A reset of the branch waits for the request (see [`BranchFs::io_guard`]).
    _io: dm_store::IoGuard,
    fs: Arc<BranchFs>,
    ino: u64,
}

/// The store inode of FUSE node `$ino` in `$view`; replies ESTALE (and
/// returns) for a node id a switch made dead (see [`Ids`]).
macro_rules! store_ino {
    ($view:expr, $ino:expr, $reply:expr) => {
        match $view.to_store($ino) {
            Ok(ino) => ino,
            Err(e) => return $reply.error(e),
        }
    };
}

/// A mount's requests held off (see [`Mount::freeze`]).
pub struct Frozen<'a>(parking_lot::RwLockWriteGuard<'a, View>);

/// The `fuser::Filesystem` implementation: a thin translation layer.
struct DmFs {
    shared: Arc<Shared>,
}

/// Whether to ask for the kernel writeback cache (FUSE_WRITEBACK_CACHE).
/// Default chosen by measurement (see docs in field-notes); the environment
/// variable `DM_FUSE_WRITEBACK=0|1` overrides it for experiments.
fn writeback_wanted() -> bool {
    match std::env::var("DM_FUSE_WRITEBACK").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => WRITEBACK_DEFAULT,
    }
}

/// Readahead of a mount, in KiB. The kernel gives a FUSE mount's backing
/// device 128 KiB whatever init's max_readahead says (that is only an upper
/// bound), so a sequential reader sent READs of 128 KiB, one or two at a
/// time. 1 MiB (max_readahead, and the largest READ) measured 691 MiB/s
/// against 418 (median of 9 cold reads of 512 MiB each); 4 MiB 617.
/// `DM_FUSE_READ_AHEAD_KB` overrides it, for measuring.
const READ_AHEAD_KB: u32 = MAX_WRITE / 1024;

fn read_ahead_kb() -> u32 {
    std::env::var("DM_FUSE_READ_AHEAD_KB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(READ_AHEAD_KB)
}

/// Sets the readahead of the mount at `path` (its backing device's
/// `read_ahead_kb` in sysfs; only root may write it). Stats the mount, so
/// its request loop must be running.
fn set_read_ahead(path: &Path, kb: u32) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path)?.dev();
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    std::fs::write(
        format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb"),
        kb.to_string(),
    )
}

/// Whether to offer readdirplus (default on; `DM_FUSE_READDIRPLUS=0` turns
/// it off, for measuring).
fn readdirplus_wanted() -> bool {
    !matches!(std::env::var("DM_FUSE_READDIRPLUS").as_deref(), Ok("0"))
}

/// The attributes sent with a negative entry (node id 0: "no such name");
/// the kernel reads only the node id and the entry's cache time.
fn negative_attr() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 0,
        flags: 0,
    }
}

fn errno(e: &dm_store::Error) -> Errno {
    Errno::from_i32(e.errno())
}

fn to_system_time(t: Timestamp) -> SystemTime {
    if t.secs >= 0 {
        UNIX_EPOCH + Duration::new(t.secs.unsigned_abs(), t.nanos.min(999_999_999))
    } else {
        // secs < 0: the instant is secs + nanos/1e9 before... i.e. -|secs| + nanos.
        let before = Duration::from_secs(t.secs.unsigned_abs());
        let after = Duration::from_nanos(u64::from(t.nanos.min(999_999_999)));
        UNIX_EPOCH
            .checked_sub(before)
            .and_then(|x| x.checked_add(after))
            .unwrap_or(UNIX_EPOCH)
    }
}

fn to_timestamp(t: SystemTime) -> Timestamp {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timestamp {
            secs: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            nanos: d.subsec_nanos(),
        },
        Err(e) => {
            // Before 1970: floor to whole seconds plus positive nanos.
            let d = e.duration();
            let mut secs = -i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            let mut nanos = d.subsec_nanos();
            if nanos > 0 {
                secs -= 1;
                nanos = 1_000_000_000 - nanos;
            }
            Timestamp { secs, nanos }
        }
    }
}

/// A time the kernel set (utimensat), as fuser 0.18 hands it over: the
/// kernel's (secs, nsecs) before 1970 mean secs + nsecs/1e9 (secs < 0,
/// nsecs >= 0), but fuser made them `UNIX_EPOCH - (|secs| + nsecs)`, so
/// `touch -d @-0.5` was stored as -1.5 s. Undone here.
fn from_kernel(t: SystemTime) -> Timestamp {
    match UNIX_EPOCH.duration_since(t) {
        Ok(d) if t < UNIX_EPOCH => Timestamp {
            secs: -i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            nanos: d.subsec_nanos(),
        },
        _ => to_timestamp(t),
    }
}

fn time_set(t: TimeOrNow) -> TimeSet {
    match t {
        TimeOrNow::Now => TimeSet::Now,
        TimeOrNow::SpecificTime(t) => TimeSet::At(from_kernel(t)),
    }
}

fn file_type(k: FileKind) -> FileType {
    match k {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::CharDev => FileType::CharDevice,
        FileKind::BlockDev => FileType::BlockDevice,
        FileKind::Socket => FileType::Socket,
    }
}

fn kind_of_mode(mode: u32) -> Option<FileKind> {
    match mode & libc::S_IFMT {
        libc::S_IFREG | 0 => Some(FileKind::File),
        libc::S_IFDIR => Some(FileKind::Dir),
        libc::S_IFLNK => Some(FileKind::Symlink),
        libc::S_IFIFO => Some(FileKind::Fifo),
        libc::S_IFCHR => Some(FileKind::CharDev),
        libc::S_IFBLK => Some(FileKind::BlockDev),
        libc::S_IFSOCK => Some(FileKind::Socket),
        _ => None,
    }
}

impl DmFs {
    /// Tells the other mounts of `fs`'s branch what a change made stale.
    /// `changes` is only evaluated when there are such mounts.
    fn tell_peers(&self, fs: &Arc<BranchFs>, changes: impl FnOnce() -> Vec<Change>) {
        peers::publish(fs, &self.shared, changes);
    }

    /// unlink, or rmdir when `dir`: removes `name` from `parent`, then
    /// tells the other mounts of the branch.
    fn remove(&self, parent: INodeNo, name: &OsStr, reply: ReplyEmpty, dir: bool) {
        let view = self.view();
        let p = store_ino!(view, parent, reply);
        // Other mounts may cache the inode under another name (hard links);
        // a removed directory is dead to the kernel.
        let child = (peers::active() || dir)
            .then(|| view.fs.lookup(p, name.as_bytes()).ok())
            .flatten();
        let removed = match dir {
            true => view.fs.rmdir(p, name.as_bytes()),
            false => view.fs.unlink(p, name.as_bytes()),
        };
        match removed {
            Ok(()) => {
                if let Some(a) = child.as_ref().filter(|a| a.kind == FileKind::Dir) {
                    self.shared.removed_dir(view.to_fuse(a.ino));
                }
                self.tell_peers(&view.fs, || {
                    let mut c = vec![
                        Change::Entry {
                            parent: p,
                            name: name.as_bytes().to_vec(),
                        },
                        Change::Attr(p),
                    ];
                    c.extend(child.map(|a| Change::Attr(a.ino)));
                    c
                });
                reply.ok();
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// `ino`'s `security.capability`, None when it has none: from the
    /// negative cache, which a read that finds none fills (unless a change
    /// raced it).
    fn caps(&self, fs: &BranchFs, ino: u64) -> dm_store::Result<Option<Vec<u8>>> {
        let generation = {
            let nc = self.shared.no_caps.lock();
            if nc.inos.contains(&ino) {
                return Ok(None);
            }
            nc.generation
        };
        match fs.getxattr(ino, XATTR_CAPS) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.errno() == libc::ENODATA => {
                let mut nc = self.shared.no_caps.lock();
                if nc.generation == generation {
                    nc.inos.insert(ino);
                }
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Removes xattr `name` of `ino`, keeping the capability cache right,
    /// and tells the other mounts.
    fn remove_xattr(&self, fs: &Arc<BranchFs>, ino: u64, name: &OsStr) -> dm_store::Result<()> {
        let caps = name.as_bytes() == XATTR_CAPS;
        if caps {
            self.caps_changed(ino);
        }
        let res = fs.removexattr(ino, name.as_bytes());
        // Again after the change: a getxattr that read the old value
        // after the first bump must not cache it.
        if caps {
            self.caps_changed(ino);
        }
        res?;
        self.tell_peers(fs, || xattr_changes(ino, name));
        Ok(())
    }

    /// Removes `ino`'s `security.capability` xattr, as a write must.
    fn drop_caps(&self, fs: &Arc<BranchFs>, ino: u64) -> dm_store::Result<()> {
        if self.caps(fs, ino)?.is_none() {
            return Ok(());
        }
        match self.remove_xattr(fs, ino, OsStr::from_bytes(XATTR_CAPS)) {
            // Removed meanwhile by another writer.
            Err(e) if e.errno() == libc::ENODATA => Ok(()),
            r => r,
        }
    }

    /// Forgets that `ino` has no `security.capability` xattr, and makes
    /// lookups of it in flight not record that it has none.
    fn caps_changed(&self, ino: u64) {
        let mut nc = self.shared.no_caps.lock();
        nc.generation += 1;
        nc.inos.remove(&ino);
    }

    /// Counts a request for the adaptive polling of the device.
    fn tick(&self) {
        if let Some(s) = self.shared.spin.get() {
            s.tick();
        }
    }

    /// The branch shown, for a request (counted, see [`DmFs::tick`]).
    fn view(&self) -> parking_lot::RwLockReadGuard<'_, View> {
        self.tick();
        self.shared.view.read()
    }

    /// How the kernel is to use a file opened with `flags`. KEEP_CACHE: we
    /// are the only writer; switch() and peers drop stale pages.
    /// `O_APPEND` opens bypass the page cache (DIRECT_IO): a page-cache
    /// write that leaves a partly written page behind ends its request
    /// there, so a record crossing a page boundary reached us as two
    /// appends, and an appender on another mount of the branch could land
    /// between them. Direct, each write(2) is one request (up to
    /// `MAX_WRITE`, less a page when the buffer is not page-aligned: the
    /// kernel sends at most `MAX_WRITE` / 4 KiB pages), appended whole (see
    /// `write`).
    ///
    /// NOFLUSH unless the file is open for writing while a branch has
    /// several mounts (see `flush`).
    fn open_flags(&self, flags: i32) -> FopenFlags {
        let mut f = FopenFlags::FOPEN_KEEP_CACHE;
        let writes = flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
        if !writes || !peers::active() {
            f |= FopenFlags::FOPEN_NOFLUSH;
        }
        if flags & libc::O_APPEND != 0 && !self.shared.writeback {
            f |= FopenFlags::FOPEN_DIRECT_IO;
        }
        f
    }

    /// Registers an open file and returns its handle.
    fn new_handle(&self, fs: Arc<BranchFs>, ino: u64, opened_at: u64) -> FileHandle {
        let fh = self
            .shared
            .next_fh
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.shared.handles.write().insert(fh, (fs, ino, opened_at));
        FileHandle(fh)
    }

    /// Whether `fh` is a handle of a file that a reset of its branch
    /// discarded since it was opened (ESTALE for good, even once a file of
    /// the same number is back).
    fn revoked(&self, fh: FileHandle) -> bool {
        self.shared
            .handles
            .read()
            .get(&fh.0)
            .is_some_and(|(fs, ino, at)| fs.is_revoked(*ino, *at))
    }

    /// The branch and store inode of an open file handle, whichever branch
    /// the mount shows now (for release and fsync). Unknown handles (not
    /// issued by us) fall back to the current branch.
    fn handle(&self, fh: FileHandle, ino: INodeNo) -> Result<(Arc<BranchFs>, u64), Errno> {
        self.handle_in(&self.view(), fh, ino)
    }

    /// [`Self::handle`] with the view already held.
    fn handle_in(
        &self,
        view: &View,
        fh: FileHandle,
        ino: INodeNo,
    ) -> Result<(Arc<BranchFs>, u64), Errno> {
        match self.shared.handles.read().get(&fh.0) {
            Some((fs, ino, _)) => Ok((fs.clone(), *ino)),
            None => Ok((view.fs.clone(), view.to_store(ino)?)),
        }
    }

    /// The open file of a handle for a read or a write, with the view held
    /// so that a switch waits for the request to finish. EIO when the file
    /// was opened on a branch the mount no longer shows (a checkout since):
    /// the kernel keeps one inode per number, so its reads would fill the
    /// page cache of the new branch's file of the same number, and its
    /// writes would land where no path of the mount shows them. (A reset
    /// keeps the branch: the store revokes the handles of the files it
    /// discards, also where it gives their numbers to other files: ESTALE.)
    fn open_file(&self, fh: FileHandle, ino: INodeNo) -> Result<OpenFile<'_>, Errno> {
        let view = self.view();
        let (fs, ino) = self.handle_in(&view, fh, ino)?;
        if !Arc::ptr_eq(&fs, &view.fs) {
            return Err(Errno::EIO);
        }
        let io = self.hold_unless_revoked(&fs, fh)?;
        Ok(OpenFile {
            _view: view,
            _io: io,
            fs,
            ino,
        })
    }

    /// EIO when `fh` (given with a getattr or setattr: fstat, ftruncate,
    /// fchmod...) is a handle opened on a branch the mount no longer shows;
    /// the inode number would name another file now (see [`Self::open_file`]).
    /// ESTALE when a reset discarded its file; else a hold that a reset
    /// waits for, to keep while the request runs.
    fn check_handle(
        &self,
        view: &View,
        fh: Option<FileHandle>,
    ) -> Result<Option<dm_store::IoGuard>, Errno> {
        let Some(fh) = fh else {
            return Ok(None);
        };
        let fs = self
            .shared
            .handles
            .read()
            .get(&fh.0)
            .map(|(fs, _, _)| fs.clone());
        match fs {
            Some(fs) if !Arc::ptr_eq(&fs, &view.fs) => Err(Errno::EIO),
            _ => self.hold_unless_revoked(&view.fs, fh).map(Some),
        }
    }

    /// A hold on `fs` that a reset waits for, taken before the check that
    /// `fh` is not revoked (ESTALE) and kept for the request: a reset
    /// cannot discard the file between the check and the I/O.
    fn hold_unless_revoked(
        &self,
        fs: &BranchFs,
        fh: FileHandle,
    ) -> Result<dm_store::IoGuard, Errno> {
        let io = fs.io_guard();
        match self.revoked(fh) {
            true => Err(Errno::ESTALE),
            false => Ok(io),
        }
    }

    /// Truncates `ino` for an open with O_TRUNC (the kernel leaves it to
    /// us, FUSE_ATOMIC_O_TRUNC, once it checked write permission) and
    /// tells the branch's other mounts.
    fn truncate_for_open(
        &self,
        view: &View,
        req: &Request,
        ino: u64,
    ) -> Result<dm_store::Attr, Errno> {
        let set = SetAttr {
            size: Some(0),
            kill_setid: req.uid() != 0,
            ..SetAttr::default()
        };
        let a = view.fs.setattr(ino, &set).map_err(|e| errno(&e))?;
        self.tell_peers(&view.fs, || {
            vec![Change::Data {
                ino,
                offset: 0,
                len: 0,
            }]
        });
        Ok(a)
    }

    /// For `create` of `name` in `parent` that another mount made first:
    /// the file there, if the caller may open it so (the kernel checked
    /// only the directory), truncated for O_TRUNC.
    fn open_made_meanwhile(
        &self,
        view: &View,
        req: &Request,
        parent: u64,
        name: &OsStr,
        flags: i32,
    ) -> Result<dm_store::Attr, Errno> {
        let a = view
            .fs
            .lookup(parent, name.as_bytes())
            .map_err(|e| errno(&e))?;
        match a.kind {
            FileKind::File => {}
            FileKind::Dir => return Err(Errno::EISDIR),
            _ => return Err(Errno::EEXIST),
        }
        let want: u16 = match flags & libc::O_ACCMODE {
            libc::O_RDONLY => 0o4,
            libc::O_WRONLY => 0o2,
            _ => 0o6,
        };
        let bits = if req.uid() == a.uid {
            (a.perm >> 6) & 0o7
        } else if req.gid() == a.gid {
            (a.perm >> 3) & 0o7
        } else {
            a.perm & 0o7
        };
        if req.uid() != 0 && bits & want != want {
            return Err(Errno::EACCES);
        }
        if flags & libc::O_TRUNC == 0 {
            return Ok(a);
        }
        self.truncate_for_open(view, req, a.ino)
    }

    /// Owner and extra mode bits of a new inode in `parent`: the caller's
    /// uid/gid, except that a set-group-ID directory passes on its group
    /// (and, to new directories, its S_ISGID bit).
    fn new_owner(view: &View, req: &Request, parent: u64, is_dir: bool) -> (u32, u32, u32) {
        match view.fs.getattr(parent) {
            Ok(p) if u32::from(p.perm) & libc::S_ISGID != 0 => {
                (req.uid(), p.gid, if is_dir { libc::S_ISGID } else { 0 })
            }
            _ => (req.uid(), req.gid(), 0),
        }
    }

    /// The attributes the kernel is given for `a`: as stored, with the
    /// owner shown as [`MountOptions::owner`] says.
    fn attr(&self, view: &View, a: &Attr) -> FileAttr {
        let mut attr = view.attr(a);
        if let Some(o) = &self.shared.owner {
            (attr.uid, attr.gid) = o.shown(attr.gid);
        }
        attr
    }

    fn reply_entry(&self, view: &View, parent: INodeNo, name: &[u8], a: &Attr, reply: ReplyEntry) {
        let attr = self.attr(view, a);
        self.shared.remember(view, parent, name, &attr);
        reply.entry(&TTL, &attr, Generation(0));
    }
}

/// Calls `add` with each entry of `dir` after the readdir `offset`, read
/// from the store `batch` at a time, until `add` answers true (the reply is
/// full) or the directory ends. An offset the store cannot have is the end.
fn each_entry(
    fs: &BranchFs,
    dir: u64,
    offset: u64,
    batch: usize,
    mut add: impl FnMut(&DirEntry) -> Result<bool, Errno>,
) -> Result<(), Errno> {
    let Ok(mut offset) = i64::try_from(offset) else {
        return Ok(());
    };
    loop {
        let entries = fs.readdir(dir, offset, batch).map_err(|e| errno(&e))?;
        let n = entries.len();
        for e in entries {
            if add(&e)? {
                return Ok(());
            }
            offset = e.offset;
        }
        if n < batch {
            return Ok(());
        }
    }
}

impl fuser::Filesystem for DmFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        if let Err(max) = config.set_max_write(MAX_WRITE) {
            let _ = config.set_max_write(max);
        }
        // Readahead as large as the kernel allows, up to 1 MiB.
        if let Err(max) = config.set_max_readahead(MAX_WRITE) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.set_max_background(64);
        // Optional capabilities: ignore what the kernel lacks. Not
        // FUSE_AUTO_INVAL_DATA: with it the kernel asks for the attributes
        // on every read after a write and, seeing a new mtime, drops the
        // file's pages, the one a write just filled included, then reads
        // them ahead from us before that WRITE reaches us: a reader got
        // zeros for data fsynced through another descriptor (PostgreSQL's
        // WAL sender, pg_basebackup). We are the only writer, and tell
        // other mounts of a branch about changes ourselves (peers.rs).
        let mut caps = vec![
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_ATOMIC_O_TRUNC,
            InitFlags::FUSE_CACHE_SYMLINKS,
            // We clear S_ISUID/S_ISGID on write, truncate and chown
            // ourselves, so the kernel need not ask for security.capability
            // before every write (a round trip per write(2) otherwise).
            InitFlags::FUSE_HANDLE_KILLPRIV_V2,
            // mmap(2) of a file opened with O_APPEND (direct I/O, see
            // `open_flags`) as of any other; the kernel keeps the two
            // coherent (Linux 6.6+; older kernels refuse shared mappings).
            InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP,
        ];
        if self.shared.writeback {
            caps.push(InitFlags::FUSE_WRITEBACK_CACHE);
        }
        if readdirplus_wanted() {
            // AUTO: the kernel asks for attributes only when the caller
            // goes on to look entries up (ls -l), plain readdir otherwise.
            caps.push(InitFlags::FUSE_DO_READDIRPLUS);
            caps.push(InitFlags::FUSE_READDIRPLUS_AUTO);
        }
        for cap in caps {
            if config.add_capabilities(cap).is_err() {
                debug!("kernel lacks FUSE capability {cap:?}");
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if name.len() > NAME_MAX {
            reply.error(Errno::ENAMETOOLONG);
            return;
        }
        let view = self.view();
        match view
            .fs
            .lookup(store_ino!(view, parent, reply), name.as_bytes())
        {
            Ok(a) => self.reply_entry(&view, parent, name.as_bytes(), &a, reply),
            // A negative entry (node id 0 with a cache time): the kernel
            // then answers lookups of the name itself (compilers, shells and
            // interpreters probe many absent paths). Recorded first, under
            // the view lock, so a switch() cannot miss it; names created
            // through other mounts of the branch are dropped by `peers`.
            Err(e)
                if e.errno() == libc::ENOENT
                    && self.shared.remember_negative(parent, name.as_bytes()) =>
            {
                reply.entry(&TTL, &negative_attr(), Generation(0));
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.shared.forget(ino, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let view = self.view();
        let _io = match self.check_handle(&view, fh) {
            Ok(io) => io,
            Err(e) => return reply.error(e),
        };
        match view.fs.getattr(store_ino!(view, ino, reply)) {
            Ok(a) => reply.attr(&TTL, &self.attr(&view, &a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let view = self.view();
        let _io = match self.check_handle(&view, fh) {
            Ok(io) => io,
            Err(e) => return reply.error(e),
        };
        let set = SetAttr {
            mode: mode.map(|m| m & 0o7777),
            uid,
            gid,
            size,
            atime: atime.map(time_set),
            mtime: mtime.map(time_set),
            ctime: ctime.map(to_timestamp),
            // FATTR_KILL_SUIDGID does not reach us; the kernel sets it for
            // a truncate by a process without CAP_FSETID, approximated here
            // by a non-root caller. (chown clears the bits in the store.)
            kill_setid: size.is_some() && req.uid() != 0,
            grow_only: false,
        };
        let store_ino = store_ino!(view, ino, reply);
        match view.fs.setattr(store_ino, &set) {
            Ok(a) => {
                // Before the reply, as for a write: an fsync after a
                // truncate waits for it.
                self.tell_peers(&view.fs, || {
                    vec![match size {
                        Some(size) => Change::Data {
                            ino: store_ino,
                            offset: size,
                            len: 0,
                        },
                        None => Change::Attr(store_ino),
                    }]
                });
                reply.attr(&TTL, &self.attr(&view, &a));
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let view = self.view();
        match view.fs.readlink(store_ino!(view, ino, reply)) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let Some(kind) = kind_of_mode(mode) else {
            reply.error(Errno::EINVAL);
            return;
        };
        if kind == FileKind::Dir || kind == FileKind::Symlink {
            reply.error(Errno::EINVAL);
            return;
        }
        let view = self.view();
        let p = store_ino!(view, parent, reply);
        let (uid, gid, _) = Self::new_owner(&view, req, p, false);
        let perm = mode & 0o7777 & !umask;
        match view
            .fs
            .mknod(p, name.as_bytes(), kind, perm, rdev, uid, gid)
        {
            Ok(a) => {
                self.tell_peers(&view.fs, || created(p, name));
                self.reply_entry(&view, parent, name.as_bytes(), &a, reply);
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let view = self.view();
        let p = store_ino!(view, parent, reply);
        let (uid, gid, extra) = Self::new_owner(&view, req, p, true);
        let perm = (mode & 0o7777 & !umask) | extra;
        match view.fs.mkdir(p, name.as_bytes(), perm, uid, gid) {
            Ok(a) => {
                self.tell_peers(&view.fs, || created(p, name));
                self.reply_entry(&view, parent, name.as_bytes(), &a, reply);
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, reply, false);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, reply, true);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let view = self.view();
        let p = store_ino!(view, parent, reply);
        let (uid, gid, _) = Self::new_owner(&view, req, p, false);
        match view.fs.symlink(
            p,
            link_name.as_bytes(),
            target.as_os_str().as_bytes(),
            uid,
            gid,
        ) {
            Ok(a) => {
                self.tell_peers(&view.fs, || created(p, link_name));
                self.reply_entry(&view, parent, link_name.as_bytes(), &a, reply);
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut store_flags = 0;
        if flags.contains(RenameFlags::RENAME_NOREPLACE) {
            store_flags |= dm_store::RENAME_NOREPLACE;
        }
        if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            store_flags |= dm_store::RENAME_EXCHANGE;
        }
        if flags.contains(RenameFlags::RENAME_WHITEOUT) {
            reply.error(Errno::EINVAL);
            return;
        }
        let view = self.view();
        let (p, np) = (
            store_ino!(view, parent, reply),
            store_ino!(view, newparent, reply),
        );
        // A file the rename replaces loses a link: other mounts cache its
        // link count; a directory it replaces is dead to the kernel.
        let replaced = (store_flags & dm_store::RENAME_EXCHANGE == 0)
            .then(|| view.fs.lookup(np, newname.as_bytes()).ok())
            .flatten();
        match view
            .fs
            .rename(p, name.as_bytes(), np, newname.as_bytes(), store_flags)
        {
            Ok(()) => {
                if let Some(a) = replaced.as_ref().filter(|a| a.kind == FileKind::Dir) {
                    self.shared.removed_dir(view.to_fuse(a.ino));
                }
                // The kernel moves its dentries without a lookup: remember
                // the new names so that switch() can invalidate them.
                let mut moved = Vec::new();
                if let Ok(a) = view.fs.lookup(np, newname.as_bytes()) {
                    self.shared
                        .remember_name(newparent, newname.as_bytes(), view.to_fuse(a.ino));
                    moved.push(a.ino);
                }
                if store_flags & dm_store::RENAME_EXCHANGE != 0 {
                    if let Ok(a) = view.fs.lookup(p, name.as_bytes()) {
                        self.shared
                            .remember_name(parent, name.as_bytes(), view.to_fuse(a.ino));
                        moved.push(a.ino);
                    }
                }
                self.tell_peers(&view.fs, || {
                    let mut c = vec![
                        Change::Entry {
                            parent: p,
                            name: name.as_bytes().to_vec(),
                        },
                        Change::Entry {
                            parent: np,
                            name: newname.as_bytes().to_vec(),
                        },
                        Change::Attr(p),
                        Change::Attr(np),
                    ];
                    c.extend(moved.into_iter().map(Change::Attr));
                    c.extend(replaced.map(|a| Change::Attr(a.ino)));
                    c
                });
                reply.ok();
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let view = self.view();
        let (target, np) = (
            store_ino!(view, ino, reply),
            store_ino!(view, newparent, reply),
        );
        match view.fs.link(target, np, newname.as_bytes()) {
            Ok(a) => {
                self.tell_peers(&view.fs, || {
                    let mut c = created(np, newname);
                    c.push(Change::Attr(target));
                    c
                });
                self.reply_entry(&view, newparent, newname.as_bytes(), &a, reply);
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.shared
            .open_dirs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        // Never below zero: a mount restored after a crash may see the
        // release of a directory the previous server opened.
        let _ = self.shared.open_dirs.fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |n| n.checked_sub(1),
        );
        reply.ok();
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let view = self.view();
        let ino = store_ino!(view, ino, reply);
        // Linux truncates also for O_RDONLY|O_TRUNC (the kernel asked for
        // write permission then).
        if flags.0 & libc::O_TRUNC != 0 {
            if let Err(e) = self.truncate_for_open(&view, req, ino) {
                reply.error(e);
                return;
            }
        }
        match view.fs.open_at(ino) {
            Ok(at) => reply.opened(
                self.new_handle(view.fs.clone(), ino, at),
                self.open_flags(flags.0),
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let f = match self.open_file(fh, ino) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        match f.fs.read(f.ino, offset, size) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let f = match self.open_file(fh, ino) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        let (fs, ino) = (&f.fs, f.ino);
        // FUSE_HANDLE_KILLPRIV_V2: a writer without CAP_FSETID clears the
        // set-id bits (the kernel leaves it to us).
        if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
            match fs.kill_setid(ino) {
                Ok(true) => peers::publish_all(fs, &self.shared, vec![Change::Attr(ino)]),
                Ok(false) => {}
                Err(e) => {
                    reply.error(errno(&e));
                    return;
                }
            }
        }
        // O_APPEND: at the end the store knows, not at the kernel's cached
        // size, which a reset or another mount's writer may have moved.
        // Page-cache writes keep their offsets, and so does every write
        // under the writeback cache (the kernel's dirty pages beyond the
        // store's end would overwrite an append placed there).
        let append = flags.0 & libc::O_APPEND != 0
            && !self.shared.writeback
            && !write_flags.contains(WriteFlags::FUSE_WRITE_CACHE);
        // Such files bypass the page cache, and the kernel's direct-I/O
        // write path leaves file capabilities to us (its page-cache path
        // drops them itself): any write drops them, also root's.
        if append {
            if let Err(e) = self.drop_caps(fs, ino) {
                reply.error(errno(&e));
                return;
            }
        }
        let written = match append {
            true => fs.append(ino, data),
            false => fs.write(ino, offset, data).map(|n| (offset, n)),
        };
        match written {
            Ok((at, n)) => {
                // Published before the reply, so that an fsync that follows
                // waits for it (peers::wait_delivered).
                let changed = vec![Change::Data {
                    ino,
                    offset: at.min(offset),
                    len: if at == offset { u64::from(n) } else { 0 },
                }];
                if at == offset {
                    self.tell_peers(fs, || changed);
                } else {
                    // Appended elsewhere than where this kernel put the
                    // bytes in its cache: its pages and size are wrong too.
                    peers::publish_all(fs, &self.shared, changed);
                }
                reply.written(n);
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// Asked for only while some branch has several mounts, and then only
    /// at the close(2) of a file opened for writing (`open_flags` sets
    /// FOPEN_NOFLUSH otherwise: a FLUSH is a synchronous round trip on
    /// every close). It waits until the other mounts were told of the
    /// changes made so far, so that a program started on another mount
    /// after the writer closed its file reads what was written
    /// (close-to-open, as NFS gives). Buffered writes are stored at release
    /// (which the kernel sends without making close wait), fsync, commit,
    /// or when buffers grow; reads from any mount see them before. As on
    /// most filesystems, close is not a durability point: fsync(2) is.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        peers::wait_delivered();
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let (fs, ino) = match self.handle(fh, ino) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        self.shared.handles.write().remove(&fh.0);
        match fs.release(ino) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let (fs, ino) = match self.handle(fh, ino) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        match fs.fsync(ino, datasync) {
            Ok(()) => {
                // Other mounts of the branch show what was synced.
                peers::wait_delivered();
                reply.ok()
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let view = self.view();
        let result = each_entry(&view.fs, store_ino!(view, ino, reply), offset, 256, |e| {
            // Offsets come from the store and are >= 1 (0 = start).
            let off = u64::try_from(e.offset).unwrap_or(0);
            let name = OsStr::from_bytes(&e.name);
            Ok(reply.add(view.to_fuse(e.ino), off, file_type(e.kind), name))
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    /// readdir with each entry's attributes, so that `ls -l`, `find` or
    /// `git status` need no LOOKUP per entry. Each entry but "." and ".."
    /// counts as a lookup in the kernel.
    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: fuser::ReplyDirectoryPlus,
    ) {
        let view = self.view();
        let result = each_entry(&view.fs, store_ino!(view, ino, reply), offset, 128, |e| {
            let dots = e.name == b"." || e.name == b"..";
            let attr = match view.fs.getattr(e.ino) {
                Ok(a) => self.attr(&view, &a),
                // Removed meanwhile: leave it out. Any other error (a
                // damaged record: EIO) fails the listing, which left such
                // a file out without a word (tar and rsync skipped it).
                Err(err) if !dots && matches!(err.errno(), libc::ESTALE | libc::ENOENT) => {
                    return Ok(false)
                }
                Err(err) => return Err(errno(&err)),
            };
            let off = u64::try_from(e.offset).unwrap_or(0);
            let name = OsStr::from_bytes(&e.name);
            if reply.add(attr.ino, off, name, &TTL, &attr, Generation(0)) {
                return Ok(true);
            }
            if !dots {
                self.shared.remember(&view, ino, &e.name, &attr);
            }
            Ok(false)
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let view = self.view();
        // Directory changes are metadata: fsync on the directory makes them durable.
        match view.fs.fsync(store_ino!(view, ino, reply), datasync) {
            Ok(()) => {
                // Other mounts of the branch show the names as synced: a
                // write by path there right after a save by rename went to
                // the replaced file, and was lost with it.
                peers::wait_delivered();
                reply.ok()
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let view = self.view();
        match view.fs.statfs() {
            Ok(s) => reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        if let Some(e) = bad_xattr_name(name) {
            reply.error(e);
            return;
        }
        let view = self.view();
        let ino = store_ino!(view, ino, reply);
        let caps = name.as_bytes() == XATTR_CAPS;
        if caps {
            self.caps_changed(ino);
        }
        let res = view.fs.setxattr(ino, name.as_bytes(), value, flags);
        // Again after the change: a getxattr that read the old value
        // after the first bump must not cache it.
        if caps {
            self.caps_changed(ino);
        }
        match res {
            Ok(()) => {
                self.tell_peers(&view.fs, || xattr_changes(ino, name));
                reply.ok();
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if let Some(e) = bad_xattr_name(name) {
            reply.error(e);
            return;
        }
        let view = self.view();
        let ino = store_ino!(view, ino, reply);
        let value = match name.as_bytes() == XATTR_CAPS {
            true => self
                .caps(&view.fs, ino)
                .and_then(|v| v.ok_or_else(|| dm_store::Error::fs("getxattr", libc::ENODATA))),
            false => view.fs.getxattr(ino, name.as_bytes()),
        };
        match value {
            Ok(v) => reply_xattr(&v, size, reply),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let view = self.view();
        // `trusted.` names are listed to root only, as ext4 lists them to
        // CAP_SYS_ADMIN (the kernel leaves the listing to us).
        let trusted = req.uid() == 0;
        match view.fs.listxattr(store_ino!(view, ino, reply)) {
            Ok(names) => {
                let mut buf = Vec::new();
                // ACLs stored before they were refused stay hidden.
                for n in names.iter().filter(|n| {
                    !is_acl(OsStr::from_bytes(n)) && (trusted || !n.starts_with(b"trusted."))
                }) {
                    buf.extend_from_slice(n);
                    buf.push(0);
                }
                reply_xattr(&buf, size, reply)
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if let Some(e) = bad_xattr_name(name) {
            reply.error(e);
            return;
        }
        let view = self.view();
        match self.remove_xattr(&view.fs, store_ino!(view, ino, reply), name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // With default_permissions the kernel checks permissions itself;
        // only existence is ours to answer.
        let view = self.view();
        match view.fs.getattr(store_ino!(view, ino, reply)) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let view = self.view();
        let p = store_ino!(view, parent, reply);
        let (uid, gid, _) = Self::new_owner(&view, req, p, false);
        let perm = mode & 0o7777 & !umask;
        let a = match view
            .fs
            .mknod(p, name.as_bytes(), FileKind::File, perm, 0, uid, gid)
        {
            Ok(a) => a,
            // Another mount of the branch made it since this kernel looked
            // (two writers opening one log at once): without O_EXCL the
            // open opens it, as on a local filesystem (it failed EEXIST).
            Err(e) if e.errno() == libc::EEXIST && flags & libc::O_EXCL == 0 => {
                match self.open_made_meanwhile(&view, req, p, name, flags) {
                    Ok(a) => a,
                    Err(e) => {
                        reply.error(e);
                        return;
                    }
                }
            }
            Err(e) => {
                reply.error(errno(&e));
                return;
            }
        };
        let opened_at = match view.fs.open_at(a.ino) {
            Ok(at) => at,
            Err(e) => {
                reply.error(errno(&e));
                return;
            }
        };
        let attr = self.attr(&view, &a);
        self.shared.remember(&view, parent, name.as_bytes(), &attr);
        let fh = self.new_handle(view.fs.clone(), a.ino, opened_at);
        self.tell_peers(&view.fs, || created(p, name));
        reply.created(&TTL, &attr, Generation(0), fh, self.open_flags(flags));
    }

    /// No poll: ENOSYS makes the kernel treat the mount's files as always
    /// ready (as for a regular file) and stop asking. Answered here so that
    /// fuser's default does not log a warning (`docker exec`, `docker cp`).
    fn poll(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ph: fuser::PollNotifier,
        _events: fuser::PollEvents,
        _flags: fuser::PollFlags,
        reply: fuser::ReplyPoll,
    ) {
        reply.error(Errno::ENOSYS);
    }

    /// No SEEK_DATA/SEEK_HOLE of our own: ENOSYS makes the kernel answer
    /// them itself from then on (the whole file is data) and stop asking.
    /// Answered here so that fuser's default does not log a warning.
    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: i64,
        _whence: i32,
        reply: fuser::ReplyLseek,
    ) {
        reply.error(Errno::ENOSYS);
    }

    /// No copy_file_range of our own: ENOSYS makes the kernel copy through
    /// reads and writes from then on (`cp` works as on any filesystem).
    /// Answered here so that fuser's default does not log a warning.
    #[allow(clippy::too_many_arguments)] // fuser's signature
    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: fuser::CopyFileRangeFlags,
        reply: fuser::ReplyWrite,
    ) {
        reply.error(Errno::ENOSYS);
    }

    /// No ioctls: the answer every program expects for "not a terminal"
    /// (Python's open() asks TCGETS of every file). Answered here so that
    /// fuser's default does not log a warning per call.
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    /// fallocate(2): mode 0 extends the file (dm allocates nothing ahead:
    /// blocks are stored when written; ENOSPC only when the disk has less
    /// room than the extension), `FALLOC_FL_KEEP_SIZE` alone does
    /// nothing (the same ENOSPC check), `FALLOC_FL_PUNCH_HOLE` and
    /// `FALLOC_FL_ZERO_RANGE` drop the whole blocks within the range
    /// (holes) and write zeros over the rest of it within the file
    /// ([`dm_store::BranchFs::punch`]). Collapsing and inserting ranges: EOPNOTSUPP.
    /// (glibc's posix_fallocate emulated mode 0 with a one-byte write per
    /// 4 KiB, a FUSE round trip each.)
    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let zero = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
        if mode & !(libc::FALLOC_FL_KEEP_SIZE | zero) != 0 {
            return reply.error(Errno::EOPNOTSUPP);
        }
        let f = match self.open_file(fh, ino) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        let (fs, ino) = (&f.fs, f.ino);
        let Some(end) = offset.checked_add(length) else {
            return reply.error(Errno::EFBIG);
        };
        let result = fs.getattr(ino).and_then(|a| {
            // Nothing is reserved (blocks are stored when written), but a
            // preallocation the disk could never hold fails as on ext4
            // (posix_fallocate of 100 GiB on a disk with 57 GiB free said
            // yes, and the program met ENOSPC later instead).
            if mode & zero == 0 && end > a.size {
                let st = fs.statfs()?;
                if end - a.size > st.bavail.saturating_mul(u64::from(st.frsize)) {
                    return Err(dm_store::Error::fs("fallocate", libc::ENOSPC));
                }
            }
            if mode & zero != 0 {
                fs.punch(ino, offset, length)?;
            }
            // Not below what a writer on another descriptor may have
            // appended since the size above was read. The file's times
            // change whatever the mode, as on ext4 (a keep-size call past
            // the end changed nothing else).
            let grow = mode & libc::FALLOC_FL_KEEP_SIZE == 0 && end > a.size;
            let set = SetAttr {
                size: grow.then_some(end),
                grow_only: true,
                mtime: Some(TimeSet::Now),
                ..SetAttr::default()
            };
            fs.setattr(ino, &set)?;
            Ok(())
        });
        match result {
            Ok(()) => {
                self.tell_peers(fs, || {
                    vec![Change::Data {
                        ino,
                        offset,
                        len: length,
                    }]
                });
                reply.ok()
            }
            Err(e) => reply.error(errno(&e)),
        }
    }
}

/// What a new name makes stale at the other mounts: their negative entry
/// for it, and the parent's attributes.
fn created(parent: u64, name: &OsStr) -> Vec<Change> {
    vec![
        Change::Entry {
            parent,
            name: name.as_bytes().to_vec(),
        },
        Change::Attr(parent),
    ]
}

/// What an xattr change makes stale in other mounts.
fn xattr_changes(ino: u64, name: &OsStr) -> Vec<Change> {
    let mut c = vec![Change::Attr(ino)];
    if name.as_bytes() == XATTR_CAPS {
        c.push(Change::Caps(ino));
    }
    c
}

fn reply_xattr(value: &[u8], size: u32, reply: ReplyXattr) {
    let Ok(len) = u32::try_from(value.len()) else {
        reply.error(Errno::E2BIG);
        return;
    };
    if size == 0 {
        reply.size(len);
    } else if len > size {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(value);
    }
}

/// A live FUSE mount of one subdot of a branch. `Send + Sync`: the daemon
/// keeps it in shared state and calls [`Mount::switch`] from any thread.
pub struct Mount {
    path: PathBuf,
    shared: Arc<Shared>,
    notifier: Notifier,
    session: Mutex<Option<BackgroundSession>>,
    /// The device number the mount point showed once mounted: another
    /// device there means it is not this mount any more.
    dev: u64,
}

impl std::fmt::Debug for Mount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mount")
            .field("path", &self.path)
            .field("subdot", &self.shared.subdot)
            .field("branch", &self.branch())
            .finish()
    }
}

impl Mount {
    /// Mounts `subdot` of `fs`'s branch at `path` (creates the subdot dir if
    /// missing, unless "__root__" = whole dot tree).
    #[allow(clippy::self_named_constructors)] // the name is part of the agreed API
    pub fn mount(
        path: &Path,
        fs: Arc<BranchFs>,
        subdot: &str,
        opts: &MountOptions,
    ) -> io::Result<Mount> {
        let root = fs.subdot_ino(subdot, true).map_err(store_io_error)?;
        let ids = Arc::new(Ids::default());
        let shared = Arc::new(Shared {
            view: RwLock::new(View {
                fs,
                root,
                ids: ids.clone(),
            }),
            ids,
            owner: opts.owner.clone(),
            subdot: subdot.to_string(),
            writeback: writeback_wanted(),
            known: Mutex::new(Known::default()),
            no_caps: Mutex::new(NoCaps::default()),
            handles: RwLock::new(HashMap::new()),
            open_dirs: std::sync::atomic::AtomicUsize::new(0),
            next_fh: std::sync::atomic::AtomicU64::new(1),
            notifier: std::sync::OnceLock::new(),
            spin: std::sync::OnceLock::new(),
        });
        let mut config = Config::default();
        config.mount_options = vec![
            // A comma or space would split the mount option string.
            MountOption::FSName(
                opts.fsname
                    .replace(|c: char| c == ',' || c.is_whitespace(), "_"),
            ),
            MountOption::Subtype("dm".to_string()),
            MountOption::DefaultPermissions,
            MountOption::RW,
            // dm keeps no access times (FUSE leaves them to the server):
            // said, rather than `relatime` with atimes that never move.
            MountOption::NoAtime,
        ];
        if is_root() {
            // Device files and set-id programs work on the mount (as on a
            // local disk); fusermount3 ignores both for other users.
            config
                .mount_options
                .extend([MountOption::Dev, MountOption::Suid]);
        }
        config.acl = if opts.allow_other {
            SessionACL::All
        } else {
            SessionACL::Owner
        };
        config.n_threads = Some(opts.n_threads.max(1));
        config.clone_fd = opts.n_threads > 1;
        let session = fuser::Session::new(
            DmFs {
                shared: shared.clone(),
            },
            path,
            &config,
        )
        .map_err(mount_error)?;
        if opts.spin {
            match spin::Spin::start(std::os::fd::AsFd::as_fd(&session)) {
                Ok(s) => {
                    let _ = shared.spin.set(s);
                }
                Err(e) => warn!("{}: no adaptive polling of /dev/fuse: {e}", path.display()),
            }
        }
        let notifier = session.notifier();
        let _ = shared.notifier.set(notifier.clone());
        let bg = session.spawn()?;
        // Served by the session just started.
        let dev = std::os::unix::fs::MetadataExt::dev(&std::fs::metadata(path)?);
        if let Err(e) = set_read_ahead(path, read_ahead_kb()) {
            // Not root: the kernel's 128 KiB stay (reads are slower, not
            // wrong).
            debug!("{}: readahead left as it was: {e}", path.display());
        }
        {
            let view = shared.view.read();
            peers::join(&view.fs, &shared);
            // The subdot may be new: a mount of the whole tree may cache
            // its name as absent.
            if root != dm_store::ROOT_INO {
                peers::publish(&view.fs, &shared, || {
                    created(dm_store::ROOT_INO, OsStr::new(subdot))
                });
            }
        }
        Ok(Mount {
            path: path.to_path_buf(),
            shared,
            notifier,
            session: Mutex::new(Some(bg)),
            dev,
        })
    }

    /// True while the mount point still shows this mount: false once it
    /// was unmounted behind dm's back (`umount`, a crash of the session) or
    /// another file system was mounted over it.
    pub fn is_alive(&self) -> bool {
        !self.session_ended() && self.shows_this_mount()
    }

    /// True once the FUSE session has ended: the kernel's side of the
    /// mount is gone (unmounted outside dm, also lazily once its last user
    /// left; aborted), not only hidden by another mount.
    pub fn session_ended(&self) -> bool {
        self.session
            .lock()
            .as_ref()
            .is_none_or(|bg| bg.guard.is_finished())
    }

    /// True while the session runs but the mount point shows something
    /// else: another file system was mounted over this one.
    pub fn is_covered(&self) -> bool {
        !self.session_ended() && !self.shows_this_mount()
    }

    /// Whether the mount point's device is this mount's. A stat that fails
    /// is this mount's answer (a file system mounted over it would answer
    /// itself): a subdot mount whose directory was removed through a mount
    /// of the whole dot answers ESTALE once a reset forgot it, and `dm unmount` said
    /// another file system was mounted over it.
    fn shows_this_mount(&self) -> bool {
        std::fs::metadata(&self.path).map_or(true, |m| {
            std::os::unix::fs::MetadataExt::dev(&m) == self.dev
        })
    }

    /// Points the mount at another branch (checkout) or the same branch after
    /// a reset: swaps the BranchFs and invalidates every inode and directory
    /// entry the kernel has cached, so the same path shows the new state.
    pub fn switch(&self, fs: Arc<BranchFs>) -> io::Result<()> {
        // Dirty pages (mmap writes, or any write with the writeback cache)
        // and times cached by the kernel belong to the old branch: write
        // them back before swapping. Errors are expected for inodes deleted
        // meanwhile (ESTALE on their time update) and must not block a
        // checkout.
        if let Err(e) = self.sync() {
            debug!("syncfs before switch of {}: {e}", self.path.display());
        }
        self.switch_frozen(self.freeze(), fs)
    }

    /// Holds this mount's requests off (they wait) until the guard goes,
    /// given to [`Mount::switch_frozen`] or dropped: a reset of the branch
    /// shown runs in between, so that no request reaches the reset state
    /// by a node id the switch then finds stale (an `fchmod`, or a create
    /// in a working directory, racing the reset landed on the file or in
    /// the directory that took its number). Waits for the requests in
    /// flight. [`Mount::sync`] first: the kernel's writeback needs
    /// requests. Do not call other methods of the mount while it is held.
    pub fn freeze(&self) -> Frozen<'_> {
        Frozen(self.shared.view.write())
    }

    /// [`Mount::switch`] with the mount's requests held off by `frozen`
    /// (see [`Mount::freeze`]), synced before.
    pub fn switch_frozen(&self, frozen: Frozen<'_>, fs: Arc<BranchFs>) -> io::Result<()> {
        let root = fs
            .subdot_ino(&self.shared.subdot, true)
            .map_err(store_io_error)?;
        // Snapshot what the kernel knows; notify without holding any lock
        // (the kernel may need a request of ours to finish first).
        let (mut entries, dirs, inodes) = {
            let mut view = frozen.0;
            peers::leave(&view.fs, &self.shared);
            peers::join(&fs, &self.shared);
            // The subdot may be new on this branch (as in mount()).
            if root != dm_store::ROOT_INO {
                peers::publish(&fs, &self.shared, || {
                    created(dm_store::ROOT_INO, OsStr::new(&self.shared.subdot))
                });
            }
            let new = View {
                fs,
                root,
                ids: self.shared.ids.clone(),
            };
            let old = std::mem::replace(&mut *view, new);
            {
                let mut nc = self.shared.no_caps.lock();
                nc.generation += 1;
                nc.inos.clear();
            }
            let mut known = self.shared.known.lock();
            self.kill_stale_ids(&old, &view, &known);
            known.removed_dirs.clear();
            let negatives = std::mem::take(&mut known.negatives);
            known.n_negatives = 0;
            let mut entries = Vec::new();
            let mut dirs = Vec::new();
            for (ino, names) in &known.names {
                for (parent, name) in names {
                    match known.dirs.contains(ino) {
                        true => dirs.push((*ino, *parent, name.clone())),
                        false => entries.push((*parent, name.clone())),
                    }
                }
            }
            for (parent, names) in negatives {
                entries.extend(names.into_iter().map(|n| (parent, n)));
            }
            let inodes: Vec<u64> = known.lookups.keys().copied().collect();
            (entries, dirs, inodes)
        };
        // A directory the new state has at the same place, as the same
        // inode, keeps its entry (its attributes and listing are dropped
        // below with every inode's): dropping it unhashed it, and a process
        // working in it (a shell, make, git) found its working directory
        // "deleted" (getcwd: ENOENT) although it was still there.
        {
            let view = self.shared.view.read();
            for (ino, parent, name) in dirs {
                let same = view
                    .to_store(INodeNo(parent))
                    .ok()
                    .and_then(|p| view.fs.lookup(p, &name).ok())
                    .is_some_and(|a| a.kind == FileKind::Dir && view.to_fuse(a.ino).0 == ino);
                if !same {
                    entries.push((parent, name));
                }
            }
        }
        for (parent, name) in &entries {
            if let Err(e) = self
                .notifier
                .inval_entry(INodeNo(*parent), OsStr::from_bytes(name))
            {
                // ENOENT: the kernel already dropped it.
                debug!("inval_entry({parent}, {:?}): {e}", OsStr::from_bytes(name));
            }
        }
        for ino in inodes.iter().copied().chain([INodeNo::ROOT.0]) {
            if let Err(e) = self.notifier.inval_inode(INodeNo(ino), 0, 0) {
                debug!("inval_inode({ino}): {e}");
            }
        }
        Ok(())
    }

    /// At a switch from `old` to `new` (under the view's write lock): marks
    /// dead each node id the kernel holds that is known to name another
    /// file, or nothing, in `new` (see [`Ids`]): a file the reset discarded
    /// although it brings one back under its number (deleted while open:
    /// its handles are revoked), a directory removed through this mount
    /// (the kernel keeps that inode dead), a number the new root of a
    /// subdot gives another meaning. The others become suspects, checked
    /// at their first use. No store reads.
    fn kill_stale_ids(&self, old: &View, new: &View, known: &Known) {
        let revoked: HashSet<u64> = self
            .shared
            .handles
            .read()
            .values()
            .filter(|(fs, ino, at)| Arc::ptr_eq(fs, &new.fs) && fs.is_revoked(*ino, *at))
            .map(|(_, ino, _)| *ino)
            .collect();
        let mut m = self.shared.ids.maps.lock();
        for &f in known.lookups.keys() {
            if f == INodeNo::ROOT.0 || m.dead.contains(&f) {
                continue;
            }
            let (was, is) = match m.stores.get(&f) {
                Some(s) => (*s, *s),
                None => (old.swap(f), new.swap(f)),
            };
            let stale = was != is || revoked.contains(&was) || known.removed_dirs.contains(&f);
            match known.born.get(&f) {
                Some(born) if !stale => {
                    m.suspects.insert(f, *born);
                }
                _ => m.kill(f, was),
            }
        }
        self.shared.ids.settle(&m);
    }

    /// Writes back everything the kernel still caches dirty for this mount
    /// (pages of shared mmaps, and all written data when the writeback cache
    /// is on) into the branch, like syncfs(2). Call it before committing or
    /// resetting the mounted branch so that the commit sees every write that
    /// has returned, and no old page lands in the reset state.
    ///
    /// syncfs(2) alone is not enough: it can return while the WRITE requests
    /// carrying mmap-dirtied pages are still on their way to us (seen in
    /// about 3 of 4 commits under load). So every open file (a mapped file
    /// is open until it is unmapped) is then invalidated through the kernel,
    /// which waits for pages under writeback and writes back (launders) the
    /// dirty ones before dropping them. Must not be called from a FUSE
    /// request handler of this mount.
    pub fn sync(&self) -> io::Result<()> {
        syncfs(&self.path)?;
        let open: std::collections::BTreeSet<u64> = {
            let view = self.shared.view.read();
            self.shared
                .handles
                .read()
                .values()
                .filter(|(fs, _, _)| Arc::ptr_eq(fs, &view.fs))
                .map(|(_, ino, _)| view.to_fuse(*ino).0)
                .collect()
        };
        if let Some(notifier) = self.shared.notifier.get() {
            for ino in open {
                if let Err(e) = notifier.inval_inode(INodeNo(ino), 0, 0) {
                    debug!("inval_inode({ino}) in sync: {e}");
                }
            }
        }
        Ok(())
    }

    /// Leaves the device blocking: the request loops must not spin while
    /// the session ends (or lives on, lazily detached).
    fn stop_spin(&self) {
        if let Some(s) = self.shared.spin.get() {
            s.stop();
        }
    }

    /// Whether a request loop is polling the device without blocking now
    /// (see [`MountOptions::spin`]).
    pub fn is_polling(&self) -> bool {
        self.shared.spin.get().is_some_and(|s| s.is_spinning())
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The branch currently shown.
    pub fn branch(&self) -> String {
        self.shared.view.read().fs.branch().to_string()
    }

    /// How many node ids a switch made dead the kernel still holds, and
    /// how many aliases are given (see the crate's `Ids`): both go once the
    /// kernel forgets them.
    pub fn stale_ids(&self) -> (usize, usize) {
        let m = self.shared.ids.maps.lock();
        (m.dead.len(), m.stores.len())
    }

    /// Files open through this mount (by any process), directories aside.
    pub fn open_files(&self) -> usize {
        self.shared.handles.read().len()
    }

    /// Files and directories open through this mount: a directory being
    /// listed (`find`, `tar`, `rsync`) is in use as much as a file read
    /// (a checkout under a `find` made it fail partway with ESTALE).
    pub fn open_files_and_dirs(&self) -> usize {
        self.open_files()
            + self
                .shared
                .open_dirs
                .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether a process uses the mount: a file open through it, or a
    /// working directory or another mount inside it. Asked of the kernel
    /// as root (it knows at once when a process closed or exited, where
    /// our count of open files waits for the RELEASE); unprivileged
    /// servers count open files and directories and look for working
    /// directories inside it among the processes /proc lets them see
    /// (their user's own: another user's working directory there, through
    /// allow_other, goes unseen).
    pub fn is_busy(&self) -> bool {
        if !is_root() || !self.shows_this_mount() {
            return self.open_files() > 0
                || self
                    .shared
                    .open_dirs
                    .load(std::sync::atomic::Ordering::Relaxed)
                    > 0
                || working_directory_inside(&self.path);
        }
        // MNT_EXPIRE unmounts nothing the first time: EBUSY if the mount is
        // in use, else EAGAIN with the mount marked as expired (any use
        // clears the mark; only a second MNT_EXPIRE would unmount it).
        matches!(umount2(&self.path, libc::MNT_EXPIRE), Err(e) if e.raw_os_error() == Some(libc::EBUSY))
    }

    /// Unmounts. If the mount is busy it is detached lazily (the kernel drops
    /// it when the last user goes away) and this returns true without
    /// waiting.
    pub fn unmount(self) -> io::Result<bool> {
        self.stop_spin();
        peers::leave_all(&self.shared);
        let Some(bg) = self.session.lock().take() else {
            return Ok(false);
        };
        if !self.shows_this_mount() {
            // Unmounted behind our back, or another mount is on top: not
            // ours to unmount.
            warn!(
                "{} no longer shows this mount; leaving it",
                self.path.display()
            );
            let_go(bg);
            return Ok(false);
        }
        match unmount_path(&self.path, 0) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                warn!("{} is busy; detaching it lazily", self.path.display());
                unmount_path(&self.path, libc::MNT_DETACH)?;
                // The request loops end when the last user closes; don't wait.
                drop(bg);
                return Ok(true);
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {} // not mounted any more
            Err(e) => return Err(e),
        }
        join_or_leave(bg, &self.path).map(|()| false)
    }
}

/// Waits (up to 5 s) for a session whose mount point is gone to end. The
/// session lives on while the file system is still mounted elsewhere (a
/// container's mount namespace keeps its own reference); then it is left
/// running rather than blocking forever.
fn join_or_leave(bg: BackgroundSession, path: &Path) -> io::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !bg.guard.is_finished() {
        if std::time::Instant::now() > deadline {
            warn!(
                "{} is unmounted here but still in use elsewhere (another mount \
                 namespace); its FUSE session ends when the last user goes",
                path.display()
            );
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bg.join()
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.stop_spin();
        peers::leave_all(&self.shared);
        if let Some(bg) = self.session.lock().take() {
            if !self.shows_this_mount() {
                // Not ours to unmount (see `unmount`).
                let_go(bg);
            } else if unmount_path(&self.path, 0).is_err() {
                let _ = unmount_path(&self.path, libc::MNT_DETACH);
                drop(bg);
            } else if let Err(e) = join_or_leave(bg, &self.path) {
                warn!("FUSE session for {} ended with {e}", self.path.display());
            }
        }
        self.shared.unhold_all();
    }
}

/// Lets a session go whose mount point no longer shows it, without
/// dropping it: fuser's drop unmounts the path, which now holds something
/// else (a user's bind mount or tmpfs went, also after the session had
/// ended). Its thread ends when the kernel ends the connection (at once if
/// it was unmounted; once the last user leaves if it was detached or
/// covered); its device's descriptor and the handle's few bytes stay,
/// one of each per mount let go.
fn let_go(bg: BackgroundSession) {
    std::mem::forget(bg);
}

fn store_io_error(e: dm_store::Error) -> io::Error {
    io::Error::new(
        io::Error::from_raw_os_error(e.errno()).kind(),
        e.to_string(),
    )
}

fn syncfs(path: &Path) -> io::Result<()> {
    let dir = std::fs::File::open(path)?;
    // SAFETY: dir is an open file descriptor for the duration of the call.
    let r = unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dir)) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether /etc/fuse.conf lets users other than root mount with
/// `allow_other` (its `user_allow_other` line).
fn fuse_conf_allows_other() -> bool {
    std::fs::read_to_string("/etc/fuse.conf")
        .is_ok_and(|t| t.lines().any(|l| l.trim() == "user_allow_other"))
}

/// Whether a process this one may inspect has its working directory at or
/// below `path` (its user's own, for a server that is not root).
fn working_directory_inside(path: &Path) -> bool {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    procs
        .flatten()
        .filter(|p| {
            p.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .any(|p| std::fs::read_link(p.path().join("cwd")).is_ok_and(|cwd| cwd.starts_with(path)))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Names what a failed mount lacks: /dev/fuse, or for users other than
/// root (who mount through fusermount3) the rights to it.
fn mount_error(e: io::Error) -> io::Error {
    let hint = if !Path::new("/dev/fuse").exists() {
        // fuser said only "No such file or directory".
        "/dev/fuse is missing: load the fuse module (`modprobe fuse`), or give a container \
         the device (`docker run --device /dev/fuse --cap-add SYS_ADMIN`)"
    } else if is_root() {
        return e;
    } else {
        match e.raw_os_error() {
            Some(libc::EACCES) | Some(libc::EPERM) => {
                "this user may not open /dev/fuse or run fusermount3 (Debian: /dev/fuse mode 0666 and \
                 fusermount3 setuid root, as package fuse3 installs them)"
            }
            Some(libc::ENOENT) => "fusermount3 was not found: install it (Debian: apt install fuse3)",
            // fusermount3's own message, without an errno.
            _ if e.to_string().contains("Operation not permitted") => {
                "fusermount3 may not mount for this user: it must be setuid root \
                 (Debian's fuse3 installs it so: `chmod u+s $(command -v fusermount3)`)"
            }
            _ => return e,
        }
    };
    io::Error::new(e.kind(), format!("{e}: {hint}"))
}

/// Unmounts `path` (`flags`: 0 or MNT_DETACH). A user other than root may
/// not call umount2; the mount was made through fusermount3, which then
/// unmounts it (`-u`, `-z` for a lazy detach). Its failures come back as
/// EBUSY, EINVAL (not mounted) or EPERM with its message.
fn unmount_path(path: &Path, flags: libc::c_int) -> io::Result<()> {
    match umount2(path, flags) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) && !is_root() => {
            let mut args = vec![OsStr::new("-u")];
            if flags & libc::MNT_DETACH != 0 {
                args.push(OsStr::new("-z"));
            }
            args.push(path.as_os_str());
            let out = ["fusermount3", "/usr/bin/fusermount3", "/bin/fusermount3"]
                .iter()
                .find_map(
                    |bin| match std::process::Command::new(bin).args(&args).output() {
                        Err(err) if err.kind() == io::ErrorKind::NotFound => None,
                        r => Some(r),
                    },
                )
                .unwrap_or_else(|| Err(io::Error::from(io::ErrorKind::NotFound)))?;
            if out.status.success() {
                return Ok(());
            }
            let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
            let errno = if msg.contains("busy") {
                libc::EBUSY
            } else if msg.contains("not found")
                || msg.contains("not mounted")
                || msg.contains("Invalid argument")
            {
                libc::EINVAL
            } else {
                return Err(io::Error::new(io::ErrorKind::PermissionDenied, msg));
            };
            Err(io::Error::from_raw_os_error(errno))
        }
        r => r,
    }
}

fn umount2(path: &Path, flags: libc::c_int) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    // SAFETY: c is a valid NUL-terminated string for the duration of the call.
    let r = unsafe { libc::umount2(c.as_ptr(), flags) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Mount points from /proc/self/mountinfo (octal escapes decoded).
fn mount_points() -> io::Result<Vec<PathBuf>> {
    Ok(mountinfo()?.into_iter().map(|m| m.point).collect())
}

/// One line of /proc/self/mountinfo, the parts dm uses.
#[derive(Debug, PartialEq)]
struct MountInfo {
    point: PathBuf,
    /// The device number (for a FUSE mount, its connection in fusectl).
    dev: u64,
    fstype: String,
    /// What is mounted (`dm:DOT` for dm's mounts).
    source: String,
}

fn mountinfo() -> io::Result<Vec<MountInfo>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(text.lines().filter_map(parse_mountinfo).collect())
}

/// "ID PARENT MAJOR:MINOR ROOT POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE ..."
fn parse_mountinfo(line: &str) -> Option<MountInfo> {
    let (mount, fs) = line.split_once(" - ")?;
    let mut fields = mount.split(' ');
    let (major, minor) = fields.nth(2)?.split_once(':')?;
    let (major, minor): (u64, u64) = (major.parse().ok()?, minor.parse().ok()?);
    let point = PathBuf::from(OsStr::from_bytes(&unescape_mountinfo(fields.nth(1)?)));
    let mut fs = fs.split(' ');
    Some(MountInfo {
        point,
        dev: (major << 20) | minor,
        fstype: fs.next()?.to_string(),
        source: String::from_utf8_lossy(&unescape_mountinfo(fs.next().unwrap_or_default()))
            .into_owned(),
    })
}

fn unescape_mountinfo(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = oct
                    .iter()
                    .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                if let Ok(byte) = u8::try_from(v) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// FUSE mounts (mount point, connection number) from /proc/self/mountinfo.
/// A FUSE mount's device is anonymous (major 0); its connection in the
/// fusectl filesystem is named by the device number.
fn fuse_mounts() -> io::Result<Vec<(PathBuf, u64)>> {
    Ok(mountinfo()?
        .into_iter()
        .filter(|m| m.fstype == "fuse" || m.fstype.starts_with("fuse."))
        .map(|m| (m.point, m.dev))
        .collect())
}

/// The mount point of the dm mount (of any dm server) that `path` is at
/// or under, if any: from /proc/self/mountinfo, without looking at the
/// path (its server may hang).
pub fn dm_mount_holding(path: &Path) -> io::Result<Option<PathBuf>> {
    Ok(mountinfo()?
        .into_iter()
        .filter(|m| m.fstype.starts_with("fuse") && m.source.starts_with("dm:"))
        .map(|m| m.point)
        .filter(|p| path.starts_with(p))
        .max_by_key(|p| p.as_os_str().len()))
}

/// Mount points of every FUSE filesystem mounted here.
pub fn fuse_mount_points() -> io::Result<Vec<PathBuf>> {
    Ok(fuse_mounts()?.into_iter().map(|(p, _)| p).collect())
}

/// Where the kernel lists FUSE connections (the fusectl filesystem).
const FUSECTL: &str = "/sys/fs/fuse/connections";

/// Aborts the FUSE connection of the mount at `path` through fusectl
/// (mounting it first when nothing is mounted there and this is root), so
/// that every request waiting on it fails with ENOTCONN. For a server that
/// died while one of its own threads waited on one of its mounts (an
/// invalidation waiting for a page it was writing back to itself): such a
/// process never finishes exiting, keeping its socket, its store's lock and
/// its mounts, until the connection is aborted. Returns false when `path`
/// is not a FUSE mount.
pub fn abort_connection(path: &Path) -> io::Result<bool> {
    let Some((_, conn)) = fuse_mounts()?.into_iter().find(|(p, _)| p == path) else {
        return Ok(false);
    };
    let abort = Path::new(FUSECTL).join(conn.to_string()).join("abort");
    if !abort.exists() && is_root() {
        // Debian mounts fusectl at boot; a container may not have it.
        let _ = nix::mount::mount(
            Some("fusectl"),
            FUSECTL,
            Some("fusectl"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        );
    }
    std::fs::write(&abort, b"1").map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "aborting the FUSE connection of {} ({}): {e}",
                path.display(),
                abort.display()
            ),
        )
    })?;
    Ok(true)
}

/// What [`cleanup_stale_mount`] found at a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leftover {
    /// Nothing was mounted there.
    None,
    /// A mount whose server is gone (or does not answer) was detached.
    Detached,
    /// A file system that answers is mounted there: another live server's
    /// (another dm server, started on a copy of the data dir or with the
    /// same mount dir), left alone.
    Live,
}

/// How long [`cleanup_stale_mount`] waits for a mount to answer.
const LEFTOVER_PATIENCE: Duration = Duration::from_secs(5);

/// Unmounts (lazily) a mount left at `path` by a server that is gone (a
/// lookup there gives ENOTCONN, or no answer within 5 s: a server that
/// hangs), so that the path can be mounted again. A mount that answers is
/// another live server's, and is left alone ([`Leftover::Live`]): detaching
/// it sent its writers' files to the disk below.
pub fn cleanup_stale_mount(path: &Path) -> io::Result<Leftover> {
    let answered = answer_all(&[path.to_path_buf()], LEFTOVER_PATIENCE)[0];
    cleanup_stale_mount_probed(path, answered)
}

/// [`cleanup_stale_mount`] given what a probe of `path` found beforehand
/// ([`answer_all`]: `Some(true)`, it answered), for many paths probed at
/// once (probed one after another, a start took 5 s per dead mount).
pub fn cleanup_stale_mount_probed(path: &Path, answered: Option<bool>) -> io::Result<Leftover> {
    // Absolute path without following the (possibly dead) last component.
    let abs = match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) if !parent.as_os_str().is_empty() => {
            parent.canonicalize()?.join(name)
        }
        _ => std::env::current_dir()?.join(path),
    };
    // Nothing here looks at the path itself but the bounded probe: a
    // `stat` of a mount whose server is stopped (SIGSTOP) waited as long
    // as it stayed stopped, and the start with it.
    if !mount_points()?.contains(&abs) {
        return Ok(Leftover::None);
    }
    if answered == Some(true) {
        return Ok(Leftover::Live);
    }
    warn!("unmounting leftover mount at {}", abs.display());
    match unmount_path(&abs, libc::MNT_DETACH) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {} // raced: already gone
        Err(e) => return Err(e),
    }
    Ok(Leftover::Detached)
}

/// Whether the file system at each of `dirs` answers, all asked at once
/// and waited for `patience` in all: a lookup of a name nobody uses in
/// each, which no cache of the kernel answers (a mount root's attributes
/// may be cached long after its server died). `Some(false)`: its server is
/// gone (ENOTCONN, ECONNABORTED); `None`: no answer in time (the thread
/// that asked stays behind until it comes). A missing directory answers.
pub fn answer_all(dirs: &[PathBuf], patience: Duration) -> Vec<Option<bool>> {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let (tx, rx) = std::sync::mpsc::channel();
    for (i, dir) in dirs.iter().enumerate() {
        let probe = dir.join(format!(".dm-probe-{}-{stamp}", std::process::id()));
        let tx = tx.clone();
        // No thread to spare: taken as no answer (detached, as before the
        // probe).
        let _ = std::thread::Builder::new()
            .name("dm-mount-probe".into())
            .spawn(move || {
                let alive = match std::fs::symlink_metadata(&probe) {
                    Err(e) => !matches!(
                        e.raw_os_error(),
                        Some(libc::ENOTCONN) | Some(libc::ECONNABORTED)
                    ),
                    Ok(_) => true,
                };
                let _ = tx.send((i, alive));
            });
    }
    drop(tx);
    let mut out = vec![None; dirs.len()];
    let deadline = std::time::Instant::now() + patience;
    let mut left = dirs.len();
    while left > 0 {
        let wait = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(wait) {
            Ok((i, alive)) => {
                out[i] = Some(alive);
                left -= 1;
            }
            Err(_) => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_are_read_from_mountinfo() {
        let line = "46 27 0:40 / /var/tmp/a\\040b rw,relatime - fuse dm:z rw,user_id=0,group_id=0";
        let fuse = MountInfo {
            point: PathBuf::from("/var/tmp/a b"),
            dev: 40,
            fstype: "fuse".to_string(),
            source: "dm:z".to_string(),
        };
        assert_eq!(parse_mountinfo(line), Some(fuse));
        let other = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw";
        let ext4 = MountInfo {
            point: PathBuf::from("/"),
            dev: (8 << 20) | 1,
            fstype: "ext4".to_string(),
            source: "/dev/sda1".to_string(),
        };
        assert_eq!(parse_mountinfo(other), Some(ext4));
    }

    #[test]
    fn time_round_trip() {
        for t in [
            Timestamp { secs: 0, nanos: 0 },
            Timestamp {
                secs: 1_700_000_000,
                nanos: 123,
            },
            Timestamp {
                secs: -5,
                nanos: 500,
            },
        ] {
            assert_eq!(to_timestamp(to_system_time(t)), t);
        }
    }

    #[test]
    fn mount_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Mount>();
    }

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), b"/a b");
        assert_eq!(unescape_mountinfo(r"/plain"), b"/plain");
        assert_eq!(unescape_mountinfo(r"/x\"), b"/x\\");
    }
}
