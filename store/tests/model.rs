//! Property test: random filesystem operations on a branch, interleaved with
//! commits, hard resets, branch switches and database reopens, checked
//! against a simple in-memory model, byte for byte.

use dm_store::{BranchFs, CommitRequest, DotName, FileKind, SetAttr, Store, ROOT_INO};
use proptest::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

#[derive(Clone, Debug, PartialEq)]
enum MNode {
    Dir(BTreeMap<String, u64>),
    File(Vec<u8>),
    Symlink(String),
}

#[derive(Clone, Debug, PartialEq)]
struct Model {
    nodes: HashMap<u64, MNode>,
    next: u64,
}

impl Model {
    fn new() -> Model {
        let mut nodes = HashMap::new();
        nodes.insert(1, MNode::Dir(BTreeMap::new()));
        Model { nodes, next: 2 }
    }

    /// (path, model ino, parent ino, name) of everything, sorted by path.
    fn paths(&self) -> Vec<(String, u64, u64, String)> {
        let mut out = Vec::new();
        let mut stack = vec![(1u64, String::new())];
        while let Some((d, p)) = stack.pop() {
            if let Some(MNode::Dir(entries)) = self.nodes.get(&d) {
                for (name, ino) in entries {
                    let path = format!("{p}/{name}");
                    if matches!(self.nodes.get(ino), Some(MNode::Dir(_))) {
                        stack.push((*ino, path.clone()));
                    }
                    out.push((path, *ino, d, name.clone()));
                }
            }
        }
        out.sort();
        out
    }

    fn dirs(&self) -> Vec<(String, u64)> {
        let mut v = vec![(String::new(), 1)];
        v.extend(
            self.paths()
                .into_iter()
                .filter(|(_, i, _, _)| matches!(self.nodes[i], MNode::Dir(_)))
                .map(|(p, i, _, _)| (p, i)),
        );
        v
    }

    fn files(&self) -> Vec<(String, u64, u64, String)> {
        self.paths()
            .into_iter()
            .filter(|(_, i, _, _)| matches!(self.nodes[i], MNode::File(_)))
            .collect()
    }

    fn entries(&mut self, d: u64) -> &mut BTreeMap<String, u64> {
        match self.nodes.get_mut(&d) {
            Some(MNode::Dir(e)) => e,
            _ => panic!("not a dir"),
        }
    }

    fn is_within(&self, mut ino: u64, ancestor: u64) -> bool {
        // Dirs have one parent: find it by search.
        loop {
            if ino == ancestor {
                return true;
            }
            if ino == 1 {
                return false;
            }
            let parent = self
                .nodes
                .iter()
                .find(|(_, n)| matches!(n, MNode::Dir(e) if e.values().any(|v| *v == ino)))
                .map(|(k, _)| *k);
            match parent {
                Some(p) => ino = p,
                None => return false,
            }
        }
    }

    fn links(&self, ino: u64) -> usize {
        self.nodes
            .values()
            .map(|n| match n {
                MNode::Dir(e) => e.values().filter(|v| **v == ino).count(),
                _ => 0,
            })
            .sum()
    }

    fn gc(&mut self) {
        let live: Vec<u64> = self
            .nodes
            .keys()
            .copied()
            .filter(|i| *i == 1 || self.links(*i) > 0)
            .collect();
        self.nodes.retain(|k, _| live.contains(k));
    }
}

#[derive(Clone, Debug)]
enum Op {
    Create(u8, u8),
    Mkdir(u8, u8),
    Symlink(u8, u8),
    Write(u8, u32, u16, u8),
    /// A read checked against the model at once (reads of buffered,
    /// partly written blocks merge them with what is stored).
    Read(u8, u32, u16),
    Truncate(u8, u32),
    Unlink(u8),
    Rmdir(u8),
    Rename(u8, u8, u8),
    Link(u8, u8, u8),
    Flush(u8),
    /// fsync: partly rewritten blocks are stored as patches.
    Fsync(u8),
    /// Patched blocks stored whole, as the server does every few seconds.
    MaterializePatches,
    Commit,
    ResetHard(u8),
    NewBranch,
    Reopen,
}

const NAMES: [&str; 5] = ["a", "b", "c", "dd", "long-name-e"];

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (any::<u8>(), 0u8..5).prop_map(|(d, n)| Op::Create(d, n)),
        2 => (any::<u8>(), 0u8..5).prop_map(|(d, n)| Op::Mkdir(d, n)),
        1 => (any::<u8>(), 0u8..5).prop_map(|(d, n)| Op::Symlink(d, n)),
        8 => (any::<u8>(), 0u32..300_000, 1u16..20_000, any::<u8>()).prop_map(|(f, o, l, b)| Op::Write(f, o, l, b)),
        2 => (any::<u8>(), 0u32..300_000, 1u16..40_000).prop_map(|(f, o, l)| Op::Read(f, o, l)),
        2 => (any::<u8>(), 0u32..300_000).prop_map(|(f, s)| Op::Truncate(f, s)),
        2 => any::<u8>().prop_map(Op::Unlink),
        1 => any::<u8>().prop_map(Op::Rmdir),
        2 => (any::<u8>(), any::<u8>(), 0u8..5).prop_map(|(s, d, n)| Op::Rename(s, d, n)),
        1 => (any::<u8>(), any::<u8>(), 0u8..5).prop_map(|(s, d, n)| Op::Link(s, d, n)),
        1 => any::<u8>().prop_map(Op::Flush),
        3 => any::<u8>().prop_map(Op::Fsync),
        1 => Just(Op::MaterializePatches),
        2 => Just(Op::Commit),
        1 => any::<u8>().prop_map(Op::ResetHard),
        1 => Just(Op::NewBranch),
        1 => Just(Op::Reopen),
    ]
}

struct Harness {
    dir: tempfile::TempDir,
    store: Arc<Store>,
    dot: DotName,
    branch: String,
    fs: Arc<BranchFs>,
    model: Model,
    /// Model state at each commit of the current branch, oldest first.
    history: Vec<Model>,
    branches: u32,
}

impl Harness {
    fn new() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let dot = DotName::new("model").unwrap();
        store.create_dot(&dot, Some(65536)).unwrap();
        let fs = store.branch_fs(&dot, "master").unwrap();
        Harness {
            dir,
            store,
            dot,
            branch: "master".into(),
            fs,
            model: Model::new(),
            history: Vec::new(),
            branches: 0,
        }
    }

    fn ino_of(&self, path: &str) -> u64 {
        let mut ino = ROOT_INO;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            ino = self.fs.lookup(ino, part.as_bytes()).unwrap().ino;
        }
        ino
    }

    fn pick<T: Clone>(v: &[T], i: u8) -> Option<T> {
        if v.is_empty() {
            None
        } else {
            Some(v[i as usize % v.len()].clone())
        }
    }

    fn apply(&mut self, op: &Op) {
        let m = &mut self.model;
        match *op {
            Op::Create(d, n) | Op::Mkdir(d, n) | Op::Symlink(d, n) => {
                let (dpath, dino) = Self::pick(&m.dirs(), d).unwrap();
                let name = NAMES[n as usize];
                let exists = m.entries(dino).contains_key(name);
                let pino = self.ino_of(&dpath);
                let r = match op {
                    Op::Create(..) => {
                        self.fs
                            .mknod(pino, name.as_bytes(), FileKind::File, 0o644, 0, 0, 0)
                    }
                    Op::Mkdir(..) => self.fs.mkdir(pino, name.as_bytes(), 0o755, 0, 0),
                    _ => self.fs.symlink(
                        pino,
                        name.as_bytes(),
                        format!("target-{n}").as_bytes(),
                        0,
                        0,
                    ),
                };
                let m = &mut self.model;
                if exists {
                    assert!(r.is_err(), "{op:?} on existing name succeeded");
                    return;
                }
                r.unwrap();
                let node = match op {
                    Op::Create(..) => MNode::File(Vec::new()),
                    Op::Mkdir(..) => MNode::Dir(BTreeMap::new()),
                    _ => MNode::Symlink(format!("target-{n}")),
                };
                let ino = m.next;
                m.next += 1;
                m.nodes.insert(ino, node);
                m.entries(dino).insert(name.to_string(), ino);
            }
            Op::Write(f, off, len, b) => {
                let Some((path, ino, _, _)) = Self::pick(&m.files(), f) else {
                    return;
                };
                let data: Vec<u8> = (0..len as u32)
                    .map(|i| b.wrapping_add((i % 251) as u8))
                    .collect();
                let fino = self.ino_of(&path);
                assert_eq!(self.fs.write(fino, off as u64, &data).unwrap(), len as u32);
                if let Some(MNode::File(c)) = self.model.nodes.get_mut(&ino) {
                    let end = off as usize + data.len();
                    if c.len() < end {
                        c.resize(end, 0);
                    }
                    c[off as usize..end].copy_from_slice(&data);
                }
            }
            Op::Read(f, off, len) => {
                let Some((path, ino, _, _)) = Self::pick(&m.files(), f) else {
                    return;
                };
                let fino = self.ino_of(&path);
                let got = self.fs.read(fino, off as u64, len as u32).unwrap();
                if let Some(MNode::File(c)) = self.model.nodes.get(&ino) {
                    let from = (off as usize).min(c.len());
                    let to = (off as usize + len as usize).min(c.len());
                    assert!(got == c[from..to], "read of {len} at {off} in {path}");
                }
            }
            Op::Truncate(f, size) => {
                let Some((path, ino, _, _)) = Self::pick(&m.files(), f) else {
                    return;
                };
                let fino = self.ino_of(&path);
                self.fs
                    .setattr(
                        fino,
                        &SetAttr {
                            size: Some(size as u64),
                            ..Default::default()
                        },
                    )
                    .unwrap();
                if let Some(MNode::File(c)) = self.model.nodes.get_mut(&ino) {
                    c.resize(size as usize, 0);
                }
            }
            Op::Unlink(i) => {
                let nondirs: Vec<_> = m
                    .paths()
                    .into_iter()
                    .filter(|(_, i, _, _)| !matches!(m.nodes[i], MNode::Dir(_)))
                    .collect();
                let Some((path, _, dino, name)) = Self::pick(&nondirs, i) else {
                    return;
                };
                let parent = path.rsplit_once('/').unwrap().0.to_string();
                let pino = self.ino_of(&parent);
                self.fs.unlink(pino, name.as_bytes()).unwrap();
                self.model.entries(dino).remove(&name);
                self.model.gc();
            }
            Op::Rmdir(i) => {
                let dirs: Vec<_> = m
                    .paths()
                    .into_iter()
                    .filter(|(_, i, _, _)| matches!(m.nodes[i], MNode::Dir(_)))
                    .collect();
                let Some((path, ino, dino, name)) = Self::pick(&dirs, i) else {
                    return;
                };
                let empty = matches!(&m.nodes[&ino], MNode::Dir(e) if e.is_empty());
                let parent = path.rsplit_once('/').unwrap().0.to_string();
                let pino = self.ino_of(&parent);
                let r = self.fs.rmdir(pino, name.as_bytes());
                if empty {
                    r.unwrap();
                    self.model.entries(dino).remove(&name);
                    self.model.gc();
                } else {
                    assert!(r.is_err(), "rmdir of a non-empty dir succeeded");
                }
            }
            Op::Rename(s, d, n) => {
                let Some((spath, sino, sdir, sname)) = Self::pick(&m.paths(), s) else {
                    return;
                };
                let (dpath, ddir) = Self::pick(&m.dirs(), d).unwrap();
                let dname = NAMES[n as usize].to_string();
                let src_is_dir = matches!(m.nodes[&sino], MNode::Dir(_));
                let target = m.entries(ddir).get(&dname).copied();
                let valid = if src_is_dir && m.is_within(ddir, sino) {
                    sdir == ddir && sname == dname
                } else {
                    match target {
                        None => true,
                        Some(t) if t == sino => true,
                        Some(t) => match (&m.nodes[&t], src_is_dir) {
                            (MNode::Dir(e), true) => e.is_empty(),
                            (MNode::Dir(_), false) => false,
                            (_, true) => false,
                            (_, false) => true,
                        },
                    }
                };
                let sp = self.ino_of(spath.rsplit_once('/').unwrap().0);
                let dp = self.ino_of(&dpath);
                let r = self
                    .fs
                    .rename(sp, sname.as_bytes(), dp, dname.as_bytes(), 0);
                if !valid {
                    assert!(
                        r.is_err(),
                        "invalid rename {spath} -> {dpath}/{dname} succeeded"
                    );
                    return;
                }
                r.unwrap();
                let m = &mut self.model;
                if target == Some(sino) {
                    return;
                }
                m.entries(sdir).remove(&sname);
                m.entries(ddir).insert(dname, sino);
                m.gc();
            }
            Op::Link(s, d, n) => {
                let Some((spath, sino, _, _)) = Self::pick(&m.files(), s) else {
                    return;
                };
                let (dpath, ddir) = Self::pick(&m.dirs(), d).unwrap();
                let dname = NAMES[n as usize].to_string();
                let exists = m.entries(ddir).contains_key(&dname);
                let fino = self.ino_of(&spath);
                let dp = self.ino_of(&dpath);
                let r = self.fs.link(fino, dp, dname.as_bytes());
                if exists {
                    assert!(r.is_err());
                    return;
                }
                r.unwrap();
                self.model.entries(ddir).insert(dname, sino);
            }
            Op::Flush(f) => {
                let Some((path, _, _, _)) = Self::pick(&m.files(), f) else {
                    return;
                };
                let fino = self.ino_of(&path);
                self.fs.flush(fino).unwrap();
            }
            Op::Fsync(f) => {
                let Some((path, _, _, _)) = Self::pick(&m.files(), f) else {
                    return;
                };
                let fino = self.ino_of(&path);
                self.fs.fsync(fino, false).unwrap();
            }
            Op::MaterializePatches => {
                self.store.materialize_patches().unwrap();
            }
            Op::Commit => {
                self.store
                    .commit(
                        &self.dot,
                        &self.branch,
                        CommitRequest {
                            message: "c".into(),
                            author: "t".into(),
                            ..Default::default()
                        },
                    )
                    .unwrap();
                self.history.push(self.model.clone());
            }
            Op::ResetHard(k) => {
                if self.history.is_empty() {
                    return;
                }
                let back = k as usize % self.history.len();
                let rev = format!("HEAD~{back}");
                let id = self.store.resolve(&self.dot, &self.branch, &rev).unwrap();
                self.store.reset(&self.dot, &self.branch, id, true).unwrap();
                self.history.truncate(self.history.len() - back);
                self.model = self.history.last().unwrap().clone();
            }
            Op::NewBranch => {
                self.branches += 1;
                let name = format!("b{}", self.branches);
                self.store.create_branch(&self.dot, &name, None).unwrap();
                self.store.set_current_branch(&self.dot, &name).unwrap();
                self.branch = name.clone();
                self.fs = self.store.branch_fs(&self.dot, &name).unwrap();
                // A new branch starts from the last commit, not the dirty state.
                self.model = self.history.last().cloned().unwrap_or_else(Model::new);
            }
            Op::Reopen => {
                self.store.sync().unwrap();
                let path = self.dir.path().to_path_buf();
                // Point the handles at a throwaway store so the real
                // database is closed, then open it again.
                let tmp = tempfile::tempdir().unwrap();
                let tmp_store = Store::open(tmp.path()).unwrap();
                tmp_store.create_dot(&self.dot, None).unwrap();
                self.fs = tmp_store.branch_fs(&self.dot, "master").unwrap();
                self.store = tmp_store;
                self.store = Store::open(&path).unwrap();
                self.fs = self.store.branch_fs(&self.dot, &self.branch).unwrap();
            }
        }
    }

    fn check(&self) {
        let mut stack = vec![(ROOT_INO, 1u64, String::new())];
        let mut seen = 0;
        while let Some((fino, mino, path)) = stack.pop() {
            let MNode::Dir(entries) = &self.model.nodes[&mino] else {
                panic!()
            };
            let mut names = Vec::new();
            let mut off = 0;
            loop {
                let batch = self.fs.readdir(fino, off, 3).unwrap();
                if batch.is_empty() {
                    break;
                }
                off = batch.last().unwrap().offset;
                names.extend(
                    batch
                        .into_iter()
                        .map(|e| String::from_utf8(e.name).unwrap()),
                );
            }
            names.retain(|n| n != "." && n != "..");
            names.sort();
            let want: Vec<String> = entries.keys().cloned().collect();
            assert_eq!(names, want, "entries of {path}/");
            for (name, m) in entries {
                seen += 1;
                let a = self.fs.lookup(fino, name.as_bytes()).unwrap();
                let p = format!("{path}/{name}");
                match &self.model.nodes[m] {
                    MNode::Dir(_) => {
                        assert_eq!(a.kind, FileKind::Dir, "{p}");
                        stack.push((a.ino, *m, p));
                    }
                    MNode::File(c) => {
                        assert_eq!(a.kind, FileKind::File, "{p}");
                        assert_eq!(a.size, c.len() as u64, "size of {p}");
                        let got = self.fs.read(a.ino, 0, c.len() as u32 + 100).unwrap();
                        assert!(got == *c, "content of {p} differs");
                        assert_eq!(a.nlink as usize, self.model.links(*m), "nlink of {p}");
                    }
                    MNode::Symlink(t) => {
                        assert_eq!(self.fs.readlink(a.ino).unwrap(), t.as_bytes());
                    }
                }
            }
        }
        let _ = seen;
    }
}

proptest! {
    // PROPTEST_CASES overrides the 256 cases (for longer searches).
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256),
        ..ProptestConfig::default()
    })]
    #[test]
    fn branch_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        let mut h = Harness::new();
        for op in &ops {
            h.apply(op);
        }
        h.check();
        // What is stored, not what the buffers hold (a file's buffer keeps
        // copies of the blocks it stored last): reopened, it reads the same.
        h.apply(&Op::Reopen);
        h.check();
        // Every commit of the branch still reads back as recorded.
        h.store.fsck().map(|r| assert!(r.is_clean(), "{:?}", r.problems)).unwrap();
    }
}
