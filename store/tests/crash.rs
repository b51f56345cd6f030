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
    for round in 0..25 {
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
