//! The store: dots, branches, commits and the registry of branch working
//! states. Each commit, reset, branch and ref update is one atomic, synced
//! RocksDB write batch.

use crate::branch::BranchFs;
use crate::db::{Db, StoreOptions, CF_META};
use crate::diff::Change;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::inode::{FileKind, InodeRec};
use crate::keys;
use crate::meta::{self, BranchRec, DotRec};
use crate::names::{self, DotName, MASTER};
use crate::object::{self, Commit};
use crate::tree;
use crate::view::{clear_overlay, View};
use parking_lot::Mutex;
use rocksdb::WriteBatch;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Default block size of new dots.
pub const DEFAULT_BLOCK_SIZE: u32 = 64 * 1024;
/// Largest block size a dot may have.
pub const MAX_BLOCK_SIZE: u32 = 4 << 20;

/// A dot as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DotInfo {
    pub name: DotName,
    pub id: u64,
    pub block_size: u32,
    pub created_ns: u64,
    pub current_branch: String,
    /// The branch checked out before the current one, while it exists
    /// (git's `@{-1}`, for `dm checkout -`).
    pub previous_branch: Option<String>,
    pub branches: Vec<String>,
}

/// A branch as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BranchInfo {
    pub name: String,
    pub head: Option<Id>,
    /// Commits reachable from the head (its generation).
    pub commits: u64,
    /// The branch and commit this one was created from.
    pub origin: Option<(String, Id)>,
    /// Bytes of file data written since the head commit.
    pub dirty_bytes: u64,
    /// Whether anything changed since the head commit, data or not (a
    /// delete, a truncate, a chmod write no data).
    pub uncommitted: bool,
    /// Apparent size of the working state's files.
    pub size: u64,
}

/// `Ok(None)` for a dot or branch that a listing found but another client
/// deleted before its details were read: not listed, rather than failing
/// the whole listing.
pub fn gone_meanwhile<T>(r: Result<T>) -> Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// What a commit records besides the snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitRequest {
    pub message: String,
    pub author: String,
    pub metadata: BTreeMap<String, String>,
}

/// A commit as shown by log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitInfo {
    pub id: Id,
    pub parents: Vec<Id>,
    pub author: String,
    pub message: String,
    pub timestamp_ns: u64,
    pub metadata: BTreeMap<String, String>,
    pub generation: u64,
}

impl CommitInfo {
    fn from(id: Id, c: Commit) -> CommitInfo {
        CommitInfo {
            id,
            parents: c.parents,
            author: c.author,
            message: c.message,
            timestamp_ns: c.timestamp_ns,
            metadata: c.metadata,
            generation: c.generation,
        }
    }
}

/// The store: one RocksDB database holding every dot of the host.
pub struct Store {
    pub(crate) db: Arc<Db>,
    dir: PathBuf,
    /// Open branch working states, by (dot id, branch name).
    branches: Mutex<HashMap<(u64, String), Arc<BranchFs>>>,
    /// Serialises changes to dot and branch records.
    pub(crate) admin: Mutex<()>,
    pub(crate) gc_lock: Mutex<()>,
    /// When the last GC ended (or the store opened), and the bytes it
    /// held on the disk then (see [`Store::gc_due`]).
    pub(crate) gc_base: Mutex<(std::time::Instant, u64)>,
    /// A dot or branch was deleted since the last GC started (its data is
    /// garbage now: see [`Store::gc_due`]).
    pub(crate) deleted_since_gc: std::sync::atomic::AtomicBool,
    /// Set by [`Store::stop_gc`]: a running GC stops at its next step.
    pub(crate) gc_stopped: std::sync::atomic::AtomicBool,
    /// Runs between GC's mark and its sweep (tests of what happens there).
    #[cfg(test)]
    pub(crate) gc_after_mark: Mutex<Option<GcHook>>,
}

/// Most bytes of message, author and metadata one commit carries.
pub const MAX_COMMIT_TEXT: usize = 1 << 20;

/// See `Store::gc_after_mark`.
#[cfg(test)]
pub(crate) type GcHook = Box<dyn Fn(&Store) + Send>;

impl Drop for Store {
    fn drop(&mut self) {
        // The stage worker lets go of this store, so it is closed (and can
        // be reopened) once the last reference goes.
        crate::stage::close(&self.db);
    }
}

impl Store {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Arc<Store>> {
        Store::open_with(dir, StoreOptions::default())
    }

    pub fn open_with(dir: &Path, opts: StoreOptions) -> Result<Arc<Store>> {
        let db = Arc::new(Db::open(dir, opts)?);
        let store = Arc::new(Store {
            db,
            dir: dir.to_path_buf(),
            branches: Mutex::new(HashMap::new()),
            admin: Mutex::new(()),
            gc_lock: Mutex::new(()),
            gc_base: Mutex::new((std::time::Instant::now(), 0)),
            deleted_since_gc: Default::default(),
            gc_stopped: Default::default(),
            #[cfg(test)]
            gc_after_mark: Mutex::new(None),
        });
        store.gc_base.lock().1 = store.stored_bytes()?;
        if store
            .meta_get::<()>(meta::GC_DUE_KEY, "whether a GC is due")?
            .is_some()
        {
            store
                .deleted_since_gc
                .store(true, std::sync::atomic::Ordering::Release);
        }
        Ok(store)
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    // ---- records ----

    pub(crate) fn meta_get<T: for<'de> Deserialize<'de>>(
        &self,
        key: &[u8],
        what: &str,
    ) -> Result<Option<T>> {
        let v = self
            .db
            .db
            .get_cf(self.db.cf(CF_META), key)
            .map_err(Error::db(format!("reading {what}")))?;
        match v {
            None => Ok(None),
            Some(b) => postcard::from_bytes(&b)
                .map(Some)
                .map_err(|e| Error::Corrupt(format!("{what} record does not decode: {e}"))),
        }
    }

    pub(crate) fn meta_put<T: Serialize>(&self, batch: &mut WriteBatch, key: &[u8], v: &T) {
        batch.put_cf(
            self.db.cf(CF_META),
            key,
            postcard::to_stdvec(v).expect("postcard into Vec cannot fail"),
        );
    }

    pub(crate) fn meta_scan(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        let mut it = self.db.iter_until(CF_META, crate::db::prefix_end(prefix));
        it.seek(prefix);
        while it.valid() {
            match (it.key(), it.value()) {
                (Some(k), Some(v)) if k.starts_with(prefix) => out.push((k.to_vec(), v.to_vec())),
                _ => break,
            }
            it.next();
        }
        it.status().map_err(Error::db("listing records"))?;
        Ok(out)
    }

    /// Reserves `n` consecutive ids (dot ids and branch overlay ids share
    /// one counter; 0 is never handed out). Call with `admin` held; the
    /// batch writes the bumped counter.
    pub(crate) fn next_ids(&self, batch: &mut WriteBatch, n: u64) -> Result<u64> {
        let cur = self.id_limit()?;
        self.meta_put(batch, meta::NEXT_ID_KEY, &(cur + n));
        Ok(cur)
    }

    /// The next id [`Store::next_ids`] would hand out: every id in use is
    /// below it.
    pub(crate) fn id_limit(&self) -> Result<u64> {
        Ok(self
            .meta_get(meta::NEXT_ID_KEY, "the id counter")?
            .unwrap_or(1))
    }

    pub(crate) fn dot_rec(&self, dot: &DotName) -> Result<DotRec> {
        self.meta_get(&meta::dot_key(&dot.namespace, &dot.name), "dot")?
            .ok_or_else(|| Error::NotFound {
                what: "dot",
                name: dot.to_string(),
            })
    }

    pub(crate) fn branch_rec(&self, d: &DotRec, branch: &str) -> Result<BranchRec> {
        self.meta_get(&meta::branch_key(d.id, branch), "branch")?
            .ok_or_else(|| Error::NotFound {
                what: "branch",
                name: format!("{branch} of dot {}", dot_name(d)),
            })
    }

    pub(crate) fn branch_recs(&self, d: &DotRec) -> Result<Vec<(String, BranchRec)>> {
        let prefix = meta::branch_prefix(d.id);
        self.meta_scan(&prefix)?
            .into_iter()
            .map(|(k, v)| {
                let name = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                let rec = postcard::from_bytes(&v)
                    .map_err(|e| Error::Corrupt(format!("branch record {name}: {e}")))?;
                Ok((name, rec))
            })
            .collect()
    }

    /// Every branch record of every dot (GC, fsck).
    pub(crate) fn all_branch_recs(&self) -> Result<Vec<BranchRec>> {
        self.meta_scan(meta::BRANCH_PREFIX)?
            .into_iter()
            .map(|(_, v)| {
                postcard::from_bytes(&v).map_err(|e| Error::Corrupt(format!("branch record: {e}")))
            })
            .collect()
    }

    pub(crate) fn fs_for(&self, d: &DotRec, branch: &str) -> Result<Arc<BranchFs>> {
        let mut reg = self.branches.lock();
        let key = (d.id, branch.to_string());
        if let Some(fs) = reg.get(&key) {
            return Ok(fs.clone());
        }
        // The record is read under the registry lock, which deletions hold
        // while they write: one read earlier could predate a deletion, and
        // opening it would write into an overlay nothing deletes any more.
        let rec = &self.branch_rec(d, branch)?;
        let fs = Arc::new(BranchFs::new(
            self.db.clone(),
            dot_name(d),
            branch.to_string(),
            rec.bid,
            d.block_size,
            self.dir.clone(),
            rec.head,
            rec.root,
        )?);
        reg.insert(key, fs.clone());
        Ok(fs)
    }

    fn dot_info_of(&self, d: &DotRec) -> Result<DotInfo> {
        let branches: Vec<String> = self.branch_recs(d)?.into_iter().map(|(n, _)| n).collect();
        let previous_branch = self
            .meta_get::<String>(&meta::previous_branch_key(d.id), "the previous branch")?
            .filter(|p| *p != d.current_branch && branches.contains(p));
        Ok(DotInfo {
            name: dot_name(d),
            id: d.id,
            block_size: d.block_size,
            created_ns: d.created_ns,
            current_branch: d.current_branch.clone(),
            previous_branch,
            branches,
        })
    }

    /// Gives the branch an empty working state over its (new) head: a fresh
    /// overlay id, and a range deletion of the old overlay. Call with
    /// `admin` held; the caller writes `rec` and sets the state's `bid`.
    pub(crate) fn fresh_working_state(
        &self,
        batch: &mut WriteBatch,
        rec: &mut BranchRec,
    ) -> Result<()> {
        clear_overlay(&self.db, batch, rec.bid);
        rec.bid = self.next_ids(batch, 1)?;
        Ok(())
    }

    /// Writes the overlay entries of a fresh tree (superblock and root
    /// directory) for branch overlay `bid`.
    fn fresh_overlay(&self, batch: &mut WriteBatch, bid: u64, empty_root: Id) {
        let mut tx = crate::view::Tx::new(View {
            db: &self.db,
            bid,
            root: empty_root,
        });
        for (k, v) in BranchFs::fresh_entries(self.db.opts.owner) {
            tx.put(k, v);
        }
        tx.write_into(batch);
    }

    // ---- dots ----

    /// Creates a dot with an empty `master` branch.
    pub fn create_dot(&self, dot: &DotName, block_size: Option<u32>) -> Result<DotInfo> {
        names::validate_new("namespace", &dot.namespace)?;
        names::validate_new("dot", &dot.name)?;
        let block_size = block_size.unwrap_or(DEFAULT_BLOCK_SIZE);
        if !(4096..=MAX_BLOCK_SIZE).contains(&block_size) || !block_size.is_power_of_two() {
            return Err(Error::Refused(format!(
                "block size {block_size} is not a power of two between 4 KiB and 4 MiB"
            )));
        }
        let _a = self.admin.lock();
        // Ref and object writes finish before a GC starts marking (see Db::gc_barrier).
        let _b = self.db.gc_barrier.read_recursive();
        let key = meta::dot_key(&dot.namespace, &dot.name);
        if self.meta_get::<DotRec>(&key, "dot")?.is_some() {
            return Err(Error::AlreadyExists {
                what: "dot",
                name: dot.to_string(),
            });
        }
        let mut batch = WriteBatch::default();
        let id = self.next_ids(&mut batch, 2)?;
        let bid = id + 1;
        let (empty, bytes) = tree::empty();
        self.db.put_object(&mut batch, &empty, &bytes);
        let rec = DotRec {
            id,
            namespace: dot.namespace.clone(),
            name: dot.name.clone(),
            block_size,
            created_ns: crate::inode::Timestamp::now().as_nanos(),
            current_branch: MASTER.to_string(),
        };
        self.meta_put(&mut batch, &key, &rec);
        let master = BranchRec {
            bid,
            head: None,
            root: empty,
            origin: None,
        };
        self.meta_put(&mut batch, &meta::branch_key(id, MASTER), &master);
        self.fresh_overlay(&mut batch, bid, empty);
        self.db.write(batch, true, &format!("creating dot {dot}"))?;
        self.dot_info_of(&rec)
    }

    pub fn list_dots(&self) -> Result<Vec<DotInfo>> {
        let mut out = Vec::new();
        for (_, v) in self.meta_scan(meta::DOT_PREFIX)? {
            let d: DotRec =
                postcard::from_bytes(&v).map_err(|e| Error::Corrupt(format!("dot record: {e}")))?;
            if let Some(info) = gone_meanwhile(self.dot_info_of(&d))? {
                out.push(info);
            }
        }
        Ok(out)
    }

    pub fn dot_info(&self, dot: &DotName) -> Result<DotInfo> {
        self.dot_info_of(&self.dot_rec(dot)?)
    }

    /// Deletes a dot and all its branches; its data is reclaimed by GC.
    pub fn delete_dot(&self, dot: &DotName) -> Result<()> {
        let _a = self.admin.lock();
        // Ref and object writes finish before a GC starts marking (see Db::gc_barrier).
        let _b = self.db.gc_barrier.read_recursive();
        let d = self.dot_rec(dot)?;
        let mut batch = WriteBatch::default();
        let recs = self.branch_recs(&d)?;
        for (name, rec) in &recs {
            batch.delete_cf(self.db.cf(CF_META), meta::branch_key(d.id, name));
            clear_overlay(&self.db, &mut batch, rec.bid);
        }
        batch.delete_cf(self.db.cf(CF_META), meta::dot_key(&d.namespace, &d.name));
        batch.delete_cf(self.db.cf(CF_META), meta::previous_branch_key(d.id));
        let names: Vec<String> = recs.into_iter().map(|(n, _)| n).collect();
        self.write_deleting_branches(d.id, &names, batch, &format!("deleting dot {dot}"))?;
        // What interrupted transfers into it left goes too.
        self.db.forget_resumable(&dot.to_string());
        Ok(())
    }

    /// Writes `batch` (which deletes the records and overlays of dot
    /// `dot_id`'s branches `names`) while no write to those branches is in
    /// flight, then marks their open working states deleted. A write that
    /// landed after the batch's range deletion would leave overlay keys,
    /// and the chunks they name, that nothing deletes; so in-flight
    /// operations (which hold their branch's state) finish first, and the
    /// registry stays locked so that no one opens the branches meanwhile
    /// (see [`Store::fs_for`]).
    fn write_deleting_branches(
        &self,
        dot_id: u64,
        names: &[String],
        mut batch: WriteBatch,
        what: &str,
    ) -> Result<()> {
        self.meta_put(&mut batch, meta::GC_DUE_KEY, &());
        let mut reg = self.branches.lock();
        let open: Vec<Arc<BranchFs>> = names
            .iter()
            .filter_map(|n| reg.get(&(dot_id, n.clone())).cloned())
            .collect();
        // Lock order: registry, then branch states (no one holds a state
        // while taking the registry).
        let mut states: Vec<_> = open.iter().map(|fs| fs.state.write()).collect();
        self.db.write(batch, true, what)?;
        self.deleted_since_gc
            .store(true, std::sync::atomic::Ordering::Release);
        for st in &mut states {
            st.deleted = true;
        }
        drop(states);
        for n in names {
            reg.remove(&(dot_id, n.clone()));
        }
        for fs in open {
            fs.drop_buffers();
        }
        Ok(())
    }

    /// Sets the branch that unpinned mounts of the dot follow.
    pub fn set_current_branch(&self, dot: &DotName, branch: &str) -> Result<()> {
        let _a = self.admin.lock();
        // Ref and object writes finish before a GC starts marking (see Db::gc_barrier).
        let _b = self.db.gc_barrier.read_recursive();
        let mut d = self.dot_rec(dot)?;
        self.branch_rec(&d, branch)?;
        let mut batch = WriteBatch::default();
        if d.current_branch != branch {
            self.meta_put(
                &mut batch,
                &meta::previous_branch_key(d.id),
                &d.current_branch,
            );
        }
        d.current_branch = branch.to_string();
        self.meta_put(&mut batch, &meta::dot_key(&d.namespace, &d.name), &d);
        self.db.write(batch, true, "switching branch")
    }

    // ---- branches ----

    pub fn list_branches(&self, dot: &DotName) -> Result<Vec<BranchInfo>> {
        let d = self.dot_rec(dot)?;
        let mut out = Vec::new();
        for (n, r) in self.branch_recs(&d)? {
            if let Some(info) = gone_meanwhile(self.branch_info_of(&d, &n, &r))? {
                out.push(info);
            }
        }
        Ok(out)
    }

    pub fn branch_info(&self, dot: &DotName, branch: &str) -> Result<BranchInfo> {
        let d = self.dot_rec(dot)?;
        let r = self.branch_rec(&d, branch)?;
        self.branch_info_of(&d, branch, &r)
    }

    fn branch_info_of(&self, d: &DotRec, name: &str, r: &BranchRec) -> Result<BranchInfo> {
        let fs = self.fs_for(d, name)?;
        let st = fs.state.read();
        let (commits, base_size) = match st.head {
            Some(h) => {
                let c = self.db.commit(&h)?;
                (c.generation, c.size)
            }
            None => (0, 0),
        };
        let view = fs.view(&st);
        let unflushed = fs.unflushed();
        let (mut dirty, buffered) = (unflushed.bytes, unflushed.blocks);
        let mut delta: i128 = 0;
        // Open files with no link left are no one's work (see commit).
        let orphans = crate::diff::orphan_inos(&view)?;
        view.for_each_change(&mut |k, v| {
            if crate::diff::is_orphan_key(k, &orphans) {
                return Ok(());
            }
            match keys::parse(k) {
                // Counted as buffered.
                Some((ino, keys::TAG_BLOCK))
                    if keys::parse_block(k).is_some_and(|i| buffered.contains(&(ino, i))) => {}
                Some((_, keys::TAG_BLOCK)) => match v {
                    Some(v) if crate::patch::is_patched(v) => {
                        dirty += crate::patch::Patched::parse(v, fs.block_size)?.len as u64;
                    }
                    Some(v) => dirty += keys::parse_block_value(v).map_or(0, |(_, l)| l as u64),
                    None => {}
                },
                Some((ino, keys::TAG_INODE)) if ino != keys::SUPER_INO => {
                    delta += file_size(ino, v)? as i128;
                    delta -= file_size(ino, tree::get(&*self.db, &st.root, k)?.as_deref())? as i128;
                }
                _ => {}
            }
            Ok(())
        })?;
        // Files being written: their buffers' sizes, not their records'.
        for (ino, size) in unflushed.sizes {
            if !orphans.contains(&ino) {
                let rec = view.get(&keys::inode(ino))?;
                delta += size as i128 - file_size(ino, rec.as_deref())? as i128;
            }
        }
        Ok(BranchInfo {
            name: name.to_string(),
            head: st.head,
            commits,
            origin: r.origin.clone(),
            dirty_bytes: dirty,
            uncommitted: dirty > 0 || Self::uncommitted_in(&fs, &st)?,
            size: (base_size as i128 + delta).max(0) as u64,
        })
    }

    /// Creates `new` from commit `from` (default: the current branch's head).
    /// O(1): no data is copied.
    pub fn create_branch(&self, dot: &DotName, new: &str, from: Option<Id>) -> Result<BranchInfo> {
        self.create_branch_from(dot, new, from, None)
    }

    /// The fork point of branch record `rec` (the commit it grew from)
    /// once its head moves to `head` (a reset, or a pull or push that
    /// replaced the branch): the newest commit of the new history that the
    /// origin branch has, as git's merge-base (`dm dot show` named a commit
    /// the branch no longer had, and a push to a hub without the origin
    /// branch made it there at that commit); with none in common, the
    /// branch no longer grows from it.
    pub(crate) fn refork(&self, d: &DotRec, rec: &mut BranchRec, head: Id) -> Result<()> {
        let Some((origin, _)) = &rec.origin else {
            return Ok(());
        };
        let theirs: HashSet<Id> = match self.branch_rec(d, origin) {
            Ok(r) => self.ancestry(r.head)?.into_iter().collect(),
            Err(Error::NotFound { .. }) => HashSet::new(),
            Err(e) => return Err(e),
        };
        rec.origin = self
            .newest_shared(Some(head), &theirs)?
            .map(|c| (origin.clone(), c));
        Ok(())
    }

    /// The other side of [`Store::refork`]: once `branch` moves to `head`
    /// (a reset, a pull), the branches grown from it at a commit the new
    /// history lacks grow from the newest commit of their history the new
    /// one has (the origin reset to before a fork point left it stale), or
    /// from none. Puts the changed records into `batch`.
    pub(crate) fn refork_grown_from(
        &self,
        d: &DotRec,
        batch: &mut WriteBatch,
        branch: &str,
        head: Id,
    ) -> Result<()> {
        let grown: Vec<(String, BranchRec)> = self
            .branch_recs(d)?
            .into_iter()
            .filter(|(_, r)| r.origin.as_ref().is_some_and(|(o, _)| o == branch))
            .collect();
        if grown.is_empty() {
            return Ok(());
        }
        let theirs: HashSet<Id> = self.ancestry(Some(head))?.into_iter().collect();
        for (name, mut r) in grown {
            // Still shared (a commit or fast-forward of the origin): kept,
            // without a walk of each branch's history (a hub's master with
            // thousands of branches grown from it).
            if r.origin.as_ref().is_some_and(|(_, f)| theirs.contains(f)) {
                continue;
            }
            let fork = self.newest_shared(r.head, &theirs)?;
            if r.origin.as_ref().map(|(_, f)| *f) != fork {
                r.origin = fork.map(|c| (branch.to_string(), c));
                self.meta_put(batch, &meta::branch_key(d.id, &name), &r);
            }
        }
        Ok(())
    }

    /// The newest commit of `head`'s history that is in `theirs`.
    fn newest_shared(&self, head: Option<Id>, theirs: &HashSet<Id>) -> Result<Option<Id>> {
        // Newest first (see `ancestry`).
        Ok(self
            .ancestry(head)?
            .into_iter()
            .find(|c| theirs.contains(c)))
    }

    /// [`Store::create_branch`] that records `origin` as the branch it grew
    /// from when `from` is in that branch's history (the user named it:
    /// `dm checkout -b NEW origin~2`); otherwise the current branch if it
    /// has `from`, else a branch that has it.
    pub fn create_branch_from(
        &self,
        dot: &DotName,
        new: &str,
        from: Option<Id>,
        origin: Option<&str>,
    ) -> Result<BranchInfo> {
        names::validate_new("branch", new)?;
        let _a = self.admin.lock();
        // Ref and object writes finish before a GC starts marking (see Db::gc_barrier).
        let _b = self.db.gc_barrier.read_recursive();
        let d = self.dot_rec(dot)?;
        if self.branch_rec(&d, new).is_ok() {
            return Err(Error::AlreadyExists {
                what: "branch",
                name: format!("{new} of dot {dot}"),
            });
        }
        let mut cur_name = d.current_branch.clone();
        let start = match from {
            Some(id) => Some(id),
            None => self.fs_for(&d, &cur_name)?.head(),
        };
        // Started at another branch's commit: it grew from that branch.
        if let Some(id) = from {
            let has = |head: Option<Id>| -> Result<bool> {
                Ok(head.is_some() && self.ancestry(head)?.contains(&id))
            };
            let named = match origin.map(|o| self.branch_rec(&d, o)) {
                Some(Ok(r)) => has(r.head)?,
                _ => false,
            };
            if let (true, Some(o)) = (named, origin) {
                cur_name = o.to_string();
            } else if !has(self.fs_for(&d, &cur_name)?.head())? {
                for (name, r) in self.branch_recs(&d)? {
                    if has(r.head)? {
                        cur_name = name;
                        break;
                    }
                }
            }
        }
        let mut batch = WriteBatch::default();
        let bid = self.next_ids(&mut batch, 1)?;
        let rec = match start {
            Some(id) => {
                // Young before it is looked for, as in `set_branch_head`: a
                // GC that marked before another branch let go of the commit
                // keeps it, and one that starts later sees this branch.
                self.db.note_young(&id);
                let c = self.db.commit(&id).map_err(|_| Error::NotFound {
                    what: "commit",
                    name: id.to_hex(),
                })?;
                BranchRec {
                    bid,
                    head: Some(id),
                    root: c.root,
                    origin: Some((cur_name, id)),
                }
            }
            None => {
                let (empty, bytes) = tree::empty();
                self.db.put_object(&mut batch, &empty, &bytes);
                self.fresh_overlay(&mut batch, bid, empty);
                BranchRec {
                    bid,
                    head: None,
                    root: empty,
                    origin: None,
                }
            }
        };
        self.meta_put(&mut batch, &meta::branch_key(d.id, new), &rec);
        self.db
            .write(batch, true, &format!("creating branch {new} of dot {dot}"))?;
        self.branch_info_of(&d, new, &rec)
    }

    /// Deletes a branch. Refuses the dot's current branch, and unless
    /// `force` a branch with uncommitted changes or with commits no other
    /// branch has (as git's `branch -d`). Branches that grew from it lose
    /// their origin.
    pub fn delete_branch(&self, dot: &DotName, branch: &str, force: bool) -> Result<()> {
        let _a = self.admin.lock();
        // Ref and object writes finish before a GC starts marking (see Db::gc_barrier).
        let _b = self.db.gc_barrier.read_recursive();
        let d = self.dot_rec(dot)?;
        let rec = self.branch_rec(&d, branch)?;
        self.refuse_branch_delete(&d, branch, force)?;
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.db.cf(CF_META), meta::branch_key(d.id, branch));
        // The branches that grew from it no longer name it as their origin
        // (`dm dot show` would name a branch that is gone, and a push would
        // make it again on the hub).
        for (name, mut r) in self.branch_recs(&d)? {
            if r.origin.as_ref().is_some_and(|(o, _)| o == branch) {
                r.origin = None;
                self.meta_put(&mut batch, &meta::branch_key(d.id, &name), &r);
            }
        }
        clear_overlay(&self.db, &mut batch, rec.bid);
        self.write_deleting_branches(
            d.id,
            &[branch.to_string()],
            batch,
            &format!("deleting branch {branch} of dot {dot}"),
        )
    }

    /// Whether [`Store::delete_branch`] would refuse, without deleting
    /// anything (so that callers can check before they unmount).
    pub fn check_branch_delete(&self, dot: &DotName, branch: &str, force: bool) -> Result<()> {
        let d = self.dot_rec(dot)?;
        self.branch_rec(&d, branch)?;
        self.refuse_branch_delete(&d, branch, force)
    }

    fn refuse_branch_delete(&self, d: &DotRec, branch: &str, force: bool) -> Result<()> {
        let dot = dot_name(d);
        if d.current_branch == branch {
            return Err(Error::Refused(format!(
                "branch {branch} is the current branch of dot {dot}; check out another branch first"
            )));
        }
        if !force {
            // Branches that grew from it keep their commits (their origin,
            // which names it, is cleared by the delete): no reason to
            // refuse. Unlike a git branch, a dm branch has its own working state:
            // deleting it would discard what was not committed there.
            let fs = self.fs_for(d, branch)?;
            let (uncommitted, head) = {
                let st = fs.state.read();
                (Self::uncommitted_in(&fs, &st)?, st.head)
            };
            if uncommitted {
                return Err(Error::Refused(format!(
                    "branch {branch} of dot {dot} has uncommitted changes, which deleting it destroys: \
                     commit them on it (`dm --dot {dot} commit --branch {branch} -m MSG`), or use \
                     `dm branch -D {branch}` to delete it anyway"
                )));
            }
            // As git's `branch -d`: commits no other branch has would go.
            if let Some((h, subject)) = self.unique_head_of(d, branch, head)? {
                return Err(Error::Refused(format!(
                    "branch {branch} of dot {dot} has commits no other branch has (head {}, \"{subject}\"); \
                     deleting it destroys them: use `dm branch -D {branch}` to delete it anyway",
                    &h.to_hex()[..12],
                )));
            }
        }
        Ok(())
    }

    /// The head of `branch` and its subject line when the branch has
    /// commits no other branch of the dot reaches (deleting it would
    /// destroy them); None when it has none of its own.
    pub fn unique_head(&self, dot: &DotName, branch: &str) -> Result<Option<(Id, String)>> {
        let d = self.dot_rec(dot)?;
        let head = self.branch_rec(&d, branch)?.head;
        self.unique_head_of(&d, branch, head)
    }

    fn unique_head_of(
        &self,
        d: &DotRec,
        branch: &str,
        head: Option<Id>,
    ) -> Result<Option<(Id, String)>> {
        let Some(h) = head else { return Ok(None) };
        if self.reachable_from_others(d, &h, Some(branch))? {
            return Ok(None);
        }
        let c = self.db.commit(&h)?;
        Ok(Some((
            h,
            c.message.lines().next().unwrap_or("").to_string(),
        )))
    }

    /// The working state of a branch, as a filesystem. One object per branch.
    pub fn branch_fs(&self, dot: &DotName, branch: &str) -> Result<Arc<BranchFs>> {
        let d = self.dot_rec(dot)?;
        self.fs_for(&d, branch)
    }

    // ---- commits ----

    /// Snapshots the branch's working state. O(metadata changed); writes no
    /// file data (buffered writes are chunked first, as at fsync).
    pub fn commit(&self, dot: &DotName, branch: &str, req: CommitRequest) -> Result<CommitInfo> {
        let text = req.message.len()
            + req.author.len()
            + req
                .metadata
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        if text > MAX_COMMIT_TEXT {
            return Err(Error::Refused(format!(
                "the commit's message, author and metadata take {text} bytes, more than the {} KiB a commit may carry (it travels in one frame on push and pull); put large notes in a file of the dot",
                MAX_COMMIT_TEXT >> 10
            )));
        }
        for k in req.metadata.keys() {
            if k.is_empty() || !k.starts_with(|c: char| c.is_ascii_lowercase()) {
                return Err(Error::Refused(format!(
                    "metadata key {k:?} must start with a lower-case letter"
                )));
            }
        }
        let started = std::time::Instant::now();
        let _a = self.admin.lock();
        // Ref and object writes finish before a GC starts marking (see Db::gc_barrier).
        let _b = self.db.gc_barrier.read_recursive();
        let d = self.dot_rec(dot)?;
        let mut rec = self.branch_rec(&d, branch)?;
        let fs = self.fs_for(&d, branch)?;
        let waited = started.elapsed();
        let mut st = fs.state.write();
        fs.flush_all_in(&st)?;
        fs.free_unopened_orphans(&st)?;
        let view = fs.view(&st);
        let (parents, generation, base_size) = match st.head {
            Some(h) => {
                let c = self.db.commit(&h)?;
                (vec![h], c.generation + 1, c.size)
            }
            None => (Vec::new(), 1, 0),
        };
        let mut muts = Vec::new();
        let mut patched = 0usize;
        let mut delta: i128 = 0;
        // Files with no link left are never part of a commit: a branch made
        // from one freed them at once, uncommitted changes no one made
        // (which refused pushes and deletes there). Those a process still
        // has open go on in the next working state.
        let orphans = crate::diff::orphan_inos(&view)?;
        let open = fs.orphan_set();
        let mut carried: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        for &ino in &orphans {
            let (start, end) = (keys::prefix(ino, 0), keys::prefix(ino, u8::MAX));
            if open.contains(&ino) {
                view.scan(&start, &end, &mut |k, v| {
                    carried.push((k.to_vec(), v.to_vec()));
                    Ok(true)
                })?;
                carried.push((keys::orphan(ino), Vec::new()));
            }
            // What the snapshot has of it (a commit made before orphans
            // were left out) goes.
            let mut cur = tree::Cursor::seek(&*self.db, &st.root, &start)?;
            while let Some((k, v)) = cur.next()? {
                if k >= end {
                    break;
                }
                if keys::parse(&k) == Some((ino, keys::TAG_INODE)) {
                    delta -= file_size(ino, Some(&v))? as i128;
                }
                muts.push((k, None));
            }
            let marker = keys::orphan(ino);
            if tree::get(&*self.db, &st.root, &marker)?.is_some() {
                muts.push((marker, None));
            }
        }
        // Chunks of patched blocks (left by fsyncs) join the commit's batch.
        let mut batch = WriteBatch::default();
        view.for_each_change(&mut |k, v| {
            if crate::diff::is_orphan_key(k, &orphans) {
                return Ok(());
            }
            match keys::parse(k) {
                Some((ino, keys::TAG_INODE)) if ino != keys::SUPER_INO => {
                    delta += file_size(ino, v)? as i128;
                    delta -= file_size(ino, tree::get(&*self.db, &st.root, k)?.as_deref())? as i128;
                }
                Some((_, keys::TAG_BLOCK)) => {
                    if let Some(v) = v.filter(|v| crate::patch::is_patched(v)) {
                        patched += 1;
                        muts.push((k.to_vec(), Some(fs.materialize(&mut batch, v)?)));
                        return Ok(());
                    }
                }
                _ => {}
            }
            muts.push((k.to_vec(), v.map(|v| v.to_vec())));
            Ok(())
        })?;
        // Sorted and key-unique, as apply wants (the orphans' keys were
        // left out of the changes).
        muts.sort_by(|a, b| a.0.cmp(&b.0));
        let (root, nodes) = tree::apply(&*self.db, &st.root, &muts)?;
        let commit = Commit {
            root,
            parents,
            author: req.author,
            message: req.message,
            timestamp_ns: crate::inode::Timestamp::now().as_nanos(),
            metadata: req.metadata,
            generation,
            size: (base_size as i128 + delta).max(0) as u64,
        };
        let (id, bytes) = object::encode(object::KIND_COMMIT, &commit);
        for (nid, nb) in &nodes {
            self.db.put_object(&mut batch, nid, nb);
        }
        self.db.put_object(&mut batch, &id, &bytes);
        rec.head = Some(id);
        rec.root = root;
        self.fresh_working_state(&mut batch, &mut rec)?;
        if !carried.is_empty() {
            let mut tx = crate::view::Tx::new(View {
                db: &self.db,
                bid: rec.bid,
                root,
            });
            for (k, v) in carried {
                tx.put(k, v);
            }
            tx.write_into(&mut batch);
        }
        self.meta_put(&mut batch, &meta::branch_key(d.id, branch), &rec);
        self.db.write(
            batch,
            true,
            &format!("committing branch {branch} of dot {dot}"),
        )?;
        st.head = Some(id);
        st.root = root;
        st.bid = rec.bid;
        tracing::debug!(
            "commit {} of {dot}@{branch}: {} paths changed, {} patched blocks stored whole; \
             {:?} waiting for locks, {:?} holding the branch's writers",
            id.short(),
            muts.len(),
            patched,
            waited,
            started.elapsed() - waited
        );
        Ok(CommitInfo::from(id, commit))
    }

    pub fn commit_info(&self, id: &Id) -> Result<CommitInfo> {
        Ok(CommitInfo::from(*id, self.db.commit(id)?))
    }

    /// The branch's commits, oldest first (its whole first-parent ancestry).
    pub fn log(&self, dot: &DotName, branch: &str) -> Result<Vec<CommitInfo>> {
        self.log_until(dot, branch, None, None)
    }

    /// The branch's first-parent history up to commit `until` (the head
    /// when `None`), only its `max` latest commits when given, oldest
    /// first. Reads the commits it returns and those after `until`, not
    /// the whole history (`dm log -n 5` of a long-lived branch). A
    /// `NotFound` error when `until` is not on that line.
    pub fn log_until(
        &self,
        dot: &DotName,
        branch: &str,
        until: Option<&Id>,
        max: Option<usize>,
    ) -> Result<Vec<CommitInfo>> {
        let d = self.dot_rec(dot)?;
        let mut cur = self.fs_for(&d, branch)?.head();
        if let Some(until) = until {
            loop {
                match cur {
                    Some(id) if id == *until => break,
                    Some(id) => cur = self.db.commit(&id)?.parents.first().copied(),
                    None => {
                        return Err(Error::NotFound {
                            what: "commit on the branch",
                            name: format!("{} on {dot}@{branch}", until.short()),
                        })
                    }
                }
            }
        }
        let mut out = Vec::new();
        while let Some(id) = cur {
            if max.is_some_and(|n| out.len() >= n) {
                break;
            }
            let c = self.db.commit(&id)?;
            cur = c.parents.first().copied();
            out.push(CommitInfo::from(id, c));
        }
        out.reverse();
        Ok(out)
    }

    /// True when `target` is a commit reachable from a branch of the dot.
    /// Walks back from each head only while generations are above the
    /// target's: O(distance), not O(history).
    fn reachable_in_dot(&self, d: &DotRec, target: &Id) -> Result<bool> {
        self.reachable_from_others(d, target, None)
    }

    /// Whether `target` is reachable from the head of a branch of the dot
    /// other than `except`.
    fn reachable_from_others(&self, d: &DotRec, target: &Id, except: Option<&str>) -> Result<bool> {
        let Ok(t) = self.db.commit(target) else {
            return Ok(false);
        };
        for (name, _) in self.branch_recs(d)? {
            if except == Some(name.as_str()) {
                continue;
            }
            let mut stack: Vec<Id> = self.head_unless_gone(d, &name)?.into_iter().collect();
            let mut seen = std::collections::HashSet::new();
            while let Some(id) = stack.pop() {
                if id == *target {
                    return Ok(true);
                }
                if !seen.insert(id) {
                    continue;
                }
                let c = self.db.commit(&id)?;
                if c.generation > t.generation {
                    stack.extend(c.parents.iter().copied());
                }
            }
        }
        Ok(false)
    }

    /// The head of branch `name`, None when it has none or was deleted
    /// since it was listed (a `dm branch NEW COMMIT` failed naming another
    /// client's branch it was deleting).
    fn head_unless_gone(&self, d: &DotRec, name: &str) -> Result<Option<Id>> {
        match self.fs_for(d, name) {
            Ok(fs) => Ok(fs.head()),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every commit reachable from any branch of the dot.
    fn dot_commits(&self, d: &DotRec) -> Result<HashMap<Id, Commit>> {
        let mut seen = HashMap::new();
        for (name, _) in self.branch_recs(d)? {
            let mut stack: Vec<Id> = self.head_unless_gone(d, &name)?.into_iter().collect();
            while let Some(id) = stack.pop() {
                if seen.contains_key(&id) {
                    continue;
                }
                let c = self.db.commit(&id)?;
                stack.extend(c.parents.iter().copied());
                seen.insert(id, c);
            }
        }
        Ok(seen)
    }

    /// Resolves `HEAD`, `HEAD^`, `HEAD^^`, `HEAD~N`, a branch name, a full id
    /// or a unique id prefix (at least 4 hex digits), each optionally followed
    /// by `^`/`~N`.
    pub fn resolve(&self, dot: &DotName, branch: &str, rev: &str) -> Result<Id> {
        let d = self.dot_rec(dot)?;
        // The branch exists (its errors come first).
        self.branch_rec(&d, branch)?;
        let split = rev.find(['^', '~']).unwrap_or(rev.len());
        let (base, ops) = rev.split_at(split);
        let mut id = if base == "HEAD" || base.is_empty() && !ops.is_empty() {
            self.fs_for(&d, branch)?.head().ok_or_else(|| {
                Error::BadRevision(format!(
                    "no commit matches {rev}: branch {branch} of dot {dot} has no commits yet"
                ))
            })?
        } else if self.branch_rec(&d, base).is_ok() {
            self.fs_for(&d, base)?.head().ok_or_else(|| {
                Error::BadRevision(format!(
                    "no commit matches {rev}: branch {base} has no commits"
                ))
            })?
        } else if base.len() >= 4 && base.len() <= 64 && base.bytes().all(|b| b.is_ascii_hexdigit())
        {
            let lower = base.to_ascii_lowercase();
            let all = self.dot_commits(&d)?;
            let hits: Vec<Id> = all
                .keys()
                .filter(|id| id.to_hex().starts_with(&lower))
                .copied()
                .collect();
            match hits.len() {
                1 => hits[0],
                0 => {
                    return Err(Error::BadRevision(format!(
                        "no commit of dot {dot} matches {rev}"
                    )))
                }
                n => {
                    return Err(Error::BadRevision(format!(
                    "{base} is ambiguous: {n} commits of dot {dot} start with it; give more digits"
                )))
                }
            }
        } else if !base.is_empty() && base.len() < 4 && base.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(Error::BadRevision(format!(
                "{rev:?}: a commit id prefix needs at least 4 hex digits (and no branch is called {base})"
            )));
        } else {
            return Err(Error::BadRevision(format!(
                "{rev:?} is not a revision: use HEAD, HEAD^, HEAD~N, a branch name or a commit id"
            )));
        };
        // Apply ^ and ~N.
        let mut rest = ops;
        let mut steps = 0u64;
        while !rest.is_empty() {
            let n;
            if let Some(r2) = rest.strip_prefix('^') {
                n = 1;
                rest = r2;
            } else if let Some(r2) = rest.strip_prefix('~') {
                let digits = r2.bytes().take_while(|b| b.is_ascii_digit()).count();
                n = if digits == 0 {
                    1
                } else {
                    r2[..digits].parse::<u64>().map_err(|_| {
                        Error::BadRevision(format!("{rev:?}: the number after ~ is too large"))
                    })?
                };
                rest = &r2[digits..];
            } else {
                return Err(Error::BadRevision(format!(
                    "{rev:?} is not a revision: use HEAD, HEAD^, HEAD~N, a branch name or a commit id"
                )));
            }
            for _ in 0..n {
                let c = self.db.commit(&id)?;
                match c.parents.first() {
                    Some(p) => id = *p,
                    None => {
                        let total = c.generation + steps;
                        // What the steps went back from (`master~1` on
                        // another current branch named that one).
                        let from = if base == "HEAD" || base.is_empty() {
                            format!("branch {branch}")
                        } else if self.branch_rec(&d, base).is_ok() {
                            format!("branch {base}")
                        } else {
                            format!("the history of commit {base}")
                        };
                        return Err(Error::BadRevision(format!(
                            "no commit matches {rev}: {from} of dot {dot} has {total} commit{}",
                            if total == 1 { "" } else { "s" }
                        )));
                    }
                }
                steps += 1;
            }
        }
        Ok(id)
    }

    /// Moves the branch to `target` (a commit of this dot) and discards its
    /// working state; commits after `target` on this branch become garbage.
    /// Without `hard`, refuses when there are uncommitted changes.
    pub fn reset(&self, dot: &DotName, branch: &str, target: Id, hard: bool) -> Result<()> {
        self.reset_inner(dot, branch, None, target, hard)
    }

    /// [`Store::reset`] of a branch whose head was `head` when `target`
    /// was resolved (`HEAD^` names a commit relative to it): refused,
    /// discarding nothing, when the branch has moved since (a commit made
    /// meanwhile would be thrown away with it).
    pub fn reset_from(
        &self,
        dot: &DotName,
        branch: &str,
        head: Option<Id>,
        target: Id,
        hard: bool,
    ) -> Result<()> {
        self.reset_inner(dot, branch, Some(head), target, hard)
    }

    fn reset_inner(
        &self,
        dot: &DotName,
        branch: &str,
        expected: Option<Option<Id>>,
        target: Id,
        hard: bool,
    ) -> Result<()> {
        let _a = self.admin.lock();
        // Ref and object writes finish before a GC starts marking (see Db::gc_barrier).
        let _b = self.db.gc_barrier.read_recursive();
        let d = self.dot_rec(dot)?;
        let mut rec = self.branch_rec(&d, branch)?;
        let fs = self.fs_for(&d, branch)?;
        if !self.reachable_in_dot(&d, &target)? {
            return Err(Error::NotFound {
                what: "commit",
                name: format!("{} in dot {dot}", target.to_hex()),
            });
        }
        let (_io, mut st) = fs.lock_for_reset();
        if let Some(head) = expected.filter(|h| *h != st.head) {
            return Err(Error::Refused(format!(
                "branch {branch} of dot {dot} moved while the reset was being prepared (from {} to {}: a commit?); nothing was discarded: run the reset again",
                head.map(|h| h.short()).unwrap_or_else(|| "no commit".into()),
                st.head.map(|h| h.short()).unwrap_or_else(|| "no commit".into()),
            )));
        }
        if !hard && Self::uncommitted_in(&fs, &st)? {
            return Err(Error::Refused(format!(
                "branch {branch} of dot {dot} has uncommitted changes; commit them, or use `dm reset --hard` to discard them"
            )));
        }
        let c = self.db.commit(&target)?;
        let before = fs.before_reset(&st)?;
        self.refork(&d, &mut rec, target)?;
        rec.head = Some(target);
        rec.root = c.root;
        let mut batch = WriteBatch::default();
        self.refork_grown_from(&d, &mut batch, branch, target)?;
        self.fresh_working_state(&mut batch, &mut rec)?;
        self.meta_put(&mut batch, &meta::branch_key(d.id, branch), &rec);
        self.db.write(
            batch,
            true,
            &format!("resetting branch {branch} of dot {dot}"),
        )?;
        fs.drop_buffers();
        st.head = Some(target);
        st.root = c.root;
        st.bid = rec.bid;
        fs.reset_done(&st, before);
        Ok(())
    }

    /// The branches whose working state is loaded (mounted or used since
    /// the start).
    pub(crate) fn loaded_branches(&self) -> Vec<Arc<BranchFs>> {
        self.branches.lock().values().cloned().collect()
    }

    /// Stores the blocks that fsyncs left as patches in every open branch
    /// as whole chunks (see [`BranchFs::materialize_patches`]); returns how
    /// many, or the first error (after trying every branch). `dm server`
    /// calls it every few seconds.
    pub fn materialize_patches(&self) -> Result<usize> {
        let all = self.loaded_branches();
        let mut n = 0;
        let mut first_error = None;
        for fs in all {
            match fs.materialize_patches() {
                Ok(k) => n += k,
                // A deleted branch has nothing left to store.
                Err(_) if fs.state.read().deleted => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(n), Err)
    }

    /// While the disk holding the store is full (a write found no room):
    /// the free bytes it needs before new data is taken again. Until then
    /// writes of file data and received chunks fail with ENOSPC, while
    /// deletions, resets, commits and GC run in the room the store kept
    /// for them (see docs/format.md, "The reserve"). Looks at the disk now.
    pub fn disk_full(&self) -> Option<u64> {
        self.db
            .space
            .check_now()
            .then(|| self.db.space.room_needed())
    }

    /// What the store holds in memory now, by part.
    pub fn memory(&self) -> crate::db::Memory {
        let mut m = self.db.memory();
        m.write_buffers = (self.branches.lock().values())
            .map(|fs| fs.buffered_bytes() as u64)
            .sum();
        m
    }

    /// Stops every open branch ([`BranchFs::stop`]: what they acknowledged
    /// is flushed, what comes after is refused) and syncs the WAL: for a
    /// server that stops.
    pub fn stop_writes(&self) -> Result<()> {
        let all = self.loaded_branches();
        for fs in all {
            fs.stop()?;
        }
        self.db.sync_wal()
    }

    /// Flushes every buffered write of every open branch and syncs the WAL.
    pub fn sync(&self) -> Result<()> {
        let all = self.loaded_branches();
        for fs in all {
            if !fs.state.read().deleted {
                fs.flush_all()?;
            }
        }
        self.db.sync_wal()
    }

    // ---- diff ----

    /// Paths that differ between `from` (default: the branch head) and `to`
    /// (default: the branch's working state).
    pub fn diff(
        &self,
        dot: &DotName,
        branch: &str,
        from: Option<Id>,
        to: Option<Id>,
    ) -> Result<Vec<Change>> {
        Ok(self.diff_and_mount_made(dot, branch, from, to)?.0)
    }

    /// [`Store::diff`], and, to the working state, the empty subdot
    /// directories that mounts made there (`/sub`), which it leaves out
    /// and which do not make the branch dirty, but which the next commit
    /// records.
    pub fn diff_and_mount_made(
        &self,
        dot: &DotName,
        branch: &str,
        from: Option<Id>,
        to: Option<Id>,
    ) -> Result<(Vec<Change>, Vec<Vec<u8>>)> {
        let fs = self.branch_fs(dot, branch)?;
        fs.flush_all()?;
        let st = fs.state.read();
        let snapshot = |id: Option<Id>| -> Result<View<'_>> {
            let root = match id {
                Some(c) => self.db.commit(&c)?.root,
                None => tree::empty().0,
            };
            Ok(View {
                db: &self.db,
                bid: 0,
                root,
            })
        };
        let old_view = match from {
            Some(c) => snapshot(Some(c))?,
            None => snapshot(st.head)?,
        };
        match to {
            Some(c) => Ok((
                crate::diff::changes(&old_view, &snapshot(Some(c))?)?,
                Vec::new(),
            )),
            None => crate::diff::work_changes(&old_view, &fs.view(&st)),
        }
    }
}

/// Size of a regular file's record (0 for anything else or nothing).
fn file_size(ino: u64, rec: Option<&[u8]>) -> Result<u64> {
    match rec {
        Some(b) => {
            let r = InodeRec::decode(ino, b)?;
            Ok(if r.kind == FileKind::File { r.size } else { 0 })
        }
        None => Ok(0),
    }
}

pub(crate) fn dot_name(d: &DotRec) -> DotName {
    DotName {
        namespace: d.namespace.clone(),
        name: d.name.clone(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::db::CF_WORK;
    use crate::ROOT_INO;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A store in a temporary directory with one dot, `app`.
    pub(crate) fn app_store() -> (tempfile::TempDir, Arc<Store>, DotName) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let dot = DotName::new("app").unwrap();
        store.create_dot(&dot, None).unwrap();
        (dir, store, dot)
    }

    /// Keys left in the working-state column family under overlay `bid`.
    fn overlay_keys(store: &Store, bid: u64) -> usize {
        let db = &store.db;
        let mut it = db.db.raw_iterator_cf(db.cf(CF_WORK));
        it.seek(bid.to_be_bytes());
        let mut n = 0;
        while it.valid() && it.key().is_some_and(|k| k.starts_with(&bid.to_be_bytes())) {
            n += 1;
            it.next();
        }
        n
    }

    /// Deleting a branch (or its dot) while its files are written leaves
    /// nothing of its working state behind: writes in flight finish before
    /// the deletion, and later ones fail. Writes that landed after the
    /// deletion's range delete used to leave keys (and the chunks they
    /// name) that nothing would ever delete.
    #[test]
    fn deleting_a_branch_being_written_leaves_no_working_state() {
        let (_dir, store, dot) = app_store();
        let first = CommitRequest {
            message: "first".into(),
            author: "test".into(),
            metadata: BTreeMap::new(),
        };
        store.commit(&dot, "master", first).unwrap();
        for round in 0..12 {
            let branch = format!("b{round}");
            store.create_branch(&dot, &branch, None).unwrap();
            let d = store.dot_rec(&dot).unwrap();
            let bid = store.branch_rec(&d, &branch).unwrap().bid;
            let stop = Arc::new(AtomicBool::new(false));
            let writers: Vec<_> = (0..3)
                .map(|w| {
                    let (store, dot, branch, stop) =
                        (store.clone(), dot.clone(), branch.clone(), stop.clone());
                    std::thread::spawn(move || {
                        for i in 0.. {
                            if stop.load(Ordering::Relaxed) {
                                break;
                            }
                            // Fails once the branch is gone: the writer stops.
                            let step = || -> Result<()> {
                                let fs = store.branch_fs(&dot, &branch)?;
                                let name = format!("w{w}-{i}");
                                let ino = fs
                                    .mknod(
                                        ROOT_INO,
                                        name.as_bytes(),
                                        FileKind::File,
                                        0o644,
                                        0,
                                        0,
                                        0,
                                    )?
                                    .ino;
                                fs.write(ino, 0, &[w as u8; 10_000])?;
                                fs.fsync(ino, false)
                            };
                            if step().is_err() {
                                break;
                            }
                        }
                    })
                })
                .collect();
            std::thread::sleep(std::time::Duration::from_millis(5 + round));
            // Forced: its writers' work is uncommitted (`-d` refuses that).
            store.delete_branch(&dot, &branch, true).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(5));
            stop.store(true, Ordering::Relaxed);
            for w in writers {
                w.join().unwrap();
            }
            assert_eq!(
                overlay_keys(&store, bid),
                0,
                "round {round}: keys of {branch} left"
            );
            assert!(store.branch_fs(&dot, &branch).is_err(), "{branch} gone");
        }
        // The same for a whole dot.
        let bid = store
            .branch_rec(&store.dot_rec(&dot).unwrap(), "master")
            .unwrap()
            .bid;
        let fs = store.branch_fs(&dot, "master").unwrap();
        let writer = std::thread::spawn(move || {
            for i in 0.. {
                let step = || -> Result<()> {
                    let ino = fs
                        .mknod(
                            ROOT_INO,
                            format!("f{i}").as_bytes(),
                            FileKind::File,
                            0o644,
                            0,
                            0,
                            0,
                        )?
                        .ino;
                    fs.write(ino, 0, &[1; 10_000])?;
                    fs.fsync(ino, false)
                };
                if step().is_err() {
                    break;
                }
            }
        });
        std::thread::sleep(std::time::Duration::from_millis(20));
        store.delete_dot(&dot).unwrap();
        writer.join().unwrap();
        assert_eq!(overlay_keys(&store, bid), 0, "keys of the deleted dot left");
    }

    /// GC removes the working state of a branch whose record is gone (as
    /// the deletion race of earlier versions left them) and the chunks only
    /// it named, and nothing of the live branches.
    #[test]
    fn gc_removes_working_states_no_branch_names() {
        let (_dir, store, dot) = app_store();
        let write = |branch: &str, name: &str, byte: u8| {
            let fs = store.branch_fs(&dot, branch).unwrap();
            let ino = fs
                .mknod(ROOT_INO, name.as_bytes(), FileKind::File, 0o644, 0, 0, 0)
                .unwrap()
                .ino;
            fs.write(ino, 0, &vec![byte; 300_000]).unwrap();
            fs.fsync(ino, false).unwrap();
            ino
        };
        let kept = write("master", "kept", 1);
        store.create_branch(&dot, "b", None).unwrap();
        write("b", "leaked", 2);
        // What an earlier version's race left: the record gone, the
        // overlay (and the chunks it names) still there.
        let d = store.dot_rec(&dot).unwrap();
        let bid = store.branch_rec(&d, "b").unwrap().bid;
        let mut batch = WriteBatch::default();
        batch.delete_cf(store.db.cf(CF_META), meta::branch_key(d.id, "b"));
        store.db.write(batch, true, "forgetting b").unwrap();
        store.branches.lock().remove(&(d.id, "b".to_string()));
        assert!(overlay_keys(&store, bid) > 0);

        let report = store.gc().unwrap();
        assert_eq!(report.working_states_deleted, 1, "{report:?}");
        assert!(report.chunks_deleted >= 1, "{report:?}");
        assert_eq!(overlay_keys(&store, bid), 0);
        assert!(store.fsck().unwrap().is_clean());
        let fs = store.branch_fs(&dot, "master").unwrap();
        assert!(fs.read(kept, 0, 300_000).unwrap() == vec![1; 300_000]);
        // Nothing more the second time.
        assert_eq!(store.gc().unwrap().working_states_deleted, 0);
    }

    /// `dm reset --hard HEAD` racing `dm commit`: HEAD was resolved before
    /// the commit, so the reset would throw the commit away; refused, and
    /// the commit stays.
    #[test]
    fn a_reset_resolved_before_a_commit_is_refused() {
        let (_dir, store, dot) = app_store();
        let req = |m: &str| CommitRequest {
            message: m.into(),
            author: "test".into(),
            metadata: BTreeMap::new(),
        };
        let c1 = store.commit(&dot, "master", req("one")).unwrap().id;
        let head = store.branch_info(&dot, "master").unwrap().head;
        let c2 = store.commit(&dot, "master", req("two")).unwrap().id;
        let e = store
            .reset_from(&dot, "master", head, c1, true)
            .unwrap_err();
        assert!(e.to_string().contains("moved while the reset"), "{e}");
        assert_eq!(store.branch_info(&dot, "master").unwrap().head, Some(c2));
        // Resolved against the head it has: done.
        store
            .reset_from(&dot, "master", Some(c2), c1, true)
            .unwrap();
        assert_eq!(store.branch_info(&dot, "master").unwrap().head, Some(c1));
    }

    /// Bad commit requests are refused and commit nothing: a metadata key
    /// that does not start lower-case, and text too large for one frame.
    #[test]
    fn commit_refuses_bad_metadata_and_huge_text() {
        let (_dir, store, dot) = app_store();
        let mut metadata = BTreeMap::new();
        metadata.insert("Upper".to_string(), "v".to_string());
        let e = store
            .commit(
                &dot,
                "master",
                CommitRequest {
                    message: "m".into(),
                    author: "test".into(),
                    metadata,
                },
            )
            .unwrap_err();
        assert!(e.to_string().contains("lower-case"), "{e}");
        let e = store
            .commit(
                &dot,
                "master",
                CommitRequest {
                    message: "x".repeat(MAX_COMMIT_TEXT + 1),
                    author: "test".into(),
                    metadata: BTreeMap::new(),
                },
            )
            .unwrap_err();
        assert!(e.to_string().contains("more than the 1024 KiB"), "{e}");
        assert!(store.log(&dot, "master").unwrap().is_empty());
    }

    /// Commits a file of pseudo-random bytes (`seed`) on a new branch,
    /// then deletes the branch: returns the commit, which only that branch
    /// reached (garbage now), and the file's bytes.
    fn commit_only_a_deleted_branch_reached(
        store: &Store,
        dot: &DotName,
        seed: u64,
    ) -> (Id, Vec<u8>) {
        let req = |m: &str| CommitRequest {
            message: m.into(),
            author: "test".into(),
            metadata: BTreeMap::new(),
        };
        store.commit(dot, "master", req("first")).unwrap();
        store.create_branch(dot, "b", None).unwrap();
        let data = crate::chunk::tests::pseudo_random(200_000, seed);
        let fs = store.branch_fs(dot, "b").unwrap();
        let ino = fs
            .mknod(ROOT_INO, b"f", FileKind::File, 0o644, 0, 0, 0)
            .unwrap()
            .ino;
        fs.write(ino, 0, &data).unwrap();
        fs.release(ino).unwrap();
        let c = store.commit(dot, "b", req("on b")).unwrap().id;
        drop(fs);
        store.delete_branch(dot, "b", true).unwrap();
        (c, data)
    }

    /// `dm checkout -b NEW REV` of a commit that only a just-deleted branch
    /// reached, while a GC that marked before runs: the new branch keeps
    /// the whole snapshot (it named a swept commit, and every later GC
    /// failed).
    #[test]
    fn a_branch_made_during_gc_keeps_its_commit() {
        let (_dir, store, dot) = app_store();
        let (c, data) = commit_only_a_deleted_branch_reached(&store, &dot, 10);
        let d2 = dot.clone();
        *store.gc_after_mark.lock() = Some(Box::new(move |s: &Store| {
            s.create_branch(&d2, "again", Some(c)).unwrap();
        }));
        store.gc().unwrap();
        *store.gc_after_mark.lock() = None;
        assert!(
            store.fsck().unwrap().is_clean(),
            "{:?}",
            store.fsck().unwrap()
        );
        let fs = store.branch_fs(&dot, "again").unwrap();
        let ino = fs.lookup(ROOT_INO, b"f").unwrap().ino;
        assert!(fs.read(ino, 0, 300_000).unwrap() == data);
        store.gc().unwrap();
    }

    /// A GC told to stop (the server is stopping) ends at its next step,
    /// with an error, leaving a store fsck finds clean and the rest of its
    /// garbage for a later GC; every GC after refuses to start. A server's
    /// stop waited 92 s for its automatic GC.
    #[test]
    fn a_stopped_gc_ends_early_and_leaves_a_clean_store() {
        let (_dir, store, dot) = app_store();
        commit_only_a_deleted_branch_reached(&store, &dot, 11);
        *store.gc_after_mark.lock() = Some(Box::new(|s: &Store| s.stop_gc()));
        let err = store.gc().unwrap_err();
        *store.gc_after_mark.lock() = None;
        assert!(err.to_string().contains("stopped"), "{err}");
        assert!(store.fsck().unwrap().is_clean());
        assert!(store.gc().is_err(), "no GC starts after a stop");
        store
            .gc_stopped
            .store(false, std::sync::atomic::Ordering::Release);
        let r = store.gc().unwrap();
        assert!(r.chunks_deleted >= 1, "the garbage is still there: {r:?}");
    }

    /// An object that becomes young between GC's mark and its sweep (a
    /// transfer found it present and is making a branch name it) keeps
    /// everything it names. GC kept only the object itself: the branch
    /// then named a commit whose tree and chunks were gone.
    #[test]
    fn gc_keeps_what_a_young_commit_names() {
        let (_dir, store, dot) = app_store();
        let (c, data) = commit_only_a_deleted_branch_reached(&store, &dot, 9);
        // `c` and all it names are garbage now, until a transfer notes it.
        *store.gc_after_mark.lock() = Some(Box::new(move |s: &Store| s.db.note_young(&c)));
        store.gc().unwrap();
        *store.gc_after_mark.lock() = None;
        store.create_branch(&dot, "again", Some(c)).unwrap();
        assert!(
            store.fsck().unwrap().is_clean(),
            "{:?}",
            store.fsck().unwrap()
        );
        let fs = store.branch_fs(&dot, "again").unwrap();
        let ino = fs.lookup(ROOT_INO, b"f").unwrap().ino;
        assert!(fs.read(ino, 0, 300_000).unwrap() == data);
        // Once nothing notes it, it goes.
        store.delete_branch(&dot, "again", true).unwrap();
        let report = store.gc().unwrap();
        assert!(
            report.objects_deleted >= 2 && report.chunks_deleted >= 1,
            "{report:?}"
        );
    }
}
