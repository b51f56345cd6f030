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

/// Small writes into a file's blocks, fsynced through the mount, are
/// stored as patches; the server stores those blocks whole within seconds
/// (their old chunks become garbage), and a kill -9 at any point keeps
/// every fsynced byte.
#[test]
fn small_fsynced_writes_survive_kill9_and_are_stored_whole() {
    use std::os::unix::fs::FileExt;
    let mut s = Server::start(DM);
    s.ok(&["init", "db"]);
    s.ok(&["switch", "db"]);
    let mnt = PathBuf::from(s.ok(&["mount", "db"]).trim());
    let path = mnt.join("table");
    let mut want = random_bytes(5, 4 << 20);
    write_synced(&path, &want);
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    for (i, off) in [100usize, 70_000, 1 << 20, (4 << 20) - 10]
        .into_iter()
        .enumerate()
    {
        let data = format!("update {i}");
        f.write_all_at(data.as_bytes(), off as u64).unwrap();
        f.sync_data().unwrap();
        let end = (off + data.len()).min(want.len());
        want.resize(want.len().max(off + data.len()), 0);
        want[off..off + data.len()].copy_from_slice(data.as_bytes());
        assert!(end <= want.len());
    }
    drop(f);
    assert_eq!(std::fs::read(&path).unwrap(), want);
    // Until the server stores the patched blocks whole, their old chunks
    // are still in use and GC finds nothing to delete.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let out = s.ok(&["gc"]);
        if !out.starts_with("Deleted 0 chunks") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the patched blocks were not stored whole within 30 s: {out}"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    assert_eq!(std::fs::read(&path).unwrap(), want);
    // Patches again, then kill -9 before the server stores them whole.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(b"after gc", 300).unwrap();
    f.sync_data().unwrap();
    want[300..308].copy_from_slice(b"after gc");
    s.kill9();
    s.restart();
    assert_eq!(std::fs::read(&path).unwrap(), want);
    assert!(s.ok(&["fsck"]).contains("No problems found"));
}

/// A saved mount that a start cannot bring back (its mount point is taken
/// by a file) stays in the table: the next start, with the way clear,
/// mounts it again; `dm unmount PATH` forgets such a mount.
#[test]
fn a_mount_that_cannot_come_back_is_kept_for_the_next_start() {
    let mut s = Server::start(DM);
    s.ok(&["init", "app"]);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p");
    let ps = p.to_str().unwrap();
    s.ok(&["mount", "app", ps]);
    dm_tests::write_synced(&p.join("f"), b"kept");
    let block = |s: &mut Server| {
        s.stop();
        std::fs::remove_dir(&p).unwrap();
        std::fs::write(&p, b"in the way").unwrap();
        s.restart();
        assert!(!dm_tests::is_mounted(&p));
    };
    block(&mut s);
    assert!(
        s.log().contains("kept: the next start tries again"),
        "{}",
        s.log()
    );
    s.stop();
    std::fs::remove_file(&p).unwrap();
    s.restart();
    assert!(dm_tests::is_mounted(&p), "{}", s.log());
    assert_eq!(std::fs::read(p.join("f")).unwrap(), b"kept");
    // Forgotten by `dm unmount`.
    block(&mut s);
    s.ok(&["unmount", ps]);
    s.stop();
    std::fs::remove_file(&p).unwrap();
    s.restart();
    assert!(!dm_tests::is_mounted(&p));
    assert!(s.fail(&["unmount", ps]).contains("nothing is mounted"));
    // Files put in a saved mount's directory while no server ran are not
    // hidden by mounting it again at the next start.
    s.ok(&["mount", "app", ps]);
    s.stop();
    std::fs::write(p.join("mine"), b"mine").unwrap();
    s.restart();
    assert!(!dm_tests::is_mounted(&p), "{}", s.log());
    assert_eq!(std::fs::read(p.join("mine")).unwrap(), b"mine");
    assert!(
        s.log().contains("not mounted again over them"),
        "{}",
        s.log()
    );
}

/// A server mount path is removed when the server stops, so a writer that
/// goes on by path fails instead of writing outside the dot; files put
/// there while it was not mounted (after a crash) are moved to
/// `MOUNT_DIR/lost+found/<time>/...` at the next start, not hidden under
/// the restored mount.
#[test]
fn files_left_in_a_server_path_are_moved_aside() {
    let mut s = Server::start(DM);
    s.ok(&["init", "z"]);
    let p = PathBuf::from(s.ok(&["mount", "z"]).trim());
    write_synced(&p.join("f"), b"in the dot");
    s.ok(&["commit", "--dot", "z", "-m", "f"]);
    s.stop();
    assert!(!p.exists(), "{} is left after the stop", p.display());
    // As after a kill -9: the directory is there, and a writer fills it.
    std::fs::create_dir_all(&p).unwrap();
    std::fs::write(p.join("stray"), b"outside the dot").unwrap();
    s.restart();
    assert!(dm_tests::is_mounted(&p));
    assert_eq!(std::fs::read(p.join("f")).unwrap(), b"in the dot");
    assert!(!p.join("stray").exists());
    let rel = p.strip_prefix(s.mount_dir()).unwrap();
    let found: Vec<_> = std::fs::read_dir(s.mount_dir().join("lost+found"))
        .unwrap()
        .map(|e| e.unwrap().path().join(rel).join("stray"))
        .collect();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(std::fs::read(&found[0]).unwrap(), b"outside the dot");
    assert!(s.log().contains("moved to"), "{}", s.log());
}
