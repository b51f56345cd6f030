//! What differs between two states of a dot's tree (commits, or a commit
//! and a branch's working state), as changed paths: `dm status`, `dm diff`.
//!
//! The keys that differ are found without reading the whole trees: two
//! snapshots' shared subtrees are skipped ([`tree::changed_keys`]) and a
//! working state's overlay holds its own changes. Paths come from those
//! keys: a changed directory entry names its path (a directory's whole
//! subtree when it moved), a directory knows its parent, and a file with
//! one link knows the directory it was created in or last moved to
//! ([`InodeRec::parent`]). Where that is not enough (a changed file with
//! several links, or one from a store older than that hint), both trees
//! are walked whole. Either way the result is the same.

use crate::error::Result;
use crate::inode::{Dirent, FileKind, Ino, InodeRec, Timestamp, ROOT_INO};
use crate::keys;
use crate::tree;
use crate::view::View;
use serde::{Deserialize, Serialize};
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// How a path differs between two states.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChangeKind {
    Added,
    Modified,
    Deleted,
    Renamed { from: Vec<u8> },
}

/// One changed path: `/subdot/dir/file`, as bytes (names need not be
/// UTF-8).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub kind: ChangeKind,
    pub path: Vec<u8>,
}

/// The paths that differ from `old` (a snapshot) to `new` (a snapshot or
/// a working state).
pub(crate) fn changes(old: &View, new: &View) -> Result<Vec<Change>> {
    let keys = changed_keys(old, new)?;
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let (o, n) = listings(old, new, &keys)?;
    compare(old, new, &o, &n)
}

#[cfg(test)]
thread_local! {
    /// Tests: walk the whole trees (the reference result).
    static FORCE_WALK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Tests: whether the last diff on this thread walked the whole trees.
    static WALKED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The listings of both sides to compare: of the changed keys' paths, or
/// of the whole trees where those cannot be told.
fn listings(old: &View, new: &View, keys: &BTreeSet<Vec<u8>>) -> Result<(Listing, Listing)> {
    #[cfg(test)]
    WALKED.set(false);
    #[cfg(test)]
    if FORCE_WALK.get() {
        WALKED.set(true);
        return Ok((Listing::walk(old)?, Listing::walk(new)?));
    }
    match (
        Listing::of_changes(old, keys)?,
        Listing::of_changes(new, keys)?,
    ) {
        (Some(mut o), Some(mut n)) => {
            // Whether a file on one side is on the other too.
            o.load_files(old, n.paths.values())?;
            n.load_files(new, o.paths.values())?;
            Ok((o, n))
        }
        _ => {
            #[cfg(test)]
            WALKED.set(true);
            Ok((Listing::walk(old)?, Listing::walk(new)?))
        }
    }
}

/// Every key whose value may differ between the two views (a superset:
/// an overlay may hold a value equal to its base's).
fn changed_keys(old: &View, new: &View) -> Result<BTreeSet<Vec<u8>>> {
    let mut out: BTreeSet<Vec<u8>> = tree::changed_keys(old.db, &old.root, &new.root)?
        .into_iter()
        .collect();
    for v in [old, new] {
        v.for_each_change(&mut |k, _| {
            out.insert(k.to_vec());
            Ok(())
        })?;
    }
    Ok(out)
}

/// One file of a tree.
struct FileEntry {
    kind: FileKind,
    /// Creation time (None when the record does not decode).
    crtime: Option<Timestamp>,
    /// Encoded record.
    rec: Vec<u8>,
}

impl FileEntry {
    /// The entry of record `rec` of inode `ino`, and the record decoded
    /// (`None` when it does not decode).
    fn of(ino: Ino, rec: Vec<u8>) -> (FileEntry, Option<InodeRec>) {
        let r = InodeRec::decode(ino, &rec).ok();
        let entry = FileEntry {
            kind: r.as_ref().map_or(FileKind::File, |r| r.kind),
            crtime: r.as_ref().map(|r| r.crtime),
            rec,
        };
        (entry, r)
    }

    /// Inode `ino` in `view` as [`FileEntry::of`], if it is in the tree
    /// (an unlinked file held open has a record but no path).
    fn load(view: &View, ino: Ino) -> Result<Option<(FileEntry, Option<InodeRec>)>> {
        let Some(rec) = view.get(&keys::inode(ino))? else {
            return Ok(None);
        };
        let (entry, r) = FileEntry::of(ino, rec);
        if r.as_ref()
            .is_some_and(|r| r.kind != FileKind::Dir && r.nlink == 0)
        {
            return Ok(None);
        }
        Ok(Some((entry, r)))
    }
}

/// Paths of a tree (one per hard link) and the files they name: all of
/// them ([`Listing::walk`]), or every one whose file differs from the other
/// tree's at that path or that may have changed ([`Listing::of_changes`]).
#[derive(Default)]
struct Listing {
    paths: BTreeMap<Vec<u8>, Ino>,
    files: HashMap<Ino, FileEntry>,
    /// Directories whose entries were listed (a directory reached twice
    /// would be a loop: not entered again).
    entered: HashSet<Ino>,
}

/// Where a directory is in one tree, as [`Finder::dir_path`] tells.
enum Found {
    Path(Vec<u8>),
    /// Not in this tree.
    Absent,
    /// In this tree, but its path cannot be told from its records.
    Unknown,
}

impl Listing {
    /// Every path reachable from the root.
    fn walk(view: &View) -> Result<Listing> {
        let mut out = Listing::default();
        out.entered.insert(ROOT_INO);
        out.walk_from(view, vec![(ROOT_INO, Vec::new())])?;
        Ok(out)
    }

    /// Adds the paths below each directory of `stack` (ino, path).
    fn walk_from(&mut self, view: &View, mut stack: Vec<(Ino, Vec<u8>)>) -> Result<()> {
        while let Some((dir, path)) = stack.pop() {
            for (name, e) in entries(view, dir)? {
                let p = join(&path, &name);
                self.add(view, p.clone(), e.ino)?;
                if e.kind == FileKind::Dir && self.entered.insert(e.ino) {
                    stack.push((e.ino, p));
                }
            }
        }
        Ok(())
    }

    /// Adds `path`, naming file `ino`.
    fn add(&mut self, view: &View, path: Vec<u8>, ino: Ino) -> Result<()> {
        self.paths.insert(path, ino);
        if let Entry::Vacant(v) = self.files.entry(ino) {
            let rec = view.get(&keys::inode(ino))?.unwrap_or_default();
            v.insert(FileEntry::of(ino, rec).0);
        }
        Ok(())
    }

    /// Adds the records of the files `inos` that are in `view`'s tree.
    fn load_files<'i>(&mut self, view: &View, inos: impl Iterator<Item = &'i Ino>) -> Result<()> {
        for &ino in inos {
            if let Entry::Vacant(e) = self.files.entry(ino) {
                if let Some((f, _)) = FileEntry::load(view, ino)? {
                    e.insert(f);
                }
            }
        }
        Ok(())
    }

    /// The paths `keys` (the keys that may differ from the other tree)
    /// touch in `view`: of each changed directory entry (and the subtree of
    /// a directory it names), and of each file with a changed record,
    /// block or extended attribute. `None` when a changed file's paths
    /// cannot be told without a walk.
    fn of_changes(view: &View, keys: &BTreeSet<Vec<u8>>) -> Result<Option<Listing>> {
        let mut out = Listing::default();
        let mut find = Finder {
            view,
            paths: HashMap::new(),
            names: HashMap::new(),
        };
        let mut changed = BTreeSet::new();
        for k in keys {
            let Some((ino, tag)) = keys::parse(k) else {
                continue;
            };
            match tag {
                keys::TAG_INODE | keys::TAG_BLOCK | keys::TAG_XATTR if ino != keys::SUPER_INO => {
                    changed.insert(ino);
                }
                keys::TAG_DIRENT => {
                    let (Some((_, name)), Some(v)) = (keys::parse_dirent(k), view.get(k)?) else {
                        continue;
                    };
                    let e = Dirent::decode(&v)?;
                    let parent = match find.dir_path(ino)? {
                        Found::Path(p) => p,
                        Found::Absent => continue,
                        Found::Unknown => return Ok(None),
                    };
                    let p = join(&parent, name);
                    out.add(view, p.clone(), e.ino)?;
                    // Everything below a directory that moved, came or went
                    // has another path on one side.
                    if e.kind == FileKind::Dir && out.entered.insert(e.ino) {
                        out.walk_from(view, vec![(e.ino, p)])?;
                    }
                }
                _ => {}
            }
        }
        let named: HashSet<Ino> = out.paths.values().copied().collect();
        for ino in changed {
            if ino == ROOT_INO {
                continue;
            }
            let Some((f, rec)) = FileEntry::load(view, ino)? else {
                continue;
            };
            let Some(rec) = rec else {
                return Ok(None);
            };
            out.files.insert(ino, f);
            // A changed file shows at each of its paths: all are needed.
            if rec.kind != FileKind::Dir && rec.nlink > 1 {
                return Ok(None);
            }
            if named.contains(&ino) {
                continue;
            }
            let path = if rec.kind == FileKind::Dir {
                match find.dir_path(ino)? {
                    Found::Path(p) => p,
                    Found::Absent | Found::Unknown => return Ok(None),
                }
            } else {
                let parent = match rec.parent {
                    0 => return Ok(None),
                    p => match find.dir_path(p)? {
                        Found::Path(p) => p,
                        Found::Absent | Found::Unknown => return Ok(None),
                    },
                };
                match find.names_of(rec.parent, ino)? {
                    [name] => join(&parent, name),
                    _ => return Ok(None),
                }
            };
            out.paths.insert(path, ino);
        }
        Ok(Some(out))
    }
}

/// `dir/name`.
fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(dir.len() + 1 + name.len());
    p.extend_from_slice(dir);
    p.push(b'/');
    p.extend_from_slice(name);
    p
}

/// A directory's entries as (name, entry).
fn entries(view: &View, dir: Ino) -> Result<Vec<(Vec<u8>, Dirent)>> {
    let mut out = Vec::new();
    view.scan(
        &keys::prefix(dir, keys::TAG_DIRENT),
        &keys::prefix_end(dir, keys::TAG_DIRENT),
        &mut |k, v| {
            if let Some((_, name)) = keys::parse_dirent(k) {
                out.push((name.to_vec(), Dirent::decode(v)?));
            }
            Ok(true)
        },
    )?;
    Ok(out)
}

/// Finds paths of directories (by their parent links) and names of files
/// in a directory, remembering what it read.
struct Finder<'v, 'a> {
    view: &'v View<'a>,
    paths: HashMap<Ino, Vec<u8>>,
    /// Names of each file in each directory listed: dir -> ino -> names.
    names: HashMap<Ino, HashMap<Ino, Vec<Vec<u8>>>>,
}

impl Finder<'_, '_> {
    /// The names of file `ino` in directory `dir`.
    fn names_of(&mut self, dir: Ino, ino: Ino) -> Result<&[Vec<u8>]> {
        if !self.names.contains_key(&dir) {
            let mut m: HashMap<Ino, Vec<Vec<u8>>> = HashMap::new();
            for (name, e) in entries(self.view, dir)? {
                m.entry(e.ino).or_default().push(name);
            }
            self.names.insert(dir, m);
        }
        Ok(self
            .names
            .get(&dir)
            .and_then(|m| m.get(&ino))
            .map(|v| v.as_slice())
            .unwrap_or_default())
    }

    /// The path of directory `dir` ("" for the root).
    fn dir_path(&mut self, dir: Ino) -> Result<Found> {
        // Up the parent links to the root or a directory found before.
        let mut chain = Vec::new();
        let mut cur = dir;
        let mut path = loop {
            if cur == ROOT_INO {
                break Vec::new();
            }
            if let Some(p) = self.paths.get(&cur) {
                break p.clone();
            }
            let Some(rec) = self.view.get(&keys::inode(cur))? else {
                // The directory asked about is not in this tree; one of
                // its ancestors missing means its records disagree.
                return Ok(if cur == dir {
                    Found::Absent
                } else {
                    Found::Unknown
                });
            };
            let rec = InodeRec::decode(cur, &rec)?;
            if rec.kind != FileKind::Dir || chain.len() > 4096 {
                return Ok(Found::Unknown);
            }
            chain.push((cur, rec.parent));
            cur = rec.parent;
        };
        while let Some((d, parent)) = chain.pop() {
            let name = match self.names_of(parent, d)? {
                [name] => name.clone(),
                _ => return Ok(Found::Unknown),
            };
            path = join(&path, &name);
            self.paths.insert(d, path.clone());
        }
        Ok(Found::Path(path))
    }
}

/// The changes from listing `old` of view `o` to listing `new` of view `n`.
fn compare(o: &View, n: &View, old: &Listing, new: &Listing) -> Result<Vec<Change>> {
    // The same file on both sides: the same inode number, kind and
    // creation time. Branches that forked number their new files from
    // the same counter, so a number alone does not name one file.
    let same = |ino: u64| match (old.files.get(&ino), new.files.get(&ino)) {
        (Some(o), Some(n)) => o.kind == n.kind && o.crtime.is_some() && o.crtime == n.crtime,
        _ => false,
    };
    // Whether a file on both sides changed (see file_changed).
    let mut changed_memo: HashMap<u64, bool> = HashMap::new();
    let mut changed = |ino: u64| -> Result<bool> {
        if let Some(&c) = changed_memo.get(&ino) {
            return Ok(c);
        }
        let c = file_changed(o, n, ino, &old.files[&ino], &new.files[&ino])?;
        changed_memo.insert(ino, c);
        Ok(c)
    };
    let change = |kind: ChangeKind, path: &[u8]| Change {
        kind,
        path: path.to_vec(),
    };
    let mut out = Vec::new();
    // Paths new on this side of files that exist on both: renamed to,
    // or added as another hard link.
    let mut targets: BTreeMap<u64, Vec<&[u8]>> = BTreeMap::new();
    for (path, &ino) in &new.paths {
        match old.paths.get(path) {
            Some(&oino) if oino == ino && same(ino) => {
                if changed(ino)? {
                    out.push(change(ChangeKind::Modified, path));
                }
            }
            // Another file in its place (deleted and created again, as
            // editors and `cp` over a removed file do, or renamed over
            // it): one modification, as git says.
            Some(_) => out.push(change(ChangeKind::Modified, path)),
            None if same(ino) => targets.entry(ino).or_default().push(path),
            None => out.push(change(ChangeKind::Added, path)),
        }
    }
    // Paths gone from this side of files that exist on both: renamed
    // from, or a hard link removed. A path still there is never the
    // source of a rename.
    let mut sources: HashMap<u64, Vec<&[u8]>> = HashMap::new();
    for (path, &ino) in &old.paths {
        if new.paths.contains_key(path) {
            continue;
        }
        if same(ino) {
            sources.entry(ino).or_default().push(path);
        } else {
            out.push(change(ChangeKind::Deleted, path));
        }
    }
    for (ino, to) in targets {
        let from = sources.remove(&ino).unwrap_or_default();
        for (i, path) in to.iter().enumerate() {
            match from.get(i) {
                Some(f) => {
                    out.push(change(ChangeKind::Renamed { from: f.to_vec() }, path));
                    // Moved and changed: the rename, then the change.
                    if changed(ino)? {
                        out.push(change(ChangeKind::Modified, path));
                    }
                }
                None => out.push(change(ChangeKind::Added, path)),
            }
        }
        for f in from.iter().skip(to.len()) {
            out.push(change(ChangeKind::Deleted, f));
        }
    }
    for from in sources.into_values() {
        for f in from {
            out.push(change(ChangeKind::Deleted, f));
        }
    }
    // A rename before the modification of the same path.
    out.sort_by(|a, b| {
        let rank = |c: &Change| !matches!(c.kind, ChangeKind::Renamed { .. });
        a.path.cmp(&b.path).then(rank(a).cmp(&rank(b)))
    });
    Ok(out)
}

/// Whether a file on both sides of a diff changed: its content, extended
/// attributes or attributes other than atime, ctime and the link count
/// (which renames, links and reads change; added and removed links show as
/// paths of their own). Of a directory, only its own mode, owner and
/// extended attributes: its times and size follow its entries, whose
/// changes show as theirs.
fn file_changed(
    old_view: &View,
    new_view: &View,
    ino: u64,
    old: &FileEntry,
    new: &FileEntry,
) -> Result<bool> {
    if old.rec == new.rec {
        // Any change of the file sets its ctime.
        return Ok(false);
    }
    let (Ok(mut o), Ok(mut n)) = (
        InodeRec::decode(ino, &old.rec),
        InodeRec::decode(ino, &new.rec),
    ) else {
        return Ok(true);
    };
    let dir = new.kind == FileKind::Dir;
    for r in [&mut o, &mut n] {
        r.atime = Default::default();
        r.ctime = Default::default();
        r.nlink = 0;
        // Where it is shows in its paths.
        r.parent = 0;
        if dir {
            r.mtime = Default::default();
            r.size = 0;
        }
    }
    if o != n {
        return Ok(true);
    }
    // Blocks and extended attributes (keys are ordered: tags 2 and 3); of
    // a directory, extended attributes only.
    let first = if dir {
        keys::TAG_XATTR
    } else {
        keys::TAG_BLOCK
    };
    let digest = |view: &View| -> Result<blake3::Hash> {
        let mut h = blake3::Hasher::new();
        view.scan(
            &keys::prefix(ino, first),
            &keys::prefix_end(ino, keys::TAG_XATTR),
            &mut |k, v| {
                for part in [k, v] {
                    h.update(&(part.len() as u64).to_le_bytes());
                    h.update(part);
                }
                Ok(true)
            },
        )?;
        Ok(h.finalize())
    };
    Ok(digest(old_view)? != digest(new_view)?)
}

/// Most overlay entries that [`has_work`] looks through: a working state
/// with more holds something besides mount placeholders (each takes three:
/// the root's entry, the directory's record and the root's record, shared).
/// Deletions of what the snapshot never had, and open orphans, are passed
/// over without counting.
const PLACEHOLDER_SCAN: usize = 64;

/// Whether working state `view` holds anything to commit besides subdot
/// directories that a mount made (see [`is_mount_placeholder`]): what makes
/// a branch dirty, so that a pull, a delete or a checkout's note does not
/// stop at an empty directory that `dm mount dot.sub` made on a branch
/// without that subdot (the mount makes it again after a reset or pull).
/// Files no name reaches are no one's work either: those deleted while
/// open (orphans, never committed), and their deletions once closed.
pub(crate) fn has_work(view: &View) -> Result<bool> {
    let superblock = keys::superblock();
    let orphans = orphan_inos(view)?;
    // A file whose record the snapshot never had: the deletions of its
    // other keys (a closed orphan's blocks, after its record's) are no
    // change either, and not looked up one by one.
    let mut never_had: Option<Ino> = None;
    let mut looked = 0usize;
    let mut work = false;
    view.scan_overlay(&mut |k, v| {
        if is_orphan_key(k, &orphans) {
            return Ok(true);
        }
        let parsed = keys::parse(k);
        let Some(v) = v else {
            if parsed.is_some_and(|(ino, _)| Some(ino) == never_had) {
                return Ok(true);
            }
            if tree::get(view.db, &view.root, k)?.is_some() {
                work = true; // something deleted
                return Ok(false);
            }
            if let Some((ino, keys::TAG_INODE)) = parsed {
                never_had = Some(ino);
            }
            return Ok(true);
        };
        looked += 1;
        if looked > PLACEHOLDER_SCAN {
            work = true;
            return Ok(false);
        }
        let placeholder_part = match parsed {
            // Inode numbers handed out; the root's times and link count.
            _ if k == superblock.as_slice() => true,
            Some((ROOT_INO, keys::TAG_INODE)) => true,
            Some((ROOT_INO, keys::TAG_DIRENT)) => {
                let d = Dirent::decode(v)?;
                tree::get(view.db, &view.root, k)?.is_none() && is_mount_placeholder(view, d.ino)?
            }
            Some((ino, keys::TAG_INODE)) => is_mount_placeholder(view, ino)?,
            _ => false,
        };
        if !placeholder_part {
            work = true;
            return Ok(false);
        }
        Ok(true)
    })?;
    Ok(work)
}

/// The files of working state `view` with no link left (orphans) that a
/// process still has open: never part of a commit, and no one's work.
pub(crate) fn orphan_inos(view: &View) -> Result<HashSet<Ino>> {
    let mut out = HashSet::new();
    view.scan(
        &keys::prefix(keys::SUPER_INO, keys::TAG_ORPHAN),
        &keys::prefix_end(keys::SUPER_INO, keys::TAG_ORPHAN),
        &mut |k, _| {
            if let Some(ino) = keys::parse_orphan(k) {
                out.insert(ino);
            }
            Ok(true)
        },
    )?;
    Ok(out)
}

/// Whether `key` is an orphan's marker or belongs to one of `orphans`.
pub(crate) fn is_orphan_key(key: &[u8], orphans: &HashSet<Ino>) -> bool {
    keys::parse_orphan(key).is_some()
        || keys::parse(key).is_some_and(|(ino, _)| ino != keys::SUPER_INO && orphans.contains(&ino))
}

/// Whether inode `ino` of working state `view` is a directory as a mount
/// of a missing subdot makes it (`BranchFs::subdot_ino`): new since the
/// snapshot under the overlay, empty, mode 0755, owned by the store's
/// owner, without extended attributes. Nobody's work: `dm status` leaves
/// it out and it does not make the branch dirty.
pub(crate) fn is_mount_placeholder(view: &View, ino: Ino) -> Result<bool> {
    let key = keys::inode(ino);
    let Some(rec) = view.get(&key)? else {
        return Ok(false);
    };
    let rec = InodeRec::decode(ino, &rec)?;
    if rec.kind != FileKind::Dir
        || rec.parent != ROOT_INO
        || rec.perm & 0o777 != 0o755
        || rec.uid != view.db.opts.owner.0
        || tree::get(view.db, &view.root, &key)?.is_some()
    {
        return Ok(false);
    }
    let mut empty = true;
    for tag in [keys::TAG_DIRENT, keys::TAG_XATTR] {
        view.scan(
            &keys::prefix(ino, tag),
            &keys::prefix_end(ino, tag),
            &mut |_, _| {
                empty = false;
                Ok(false)
            },
        )?;
    }
    Ok(empty)
}

/// `changes` of a working state without the subdot directories that
/// mounts made ([`is_mount_placeholder`]), and those directories' paths
/// (`/sub`): no one's work, so they do not make the branch dirty either,
/// but the next commit records them (as Dotmesh's subdot directories).
pub(crate) fn work_changes(old: &View, work: &View) -> Result<(Vec<Change>, Vec<Vec<u8>>)> {
    let mut out = changes(old, work)?;
    let mut keep = Vec::with_capacity(out.len());
    let mut made = Vec::new();
    for c in out.drain(..) {
        let top = match (&c.kind, c.path.strip_prefix(b"/")) {
            (ChangeKind::Added, Some(name)) if !name.contains(&b'/') => Some(name),
            _ => None,
        };
        let placeholder = match top.map(|n| work.get(&keys::dirent(ROOT_INO, n))) {
            Some(Ok(Some(d))) => is_mount_placeholder(work, Dirent::decode(&d)?.ino)?,
            Some(Err(e)) => return Err(e),
            _ => false,
        };
        if placeholder {
            made.push(c.path);
        } else {
            keep.push(c);
        }
    }
    Ok((keep, made))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::branch::BranchFs;
    use crate::inode::{SetAttr, ROOT_INO};
    use crate::names::DotName;
    use crate::store::{tests::app_store, CommitRequest, Store};
    use crate::view::Tx;
    use crate::Id;
    use std::sync::Arc;

    fn commit(store: &Store, dot: &DotName, branch: &str) -> Id {
        let req = CommitRequest {
            message: "test".into(),
            author: "test".into(),
            metadata: Default::default(),
        };
        store.commit(dot, branch, req).unwrap().id
    }

    /// The diff, checked against the one of the whole trees; and whether
    /// it had to walk them.
    fn diff(
        store: &Store,
        dot: &DotName,
        branch: &str,
        from: Option<Id>,
        to: Option<Id>,
    ) -> (Vec<Change>, bool) {
        let got = store.diff(dot, branch, from, to).unwrap();
        let walked = WALKED.get();
        FORCE_WALK.set(true);
        let want = store.diff(dot, branch, from, to);
        FORCE_WALK.set(false);
        assert_eq!(got, want.unwrap(), "{branch} {from:?} {to:?}");
        (got, walked)
    }

    /// Makes a file's record look as a store before the path hint wrote it.
    fn forget_hint(fs: &BranchFs, ino: Ino) {
        let st = fs.state.read();
        let mut tx = Tx::new(fs.view(&st));
        if let Ok(Some(v)) = tx.get(&keys::inode(ino)) {
            let mut r = InodeRec::decode(ino, &v).unwrap();
            if r.kind != FileKind::Dir {
                r.parent = 0;
                tx.put(keys::inode(ino), r.encode());
                tx.commit(false, "test").unwrap();
            }
        }
    }

    /// A tree of `dirs` directories of `files` files each, committed.
    fn tree(dirs: usize, files: usize) -> (tempfile::TempDir, Arc<Store>, DotName, Arc<BranchFs>) {
        let (dir, store, dot) = app_store();
        let fs = store.branch_fs(&dot, "master").unwrap();
        for d in 0..dirs {
            let di = fs
                .mkdir(ROOT_INO, format!("d{d}").as_bytes(), 0o755, 0, 0)
                .unwrap()
                .ino;
            for f in 0..files {
                let fi = fs
                    .mknod(
                        di,
                        format!("f{f}").as_bytes(),
                        FileKind::File,
                        0o644,
                        0,
                        0,
                        0,
                    )
                    .unwrap()
                    .ino;
                fs.write(fi, 0, format!("{d}/{f}").as_bytes()).unwrap();
                fs.release(fi).unwrap();
            }
        }
        commit(&store, &dot, "master");
        (dir, store, dot, fs)
    }

    fn change(kind: ChangeKind, path: impl AsRef<[u8]>) -> Change {
        Change {
            kind,
            path: path.as_ref().to_vec(),
        }
    }

    #[test]
    fn common_changes_need_no_walk() {
        let (_d, store, dot, fs) = tree(20, 50);
        assert_eq!(diff(&store, &dot, "master", None, None), (vec![], false));
        // Written in place.
        let d3 = fs.lookup(ROOT_INO, b"d3").unwrap().ino;
        let f = fs.lookup(d3, b"f7").unwrap().ino;
        fs.write(f, 0, b"changed").unwrap();
        fs.release(f).unwrap();
        assert_eq!(
            diff(&store, &dot, "master", None, None),
            (vec![change(ChangeKind::Modified, "/d3/f7")], false)
        );
        // Created, deleted, a directory moved with its files.
        fs.mknod(d3, b"new", FileKind::File, 0o644, 0, 0, 0)
            .unwrap();
        fs.unlink(d3, b"f8").unwrap();
        let d4 = fs.lookup(ROOT_INO, b"d4").unwrap().ino;
        fs.rename(ROOT_INO, b"d5", d4, b"moved", 0).unwrap();
        let (changes, walked) = diff(&store, &dot, "master", None, None);
        assert!(!walked);
        assert_eq!(changes.len(), 3 + 51, "{changes:?}");
        assert!(changes.contains(&change(
            ChangeKind::Renamed {
                from: "/d5/f9".into()
            },
            "/d4/moved/f9"
        )));
        // Between two commits, as well.
        let c1 = store.branch_info(&dot, "master").unwrap().head;
        let c2 = commit(&store, &dot, "master");
        let (between, walked) = diff(&store, &dot, "master", c1, Some(c2));
        assert!(!walked);
        assert_eq!(between, changes);
        // A file renamed into another directory, then written: its hint
        // follows it.
        let d6 = fs.lookup(ROOT_INO, b"d6").unwrap().ino;
        fs.rename(d3, b"f1", d6, b"from-d3", 0).unwrap();
        commit(&store, &dot, "master");
        let f = fs.lookup(d6, b"from-d3").unwrap().ino;
        fs.write(f, 0, b"again").unwrap();
        fs.release(f).unwrap();
        assert_eq!(
            diff(&store, &dot, "master", None, None),
            (vec![change(ChangeKind::Modified, "/d6/from-d3")], false)
        );
    }

    /// Names are bytes: two that are not UTF-8 and differ only there are
    /// two paths (they were one, both "bad\u{fffd}", and one change hid).
    #[test]
    fn names_that_are_not_utf8_stay_apart() {
        let (_d, store, dot, fs) = tree(1, 1);
        let d0 = fs.lookup(ROOT_INO, b"d0").unwrap().ino;
        for name in [&b"bad\xff"[..], b"bad\xfe"] {
            fs.mknod(d0, name, FileKind::File, 0o644, 0, 0, 0).unwrap();
        }
        let (changes, _) = diff(&store, &dot, "master", None, None);
        assert_eq!(
            changes,
            vec![
                change(ChangeKind::Added, b"/d0/bad\xfe"),
                change(ChangeKind::Added, b"/d0/bad\xff")
            ]
        );
        commit(&store, &dot, "master");
        fs.rename(d0, b"bad\xfe", d0, b"bad\xfd", 0).unwrap();
        let (changes, _) = diff(&store, &dot, "master", None, None);
        assert_eq!(
            changes,
            vec![change(
                ChangeKind::Renamed {
                    from: b"/d0/bad\xfe".to_vec()
                },
                b"/d0/bad\xfd"
            )]
        );
    }

    #[test]
    fn hard_links_and_files_without_a_hint_walk() {
        let (_d, store, dot, fs) = tree(3, 5);
        let d1 = fs.lookup(ROOT_INO, b"d1").unwrap().ino;
        let f = fs.lookup(d1, b"f1").unwrap().ino;
        fs.link(f, ROOT_INO, b"link").unwrap();
        commit(&store, &dot, "master");
        fs.write(f, 0, b"both").unwrap();
        fs.release(f).unwrap();
        let (changes, walked) = diff(&store, &dot, "master", None, None);
        assert!(walked);
        assert_eq!(
            changes,
            vec![
                change(ChangeKind::Modified, "/d1/f1"),
                change(ChangeKind::Modified, "/link")
            ]
        );
        let g = fs.lookup(d1, b"f2").unwrap().ino;
        forget_hint(&fs, g);
        commit(&store, &dot, "master");
        fs.write(g, 0, b"old store").unwrap();
        fs.release(g).unwrap();
        let (changes, walked) = diff(&store, &dot, "master", None, None);
        assert!(walked);
        assert_eq!(changes, vec![change(ChangeKind::Modified, "/d1/f2")]);
    }

    /// A tiny deterministic generator for the random operations.
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
        fn name(&mut self) -> Vec<u8> {
            vec![b'a' + self.below(5) as u8]
        }
    }

    /// One random change (errors, such as a name that is not there, are
    /// part of the game and ignored).
    fn random_op(fs: &BranchFs, r: &mut Rng, dirs: &mut Vec<Ino>) {
        let dir = dirs[r.below(dirs.len() as u64) as usize];
        let name = r.name();
        let file = |r: &mut Rng| -> Option<Ino> {
            let d = dirs[r.below(dirs.len() as u64) as usize];
            fs.lookup(d, &r.name())
                .ok()
                .filter(|a| a.kind == FileKind::File)
                .map(|a| a.ino)
        };
        match r.below(12) {
            0 | 1 => {
                if let Ok(a) = fs.mknod(dir, &name, FileKind::File, 0o644, 0, 0, 0) {
                    fs.release(a.ino).ok();
                }
            }
            2 => {
                if let Ok(a) = fs.mkdir(dir, &name, 0o755, 0, 0) {
                    dirs.push(a.ino);
                }
            }
            3 | 4 => {
                if let Some(f) = file(r) {
                    let at = r.below(200_000);
                    fs.write(f, at, &vec![r.below(256) as u8; 1 + r.below(5000) as usize])
                        .ok();
                    fs.release(f).ok();
                }
            }
            5 => {
                fs.unlink(dir, &name).ok();
            }
            6 => {
                fs.rmdir(dir, &name).ok();
            }
            7 | 8 => {
                let to = dirs[r.below(dirs.len() as u64) as usize];
                let flags = [0, 0, crate::RENAME_EXCHANGE][r.below(3) as usize];
                fs.rename(dir, &name, to, &r.name(), flags).ok();
            }
            9 => {
                if let Some(f) = file(r) {
                    fs.link(f, dir, &name).ok();
                }
            }
            10 => {
                if let Some(f) = file(r) {
                    let set = SetAttr {
                        mode: Some(0o600 + r.below(64) as u32),
                        ..SetAttr::default()
                    };
                    fs.setattr(f, &set).ok();
                    fs.setxattr(f, b"user.x", &r.name(), 0).ok();
                }
            }
            _ => {
                if let Some(f) = file(r) {
                    if r.below(4) == 0 {
                        forget_hint(fs, f);
                    } else {
                        let set = SetAttr {
                            size: Some(r.below(100_000)),
                            ..SetAttr::default()
                        };
                        fs.setattr(f, &set).ok();
                    }
                }
            }
        }
    }

    thread_local! {
        /// Working-state diffs with changes told without a walk, of all.
        static STATS: std::cell::RefCell<(u32, u32)> = const { std::cell::RefCell::new((0, 0)) };
    }

    #[test]
    fn random_changes_match_the_walk() {
        matches_the_walk_of_the_whole_trees();
        let (told, all) = STATS.with(|s| *s.borrow());
        // Hard links and files made to look old make some walk.
        assert!(told * 3 > all, "{told} of {all} diffs told without a walk");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        /// Random changes on two branches, committed now and then: every
        /// diff (working state, commits, across the branches) is the one
        /// of the whole trees.
        fn matches_the_walk_of_the_whole_trees(seed in 1u64..u64::MAX) {
            let (_d, store, dot) = app_store();
            let mut r = Rng(seed);
            let master = store.branch_fs(&dot, "master").unwrap();
            let mut dirs = vec![ROOT_INO];
            for _ in 0..30 {
                random_op(&master, &mut r, &mut dirs);
            }
            let base = commit(&store, &dot, "master");
            store.create_branch(&dot, "other", Some(base)).unwrap();
            let other = store.branch_fs(&dot, "other").unwrap();
            let mut heads = vec![Some(base)];
            let mut other_dirs = dirs.clone();
            let (mut told, mut all) = (0, 0);
            for round in 0..6 {
                for _ in 0..r.below(25) {
                    random_op(&master, &mut r, &mut dirs);
                    random_op(&other, &mut r, &mut other_dirs);
                }
                let (changes, walked) = diff(&store, &dot, "master", None, None);
                if !changes.is_empty() {
                    told += u32::from(!walked);
                    all += 1;
                }
                diff(&store, &dot, "other", None, None);
                let from = heads[r.below(heads.len() as u64) as usize];
                diff(&store, &dot, "master", from, None);
                if round % 2 == 0 {
                    let a = commit(&store, &dot, "master");
                    let b = commit(&store, &dot, "other");
                    diff(&store, &dot, "master", Some(a), Some(b));
                    diff(&store, &dot, "master", from, Some(a));
                    heads.extend([Some(a), Some(b)]);
                }
            }
            STATS.with(|s| {
                let mut s = s.borrow_mut();
                s.0 += told;
                s.1 += all;
            });
        }
    }
}
