//! Crash atomicity: a child process writes and commits in a loop and is
//! killed with SIGKILL at random moments (25 times). After each kill the
//! store must reopen fsck-clean, hold every commit the child reported, and
//! show every file either absent, empty (created, data never flushed) or
//! whole: never torn.

use dm_store::{CommitRequest, DotName, FileKind, Store, ROOT_INO};
use rand::Rng;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

const ENV: &str = "DM_CRASH_CHILD_DIR";

fn content(k: u64) -> Vec<u8> {
    let len = 1000 + (k * 7919) % 200_000;
    (0..len).map(|i| (i * 31 + k) as u8).collect()
}

/// The child: runs only when started by `crash_atomicity`.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(ENV) else { return };
    let store = Store::open(std::path::Path::new(&dir)).unwrap();
    let dot = DotName::new("crash").unwrap();
    if store.dot_info(&dot).is_err() {
        store.create_dot(&dot, Some(16384)).unwrap();
    }
    let fs = store.branch_fs(&dot, "master").unwrap();
    let mut out = std::io::stdout();
    let mut k: u64 = std::process::id() as u64 * 1_000_000;
    loop {
        k += 1;
        let name = format!("f{k}");
        let a = fs
            .mknod(ROOT_INO, name.as_bytes(), FileKind::File, 0o644, 0, 0, 0)
            .unwrap();
        fs.write(a.ino, 0, &content(k)).unwrap();
        fs.flush(a.ino).unwrap();
        if k.is_multiple_of(5) {
            let c = store
                .commit(
                    &dot,
                    "master",
                    CommitRequest {
                        message: format!("upto {k}"),
                        author: "crash".into(),
                        ..Default::default()
                    },
                )
                .unwrap();
            writeln!(out, "COMMIT {} {k}", c.id).unwrap();
            out.flush().unwrap();
        }
        if k.is_multiple_of(7) {
            // Remove an older file, to exercise deletions too.
            let old = format!("f{}", k - 3);
            let _ = fs.unlink(ROOT_INO, old.as_bytes());
        }
    }
}

#[test]
fn crash_atomicity() {
    if std::env::var(ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut rng = rand::thread_rng();
    let mut reported: Vec<(String, u64)> = Vec::new();
    // 25 rounds, or more (at most 60) until 3 commits were reported.
    for round in 0..60 {
        if round >= 25 && reported.len() >= 3 {
            break;
        }
        let mut child = Command::new(&exe)
            .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.gen_range(150..900)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let stdout = child.stdout.take().unwrap();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if let Some(rest) = line.strip_prefix("COMMIT ") {
                let mut p = rest.split(' ');
                let id = p.next().unwrap().to_string();
                let k: u64 = p.next().unwrap().parse().unwrap();
                reported.push((id, k));
            }
        }
        let store = Store::open(dir.path()).unwrap();
        let dot = DotName::new("crash").unwrap();
        if store.dot_info(&dot).is_err() {
            // Killed before the dot creation was durable: nothing to check.
            assert!(reported.is_empty(), "round {round}: dot lost after commits");
            continue;
        }
        let report = store.fsck().unwrap();
        assert!(
            report.is_clean(),
            "round {round}: fsck: {:?}",
            report.problems
        );
        let log: Vec<String> = store
            .log(&dot, "master")
            .unwrap()
            .into_iter()
            .map(|c| c.id.to_hex())
            .collect();
        for (id, _) in &reported {
            assert!(log.contains(id), "round {round}: reported commit {id} lost");
        }
        // The working state: every file absent, empty or whole.
        let fs = store.branch_fs(&dot, "master").unwrap();
        let mut off = 0;
        loop {
            let entries = fs.readdir(ROOT_INO, off, 100).unwrap();
            let Some(last) = entries.last() else { break };
            off = last.offset;
            for e in entries {
                let name = String::from_utf8(e.name).unwrap();
                let Some(k) = name.strip_prefix('f').and_then(|n| n.parse::<u64>().ok()) else {
                    continue;
                };
                let a = fs.getattr(e.ino).unwrap();
                if a.size == 0 {
                    continue;
                }
                let want = content(k);
                assert_eq!(a.size, want.len() as u64, "round {round}: {name} torn");
                let got = fs.read(e.ino, 0, want.len() as u32).unwrap();
                assert!(got == want, "round {round}: {name} content torn");
            }
        }
    }
    assert!(
        reported.len() >= 3,
        "the child reported too few commits: {}",
        reported.len()
    );
}

const SYNC_ENV: &str = "DM_CRASH_SYNC_CHILD";
/// Bytes of the file each round of [`fsynced_small_writes_survive_sigkill`] starts with.
const SYNC_BASE: usize = 200_000;

/// Write `j` (from 1) of a round: (offset, bytes), or a truncate (None).
fn small_write(round: u64, j: u64) -> (usize, Option<Vec<u8>>) {
    let h = (round * 1_000_003 + j).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 20;
    let off = (h % (SYNC_BASE as u64 + 70_000)) as usize;
    if j.is_multiple_of(23) {
        return (off, None);
    }
    let len = 1 + (h >> 20) % 3000;
    (off, Some((0..len).map(|i| (i * 7 + j) as u8).collect()))
}

/// The file of a round after its first `n` writes.
fn small_writes_state(round: u64, n: u64) -> Vec<u8> {
    let mut f = content(round).repeat(SYNC_BASE / content(round).len() + 1);
    f.truncate(SYNC_BASE);
    for j in 1..=n {
        match small_write(round, j) {
            (off, Some(d)) => {
                if f.len() < off + d.len() {
                    f.resize(off + d.len(), 0);
                }
                f[off..off + d.len()].copy_from_slice(&d);
            }
            (size, None) => f.resize(size, 0),
        }
    }
    f
}

/// The child of [`fsynced_small_writes_survive_sigkill`]: writes its
/// round's file, then small writes each followed by an fsync (a truncate
/// now and then, patches stored whole every 7th, a commit every 10th),
/// reporting each fsync.
#[test]
fn sync_child() {
    let Ok(spec) = std::env::var(SYNC_ENV) else {
        return;
    };
    let (dir, round) = spec.rsplit_once(':').unwrap();
    let round: u64 = round.parse().unwrap();
    let store = Store::open(std::path::Path::new(dir)).unwrap();
    let dot = DotName::new("sync").unwrap();
    if store.dot_info(&dot).is_err() {
        store.create_dot(&dot, None).unwrap();
    }
    let fs = store.branch_fs(&dot, "master").unwrap();
    let ino = fs
        .mknod(
            ROOT_INO,
            format!("r{round}").as_bytes(),
            FileKind::File,
            0o644,
            0,
            0,
            0,
        )
        .unwrap()
        .ino;
    fs.write(ino, 0, &small_writes_state(round, 0)).unwrap();
    fs.fsync(ino, false).unwrap();
    let mut out = std::io::stdout();
    writeln!(out, "SYNCED 0").unwrap();
    for j in 1.. {
        match small_write(round, j) {
            (off, Some(d)) => {
                fs.write(ino, off as u64, &d).unwrap();
            }
            (size, None) => {
                let set = dm_store::SetAttr {
                    size: Some(size as u64),
                    ..Default::default()
                };
                fs.setattr(ino, &set).unwrap();
            }
        }
        fs.fsync(ino, false).unwrap();
        writeln!(out, "SYNCED {j}").unwrap();
        out.flush().unwrap();
        if j.is_multiple_of(7) {
            // What the server does every few seconds.
            store.materialize_patches().unwrap();
        }
        if j.is_multiple_of(10) {
            let req = CommitRequest {
                message: format!("{round} {j}"),
                author: "crash".into(),
                ..Default::default()
            };
            store.commit(&dot, "master", req).unwrap();
        }
    }
}

/// Durability of fsync for small writes (stored as patches over their
/// blocks' previous chunks): after SIGKILL, each round's file holds every
/// write whose fsync returned, and at most the one write after it.
#[test]
fn fsynced_small_writes_survive_sigkill() {
    if std::env::var(ENV).is_ok() || std::env::var(SYNC_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut rng = rand::thread_rng();
    let mut synced_total = 0;
    // 12 rounds, or more (at most 40) until 50 fsyncs were seen: a child
    // on a loaded machine may be killed before its first small write.
    for round in 0..40u64 {
        if round >= 12 && synced_total >= 50 {
            break;
        }
        let mut child = Command::new(&exe)
            .args(["sync_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(SYNC_ENV, format!("{}:{round}", dir.path().display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.gen_range(200..900)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut last = None;
        for line in BufReader::new(stdout).lines() {
            if let Some(j) = line.unwrap().strip_prefix("SYNCED ") {
                last = Some(j.parse::<u64>().unwrap());
            }
        }
        let store = Store::open(dir.path()).unwrap();
        let report = store.fsck().unwrap();
        assert!(
            report.is_clean(),
            "round {round}: fsck: {:?}",
            report.problems
        );
        let Some(last) = last else { continue };
        synced_total += last;
        let dot = DotName::new("sync").unwrap();
        let fs = store.branch_fs(&dot, "master").unwrap();
        let a = fs.lookup(ROOT_INO, format!("r{round}").as_bytes()).unwrap();
        let got = fs.read(a.ino, 0, a.size as u32).unwrap();
        let synced = small_writes_state(round, last);
        assert!(
            got == synced || got == small_writes_state(round, last + 1),
            "round {round}: the file after fsync {last} was lost or torn ({} bytes, want {})",
            got.len(),
            synced.len()
        );
    }
    assert!(synced_total >= 50, "too few fsyncs: {synced_total}");
}

const WAL_ENV: &str = "DM_CRASH_WAL_CHILD";

/// The child of [`a_damaged_write_ahead_log_is_reported`]: three commits,
/// then waits to be killed.
#[test]
fn wal_child() {
    let Ok(dir) = std::env::var(WAL_ENV) else {
        return;
    };
    let store = Store::open(std::path::Path::new(&dir)).unwrap();
    let dot = DotName::new("wal").unwrap();
    store.create_dot(&dot, None).unwrap();
    let fs = store.branch_fs(&dot, "master").unwrap();
    for k in 0..3u64 {
        let name = format!("f{k}");
        let a = fs
            .mknod(ROOT_INO, name.as_bytes(), FileKind::File, 0o644, 0, 0, 0)
            .unwrap();
        fs.write(a.ino, 0, &content(k)).unwrap();
        fs.fsync(a.ino, false).unwrap();
        store
            .commit(
                &dot,
                "master",
                CommitRequest {
                    message: format!("c{k}"),
                    author: "wal".into(),
                    ..Default::default()
                },
            )
            .unwrap();
    }
    println!("READY");
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(60));
}

/// Bytes damaged in RocksDB's write-ahead log (the disk's fault, after a
/// crash) make its recovery stop at the damage and drop the changes from
/// there on: two synced commits and a whole dot went without a word, and
/// fsck said the store was fine. fsck now notes it.
#[test]
fn a_damaged_write_ahead_log_is_reported() {
    if std::env::var(WAL_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["wal_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(WAL_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // After the test harness's own lines.
    let ready = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .any(|l| l.ends_with("READY"));
    assert!(ready, "the child stopped before its commits");
    child.kill().unwrap(); // SIGKILL: the commits are in the log only
    child.wait().unwrap();
    // (crash_atomicity checks that an undamaged log after a kill is no
    // problem.)
    let notes = damage_wal_and_open(dir.path());
    assert!(
        notes.iter().any(|p| p.contains("did not close the store")),
        "{notes:?}"
    );
}

/// After a clean close, damage in the write-ahead log is the disk's, and
/// the note says that commits may be gone (after a run that did not close
/// the store, the torn end of a reused log file said so too: a user was
/// told "commits included, are gone" after a plain stop).
#[test]
fn a_write_ahead_log_damaged_after_a_clean_close_is_the_disks_fault() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        let dot = DotName::new("wal").unwrap();
        store.create_dot(&dot, None).unwrap();
        let fs = store.branch_fs(&dot, "master").unwrap();
        let a = fs
            .mknod(ROOT_INO, b"f", FileKind::File, 0o644, 0, 0, 0)
            .unwrap();
        fs.write(a.ino, 0, &content(1)).unwrap();
        fs.fsync(a.ino, false).unwrap();
    }
    let notes = damage_wal_and_open(dir.path());
    assert!(
        notes.iter().any(|p| p.contains("closed the store cleanly")),
        "{notes:?}"
    );
}

/// Damages the largest write-ahead log in the store at `dir`, as the disk
/// would, opens the store and returns fsck's notes.
fn damage_wal_and_open(dir: &std::path::Path) -> Vec<String> {
    let wal = std::fs::read_dir(dir.join("db"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .expect("a write-ahead log");
    let mut bytes = std::fs::read(&wal).unwrap();
    let at = bytes.len() * 3 / 4;
    for b in &mut bytes[at..at + 4] {
        *b ^= 0x5a;
    }
    std::fs::write(&wal, bytes).unwrap();
    let store = Store::open(dir).unwrap();
    let report = store.fsck().unwrap();
    assert!(
        report.notes.iter().any(|p| p.contains("write-ahead log")),
        "{:?}",
        report.notes
    );
    report.notes
}
