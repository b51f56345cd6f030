//! The seed document's walkthrough through the real `dm` binary and a real
//! `dm server`: init, write through the mount, two commits, log, rollback.

use dm_tests::{random_bytes, snapshot, write_synced, Server};
use std::path::{Path, PathBuf};

const DM: &str = env!("CARGO_BIN_EXE_dm");

#[test]
fn init_commit_log_reset() {
    let s = Server::start(DM);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(s.socket()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
    // Root's mounts serve any uid (PostgreSQL runs as postgres): their
    // directory must let others through; the store stays root's.
    let mode = std::fs::metadata(s.mount_dir())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755, "mount dir mode {mode:o}");
    let mode = std::fs::metadata(s.data_dir())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "data dir mode {mode:o}");
    s.ok(&["init", "myapp"]);
    s.ok(&["switch", "myapp"]);

    let list = s.ok(&["list"]);
    assert!(!list.contains("Current remote"), "no remotes yet:\n{list}");
    let header = list.lines().next().unwrap();
    for col in [
        "DOT",
        "BRANCH",
        "SERVER",
        "CONTAINERS",
        "SIZE",
        "COMMITS",
        "DIRTY",
    ] {
        assert!(header.contains(col), "missing {col} in {header}");
    }
    let row = list.lines().find(|l| l.contains("myapp")).unwrap();
    assert!(row.starts_with("* myapp"), "current dot not marked: {row}");
    assert!(row.contains("master"), "{row}");

    // The path of the dot, following its current branch.
    let mnt = PathBuf::from(s.ok(&["mount", "myapp"]).trim());
    assert!(mnt.starts_with(s.mount_dir()), "{}", mnt.display());
    assert!(dm_tests::is_mounted(&mnt));

    // First state: a few files, a directory, a symlink.
    std::fs::create_dir(mnt.join("base")).unwrap();
    write_synced(&mnt.join("base/PG_VERSION"), b"9.6\n");
    write_synced(&mnt.join("big.bin"), &random_bytes(1, 3 * 1024 * 1024 + 17));
    std::os::unix::fs::symlink("base/PG_VERSION", mnt.join("link")).unwrap();
    let first = snapshot(&mnt);
    // A dot without commits yet: what it holds is uncommitted.
    let status = s.ok(&["status"]);
    assert!(status.contains("Uncommitted"), "{status}");

    let id1 = s.ok(&["commit", "-m", "empty state"]).trim().to_string();
    assert_eq!(id1.len(), 64, "commit prints the id: {id1}");

    // Second state: modify, add, delete.
    let mut big = random_bytes(1, 3 * 1024 * 1024 + 17);
    big[1_000_000..1_000_100].fill(0xAB);
    write_synced(&mnt.join("big.bin"), &big);
    write_synced(&mnt.join("base/new-table"), &random_bytes(2, 100_000));
    std::fs::remove_file(mnt.join("link")).unwrap();

    let status = s.ok(&["status"]);
    assert!(
        status.contains("Uncommitted changes in 3 paths,"),
        "{status}"
    );
    let diff = s.ok(&["diff"]);
    assert!(diff.contains("M  /__default__/big.bin"), "{diff}");
    assert!(diff.contains("A  /__default__/base/new-table"), "{diff}");
    assert!(diff.contains("D  /__default__/link"), "{diff}");
    // Names that are not UTF-8 are told apart, quoted with octal escapes
    // as git does (both showed as one "bad\u{fffd}" path).
    use std::os::unix::ffi::OsStrExt;
    let odd = |b: &[u8]| mnt.join(std::ffi::OsStr::from_bytes(b));
    std::fs::write(odd(b"bad\xff"), b"1").unwrap();
    std::fs::write(odd(b"bad\xfe"), b"2").unwrap();
    let diff = s.ok(&["diff"]);
    assert!(diff.contains("A  \"/__default__/bad\\376\"\n"), "{diff}");
    assert!(diff.contains("A  \"/__default__/bad\\377\"\n"), "{diff}");
    std::fs::remove_file(odd(b"bad\xff")).unwrap();
    std::fs::remove_file(odd(b"bad\xfe")).unwrap();

    let out = s.dm(&["commit", "-m", "some data", "-d", "ticket=16637"]);
    assert!(out.status.success() && out.stderr.is_empty(), "{out:?}");
    let id2 = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_ne!(id1, id2);
    let second = snapshot(&mnt);
    assert_ne!(first, second);
    assert!(s.ok(&["status"]).contains("No changes"));
    // A commit of nothing is made (a snapshot, as Dotmesh's) but said.
    let empty = s.dm(&["commit", "-m", "nothing"]);
    assert!(empty.status.success());
    let note = String::from_utf8_lossy(&empty.stderr);
    assert!(note.contains("nothing had changed"), "{note}");
    s.ok(&["reset", "--hard", "HEAD^"]);
    // A file made and removed again changes only its directory's times:
    // no path to list, and status says what is left.
    std::fs::write(mnt.join("scratch"), b"x").unwrap();
    std::fs::remove_file(mnt.join("scratch")).unwrap();
    let status = s.ok(&["status"]);
    assert!(status.contains("directory times only"), "{status}");
    s.ok(&["reset", "--hard", "HEAD"]);
    assert_eq!(snapshot(&mnt), second);
    // A file saved again unchanged, its time set back: bytes were written,
    // no path differs, and status says so (it said "6 B in 0 paths").
    std::fs::write(mnt.join("same"), b"hello\n").unwrap();
    s.ok(&["commit", "-m", "same"]);
    let stamp = format!("@{}", 1_700_000_000);
    let touch = |p: &Path| {
        let ok = std::process::Command::new("touch")
            .args(["-d", &stamp])
            .arg(p)
            .status()
            .unwrap();
        assert!(ok.success());
    };
    touch(&mnt.join("same"));
    s.ok(&["commit", "-m", "same time"]);
    std::fs::write(mnt.join("same"), b"hello\n").unwrap();
    touch(&mnt.join("same"));
    let status = s.ok(&["status"]);
    assert!(
        status.contains("6 B written, but no path differs from HEAD"),
        "{status}"
    );
    s.ok(&["reset", "--hard", "HEAD~2"]);
    assert_eq!(snapshot(&mnt), second);
    // A delete writes no data, yet it is uncommitted: dm list says 0 B
    // where a clean branch has "." (it showed "." too).
    let row = || {
        s.ok(&["list"])
            .lines()
            .find(|l| l.contains("myapp"))
            .unwrap()
            .trim_end()
            .to_string()
    };
    assert!(row().ends_with(" ."), "{}", row());
    std::fs::remove_file(mnt.join("base/new-table")).unwrap();
    assert!(row().ends_with(" 0 B"), "{}", row());
    let show = s.ok(&["dot", "show"]);
    assert!(
        show.contains("master (2 commits") && show.contains(", dirty 0 B"),
        "{show}"
    );
    s.ok(&["reset", "--hard", "HEAD"]);
    assert_eq!(snapshot(&mnt), second);

    // dm log: both commits, oldest first, in Dotmesh's format.
    let log = s.ok(&["log"]);
    let expected_start = format!("commit {id1}\nAuthor: admin\nDate: ");
    assert!(log.starts_with(&expected_start), "{log}");
    assert!(log.contains("\n\n    empty state\n\n"), "{log}");
    assert!(
        log.contains(&format!("commit {id2}\nAuthor: admin\n")),
        "{log}"
    );
    assert!(log.contains("ticket: 16637\n"), "{log}");
    assert!(log.contains("\n\n    some data\n"), "{log}");
    assert!(log.find("empty state").unwrap() < log.find("some data").unwrap());

    let diff = s.ok(&["diff", "HEAD^", "HEAD"]);
    assert!(diff.contains("M  /__default__/big.bin"), "{diff}");

    // Plain reset refuses to discard uncommitted data.
    write_synced(&mnt.join("scratch"), b"uncommitted");
    let err = s.fail(&["reset", "HEAD^"]);
    assert!(err.contains("--hard"), "{err}");
    assert_eq!(std::fs::read(mnt.join("scratch")).unwrap(), b"uncommitted");
    assert_eq!(s.ok(&["log"]), log, "a refused reset changed the log");

    // Nor, without --hard, a commit no other branch has (dm keeps no
    // reflog): a git user's `git reset HEAD^` keeps the files, dm's would
    // have destroyed them.
    s.ok(&["reset", "--hard", "HEAD"]);
    let err = s.fail(&["reset", "HEAD^"]);
    assert!(
        err.contains("would destroy 1 commit") && err.contains("`dm branch NAME`"),
        "{err}"
    );
    assert_eq!(s.ok(&["log"]), log, "a refused reset changed the log");
    // Kept on a branch, it goes without --hard, and comes back.
    s.ok(&["branch", "kept"]);
    s.ok(&["reset", "HEAD^"]);
    assert_eq!(snapshot(&mnt), first);
    s.ok(&["reset", "kept"]);
    assert_eq!(s.ok(&["log"]), log);
    s.ok(&["branch", "-D", "kept"]);

    // Rollback: byte for byte the first state, at the same path.
    s.ok(&["reset", "--hard", "HEAD^"]);
    assert_eq!(snapshot(&mnt), first);
    let log = s.ok(&["log"]);
    assert!(
        log.contains("empty state") && !log.contains("some data"),
        "{log}"
    );

    // -H: raw numbers, tab-separated, no header.
    let raw = s.ok(&["list", "-H"]);
    let fields: Vec<&str> = raw.trim_end().split('\t').collect();
    assert_eq!(fields.len(), 7, "{raw:?}");
    assert_eq!(fields[0], "myapp");
    assert_eq!(fields[1], "master");
    assert!(fields[4].parse::<u64>().is_ok(), "{raw:?}");
    assert_eq!(fields[5], "1");

    let show = s.ok(&["dot", "show"]);
    assert!(show.contains("Current branch: master"), "{show}");
    assert!(show.contains(&mnt.display().to_string()), "{show}");

    s.ok(&["fsck"]);
    s.ok(&["gc"]);
    assert_eq!(snapshot(&mnt), first, "gc changed the data");
    // Remotes (`dm remote add` reaches the hub and checks the key) are
    // tested in cli/tests/sync.rs; an unreachable one is not added.
    s.fail(&["remote", "add", "hub", "alice@dothub.com"]);
    assert!(s.ok(&["list"]).starts_with("  DOT"));

    let v = s.ok(&["version"]);
    assert!(v.contains("Client: dm") && v.contains("Server: dm"), "{v}");
}

#[test]
fn clean_shutdown_and_restart() {
    let mut s = Server::start(DM);
    s.ok(&["init", "myapp"]);
    s.ok(&["switch", "myapp"]);
    let mnt = PathBuf::from(s.ok(&["mount", "myapp"]).trim());
    write_synced(&mnt.join("f"), b"kept");
    s.ok(&["commit", "-m", "one"]);
    assert_eq!(s.stop(), Some(0), "SIGTERM must exit 0:\n{}", s.log());
    assert!(
        !dm_tests::is_mounted(&mnt),
        "mount left behind after SIGTERM"
    );
    s.restart();
    assert!(dm_tests::is_mounted(&mnt), "mount did not come back");
    assert_eq!(std::fs::read(mnt.join("f")).unwrap(), b"kept");
    assert!(s.ok(&["log"]).contains("    one\n"));
}

#[test]
fn completions_and_help() {
    let out = std::process::Command::new(DM)
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("checkout"));
    let out = std::process::Command::new(DM)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
}

#[test]
fn second_server_on_the_same_socket_is_refused() {
    let s = Server::start(DM);
    let out = std::process::Command::new(DM)
        .arg("server")
        .arg("--data-dir")
        .arg(s.root().join("data2"))
        .arg("--mount-dir")
        .arg(s.root().join("mnt2"))
        .arg("--socket")
        .arg(s.socket())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already listening"), "{err}");
    // The same data dir with another socket: refused, saying why.
    let out = std::process::Command::new(DM)
        .arg("server")
        .arg("--data-dir")
        .arg(s.data_dir())
        .arg("--mount-dir")
        .arg(s.root().join("mnt3"))
        .arg("--socket")
        .arg(s.root().join("other.sock"))
        .arg("--no-plugin")
        .args(["--listen", "off"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    // Named, with its command line (a server whose socket went with its
    // runtime directory cannot be asked otherwise).
    assert!(
        err.contains(&format!("in use by process {} (`", s.pid())) && err.contains(" server"),
        "{err}"
    );
    // The first server is unharmed.
    s.ok(&["version"]);
}

/// A mount unmounted behind dm's back (`umount`) is mounted again by the
/// next `dm mount` (it answered the path of a mount that was gone, and
/// writes went to the bare directory, outside the dot); a path where
/// another file system is mounted is refused.
#[test]
fn a_mount_gone_behind_dms_back_is_mounted_again() {
    let s = Server::start(DM);
    s.ok(&["init", "myapp"]);
    s.ok(&["switch", "myapp"]);
    let mnt = PathBuf::from(s.ok(&["mount", "myapp"]).trim());
    write_synced(&mnt.join("f"), b"in the dot");
    s.ok(&["commit", "-m", "f"]);
    let out = std::process::Command::new("umount")
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!dm_tests::is_mounted(&mnt));

    assert_eq!(PathBuf::from(s.ok(&["mount", "myapp"]).trim()), mnt);
    assert!(dm_tests::is_mounted(&mnt), "not mounted again");
    assert_eq!(std::fs::read(mnt.join("f")).unwrap(), b"in the dot");
    write_synced(&mnt.join("g"), b"new");
    assert!(s.ok(&["status"]).contains("Uncommitted"));

    // Another file system on the path: refused, and left alone.
    let other = s.root().join("tmpfs");
    std::fs::create_dir(&other).unwrap();
    let out = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "none"])
        .arg(&other)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = s.fail(&["mount", "myapp", other.to_str().unwrap()]);
    assert!(err.contains("mount point already"), "{err}");
    let _ = std::process::Command::new("umount").arg(&other).output();
}

/// poll(2) on a file in a mount says "ready", as on any regular file, and
/// leaves no warning in the server's log (fuser logged three lines for
/// each call; `docker exec` and `docker cp` poll); copy_file_range and
/// SEEK_HOLE work and are as quiet.
#[test]
fn poll_on_a_file_is_ready_and_quiet() {
    use std::os::fd::AsRawFd;
    let s = Server::start(DM);
    s.ok(&["init", "polled"]);
    let mnt = PathBuf::from(s.ok(&["mount", "polled"]).trim());
    write_synced(&mnt.join("f"), b"x");
    let f = std::fs::File::open(mnt.join("f")).unwrap();
    for _ in 0..3 {
        let mut fds = [libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one valid pollfd, for the length given.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, 1000) };
        assert_eq!(n, 1, "{}", std::io::Error::last_os_error());
        assert!(fds[0].revents & libc::POLLIN != 0);
    }
    // copy_file_range (`cp` makes it) copies through the kernel's reads
    // and writes; SEEK_HOLE finds the end (the whole file is data).
    let data = random_bytes(5, 300_000);
    write_synced(&mnt.join("src"), &data);
    let dst = std::fs::File::create(mnt.join("dst")).unwrap();
    let src = std::fs::File::open(mnt.join("src")).unwrap();
    let mut copied = 0usize;
    while copied < data.len() {
        // SAFETY: two open descriptors; null offsets use and move theirs.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                std::ptr::null_mut(),
                dst.as_raw_fd(),
                std::ptr::null_mut(),
                data.len() - copied,
                0,
            )
        };
        assert!(n > 0, "{}", std::io::Error::last_os_error());
        copied += n as usize;
    }
    drop(dst);
    assert_eq!(std::fs::read(mnt.join("dst")).unwrap(), data);
    // SAFETY: an open descriptor.
    let hole = unsafe { libc::lseek(src.as_raw_fd(), 0, libc::SEEK_HOLE) };
    assert_eq!(hole, data.len() as i64);
    let log = s.log();
    assert!(!log.contains("Not Implemented"), "{log}");
}

/// A process that holds the socket but does not answer (a server still
/// exiting after kill -9, while the kernel ends its FUSE sessions) is
/// waited for, not taken for a running server: the start right after it
/// succeeds once it is gone (it failed with "already listening").
#[test]
fn a_start_waits_for_a_silent_server_on_its_socket() {
    let mut s = Server::start(DM);
    s.stop();
    let silent = std::os::unix::net::UnixListener::bind(s.socket()).unwrap();
    let gone = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(1500));
        drop(silent);
    });
    s.restart();
    gone.join().unwrap();
    s.ok(&["version"]);
}

/// A server started with relative paths works with absolute ones: the
/// mount paths it hands out (to `dm mount`, to Docker) and saves for the
/// next start do not depend on the directory it was started from. Root's
/// server may live in a directory of another user's (`sudo dm server` in
/// a home directory).
#[test]
fn relative_server_paths_are_made_absolute() {
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).unwrap();
    let mut server = std::process::Command::new(DM)
        .args([
            "server",
            "--data-dir",
            "d",
            "--mount-dir",
            "m",
            "--socket",
            "run/s.sock",
        ])
        .args(["--no-plugin", "--listen", "off"])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("log")).unwrap())
        .spawn()
        .unwrap();
    let log = || std::fs::read_to_string(dir.path().join("log")).unwrap_or_default();
    let dm = |args: &[&str]| {
        std::process::Command::new(DM)
            .args(args)
            .env("DM_SOCKET", dir.path().join("run/s.sock"))
            .env("DM_CONFIG", dir.path().join("config.toml"))
            .output()
            .unwrap()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !dm(&["version"]).status.success() {
        assert!(
            std::time::Instant::now() < deadline,
            "the server did not answer: {}",
            log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(dm(&["init", "rel"]).status.success());
    let out = dm(&["--dot", "rel", "mount", "rel"]);
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status();
    let _ = server.wait();
    let want = dir.path().join("m");
    assert!(path.starts_with(&want), "{}", path.display());
}

/// Bytes the files under `dir` hold on the disk (holes not counted).
fn allocated(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().blocks() * 512)
        .sum()
}

/// A file written over and over (a database's, say) leaves dead chunks
/// behind: the server collects them by itself once the store grew by a
/// quarter and `--auto-gc` (here 4 MiB), without a `dm gc`.
#[test]
fn the_server_collects_garbage_by_itself() {
    let s = Server::start_with_env(DM, &[("DM_AUTO_GC", "4M")]);
    s.ok(&["init", "db"]);
    let mnt = PathBuf::from(s.ok(&["mount", "db"]).trim());
    let chunks = s.data_dir().join("store/chunks");
    let mut last = Vec::new();
    for seed in 0..8 {
        last = random_bytes(100 + seed, 8 << 20);
        write_synced(&mnt.join("table"), &last);
    }
    let grown = allocated(&chunks);
    assert!(grown > 48 << 20, "{grown} bytes in the chunk log");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !s.log().contains("automatic gc") {
        assert!(
            std::time::Instant::now() < deadline,
            "no automatic gc in a minute:\n{}",
            s.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(
        allocated(&chunks) + (40 << 20) < grown,
        "{grown} -> {} bytes",
        allocated(&chunks)
    );
    assert!(std::fs::read(mnt.join("table")).unwrap() == last);
    s.ok(&["fsck"]);
}
