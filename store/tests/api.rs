//! Store API: dots, branches, commits, revisions, reset, diff, GC and fsck.

use dm_store::*;
use std::sync::Arc;

fn setup() -> (tempfile::TempDir, Arc<Store>, DotName) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let dot = DotName::new("myapp").unwrap();
    store.create_dot(&dot, None).unwrap();
    (dir, store, dot)
}

fn write_file(fs: &BranchFs, name: &str, data: &[u8]) -> u64 {
    let ino = match fs.lookup(ROOT_INO, name.as_bytes()) {
        Ok(a) => a.ino,
        Err(_) => {
            fs.mknod(ROOT_INO, name.as_bytes(), FileKind::File, 0o644, 0, 0, 0)
                .unwrap()
                .ino
        }
    };
    fs.setattr(
        ino,
        &SetAttr {
            size: Some(0),
            ..Default::default()
        },
    )
    .unwrap();
    fs.write(ino, 0, data).unwrap();
    fs.flush(ino).unwrap();
    ino
}

/// Incompressible bytes (stored in the chunk log, not inline).
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Creates `name`, opens it and writes `data` (left open and unflushed, as
/// a program's writes are before close(2)).
fn created_open(fs: &BranchFs, name: &str, data: &[u8]) -> u64 {
    let ino = fs
        .mknod(ROOT_INO, name.as_bytes(), FileKind::File, 0o644, 0, 0, 0)
        .unwrap()
        .ino;
    fs.open(ino).unwrap();
    fs.write(ino, 0, data).unwrap();
    ino
}

fn read_file(fs: &BranchFs, name: &str) -> Option<Vec<u8>> {
    let a = fs.lookup(ROOT_INO, name.as_bytes()).ok()?;
    Some(fs.read(a.ino, 0, a.size as u32 + 10).unwrap())
}

/// Closes `store` (and `fs`, a branch of it), opens the store in `dir`
/// again, and checks that `name` on master reads `want` and that fsck is
/// clean. Returns the reopened store.
fn reopened_reads(
    dir: &std::path::Path,
    store: Arc<Store>,
    fs: Arc<BranchFs>,
    dot: &DotName,
    name: &str,
    want: &[u8],
) -> Arc<Store> {
    drop(fs);
    drop(store);
    let store = Store::open(dir).unwrap();
    let fs = store.branch_fs(dot, "master").unwrap();
    assert_eq!(read_file(&fs, name).unwrap(), want, "after a reopen");
    assert!(store.fsck().unwrap().is_clean());
    store
}

fn commit(store: &Store, dot: &DotName, branch: &str, msg: &str) -> CommitInfo {
    store
        .commit(
            dot,
            branch,
            CommitRequest {
                message: msg.into(),
                author: "admin".into(),
                ..Default::default()
            },
        )
        .unwrap()
}

#[test]
fn seed_walkthrough_commit_log_reset() {
    let (_d, store, dot) = setup();
    let fs = store.branch_fs(&dot, "master").unwrap();
    assert_eq!(store.branch_info(&dot, "master").unwrap().commits, 0);
    write_file(&fs, "f", b"empty state");
    let c1 = commit(&store, &dot, "master", "empty state");
    write_file(&fs, "f", b"some data here");
    let c2 = commit(&store, &dot, "master", "some data");
    let log = store.log(&dot, "master").unwrap();
    assert_eq!(
        log.iter().map(|c| c.message.as_str()).collect::<Vec<_>>(),
        ["empty state", "some data"]
    );
    assert_eq!(log[1].parents, vec![c1.id]);
    // Part of the history: the latest N, or up to a commit.
    let messages = |until: Option<&Id>, max| {
        store
            .log_until(&dot, "master", until, max)
            .unwrap()
            .into_iter()
            .map(|c| c.message)
            .collect::<Vec<_>>()
    };
    assert_eq!(messages(None, Some(1)), ["some data"]);
    assert_eq!(messages(None, Some(0)), Vec::<String>::new());
    assert_eq!(messages(None, Some(5)), ["empty state", "some data"]);
    assert_eq!(messages(Some(&c1.id), None), ["empty state"]);
    assert_eq!(messages(Some(&c2.id), Some(1)), ["some data"]);
    store.create_branch(&dot, "aside", None).unwrap();
    let aside = store.branch_fs(&dot, "aside").unwrap();
    write_file(&aside, "f", b"elsewhere");
    let c3 = commit(&store, &dot, "aside", "elsewhere");
    let err = store
        .log_until(&dot, "master", Some(&c3.id), None)
        .unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert_eq!(store.resolve(&dot, "master", "HEAD").unwrap(), c2.id);
    assert_eq!(store.resolve(&dot, "master", "HEAD^").unwrap(), c1.id);
    assert_eq!(store.resolve(&dot, "master", "HEAD~1").unwrap(), c1.id);
    assert_eq!(
        store.resolve(&dot, "master", &c1.id.to_hex()[..8]).unwrap(),
        c1.id
    );
    let e = store
        .resolve(&dot, "master", "HEAD^^^")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no commit matches HEAD^^^: branch master of dot myapp has 2 commits"),
        "{e}"
    );
    // Steps back from another branch name that branch (they named the
    // branch the revision was resolved on).
    store.create_branch(&dot, "other", None).unwrap();
    let e = store
        .resolve(&dot, "other", "master~5")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no commit matches master~5: branch master of dot myapp has 2 commits"),
        "{e}"
    );
    store.delete_branch(&dot, "other", true).unwrap();
    assert!(store.resolve(&dot, "master", "nonsense!").is_err());

    // Dirty working state: plain reset refuses, --hard discards.
    write_file(&fs, "f", b"uncommitted");
    assert!(store.has_uncommitted(&dot, "master").unwrap());
    let e = store.reset(&dot, "master", c1.id, false).unwrap_err();
    assert!(e.to_string().contains("--hard"), "{e}");
    assert_eq!(read_file(&fs, "f").unwrap(), b"uncommitted");
    store.reset(&dot, "master", c1.id, true).unwrap();
    assert_eq!(read_file(&fs, "f").unwrap(), b"empty state");
    assert_eq!(store.log(&dot, "master").unwrap().len(), 1);
    assert!(!store.has_uncommitted(&dot, "master").unwrap());
}

#[test]
fn branches_follow_the_seed_example() {
    let (_d, store, dot) = setup();
    let master = store.branch_fs(&dot, "master").unwrap();
    write_file(&master, "f", b"A");
    commit(&store, &dot, "master", "A");
    write_file(&master, "f", b"B");
    let b = commit(&store, &dot, "master", "B");
    // Dirty data stays on master; the new branch starts from B.
    write_file(&master, "dirty", b"x");
    let info = store.create_branch(&dot, "newbranch", None).unwrap();
    assert_eq!(info.head, Some(b.id));
    assert_eq!(info.origin, Some(("master".into(), b.id)));
    let nb = store.branch_fs(&dot, "newbranch").unwrap();
    assert_eq!(read_file(&nb, "dirty"), None);
    write_file(&nb, "f", b"C");
    commit(&store, &dot, "newbranch", "C");
    store.reset(&dot, "master", b.id, true).unwrap();
    write_file(&master, "f", b"D");
    commit(&store, &dot, "master", "D");
    write_file(&nb, "f", b"E");
    commit(&store, &dot, "newbranch", "E");
    let names = |br| {
        store
            .log(&dot, br)
            .unwrap()
            .into_iter()
            .map(|c| c.message)
            .collect::<Vec<_>>()
    };
    assert_eq!(names("master"), ["A", "B", "D"]);
    assert_eq!(names("newbranch"), ["A", "B", "C", "E"]);
    assert_eq!(read_file(&master, "f").unwrap(), b"D");
    assert_eq!(read_file(&nb, "f").unwrap(), b"E");
    // Branch deletion rules.
    assert!(store.create_branch(&dot, "newbranch", None).is_err());
    store
        .create_branch(
            &dot,
            "child",
            Some(store.resolve(&dot, "newbranch", "HEAD").unwrap()),
        )
        .unwrap();
    store.set_current_branch(&dot, "newbranch").unwrap();
    assert!(
        store.delete_branch(&dot, "newbranch", true).is_err(),
        "current branch deleted"
    );
    store.set_current_branch(&dot, "master").unwrap();
    let e = store.delete_branch(&dot, "master", false).unwrap_err();
    assert!(e.to_string().contains("current"), "{e}");
    // A branch's own uncommitted work would go with it: refused unless
    // forced, even when its commits are elsewhere.
    let child = store.branch_fs(&dot, "child").unwrap();
    write_file(&child, "draft", b"not committed");
    let e = store.delete_branch(&dot, "child", false).unwrap_err();
    assert!(
        e.to_string().contains("uncommitted") && e.to_string().contains("branch -D child"),
        "{e}"
    );
    store
        .reset(
            &dot,
            "child",
            store.resolve(&dot, "child", "HEAD").unwrap(),
            true,
        )
        .unwrap();
    // child's head is newbranch's: nothing is lost.
    store.delete_branch(&dot, "child", false).unwrap();
    // newbranch's C and E are on no other branch (as git's branch -d).
    let e = store.delete_branch(&dot, "newbranch", false).unwrap_err();
    assert!(e.to_string().contains("branch -D newbranch"), "{e}");
    store.delete_branch(&dot, "newbranch", true).unwrap();
    assert!(store.branch_fs(&dot, "newbranch").is_err());
    assert!(
        nb.lookup(ROOT_INO, b"f").is_err(),
        "deleted branch still readable"
    );
    // A branch others grew from goes like any other once its commits are
    // theirs too (it was refused, naming the other branch); they no
    // longer name it as their origin.
    let head = store.resolve(&dot, "master", "HEAD").unwrap();
    store.create_branch(&dot, "kid", Some(head)).unwrap();
    store.create_branch(&dot, "sibling", Some(head)).unwrap();
    let origin = store.branch_info(&dot, "sibling").unwrap().origin;
    assert_eq!(origin, Some(("master".to_string(), head)));
    store.set_current_branch(&dot, "kid").unwrap();
    store.create_branch(&dot, "kid2", Some(head)).unwrap();
    assert_eq!(
        store.branch_info(&dot, "kid2").unwrap().origin,
        Some(("kid".to_string(), head))
    );
    store.set_current_branch(&dot, "master").unwrap();
    store.delete_branch(&dot, "kid", false).unwrap();
    assert_eq!(store.branch_info(&dot, "kid2").unwrap().origin, None);
    assert!(store.branch_info(&dot, "sibling").unwrap().origin.is_some());
}

/// A branch's fork point stays in its history when its head moves: a reset
/// to before it, and a pull or push that replaces the branch with another
/// history, make it the newest commit that history shares with the origin
/// branch (it named a commit the branch no longer had, and a push to a hub
/// without the origin branch made that branch there at it).
#[test]
fn fork_points_follow_moved_heads() {
    let (_d, store, dot) = setup();
    let master = store.branch_fs(&dot, "master").unwrap();
    write_file(&master, "f", b"A");
    let a = commit(&store, &dot, "master", "A");
    write_file(&master, "f", b"B");
    let b = commit(&store, &dot, "master", "B");
    store.create_branch(&dot, "kid", Some(b.id)).unwrap();
    let origin = |br| store.branch_info(&dot, br).unwrap().origin;
    assert_eq!(origin("kid"), Some(("master".into(), b.id)));
    let kid = store.branch_fs(&dot, "kid").unwrap();
    write_file(&kid, "f", b"C");
    let c = commit(&store, &dot, "kid", "C");
    // A move that keeps the fork point in the history keeps it.
    write_file(&kid, "f", b"D");
    let d = commit(&store, &dot, "kid", "D");
    store.reset(&dot, "kid", c.id, true).unwrap();
    assert_eq!(origin("kid"), Some(("master".into(), b.id)));
    // A history that left B out (another branch's, grown from A), as a
    // forced push or a pull brings it: the fork point is A.
    store.create_branch(&dot, "other", Some(a.id)).unwrap();
    let other = store.branch_fs(&dot, "other").unwrap();
    write_file(&other, "f", b"E");
    let e = commit(&store, &dot, "other", "E");
    let bs = kid.block_size();
    store
        .set_branch_head(&dot, "kid", Some(c.id), e.id, bs)
        .unwrap();
    assert_eq!(origin("kid"), Some(("master".into(), a.id)));
    // The origin branch as it is now counts: grown from kid at E, reset
    // to B once kid moved to D, grandkid grows from kid at B.
    store.set_current_branch(&dot, "kid").unwrap();
    store.create_branch(&dot, "grandkid", Some(e.id)).unwrap();
    assert_eq!(origin("grandkid"), Some(("kid".into(), e.id)));
    store.set_current_branch(&dot, "master").unwrap();
    store
        .set_branch_head(&dot, "kid", Some(e.id), d.id, bs)
        .unwrap();
    store.reset(&dot, "grandkid", b.id, true).unwrap();
    assert_eq!(origin("grandkid"), Some(("kid".into(), b.id)));
    // A reset to before the fork point: the branch grows from there.
    store.create_branch(&dot, "late", Some(b.id)).unwrap();
    store.reset(&dot, "late", a.id, true).unwrap();
    assert_eq!(origin("late"), Some(("master".into(), a.id)));
    // The origin moved off a fork point (a forced pull brings E, A; a
    // reset to A): what grew from it grows from the newest commit both
    // have.
    store.create_branch(&dot, "late2", Some(b.id)).unwrap();
    assert_eq!(origin("late2"), Some(("master".into(), b.id)));
    store
        .set_branch_head(&dot, "master", Some(b.id), e.id, bs)
        .unwrap();
    assert_eq!(origin("late2"), Some(("master".into(), a.id)));
    assert_eq!(origin("late"), Some(("master".into(), a.id)));
    // A fork point the origin's new history has stays (not walked back
    // up to a newer shared commit: B here).
    store.reset(&dot, "master", b.id, true).unwrap();
    assert_eq!(origin("late2"), Some(("master".into(), a.id)));
    store.create_branch(&dot, "late3", Some(b.id)).unwrap();
    store.reset(&dot, "master", a.id, true).unwrap();
    assert_eq!(origin("late3"), Some(("master".into(), a.id)));
    assert_eq!(origin("late2"), Some(("master".into(), a.id)));
}

/// A subdot directory that a mount made on a branch without that subdot
/// (empty, as `subdot_ino` makes it) is nobody's work: it does not make
/// the branch dirty (a pull, a branch delete and checkout's note stopped at
/// it for good, since each reset or pull had the mount make it again) and
/// `dm status` leaves it out; anything more in it, or any other change,
/// counts.
#[test]
fn a_subdot_directory_made_for_a_mount_is_not_uncommitted_work() {
    let (_d, store, dot) = setup();
    let fs = store.branch_fs(&dot, "master").unwrap();
    let clean = |why: &str| {
        assert!(!store.has_uncommitted(&dot, "master").unwrap(), "{why}");
        assert!(
            store.diff(&dot, "master", None, None).unwrap().is_empty(),
            "{why}"
        );
        assert!(
            !store.branch_info(&dot, "master").unwrap().uncommitted,
            "{why}"
        );
    };
    let dirty = |why: &str| {
        assert!(store.has_uncommitted(&dot, "master").unwrap(), "{why}");
        assert!(
            !store.diff(&dot, "master", None, None).unwrap().is_empty(),
            "{why}"
        );
    };
    // No commit yet: a mount of the default subdot.
    fs.subdot_ino("__default__", true).unwrap();
    clean("a new dot with its default subdot mounted");
    commit(&store, &dot, "master", "empty");
    // Committed with the subdot; a new one mounted after.
    let db = fs.subdot_ino("orders-db", true).unwrap();
    fs.subdot_ino("catalog-db", true).unwrap();
    clean("two subdots mounted since the commit");
    // Named apart, as the next commit records them.
    let made = || {
        store
            .diff_and_mount_made(&dot, "master", None, None)
            .unwrap()
            .1
    };
    assert_eq!(made(), [b"/catalog-db".to_vec(), b"/orders-db".to_vec()]);
    let head = store.resolve(&dot, "master", "HEAD").unwrap();
    // Anything in one is work.
    fs.mknod(db, b"x", FileKind::File, 0o644, 0, 0, 0).unwrap();
    dirty("a file in a mount's subdot");
    assert_eq!(made(), [b"/catalog-db".to_vec()]);
    store.reset(&dot, "master", head, true).unwrap();
    clean("after reset --hard");
    fs.subdot_ino("orders-db", true).unwrap();
    clean("mounted again");
    // So a reset without --hard goes ahead, as `dm status` says nothing to commit.
    store.reset(&dot, "master", head, false).unwrap();
    let db = fs.subdot_ino("orders-db", true).unwrap();
    clean("mounted again after a reset");
    fs.setxattr(db, b"user.k", b"v", 0).unwrap();
    dirty("an xattr on a mount's subdot");
    store.reset(&dot, "master", head, true).unwrap();
    clean("after reset --hard");
    // An empty top-level directory made otherwise, or a change elsewhere.
    fs.mkdir(ROOT_INO, b"private", 0o700, 0, 0).unwrap();
    dirty("an empty directory of mode 0700");
    fs.rmdir(ROOT_INO, b"private").unwrap();
    fs.mkdir(ROOT_INO, b"__default__x", 0o755, 1000, 1000)
        .unwrap();
    dirty("an empty directory of another owner");
    store.reset(&dot, "master", head, true).unwrap();
    let dflt = fs.subdot_ino("__default__", false).unwrap();
    fs.mkdir(dflt, b"sub", 0o755, 0, 0).unwrap();
    dirty("an empty directory inside a subdot");
    store.reset(&dot, "master", head, true).unwrap();
    fs.rmdir(ROOT_INO, b"__default__").unwrap();
    dirty("a committed subdot removed");
    store.reset(&dot, "master", head, true).unwrap();
    // A commit takes the placeholders in, like any directory.
    fs.subdot_ino("logs", true).unwrap();
    let c = commit(&store, &dot, "master", "with logs");
    let changes = store
        .diff(
            &dot,
            "master",
            Some(store.resolve(&dot, "master", "HEAD^").unwrap()),
            Some(c.id),
        )
        .unwrap();
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(changes[0].path, b"/logs");
    assert!(made().is_empty());
}

#[test]
fn subdots_commit_atomically() {
    let (_d, store, dot) = setup();
    let fs = store.branch_fs(&dot, "master").unwrap();
    let orders = fs.subdot_ino("orders-db", true).unwrap();
    let catalog = fs.subdot_ino("catalog-db", true).unwrap();
    assert_eq!(fs.subdot_ino("__root__", false).unwrap(), ROOT_INO);
    assert!(fs.subdot_ino("missing", false).is_err());
    let put = |dir: u64, data: &[u8]| {
        let ino = match fs.lookup(dir, b"db") {
            Ok(a) => a.ino,
            Err(_) => {
                fs.mknod(dir, b"db", FileKind::File, 0o600, 0, 999, 999)
                    .unwrap()
                    .ino
            }
        };
        fs.write(ino, 0, data).unwrap();
    };
    put(orders, b"orders-1");
    put(catalog, b"catalog-1");
    let c1 = commit(&store, &dot, "master", "two dbs");
    put(orders, b"orders-2");
    put(catalog, b"catalog-2");
    commit(&store, &dot, "master", "data in two dbs");
    store.reset(&dot, "master", c1.id, true).unwrap();
    let get = |dir: u64| {
        let a = fs.lookup(dir, b"db").unwrap();
        fs.read(a.ino, 0, 100).unwrap()
    };
    assert_eq!(get(orders), b"orders-1");
    assert_eq!(get(catalog), b"catalog-1");
}

#[test]
fn bad_names_are_typed_errors() {
    let (_d, store, dot) = setup();
    for bad in ["", "a/b", "..", "a b", "a\0", &"x".repeat(65), "ü"] {
        assert!(
            matches!(DotName::new(bad), Err(Error::InvalidName { .. })),
            "{bad:?}"
        );
        assert!(
            matches!(
                store.create_branch(&dot, bad, None),
                Err(Error::InvalidName { .. })
            ),
            "{bad:?}"
        );
    }
    assert!(matches!(
        store.create_dot(&dot, None),
        Err(Error::AlreadyExists { .. })
    ));
    let fs = store.branch_fs(&dot, "master").unwrap();
    for bad in [&b"a/b"[..], b"", b"a\0b", b".", b".."] {
        assert!(
            fs.mknod(ROOT_INO, bad, FileKind::File, 0o644, 0, 0, 0)
                .is_err(),
            "{bad:?}"
        );
    }
    let long = vec![b'n'; 256];
    assert_eq!(
        fs.mknod(ROOT_INO, &long, FileKind::File, 0o644, 0, 0, 0)
            .unwrap_err()
            .errno(),
        36
    );
    assert!(fs
        .mknod(ROOT_INO, &long[..255], FileKind::File, 0o644, 0, 0, 0)
        .is_ok());
    assert!(store
        .dot_info(&DotName::new("nope").unwrap())
        .unwrap_err()
        .is_not_found());
}

#[test]
fn diff_reports_paths() {
    let (_d, store, dot) = setup();
    let fs = store.branch_fs(&dot, "master").unwrap();
    write_file(&fs, "keep", b"1");
    write_file(&fs, "change", b"1");
    write_file(&fs, "gone", b"1");
    write_file(&fs, "moveme", b"1");
    let c1 = commit(&store, &dot, "master", "one");
    write_file(&fs, "change", b"22");
    fs.unlink(ROOT_INO, b"gone").unwrap();
    fs.rename(ROOT_INO, b"moveme", ROOT_INO, b"moved", 0)
        .unwrap();
    write_file(&fs, "new", b"1");
    let d = store.diff(&dot, "master", None, None).unwrap();
    let want = vec![
        Change {
            kind: ChangeKind::Modified,
            path: "/change".into(),
        },
        Change {
            kind: ChangeKind::Deleted,
            path: "/gone".into(),
        },
        Change {
            kind: ChangeKind::Renamed {
                from: "/moveme".into(),
            },
            path: "/moved".into(),
        },
        Change {
            kind: ChangeKind::Added,
            path: "/new".into(),
        },
    ];
    assert_eq!(d, want);
    let c2 = commit(&store, &dot, "master", "two");
    assert_eq!(
        store
            .diff(&dot, "master", Some(c1.id), Some(c2.id))
            .unwrap(),
        want
    );
    assert!(store.diff(&dot, "master", None, None).unwrap().is_empty());
    // Deleted and created again under the same name: one modification.
    fs.unlink(ROOT_INO, b"keep").unwrap();
    write_file(&fs, "keep", b"3");
    assert_eq!(
        store.diff(&dot, "master", None, None).unwrap(),
        vec![Change {
            kind: ChangeKind::Modified,
            path: "/keep".into(),
        }]
    );
}

/// Appends `data` to the file `ino`.
fn append(fs: &BranchFs, ino: u64, data: &[u8]) {
    let size = fs.getattr(ino).unwrap().size;
    fs.write(ino, size, data).unwrap();
    fs.flush(ino).unwrap();
}

fn change(kind: ChangeKind, path: &str) -> Change {
    Change {
        kind,
        path: path.into(),
    }
}

fn renamed(from: &str, path: &str) -> Change {
    change(ChangeKind::Renamed { from: from.into() }, path)
}

/// Files made on two branches after they forked get the same inode
/// numbers (each branch counts on from the fork): they are different
/// files, not one renamed. A file both branches share is still followed.
#[test]
fn diff_across_branches_pairs_only_shared_files() {
    let (_d, store, dot) = setup();
    let master = store.branch_fs(&dot, "master").unwrap();
    write_file(&master, "base", b"base");
    write_file(&master, "shared", b"shared");
    let base = commit(&store, &dot, "master", "base");
    store.create_branch(&dot, "b1", None).unwrap();
    let b1 = store.branch_fs(&dot, "b1").unwrap();
    let apple = write_file(&b1, "apple", b"apple pie");
    b1.rename(ROOT_INO, b"shared", ROOT_INO, b"moved", 0)
        .unwrap();
    let c1 = commit(&store, &dot, "b1", "a");
    let zebra = write_file(&master, "zebra", b"totally different longer content");
    let c2 = commit(&store, &dot, "master", "z");
    assert_eq!(apple, zebra, "the test needs colliding inode numbers");
    assert_eq!(
        store
            .diff(&dot, "master", Some(c1.id), Some(c2.id))
            .unwrap(),
        vec![
            change(ChangeKind::Deleted, "/apple"),
            renamed("/moved", "/shared"),
            change(ChangeKind::Added, "/zebra"),
        ]
    );
    assert_eq!(
        store
            .diff(&dot, "master", Some(base.id), Some(c1.id))
            .unwrap(),
        vec![
            change(ChangeKind::Added, "/apple"),
            renamed("/shared", "/moved"),
        ]
    );
}

/// A new hard link is an added path, not a rename of a path that is still
/// there; the shared content's change shows on every path.
#[test]
fn diff_new_hard_link_is_added_not_renamed() {
    let (_d, store, dot) = setup();
    let fs = store.branch_fs(&dot, "master").unwrap();
    let z = write_file(&fs, "z", b"z\n");
    commit(&store, &dot, "master", "3");
    fs.link(z, ROOT_INO, b"y").unwrap();
    // Only a link: nothing of z changed.
    assert_eq!(
        store.diff(&dot, "master", None, None).unwrap(),
        vec![change(ChangeKind::Added, "/y")]
    );
    append(&fs, z, b"q\n");
    assert_eq!(
        store.diff(&dot, "master", None, None).unwrap(),
        vec![
            change(ChangeKind::Added, "/y"),
            change(ChangeKind::Modified, "/z"),
        ]
    );
}

/// Renaming one of two hard links while the file changes reports the
/// rename and the change of every path.
#[test]
fn diff_renamed_hard_link_keeps_content_changes() {
    let (_d, store, dot) = setup();
    let fs = store.branch_fs(&dot, "master").unwrap();
    let a = write_file(&fs, "a", b"a\n");
    fs.link(a, ROOT_INO, b"b").unwrap();
    commit(&store, &dot, "master", "1");
    fs.rename(ROOT_INO, b"a", ROOT_INO, b"c", 0).unwrap();
    // A rename alone changes nothing else.
    assert_eq!(
        store.diff(&dot, "master", None, None).unwrap(),
        vec![renamed("/a", "/c")]
    );
    append(&fs, a, b"more\n");
    assert_eq!(
        store.diff(&dot, "master", None, None).unwrap(),
        vec![
            change(ChangeKind::Modified, "/b"),
            renamed("/a", "/c"),
            change(ChangeKind::Modified, "/c"),
        ]
    );
}

/// A file moved with its directory is reported under its new path even
/// when it has another link outside the directory.
#[test]
fn diff_renamed_directory_keeps_hard_linked_children() {
    let (_d, store, dot) = setup();
    let fs = store.branch_fs(&dot, "master").unwrap();
    let dir = fs.mkdir(ROOT_INO, b"dir", 0o755, 0, 0).unwrap().ino;
    let t = fs
        .mknod(dir, b"t.txt", FileKind::File, 0o644, 0, 0, 0)
        .unwrap()
        .ino;
    append(&fs, t, b"t\n");
    fs.link(t, ROOT_INO, b"hardlink").unwrap();
    commit(&store, &dot, "master", "1");
    fs.rename(ROOT_INO, b"dir", ROOT_INO, b"dir2", 0).unwrap();
    append(&fs, t, b"more\n");
    assert_eq!(
        store.diff(&dot, "master", None, None).unwrap(),
        vec![
            renamed("/dir", "/dir2"),
            renamed("/dir/t.txt", "/dir2/t.txt"),
            change(ChangeKind::Modified, "/dir2/t.txt"),
            change(ChangeKind::Modified, "/hardlink"),
        ]
    );
}

/// A file renamed and changed shows both; a file renamed over another
/// replaces that path (a modification) and leaves its old path deleted.
#[test]
fn diff_rename_with_changes_and_over_existing_files() {
    let (_d, store, dot) = setup();
    let fs = store.branch_fs(&dot, "master").unwrap();
    let f = write_file(&fs, "f", b"1");
    write_file(&fs, "src", b"source");
    write_file(&fs, "dst", b"destination");
    commit(&store, &dot, "master", "1");
    fs.rename(ROOT_INO, b"f", ROOT_INO, b"g", 0).unwrap();
    append(&fs, f, b"2");
    fs.rename(ROOT_INO, b"src", ROOT_INO, b"dst", 0).unwrap();
    assert_eq!(
        store.diff(&dot, "master", None, None).unwrap(),
        vec![
            change(ChangeKind::Modified, "/dst"),
            renamed("/f", "/g"),
            change(ChangeKind::Modified, "/g"),
            change(ChangeKind::Deleted, "/src"),
        ]
    );
}

#[test]
fn gc_reclaims_only_garbage_and_fsck_finds_corruption() {
    let (dir, store, dot) = setup();
    let fs = store.branch_fs(&dot, "master").unwrap();
    let big = noise(300_000, 3);
    write_file(&fs, "keep", &big);
    let c1 = commit(&store, &dot, "master", "one");
    let other: Vec<u8> = (0..300_000u32).map(|i| (i * 13 % 241) as u8).collect();
    write_file(&fs, "tmp", &other);
    commit(&store, &dot, "master", "two");
    store.reset(&dot, "master", c1.id, true).unwrap();
    let r = store.gc().unwrap();
    assert!(r.chunks_deleted >= 4, "{r:?}");
    assert!(r.objects_deleted >= 1, "{r:?}");
    assert_eq!(read_file(&fs, "keep").unwrap(), big);
    let f = store.fsck().unwrap();
    assert!(f.is_clean(), "{:?}", f.problems);
    assert!(f.chunks_checked >= 4);
    let again = store.gc().unwrap();
    assert_eq!(again.chunks_deleted, 0);
    drop(fs);
    drop(store);
    // Corrupt one chunk behind the store's back: fsck names it.
    {
        let store = Store::open(dir.path()).unwrap();
        let fs = store.branch_fs(&dot, "master").unwrap();
        let a = fs.lookup(ROOT_INO, b"keep").unwrap();
        assert_eq!(fs.read(a.ino, 0, 10).unwrap(), &big[..10]);
    }
    // Flip the first byte after the first chunk record's codec byte (the
    // header is 44 bytes): fsck names the chunk.
    let seg = segments(dir.path())
        .into_iter()
        .find(|(_, len)| *len > 0)
        .expect("a segment with chunks")
        .0;
    let mut bytes = std::fs::read(&seg).unwrap();
    let key = hex::encode(&bytes[12..44]);
    bytes[45] ^= 0x55;
    std::fs::write(&seg, bytes).unwrap();
    let store = Store::open(dir.path()).unwrap();
    let f = store.fsck().unwrap();
    assert!(!f.is_clean());
    assert!(
        f.problems.iter().any(|p| p.contains(&key)),
        "{:?}",
        f.problems
    );
}

/// The chunk log's segment files with the bytes they hold on the disk
/// (allocated blocks: holes GC punched do not count), oldest first.
fn segments(data_dir: &std::path::Path) -> Vec<(std::path::PathBuf, u64)> {
    use std::os::unix::fs::MetadataExt;
    let mut out: Vec<_> = std::fs::read_dir(data_dir.join("chunks"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.path(), e.metadata().unwrap().blocks() * 512)
        })
        .collect();
    out.sort();
    out
}

/// GC gives back the dead blocks of a segment that still holds live
/// records (holes punched, records left where they are), so a full disk
/// gets space back without room to move anything.
#[test]
fn gc_gives_back_dead_blocks_of_sparse_segments() {
    let (dir, store, dot) = setup();
    // Incompressible: both files' blocks are records in the log.
    let keep = noise(300_000, 1);
    let tmp = noise(3_000_000, 2);
    let c1 = {
        let fs = store.branch_fs(&dot, "master").unwrap();
        write_file(&fs, "keep", &keep);
        let c1 = commit(&store, &dot, "master", "keep");
        write_file(&fs, "tmp", &tmp);
        commit(&store, &dot, "master", "tmp");
        c1
    };
    drop(store);
    // Reopened, the store appends to a new segment; the old one holds
    // `keep` and `tmp`.
    let store = Store::open(dir.path()).unwrap();
    let before = segments(dir.path());
    let old = before.iter().max_by_key(|(_, len)| *len).unwrap().clone();
    assert!(old.1 > 3_000_000, "{before:?}");
    store.reset(&dot, "master", c1.id, true).unwrap();
    let r = store.gc().unwrap();
    assert!(r.chunks_deleted >= 40, "{r:?}");
    assert!(r.log_bytes_freed > 2_500_000, "{r:?}");
    let after = segments(dir.path());
    // Its dead blocks went back to the disk, the live ones stayed.
    let old_after = after.iter().find(|(p, _)| *p == old.0).map_or(0, |s| s.1);
    assert!(
        old_after < 1 << 20,
        "the sparse segment kept its dead blocks: {after:?}"
    );
    let total: u64 = after.iter().map(|(_, len)| len).sum();
    assert!(total >= 300_000, "keep's records were moved: {after:?}");
    let fs = store.branch_fs(&dot, "master").unwrap();
    assert_eq!(read_file(&fs, "keep").unwrap(), keep);
    let store = reopened_reads(dir.path(), store, fs, &dot, "keep", &keep);
    // Nothing left to reclaim: a second GC moves nothing.
    assert_eq!(store.gc().unwrap().log_bytes_freed, 0);
}

/// GC gives back space in the segment that takes appends too, without
/// waiting for it to fill or for a restart (a user deleted a dot, ran gc,
/// and saw nothing given back).
#[test]
fn gc_gives_back_the_active_segment() {
    let (dir, store, dot) = setup();
    let keep = noise(300_000, 3);
    let tmp = noise(24 << 20, 4);
    let fs = store.branch_fs(&dot, "master").unwrap();
    write_file(&fs, "keep", &keep);
    let c1 = commit(&store, &dot, "master", "keep");
    write_file(&fs, "tmp", &tmp);
    commit(&store, &dot, "master", "tmp");
    drop(fs);
    let before: u64 = segments(dir.path()).iter().map(|(_, l)| l).sum();
    store.reset(&dot, "master", c1.id, true).unwrap();
    let r = store.gc().unwrap();
    assert!(r.log_bytes_freed > 20 << 20, "{r:?}");
    let after: u64 = segments(dir.path()).iter().map(|(_, l)| l).sum();
    assert!(after + (20 << 20) < before, "{before} -> {after} bytes");
    let fs = store.branch_fs(&dot, "master").unwrap();
    assert_eq!(read_file(&fs, "keep").unwrap(), keep);
    assert!(store.fsck().unwrap().is_clean());
}

/// Whether a GC becomes due within 30 s: the store's size counts
/// RocksDB's files, which its background flushes fill a moment after the
/// writes (on a busy machine, megabytes later; the server looks again
/// every 5 s).
fn due_soon(store: &Store, min_growth: u64) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !store.gc_due(min_growth).unwrap() {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    true
}

/// `gc_due` (what `dm server` runs GC by itself on): not while the chunk
/// log grew by less than the minimum or a quarter since the last GC, and
/// again once a file written over several times left that much behind,
/// or a branch was deleted; a GC makes it not due again.
#[test]
fn gc_is_due_after_a_quarter_of_growth_or_a_delete() {
    let (_dir, store, dot) = setup();
    let fs = store.branch_fs(&dot, "master").unwrap();
    write_file(&fs, "db", &noise(4 << 20, 10));
    commit(&store, &dot, "master", "db");
    store.gc().unwrap();
    assert!(!store.gc_due(1 << 20).unwrap());
    // Written over: each version's chunks are dead once the next is there.
    write_file(&fs, "db", &noise(4 << 20, 20));
    assert!(
        !store.gc_due(8 << 20).unwrap(),
        "grew by less than the minimum"
    );
    assert!(due_soon(&store, 1 << 20), "grew by more than a quarter");
    for seed in [30, 40, 50] {
        write_file(&fs, "db", &noise(4 << 20, seed));
    }
    assert!(due_soon(&store, 8 << 20));
    let r = store.gc().unwrap();
    assert!(r.log_bytes_freed >= 12 << 20, "{r:?}");
    assert!(!store.gc_due(1 << 20).unwrap());
    assert_eq!(read_file(&fs, "db").unwrap(), noise(4 << 20, 50));
    // A deleted branch's space is wanted back: due whatever the growth.
    store.create_branch(&dot, "scratch", None).unwrap();
    assert!(!store.gc_due(1 << 30).unwrap());
    store.delete_branch(&dot, "scratch", true).unwrap();
    assert!(store.gc_due(1 << 30).unwrap());
    store.gc().unwrap();
    assert!(!store.gc_due(1 << 30).unwrap());
}

/// A database writing 8 KiB pages leaves its garbage in RocksDB's files
/// (chunks under 16 KiB live there), not in the chunk log: that growth
/// makes a GC due too (it never did: a server's automatic GC never ran
/// for such a database, which filled the disk until `dm gc`).
#[test]
fn gc_is_due_after_small_pages_are_written_over() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_with(
        dir.path(),
        StoreOptions {
            memtable_bytes: 1 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    let dot = DotName::new("pages").unwrap();
    store.create_dot(&dot, Some(8192)).unwrap();
    let fs = store.branch_fs(&dot, "master").unwrap();
    write_file(&fs, "table", &noise(4 << 20, 1));
    commit(&store, &dot, "master", "table");
    store.gc().unwrap();
    assert!(!store.gc_due(1 << 20).unwrap());
    // Written over between commits: each version's pages are dead once
    // the next is there.
    for seed in 2..6 {
        write_file(&fs, "table", &noise(4 << 20, seed));
    }
    assert!(due_soon(&store, 1 << 20), "16 MiB of dead 8 KiB pages");
    let r = store.gc().unwrap();
    assert!(r.bytes_freed > 0, "{r:?}");
    assert!(!store.gc_due(1 << 20).unwrap());
}

#[test]
fn posix_semantics() {
    let (_d, store, dot) = setup();
    let fs = store.branch_fs(&dot, "master").unwrap();
    let d = fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0).unwrap();
    assert_eq!(fs.getattr(ROOT_INO).unwrap().nlink, 3);
    let f = fs
        .mknod(d.ino, b"f", FileKind::File, 0o644, 0, 0, 0)
        .unwrap();
    // Hard links and nlink.
    fs.link(f.ino, ROOT_INO, b"hard").unwrap();
    assert_eq!(fs.getattr(f.ino).unwrap().nlink, 2);
    assert!(fs.rmdir(ROOT_INO, b"d").is_err());
    // Rename flags.
    fs.mknod(ROOT_INO, b"x", FileKind::File, 0o644, 0, 0, 0)
        .unwrap();
    assert_eq!(
        fs.rename(ROOT_INO, b"x", ROOT_INO, b"hard", RENAME_NOREPLACE)
            .unwrap_err()
            .errno(),
        17
    );
    fs.rename(ROOT_INO, b"x", ROOT_INO, b"hard", RENAME_EXCHANGE)
        .unwrap();
    assert_eq!(fs.lookup(ROOT_INO, b"x").unwrap().ino, f.ino);
    assert_eq!(
        fs.rename(ROOT_INO, b"d", d.ino, b"inside", 0)
            .unwrap_err()
            .errno(),
        22
    );
    // Unlinked while open: readable until release.
    fs.write(f.ino, 0, b"still here").unwrap();
    fs.open(f.ino).unwrap();
    fs.unlink(d.ino, b"f").unwrap();
    fs.unlink(ROOT_INO, b"x").unwrap();
    assert_eq!(fs.read(f.ino, 0, 100).unwrap(), b"still here");
    fs.release(f.ino).unwrap();
    assert!(fs.getattr(f.ino).is_err());
    // Sparse files, truncate and holes.
    let s = fs
        .mknod(ROOT_INO, b"sparse", FileKind::File, 0o644, 0, 0, 0)
        .unwrap();
    fs.write(s.ino, 1_000_000, b"end").unwrap();
    fs.flush(s.ino).unwrap();
    assert_eq!(fs.getattr(s.ino).unwrap().size, 1_000_003);
    assert_eq!(
        fs.read(s.ino, 999_990, 100).unwrap(),
        [&[0u8; 10][..], b"end"].concat()
    );
    fs.setattr(
        s.ino,
        &SetAttr {
            size: Some(1_000_001),
            ..Default::default()
        },
    )
    .unwrap();
    fs.setattr(
        s.ino,
        &SetAttr {
            size: Some(1_000_010),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        fs.read(s.ino, 1_000_000, 100).unwrap(),
        [&b"e"[..], &[0u8; 9]].concat()
    );
    // A truncate after a flush: no stale bytes come back from the write
    // buffer's clean copies, neither on extension nor on a later write.
    let t = fs
        .mknod(ROOT_INO, b"trunc", FileKind::File, 0o644, 0, 0, 0)
        .unwrap();
    fs.write(t.ino, 0, &[7u8; 100]).unwrap();
    fs.flush(t.ino).unwrap();
    fs.setattr(
        t.ino,
        &SetAttr {
            size: Some(50),
            ..Default::default()
        },
    )
    .unwrap();
    fs.write(t.ino, 60, b"x").unwrap();
    let mut want = vec![7u8; 50];
    want.extend_from_slice(&[0u8; 10]);
    want.push(b'x');
    assert_eq!(fs.read(t.ino, 0, 1000).unwrap(), want);
    fs.flush(t.ino).unwrap();
    fs.setattr(
        t.ino,
        &SetAttr {
            size: Some(55),
            ..Default::default()
        },
    )
    .unwrap();
    fs.setattr(
        t.ino,
        &SetAttr {
            size: Some(70),
            ..Default::default()
        },
    )
    .unwrap();
    want.truncate(55);
    want.resize(70, 0);
    assert_eq!(fs.read(t.ino, 0, 1000).unwrap(), want);
    // Xattrs.
    fs.setxattr(s.ino, b"user.k", b"v", XATTR_CREATE).unwrap();
    assert_eq!(
        fs.setxattr(s.ino, b"user.k", b"v", XATTR_CREATE)
            .unwrap_err()
            .errno(),
        17
    );
    assert_eq!(fs.getxattr(s.ino, b"user.k").unwrap(), b"v");
    assert_eq!(fs.listxattr(s.ino).unwrap(), vec![b"user.k".to_vec()]);
    fs.removexattr(s.ino, b"user.k").unwrap();
    assert_eq!(fs.getxattr(s.ino, b"user.k").unwrap_err().errno(), 61);
    // Readdir offsets are stable and resumable.
    for i in 0..500 {
        fs.mknod(
            d.ino,
            format!("n{i}").as_bytes(),
            FileKind::File,
            0o644,
            0,
            0,
            0,
        )
        .unwrap();
    }
    let mut seen = std::collections::HashSet::new();
    let mut off = 0;
    loop {
        let batch = fs.readdir(d.ino, off, 7).unwrap();
        let Some(last) = batch.last() else { break };
        off = last.offset;
        for e in batch {
            assert!(seen.insert(e.name), "duplicate entry");
        }
    }
    assert_eq!(seen.len(), 502);
    // Symlinks.
    let l = fs.symlink(ROOT_INO, b"link", b"d/n1", 0, 0).unwrap();
    assert_eq!(fs.readlink(l.ino).unwrap(), b"d/n1");
    assert_eq!(l.size, 4);
    commit(&store, &dot, "master", "all");
    assert_eq!(fs.readdir(d.ino, 0, 1000).unwrap().len(), 502);
}

/// Runs GC again and again on a thread until `stop`, and on until one run
/// freed chunk log bytes (at most 50 runs after `stop`, so that a thread
/// scheduled late still runs); returns the runs and the bytes freed.
fn gc_until(
    store: &Arc<Store>,
    stop: &Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(u64, u64)> {
    let (store, stop) = (store.clone(), stop.clone());
    std::thread::spawn(move || {
        let (mut runs, mut freed, mut after) = (0, 0, 0);
        loop {
            freed += store.gc().unwrap().log_bytes_freed;
            runs += 1;
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                after += 1;
                if freed > 0 || after >= 50 {
                    break;
                }
            }
        }
        (runs, freed)
    })
}

#[test]
fn gc_is_safe_while_branches_are_written() {
    // Small segments: GC compacts and removes segments while files are
    // written, deduplicated against garbage, and read.
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions {
        segment_bytes: 256 << 10,
        ..Default::default()
    };
    let store = Store::open_with(dir.path(), opts).unwrap();
    let dot = DotName::new("myapp").unwrap();
    store.create_dot(&dot, None).unwrap();
    let fs = store.branch_fs(&dot, "master").unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gc = gc_until(&store, &stop);
    // Content repeats across files and rounds, so writes often dedup
    // against chunks that have just become garbage.
    // Incompressible (in the log), and it repeats every 40 rounds.
    const VARIANTS: u32 = 40;
    let content = |k: u32| -> Vec<u8> { noise(70_000, u64::from(k % VARIANTS) + 1) };
    for round in 0..300u32 {
        let name = format!("f{}", round % 5);
        write_file(&fs, &name, &content(round));
        if let Some(data) = read_file(&fs, &format!("f{}", (round + 2) % 5)) {
            assert!((0..VARIANTS).any(|r| data == content(r)), "round {round}");
        }
        if round % 4 == 0 {
            commit(&store, &dot, "master", "c");
        }
        if round % 9 == 8 {
            let id = store.resolve(&dot, "master", "HEAD^").unwrap();
            store.reset(&dot, "master", id, true).unwrap();
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (runs, freed) = gc.join().unwrap();
    assert!(runs > 0);
    assert!(freed > 0, "GC compacted segments while files were written");
    store.gc().unwrap();
    let report = store.fsck().unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    for k in 0..5 {
        if let Some(data) = read_file(&fs, &format!("f{k}")) {
            assert!((0..VARIANTS).any(|r| data == content(r)), "f{k}");
        }
    }
    assert!(
        std::fs::read_dir(dir.path().join("chunks"))
            .unwrap()
            .count()
            > 1,
        "segments rotated"
    );
}

#[test]
fn partial_whole_and_partial_again_writes_to_one_block_read_back() {
    // Exercises the clean copy kept after a flush, a whole-block rewrite
    // (hashed on the worker) and a partial write on top of it.
    let (dir, store, dot) = setup();
    let fs = store.branch_fs(&dot, "master").unwrap();
    let ino = fs
        .mknod(ROOT_INO, b"f", FileKind::File, 0o644, 0, 0, 0)
        .unwrap()
        .ino;
    let bs = fs.block_size() as usize;
    fs.write(ino, 0, &[b'A'; 100]).unwrap();
    fs.flush(ino).unwrap();
    let mut want = noise(2 * bs, 9);
    fs.write(ino, 0, &want).unwrap();
    fs.flush(ino).unwrap();
    fs.write(ino, 5, b"CCCCCCCCCC").unwrap();
    want[5..15].copy_from_slice(b"CCCCCCCCCC");
    assert_eq!(fs.read(ino, 0, 3 * bs as u32).unwrap(), want);
    fs.flush(ino).unwrap();
    fs.write(ino, bs as u64, &want[bs..]).unwrap(); // the same bytes again
    fs.write(ino, bs as u64 + 1, b"D").unwrap();
    want[bs + 1] = b'D';
    fs.fsync(ino, false).unwrap();
    assert_eq!(fs.read(ino, 0, 3 * bs as u32).unwrap(), want);
    commit(&store, &dot, "master", "c");
    reopened_reads(dir.path(), store, fs, &dot, "f", &want);
}

/// A store whose write buffers spill after 256 KiB, with 256 KiB segments.
fn spilling_store(dir: &std::path::Path) -> (Arc<Store>, DotName) {
    let opts = StoreOptions {
        write_buffer_bytes: 256 << 10,
        segment_bytes: 256 << 10,
        ..Default::default()
    };
    let store = Store::open_with(dir, opts).unwrap();
    let dot = DotName::new("myapp").unwrap();
    if store.create_dot(&dot, None).is_err() {
        // Reopened: the dot exists.
    }
    (store, dot)
}

/// Buffered writes are bounded for all branches together, not only per
/// branch: 400 mounts each written a few MiB (each under its branch's
/// bound) held 4 GiB. Past the store-wide bound the written file's whole
/// blocks are spilled; the data reads back and commits whole.
#[test]
fn write_buffers_of_all_branches_together_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions {
        write_buffer_bytes: 4 << 20,
        total_write_buffer_bytes: 4 << 20,
        ..Default::default()
    };
    let store = Store::open_with(dir.path(), opts).unwrap();
    let dot = DotName::new("many").unwrap();
    store.create_dot(&dot, None).unwrap();
    let mut written = Vec::new();
    for b in 0..8u64 {
        let name = format!("b{b}");
        store.create_branch(&dot, &name, None).unwrap();
        let fs = store.branch_fs(&dot, &name).unwrap();
        let ino = fs
            .mknod(ROOT_INO, b"f", FileKind::File, 0o644, 0, 0, 0)
            .unwrap()
            .ino;
        // 3 MiB: under the branch's bound and a file buffer's (8 MiB).
        let data = noise(3 << 20, b);
        write_in_pieces(&fs, ino, &data, 1 << 20);
        written.push((name, fs, data));
    }
    let total: usize = written.iter().map(|(_, fs, _)| fs.buffered_bytes()).sum();
    // The bound, plus at most a write's worth for the branch that crossed it.
    assert!(total <= 6 << 20, "{} MiB buffered", total >> 20);
    for (name, fs, data) in &written {
        assert_eq!(read_file(fs, "f").unwrap(), *data, "{name}");
        commit(&store, &dot, name, "c");
    }
    drop(written);
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    for b in 0..8u64 {
        let fs = store.branch_fs(&dot, &format!("b{b}")).unwrap();
        assert_eq!(read_file(&fs, "f").unwrap(), noise(3 << 20, b));
    }
    assert!(store.fsck().unwrap().is_clean());
}

/// Writes `data` at 0 in unaligned pieces (without flushing).
fn write_in_pieces(fs: &BranchFs, ino: u64, data: &[u8], piece: usize) {
    for (i, part) in data.chunks(piece).enumerate() {
        fs.write(ino, (i * piece) as u64, part).unwrap();
    }
}

#[test]
fn spilled_blocks_read_back_survive_gc_and_are_stored_at_fsync() {
    let dir = tempfile::tempdir().unwrap();
    let (store, dot) = spilling_store(dir.path());
    let fs = store.branch_fs(&dot, "master").unwrap();
    let bs = fs.block_size() as usize;
    let ino = fs
        .mknod(ROOT_INO, b"big", FileKind::File, 0o644, 0, 0, 0)
        .unwrap()
        .ino;
    let mut want = noise(2 << 20 | 1234, 5);
    write_in_pieces(&fs, ino, &want, 100_000);
    assert!(
        fs.buffered_bytes() <= 512 << 10,
        "whole blocks were spilled"
    );
    assert_eq!(fs.read(ino, 0, want.len() as u32 + 10).unwrap(), want);
    // A partial write into a spilled block, and a whole one.
    fs.write(ino, bs as u64 + 7, b"partial").unwrap();
    want[bs + 7..bs + 14].copy_from_slice(b"partial");
    let whole = noise(bs, 6);
    fs.write(ino, 3 * bs as u64, &whole).unwrap();
    want[3 * bs..4 * bs].copy_from_slice(&whole);
    // Nothing references the spilled chunks yet: GC must keep them (the
    // reads after the reopen and fsck find them). Only the two blocks just
    // rewritten left garbage.
    let r = store.gc().unwrap();
    assert!(r.chunks_deleted <= 2, "{r:?}");
    // Another file with the same bytes deduplicates against them.
    let copy = fs
        .mknod(ROOT_INO, b"copy", FileKind::File, 0o644, 0, 0, 0)
        .unwrap()
        .ino;
    write_in_pieces(&fs, copy, &want, 1 << 20);
    store.gc().unwrap();
    assert_eq!(fs.read(ino, 0, want.len() as u32 + 10).unwrap(), want);
    fs.fsync(ino, false).unwrap();
    fs.fsync(copy, false).unwrap();
    assert_eq!(fs.buffered_bytes(), 0);
    drop(fs);
    drop(store);
    let (store, dot) = spilling_store(dir.path());
    let fs = store.branch_fs(&dot, "master").unwrap();
    assert_eq!(read_file(&fs, "big").unwrap(), want, "after a reopen");
    assert_eq!(read_file(&fs, "copy").unwrap(), want, "after a reopen");
    store.gc().unwrap();
    let report = store.fsck().unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    assert_eq!(read_file(&fs, "big").unwrap(), want, "after GC");
}

#[test]
fn spills_never_flushed_leave_the_old_file_and_only_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let old = noise(100_000, 7);
    {
        let (store, dot) = spilling_store(dir.path());
        let fs = store.branch_fs(&dot, "master").unwrap();
        let ino = write_file(&fs, "f", &old);
        fs.fsync(ino, false).unwrap();
        // Rewritten in place, spilled, and never flushed: the process
        // "dies" (the store is dropped without a flush).
        write_in_pieces(&fs, ino, &noise(3 << 20, 8), 1 << 20);
        assert!(fs.buffered_bytes() < 3 << 20, "blocks were spilled");
    }
    let (store, dot) = spilling_store(dir.path());
    let fs = store.branch_fs(&dot, "master").unwrap();
    assert_eq!(read_file(&fs, "f").unwrap(), old);
    let report = store.fsck().unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    let r = store.gc().unwrap();
    assert!(
        r.log_bytes_freed >= 2 << 20,
        "the spilled records are reclaimed: {r:?}"
    );
    assert_eq!(read_file(&fs, "f").unwrap(), old);
}

#[test]
fn a_file_reopened_while_its_last_release_runs_survives_unlink() {
    // The kernel sends RELEASE in the background after close(2): a program
    // can reopen the file and unlink it while the daemon still handles the
    // release of its earlier handle. The file must live until the new
    // handle is released.
    let (_dir, store, dot) = setup();
    let fs = store.branch_fs(&dot, "master").unwrap();
    for i in 0..4000 {
        let name = format!("f{i}");
        let ino = created_open(&fs, &name, b"still here"); // the creating handle
        let releaser = {
            let fs = fs.clone();
            std::thread::spawn(move || fs.release(ino).unwrap())
        };
        fs.open(ino).unwrap(); // reopened, maybe before that release ends
        fs.unlink(ROOT_INO, name.as_bytes()).unwrap();
        releaser.join().unwrap();
        assert_eq!(fs.read(ino, 0, 100).unwrap(), b"still here", "round {i}");
        fs.release(ino).unwrap();
        assert!(fs.getattr(ino).is_err(), "freed after its last release");
    }
}

#[test]
fn a_stat_racing_with_the_release_after_close_sees_the_written_size() {
    // The kernel sends RELEASE in the background after close(2), and keeps
    // the size a GETATTR answers (appends then go to that end). A getattr
    // or lookup made after the writes returned must give their size, even
    // while the release stores the buffer and drops it.
    let (_dir, store, dot) = setup();
    let fs = store.branch_fs(&dot, "master").unwrap();
    let data = noise(3 << 16, 7);
    for i in 0..1500 {
        let name = format!("f{i}");
        let ino = created_open(&fs, &name, &data);
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let releaser = {
            let (fs, done) = (fs.clone(), done.clone());
            std::thread::spawn(move || {
                fs.release(ino).unwrap();
                done.store(true, std::sync::atomic::Ordering::Release);
            })
        };
        loop {
            let finished = done.load(std::sync::atomic::Ordering::Acquire);
            assert_eq!(
                fs.getattr(ino).unwrap().size,
                data.len() as u64,
                "round {i}"
            );
            let looked = fs.lookup(ROOT_INO, name.as_bytes()).unwrap();
            assert_eq!(looked.size, data.len() as u64, "round {i}, lookup");
            if finished {
                break;
            }
        }
        releaser.join().unwrap();
    }
}

#[test]
fn fsynced_small_writes_are_patches_until_a_commit() {
    let (dir, store, dot) = setup();
    let fs = store.branch_fs(&dot, "master").unwrap();
    let bs = fs.block_size() as usize;
    // One file whose blocks are committed, one whose blocks are only in
    // the working state.
    let mut old = noise(3 * bs + 500, 11);
    let mut new = noise(2 * bs, 12);
    let old_ino = write_file(&fs, "old", &old);
    commit(&store, &dot, "master", "base");
    let new_ino = write_file(&fs, "new", &new);
    fs.fsync(new_ino, false).unwrap();
    let chunks = store.fsck().unwrap().chunks_checked;
    // Small writes in blocks 0 and 2, one spanning blocks 0 and 1, and
    // one past the end (into a hole block and a new last block).
    let edits: [(usize, &[u8]); 4] = [
        (10, b"hello"),
        (bs - 3, b"across"),
        (2 * bs + 100, b"third block"),
        (5 * bs + 9, b"past the end"),
    ];
    for (off, data) in edits {
        for (f, buf) in [(old_ino, &mut old), (new_ino, &mut new)] {
            fs.write(f, off as u64, data).unwrap();
            if buf.len() < off + data.len() {
                buf.resize(off + data.len(), 0);
            }
            buf[off..off + data.len()].copy_from_slice(data);
        }
    }
    fs.fsync(old_ino, false).unwrap();
    fs.fsync(new_ino, false).unwrap();
    // Writes on top of patches, fsynced again.
    for (f, buf) in [(old_ino, &mut old), (new_ino, &mut new)] {
        fs.write(f, 12, b"LL").unwrap();
        buf[12..14].copy_from_slice(b"LL");
        fs.fsync(f, false).unwrap();
    }
    assert_eq!(
        store.fsck().unwrap().chunks_checked,
        chunks,
        "an fsync of small writes stored no chunk"
    );
    assert_eq!(read_file(&fs, "old").unwrap(), old);
    assert_eq!(read_file(&fs, "new").unwrap(), new);
    // GC keeps the patches' bases, reopening reads the patches back, and
    // fsck finds nothing wrong.
    store.gc().unwrap();
    drop(fs);
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    let fs = store.branch_fs(&dot, "master").unwrap();
    assert!(store.fsck().unwrap().is_clean());
    assert_eq!(read_file(&fs, "old").unwrap(), old, "after a reopen");
    assert_eq!(read_file(&fs, "new").unwrap(), new, "after a reopen");
    // A truncate inside a patched block, then a commit: the commit holds
    // chunks, the same bytes, and checks out again after a reset.
    old.truncate(2 * bs + 105);
    fs.setattr(
        old_ino,
        &SetAttr {
            size: Some(old.len() as u64),
            ..Default::default()
        },
    )
    .unwrap();
    let c = commit(&store, &dot, "master", "patched");
    store.gc().unwrap();
    let report = store.fsck().unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    assert_eq!(read_file(&fs, "old").unwrap(), old, "after the commit");
    write_file(&fs, "old", b"scribbled");
    store.reset(&dot, "master", c.id, true).unwrap();
    assert_eq!(read_file(&fs, "old").unwrap(), old, "after a reset");
    assert_eq!(read_file(&fs, "new").unwrap(), new, "after a reset");
}

#[test]
fn patches_are_stored_whole_later_except_blocks_being_written() {
    let (dir, store, dot) = setup();
    let fs = store.branch_fs(&dot, "master").unwrap();
    let bs = fs.block_size() as usize;
    let mut want = noise(3 * bs, 21);
    let ino = write_file(&fs, "f", &want);
    let mut edit = |fs: &BranchFs, off: usize, data: &[u8]| {
        fs.write(ino, off as u64, data).unwrap();
        want[off..off + data.len()].copy_from_slice(data);
    };
    edit(&fs, 5, b"block zero");
    edit(&fs, 2 * bs + 5, b"block two");
    fs.fsync(ino, false).unwrap();
    // Block 2 is being written again: left to its own flush.
    edit(&fs, 2 * bs + 50, b"again");
    assert_eq!(store.materialize_patches().unwrap(), 1);
    assert_eq!(store.materialize_patches().unwrap(), 0, "nothing left");
    // Block 0 is a chunk of its own now: its old base is garbage.
    assert_eq!(store.gc().unwrap().chunks_deleted, 1);
    assert_eq!(read_file(&fs, "f").unwrap(), want);
    // Its fsync patches it again (over its previous patches).
    fs.fsync(ino, false).unwrap();
    assert_eq!(store.materialize_patches().unwrap(), 1);
    assert_eq!(read_file(&fs, "f").unwrap(), want);
    // A file removed before its patches are stored keeps nothing.
    let gone = write_file(&fs, "gone", &noise(bs, 22));
    fs.write(gone, 9, b"x").unwrap();
    fs.fsync(gone, false).unwrap();
    fs.unlink(ROOT_INO, b"gone").unwrap();
    assert_eq!(store.materialize_patches().unwrap(), 0);
    reopened_reads(dir.path(), store, fs, &dot, "f", &want);
}

/// Attributes and extended attributes are part of a file (a change is a
/// modification, also of a renamed file); its access time is not.
#[test]
fn diff_attribute_changes_and_access_times() {
    let (_d, store, dot) = setup();
    let fs = store.branch_fs(&dot, "master").unwrap();
    let a = write_file(&fs, "a", b"a");
    let b = write_file(&fs, "b", b"b");
    let c = write_file(&fs, "c", b"c");
    commit(&store, &dot, "master", "1");
    fs.setattr(
        a,
        &SetAttr {
            atime: Some(TimeSet::Now),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(store.diff(&dot, "master", None, None).unwrap().is_empty());
    fs.setattr(
        b,
        &SetAttr {
            mode: Some(0o600),
            ..Default::default()
        },
    )
    .unwrap();
    fs.setxattr(c, b"user.tag", b"x", 0).unwrap();
    fs.rename(ROOT_INO, b"c", ROOT_INO, b"d", 0).unwrap();
    assert_eq!(
        store.diff(&dot, "master", None, None).unwrap(),
        vec![
            change(ChangeKind::Modified, "/b"),
            renamed("/c", "/d"),
            change(ChangeKind::Modified, "/d"),
        ]
    );
}

/// A directory's own mode, owner and extended attributes are changes; its
/// times and size, which follow its entries, are not.
#[test]
fn diff_directory_attribute_changes() {
    let (_d, store, dot) = setup();
    let fs = store.branch_fs(&dot, "master").unwrap();
    let dirs: Vec<_> = ["m", "o", "x", "t"]
        .iter()
        .map(|n| fs.mkdir(ROOT_INO, n.as_bytes(), 0o755, 0, 0).unwrap().ino)
        .collect();
    commit(&store, &dot, "master", "1");
    let set = |ino, set: SetAttr| {
        fs.setattr(ino, &set).unwrap();
    };
    set(
        dirs[0],
        SetAttr {
            mode: Some(0o700),
            ..Default::default()
        },
    );
    set(
        dirs[1],
        SetAttr {
            uid: Some(7),
            gid: Some(7),
            ..Default::default()
        },
    );
    fs.setxattr(dirs[2], b"user.k", b"v", 0).unwrap();
    // Only times: an entry created and removed again.
    fs.mknod(dirs[3], b"tmp", FileKind::File, 0o644, 0, 0, 0)
        .unwrap();
    fs.unlink(dirs[3], b"tmp").unwrap();
    assert_eq!(
        store.diff(&dot, "master", None, None).unwrap(),
        vec![
            change(ChangeKind::Modified, "/m"),
            change(ChangeKind::Modified, "/o"),
            change(ChangeKind::Modified, "/x"),
        ]
    );
}

/// Listings taken while another client creates and deletes branches and
/// dots leave out what was deleted meanwhile: they failed with "branch not
/// found" (`dm list`, `dm status`, and a commit that lists the dot's
/// branches for its containers).
#[test]
fn listings_skip_what_is_deleted_meanwhile() {
    let (_dir, store, dot) = setup();
    let c = commit(&store, &dot, "master", "base");
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let (store, dot, done) = (store.clone(), dot.clone(), done.clone());
        std::thread::spawn(move || {
            for i in 0..300 {
                let name = format!("q{i}");
                store.create_branch(&dot, &name, Some(c.id)).unwrap();
                store.delete_branch(&dot, &name, true).unwrap();
                let other = DotName::new(&format!("d{i}")).unwrap();
                store.create_dot(&other, None).unwrap();
                store.delete_dot(&other).unwrap();
            }
            done.store(true, std::sync::atomic::Ordering::Relaxed);
        })
    };
    let mut listings = 0;
    while !done.load(std::sync::atomic::Ordering::Relaxed) {
        let branches = store.list_branches(&dot).unwrap();
        assert!(branches.iter().any(|b| b.name == "master"));
        store.list_dots().unwrap();
        listings += 1;
    }
    churn.join().unwrap();
    // (A thread scheduled away for the whole churn lists a few times.)
    assert!(listings > 0, "no listing ran");
}

/// Unflushed writes count as the data they hold, not as whole blocks:
/// 300 small files held open said 18.75 MiB written.
#[test]
fn unflushed_small_files_count_as_their_bytes() {
    let (_d, store, dot) = setup();
    let fs = store.branch_fs(&dot, "master").unwrap();
    let inos: Vec<u64> = (0..3)
        .map(|i| created_open(&fs, &format!("small{i}"), &[b'x'; 150]))
        .collect();
    let info = store.branch_info(&dot, "master").unwrap();
    assert_eq!(info.dirty_bytes, 450);
    // The files' sizes are their buffers' (`dm list` showed 0 B while a
    // file was being written).
    assert_eq!(info.size, 450);
    // Flushed (a status asked for it, or an fsync), then written on: the
    // working state's block is counted once, the buffer's version.
    fs.fsync(inos[0], false).unwrap();
    fs.write(inos[0], 150, &[b'y'; 50]).unwrap();
    let info = store.branch_info(&dot, "master").unwrap();
    assert_eq!(info.dirty_bytes, 500);
    for ino in inos {
        fs.release(ino).unwrap();
    }
}

/// Data written to open files counts as uncommitted also once spilled to
/// the chunk log under memory pressure (named only by the file's buffer
/// until its flush): in a branch's dirty bytes (`dm status` showed 63 of
/// 100 MiB), and for a reset without --hard, which must refuse.
#[test]
fn spilled_writes_count_as_uncommitted() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_with(
        dir.path(),
        dm_store::StoreOptions {
            write_buffer_bytes: 1 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    let dot = DotName::new("spill").unwrap();
    store.create_dot(&dot, None).unwrap();
    let fs = store.branch_fs(&dot, "master").unwrap();
    let data = noise(8 << 20, 9);
    write_file(&fs, "big", &data);
    let c = commit(&store, &dot, "master", "big");
    // Overwritten in place, file open: nothing in the working state yet.
    let ino = fs.lookup(ROOT_INO, b"big").unwrap().ino;
    fs.open(ino).unwrap();
    let new = noise(8 << 20, 10);
    fs.write(ino, 0, &new).unwrap();
    let info = store.branch_info(&dot, "master").unwrap();
    assert!(
        info.dirty_bytes >= 8 << 20,
        "{} dirty bytes",
        info.dirty_bytes
    );
    assert!(store.reset(&dot, "master", c.id, false).is_err());
    assert!(read_file(&fs, "big").unwrap() == new);
    fs.release(ino).unwrap();
}

#[test]
fn fsck_while_gc_runs_and_files_are_written_finds_nothing() {
    // fsck marked what the branches named, then looked each chunk up; a GC
    // that ran between the two deleted chunks an overwrite had just made
    // garbage, and fsck called them missing (39 of 42 runs of `dm fsck`
    // beside a `dm gc` loop and a writer).
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let dot = DotName::new("myapp").unwrap();
    store.create_dot(&dot, None).unwrap();
    let fs = store.branch_fs(&dot, "master").unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gc = gc_until(&store, &stop);
    let fsck = {
        let store = store.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut problems = Vec::new();
            let mut runs = 0;
            // At least once, however late this thread runs.
            loop {
                problems.extend(store.fsck().unwrap().problems);
                runs += 1;
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
            }
            (runs, problems)
        })
    };
    for round in 0..400u64 {
        write_file(&fs, &format!("f{}", round % 10), &noise(70_000, round + 1));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    gc.join().unwrap();
    let (runs, problems) = fsck.join().unwrap();
    assert!(runs > 0);
    assert!(problems.is_empty(), "{runs} fsck runs: {problems:?}");
}

/// Scans of one branch's working state never cross the keys another
/// branch's commit just deleted: `dm status` of a small dot took seconds
/// after another dot committed 20,000 files (each directory listing of it
/// stepped over all of them, until RocksDB flushed its memtable). Counted
/// with RocksDB's per-thread perf counters of keys stepped over.
#[test]
fn scans_do_not_cross_another_branchs_deleted_keys() {
    use rocksdb::perf::{set_perf_stats, PerfContext, PerfMetric, PerfStatsLevel};
    let (_dir, store, small) = setup();
    let fs = store.branch_fs(&small, "master").unwrap();
    for i in 0..20 {
        let d = fs
            .mkdir(ROOT_INO, format!("d{i}").as_bytes(), 0o755, 0, 0)
            .unwrap();
        fs.mknod(d.ino, b"f", FileKind::File, 0o644, 0, 0, 0)
            .unwrap();
    }
    commit(&store, &small, "master", "small");
    // Made after `small`: its overlay's keys sort after small's.
    let big = DotName::new("big").unwrap();
    store.create_dot(&big, None).unwrap();
    let bfs = store.branch_fs(&big, "master").unwrap();
    for i in 0..5000 {
        bfs.mknod(
            ROOT_INO,
            format!("f{i}").as_bytes(),
            FileKind::File,
            0o644,
            0,
            0,
            0,
        )
        .unwrap();
    }
    commit(&store, &big, "master", "big");

    set_perf_stats(PerfStatsLevel::EnableCount);
    let mut perf = PerfContext::default();
    perf.reset();
    let fs = store.branch_fs(&small, "master").unwrap();
    fs.mknod(ROOT_INO, b"new", FileKind::File, 0o644, 0, 0, 0)
        .unwrap();
    let changes = store.diff(&small, "master", None, None).unwrap();
    assert_eq!(changes, vec![change(ChangeKind::Added, "/new")]);
    // 20 directories, `new`, `.` and `..`.
    assert_eq!(fs.readdir(ROOT_INO, 0, 1000).unwrap().len(), 23);
    // Deleted keys still in the memtable are stepped over one by one.
    let skipped = perf.metric(PerfMetric::NextOnMemtableCount);
    set_perf_stats(PerfStatsLevel::Disable);
    assert!(
        skipped < 1000,
        "scans of the small dot stepped over {skipped} keys"
    );
}

/// Bytes of the files under `dir` (recursively).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        // RocksDB deletes obsolete files in the background: one listed
        // may be gone a moment later.
        .filter_map(|e| e.metadata().ok().map(|m| (e, m)))
        .map(|(e, m)| {
            if m.is_dir() {
                dir_bytes(&e.path())
            } else {
                m.len()
            }
        })
        .sum()
}

/// Small files live in RocksDB's own files (inline chunks), which give a
/// deleted key's space back only at a compaction: GC compacts once it
/// deleted enough there (500,000 small files deleted and collected gave
/// back nothing until a restart).
#[test]
fn gc_gives_back_the_space_of_small_files() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_with(
        dir.path(),
        StoreOptions {
            memtable_bytes: 1 << 20,
            compact_after_gc: 1 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    let dot = DotName::new("small").unwrap();
    store.create_dot(&dot, None).unwrap();
    let fs = store.branch_fs(&dot, "master").unwrap();
    for i in 0..4000u64 {
        write_file(&fs, &format!("f{i}"), &noise(4096, 2 * i + 1));
    }
    commit(&store, &dot, "master", "small files");
    drop(fs);
    let before = dir_bytes(&dir.path().join("db"));
    assert!(before > 8 << 20, "{before}");
    store.delete_dot(&dot).unwrap();
    let r = store.gc().unwrap();
    assert!(r.chunks_deleted >= 4000, "{r:?}");
    // What GC's compaction freed, by its report: on a loaded host
    // RocksDB's own compaction after the flush may free most of it first
    // (20 KB reported once, with the space given back), so the space is
    // what counts below.
    assert!(r.table_bytes_freed > 0, "{r:?}");
    // The compacted-away files go in the background: on a loaded host
    // (tests in parallel) a moment later.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut after = dir_bytes(&dir.path().join("db"));
    while after >= before / 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
        after = dir_bytes(&dir.path().join("db"));
    }
    assert!(after < before / 2, "{before} -> {after}");
}

/// A save by write-then-rename over a file that another thread opens and
/// reads: an open may lose the race to the rename (ESTALE: the kernel looks
/// the name up again), but a handle it got reads the file it opened. The
/// open checked the file and counted the handle apart, so a rename in
/// between freed the file under the new handle.
#[test]
fn a_file_opened_while_renamed_over_stays_readable() {
    let (_d, store, dot) = setup();
    let fs = store.branch_fs(&dot, "master").unwrap();
    write_file(&fs, "f", b"0");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let saver = {
        let (fs, stop) = (fs.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && i < 20_000 {
                i += 1;
                write_file(&fs, "t", i.to_string().as_bytes());
                fs.rename(ROOT_INO, b"t", ROOT_INO, b"f", 0).unwrap();
            }
        })
    };
    let (mut opened, mut lost) = (0, 0);
    let started = std::time::Instant::now();
    while started.elapsed() < std::time::Duration::from_secs(3) {
        let Ok(a) = fs.lookup(ROOT_INO, b"f") else {
            continue;
        };
        match fs.open_at(a.ino) {
            Ok(_) => {}
            Err(e) if e.errno() == libc::ESTALE => {
                lost += 1;
                continue;
            }
            Err(e) => panic!("open: {e}"),
        }
        opened += 1;
        let data = fs
            .read(a.ino, 0, 64)
            .unwrap_or_else(|e| panic!("reading a file opened before it was renamed over: {e}"));
        assert!(!data.is_empty());
        fs.release(a.ino).unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    saver.join().unwrap();
    eprintln!("{opened} opens, {lost} lost to the rename");
    assert!(opened > 100);
}

/// The GC a deletion makes due is due after a restart too (the server
/// runs it by itself): a crash or stop right after a `dm dot delete` left
/// the dot's data on the disk until someone ran `dm gc`.
#[test]
fn a_gc_made_due_by_a_delete_survives_a_restart() {
    let (dir, store, dot) = setup();
    let fs = store.branch_fs(&dot, "master").unwrap();
    write_file(&fs, "f", &noise(1 << 20, 7));
    drop(fs);
    assert!(!store.gc_due(u64::MAX).unwrap(), "nothing deleted yet");
    store.delete_dot(&dot).unwrap();
    assert!(store.gc_due(u64::MAX).unwrap());
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert!(store.gc_due(u64::MAX).unwrap(), "forgotten by the restart");
    store.gc().unwrap();
    assert!(!store.gc_due(u64::MAX).unwrap());
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert!(!store.gc_due(u64::MAX).unwrap(), "due again after the GC");
}

/// A file a kernel still knows (looked up, not yet forgotten) stays, with
/// no link left, until the kernel forgets it; a commit meanwhile frees it
/// rather than keeping it, and its data, in the commit.
#[test]
fn a_file_a_kernel_knows_outlives_its_unlink_until_forgotten_or_a_commit() {
    let (_d, store, dot) = setup();
    let fs = store.branch_fs(&dot, "master").unwrap();
    let a = write_file(&fs, "a", b"kept for the kernel");
    let b = write_file(&fs, "b", b"freed by the commit");
    fs.hold(a);
    fs.hold(b);
    fs.unlink(ROOT_INO, b"a").unwrap();
    fs.unlink(ROOT_INO, b"b").unwrap();
    assert_eq!(fs.orphan_count(), 2);
    assert_eq!(fs.read(a, 0, 64).unwrap(), b"kept for the kernel");
    fs.unhold(a).unwrap();
    assert_eq!(fs.orphan_count(), 1);
    assert_eq!(fs.getattr(a).unwrap_err().errno(), libc::ESTALE);
    commit(&store, &dot, "master", "without b");
    assert_eq!(fs.orphan_count(), 0);
    assert_eq!(fs.getattr(b).unwrap_err().errno(), libc::ESTALE);
    fs.unhold(b).unwrap();
    // A GC frees such a file too, and its data: `rm BIG; dm gc` freed
    // nothing while the kernel's forget was on its way.
    let c = write_file(&fs, "c", &noise(1 << 20, 3));
    fs.hold(c);
    fs.unlink(ROOT_INO, b"c").unwrap();
    let r = store.gc().unwrap();
    assert!(r.bytes_freed >= 1 << 20, "{r:?}");
    assert_eq!(fs.orphan_count(), 0);
    fs.unhold(c).unwrap();
}

/// A file with no link left that a process still has open is never part
/// of a commit: a branch made from such a commit (a clone, a branch, the
/// hub's after a restart) freed it at its start, uncommitted changes no
/// one made, which refused pushes, pulls and deletes there. The handle
/// reads its file across the commit; the branch stays clean while it is
/// open, after it closes, and after a restart with it open.
#[test]
fn an_open_file_with_no_link_left_stays_out_of_commits() {
    let (dir, store, dot) = setup();
    let fs = store.branch_fs(&dot, "master").unwrap();
    write_file(&fs, "keep", b"kept");
    // More blocks than has_work looked through (it found the branch
    // dirty from a few MiB on, for good).
    let data = noise(9 << 20, 3);
    let a = write_file(&fs, "a", &data);
    let b = write_file(&fs, "b", b"closed after the commit");
    commit(&store, &dot, "master", "with a and b");
    for (ino, name) in [(a, "a"), (b, "b")] {
        fs.open(ino).unwrap();
        fs.unlink(ROOT_INO, name.as_bytes()).unwrap();
    }
    let c = commit(&store, &dot, "master", "without a and b");
    assert_eq!(fs.read(a, 0, data.len() as u32).unwrap(), data);
    let clean = |store: &Store, branch: &str, why: &str| {
        assert!(!store.has_uncommitted(&dot, branch).unwrap(), "{why}");
        let info = store.branch_info(&dot, branch).unwrap();
        assert!(!info.uncommitted && info.dirty_bytes == 0, "{why}");
        let changes = store.diff(&dot, branch, None, None).unwrap();
        assert!(changes.is_empty(), "{why}: {changes:?}");
    };
    clean(&store, "master", "an open orphan");
    store.create_branch(&dot, "from-c", Some(c.id)).unwrap();
    clean(&store, "from-c", "a branch from the commit");
    store.delete_branch(&dot, "from-c", false).unwrap();
    fs.release(b).unwrap();
    clean(&store, "master", "an orphan closed");
    fs.release(a).unwrap();
    clean(&store, "master", "a large orphan closed");
    let a = write_file(&fs, "a2", &data);
    fs.open(a).unwrap();
    fs.unlink(ROOT_INO, b"a2").unwrap();
    let c = commit(&store, &dot, "master", "without a2");
    clean(&store, "master", "a large orphan open");
    drop(fs);
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    clean(&store, "master", "a restart with an orphan open");
    store.create_branch(&dot, "from-c", Some(c.id)).unwrap();
    clean(
        &store,
        "from-c",
        "a branch from the commit, after a restart",
    );
    let fs = store.branch_fs(&dot, "master").unwrap();
    assert_eq!(fs.lookup(ROOT_INO, b"a").unwrap_err().errno(), libc::ENOENT);
    assert_eq!(fs.read(a, 0, 4).unwrap_err().errno(), libc::ESTALE);
    let next = commit(&store, &dot, "master", "nothing");
    let changes = store
        .diff(&dot, "master", Some(c.id), Some(next.id))
        .unwrap();
    assert!(changes.is_empty(), "{changes:?}");
}

/// A punch (fallocate's PUNCH_HOLE and ZERO_RANGE) reads back as zeros
/// over its range and leaves the rest, whether the blocks it meets are
/// committed, stored by a close, patched by an fsync or still buffered,
/// and whether it starts and ends inside blocks or on their edges.
#[test]
fn punch_zeroes_ranges_over_every_kind_of_block() {
    let (dir, store, dot) = setup();
    let fs = store.branch_fs(&dot, "master").unwrap();
    let bs = fs.block_size() as u64;
    let mut want = noise(12 * bs as usize + 777, 11);
    let ino = write_file(&fs, "f", &want);
    commit(&store, &dot, "master", "base");
    // Block 3 patched by an fsync, block 6 stored by a close, block 9
    // buffered, block 11 rewritten whole and buffered.
    let mut put = |at: u64, data: &[u8]| {
        fs.write(ino, at, data).unwrap();
        want[at as usize..at as usize + data.len()].copy_from_slice(data);
    };
    put(3 * bs + 100, &[7u8; 300]);
    fs.fsync(ino, false).unwrap();
    put(6 * bs + 5, &[8u8; 10]);
    fs.flush(ino).unwrap();
    put(9 * bs + 1000, &[9u8; 4000]);
    put(11 * bs, &noise(bs as usize, 12));
    let size = want.len() as u64;
    let mut zero = |from: u64, len: u64| {
        fs.punch(ino, from, len).unwrap();
        let to = (from + len).min(size);
        want[from as usize..to as usize].fill(0);
        assert_eq!(
            fs.read(ino, 0, size as u32 + 10).unwrap(),
            want,
            "after punching {from}+{len}"
        );
    };
    zero(bs / 2, 10); // inside one block
    zero(2 * bs + 3, 2 * bs); // over the patched block, ends inside one
    zero(5 * bs, 2 * bs); // whole blocks: the closed one
    zero(9 * bs - 1, bs + 2); // the buffered block and a byte each side
    zero(11 * bs + 10, 1 << 40); // past the end: cut at it
    assert_eq!(fs.getattr(ino).unwrap().size, size);
    // Writes after a punch land over its holes.
    fs.write(ino, 5 * bs + 1, b"back").unwrap();
    want[5 * bs as usize + 1..5 * bs as usize + 5].copy_from_slice(b"back");
    fs.flush(ino).unwrap();
    commit(&store, &dot, "master", "punched");
    reopened_reads(dir.path(), store, fs, &dot, "f", &want);
}

/// A punch drops the whole blocks in its range instead of storing zeros
/// over them: punching a 4 GiB sparse file whole stores nothing (zeros
/// written over it stored 65,536 block entries and took 4 GiB of writes).
#[test]
fn punch_of_a_sparse_range_stores_no_blocks() {
    let (_dir, store, dot) = setup();
    let fs = store.branch_fs(&dot, "master").unwrap();
    let ino = write_file(&fs, "sparse", b"head");
    let size = 4u64 << 30;
    fs.setattr(
        ino,
        &SetAttr {
            size: Some(size),
            ..Default::default()
        },
    )
    .unwrap();
    fs.write(ino, size - 4, b"tail").unwrap();
    fs.flush(ino).unwrap();
    commit(&store, &dot, "master", "sparse");
    let before = store.fsck().unwrap().objects_checked;
    fs.punch(ino, 0, size).unwrap();
    fs.flush(ino).unwrap();
    commit(&store, &dot, "master", "punched");
    let after = store.fsck().unwrap().objects_checked;
    // One more commit and a tree of the same shape.
    assert!(after <= before * 2 + 2, "objects {before} -> {after}");
    let a = fs.getattr(ino).unwrap();
    assert_eq!(a.size, size);
    assert_eq!(fs.read(ino, size - 8, 8).unwrap(), vec![0u8; 8]);
    assert_eq!(fs.read(ino, 0, 4).unwrap(), vec![0u8; 4]);
}

/// A store whose database is missing while its chunk segments are there (a
/// partial restore) is refused: it opened as an empty store, and its first
/// GC removed the segments for good.
#[test]
fn a_store_without_its_database_is_refused() {
    let (dir, store, dot) = setup();
    let fs = store.branch_fs(&dot, "master").unwrap();
    write_file(&fs, "f", &noise(1 << 20, 7));
    commit(&store, &dot, "master", "data");
    drop(fs);
    drop(store);
    std::fs::rename(dir.path().join("db"), dir.path().join("db.away")).unwrap();
    let e = Store::open(dir.path())
        .err()
        .expect("opened without its database");
    let e = e.to_string();
    assert!(
        e.contains("is incomplete") && e.contains("no database"),
        "{e}"
    );
    std::fs::rename(dir.path().join("db.away"), dir.path().join("db")).unwrap();
    // Without its CURRENT file, RocksDB made a new database beside the
    // old one's files (and a small store's data, all in the database,
    // was gone).
    let current = dir.path().join("db/CURRENT");
    std::fs::rename(&current, dir.path().join("CURRENT.away")).unwrap();
    let e = Store::open(dir.path())
        .err()
        .expect("opened without CURRENT");
    assert!(e.to_string().contains("not its CURRENT file"), "{e}");
    std::fs::rename(dir.path().join("CURRENT.away"), &current).unwrap();
    let store = Store::open(dir.path()).unwrap();
    let fs = store.branch_fs(&dot, "master").unwrap();
    assert_eq!(read_file(&fs, "f").unwrap(), noise(1 << 20, 7));
}

/// A chunk segment file missing at a start (a partial restore) keeps its
/// number: the segment the start makes took it, so that putting the file
/// back later found another segment's records there, and the data written
/// meanwhile was lost with them; an empty segment (a start that wrote
/// nothing) keeps its number too. Data written meanwhile that has chunks
/// in the missing segment is stored again (it was taken as stored, and
/// unreadable after a restart).
#[test]
fn a_missing_chunk_segment_keeps_its_number() {
    let (dir, store, dot) = setup();
    let fs = store.branch_fs(&dot, "master").unwrap();
    write_file(&fs, "old", &noise(1 << 20, 1));
    commit(&store, &dot, "master", "old");
    drop(fs);
    drop(store);
    // A start that writes nothing leaves an empty segment.
    drop(Store::open(dir.path()).unwrap());
    let chunks = dir.path().join("chunks");
    let away = dir.path().join("chunks.away");
    std::fs::rename(&chunks, &away).unwrap();
    std::fs::create_dir(&chunks).unwrap();
    let store = Store::open(dir.path()).unwrap();
    let fs = store.branch_fs(&dot, "master").unwrap();
    let a = fs.lookup(ROOT_INO, b"old").unwrap();
    let e = fs.read(a.ino, 0, a.size as u32).unwrap_err().to_string();
    assert!(e.contains("is missing"), "{e}");
    // Said once per segment (fsck said it once per chunk).
    let missing = store.missing_segments().unwrap();
    assert_eq!(missing.len(), 1, "{missing:?}");
    assert!(
        missing[0].contains("00000001.log is missing"),
        "{missing:?}"
    );
    assert!(missing[0].contains("16 chunk(s)"), "{missing:?}");
    assert_eq!(store.fsck().unwrap().problems, missing);
    write_file(&fs, "again", &noise(1 << 20, 1));
    write_file(&fs, "new", &noise(1 << 20, 2));
    commit(&store, &dot, "master", "new");
    drop(fs);
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    let fs = store.branch_fs(&dot, "master").unwrap();
    assert_eq!(read_file(&fs, "again").unwrap(), noise(1 << 20, 1));
    drop(fs);
    drop(store);
    for f in std::fs::read_dir(&away).unwrap() {
        let f = f.unwrap();
        let to = chunks.join(f.file_name());
        assert!(!to.exists(), "{} was taken again", to.display());
        std::fs::rename(f.path(), to).unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    let fs = store.branch_fs(&dot, "master").unwrap();
    assert_eq!(read_file(&fs, "old").unwrap(), noise(1 << 20, 1));
    assert_eq!(read_file(&fs, "new").unwrap(), noise(1 << 20, 2));
    assert!(store.fsck().unwrap().is_clean());
}

/// A stopping server stops GC and fsck at their next step (it waited a
/// minute for a `dm fsck` before it stopped).
#[test]
fn gc_and_fsck_stop_when_told() {
    let (_dir, store, dot) = setup();
    let fs = store.branch_fs(&dot, "master").unwrap();
    write_file(&fs, "f", &noise(1 << 20, 3));
    commit(&store, &dot, "master", "data");
    assert!(store.fsck().unwrap().is_clean());
    store.stop_gc();
    let e = store.fsck().unwrap_err().to_string();
    assert!(e.contains("fsck stopped") && e.contains("dm fsck"), "{e}");
    let e = store.gc().unwrap_err().to_string();
    assert!(e.contains("GC stopped"), "{e}");
}

/// Resolving a commit id walks every branch of the dot: one that another
/// client deleted meanwhile is passed over (`dm branch NEW COMMIT` failed
/// with "branch not found", naming the other client's branch).
#[test]
fn resolving_an_id_passes_over_branches_deleted_meanwhile() {
    let (_d, store, dot) = setup();
    let fs = store.branch_fs(&dot, "master").unwrap();
    write_file(&fs, "f", b"x");
    let c = commit(&store, &dot, "master", "c");
    let prefix = c.id.to_hex()[..12].to_string();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|sc| {
        sc.spawn(|| {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let name = format!("t{}", i % 8);
                store.create_branch(&dot, &name, Some(c.id)).unwrap();
                store.delete_branch(&dot, &name, true).unwrap();
                i += 1;
            }
        });
        let mut fails = Vec::new();
        for _ in 0..10_000 {
            if let Err(e) = store.resolve(&dot, "master", &prefix) {
                fails.push(e.to_string());
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(
            fails.is_empty(),
            "{} failed: {:?}",
            fails.len(),
            fails.first()
        );
    });
}

/// Operations in a directory just removed fail with ENOENT, as in a
/// removed directory of a local file system (two `rm -rf` racing printed
/// "Stale file handle"), and its attributes are those of a directory with
/// no link left, as fstat(2) shows one (with ENOENT, `rm -rf` racing
/// another mount's took it for a file: "Is a directory"); after a reset,
/// numbers the state lacks are ESTALE again (the kernel then looks the
/// path up anew).
#[test]
fn a_removed_directory_is_enoent_until_a_reset() {
    let (_d, store, dot) = setup();
    let fs = store.branch_fs(&dot, "master").unwrap();
    let made = fs.mkdir(ROOT_INO, b"d", 0o750, 7, 8).unwrap();
    let d = made.ino;
    fs.rmdir(ROOT_INO, b"d").unwrap();
    let gone = fs.getattr(d).unwrap();
    assert_eq!(
        (
            gone.kind,
            gone.perm & 0o7777,
            gone.nlink,
            gone.uid,
            gone.gid
        ),
        (FileKind::Dir, 0o750, 0, 7, 8)
    );
    assert_eq!(gone.crtime, made.crtime);
    assert_eq!(fs.unlink(d, b"x").unwrap_err().errno(), libc::ENOENT);
    assert_eq!(fs.lookup(d, b"x").unwrap_err().errno(), libc::ENOENT);
    // Listed (still open on another mount): empty, as a local file
    // system lists it.
    assert!(fs.readdir(d, 0, 100).unwrap().is_empty());
    let c = commit(&store, &dot, "master", "empty");
    store.reset(&dot, "master", c.id, true).unwrap();
    assert_eq!(fs.getattr(d).unwrap_err().errno(), libc::ESTALE);
    assert_eq!(fs.readdir(d, 0, 100).unwrap_err().errno(), libc::ESTALE);
}
