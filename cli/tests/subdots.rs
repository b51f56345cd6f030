//! Subdots: `myapp.orders-db` and `myapp.catalog-db` are committed together
//! and restored together.

use dm_tests::{random_bytes, snapshot, write_synced, Server};
use std::path::PathBuf;

const DM: &str = env!("CARGO_BIN_EXE_dm");

#[test]
fn subdots_commit_and_reset_atomically() {
    let s = Server::start(DM);
    s.ok(&["init", "myapp"]);
    s.ok(&["init", "other"]);
    s.ok(&["switch", "other"]);
    // --dot works on another dot than the current one.
    assert_eq!(s.ok(&["branch", "--dot", "myapp"]), "* master\n");
    s.ok(&["switch", "myapp"]);
    let orders = PathBuf::from(s.ok(&["mount", "myapp.orders-db"]).trim());
    let catalog = PathBuf::from(s.ok(&["mount", "myapp.catalog-db"]).trim());
    assert_ne!(orders, catalog);
    assert!(orders.ends_with("myapp/orders-db"), "{}", orders.display());

    write_synced(&orders.join("orders"), b"");
    write_synced(&catalog.join("catalog"), b"");
    s.ok(&["commit", "-m", "two empty dbs"]);
    let empty_orders = snapshot(&orders);
    let empty_catalog = snapshot(&catalog);

    write_synced(&orders.join("orders"), &random_bytes(7, 200_000));
    write_synced(&catalog.join("catalog"), &random_bytes(8, 300_000));
    s.ok(&["commit", "-m", "data in two dbs"]);
    let full_orders = snapshot(&orders);
    let full_catalog = snapshot(&catalog);

    // The whole dot: both subdots in one tree.
    let root = s.root().join("whole");
    s.ok(&["mount", "myapp.__root__", root.to_str().unwrap()]);
    let whole = snapshot(&root);
    assert!(whole.contains_key("orders-db/orders"), "{:?}", whole.keys());
    assert!(
        whole.contains_key("catalog-db/catalog"),
        "{:?}",
        whole.keys()
    );

    let diff = s.ok(&["diff", "HEAD^", "HEAD"]);
    assert!(diff.contains("/orders-db/orders"), "{diff}");
    assert!(diff.contains("/catalog-db/catalog"), "{diff}");

    s.ok(&["reset", "--hard", "HEAD^"]);
    assert_eq!(snapshot(&orders), empty_orders);
    assert_eq!(snapshot(&catalog), empty_catalog);

    // A branch carries both subdots too.
    s.ok(&["checkout", "-b", "other"]);
    assert_eq!(snapshot(&orders), empty_orders);
    write_synced(&orders.join("orders"), b"other");
    s.ok(&["commit", "-m", "other"]);
    s.ok(&["checkout", "master"]);
    assert_eq!(snapshot(&orders), empty_orders);
    assert_ne!(full_orders, empty_orders);
    assert_ne!(full_catalog, empty_catalog);
}

/// A subdot mount whose directory was removed through a mount of the whole
/// dot shows it as a removed directory (empty, nothing can be made in it:
/// ENOENT), and `dm unmount` takes it away: it said another file system
/// was mounted over it, also with --force.
#[test]
fn a_subdot_mount_whose_directory_was_removed_unmounts() {
    let s = Server::start(DM);
    s.ok(&["init", "gone"]);
    s.ok(&["switch", "gone"]);
    let db = s.root().join("db");
    let whole = s.root().join("whole");
    s.ok(&["mount", "gone.db", db.to_str().unwrap()]);
    s.ok(&["mount", "gone.__root__", whole.to_str().unwrap()]);
    write_synced(&db.join("a"), b"1");
    s.ok(&["commit", "-m", "a"]);
    std::fs::remove_dir_all(whole.join("db")).unwrap();
    assert_eq!(std::fs::read_dir(&db).unwrap().count(), 0);
    let err = std::fs::write(db.join("b"), b"2").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{err}");
    s.ok(&["unmount", db.to_str().unwrap()]);
    assert!(!dm_tests::is_mounted(&db));
}

/// The empty directory a mount of a missing subdot makes is no change
/// (`dm status` clean, no dirty branch), but the next commit records it:
/// status and the commit's note say so (they said nothing had changed,
/// and `dm diff HEAD^ HEAD` then showed the directory added).
#[test]
fn a_subdot_directory_a_mount_made_is_named_by_status_and_the_commit() {
    let s = Server::start(DM);
    s.ok(&["init", "sd"]);
    s.ok(&["switch", "sd"]);
    let p = PathBuf::from(s.ok(&["mount", "sd"]).trim());
    // Not the default subdot's, which is never seen as a directory.
    let status = s.ok(&["status"]);
    assert!(!status.contains("subdot"), "{status}");
    write_synced(&p.join("f"), b"1");
    s.ok(&["commit", "-m", "one"]);
    let status = s.ok(&["status"]);
    assert!(!status.contains("subdot"), "{status}");

    s.ok(&["mount", "sd.sub"]);
    let status = s.ok(&["status"]);
    assert!(status.contains("No changes"), "{status}");
    assert!(
        status.contains("the next commit records it: /sub"),
        "{status}"
    );
    let out = s.dm(&["commit", "-m", "two"]);
    assert!(out.status.success(), "{out:?}");
    let note = String::from_utf8_lossy(&out.stderr);
    assert!(
        note.contains(
            "but the empty subdot directories that mounts made, which this commit records: /sub"
        ),
        "{note}"
    );
    assert_eq!(s.ok(&["diff", "HEAD^", "HEAD"]).trim(), "A  /sub");
    let status = s.ok(&["status"]);
    assert!(!status.contains("subdot"), "{status}");
    // Nothing at all: the plain note.
    let out = s.dm(&["commit", "-m", "three"]);
    let note = String::from_utf8_lossy(&out.stderr);
    assert!(note.contains("this commit has the same files"), "{note}");
}
