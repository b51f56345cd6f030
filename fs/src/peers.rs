//! Coherence between several mounts of the same branch.
//!
//! A branch can be mounted at several paths at once (the path that follows
//! the dot's current branch, a pinned `dot@branch` path, `dm mount` paths,
//! subdot mounts). Each mount has its own kernel caches (attributes, names,
//! pages), kept long because the kernel normally sees every change. A change
//! made through one mount is therefore told to the others: their kernels are
//! asked to drop what the change made stale.
//!
//! The invalidations are sent by one background thread, never by a request
//! handler: a handler that waited on another mount's kernel (which may be
//! waiting on a page lock held by a request of that mount, whose handler may
//! in turn be waiting on us) could deadlock. Peers therefore see a change a
//! moment after the call that made it returned (typically well under a
//! millisecond), not at the same instant; an fsync(2) returns only once
//! the changes published before it have been delivered ([`wait_delivered`]),
//! so that a reader on another mount that is told "synced" reads the data.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use dm_store::BranchFs;
use fuser::INodeNo;
use parking_lot::{Condvar, Mutex};
use tracing::debug;

use crate::Shared;

/// What a change made stale, in store inode numbers.
#[derive(Debug, Clone)]
pub(crate) enum Change {
    /// An inode's attributes (size, times, mode, link count, ...).
    Attr(u64),
    /// An inode's attributes and cached pages from `offset` on (`len` bytes;
    /// 0 = to the end of the file).
    Data { ino: u64, offset: u64, len: u64 },
    /// A name in a directory (unlinked, renamed away or replaced, or created
    /// where the other mount may cache it as absent).
    Entry { parent: u64, name: Vec<u8> },
    /// The `security.capability` xattr of an inode (see `Shared::no_caps`).
    Caps(u64),
}

/// A batch of changes to deliver to the other mounts of one branch.
struct Job {
    /// Its place in the order of publication (1, 2, ...).
    seq: u64,
    branch: usize,
    targets: Vec<Weak<Shared>>,
    changes: Vec<Change>,
}

struct Registry {
    /// Branch (address of its `BranchFs`) -> the mounts showing it.
    groups: Mutex<HashMap<usize, Vec<Weak<Shared>>>>,
    /// Number of groups with more than one mount: zero means no work at all.
    shared_groups: AtomicUsize,
    /// The sender, and the sequence number of the last job sent.
    jobs: Mutex<(Sender<Job>, u64)>,
    /// The sequence number of the last job delivered.
    delivered: Mutex<u64>,
    delivered_cv: Condvar,
}

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        let spawned = std::thread::Builder::new()
            .name("dm-fs-peers".into())
            .spawn(move || {
                for job in rx {
                    deliver(&job);
                    let reg = registry();
                    *reg.delivered.lock() = job.seq;
                    reg.delivered_cv.notify_all();
                }
            });
        if let Err(e) = spawned {
            // Without the thread, jobs pile up in the channel unseen: peers
            // then stay coherent only through switch(). Say so loudly.
            tracing::error!("cannot start the mount coherence thread: {e}");
        }
        Registry {
            groups: Mutex::new(HashMap::new()),
            shared_groups: AtomicUsize::new(0),
            jobs: Mutex::new((tx, 0)),
            delivered: Mutex::new(0),
            delivered_cv: Condvar::new(),
        }
    })
}

fn key(fs: &Arc<BranchFs>) -> usize {
    Arc::as_ptr(fs) as usize
}

/// Adds a mount to the group of the branch it shows.
pub(crate) fn join(fs: &Arc<BranchFs>, me: &Arc<Shared>) {
    let reg = registry();
    let mut groups = reg.groups.lock();
    let members = groups.entry(key(fs)).or_default();
    members.retain(|w| w.strong_count() > 0);
    members.push(Arc::downgrade(me));
    if members.len() == 2 {
        reg.shared_groups.fetch_add(1, Ordering::Relaxed);
    }
}

/// Removes a mount from the group of `fs` (after a switch, or at unmount).
pub(crate) fn leave(fs: &Arc<BranchFs>, me: &Arc<Shared>) {
    leave_ptr(key(fs), Arc::as_ptr(me));
}

fn leave_ptr(branch: usize, me: *const Shared) {
    let reg = registry();
    let mut groups = reg.groups.lock();
    let Some(members) = groups.get_mut(&branch) else {
        return;
    };
    let before = members.len();
    members.retain(|w| w.strong_count() > 0 && w.as_ptr() != me);
    if before >= 2 && members.len() < 2 {
        reg.shared_groups.fetch_sub(1, Ordering::Relaxed);
    }
    if members.is_empty() {
        groups.remove(&branch);
    }
}

/// Tells every other mount of `fs`'s branch about `changes` made through
/// the mount `me`. Cheap when the branch has a single mount.
pub(crate) fn publish(fs: &Arc<BranchFs>, me: &Shared, changes: impl FnOnce() -> Vec<Change>) {
    let reg = registry();
    if reg.shared_groups.load(Ordering::Relaxed) == 0 {
        return;
    }
    let branch = key(fs);
    let targets: Vec<Weak<Shared>> = {
        let groups = reg.groups.lock();
        match groups.get(&branch) {
            Some(members) if members.len() > 1 => members
                .iter()
                .filter(|w| !std::ptr::eq(w.as_ptr(), me))
                .cloned()
                .collect(),
            _ => return,
        }
    };
    send(reg, branch, targets, changes());
}

/// Like [`publish`], but this mount's own kernel is told too (for changes
/// the kernel did not make itself, such as set-id bits cleared on write).
/// Never call the notifier from a request handler directly: the kernel may
/// hold page locks of that very request.
pub(crate) fn publish_all(fs: &Arc<BranchFs>, me: &Arc<Shared>, changes: Vec<Change>) {
    let reg = registry();
    let branch = key(fs);
    let mut targets: Vec<Weak<Shared>> =
        reg.groups.lock().get(&branch).cloned().unwrap_or_default();
    if !targets
        .iter()
        .any(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(me)))
    {
        targets.push(Arc::downgrade(me));
    }
    send(reg, branch, targets, changes);
}

/// Queues a job for the coherence thread, numbered in the order sent.
fn send(reg: &Registry, branch: usize, targets: Vec<Weak<Shared>>, changes: Vec<Change>) {
    let mut jobs = reg.jobs.lock();
    let seq = jobs.1 + 1;
    let job = Job {
        seq,
        branch,
        targets,
        changes,
    };
    match jobs.0.send(job) {
        Ok(()) => jobs.1 = seq,
        Err(_) => debug!("mount coherence thread is gone; invalidation dropped"),
    }
}

/// How long an fsync waits for the invalidations before it to be delivered.
/// Bounded: the delivery waits on the other mounts' kernels, which may wait
/// for a request of theirs that no handler thread is free to serve while
/// their handlers wait here (fsyncs on both mounts).
const DELIVERY_WAIT: Duration = Duration::from_secs(1);

/// Waits (up to [`DELIVERY_WAIT`]) until every change published so far has
/// been delivered to the other mounts, so that what a caller made durable
/// is also what they read. Returns at once when no branch has two mounts.
pub(crate) fn wait_delivered() {
    if !active() {
        return;
    }
    let reg = registry();
    let target = reg.jobs.lock().1;
    let deadline = Instant::now() + DELIVERY_WAIT;
    let mut delivered = reg.delivered.lock();
    while *delivered < target {
        if reg
            .delivered_cv
            .wait_until(&mut delivered, deadline)
            .timed_out()
        {
            debug!("fsync: peer invalidations still pending after {DELIVERY_WAIT:?}");
            return;
        }
    }
}

/// Sends one job's invalidations to each target that still shows the branch.
fn deliver(job: &Job) {
    for target in &job.targets {
        let Some(shared) = target.upgrade() else {
            continue;
        };
        let Some(notifier) = shared.notifier.get() else {
            continue; // not mounted yet: its kernel has cached nothing
        };
        // Map store inodes to this mount's FUSE inodes; a mount switched
        // to another branch meanwhile was fully invalidated by switch().
        let mapped: Vec<Change> = {
            let view = shared.view.read();
            if key(&view.fs) != job.branch {
                continue;
            }
            job.changes
                .iter()
                .map(|c| match c {
                    Change::Attr(i) => Change::Attr(view.to_fuse(*i).0),
                    Change::Data { ino, offset, len } => Change::Data {
                        ino: view.to_fuse(*ino).0,
                        offset: *offset,
                        len: *len,
                    },
                    Change::Entry { parent, name } => Change::Entry {
                        parent: view.to_fuse(*parent).0,
                        name: name.clone(),
                    },
                    Change::Caps(i) => Change::Caps(*i),
                })
                .collect()
        };
        for c in mapped {
            // ENOENT: that mount's kernel has nothing cached for it.
            let res = match &c {
                Change::Attr(ino) => notifier.inval_inode(INodeNo(*ino), -1, 0),
                Change::Data { ino, offset, len } => notifier.inval_inode(
                    INodeNo(*ino),
                    i64::try_from(*offset).unwrap_or(i64::MAX),
                    i64::try_from(*len).unwrap_or(0),
                ),
                Change::Entry { parent, name } => {
                    notifier.inval_entry(INodeNo(*parent), OsStr::from_bytes(name))
                }
                Change::Caps(ino) => {
                    let mut nc = shared.no_caps.lock();
                    nc.generation += 1;
                    nc.inos.remove(ino);
                    Ok(())
                }
            };
            if let Err(e) = res {
                debug!("peer invalidation {c:?}: {e}");
            }
        }
    }
}

/// Removes a mount from whatever group it is in (unmount).
pub(crate) fn leave_all(me: &Arc<Shared>) {
    let branch = key(&me.view.read().fs);
    leave_ptr(branch, Arc::as_ptr(me));
}

/// Whether any branch is shown by more than one mount (extra work to tell
/// peers is worth doing only then).
pub(crate) fn active() -> bool {
    registry().shared_groups.load(Ordering::Relaxed) > 0
}
