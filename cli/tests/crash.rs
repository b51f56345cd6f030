//! kill -9 of the server after an fsync, then a restart: the fsynced data
//! is there and the mounts come back (the stale FUSE mounts are cleaned).

use dm_tests::{is_mounted, random_bytes, write_synced, Server};
use std::path::PathBuf;

const DM: &str = env!("CARGO_BIN_EXE_dm");

#[test]
fn kill9_after_fsync_then_restart() {
    let mut s = Server::start(DM);
    s.ok(&["init", "myapp"]);
    s.ok(&["switch", "myapp"]);
    let mnt = PathBuf::from(s.ok(&["mount", "myapp"]).trim());
    let pinned = s.root().join("pinned");
    s.ok(&["mount", "myapp@master", pinned.to_str().unwrap()]);

    write_synced(&mnt.join("committed"), b"committed data");
    s.ok(&["commit", "-m", "first"]);
    let data = random_bytes(3, 2 * 1024 * 1024 + 5);
    write_synced(&mnt.join("synced"), &data);

    s.kill9();
    // The dead mount answers ENOTCONN until someone cleans it up.
    s.restart();
    assert!(is_mounted(&mnt), "mount did not come back:\n{}", s.log());
    assert!(is_mounted(&pinned), "pinned mount did not come back");
    assert_eq!(std::fs::read(mnt.join("synced")).unwrap(), data);
    assert_eq!(
        std::fs::read(mnt.join("committed")).unwrap(),
        b"committed data"
    );
    assert!(s.ok(&["log"]).contains("    first\n"));
    let list = s.ok(&["list"]);
    assert!(!list.to_lowercase().contains("failed"), "{list}");
    s.ok(&["commit", "-m", "after crash"]);
    s.ok(&["reset", "--hard", "HEAD^"]);
    assert!(!mnt.join("synced").exists());
    assert!(mnt.join("committed").exists());
}
