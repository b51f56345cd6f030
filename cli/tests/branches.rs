//! The seed's branch example: A, B on master; checkout -b newbranch; C;
//! checkout master; D; checkout newbranch; E. The followed path shows the
//! current branch; pinned `dot@branch` mounts stay.

use dm_tests::{is_mounted, snapshot, write_synced, Server};
use std::path::{Path, PathBuf};

const DM: &str = env!("CARGO_BIN_EXE_dm");

fn commit_letter(s: &Server, mnt: &Path, letter: &str) {
    write_synced(&mnt.join(letter), letter.as_bytes());
    let mut history = std::fs::read(mnt.join("history")).unwrap_or_default();
    history.extend_from_slice(letter.as_bytes());
    write_synced(&mnt.join("history"), &history);
    s.ok(&["commit", "-m", letter]);
}

/// A process that sleeps for 60 s with `dir` as its working directory (a
/// shell left there).
fn sleeper_in(dir: &Path) -> std::process::Child {
    std::process::Command::new("sleep")
        .arg("60")
        .current_dir(dir)
        .spawn()
        .unwrap()
}

/// A server whose new dot `dot` is the current one, and the path of the
/// dot's mount.
fn server_with_dot(dot: &str) -> (Server, PathBuf) {
    let s = Server::start(DM);
    s.ok(&["init", dot]);
    s.ok(&["switch", dot]);
    let mnt = PathBuf::from(s.ok(&["mount", dot]).trim());
    (s, mnt)
}

fn files(mnt: &Path) -> Vec<String> {
    snapshot(mnt).into_keys().collect()
}

fn messages(s: &Server) -> Vec<String> {
    s.ok(&["log"])
        .lines()
        .filter_map(|l| l.strip_prefix("    "))
        .map(str::to_string)
        .collect()
}

#[test]
fn branch_example() {
    let (s, mnt) = server_with_dot("myapp");

    commit_letter(&s, &mnt, "A");
    let pinned_master = s.root().join("pinned-master");
    let out = s.ok(&["mount", "myapp@master", pinned_master.to_str().unwrap()]);
    assert_eq!(out.trim(), pinned_master.display().to_string());
    commit_letter(&s, &mnt, "B");

    s.ok(&["checkout", "-b", "newbranch"]);
    let branches = s.ok(&["branch"]);
    assert_eq!(branches, "  master\n* newbranch\n");
    commit_letter(&s, &mnt, "C");
    // The pinned mount still shows master.
    assert_eq!(files(&pinned_master), ["A", "B", "history"]);
    assert_eq!(std::fs::read(pinned_master.join("history")).unwrap(), b"AB");

    s.ok(&["checkout", "master"]);
    assert_eq!(files(&mnt), ["A", "B", "history"]);
    commit_letter(&s, &mnt, "D");
    let pinned_new = s.root().join("pinned-new");
    s.ok(&["mount", "myapp@newbranch", pinned_new.to_str().unwrap()]);

    s.ok(&["checkout", "newbranch"]);
    commit_letter(&s, &mnt, "E");

    // The followed path shows newbranch: A B C E.
    assert_eq!(files(&mnt), ["A", "B", "C", "E", "history"]);
    assert_eq!(std::fs::read(mnt.join("history")).unwrap(), b"ABCE");
    assert_eq!(messages(&s), ["A", "B", "C", "E"]);
    // Pinned mounts: master shows A B D, newbranch (pinned) follows its own commits.
    assert_eq!(files(&pinned_master), ["A", "B", "D", "history"]);
    assert_eq!(
        std::fs::read(pinned_master.join("history")).unwrap(),
        b"ABD"
    );
    assert_eq!(files(&pinned_new), ["A", "B", "C", "E", "history"]);

    s.ok(&["checkout", "master"]);
    assert_eq!(files(&mnt), ["A", "B", "D", "history"]);
    assert_eq!(messages(&s), ["A", "B", "D"]);
    assert!(is_mounted(&pinned_master) && is_mounted(&pinned_new));
    assert_eq!(files(&pinned_new), ["A", "B", "C", "E", "history"]);

    let show = s.ok(&["dot", "show"]);
    assert!(show.contains("newbranch (4 commits"), "{show}");
    assert!(show.contains("from master at"), "{show}");

    // Branch deletion: not the current one, not while pinned-mounted without -f.
    let err = s.fail(&["branch", "-d", "master"]);
    assert!(err.contains("master"), "{err}");
    let err = s.fail(&["branch", "-d", "newbranch"]);
    assert!(err.contains("newbranch"), "{err}");
    // A refused deletion unmounts nothing, -f or not.
    let err = s.fail(&["branch", "-d", "-f", "master"]);
    assert!(err.contains("current branch"), "{err}");
    assert!(is_mounted(&pinned_master));
    assert!(s
        .ok(&["dot", "show"])
        .contains(&pinned_master.display().to_string()));
    // A process (not a container) with a file open on the followed path
    // would go on with another branch's files under it: refused, nothing
    // made or switched.
    let held = std::fs::File::open(mnt.join("history")).unwrap();
    let err = s.fail(&["checkout", "-b", "scratch"]);
    assert!(
        err.contains(&format!(
            "(pid {}) has {}",
            std::process::id(),
            mnt.join("history").display()
        )) && err.contains("nothing was changed"),
        "{err}"
    );
    assert_eq!(s.ok(&["branch"]), "* master\n  newbranch\n");
    drop(held);
    s.ok(&["checkout", "-b", "scratch"]);
    s.ok(&["checkout", "master"]);
    let out = s.ok(&["branch", "-d", "scratch"]);
    assert!(out.starts_with("Deleted branch scratch (was "), "{out}");
    assert_eq!(s.ok(&["branch"]), "* master\n  newbranch\n");
    // A branch with commits no other branch has: -d refuses (as git's),
    // -D deletes.
    s.ok(&["checkout", "-b", "work"]);
    std::fs::write(mnt.join("work"), b"w").unwrap();
    s.ok(&["commit", "-m", "important work"]);
    s.ok(&["checkout", "master"]);
    let err = s.fail(&["branch", "-d", "work"]);
    assert!(
        err.contains("important work") && err.contains("dm branch -D work"),
        "{err}"
    );
    assert!(s.ok(&["branch"]).contains("work"));
    s.ok(&["branch", "-D", "work"]);
    assert_eq!(s.ok(&["branch"]), "* master\n  newbranch\n");

    // A reset moves a branch back along its own commits, or forward to a
    // commit that continues it; to another branch's commit it would
    // destroy D without a word (it did): refused, with the way to do it.
    let err = s.fail(&["reset", "--hard", "newbranch"]);
    assert!(
        err.contains("not in master's history")
            && err.contains("master would lose 1 commit it has (on no other branch)")
            && err.contains("then `dm reset --hard newbranch`"),
        "{err}"
    );
    assert_eq!(messages(&s), ["A", "B", "D"]);
    s.ok(&["checkout", "-b", "ahead"]);
    commit_letter(&s, &mnt, "F");
    s.ok(&["checkout", "master"]);
    let out = s.ok(&["reset", "--hard", "ahead"]);
    assert!(
        out.starts_with("HEAD is now at ") && out.trim_end().ends_with(" F"),
        "{out}"
    );
    assert_eq!(messages(&s), ["A", "B", "D", "F"]);
    let out = s.ok(&["reset", "--hard", "HEAD^^"]);
    // D and F left master, but branch ahead has them: nothing destroyed.
    assert!(
        out.trim_end()
            .ends_with(" B (2 later commits left it; other branches have them)"),
        "{out}"
    );
    assert_eq!(messages(&s), ["A", "B"]);
    // newbranch grew from master at B; reset to A, it grows from A (dot
    // show named B, a commit it no longer had).
    s.ok(&["checkout", "newbranch"]);
    let a = s.ok(&["log"]).lines().next().unwrap()["commit ".len()..].to_string();
    // B is on master still; C and E were only here.
    let out = s.ok(&["reset", "--hard", &a]);
    assert!(
        out.trim_end()
            .ends_with("(3 later commits left it; 2 of them, on no other branch, destroyed)"),
        "{out}"
    );
    let show = s.ok(&["dot", "show"]);
    assert!(
        show.contains(&format!("from master at {}", &a[..7])),
        "{show}"
    );
    s.ok(&["checkout", "master"]);

    // Unmount a pinned mount.
    s.ok(&["unmount", pinned_new.to_str().unwrap()]);
    assert!(!is_mounted(&pinned_new));
}

/// Reads `path` until it holds `want` (up to 20 s, on a loaded machine): other mounts of a branch
/// drop their cached pages a moment after a write returns.
fn eventually_reads(path: &Path, want: &[u8]) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let got = std::fs::read(path).unwrap_or_default();
        if got == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} shows {:?}, want {:?}",
            path.display(),
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(want)
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn every_mount_of_a_branch_shows_live_writes() {
    let s = Server::start(DM);
    s.ok(&["init", "shared"]);
    let followed = PathBuf::from(s.ok(&["mount", "shared"]).trim());
    let pinned = s.root().join("pinned");
    s.ok(&["mount", "shared@master", pinned.to_str().unwrap()]);
    let host = s.root().join("host");
    s.ok(&["mount", "shared", host.to_str().unwrap()]);

    std::fs::write(followed.join("conf"), b"port=5432").unwrap();
    // Every mount reads it (and caches its pages and attributes).
    for m in [&followed, &pinned, &host] {
        eventually_reads(&m.join("conf"), b"port=5432");
    }
    // Same-size overwrites and an append, each through another mount.
    std::fs::write(pinned.join("conf"), b"port=6543").unwrap();
    eventually_reads(&followed.join("conf"), b"port=6543");
    eventually_reads(&host.join("conf"), b"port=6543");
    std::fs::write(host.join("conf"), b"port=7777\nmax=9").unwrap();
    eventually_reads(&followed.join("conf"), b"port=7777\nmax=9");
    eventually_reads(&pinned.join("conf"), b"port=7777\nmax=9");
    std::fs::remove_file(followed.join("conf")).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while pinned.join("conf").exists() || host.join("conf").exists() {
        assert!(std::time::Instant::now() < deadline, "unlink not seen");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// `dm commit` racing `dm reset --hard HEAD`: every commit the CLI
/// acknowledged stays in the log (a reset whose HEAD was resolved before a
/// commit threw the commit away).
#[test]
fn commits_racing_resets_to_head_are_never_lost() {
    let s = Server::start(DM);
    s.ok(&["init", "race"]);
    s.ok(&["switch", "race"]);
    s.ok(&["commit", "-m", "base"]);
    let committed = std::thread::scope(|scope| {
        let resets = scope.spawn(|| {
            for _ in 0..25 {
                // Refused now and then ("moved while the reset..."): fine.
                let _ = s.dm(&["reset", "--hard", "HEAD"]);
            }
        });
        let mut ids = Vec::new();
        for i in 0..25 {
            let out = s.dm(&["commit", "-m", &format!("c{i}")]);
            if out.status.success() {
                ids.push(String::from_utf8_lossy(&out.stdout).trim().to_string());
            }
        }
        resets.join().unwrap();
        ids
    });
    assert!(!committed.is_empty());
    let log = s.ok(&["log"]);
    for id in &committed {
        assert!(log.contains(id.as_str()), "commit {id} was lost:\n{log}");
    }
}

/// `dm branch NAME` makes a branch at the current head and stays on the
/// current branch, as git does; `--dot DOT@BRANCH` says how to reach a
/// branch instead of calling the name invalid.
#[test]
fn branch_name_makes_a_branch_without_switching() {
    let s = Server::start(DM);
    s.ok(&["init", "app"]);
    s.ok(&["switch", "app"]);
    s.ok(&["commit", "-m", "one"]);
    s.ok(&["branch", "feature"]);
    let list = s.ok(&["branch"]);
    assert!(
        list.contains("* master") && list.contains("feature"),
        "{list}"
    );
    let err = s.fail(&["branch", "feature"]);
    assert!(err.contains("exists"), "{err}");
    s.ok(&["checkout", "feature"]);
    assert!(s.ok(&["log"]).contains("one"));
    let err = s.fail(&["--dot", "app@master", "log"]);
    assert!(err.contains("dm checkout master"), "{err}");
}

/// `dm log` as git users type it: another branch's log without switching,
/// `-n N` for the N latest commits, `--oneline`, `dm log HEAD^`.
#[test]
fn log_of_a_branch_latest_commits_one_line_each() {
    let s = Server::start(DM);
    s.ok(&["init", "app"]);
    s.ok(&["switch", "app"]);
    // No commit yet: said (on stderr), as git says it.
    let out = s.dm(&["log"]);
    assert!(out.status.success() && out.stdout.is_empty(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err, "branch master of dot app has no commits yet\n");
    for m in ["one", "two"] {
        s.ok(&["commit", "-m", m]);
    }
    s.ok(&["checkout", "-b", "feature"]);
    s.ok(&["commit", "-m", "three\n\nbody"]);
    s.ok(&["checkout", "master"]);
    let ids: Vec<String> = s
        .ok(&["log", "feature"])
        .lines()
        .filter_map(|l| l.strip_prefix("commit "))
        .map(str::to_string)
        .collect();
    assert_eq!(ids.len(), 3);
    assert_eq!(
        messages(&s),
        ["one", "two"],
        "the current branch stays master"
    );
    let one = s.ok(&["log", "--oneline", "-n", "2", "feature"]);
    assert_eq!(
        one,
        format!("{} two\n{} three\n", &ids[1][..12], &ids[2][..12])
    );
    let last = s.ok(&["log", "--max-count", "1"]);
    assert!(last.contains("    two") && !last.contains("one"), "{last}");
    assert_eq!(s.ok(&["log", "-n", "0"]), "");
    let err = s.fail(&["log", "nope"]);
    assert!(
        err.contains("branch nope not found in dot app (branches: feature, master)")
            && err.contains("nor is it a revision"),
        "{err}"
    );
    // A revision: the current branch's commits up to it, as `git log REV`.
    assert_eq!(
        s.ok(&["log", "--oneline", "HEAD^"]),
        format!("{} one\n", &ids[0][..12])
    );
    assert_eq!(s.ok(&["log", "--oneline", &ids[1][..8]]).lines().count(), 2);
    assert_eq!(
        s.ok(&["log", "--oneline", "-n", "1", &ids[1][..8]]),
        format!("{} two\n", &ids[1][..12])
    );
    // Another branch's commit: its history up to it, as `git log REV`
    // (it was refused as not on the current branch).
    let feature = s.ok(&["log", "--oneline", "feature"]);
    assert_eq!(s.ok(&["log", "--oneline", &ids[2][..8]]), feature);
    assert_eq!(s.ok(&["log", "--oneline", "feature~0"]), feature);
    // A revision past the first commit is named as one (it was called an
    // invalid branch name), and so is `HEAD@{1}` (which dm lacks).
    let err = s.fail(&["log", "HEAD~99"]);
    assert!(err.contains("no commit matches HEAD~99"), "{err}");
    let err = s.fail(&["log", "HEAD@{1}"]);
    assert!(!err.contains("invalid branch name"), "{err}");
}

/// `O_APPEND` writes land at the end of the file as dm knows it, not at
/// the size the kernel cached: a log writer that keeps its file open
/// across `dm reset --hard` appends right after the reset content (it
/// wrote at the old end, and the next commit kept a hole of zeros), and
/// appenders on two mounts of the same branch never overwrite or split
/// each other's records.
#[test]
fn o_append_writes_at_the_end_dm_knows() {
    use std::io::Write;
    let (s, mnt) = server_with_dot("logs");
    let log = mnt.join("log");
    write_synced(&log, b"base\n");
    s.ok(&["commit", "-m", "base"]);
    let append = |p: &Path| std::fs::OpenOptions::new().append(true).open(p).unwrap();
    let mut f = append(&log);
    f.write_all(&[b'x'; 100_000]).unwrap();
    f.sync_all().unwrap();
    let out = s.dm(&["reset", "--hard", "HEAD"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success()
            && err.contains("1 file was held open on")
            && err.contains("writes it back, also as it stops")
            && err.contains("then run `dm reset --hard ")
            && err.contains("` again"),
        "{err}"
    );
    // Named, with the pid to stop it by (a database's own stop command
    // reads a PID file that is the reset's by then).
    let me = std::process::id();
    assert!(
        err.contains(&format!(" (pid {me}) across the reset"))
            && err.contains(&format!("`kill {me}`")),
        "{err}"
    );
    f.write_all(b"after\n").unwrap();
    f.sync_all().unwrap();
    drop(f);
    let got = std::fs::read(&log).unwrap();
    assert!(
        got == b"base\nafter\n",
        "{} bytes, {} of them zeros",
        got.len(),
        got.iter().filter(|b| **b == 0).count()
    );
    s.ok(&["commit", "-m", "after"]);
    // Whole pages appended across a reset, read back at once through the
    // same mount: its kernel cached them where it thought the end was.
    let mut f = append(&log);
    // A reset to the state the branch has changes nothing under the file
    // held open: no warning to stop a database and reset again.
    let out = s.dm(&["reset", "--hard", "HEAD"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.is_empty(), "{err}");
    f.write_all(&[b'y'; 64 << 10]).unwrap();
    f.sync_all().unwrap();
    s.ok(&["reset", "--hard", "HEAD"]);
    let pages: Vec<u8> = (0..3 << 14).map(|i| (i % 251) as u8 + 1).collect();
    f.write_all(&pages).unwrap();
    let mut want = b"base\nafter\n".to_vec();
    want.extend_from_slice(&pages);
    let got = std::fs::read(&log).unwrap();
    assert!(got == want, "{} bytes, want {}", got.len(), want.len());
    drop(f);
    s.ok(&["reset", "--hard", "HEAD"]);

    // Two mounts of master, one appender on each, taking turns.
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other");
    s.ok(&["mount", "logs@master", other.to_str().unwrap()]);
    let (mut a, mut b) = (append(&log), append(&other.join("log")));
    let mut want = b"base\nafter\n".to_vec();
    for i in 0..50 {
        let (f, line) = match i % 2 {
            0 => (&mut a, format!("a{i}\n")),
            _ => (&mut b, format!("b{i}\n")),
        };
        f.write_all(line.as_bytes()).unwrap();
        want.extend_from_slice(line.as_bytes());
    }
    a.sync_all().unwrap();
    b.sync_all().unwrap();
    // (Through the first mount, which learns of b's writes a moment after.)
    eventually_reads(&log, &want);
    drop(b);

    // Both at once, records of 59 bytes: many cross a page boundary of the
    // kernel's (stale) idea of the end, where a page-cache write is sent
    // as two requests, and the other mount's record landed between the
    // halves. Each write(2) must stay one record.
    let (records, len) = (1500, 59);
    std::thread::scope(|scope| {
        for (tag, p) in [('A', log.clone()), ('B', other.join("log"))] {
            scope.spawn(move || {
                let mut f = append(&p);
                for i in 0..records {
                    let line = format!("{tag}{i:05} {}\n", "x".repeat(len - 8));
                    assert_eq!(f.write(line.as_bytes()).unwrap(), len);
                }
            });
        }
    });
    let whole = want.len() + 2 * records * len;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut got = std::fs::read(&log).unwrap();
    while got.len() != whole && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
        got = std::fs::read(&log).unwrap();
    }
    let tail = String::from_utf8_lossy(&got[want.len()..]).into_owned();
    let torn: Vec<&str> = tail
        .lines()
        .filter(|l| l.len() != len - 1 || !l.ends_with('x'))
        .collect();
    assert!(
        torn.is_empty() && tail.len() == 2 * records * len,
        "{} of {} records torn, {} bytes appended (want {}), first: {:?}",
        torn.len(),
        2 * records,
        tail.len(),
        2 * records * len,
        torn.first()
    );
    s.ok(&["unmount", other.to_str().unwrap()]);
}

/// A file discarded by a reset is gone from the working state before the
/// kernel's caches hear of it. An `open(O_CREAT)` of its path in that
/// window reached the old inode and failed with ENOENT; the server now says
/// ESTALE, so the kernel looks the path up again and creates the file.
#[test]
fn creates_racing_resets_never_fail() {
    let (s, mnt) = server_with_dot("creates");
    write_synced(&mnt.join("base"), b"base");
    s.ok(&["commit", "-m", "base"]);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let made = std::sync::atomic::AtomicU64::new(0);
    let (creates, errors) = std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            use std::io::Write;
            let (mut n, mut errors) = (0u64, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let p = mnt.join(format!("f{}", n % 10));
                n += 1;
                made.store(n, std::sync::atomic::Ordering::Relaxed);
                let opened = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&p);
                let r = match opened {
                    Ok(mut f) => f
                        .write_all(&[b'x'; 100])
                        .and_then(|_| f.sync_all())
                        .map_err(|e| ("write", e)),
                    Err(e) => Err(("open", e)),
                };
                if let Err((op, e)) = r {
                    errors.push((op, format!("{op} {}: {e}", p.display()), e.raw_os_error()));
                }
            }
            (n, errors)
        });
        // 30 resets, and more (at most 300) until 100 creates raced them.
        for i in 0.. {
            if i >= 300 || (i >= 30 && made.load(std::sync::atomic::Ordering::Relaxed) > 100) {
                break;
            }
            s.ok(&["reset", "--hard", "HEAD"]);
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.join().unwrap()
    });
    assert!(creates > 100, "only {creates} creates");
    // A write through a descriptor whose file a reset discarded may fail,
    // with ESTALE; an open(O_CREAT) of the path may not fail at all.
    let wrong: Vec<_> = errors
        .iter()
        .filter(|(op, _, errno)| *op == "open" || *errno != Some(libc::ESTALE))
        .map(|(_, e, _)| e)
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {creates} creates failed: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
}

/// Deleting a dot or a branch never takes a mount from under a process
/// with files open there (a PostgreSQL started on the host lost its
/// files), even with -f / -D: refused, naming the path, until the process
/// is gone or the mount is detached on purpose (`dm unmount --force`).
#[test]
fn deletes_refuse_mounts_with_files_open() {
    let (s, mnt) = server_with_dot("busy");
    write_synced(&mnt.join("base"), b"base");
    s.ok(&["commit", "-m", "base"]);
    s.ok(&["branch", "exp"]);
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("exp");
    s.ok(&["mount", "busy@exp", exp.to_str().unwrap()]);

    let held = std::fs::File::open(exp.join("base")).unwrap();
    let err = s.fail(&["branch", "-D", "exp"]);
    assert!(
        err.contains("open on") && err.contains(exp.to_str().unwrap()),
        "{err}"
    );
    assert!(s.ok(&["branch"]).contains("exp"));
    assert!(is_mounted(&exp));
    drop(held);
    s.ok(&["branch", "-D", "exp"]);
    assert!(!s.ok(&["branch"]).contains("exp"));

    let held = std::fs::File::open(mnt.join("base")).unwrap();
    let err = s.fail(&["dot", "delete", "-f", "busy"]);
    assert!(
        err.contains("open on") && err.contains("unmount --force"),
        "{err}"
    );
    assert!(s.ok(&["list"]).contains("busy"));
    assert_eq!(std::fs::read(mnt.join("base")).unwrap(), b"base");
    drop(held);
    assert_eq!(
        s.ok(&["dot", "delete", "-f", "busy"]),
        "Deleted dot busy (1 branch).\n"
    );
    assert!(!s.ok(&["list"]).contains("busy"));
}

/// Unlike git, `dm checkout -b` leaves uncommitted changes on the branch
/// they were made on; the CLI says so (a dot with no commit gave an empty
/// new branch without a word, and the data seemed gone).
#[test]
fn checkout_b_says_uncommitted_changes_stay() {
    let (s, mnt) = server_with_dot("notes");
    write_synced(&mnt.join("draft"), b"draft");
    let out = s.dm(&["checkout", "-b", "feat"]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("uncommitted changes on master stay there")
            && err.contains("starts empty")
            && err.contains("dm checkout master"),
        "{err}"
    );
    assert!(!mnt.join("draft").exists());
    s.ok(&["checkout", "master"]);
    assert_eq!(std::fs::read(mnt.join("draft")).unwrap(), b"draft");
    // Committed: the new branch starts there, and nothing more is said.
    s.ok(&["commit", "-m", "draft"]);
    let out = s.dm(&["checkout", "-b", "clean"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "Switched to a new branch 'clean'\n"
    );
    // No file open: a hard reset has nothing to warn about.
    let out = s.dm(&["reset", "--hard", "HEAD"]);
    assert!(out.status.success() && out.stderr.is_empty(), "{out:?}");
    assert_eq!(std::fs::read(mnt.join("draft")).unwrap(), b"draft");
}

/// What a git user types: `checkout -b NAME START`, `branch NAME START`,
/// `checkout` of a commit id (dm has no detached HEAD: it says how to
/// branch there), `checkout` of the current branch, several `-m`, a
/// message starting with `-`; each says what it did.
#[test]
fn checkout_branch_and_commit_as_git_users_type_them() {
    let (s, mnt) = server_with_dot("g");
    commit_letter(&s, &mnt, "A");
    let a = s.ok(&["log"]).lines().next().unwrap()["commit ".len()..].to_string();
    commit_letter(&s, &mnt, "B");
    let stderr = |args: &[&str]| {
        let out = s.dm(args);
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    assert_eq!(stderr(&["checkout", "master"]), "Already on 'master'\n");
    let err = s.fail(&["checkout", "-"]);
    assert!(err.contains("no previous branch in dot g"), "{err}");

    let err = s.fail(&["checkout", &a[..8]]);
    assert!(
        err.contains(&format!("{} is commit {}", &a[..8], &a[..12]))
            && err.contains(&format!("dm checkout -b NAME {}", &a[..8])),
        "{err}"
    );
    assert!(!s.ok(&["branch"]).contains(&a[..8]), "a branch was made");
    let err = s.fail(&["reset", "--hard", "ab"]);
    assert!(err.contains("at least 4 hex digits"), "{err}");

    assert_eq!(
        stderr(&["checkout", "-b", "old", &a[..8]]),
        "Switched to a new branch 'old'\n"
    );
    assert_eq!(files(&mnt), ["A", "history"]);
    assert_eq!(messages(&s), ["A"]);
    let show = s.ok(&["dot", "show"]);
    assert!(
        show.contains(&format!("old (1 commit, head {}", &a[..7])),
        "{show}"
    );
    // A branch at another branch's head, without switching: it grew from
    // that branch (the current one, old, lacks B).
    s.ok(&["branch", "atb", "master"]);
    s.ok(&["checkout", "atb"]);
    assert_eq!(files(&mnt), ["A", "B", "history"]);
    let show = s.ok(&["dot", "show"]);
    assert!(
        show.contains("atb (2 commits") && show.contains(", from master at"),
        "{show}"
    );
    // Named as START, a branch is where the new one grew from, even when
    // the current branch (atb) has the same head.
    s.ok(&["branch", "w4", "master"]);
    let show = s.ok(&["dot", "show"]);
    assert!(
        show.lines()
            .any(|l| l.contains("w4 (") && l.contains("from master at")),
        "{show}"
    );
    let err = s.fail(&["checkout", "HEAD~1"]);
    assert!(
        err.contains("HEAD~1 is commit") && err.contains("no detached HEAD"),
        "{err}"
    );
    let err = s.fail(&["mount", "g@nosuch"]);
    assert!(
        err.contains("dm branch NAME") && !err.contains("dm init"),
        "{err}"
    );
    let err = s.fail(&["checkout", "-b", "bad", "nosuchrev"]);
    assert!(err.contains("nosuchrev"), "{err}");
    // A missing branch is offered to be made, unless its name could not
    // be a new branch's.
    let err = s.fail(&["checkout", "nosuch"]);
    assert!(err.contains("`dm checkout -b nosuch`"), "{err}");
    let err = s.fail(&["checkout", "head"]);
    assert!(
        err.contains("not found") && !err.contains("checkout -b"),
        "{err}"
    );
    assert!(!s.ok(&["branch"]).contains("bad"));
    // git's `checkout -`: back to the branch checked out before (old, then
    // atb again); a deleted one is not offered.
    assert_eq!(stderr(&["checkout", "-"]), "Switched to branch 'old'\n");
    assert_eq!(files(&mnt), ["A", "history"]);
    assert_eq!(stderr(&["checkout", "-"]), "Switched to branch 'atb'\n");
    assert_eq!(files(&mnt), ["A", "B", "history"]);
    s.ok(&["checkout", "w4"]);
    s.ok(&["checkout", "atb"]);
    s.ok(&["branch", "-D", "w4"]);
    let err = s.fail(&["checkout", "-"]);
    assert!(
        err.contains("no previous branch") && err.contains("deleted"),
        "{err}"
    );

    // Plain checkout away from uncommitted changes says they stay.
    write_synced(&mnt.join("draft"), b"d");
    let err = stderr(&["checkout", "old"]);
    assert!(
        err.starts_with("Switched to branch 'old'\n")
            && err.contains("uncommitted changes on atb stay there"),
        "{err}"
    );

    // Several -m are paragraphs; a message may start with '-'; a value
    // with a newline stays indented in the log; a key twice is refused.
    write_synced(&mnt.join("fix"), b"f");
    s.ok(&[
        "commit",
        "-m",
        "-fix",
        "-m",
        "",
        "-m",
        "why it broke",
        "-d",
        "note=one\ntwo",
    ]);
    let log = s.ok(&["log"]);
    assert!(
        log.contains("note: one\n    two\n\n    -fix\n    \n    why it broke\n"),
        "{log}"
    );
    let err = s.fail(&["commit", "-m", "x", "-d", "k=1", "-d", "k=2"]);
    assert!(err.contains("given twice"), "{err}");
}

/// `dm commit --branch B` commits a branch other than the current one:
/// what a pinned `dot@B` mount (a container's, a second database's) wrote,
/// without checking B out (refused while the current branch's database
/// holds files open).
#[test]
fn commit_of_a_branch_that_is_not_current() {
    let (s, mnt) = server_with_dot("myapp");
    commit_letter(&s, &mnt, "A");
    s.ok(&["branch", "side"]);
    let side = s.root().join("side");
    s.ok(&["mount", "myapp@side", side.to_str().unwrap()]);
    write_synced(&side.join("S"), b"S");
    write_synced(&mnt.join("wip"), b"not committed on master");
    let held = std::fs::File::open(mnt.join("wip")).unwrap();
    s.ok(&["commit", "--branch", "side", "-m", "S"]);
    drop(held);
    let log = s.ok(&["log", "side", "--oneline"]);
    assert!(log.lines().last().unwrap().ends_with(" S"), "{log}");
    assert_eq!(s.ok(&["branch"]).lines().next(), Some("* master"));
    assert!(s.ok(&["status"]).contains("wip"), "master's work stays");
    assert_eq!(messages(&s), ["A"]);
    let err = s.fail(&["commit", "--branch", "nosuch", "-m", "x"]);
    assert!(
        err.contains("branch nosuch not found in dot myapp") && err.contains("side"),
        "{err}"
    );
}

/// Two checkouts at once: each says what it did as the server ran it. A
/// checkout of the current branch that ran after the other switched away
/// switches back, and says "Switched", not "Already on" (it said "Already
/// on 'feat'" while the dot ended on feat after the other said it switched
/// to ahead).
#[test]
fn racing_checkouts_each_say_what_they_did() {
    let s = Server::start(DM);
    s.ok(&["init", "race"]);
    s.ok(&["switch", "race"]);
    s.ok(&["commit", "-m", "a"]);
    s.ok(&["branch", "ahead"]);
    s.ok(&["checkout", "-b", "feat"]);
    for _ in 0..20 {
        let spawn = |b: &str| {
            s.dm_command(&["checkout", b])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        };
        let (stay, away) = (spawn("feat"), spawn("ahead"));
        let stay = stay.wait_with_output().unwrap();
        let away = away.wait_with_output().unwrap();
        assert!(stay.status.success() && away.status.success());
        let stay = String::from_utf8_lossy(&stay.stderr).to_string();
        let away = String::from_utf8_lossy(&away.stderr).to_string();
        assert!(away.contains("Switched to branch 'ahead'"), "{away}");
        let branches = s.ok(&["branch"]);
        if branches.contains("* feat") {
            // ahead ran first, feat switched back.
            assert!(stay.contains("Switched to branch 'feat'"), "{stay}");
        } else {
            assert!(branches.contains("* ahead"), "{branches}");
            assert!(stay.contains("Already on 'feat'"), "{stay}");
            s.ok(&["checkout", "feat"]);
        }
    }
}

/// A process working in a directory of a mount (a shell, make, git) keeps
/// its working directory across a reset or checkout that leaves that
/// directory where it was: every reset and checkout made it "(deleted)"
/// (getcwd: ENOENT; git refused to run) until something looked it up by
/// name again. Nor is a mount a process works in unmounted under it.
#[test]
fn working_directories_survive_resets_and_checkouts() {
    let (s, mnt) = server_with_dot("cwd");
    s.ok(&["commit", "-m", "empty"]);
    let dir = mnt.join("sub/deeper");
    std::fs::create_dir_all(&dir).unwrap();
    write_synced(&mnt.join("sub/f"), b"1");
    s.ok(&["commit", "-m", "one"]);
    s.ok(&["branch", "other"]);
    let mut child = sleeper_in(&dir);
    let cwd = |pid: u32| std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap();
    let pid = child.id();
    for step in [
        &["reset", "--hard", "HEAD"][..],
        &["checkout", "other"],
        &["checkout", "master"],
        &["reset", "HEAD"],
    ] {
        s.ok(step);
        assert_eq!(cwd(pid), dir, "after {step:?}");
    }
    // Gone from the state reset to: deleted, as it is.
    s.ok(&["reset", "--hard", "HEAD^"]);
    assert!(
        cwd(pid).to_string_lossy().ends_with("(deleted)"),
        "{:?}",
        cwd(pid)
    );
    child.kill().unwrap();
    child.wait().unwrap();
    // `dm unmount` of a mount a process works in (no file open) is refused
    // (it was detached lazily, and the process went on changing the dot).
    let user = s.root().join("user-mount");
    s.ok(&["mount", "cwd", user.to_str().unwrap()]);
    let mut shell = sleeper_in(&user);
    let err = s.fail(&["unmount", user.to_str().unwrap()]);
    assert!(err.contains("in use") && err.contains("--force"), "{err}");
    assert!(is_mounted(&user));
    // --force detaches it, and says so without blaming a process the
    // server cannot see (it named the process a moment before).
    let out = s.dm(&["unmount", "--force", user.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.contains("was still in use: it was detached lazily"),
        "{err}"
    );
    assert!(!is_mounted(&user));
    shell.kill().unwrap();
    shell.wait().unwrap();
}

/// A dot whose branch `p` has a committed file `pf`, checked out on
/// master with a new file `u` open (read and append) that master numbered
/// as `p` numbered `pf` (each branch numbers its new files on its own).
fn open_on_the_number_of_pf(dot: &str) -> (Server, PathBuf, std::fs::File) {
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;
    let (s, mnt) = server_with_dot(dot);
    s.ok(&["commit", "-m", "base"]);
    s.ok(&["checkout", "-b", "p"]);
    write_synced(&mnt.join("pf"), b"p-data\n");
    s.ok(&["commit", "-m", "p"]);
    let pf_ino = std::fs::metadata(mnt.join("pf")).unwrap().ino();
    s.ok(&["checkout", "master"]);
    let mut u = std::fs::OpenOptions::new()
        .create_new(true)
        .read(true)
        .append(true)
        .open(mnt.join("u"))
        .unwrap();
    u.write_all(b"u-data\n").unwrap();
    assert_eq!(
        u.metadata().unwrap().ino(),
        pf_ino,
        "the scenario needs u to get pf's number"
    );
    (s, mnt, u)
}

/// A descriptor of a file a reset discarded stays stale (ESTALE) even once
/// a later reset brings a file of the same inode number (each branch
/// numbers its new files on its own): its writes landed in that other
/// file.
#[test]
fn a_descriptor_a_reset_made_stale_never_reaches_another_file() {
    use std::io::Write;
    let (s, mnt, mut u) = open_on_the_number_of_pf("revive");
    s.ok(&["reset", "--hard", "HEAD"]);
    assert_eq!(
        u.write_all(b"x").unwrap_err().raw_os_error(),
        Some(libc::ESTALE)
    );
    // Forward to p: pf, number and all.
    s.ok(&["reset", "--hard", "p"]);
    let err = u.write_all(b"LANDS-IN-PF\n").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ESTALE), "{err}");
    assert_eq!(std::fs::read(mnt.join("pf")).unwrap(), b"p-data\n");
    // The file itself opens and writes as usual.
    write_synced(&mnt.join("pf"), b"p-data\nmore\n");
    drop(u);
    assert_eq!(std::fs::read(mnt.join("pf")).unwrap(), b"p-data\nmore\n");
}

/// A reset onto another branch's commit brings that branch's files under
/// the numbers it gave them, on its own: a descriptor of a file the reset
/// discards gets ESTALE also where the reset gives its number to another
/// file (its writes, truncates and mmap stores landed in that file).
#[test]
fn a_reset_onto_another_branch_keeps_old_descriptors_out_of_its_files() {
    use std::os::unix::fs::FileExt;
    let (s, mnt, fb) = open_on_the_number_of_pf("forward");
    s.ok(&["reset", "--hard", "p"]);
    let err = fb.write_at(b"OVERWRITE", 0).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ESTALE), "{err}");
    let err = fb.set_len(1).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ESTALE), "{err}");
    drop(fb);
    assert_eq!(std::fs::read(mnt.join("pf")).unwrap(), b"p-data\n");
    let status = s.ok(&["status"]);
    assert!(!status.contains("__default__/pf"), "{status}");
}

/// An `fchmod` through a stale descriptor racing the reset never reaches
/// the file that takes its number: the one that raced it (sent by inode,
/// between the reset and the mount's switch) changed that file's mode.
#[test]
fn fchmod_racing_a_reset_never_reaches_the_file_that_takes_its_number() {
    use std::os::unix::fs::PermissionsExt;
    let (s, mnt, u) = open_on_the_number_of_pf("chmodrace");
    let looper = dm_tests::FchmodLoop::start(u);
    s.ok(&["reset", "--hard", "p"]);
    let (n, err) = looper.finish();
    assert!(
        n > 0 && err == Some(libc::ESTALE),
        "{n} calls, then {err:?}"
    );
    let mode = std::fs::metadata(mnt.join("pf"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o644, "pf's mode changed");
    let status = s.ok(&["status"]);
    assert!(!status.contains("__default__/pf"), "{status}");
}

/// A working directory, and a descriptor, that a checkout leaves on a
/// number the new branch gives another file never reach that file: each
/// branch numbers its new files on its own, and a shell left in a
/// directory of one branch created its files in the other branch's
/// directory of the same number.
#[test]
fn a_working_directory_a_checkout_removed_never_reaches_another_branch() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let (s, mnt) = server_with_dot("numbers");
    s.ok(&["commit", "-m", "base"]);
    s.ok(&["checkout", "-b", "a"]);
    std::fs::create_dir(mnt.join("on-a")).unwrap();
    s.ok(&["commit", "-m", "a"]);
    let a_ino = std::fs::metadata(mnt.join("on-a")).unwrap().ino();
    s.ok(&["checkout", "master"]);
    s.ok(&["checkout", "-b", "b"]);
    std::fs::create_dir(mnt.join("on-b")).unwrap();
    write_synced(&mnt.join("on-b/notes"), b"b\n");
    s.ok(&["commit", "-m", "b"]);
    assert_eq!(
        std::fs::metadata(mnt.join("on-b")).unwrap().ino(),
        a_ino,
        "the scenario needs on-b to get on-a's number"
    );
    let mut shell = sleeper_in(&mnt.join("on-b"));
    let cwd = PathBuf::from(format!("/proc/{}/cwd", shell.id()));
    s.ok(&["checkout", "a"]);
    let err = std::fs::write(cwd.join("stray"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ESTALE), "{err}");
    let listing = std::fs::read_dir(&cwd).and_then(|d| d.collect::<Result<Vec<_>, _>>());
    assert!(listing.is_err(), "{listing:?}");
    let on_a: Vec<_> = std::fs::read_dir(mnt.join("on-a"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(on_a.is_empty(), "{on_a:?}");
    // The directory of branch a works by its path, under another number.
    write_synced(&mnt.join("on-a/mine"), b"a\n");
    std::fs::set_permissions(mnt.join("on-a"), std::fs::Permissions::from_mode(0o750)).unwrap();
    assert!(s.ok(&["status"]).contains("/__default__/on-a/mine"));
    shell.kill().unwrap();
    shell.wait().unwrap();
    // Back on b, a new shell there works as usual.
    s.ok(&["commit", "-m", "mine"]);
    s.ok(&["checkout", "b"]);
    assert_eq!(std::fs::read(mnt.join("on-b/notes")).unwrap(), b"b\n");
    assert!(!mnt.join("on-b/stray").exists());
    write_synced(&mnt.join("on-b/more"), b"more\n");
    assert!(s.ok(&["status"]).contains("/__default__/on-b/more"));
    // A directory the branch checked out removed (it still remembers it
    // as removed, and listed it empty) is dead too.
    std::fs::create_dir(mnt.join("on-b/sub")).unwrap();
    s.ok(&["commit", "-m", "sub"]);
    s.ok(&["checkout", "-b", "nosub"]);
    std::fs::remove_dir(mnt.join("on-b/sub")).unwrap();
    s.ok(&["commit", "-m", "no sub"]);
    s.ok(&["checkout", "b"]);
    let mut shell = sleeper_in(&mnt.join("on-b/sub"));
    let cwd = PathBuf::from(format!("/proc/{}/cwd", shell.id()));
    s.ok(&["checkout", "nosub"]);
    let err = std::fs::write(cwd.join("x"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ESTALE), "{err}");
    shell.kill().unwrap();
    shell.wait().unwrap();
}

/// A reset that brings back a file deleted while open (or replaced by a
/// save by rename) gives the old descriptor ESTALE: it wrote into the
/// restored file. A directory removed while the kernel still held it (a
/// file in it open, or a shell's working directory) comes back usable on
/// the same mount: the kernel kept it as dead, listed nothing and created
/// nothing in it, until the mount was made again.
#[test]
fn a_reset_brings_back_files_and_directories_deleted_while_in_use() {
    use std::io::Write;
    let (s, mnt) = server_with_dot("undelete");
    write_synced(&mnt.join("f"), b"committed\n");
    std::fs::create_dir(mnt.join("logs")).unwrap();
    write_synced(&mnt.join("logs/app.log"), b"line 1\n");
    s.ok(&["commit", "-m", "base"]);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(mnt.join("f"))
        .unwrap();
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(mnt.join("logs/app.log"))
        .unwrap();
    std::fs::remove_file(mnt.join("f")).unwrap();
    std::fs::remove_dir_all(mnt.join("logs")).unwrap();
    s.ok(&["reset", "--hard", "HEAD"]);
    let err = f.write_all(b"via the deleted file\n").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ESTALE), "{err}");
    let err = log.write_all(b"line 2\n").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ESTALE), "{err}");
    assert_eq!(std::fs::read(mnt.join("f")).unwrap(), b"committed\n");
    // Nor do changes of its metadata (the kernel sends those by inode, not
    // by descriptor): fchmod changed the file brought back.
    let mode = std::fs::metadata(mnt.join("f")).unwrap().permissions();
    let err = f
        .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ESTALE), "{err}");
    assert_eq!(
        std::fs::metadata(mnt.join("f")).unwrap().permissions(),
        mode
    );
    let names: Vec<_> = std::fs::read_dir(mnt.join("logs"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["app.log"]);
    assert_eq!(
        std::fs::read(mnt.join("logs/app.log")).unwrap(),
        b"line 1\n"
    );
    write_synced(&mnt.join("logs/new.log"), b"new\n");
    drop((f, log));
    assert!(s.ok(&["status"]).contains("A  /__default__/logs/new.log"));
    // A directory that was a shell's working directory, twice over.
    std::fs::create_dir(mnt.join("work")).unwrap();
    s.ok(&["commit", "-m", "work"]);
    let mut shell = sleeper_in(&mnt.join("work"));
    for _ in 0..2 {
        std::fs::remove_dir(mnt.join("work")).unwrap();
        s.ok(&["reset", "--hard", "HEAD"]);
        write_synced(&mnt.join("work/x"), b"x");
        std::fs::remove_file(mnt.join("work/x")).unwrap();
    }
    shell.kill().unwrap();
    shell.wait().unwrap();
}

/// Writes and truncates racing the reset through a descriptor of a file
/// deleted while open never reach the file the reset brings back: a write
/// that passed the stale-handle check while the reset swapped the state
/// landed there (`EVILitted`, in every round).
#[test]
fn writes_racing_a_reset_through_a_deleted_file_stay_out_of_the_restored_one() {
    use std::os::unix::fs::FileExt;
    let (s, mnt) = server_with_dot("race");
    write_synced(&mnt.join("g"), b"committed\n");
    s.ok(&["commit", "-m", "g"]);
    for round in 0..6 {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(mnt.join("g"))
            .unwrap();
        std::fs::remove_file(mnt.join("g")).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let writer = std::thread::spawn(move || {
            let mut stale = 0;
            while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
                let r = match stale % 2 {
                    0 => f.write_at(b"EVIL", 0).map(|_| ()),
                    _ => f.set_len(3),
                };
                if r.is_err() {
                    stale += 1;
                }
            }
            stale
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        s.ok(&["reset", "--hard", "HEAD"]);
        std::thread::sleep(std::time::Duration::from_millis(200));
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(writer.join().unwrap() > 0, "round {round}: never stale");
        assert_eq!(
            std::fs::read(mnt.join("g")).unwrap(),
            b"committed\n",
            "round {round}"
        );
        assert!(s.ok(&["status"]).contains("No changes"), "round {round}");
    }
}

/// A file deleted while a process keeps it open (git's and databases'
/// temporary files) is not in the commit made meanwhile: a branch made
/// from that commit had uncommitted changes at once, and could not be
/// deleted (nor pushed to, on a hub). The process reads it on; the
/// branch stays clean after it closes, and across a restart.
#[test]
fn a_file_deleted_while_open_leaves_commits_clean() {
    let (mut s, mnt) = server_with_dot("app");
    write_synced(&mnt.join("tmp"), b"held open");
    s.ok(&["commit", "-m", "with tmp"]);
    let mut held = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(mnt.join("tmp"))
        .unwrap();
    std::fs::remove_file(mnt.join("tmp")).unwrap();
    s.ok(&["commit", "-m", "without tmp"]);
    s.ok(&["branch", "from-here"]);
    s.ok(&["branch", "-d", "from-here"]);
    let mut text = String::new();
    std::io::Read::read_to_string(&mut held, &mut text).unwrap();
    assert_eq!(text, "held open");
    assert!(s.ok(&["status"]).contains("No changes"));
    // Its writes, still in the server's buffers, are no one's work either.
    std::io::Write::write_all(&mut held, &vec![7u8; 3 << 20]).unwrap();
    let status = s.ok(&["status"]);
    assert!(status.contains("No changes"), "{status}");
    drop(held);
    assert!(s.ok(&["status"]).contains("No changes"));
    s.stop();
    s.restart();
    assert!(s.ok(&["status"]).contains("No changes"));
    s.ok(&["branch", "from-here"]);
    s.ok(&["branch", "-d", "from-here"]);
}

/// `--author` (or DM_AUTHOR) names a commit's author, as git's: a team
/// sharing a hub saw `admin` on every commit, whoever made it.
#[test]
fn commit_author_comes_from_the_flag_or_the_environment() {
    let (s, mnt) = server_with_dot("authors");
    write_synced(&mnt.join("a"), b"a");
    s.ok(&[
        "commit",
        "-m",
        "by alice",
        "--author",
        "Alice <alice@example.com>",
    ]);
    let commit_with_env = |message: &str, author: &str| {
        let out = s
            .dm_command(&["commit", "-m", message])
            .env("DM_AUTHOR", author)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    commit_with_env("by bob", "bob");
    s.ok(&["commit", "-m", "by default"]);
    // Set but empty: as if unset.
    commit_with_env("empty DM_AUTHOR", "");
    // 256 characters, not bytes.
    let long = "é".repeat(256);
    s.ok(&["commit", "-m", "long name", "--author", &long]);
    let log = s.ok(&["log"]);
    let authors: Vec<&str> = log
        .lines()
        .filter_map(|l| l.strip_prefix("Author: "))
        .collect();
    assert_eq!(
        authors,
        [
            "Alice <alice@example.com>",
            "bob",
            "admin",
            "admin",
            long.as_str()
        ],
        "{log}"
    );
    let err = s.fail(&["commit", "-m", "x", "--author", "two\nlines"]);
    assert!(err.contains("has a control character ('\\n')"), "{err}");
    let err = s.fail(&["commit", "-m", "x", "--author", "bell\x07"]);
    assert!(err.contains("has a control character ('\\u{7}')"), "{err}");
    // Too long: refused without repeating it whole.
    let err = s.fail(&["commit", "-m", "x", "--author", &"é".repeat(5000)]);
    assert!(
        err.contains("is 5000 characters long") && err.len() < 400,
        "{err}"
    );
}

/// Two `rm -rf` of one tree racing on two mounts of a branch both
/// succeed and leave nothing: one found a directory the other had just
/// removed gone (ENOENT) while its kernel still listed it, took it for a
/// file and failed with "Is a directory", leaving part of the tree (both
/// failed in a fifth of the rounds); a lookup that raced the removal of
/// its file failed with "Stale file handle".
#[test]
fn rm_rf_racing_on_two_mounts_removes_the_whole_tree() {
    let (s, mnt) = server_with_dot("rmrace");
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other");
    s.ok(&["mount", "rmrace@master", other.to_str().unwrap()]);
    let mut failures = Vec::new();
    for round in 0..20 {
        let top = mnt.join("tree");
        for i in 0..30 {
            let d = top.join(format!("d{i}/e{}/f/g/h", i % 3));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("f"), b"x").unwrap();
            std::fs::write(d.join("../../x"), b"x").unwrap();
        }
        // Both kernels know the tree.
        for m in [&mnt, &other] {
            let n = walk(&m.join("tree"));
            assert!(n >= 90, "round {round}: {n} entries seen");
        }
        let rm = |m: &Path| {
            std::process::Command::new("rm")
                .arg("-rf")
                .arg(m.join("tree"))
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        };
        let (a, b) = (rm(&mnt), rm(&other));
        for (child, m) in [(a, &mnt), (b, &other)] {
            let out = child.wait_with_output().unwrap();
            if !out.status.success() {
                let err = String::from_utf8_lossy(&out.stderr);
                failures.push(format!("round {round}, {}: {err}", m.display()));
            }
        }
        assert!(!top.exists(), "round {round}: part of the tree is left");
    }
    // Before the temporary directory goes (its removal would enter the
    // mount, and the server leaves a mount there behind).
    s.ok(&["unmount", other.to_str().unwrap()]);
    assert!(failures.is_empty(), "rm -rf failed: {failures:?}");
}

/// Entries under `dir`, counted by walking it.
fn walk(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            1 + if e.file_type().unwrap().is_dir() {
                walk(&e.path())
            } else {
                0
            }
        })
        .sum()
}

/// A checkout refused for a file a shell holds open names the shell, not
/// the `dm` client it ran, which inherited the descriptor ("dm (pid N) has
/// ... open").
#[test]
fn a_refused_checkout_names_the_shell_not_the_client() {
    let (s, mnt) = server_with_dot("inherit");
    write_synced(&mnt.join("f"), b"x");
    s.ok(&["commit", "-m", "f"]);
    s.ok(&["branch", "other"]);
    let dm = s.dm_command(&["checkout", "other"]);
    let mut sh = std::process::Command::new("sh");
    sh.args(["-c", "exec 7<\"$1\"; shift; \"$@\"", "sh"])
        .arg(mnt.join("f"))
        .arg(dm.get_program())
        .args(dm.get_args());
    for (k, v) in dm.get_envs() {
        match v {
            Some(v) => sh.env(k, v),
            None => sh.env_remove(k),
        };
    }
    let out = sh.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("sh (pid ") && !err.contains("dm (pid "),
        "{err}"
    );
    assert!(s.ok(&["branch"]).contains("* master"));
}

/// A directory being listed counts as a file open: a checkout is refused
/// while a host process lists one (a `find` during a checkout failed
/// partway with "Stale file handle" and listed a third of the files).
#[test]
fn a_checkout_is_refused_while_a_directory_is_being_listed() {
    let (s, mnt) = server_with_dot("listing");
    std::fs::create_dir(mnt.join("dir")).unwrap();
    write_synced(&mnt.join("dir/a"), b"a");
    s.ok(&["commit", "-m", "a"]);
    s.ok(&["branch", "other"]);
    let listing = std::fs::read_dir(mnt.join("dir")).unwrap();
    let err = s.fail(&["checkout", "other"]);
    assert!(err.contains("nothing was changed"), "{err}");
    assert!(s.ok(&["branch"]).contains("* master"));
    drop(listing);
    s.ok(&["checkout", "other"]);
}
