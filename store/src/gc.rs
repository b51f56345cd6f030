//! Mark-and-sweep garbage collection and fsck.
//!
//! GC marks everything reachable from every branch (head commit ancestry,
//! snapshot trees, chunks named by blocks, and the working overlays), then
//! deletes unmarked objects and chunks. It is safe while branches are being
//! written: from its start until its end every chunk or object written or
//! re-referenced is recorded in the "young" set, which the sweep keeps, and
//! each sweep decision is made under the same lock that chunk writes take.

use crate::chunk::{self, ChunkStore};
use crate::chunklog::INLINE_MAX;
use crate::db::{Db, CF_OBJECTS, CF_WORK};
use crate::error::{Error, Result};
use crate::id::Id;
use crate::keys;
use crate::object::{self, Node};
use crate::store::Store;
use crate::transfer::{leaf_chunks, object_refs};
use crate::tree::NodeSource;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// An active chunk-log segment at least this large is sealed when GC
/// starts (smaller ones would leave many small segments behind).
const GC_SEAL_MIN_BYTES: u64 = 16 << 20;

/// How often [`Store::gc_due`] says yes while the disk is full.
pub const AUTO_GC_FULL_EVERY: Duration = Duration::from_secs(60);

/// What a GC run reclaimed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    pub objects_kept: u64,
    pub objects_deleted: u64,
    pub chunks_kept: u64,
    pub chunks_deleted: u64,
    /// Stored bytes of the deleted objects and chunks.
    pub bytes_freed: u64,
    /// Chunk log bytes given back to the filesystem (segments removed or
    /// compacted).
    #[serde(default)]
    pub log_bytes_freed: u64,
    /// Bytes RocksDB's files shrank by in the compaction GC ran after
    /// deleting many small chunks and tree nodes (0: none ran).
    #[serde(default)]
    pub table_bytes_freed: u64,
    /// Working states of deleted branches removed (left by earlier
    /// versions, which could let a write land after a branch's deletion).
    #[serde(default)]
    pub working_states_deleted: u64,
}

/// What fsck found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsckReport {
    pub commits_checked: u64,
    pub objects_checked: u64,
    pub chunks_checked: u64,
    /// Each problem, naming the object or chunk.
    pub problems: Vec<String>,
    /// What the store cannot tell from a problem (see `Db::wal_drops`).
    pub notes: Vec<String>,
}

impl FsckReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Everything reachable, found by [`mark`].
#[derive(Default)]
struct Marks {
    commits: HashSet<Id>,
    objects: HashSet<Id>,
    chunks: HashSet<Id>,
    /// Overlay ids that hold keys but belong to no branch (see [`mark`]).
    dead_overlays: Vec<u64>,
}

/// Walks from every branch. With `verify`, checks each object's and chunk's
/// bytes against its id and records problems instead of failing.
///
/// `id_limit` is the id counter read before the branch records: an overlay
/// id below it that no branch record names belongs to a deleted branch (or
/// to a working state a reset replaced) and can never be named again, as
/// ids are handed out once; what it names is not marked. Ids from the
/// limit on may belong to branches created meanwhile and are marked.
fn mark(store: &Store, id_limit: u64, verify: bool, problems: &mut Vec<String>) -> Result<Marks> {
    let db: &Db = &store.db;
    let mut m = Marks::default();
    let mut commits = Vec::new();
    let mut trees = Vec::new();
    let mut live = HashSet::new();
    for rec in store.all_branch_recs()? {
        trees.push(rec.root);
        commits.extend(rec.head);
        live.insert(rec.bid);
    }
    // Overlays: every block value they name.
    let mut it = db.db.raw_iterator_cf(db.cf(CF_WORK));
    it.seek_to_first();
    while it.valid() {
        if let (Some(k), Some(v)) = (it.key(), it.value()) {
            let bid = k.get(..8).map_or(0, |b| {
                // Cannot fail: the slice is 8 bytes long.
                u64::from_be_bytes(b.try_into().unwrap_or_default())
            });
            if bid < id_limit && !live.contains(&bid) {
                m.dead_overlays.push(bid);
                // Past every key of this overlay.
                match bid.checked_add(1) {
                    Some(next) => it.seek(next.to_be_bytes()),
                    None => break,
                }
                continue;
            }
            if k.len() > 8 && matches!(keys::parse(&k[8..]), Some((_, keys::TAG_BLOCK))) {
                let v = v.get(1..).unwrap_or_default();
                if let Some((id, _)) = keys::parse_block_value(v) {
                    m.chunks.insert(id);
                } else if crate::patch::is_patched(v) {
                    // A patched block keeps its base chunk.
                    match crate::patch::Patched::parse(v, u32::MAX) {
                        Ok(p) => m.chunks.extend(p.base.map(|(id, _)| id)),
                        Err(e) if verify => problems.push(format!("working state: {e}")),
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        it.next();
    }
    it.status().map_err(Error::db("scanning working states"))?;
    while let Some(id) = commits.pop() {
        if !m.commits.insert(id) {
            continue;
        }
        m.objects.insert(id);
        let bytes = match db.get_object(&id) {
            Ok(b) => b,
            Err(e) if verify => {
                problems.push(format!("commit {}: {e}", id.to_hex()));
                continue;
            }
            Err(e) => return Err(e),
        };
        if verify && Id::of(&bytes) != id {
            problems.push(format!("commit {} does not match its content", id.to_hex()));
        }
        match object::decode::<object::Commit>(&id, object::KIND_COMMIT, &bytes) {
            Ok(c) => {
                trees.push(c.root);
                commits.extend(c.parents);
            }
            Err(e) if verify => problems.push(format!("commit {}: {e}", id.to_hex())),
            Err(e) => return Err(e),
        }
    }
    while let Some(id) = trees.pop() {
        if !m.objects.insert(id) {
            continue;
        }
        if m.objects.len() % 4096 == 0 {
            if verify {
                store.fsck_go_on()?;
            } else {
                store.gc_go_on()?;
            }
        }
        let node = if verify {
            match db.get_object(&id).and_then(|b| {
                if Id::of(&b) != id {
                    return Err(Error::Corrupt("does not match its content".into()));
                }
                object::decode_node(&id, &b)
            }) {
                Ok(n) => std::sync::Arc::new(n),
                Err(e) => {
                    problems.push(format!("tree node {}: {e}", id.to_hex()));
                    continue;
                }
            }
        } else {
            db.node(&id)?
        };
        match &*node {
            Node::Inner(children) => trees.extend(children.iter().map(|(_, c)| *c)),
            Node::Leaf(entries) => match leaf_chunks(entries) {
                Ok(ids) => m.chunks.extend(ids),
                Err(e) if verify => problems.push(format!("tree node {}: {e}", id.to_hex())),
                Err(e) => return Err(e),
            },
        }
    }
    Ok(m)
}

/// Objects and chunks reachable from `roots` (ids of any kind, or of
/// nothing stored) that `marks` does not hold: what young objects name.
fn closure_of(db: &Db, marks: &Marks, roots: Vec<Id>) -> Result<Reached> {
    let mut out = Reached::default();
    let mut stack = roots;
    while let Some(id) = stack.pop() {
        if marks.objects.contains(&id) || out.objects.contains(&id) {
            continue;
        }
        let Some(bytes) = db
            .db
            .get_cf(db.cf(CF_OBJECTS), id.0)
            .map_err(Error::db(format!("reading object {}", id.short())))?
        else {
            continue; // a chunk, or nothing stored
        };
        out.objects.insert(id);
        let (objects, chunks) = object_refs(&id, &bytes)?;
        stack.extend(objects);
        out.chunks.extend(chunks);
    }
    Ok(out)
}

/// What [`closure_of`] found.
#[derive(Default)]
struct Reached {
    objects: HashSet<Id>,
    chunks: HashSet<Id>,
}

impl Store {
    /// Has a running GC stop at its next step (between marking and
    /// sweeping, every few thousand tree nodes or chunks, before it
    /// compacts), and every later one refuse to start, and likewise fsck:
    /// for a server that is stopping (one waited 92 s for its automatic
    /// GC). What a stopped GC did not delete, a later one does.
    pub fn stop_gc(&self) {
        self.gc_stopped.store(true, Ordering::Release);
    }

    /// Whether [`Store::stop_gc`] was called.
    pub fn gc_is_stopped(&self) -> bool {
        self.gc_stopped.load(Ordering::Acquire)
    }

    /// An error once [`Store::stop_gc`] was called.
    fn gc_go_on(&self) -> Result<()> {
        if self.gc_is_stopped() {
            return Err(Error::Refused(
                "GC stopped: the dm server is stopping (the next GC collects the rest)".into(),
            ));
        }
        Ok(())
    }

    /// Chunk segments the index names whose files are missing from the
    /// chunk directory (a partial copy or restore), with how many chunks
    /// each holds, as sentences (none: empty). One pass over the index:
    /// for a server's start, which otherwise said nothing while reads of
    /// them failed.
    pub fn missing_segments(&self) -> Result<Vec<String>> {
        Ok(self
            .db
            .missing_segments()?
            .into_iter()
            .map(|(seg, n)| missing_segment_problem(&self.db, seg, n))
            .collect())
    }

    /// [`Store::gc_go_on`] for fsck, which [`Store::stop_gc`] stops too (a
    /// server waited a minute for one to finish before it stopped).
    fn fsck_go_on(&self) -> Result<()> {
        if self.gc_is_stopped() {
            return Err(Error::Refused(
                "fsck stopped: the dm server is stopping; run `dm fsck` again once it runs".into(),
            ));
        }
        Ok(())
    }

    /// Deletes every chunk and object that no branch, commit or working
    /// state reaches. Safe while branches are written.
    pub fn gc(&self) -> Result<GcReport> {
        let _g = self.gc_lock.lock();
        self.gc_go_on()?;
        for fs in self.loaded_branches() {
            fs.free_unopened_orphans_now()?;
        }
        let compact_before = {
            // Writers that decided "chunk already stored" finish first.
            let _barrier = self.db.gc_barrier.write();
            // Ids pinned (by transfers in progress, and by write buffers
            // that spilled blocks their branch does not reference yet)
            // count as young from the start. `young` exists before the pins
            // are read, and pinners record the id as young after pinning it,
            // so a pin made after this read is recorded there.
            *self.db.young.lock() = Some(HashSet::new());
            // A delete from now on is after this GC's mark: the next sees it.
            self.deleted_since_gc.store(false, Ordering::Release);
            // Before the branch records (see `mark`).
            let id_limit = self.id_limit();
            let full = self.db.space.check_now();
            let mut pinned: Vec<Id> = self.db.pins.lock().keys().copied().collect();
            // What interrupted transfers brought, for their reruns (not on
            // a disk short of room, whoever filled it).
            pinned.extend(self.db.resumable_ids(full || self.db.space.short_of_room()));
            if let Some(young) = self.db.young.lock().as_mut() {
                young.extend(pinned);
            }
            // Chunks stored before now are indexed before the compaction
            // looks for segments nothing names.
            // The active segment is left alone by compaction: a large one
            // is sealed first, so that what GC frees in it goes back to the
            // disk now, not once it fills (a user deleting a dot and
            // running gc saw nothing given back). No one appends while
            // the barrier is held.
            // On a full disk, whatever its size: its dead records may be
            // all the room there is to get back.
            let seal_min = if full { 1 } else { GC_SEAL_MIN_BYTES };
            self.db
                .flush_pending()
                .and_then(|()| match self.db.log.seal(seal_min) {
                    // A full disk may have no room for a new segment: GC
                    // goes on without giving back the active one's space.
                    Err(e) if full => {
                        tracing::warn!("GC could not seal the active chunk segment: {e}");
                        Ok(false)
                    }
                    r => r,
                })
                .and_then(|_| Ok((self.db.log.active_segment(), id_limit?)))
        };
        let result = compact_before.and_then(|(before, limit)| self.gc_inner(before, limit));
        *self.db.young.lock() = None;
        result
    }

    fn gc_inner(&self, compact_before: u32, id_limit: u64) -> Result<GcReport> {
        let mut problems = Vec::new();
        let marks = mark(self, id_limit, false, &mut problems)?;
        #[cfg(test)]
        if let Some(f) = self.gc_after_mark.lock().as_ref() {
            f(self);
        }
        self.gc_go_on()?;
        let db = &self.db;
        let mut report = GcReport::default();
        // Working states of deleted branches: nothing reads or writes them.
        if !marks.dead_overlays.is_empty() {
            let mut batch = rocksdb::WriteBatch::default();
            for &bid in &marks.dead_overlays {
                crate::view::clear_overlay(db, &mut batch, bid);
            }
            db.write(batch, false, "deleting working states of deleted branches")?;
            report.working_states_deleted = marks.dead_overlays.len() as u64;
        }
        // Objects: deleted in one batch, so that a GC killed meanwhile
        // leaves every remaining object with all it names (transfers
        // answer "have it" for an object and trust what it names). Young
        // objects are kept with everything they name: a transfer may have
        // just found one present and be about to make a branch name it.
        // Bytes deleted from RocksDB's own files (objects, inline chunks).
        let mut in_tables = 0u64;
        let mut doomed = Vec::new();
        let mut it = db.db.raw_iterator_cf(db.cf(CF_OBJECTS));
        it.seek_to_first();
        while it.valid() {
            if let (Some(k), Some(v)) = (it.key(), it.value()) {
                let id = Id::from_slice(k)?;
                if marks.objects.contains(&id) {
                    report.objects_kept += 1;
                } else {
                    doomed.push((id, v.len() as u64));
                }
            }
            it.next();
        }
        it.status().map_err(Error::db("listing objects"))?;
        // Holding `young` until the batch is written: an object noted young
        // later was either kept with what it names, or is gone (and the
        // transfer that noted it finds it missing and sends it again).
        let kept = {
            let young = db.young.lock();
            let young_ids: Vec<Id> = young.iter().flatten().copied().collect();
            let kept = closure_of(db, &marks, young_ids)?;
            let mut batch = rocksdb::WriteBatch::default();
            for (id, len) in doomed {
                if kept.objects.contains(&id) {
                    report.objects_kept += 1;
                    continue;
                }
                batch.delete_cf(db.cf(CF_OBJECTS), id.0);
                report.objects_deleted += 1;
                report.bytes_freed += len;
                in_tables += len;
            }
            db.write(batch, false, "deleting unreachable objects")?;
            kept
        };
        // Chunks.
        let mut doomed = Vec::new();
        db.for_each_id(&mut |id| {
            if marks.chunks.contains(&id) || kept.chunks.contains(&id) {
                report.chunks_kept += 1;
            } else {
                doomed.push(id);
            }
            Ok(())
        })?;
        for (i, id) in doomed.into_iter().enumerate() {
            if i % 4096 == 0 {
                self.gc_go_on()?;
            }
            // Holding the young lock: a concurrent store_chunk of this id
            // either recorded it already (kept) or waits until it is gone
            // (and then writes it again).
            let young = db.young.lock();
            if young.as_ref().is_some_and(|y| y.contains(&id)) {
                report.chunks_kept += 1;
                continue;
            }
            let len = db.chunk_len(&id)?.unwrap_or(0);
            db.delete(&id)?;
            report.chunks_deleted += 1;
            report.bytes_freed += len;
            if len < INLINE_MAX as u64 {
                in_tables += len;
            }
        }
        // Those give their space back at a compaction: now, when it is
        // worth one, and not on a full disk (a compaction writes before it
        // deletes, and RocksDB stops taking writes when that fails).
        self.gc_go_on()?;
        if in_tables >= self.db.opts.compact_after_gc && !db.space.is_full() {
            // What the memtables hold counts in `before`: the compaction
            // flushes them first.
            db.flush_tables()?;
            let before = db.table_bytes();
            db.compact_deleted()?;
            report.table_bytes_freed = before.saturating_sub(db.table_bytes());
        }
        // Deleted chunks leave their records in the chunk log; reclaim the
        // segments they made sparse.
        report.log_bytes_freed = db.compact_chunks(compact_before)?;
        // The next `gc_due` measures growth from here: what the memtables
        // hold now is in the files first (flushed later, it would count
        // as growth).
        if !db.space.is_full() {
            db.flush_tables()?;
        }
        *self.gc_base.lock() = (Instant::now(), self.stored_bytes()?);
        {
            // No delete since this GC's mark (deletes write under the
            // barrier): what it made due is done.
            let _barrier = self.db.gc_barrier.write();
            if !self.deleted_since_gc.load(Ordering::Acquire) {
                self.db
                    .db
                    .delete_cf(self.db.cf(crate::db::CF_META), crate::meta::GC_DUE_KEY)
                    .map_err(crate::Error::db("recording that no GC is due"))?;
            }
        }
        // Writers refused for a full disk take data again now if this made
        // room, not at the next periodic look.
        db.space.check_now();
        Ok(report)
    }

    /// Bytes the chunk log holds on the disk (holes GC punched not
    /// counted).
    pub(crate) fn log_allocated(&self) -> Result<u64> {
        let mut total = 0;
        for (seg, _) in self.db.log.segments()? {
            total += self.db.log.allocated(seg)?;
        }
        Ok(total)
    }

    /// Whether a GC is due, for a server that runs them by itself: the
    /// store holds a quarter more bytes on the disk than after the last
    /// GC (or the store's opening), and at least `min_growth` more,
    /// as data written over leaves dead chunks (a database overwriting its
    /// files all day would fill the disk with them); a dot or branch was
    /// deleted (whose space its user expects back, as ZFS gives it); or
    /// the disk is full and the last GC is [`AUTO_GC_FULL_EVERY`] old.
    pub fn gc_due(&self, min_growth: u64) -> Result<bool> {
        let (at, base) = *self.gc_base.lock();
        if self.db.space.is_full() {
            return Ok(at.elapsed() >= AUTO_GC_FULL_EVERY);
        }
        if self.deleted_since_gc.load(Ordering::Acquire) {
            return Ok(true);
        }
        Ok(self.stored_bytes()? > base.saturating_add((base / 4).max(min_growth)))
    }

    /// Bytes the store holds on the disk: its chunk log (holes GC punched
    /// not counted) and RocksDB's files, where chunks under 16 KiB live (a
    /// database writing 4-8 KiB pages rewrites only those: counting the
    /// log alone, its garbage never made a GC due).
    pub(crate) fn stored_bytes(&self) -> Result<u64> {
        Ok(self.log_allocated()? + self.db.table_bytes())
    }

    /// Verifies every reachable commit, tree node and chunk against its id,
    /// and that everything a commit or working state names is present.
    /// Waits for a GC in progress (and a GC waits for it).
    pub fn fsck(&self) -> Result<FsckReport> {
        // Not beside a GC: fsck marks what the branches name, then looks
        // each chunk up, and a GC between the two deletes the chunks that
        // writes made garbage meanwhile, which fsck would call missing.
        // Without GC nothing is deleted, so writes cannot fool it.
        let _g = self.gc_lock.lock();
        let mut problems = Vec::new();
        let marks = mark(self, self.id_limit()?, true, &mut problems)?;
        let mut report = FsckReport {
            commits_checked: marks.commits.len() as u64,
            objects_checked: marks.objects.len() as u64,
            notes: self
                .db
                .wal_drops
                .iter()
                .map(|d| {
                    format!(
                        "when the store was opened, RocksDB dropped records of its write-ahead \
                         log that did not check out, and the changes after them: {}. {}",
                        d.record,
                        d.cause()
                    )
                })
                .collect(),
            ..Default::default()
        };
        // Chunks in a segment file that is missing, by segment: one line
        // each (a missing segment printed a line per chunk, thousands).
        let mut missing: std::collections::BTreeMap<u32, u64> = Default::default();
        for id in &marks.chunks {
            if report.chunks_checked.is_multiple_of(4096) {
                self.fsck_go_on()?;
            }
            report.chunks_checked += 1;
            match self.db.get(id) {
                Ok(Some(stored)) => {
                    if let Err(e) = chunk::decode_verified(id, &stored, chunk::MAX_CHUNK) {
                        problems.push(format!("chunk {}: {e}", id.to_hex()));
                    }
                }
                Ok(None) => problems.push(format!("chunk {} is missing", id.to_hex())),
                // Looked up only for a chunk that failed: most read whole.
                Err(e) => match self.db.missing_segment(id)? {
                    Some(seg) => *missing.entry(seg).or_default() += 1,
                    None => problems.push(format!("chunk {}: {e}", id.to_hex())),
                },
            }
        }
        for (seg, n) in missing {
            problems.push(missing_segment_problem(&self.db, seg, n));
        }
        report.problems = problems;
        Ok(report)
    }
}

/// How fsck and a start say that a chunk segment is missing.
fn missing_segment_problem(db: &Db, seg: u32, chunks: u64) -> String {
    format!(
        "chunk segment {} is missing from {}: {chunks} chunk(s) in it cannot be read (files \
         that use them fail with EIO); put the file back (from the copy the store came from: \
         no new segment takes its number)",
        crate::chunklog::segment_name(seg),
        db.log.dir().display()
    )
}
