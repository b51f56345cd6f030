//! What push, pull and clone need from the store, without any network:
//! raw stored bytes of objects and chunks (the stored form is the wire
//! form), verified import, the walk that finds what a receiver lacks, a
//! compare-and-swap ref update, divergence between two histories, and a
//! small key-value space for server settings (users, keys, collaborators).
//!
//! # The receiver's invariant
//!
//! An object is imported only when everything it names is already present:
//! a tree node's children and chunks, a commit's root and parents. So a
//! present object always has its whole closure present, and a sender can
//! skip a subtree (or a commit's whole ancestry) as soon as the receiver
//! says it has its top. This is also what makes an interrupted transfer
//! resumable: what arrived stays (verified), and the next walk skips it.
//! Only [`Store::set_branch_head`] makes anything visible.
//!
//! Imports pin what they store until their [`ImportSession`] is dropped, so
//! a GC running during a transfer does not reclaim objects that no branch
//! reaches yet; the session's has-queries pin what they find present, so
//! that nothing a sender was told is there goes before the transfer ends.
//! The chunks a session imported before it ended without moving a branch
//! (the transfer was interrupted) GC keeps for the rerun: until a transfer
//! into the same dot moves a branch, the dot is deleted, the disk is full,
//! or [`crate::db::RESUME_KEEP`] passed. Only chunks: a kept tree node or
//! commit would keep all it names, other snapshots' data with it.
//! [`Hold`] keeps what a sender is sending.

use crate::chunk::{self, ChunkStore};
use crate::db::CF_META;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::keys;
use crate::meta::{self, BranchRec, DotRec};
use crate::names::{self, DotName};
use crate::object::{self, Commit, Node};
use crate::store::Store;
use rocksdb::WriteBatch;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// Prefix of the settings keys in the `meta` column family.
const SETTINGS_PREFIX: &[u8] = b"s\0";

/// Answers, for a batch of ids, which the receiver has (in order).
pub type HasFn<'f, E> = dyn FnMut(&[Id]) -> std::result::Result<Vec<bool>, E> + 'f;
/// Returns the stored bytes of a batch of objects (in order).
pub type GetFn<'f, E> = dyn FnMut(&[Id]) -> std::result::Result<Vec<Vec<u8>>, E> + 'f;

/// Tree nodes to send for a set of commits, found by [`plan_trees`].
#[derive(Clone, Debug, Default)]
pub struct TreePlan {
    /// Nodes the receiver lacks, grouped by height (index 0 = leaves and
    /// nodes whose children the receiver has). Import in this order; each
    /// group only after the previous one is stored.
    pub levels: Vec<Vec<Id>>,
    /// Chunks named by the new leaves (deduplicated; not yet checked
    /// against the receiver).
    pub chunks: Vec<Id>,
    /// Stored bytes of the planned nodes (stored form).
    pub bytes: u64,
}

/// Where two branch heads stand relative to each other.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Divergence {
    /// Same head (or both empty).
    UpToDate,
    /// The destination's head is an ancestor of the source's (or it has
    /// none): the destination can move forward.
    FastForward,
    /// The destination is ahead: it has every commit of the source.
    Ahead,
    /// Both have commits the other lacks; `common` is the latest commit
    /// they share.
    Diverged {
        /// The latest common commit.
        common: Id,
    },
    /// The two histories share no commit.
    NoCommonCommit,
}

/// The outcome of a compare-and-swap ref update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SetHead {
    /// The branch now points at the new commit.
    Updated,
    /// The branch was not at the expected commit; nothing changed.
    Moved {
        /// Where the branch actually is.
        actual: Option<Id>,
    },
}

/// Reads the (children, chunks) a stored tree node names.
pub fn node_refs(id: &Id, stored: &[u8]) -> Result<(Vec<Id>, Vec<Id>)> {
    match object::decode_node(id, stored)? {
        Node::Inner(children) => Ok((children.into_iter().map(|(_, c)| c).collect(), Vec::new())),
        Node::Leaf(entries) => {
            let chunks = leaf_chunks(&entries).map_err(|_| {
                Error::Corrupt(format!("tree node {} has a malformed block", id.short()))
            })?;
            Ok((Vec::new(), chunks))
        }
    }
}

/// Reads the (objects, chunks) a stored object names: a commit's root and
/// parents, a tree node's children and chunks.
pub fn object_refs(id: &Id, stored: &[u8]) -> Result<(Vec<Id>, Vec<Id>)> {
    if stored.get(1).copied() == Some(object::KIND_COMMIT) {
        let c: Commit = object::decode(id, object::KIND_COMMIT, stored)?;
        let mut objects = vec![c.root];
        objects.extend(c.parents);
        return Ok((objects, Vec::new()));
    }
    node_refs(id, stored)
}

/// The parents of a stored commit; None when `stored` is not a commit.
pub fn commit_parents(id: &Id, stored: &[u8]) -> Result<Option<Vec<Id>>> {
    if stored.get(1).copied() != Some(object::KIND_COMMIT) {
        return Ok(None);
    }
    let c: Commit = object::decode(id, object::KIND_COMMIT, stored)?;
    Ok(Some(c.parents))
}

/// The chunks a leaf's block entries name.
pub fn leaf_chunks(entries: &[(Vec<u8>, Vec<u8>)]) -> Result<Vec<Id>> {
    let mut out = Vec::new();
    for (k, v) in entries {
        if let Some((_, keys::TAG_BLOCK)) = keys::parse(k) {
            let (id, _) = keys::parse_block_value(v)
                .ok_or_else(|| Error::Corrupt("malformed block entry".into()))?;
            out.push(id);
        }
    }
    Ok(out)
}

/// Walks the trees of `roots` top-down and returns the nodes the receiver
/// lacks, bottom-up, and the chunks they name. `has` answers, for a batch
/// of ids, which the receiver has (whole subtrees are skipped on a yes);
/// `get` returns the stored bytes of a batch of nodes (from the sender).
/// Both are called with at most `batch` ids.
pub fn plan_trees<E: From<Error>>(
    roots: &[Id],
    batch: usize,
    has: &mut HasFn<'_, E>,
    get: &mut GetFn<'_, E>,
) -> std::result::Result<TreePlan, E> {
    let batch = batch.max(1);
    let mut seen: HashSet<Id> = HashSet::new();
    // Every new node with its new children (those the receiver lacks).
    let mut children_of: HashMap<Id, Vec<Id>> = HashMap::new();
    let mut chunk_seen: HashSet<Id> = HashSet::new();
    let mut plan = TreePlan::default();
    let mut order: Vec<Id> = Vec::new();
    let mut frontier: Vec<Id> = roots.iter().copied().filter(|r| seen.insert(*r)).collect();
    while !frontier.is_empty() {
        let mut next = Vec::new();
        for part in frontier.chunks(batch) {
            let present = has(part)?;
            if present.len() != part.len() {
                return Err(
                    Error::Corrupt("has-query answered the wrong number of ids".into()).into(),
                );
            }
            let missing: Vec<Id> = part
                .iter()
                .zip(present)
                .filter(|(_, p)| !p)
                .map(|(id, _)| *id)
                .collect();
            if missing.is_empty() {
                continue;
            }
            let stored = get(&missing)?;
            if stored.len() != missing.len() {
                return Err(
                    Error::Corrupt("object fetch answered the wrong number of ids".into()).into(),
                );
            }
            for (id, bytes) in missing.iter().zip(stored) {
                if Id::of(&bytes) != *id {
                    return Err(Error::Corrupt(format!(
                        "object {} does not match its content",
                        id.short()
                    ))
                    .into());
                }
                plan.bytes += bytes.len() as u64;
                let (kids, chunks) = node_refs(id, &bytes)?;
                for c in chunks {
                    if chunk_seen.insert(c) {
                        plan.chunks.push(c);
                    }
                }
                let mut new_kids = Vec::new();
                for k in kids {
                    if seen.insert(k) {
                        next.push(k);
                    }
                    new_kids.push(k);
                }
                children_of.insert(*id, new_kids);
                order.push(*id);
            }
        }
        frontier = next;
    }
    let height = heights(&order, &children_of)?;
    for id in order {
        let h = height[&id];
        if plan.levels.len() <= h {
            plan.levels.resize(h + 1, Vec::new());
        }
        plan.levels[h].push(id);
    }
    Ok(plan)
}

/// Heights of the planned nodes: 0 for a node without new children, else
/// 1 + the largest height of its new children (those in `children_of`;
/// the others the receiver has). Computed depth-first and memoised, so the
/// result does not depend on the order nodes were discovered in: a node
/// shared by trees of different heights is discovered through the shorter
/// one, after (in breadth-first order) parents it has in the taller one.
fn heights(order: &[Id], children_of: &HashMap<Id, Vec<Id>>) -> Result<HashMap<Id, usize>> {
    let mut height: HashMap<Id, usize> = HashMap::with_capacity(order.len());
    // Nodes whose children are being computed: meeting one again would be
    // a cycle, which content addressing rules out (checked all the same,
    // since the nodes come from the peer).
    let mut open: HashSet<Id> = HashSet::new();
    for start in order {
        let mut stack = vec![(*start, false)];
        while let Some((id, expanded)) = stack.pop() {
            if height.contains_key(&id) {
                continue;
            }
            let kids = children_of.get(&id).map(Vec::as_slice).unwrap_or(&[]);
            let new_kids = kids.iter().filter(|k| children_of.contains_key(k));
            if expanded {
                let mut h = 0;
                for k in new_kids {
                    let kh = height.get(k).ok_or_else(|| {
                        Error::Corrupt(format!(
                            "tree node {} is part of a cycle through {}",
                            id.short(),
                            k.short()
                        ))
                    })?;
                    h = h.max(kh + 1);
                }
                open.remove(&id);
                height.insert(id, h);
            } else {
                if !open.insert(id) {
                    return Err(Error::Corrupt(format!(
                        "tree node {} is part of a cycle",
                        id.short()
                    )));
                }
                stack.push((id, true));
                stack.extend(
                    new_kids
                        .filter(|k| !height.contains_key(k))
                        .map(|k| (*k, false)),
                );
            }
        }
    }
    Ok(height)
}

/// Where `theirs` (the destination head) stands relative to `ours` (the
/// source head), given the full ancestry of each (any order; include the
/// head itself). Transfers move the destination to the source.
pub fn divergence(
    ours: Option<Id>,
    ours_ancestry: &HashSet<Id>,
    theirs: Option<Id>,
    theirs_newest_first: &[Id],
) -> Divergence {
    match (ours, theirs) {
        (a, b) if a == b => Divergence::UpToDate,
        (_, None) => Divergence::FastForward,
        (None, Some(_)) => Divergence::Ahead,
        (Some(o), Some(t)) => {
            if ours_ancestry.contains(&t) {
                Divergence::FastForward
            } else if theirs_newest_first.contains(&o) {
                Divergence::Ahead
            } else {
                match theirs_newest_first
                    .iter()
                    .find(|id| ours_ancestry.contains(id))
                {
                    Some(c) => Divergence::Diverged { common: *c },
                    None => Divergence::NoCommonCommit,
                }
            }
        }
    }
}

/// Ids kept through GCs while this lives (pinned, and recorded as young
/// for a GC already running), each checked present once pinned.
pub struct Hold {
    store: Arc<Store>,
    pinned: parking_lot::Mutex<HashSet<Id>>,
}

impl Hold {
    /// Holds nothing yet.
    pub fn new(store: Arc<Store>) -> Hold {
        Hold {
            store,
            pinned: parking_lot::Mutex::new(HashSet::new()),
        }
    }

    fn pin(&self, id: &Id) {
        if self.pinned.lock().insert(*id) {
            self.store.db.pin(id);
        }
    }

    /// Pins `ids`, then records them as young for a GC already running
    /// (the order GC relies on): once they are found present, they stay.
    fn pin_young<'i>(&self, ids: impl IntoIterator<Item = &'i Id>) {
        for id in ids {
            self.pin(id);
            self.store.db.note_young(id);
        }
    }

    /// Pins `ids` and records them as young, then tells which are present:
    /// those stay (an object with all it names) until this is dropped; the
    /// absent ones are let go.
    fn pin_present(
        &self,
        ids: &[Id],
        present: impl Fn(&[Id]) -> Result<Vec<bool>>,
    ) -> Result<Vec<bool>> {
        self.pin_young(ids);
        let found = present(ids)?;
        let absent: Vec<Id> = ids
            .iter()
            .zip(&found)
            .filter(|(_, p)| !**p)
            .map(|(id, _)| *id)
            .collect();
        if !absent.is_empty() {
            let mut pinned = self.pinned.lock();
            let gone: Vec<Id> = absent.into_iter().filter(|id| pinned.remove(id)).collect();
            self.store.db.unpin(&gone);
        }
        Ok(found)
    }

    /// Which of `objects` are stored, in order; those stay, with all they
    /// name (a pushed commit's history while it is sent, say).
    pub fn objects(&self, objects: &[Id]) -> Result<Vec<bool>> {
        self.pin_present(objects, |ids| self.store.has_objects(ids))
    }

    /// Which of `chunks` are stored, in order; those stay.
    pub fn chunks(&self, chunks: &[Id]) -> Result<Vec<bool>> {
        self.pin_present(chunks, |ids| self.store.has_chunks(ids))
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mine = std::mem::take(&mut *self.pinned.lock());
        self.store.db.unpin(&mine);
    }
}

/// Holds the ids imported by one transfer so that GC keeps them until the
/// ref update makes them reachable (or the transfer gives up), and the
/// ids its has-queries found present.
pub struct ImportSession {
    store: Arc<Store>,
    hold: Hold,
    /// The dot it imports into (see [`ImportSession::into_dot`]), with its
    /// id if it existed then.
    dot: parking_lot::Mutex<Option<(DotName, Option<u64>)>>,
    /// Chunks this session received since it last moved a branch: kept
    /// for a rerun if it ends without moving one.
    imported_chunks: parking_lot::Mutex<Vec<Id>>,
}

impl ImportSession {
    /// Starts a session on `store`.
    pub fn new(store: Arc<Store>) -> ImportSession {
        ImportSession {
            hold: Hold::new(store.clone()),
            store,
            dot: Default::default(),
            imported_chunks: Default::default(),
        }
    }

    /// Names the dot this session imports into: what it leaves if it is
    /// interrupted is kept for a rerun into that dot.
    pub fn into_dot(&self, dot: &DotName) {
        let id = self.store.dot_info(dot).ok().map(|d| d.id);
        *self.dot.lock() = Some((dot.clone(), id));
    }

    fn pin(&self, id: &Id) {
        self.hold.pin(id);
    }

    /// Which of `ids` are stored objects, in order: a sender skips those
    /// (and all they name), so they stay until the session ends.
    pub fn has_objects(&self, ids: &[Id]) -> Result<Vec<bool>> {
        self.hold.objects(ids)
    }

    /// Which of `ids` are stored chunks, in order; those stay until the
    /// session ends.
    pub fn has_chunks(&self, ids: &[Id]) -> Result<Vec<bool>> {
        self.hold.chunks(ids)
    }

    /// Records that a ref update moved a branch of `dot`: the transfer (or
    /// the rerun of an interrupted one) is done, what it imported is
    /// reachable, and nothing is kept for a rerun into that dot any more.
    pub fn moved_branch(&self, dot: &DotName) {
        self.imported_chunks.lock().clear();
        self.store.db.forget_resumable(&dot.to_string());
    }

    /// Pins `ids`, records them as young for a running GC, then checks they
    /// are present: after this returns Ok they stay until the session ends.
    /// Returns the stored forms of `objects` (in order).
    fn hold_present(&self, of: &Id, objects: &[Id], chunks: &[Id]) -> Result<Vec<Vec<u8>>> {
        self.hold.pin_young(objects.iter().chain(chunks));
        let mut stored = Vec::with_capacity(objects.len());
        for (id, b) in objects.iter().zip(self.store.objects_stored(objects)?) {
            let Some(b) = b else {
                return Err(Error::Refused(format!(
                    "object {} arrived before what it names (object {} is missing)",
                    of.short(),
                    id.short()
                )));
            };
            stored.push(b);
        }
        if let Some(i) = self.store.db.has_many(chunks)?.iter().position(|p| !p) {
            return Err(Error::Refused(format!(
                "tree node {} arrived before its chunk {}",
                of.short(),
                chunks[i].short()
            )));
        }
        Ok(stored)
    }

    /// Indexes the chunks imported so far. Large ones wait unindexed
    /// otherwise (up to 256 MiB, see `Db::add_pending`), and a crash of
    /// this process would then make the resumed transfer send them again.
    /// Call after each batch of chunks received.
    pub fn index_received(&self) -> Result<()> {
        self.store.db.flush_pending()
    }

    /// Verifies a chunk's stored form against `id` (decode, then blake3 of
    /// the plain bytes) and stores it. Returns true when newly written.
    pub fn import_chunk(&self, id: &Id, stored: &[u8]) -> Result<bool> {
        // Bounded by the largest block: one larger could never be read back.
        chunk::decode_verified(id, stored, chunk::MAX_CHUNK)?;
        self.store
            .db
            .space
            .refuse_when_full(|| "storing the chunks of a transfer".into())?;
        self.pin(id);
        let new = self.store.db.put_if_absent(id, stored)?;
        // Also when it was stored already: it may be garbage a GC takes.
        self.imported_chunks.lock().push(*id);
        Ok(new)
    }

    /// Verifies an object's stored form against `id` (blake3 of the stored
    /// bytes), checks it decodes, that everything it names is present and
    /// of the right kind (a commit names a tree node as its root and
    /// commits as its parents, an inner node names tree nodes), and that a
    /// commit's generation is 1 + the largest of its parents' (1 without
    /// parents); then stores it. Returns true when newly written.
    pub fn import_object(&self, id: &Id, stored: &[u8]) -> Result<bool> {
        if Id::of(stored) != *id {
            return Err(Error::Corrupt(format!(
                "object {} does not match its content",
                id.short()
            )));
        }
        let kind = stored.get(1).copied().unwrap_or(0);
        if kind == object::KIND_COMMIT {
            let c: Commit = object::decode(id, kind, stored)?;
            let mut objs = vec![c.root];
            objs.extend(c.parents.iter().copied());
            let named = self.hold_present(id, &objs, &[])?;
            check_commit(id, &c, &named[0], &named[1..])?;
        } else {
            let (kids, chunks) = node_refs(id, stored)?;
            let named = self.hold_present(id, &kids, &chunks)?;
            for (k, b) in kids.iter().zip(&named) {
                if !is_tree_node(b) {
                    return Err(Error::Refused(format!(
                        "tree node {} names {} as a child, which is {}, not a tree node",
                        id.short(),
                        k.short(),
                        kind_name(b)
                    )));
                }
            }
        }
        self.pin(id);
        if self.store.db.has_object(id)? {
            self.store.db.note_young(id);
            return Ok(false);
        }
        let mut batch = WriteBatch::default();
        self.store.db.put_object(&mut batch, id, stored);
        self.store.db.write(batch, false, "importing an object")?;
        Ok(true)
    }
}

/// True when `stored` is the stored form of a tree node (leaf or inner).
fn is_tree_node(stored: &[u8]) -> bool {
    matches!(
        stored.get(1).copied(),
        Some(object::KIND_LEAF | object::KIND_INNER)
    )
}

/// What kind of object `stored` is, for messages.
fn kind_name(stored: &[u8]) -> String {
    match stored.get(1).copied() {
        Some(object::KIND_LEAF) => "a tree leaf".into(),
        Some(object::KIND_INNER) => "an inner tree node".into(),
        Some(object::KIND_COMMIT) => "a commit".into(),
        Some(k) => format!("an object of unknown kind {k}"),
        None => "an empty object".into(),
    }
}

/// Checks what commit `id` names: `root` (stored form) must be a tree node,
/// `parents` (stored forms, in the commit's order) commits, and its
/// generation 1 + the largest of theirs (1 without parents).
fn check_commit(id: &Id, c: &Commit, root: &[u8], parents: &[Vec<u8>]) -> Result<()> {
    if !is_tree_node(root) {
        return Err(Error::Refused(format!(
            "commit {} names {} as its snapshot root, which is {}, not a tree node",
            id.short(),
            c.root.short(),
            kind_name(root)
        )));
    }
    let mut top: Option<u64> = None;
    for (p, b) in c.parents.iter().zip(parents) {
        if b.get(1).copied() != Some(object::KIND_COMMIT) {
            return Err(Error::Refused(format!(
                "commit {} names {} as a parent, which is {}, not a commit",
                id.short(),
                p.short(),
                kind_name(b)
            )));
        }
        let pc: Commit = object::decode(p, object::KIND_COMMIT, b)?;
        top = Some(top.map_or(pc.generation, |t| t.max(pc.generation)));
    }
    let expected = match top {
        None => Some(1),
        Some(g) => g.checked_add(1),
    };
    if expected != Some(c.generation) {
        return Err(Error::Refused(format!(
            "commit {} has generation {}, but {}",
            id.short(),
            c.generation,
            match (top, expected) {
                (None, _) => "a commit without parents has generation 1".to_string(),
                (Some(g), Some(e)) => format!("its parents' largest is {g}, so it must be {e}"),
                (Some(g), None) => format!("its parents' largest is {g}, which has no successor"),
            }
        )));
    }
    Ok(())
}

impl Drop for ImportSession {
    /// Keeps the chunks an interrupted transfer imported for its rerun;
    /// the hold then lets go.
    fn drop(&mut self) {
        let chunks = std::mem::take(&mut *self.imported_chunks.lock());
        if chunks.is_empty() {
            return;
        }
        let dot = self.dot.lock().clone();
        // A dot deleted during the transfer (it existed when the transfer
        // began): nothing to resume into, and its delete had let go of
        // what earlier transfers left (a hub kept 400 MiB of a push cut by
        // the delete through every GC).
        if let Some((name, Some(id))) = &dot {
            if !self.store.dot_info(name).is_ok_and(|d| d.id == *id) {
                return;
            }
        }
        let key = dot.map(|(name, _)| name.to_string()).unwrap_or_default();
        self.store.db.keep_for_resume(&key, chunks);
    }
}

impl Store {
    /// The stored form of an object, if present.
    pub fn object_bytes(&self, id: &Id) -> Result<Option<Vec<u8>>> {
        if !self.db.has_object(id)? {
            return Ok(None);
        }
        self.db.get_object(id).map(Some)
    }

    /// The stored form of a chunk (codec byte + payload), if present.
    pub fn chunk_bytes(&self, id: &Id) -> Result<Option<Vec<u8>>> {
        self.db.get(id)
    }

    /// Which of `ids` are stored objects, in order.
    pub fn has_objects(&self, ids: &[Id]) -> Result<Vec<bool>> {
        let cf = self.db.cf(crate::db::CF_OBJECTS);
        let keys: Vec<_> = ids.iter().map(|id| (cf, id.0)).collect();
        self.db
            .db
            .multi_get_cf(keys)
            .into_iter()
            .map(|r| {
                r.map(|v| v.is_some())
                    .map_err(Error::db("checking which objects are present"))
            })
            .collect()
    }

    /// The stored forms of `ids` (None for those not stored), in order.
    fn objects_stored(&self, ids: &[Id]) -> Result<Vec<Option<Vec<u8>>>> {
        let cf = self.db.cf(crate::db::CF_OBJECTS);
        let keys: Vec<_> = ids.iter().map(|id| (cf, id.0)).collect();
        self.db
            .db
            .multi_get_cf(keys)
            .into_iter()
            .map(|r| r.map_err(Error::db("reading the objects an import names")))
            .collect()
    }

    /// Which of `ids` are stored commits (not tree nodes, not absent), in
    /// order.
    pub fn stored_commits(&self, ids: &[Id]) -> Result<Vec<bool>> {
        Ok(self
            .objects_stored(ids)?
            .into_iter()
            .map(|b| b.is_some_and(|b| b.get(1).copied() == Some(object::KIND_COMMIT)))
            .collect())
    }

    /// Which of `ids` are stored chunks, in order.
    pub fn has_chunks(&self, ids: &[Id]) -> Result<Vec<bool>> {
        self.db.has_many(ids)
    }

    /// A commit record.
    pub fn commit_record(&self, id: &Id) -> Result<Commit> {
        self.db.commit(id)
    }

    /// Every commit reachable from `head` (all parents), newest first
    /// (by generation, then id).
    pub fn ancestry(&self, head: Option<Id>) -> Result<Vec<Id>> {
        let mut seen: HashMap<Id, u64> = HashMap::new();
        let mut stack: Vec<Id> = head.into_iter().collect();
        while let Some(id) = stack.pop() {
            if seen.contains_key(&id) {
                continue;
            }
            let c = self.db.commit(&id)?;
            stack.extend(c.parents.iter().copied());
            seen.insert(id, c.generation);
        }
        let mut out: Vec<(u64, Id)> = seen.into_iter().map(|(id, g)| (g, id)).collect();
        out.sort_by(|a, b| b.cmp(a));
        Ok(out.into_iter().map(|(_, id)| id).collect())
    }

    /// The commits of `head`'s ancestry the receiver lacks, oldest first
    /// (parents before children). `has` answers batches of at most `batch`
    /// ids; a commit the receiver has ends the walk along that path (its
    /// ancestry is present too, by the receiver's invariant).
    pub fn missing_commits<E: From<Error>>(
        &self,
        head: Id,
        batch: usize,
        has: &mut HasFn<'_, E>,
    ) -> std::result::Result<Vec<Id>, E> {
        let batch = batch.max(1);
        let mut seen: HashSet<Id> = HashSet::new();
        let mut missing: Vec<(u64, Id)> = Vec::new();
        let mut queue = vec![head];
        while !queue.is_empty() {
            let mut part: Vec<(Id, Commit)> = Vec::new();
            while part.len() < batch {
                let Some(id) = queue.pop() else { break };
                if !seen.insert(id) {
                    continue;
                }
                let c = self.db.commit(&id)?;
                // Speculatively follow the parents locally, so a linear
                // history goes out in full batches.
                queue.extend(c.parents.iter().copied());
                part.push((id, c));
            }
            let ids: Vec<Id> = part.iter().map(|(id, _)| *id).collect();
            let present = has(&ids)?;
            if present.len() != ids.len() {
                return Err(
                    Error::Corrupt("has-query answered the wrong number of ids".into()).into(),
                );
            }
            queue.clear();
            for ((id, c), p) in part.into_iter().zip(present) {
                if !p {
                    queue.extend(c.parents.iter().filter(|p| !seen.contains(p)).copied());
                    missing.push((c.generation, id));
                }
            }
        }
        missing.sort();
        Ok(missing.into_iter().map(|(_, id)| id).collect())
    }

    /// True when the branch has anything not committed (including files
    /// written on a branch that has no commit yet).
    pub fn has_uncommitted(&self, dot: &DotName, branch: &str) -> Result<bool> {
        let fs = self.branch_fs(dot, branch)?;
        let st = fs.state.read();
        Self::uncommitted_in(&fs, &st)
    }

    /// [`Store::has_uncommitted`] of `fs`, whose state the caller holds.
    pub(crate) fn uncommitted_in(
        fs: &crate::branch::BranchFs,
        st: &crate::branch::BranchState,
    ) -> Result<bool> {
        if fs.unflushed_bytes() > 0 {
            return Ok(true);
        }
        // A branch without commits starts with an overlay holding a fresh
        // superblock and root directory, which has_work passes over too.
        crate::diff::has_work(&fs.view(st))
    }

    /// Moves `branch` of `dot` to commit `new` if it is at `expected` (None:
    /// the branch has no commit or does not exist). Creates the dot (with
    /// `block_size`) and the branch when missing. Refuses when the branch
    /// has uncommitted changes, when the dot's block size differs, and when
    /// `new` or its root is not stored. One synced write batch.
    pub fn set_branch_head(
        &self,
        dot: &DotName,
        branch: &str,
        expected: Option<Id>,
        new: Id,
        block_size: u32,
    ) -> Result<SetHead> {
        names::validate("namespace", &dot.namespace)?;
        names::validate("dot", &dot.name)?;
        names::validate("branch", branch)?;
        let _a = self.admin.lock();
        // Ref and object writes finish before a GC starts marking (see Db::gc_barrier).
        let _b = self.db.gc_barrier.read_recursive();
        // Young before it is looked for, and under the barrier: a GC that
        // started earlier keeps it and all it names (unless already gone,
        // which the lookup below then finds); one that starts later sees
        // the branch name it.
        self.db.note_young(&new);
        // Connectivity: the commit and its root (hence, by the import
        // invariant, everything) must be here.
        let commit = self.db.commit(&new).map_err(|_| {
            Error::Refused(format!(
                "commit {} is not stored here; the transfer is incomplete",
                new.short()
            ))
        })?;
        match self.object_bytes(&commit.root)? {
            None => {
                return Err(Error::Refused(format!(
                    "the snapshot of commit {} is not stored here; the transfer is incomplete",
                    new.short()
                )))
            }
            Some(b) if !is_tree_node(&b) => {
                return Err(Error::Refused(format!(
                    "commit {} names {} as its snapshot root, which is {}, not a tree node",
                    new.short(),
                    commit.root.short(),
                    kind_name(&b)
                )))
            }
            Some(_) => {}
        }
        let key = meta::dot_key(&dot.namespace, &dot.name);
        let existing: Option<DotRec> = self.meta_get(&key, "dot")?;
        let mut batch = WriteBatch::default();
        // The overlay id of the branch, when the dot is created here too:
        // both ids come from one reservation (next_ids reads the counter
        // from the database, not from the batch).
        let mut new_bid = None;
        let d = match existing {
            Some(d) => {
                if d.block_size != block_size {
                    return Err(Error::Refused(format!(
                        "dot {dot} has block size {} here but {block_size} at the other end; transfer it under another name",
                        d.block_size
                    )));
                }
                d
            }
            None => {
                if expected.is_some() {
                    return Ok(SetHead::Moved { actual: None });
                }
                // New names follow the rules `dm init` and `dm checkout -b`
                // apply (a peer's transfer is no way around them).
                names::validate_new("namespace", &dot.namespace)?;
                names::validate_new("dot", &dot.name)?;
                let id = self.next_ids(&mut batch, 2)?;
                new_bid = Some(id + 1);
                let d = DotRec {
                    id,
                    namespace: dot.namespace.clone(),
                    name: dot.name.clone(),
                    block_size,
                    created_ns: crate::inode::Timestamp::now().as_nanos(),
                    current_branch: branch.to_string(),
                };
                self.meta_put(&mut batch, &key, &d);
                d
            }
        };
        let bkey = meta::branch_key(d.id, branch);
        let rec: Option<BranchRec> = self.meta_get(&bkey, "branch")?;
        match rec {
            None => {
                if expected.is_some() {
                    return Ok(SetHead::Moved { actual: None });
                }
                names::validate_new("branch", branch)?;
                let bid = match new_bid {
                    Some(bid) => bid,
                    None => self.next_ids(&mut batch, 1)?,
                };
                let rec = BranchRec {
                    bid,
                    head: Some(new),
                    root: commit.root,
                    origin: None,
                };
                self.meta_put(&mut batch, &bkey, &rec);
                self.db.write(
                    batch,
                    true,
                    &format!("setting branch {branch} of dot {dot}"),
                )?;
                Ok(SetHead::Updated)
            }
            Some(mut rec) => {
                let fs = self.fs_for(&d, branch)?;
                // Held until the move is written: no write can land between
                // the check for uncommitted changes and the move (it would
                // be discarded with the old working state).
                let (_io, mut st) = fs.lock_for_reset();
                if st.head != expected {
                    return Ok(SetHead::Moved { actual: st.head });
                }
                if Self::uncommitted_in(&fs, &st)? {
                    return Err(Error::Refused(format!(
                        "branch {branch} of dot {dot} has uncommitted changes; commit them (or `dm reset --hard HEAD`) first"
                    )));
                }
                // As a reset: files a process still has open keep numbers
                // no new file gets.
                let before = fs.before_reset(&st)?;
                self.refork(&d, &mut rec, new)?;
                self.refork_grown_from(&d, &mut batch, branch, new)?;
                rec.head = Some(new);
                rec.root = commit.root;
                self.fresh_working_state(&mut batch, &mut rec)?;
                self.meta_put(&mut batch, &bkey, &rec);
                self.db.write(
                    batch,
                    true,
                    &format!("setting branch {branch} of dot {dot}"),
                )?;
                fs.drop_buffers();
                st.head = Some(new);
                st.root = commit.root;
                st.bid = rec.bid;
                fs.reset_done(&st, before);
                Ok(SetHead::Updated)
            }
        }
    }

    // ---- settings ----

    fn setting_key(key: &str) -> Vec<u8> {
        let mut k = SETTINGS_PREFIX.to_vec();
        k.extend_from_slice(key.as_bytes());
        k
    }

    /// A server setting (users, keys, collaborators...), if set.
    pub fn setting(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.db
            .db
            .get_cf(self.db.cf(CF_META), Self::setting_key(key))
            .map_err(Error::db(format!("reading setting {key}")))
    }

    /// Sets a server setting (synced).
    pub fn set_setting(&self, key: &str, value: &[u8]) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.db.cf(CF_META), Self::setting_key(key), value);
        self.db
            .write(batch, true, &format!("writing setting {key}"))
    }

    /// Removes a server setting (synced).
    pub fn delete_setting(&self, key: &str) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.db.cf(CF_META), Self::setting_key(key));
        self.db
            .write(batch, true, &format!("deleting setting {key}"))
    }

    /// Every setting whose key starts with `prefix`: (key without the
    /// settings prefix, value).
    pub fn settings_with_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        Ok(self
            .meta_scan(&Self::setting_key(prefix))?
            .into_iter()
            .map(|(k, v)| {
                (
                    String::from_utf8_lossy(&k[SETTINGS_PREFIX.len()..]).into_owned(),
                    v,
                )
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CommitRequest, FileKind, ROOT_INO};

    fn write_file(s: &Store, dot: &DotName, branch: &str, name: &str, data: &[u8]) {
        let fs = s.branch_fs(dot, branch).unwrap();
        let ino = match fs.lookup(ROOT_INO, name.as_bytes()) {
            Ok(a) => a.ino,
            Err(_) => {
                fs.mknod(ROOT_INO, name.as_bytes(), FileKind::File, 0o644, 0, 0, 0)
                    .unwrap()
                    .ino
            }
        };
        fs.write(ino, 0, data).unwrap();
        fs.flush(ino).unwrap();
    }

    fn commit(s: &Store, dot: &DotName, branch: &str, msg: &str) -> Id {
        s.commit(
            dot,
            branch,
            CommitRequest {
                message: msg.into(),
                author: "t".into(),
                ..Default::default()
            },
        )
        .unwrap()
        .id
    }

    /// A sender store with dot `app` and an empty receiver store (and the
    /// temporary directories that hold them).
    fn sender_and_receiver() -> ([tempfile::TempDir; 2], Arc<Store>, Arc<Store>, DotName) {
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let a = Store::open(dirs[0].path()).unwrap();
        let b = Store::open(dirs[1].path()).unwrap();
        let dot = DotName::new("app").unwrap();
        a.create_dot(&dot, None).unwrap();
        (dirs, a, b, dot)
    }

    /// Copies `head` from `a` to `b` the way a transfer does: missing
    /// commits, planned trees bottom-up, chunks first.
    fn copy(a: &Store, b: &Arc<Store>, head: Id) -> (usize, u64) {
        let sess = ImportSession::new(b.clone());
        let commits = a
            .missing_commits::<Error>(head, 3, &mut |ids| b.has_objects(ids))
            .unwrap();
        let roots: Vec<Id> = commits
            .iter()
            .map(|c| a.commit_record(c).unwrap().root)
            .collect();
        let plan = plan_trees::<Error>(&roots, 7, &mut |ids| b.has_objects(ids), &mut |ids| {
            Ok(ids
                .iter()
                .map(|id| a.object_bytes(id).unwrap().unwrap())
                .collect())
        })
        .unwrap();
        let present = b.has_chunks(&plan.chunks).unwrap();
        let mut sent = 0;
        for (c, p) in plan.chunks.iter().zip(present) {
            if !p {
                let bytes = a.chunk_bytes(c).unwrap().unwrap();
                sent += bytes.len() as u64;
                sess.import_chunk(c, &bytes).unwrap();
            }
        }
        for level in &plan.levels {
            for id in level {
                sess.import_object(id, &a.object_bytes(id).unwrap().unwrap())
                    .unwrap();
            }
        }
        for c in &commits {
            sess.import_object(c, &a.object_bytes(c).unwrap().unwrap())
                .unwrap();
        }
        (commits.len(), sent)
    }

    #[test]
    fn transfer_round_trip_and_divergence() {
        let (_dirs, a, b, dot) = sender_and_receiver();
        let big: Vec<u8> = (0..(1u32 << 20)).map(|i| (i * 7 % 251) as u8).collect();
        write_file(&a, &dot, "master", "f", &big);
        let c1 = commit(&a, &dot, "master", "one");
        write_file(&a, &dot, "master", "g", b"hello");
        let c2 = commit(&a, &dot, "master", "two");
        let (n, sent1) = copy(&a, &b, c2);
        assert_eq!(n, 2);
        assert!(sent1 > 0);
        let bs = a.dot_info(&dot).unwrap().block_size;
        assert_eq!(
            b.set_branch_head(&dot, "master", Some(c1), c2, bs).unwrap(),
            SetHead::Moved { actual: None }
        );
        assert_eq!(
            b.set_branch_head(&dot, "master", None, c2, bs).unwrap(),
            SetHead::Updated
        );
        assert_eq!(b.log(&dot, "master").unwrap().len(), 2);
        let fs = b.branch_fs(&dot, "master").unwrap();
        let f = fs.lookup(ROOT_INO, b"f").unwrap();
        assert_eq!(fs.read(f.ino, 0, 1 << 20).unwrap(), big);
        assert!(b.fsck().unwrap().is_clean());
        // Nothing left to send.
        let (n, sent) = copy(&a, &b, c2);
        assert_eq!((n, sent), (0, 0));
        // A small change sends one block.
        write_file(&a, &dot, "master", "g", b"hello again");
        let c3 = commit(&a, &dot, "master", "three");
        let (n, sent) = copy(&a, &b, c3);
        assert_eq!(n, 1);
        assert!(sent < 1000, "sent {sent}");
        // Stale expectation is refused; the right one moves.
        assert_eq!(
            b.set_branch_head(&dot, "master", Some(c1), c3, bs).unwrap(),
            SetHead::Moved { actual: Some(c2) }
        );
        // Dirty branches are never overwritten.
        write_file(&b, &dot, "master", "local", b"x");
        assert!(matches!(
            b.set_branch_head(&dot, "master", Some(c2), c3, bs),
            Err(Error::Refused(_))
        ));
        b.reset(&dot, "master", c2, true).unwrap();
        assert_eq!(
            b.set_branch_head(&dot, "master", Some(c2), c3, bs).unwrap(),
            SetHead::Updated
        );
        assert_eq!(b.branch_fs(&dot, "master").unwrap().head(), Some(c3));
        // Divergence.
        write_file(&b, &dot, "master", "theirs", b"t");
        let t4 = commit(&b, &dot, "master", "theirs");
        write_file(&a, &dot, "master", "ours", b"o");
        let o4 = commit(&a, &dot, "master", "ours");
        let anc: HashSet<Id> = a.ancestry(Some(o4)).unwrap().into_iter().collect();
        let theirs = b.ancestry(Some(t4)).unwrap();
        assert_eq!(
            divergence(Some(o4), &anc, Some(t4), &theirs),
            Divergence::Diverged { common: c3 }
        );
        assert_eq!(
            divergence(Some(o4), &anc, Some(c2), &b.ancestry(Some(c2)).unwrap()),
            Divergence::FastForward
        );
        assert_eq!(
            divergence(
                Some(c2),
                &a.ancestry(Some(c2)).unwrap().into_iter().collect(),
                Some(c3),
                &b.ancestry(Some(c3)).unwrap()
            ),
            Divergence::Ahead
        );
        assert_eq!(
            divergence(Some(c3), &anc, Some(c3), &theirs),
            Divergence::UpToDate
        );
        assert_eq!(
            divergence(Some(o4), &anc, Some(Id([9; 32])), &[Id([9; 32])]),
            Divergence::NoCommonCommit
        );
    }

    #[test]
    fn imports_are_verified_and_ordered() {
        let (_dirs, a, b, dot) = sender_and_receiver();
        write_file(&a, &dot, "master", "f", &[5u8; 100_000]);
        let c1 = commit(&a, &dot, "master", "one");
        let sess = ImportSession::new(b.clone());
        // A corrupted chunk is rejected and not stored.
        let root = a.commit_record(&c1).unwrap().root;
        let plan = plan_trees::<Error>(&[root], 100, &mut |ids| b.has_objects(ids), &mut |ids| {
            Ok(ids
                .iter()
                .map(|id| a.object_bytes(id).unwrap().unwrap())
                .collect())
        })
        .unwrap();
        let cid = plan.chunks[0];
        let mut bad = a.chunk_bytes(&cid).unwrap().unwrap();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(sess.import_chunk(&cid, &bad).is_err());
        assert_eq!(b.has_chunks(&[cid]).unwrap(), vec![false]);
        // A node before its chunks is refused.
        let leaf = plan.levels[0][0];
        assert!(sess
            .import_object(&leaf, &a.object_bytes(&leaf).unwrap().unwrap())
            .is_err());
        // A commit whose objects are missing cannot become a head.
        assert!(b.set_branch_head(&dot, "master", None, c1, 65536).is_err());
        // A forged object is rejected.
        assert!(sess.import_object(&c1, b"\x01\x03nope").is_err());
        assert!(b.list_dots().unwrap().is_empty());
        // Pinned ids survive a GC while the session lives.
        for c in &plan.chunks {
            sess.import_chunk(c, &a.chunk_bytes(c).unwrap().unwrap())
                .unwrap();
        }
        b.gc().unwrap();
        assert!(b.has_chunks(&plan.chunks).unwrap().iter().all(|p| *p));
        drop(sess);
        // Kept for a rerun; a day later, not.
        b.gc().unwrap();
        assert!(b.has_chunks(&plan.chunks).unwrap().iter().all(|p| *p));
        b.db.resumable.lock().clear();
        b.gc().unwrap();
        assert!(b.has_chunks(&plan.chunks).unwrap().iter().all(|p| !*p));
    }

    /// The chunks and tree nodes of commit `c` of `a`, leaves first.
    fn closure(a: &Store, c: Id) -> TreePlan {
        let root = a.commit_record(&c).unwrap().root;
        plan_trees::<Error>(
            &[root],
            100,
            &mut |ids| Ok(vec![false; ids.len()]),
            &mut |ids| {
                Ok(ids
                    .iter()
                    .map(|id| a.object_bytes(id).unwrap().unwrap())
                    .collect())
            },
        )
        .unwrap()
    }

    /// What a session answered "present" stays until it ends (the sender
    /// skips it), whatever GCs run: a rerun after an interrupted push
    /// failed with "tree node arrived before its chunk" once a GC had
    /// taken what the first run brought. The chunks an interrupted session
    /// imported stay for the rerun until a transfer into that dot moves a
    /// branch (they stayed 24 h, after the rerun and a delete of the dot),
    /// or the dot is deleted, or the disk is full; its tree nodes and
    /// commits do not (a kept commit kept its whole history, other
    /// transfers' data with it).
    #[test]
    fn present_answers_and_interrupted_imports_outlive_gcs() {
        let (_dirs, a, b, dot) = sender_and_receiver();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        write_file(&a, &dot, "master", "f", &data);
        let c1 = commit(&a, &dot, "master", "one");
        let plan = closure(&a, c1);
        let chunks = plan.chunks.clone();
        let leaf = plan.levels[0][0];
        let all_there = |b: &Store| b.has_chunks(&chunks).unwrap().iter().all(|p| *p);
        let none_there = |b: &Store| b.has_chunks(&chunks).unwrap().iter().all(|p| !*p);
        let import_chunks = |s: &ImportSession| {
            for c in &chunks {
                s.import_chunk(c, &a.chunk_bytes(c).unwrap().unwrap())
                    .unwrap();
            }
        };
        // The first run: the chunks and a tree node arrive, then the
        // connection drops.
        let first = ImportSession::new(b.clone());
        first.into_dot(&dot);
        import_chunks(&first);
        first
            .import_object(&leaf, &a.object_bytes(&leaf).unwrap().unwrap())
            .unwrap();
        drop(first);
        b.gc().unwrap();
        assert!(
            all_there(&b),
            "what the first run brought is kept for the rerun"
        );
        assert!(
            b.object_bytes(&leaf).unwrap().is_none(),
            "tree nodes are not kept"
        );
        // The rerun is told they are there; they stay while it runs, even
        // once they are no longer kept for a rerun (a day later).
        let rerun = ImportSession::new(b.clone());
        rerun.into_dot(&dot);
        assert!(rerun.has_chunks(&chunks).unwrap().iter().all(|p| *p));
        b.db.resumable.lock().clear();
        b.gc().unwrap();
        assert!(all_there(&b), "a present answer outlives a GC");
        for level in &plan.levels {
            for id in level {
                rerun
                    .import_object(id, &a.object_bytes(id).unwrap().unwrap())
                    .unwrap();
            }
        }
        rerun
            .import_object(&c1, &a.object_bytes(&c1).unwrap().unwrap())
            .unwrap();
        assert_eq!(
            b.set_branch_head(&dot, "master", None, c1, crate::DEFAULT_BLOCK_SIZE)
                .unwrap(),
            SetHead::Updated
        );
        rerun.moved_branch(&dot);
        drop(rerun);
        b.delete_dot(&dot).unwrap();
        b.gc().unwrap();
        assert!(none_there(&b), "deleting the dot gives it all back");
        // An interrupted run, then its rerun moves the branch: what the
        // first run left is not kept any more.
        let first = ImportSession::new(b.clone());
        first.into_dot(&dot);
        import_chunks(&first);
        drop(first);
        assert!(!b.db.resumable_ids(false).is_empty());
        let rerun = ImportSession::new(b.clone());
        rerun.moved_branch(&dot);
        drop(rerun);
        assert!(
            b.db.resumable_ids(false).is_empty(),
            "released by the rerun"
        );
        b.gc().unwrap();
        assert!(none_there(&b));
        // Deleting the dot releases them too; a full disk as well.
        let first = ImportSession::new(b.clone());
        first.into_dot(&dot);
        import_chunks(&first);
        drop(first);
        b.create_dot(&dot, None).unwrap();
        b.delete_dot(&dot).unwrap();
        assert!(
            b.db.resumable_ids(false).is_empty(),
            "released by the delete"
        );
        // Deleted while the transfer runs (it existed when it began): not
        // kept when it ends (a hub kept them through every GC).
        b.create_dot(&dot, None).unwrap();
        let first = ImportSession::new(b.clone());
        first.into_dot(&dot);
        import_chunks(&first);
        b.delete_dot(&dot).unwrap();
        drop(first);
        assert!(
            b.db.resumable_ids(false).is_empty(),
            "kept for a dot deleted during the transfer"
        );
        let first = ImportSession::new(b.clone());
        first.into_dot(&dot);
        import_chunks(&first);
        drop(first);
        assert!(!b.db.resumable_ids(false).is_empty());
        assert!(
            b.db.resumable_ids(true).is_empty(),
            "dropped on a full disk"
        );
    }

    /// A commit being pushed stays with all it names while held, even once
    /// its dot is deleted and a GC runs (the push failed with "chunk
    /// missing locally").
    #[test]
    fn a_held_commit_outlives_its_dot_until_let_go() {
        let da = tempfile::tempdir().unwrap();
        let a = Store::open(da.path()).unwrap();
        let dot = DotName::new("app").unwrap();
        a.create_dot(&dot, None).unwrap();
        write_file(&a, &dot, "master", "f", &[9u8; 200_000]);
        let c1 = commit(&a, &dot, "master", "one");
        let plan = closure(&a, c1);
        let hold = Hold::new(a.clone());
        assert_eq!(hold.objects(&[c1]).unwrap(), vec![true]);
        let missing = Id::of(b"nothing stored");
        assert_eq!(hold.objects(&[missing]).unwrap(), vec![false]);
        assert!(
            !a.db.pins.lock().contains_key(&missing),
            "absent ids are let go"
        );
        a.delete_dot(&dot).unwrap();
        a.gc().unwrap();
        assert!(a.object_bytes(&c1).unwrap().is_some());
        assert!(a.has_chunks(&plan.chunks).unwrap().iter().all(|p| *p));
        for level in &plan.levels {
            assert!(a.has_objects(level).unwrap().iter().all(|p| *p));
        }
        drop(hold);
        a.gc().unwrap();
        assert!(a.object_bytes(&c1).unwrap().is_none());
        assert!(a.has_chunks(&plan.chunks).unwrap().iter().all(|p| !*p));
    }

    /// Plans `roots` against a receiver that has nothing, from `nodes`.
    fn plan_from(nodes: &HashMap<Id, Vec<u8>>, roots: &[Id]) -> TreePlan {
        plan_trees::<Error>(
            roots,
            2,
            &mut |ids| Ok(vec![false; ids.len()]),
            &mut |ids| Ok(ids.iter().map(|id| nodes[id].clone()).collect()),
        )
        .unwrap()
    }

    #[test]
    fn plan_levels_put_children_below_parents_across_trees_of_different_heights() {
        let mut nodes: HashMap<Id, Vec<u8>> = HashMap::new();
        let mut put = |n: Node| {
            let (id, bytes) = object::encode_node(&n);
            nodes.insert(id, bytes);
            id
        };
        let leaf = |tag: &str| Node::Leaf(vec![(tag.as_bytes().to_vec(), b"v".to_vec())]);
        let inner = |kids: &[Id]| {
            Node::Inner(
                kids.iter()
                    .enumerate()
                    .map(|(i, k)| (vec![i as u8], *k))
                    .collect(),
            )
        };
        let la = put(leaf("a"));
        let lb = put(leaf("b"));
        let lc = put(leaf("c"));
        let a = put(inner(&[la]));
        let b = put(inner(&[lb]));
        let c = put(inner(&[lc]));
        // r1 reaches A and B first (height 2); r2 reaches them one level
        // deeper (height 3), through P1 and P2.
        let r1 = put(inner(&[a, b]));
        let p1 = put(inner(&[a]));
        let p2 = put(inner(&[b, c]));
        let r2 = put(inner(&[p1, p2]));
        for roots in [vec![r1, r2], vec![r2, r1]] {
            let plan = plan_from(&nodes, &roots);
            let mut level_of: HashMap<Id, usize> = HashMap::new();
            for (h, level) in plan.levels.iter().enumerate() {
                for id in level {
                    assert!(level_of.insert(*id, h).is_none(), "planned twice");
                }
            }
            assert_eq!(level_of.len(), nodes.len(), "every node is planned");
            for (id, bytes) in &nodes {
                let (kids, _) = node_refs(id, bytes).unwrap();
                for k in kids {
                    assert!(
                        level_of[&k] < level_of[id],
                        "child {} (level {}) is not below its parent {} (level {})",
                        k.short(),
                        level_of[&k],
                        id.short(),
                        level_of[id]
                    );
                }
            }
            // And the plan imports in that order without a refusal.
            let d = tempfile::tempdir().unwrap();
            let s = Store::open(d.path()).unwrap();
            let sess = ImportSession::new(s.clone());
            for level in &plan.levels {
                for id in level {
                    sess.import_object(id, &nodes[id]).unwrap();
                }
            }
        }
    }

    /// A store with dot `app` holding one commit on master; returns the
    /// store, the commit, and its root.
    fn one_commit(dir: &std::path::Path) -> (Arc<Store>, DotName, Id, Id) {
        let s = Store::open(dir).unwrap();
        let dot = DotName::new("app").unwrap();
        s.create_dot(&dot, None).unwrap();
        write_file(&s, &dot, "master", "f", b"data");
        let c = commit(&s, &dot, "master", "one");
        let root = s.commit_record(&c).unwrap().root;
        (s, dot, c, root)
    }

    fn forged_commit(root: Id, parents: Vec<Id>, generation: u64) -> (Id, Vec<u8>) {
        object::encode(
            object::KIND_COMMIT,
            &Commit {
                root,
                parents,
                author: "mallory".into(),
                message: "forged".into(),
                timestamp_ns: 0,
                metadata: Default::default(),
                generation,
                size: 0,
            },
        )
    }

    #[test]
    fn imported_commits_must_name_the_right_kinds_and_generation() {
        let d = tempfile::tempdir().unwrap();
        let (s, dot, c1, root) = one_commit(d.path());
        let bs = s.dot_info(&dot).unwrap().block_size;
        let sess = ImportSession::new(s.clone());
        let cases = [
            ("a commit as root", forged_commit(c1, vec![], 1)),
            ("a tree node as parent", forged_commit(root, vec![root], 2)),
            (
                "a commit as root, with a parent",
                forged_commit(c1, vec![c1], 2),
            ),
            (
                "generation u64::MAX",
                forged_commit(root, vec![c1], u64::MAX),
            ),
            (
                "generation 0 without parents",
                forged_commit(root, vec![], 0),
            ),
            (
                "generation 5 without parents",
                forged_commit(root, vec![], 5),
            ),
            (
                "generation 1 with a parent",
                forged_commit(root, vec![c1], 1),
            ),
        ];
        for (i, (what, (id, bytes))) in cases.iter().enumerate() {
            let r = sess.import_object(id, bytes);
            assert!(
                matches!(&r, Err(Error::Refused(m)) if m.contains(&id.short())),
                "{what}: {r:?}"
            );
            assert_eq!(s.has_objects(&[*id]).unwrap(), vec![false], "{what}");
            // It can never become a head.
            let branch = format!("evil{i}");
            assert!(s.set_branch_head(&dot, &branch, None, *id, bs).is_err());
        }
        // An inner node naming a commit is refused too.
        let (bad_inner, bytes) = object::encode_node(&Node::Inner(vec![(vec![], c1)]));
        assert!(matches!(
            sess.import_object(&bad_inner, &bytes),
            Err(Error::Refused(_))
        ));
        // A well-formed commit is still accepted.
        let (good, bytes) = forged_commit(root, vec![c1], 2);
        assert!(sess.import_object(&good, &bytes).unwrap());
        assert_eq!(
            s.set_branch_head(&dot, "ok", None, good, bs).unwrap(),
            SetHead::Updated
        );
        drop(sess);
        s.gc().unwrap();
        assert!(s.fsck().unwrap().is_clean());
        // And committing on top of it works.
        write_file(&s, &dot, "ok", "g", b"more");
        let c3 = commit(&s, &dot, "ok", "three");
        assert_eq!(s.commit_record(&c3).unwrap().generation, 3);
    }

    #[test]
    fn a_pulled_new_dot_and_its_branch_get_distinct_ids() {
        let da = tempfile::tempdir().unwrap();
        let db = tempfile::tempdir().unwrap();
        let (a, dot, c1, _) = one_commit(da.path());
        let b = Store::open(db.path()).unwrap();
        copy(&a, &b, c1);
        let bs = a.dot_info(&dot).unwrap().block_size;
        let before = b.id_limit().unwrap();
        assert_eq!(
            b.set_branch_head(&dot, "master", None, c1, bs).unwrap(),
            SetHead::Updated
        );
        let d = b.dot_rec(&dot).unwrap();
        let rec = b.branch_rec(&d, "master").unwrap();
        assert_ne!(d.id, rec.bid, "dot id and overlay id must differ");
        let limit = b.id_limit().unwrap();
        assert!(d.id >= before && rec.bid >= before);
        assert!(limit > d.id && limit > rec.bid, "the next id is unused");
        assert_eq!(limit, before + 2);
        // A second branch of the new dot gets a fresh id too.
        assert_eq!(
            b.set_branch_head(&dot, "other", None, c1, bs).unwrap(),
            SetHead::Updated
        );
        let other = b.branch_rec(&d, "other").unwrap();
        assert!(other.bid >= limit);
        assert!(b.id_limit().unwrap() > other.bid);
    }

    /// Received chunks are indexed at the end of each batch, so that a
    /// transfer resumed after a crash of the receiver finds them.
    #[test]
    fn received_chunks_are_indexed_after_each_batch() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let sess = ImportSession::new(s.clone());
        let data = crate::chunk::tests::pseudo_random(64 << 10, 5);
        let id = Id::of(&data);
        let stored = chunk::stored_form(chunk::CODEC_RAW, &data);
        assert!(sess.import_chunk(&id, &stored).unwrap());
        assert_eq!(s.db.pending_len(), 1, "a large chunk waits unindexed");
        sess.index_received().unwrap();
        assert_eq!(s.db.pending_len(), 0);
        assert_eq!(s.has_chunks(&[id]).unwrap(), vec![true]);
    }

    #[test]
    fn oversized_raw_chunks_are_refused_at_import() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let sess = ImportSession::new(s.clone());
        let data = vec![7u8; chunk::MAX_CHUNK + 1];
        let id = Id::of(&data);
        let stored = chunk::stored_form(chunk::CODEC_RAW, &data);
        let r = sess.import_chunk(&id, &stored);
        assert!(
            matches!(&r, Err(e) if e.to_string().contains(&id.short())),
            "{r:?}"
        );
        assert_eq!(s.has_chunks(&[id]).unwrap(), vec![false]);
        // The largest allowed size still goes in.
        let data = vec![7u8; chunk::MAX_CHUNK];
        let id = Id::of(&data);
        let stored = chunk::stored_form(chunk::CODEC_RAW, &data);
        assert!(sess.import_chunk(&id, &stored).unwrap());
    }

    #[test]
    fn uncommitted_on_a_branch_without_commits() {
        let (_dir, s, dot) = crate::store::tests::app_store();
        assert!(!s.has_uncommitted(&dot, "master").unwrap());
        write_file(&s, &dot, "master", "f", b"x");
        assert!(s.has_uncommitted(&dot, "master").unwrap());
    }

    #[test]
    fn settings() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        assert_eq!(s.setting("user/alice").unwrap(), None);
        s.set_setting("user/alice", b"a").unwrap();
        s.set_setting("user/bob", b"b").unwrap();
        s.set_setting("zzz", b"z").unwrap();
        assert_eq!(s.setting("user/alice").unwrap(), Some(b"a".to_vec()));
        let all = s.settings_with_prefix("user/").unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].0, "user/bob");
        s.delete_setting("user/bob").unwrap();
        assert_eq!(s.settings_with_prefix("user/").unwrap().len(), 1);
    }

    /// A file created while a branch is being moved (a pull) is either
    /// seen by the move (which then refuses: uncommitted changes) or made
    /// after it: never created and then discarded with the old working
    /// state. The move let go of the branch between its check and its
    /// write, and a create in between was lost.
    #[test]
    fn a_move_never_discards_a_file_created_meanwhile() {
        let (_dir, s, dot) = crate::store::tests::app_store();
        write_file(&s, &dot, "master", "base", b"1");
        let c1 = commit(&s, &dot, "master", "one");
        write_file(&s, &dot, "master", "base", b"2");
        let c2 = commit(&s, &dot, "master", "two");
        let bs = s.dot_info(&dot).unwrap().block_size;
        let fs = s.branch_fs(&dot, "master").unwrap();
        for round in 0..150 {
            let name = format!("f{round}");
            let created = std::sync::atomic::AtomicBool::new(false);
            std::thread::scope(|sc| {
                sc.spawn(|| {
                    std::thread::sleep(std::time::Duration::from_micros(200 + round * 7));
                    if fs
                        .mknod(ROOT_INO, name.as_bytes(), FileKind::File, 0o644, 0, 0, 0)
                        .is_ok()
                    {
                        created.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                });
                // Moves back and forth until the file exists.
                let mut at = s.branch_info(&dot, "master").unwrap().head;
                while !created.load(std::sync::atomic::Ordering::SeqCst) {
                    let to = if at == Some(c2) { c1 } else { c2 };
                    match s.set_branch_head(&dot, "master", at, to, bs) {
                        Ok(SetHead::Updated) => at = Some(to),
                        Ok(SetHead::Moved { actual }) => at = actual,
                        Err(_) => {} // uncommitted: the file is there
                    }
                }
            });
            assert!(
                fs.lookup(ROOT_INO, name.as_bytes()).is_ok(),
                "round {round}: {name} was created, then discarded by a move"
            );
            let head = s.branch_info(&dot, "master").unwrap().head.unwrap();
            s.reset(&dot, "master", head, true).unwrap();
        }
    }

    /// A peer's transfer cannot make a branch or dot that `dm checkout -b`
    /// and `dm init` refuse to make (`HEAD`, a leading `-`).
    #[test]
    fn set_head_refuses_new_names_the_cli_refuses() {
        let (_dir, s, dot) = crate::store::tests::app_store();
        write_file(&s, &dot, "master", "base", b"base");
        let c = commit(&s, &dot, "master", "base");
        let bs = s.dot_info(&dot).unwrap().block_size;
        for branch in ["HEAD", "-x"] {
            let e = s.set_branch_head(&dot, branch, None, c, bs).unwrap_err();
            assert!(matches!(e, Error::InvalidName { .. }), "{e}");
        }
        let e = s
            .set_branch_head(&DotName::parse("-odd").unwrap(), "master", None, c, bs)
            .unwrap_err();
        assert!(matches!(e, Error::InvalidName { .. }), "{e}");
        // An existing branch is moved as before.
        let r = s.set_branch_head(&dot, "master", Some(c), c, bs).unwrap();
        assert!(matches!(r, SetHead::Updated));
    }

    /// A transfer that makes a branch name an unreachable commit while GC
    /// runs (the hub answered "have it" for a commit an interrupted push
    /// left) ends with the whole snapshot there: GC keeps what the commit
    /// names.
    #[test]
    fn a_set_head_during_gc_keeps_the_whole_snapshot() {
        let (_dir, s, dot) = crate::store::tests::app_store();
        write_file(&s, &dot, "master", "base", b"base");
        commit(&s, &dot, "master", "base");
        s.create_branch(&dot, "b", None).unwrap();
        let data = crate::chunk::tests::pseudo_random(300_000, 11);
        write_file(&s, &dot, "b", "f", &data);
        let c = commit(&s, &dot, "b", "on b");
        s.delete_branch(&dot, "b", true).unwrap();
        let bs = s.dot_info(&dot).unwrap().block_size;
        let d2 = dot.clone();
        *s.gc_after_mark.lock() = Some(Box::new(move |st: &Store| {
            let r = st.set_branch_head(&d2, "again", None, c, bs).unwrap();
            assert!(matches!(r, SetHead::Updated));
        }));
        s.gc().unwrap();
        *s.gc_after_mark.lock() = None;
        assert!(s.fsck().unwrap().is_clean(), "{:?}", s.fsck().unwrap());
        let fs = s.branch_fs(&dot, "again").unwrap();
        let ino = fs.lookup(ROOT_INO, b"f").unwrap().ino;
        assert!(fs.read(ino, 0, 400_000).unwrap() == data);
    }
}
