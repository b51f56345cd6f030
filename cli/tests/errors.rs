//! Bad names and bad refs: clear errors, exit code 1, nothing changed.

use dm_tests::{random_bytes, write_synced, Server};
use std::path::PathBuf;

const DM: &str = env!("CARGO_BIN_EXE_dm");

#[test]
fn bad_input_changes_nothing() {
    let s = Server::start(DM);

    let err = s.fail(&["commit", "-m", "x"]);
    assert!(err.contains("dm switch"), "{err}");

    for bad in [
        "bad name",
        "a.b",
        "",
        "x/y/z",
        "dot@branch",
        &"x".repeat(65),
    ] {
        let err = s.fail(&["init", bad]);
        assert!(err.contains("invalid"), "init {bad:?}: {err}");
    }
    assert_eq!(s.ok(&["list", "-H"]), "", "bad inits created dots");
    let err = s.fail(&["init", "myapp.orders-db"]);
    assert!(
        err.contains("`dm init myapp`, then use myapp.orders-db"),
        "{err}"
    );
    let err = s.fail(&["mount", "nosuch"]);
    assert!(err.contains("dm init"), "{err}");
    // Arguments swapped: the path first.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let err = s.fail(&["mount", d, "myapp"]);
    assert!(
        err.contains("looks like a path") && err.contains(&format!("`dm mount myapp {d}`")),
        "{err}"
    );
    let err = s.fail(&["clone", "alice/myapp", "hub"]);
    assert!(err.contains("the remote comes first"), "{err}");

    s.ok(&["init", "myapp"]);
    let err = s.fail(&["init", "myapp"]);
    assert!(
        err.contains("already exists") && err.contains("myapp"),
        "{err}"
    );
    let err = s.fail(&["switch", "nosuch"]);
    assert!(err.contains("nosuch"), "{err}");
    // The name in another namespace is offered.
    s.ok(&["init", "ns1/other"]);
    let err = s.fail(&["switch", "other"]);
    assert!(err.contains("in another namespace: ns1/other"), "{err}");
    s.ok(&["dot", "delete", "-f", "ns1/other"]);
    s.ok(&["switch", "myapp"]);

    let mnt = PathBuf::from(s.ok(&["mount", "myapp"]).trim());
    write_synced(&mnt.join("f"), b"1");
    s.ok(&["commit", "-m", "one"]);
    write_synced(&mnt.join("f"), b"2");
    s.ok(&["commit", "-m", "two"]);
    // `dm reset --hard` without REF: HEAD, as git's.
    write_synced(&mnt.join("f"), b"3");
    s.ok(&["reset", "--hard"]);
    assert_eq!(std::fs::read(mnt.join("f")).unwrap(), b"2");
    let log = s.ok(&["log"]);

    for bad in ["HEAD^^^", "HEAD~5", "deadbeef", "nonsense", "HEAD^x"] {
        let err = s.fail(&["reset", "--hard", bad]);
        assert!(
            err.contains(bad) || err.contains("commit"),
            "reset {bad}: {err}"
        );
        assert_eq!(s.ok(&["log"]), log, "reset {bad} changed the log");
        assert_eq!(std::fs::read(mnt.join("f")).unwrap(), b"2");
    }
    let err = s.fail(&["diff", "HEAD~9"]);
    assert!(err.contains("HEAD~9"), "{err}");
    // git's soft and mixed resets: what dm does instead.
    for how in ["soft", "mixed"] {
        let err = s.fail(&["reset", &format!("--{how}"), "HEAD^"]);
        assert!(
            err.contains(&format!("dm has no --{how} reset"))
                && err.contains("`dm reset --hard HEAD^`"),
            "{err}"
        );
    }
    assert_eq!(s.ok(&["log"]), log);

    // Names a command line would read as something else.
    let err = s.fail(&["checkout", "-b", "HEAD"]);
    assert!(err.contains("HEAD names the current commit"), "{err}");
    let err = s.fail(&["init", "--", "-x"]);
    assert!(err.contains("would read as an option"), "{err}");
    assert_eq!(s.ok(&["branch"]), "* master\n");

    let err = s.fail(&["checkout", "nosuch"]);
    assert!(
        err.contains("nosuch") && err.contains("checkout -b"),
        "{err}"
    );
    let err = s.fail(&["checkout", "-b", "bad/name"]);
    assert!(err.contains("invalid"), "{err}");
    let err = s.fail(&["checkout", "-b", "master"]);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(s.ok(&["branch"]), "* master\n");

    let err = s.fail(&["mount", "nosuch"]);
    assert!(err.contains("nosuch"), "{err}");
    let err = s.fail(&["mount", "myapp@nobranch"]);
    assert!(err.contains("nobranch"), "{err}");
    let err = s.fail(&["mount", "my app"]);
    assert!(err.contains("invalid"), "{err}");
    // Mounting again at the same path is idempotent; another volume there is refused.
    let again = s.ok(&["mount", "myapp", mnt.to_str().unwrap()]);
    assert_eq!(again.trim(), mnt.display().to_string());
    let err = s.fail(&["mount", "myapp@master", mnt.to_str().unwrap()]);
    assert!(err.contains("unmount"), "{err}");
    let err = s.fail(&["unmount", "/nonexistent/path"]);
    assert!(err.contains("/nonexistent/path"), "{err}");
    // A path with a tab or newline is one field of `dm dot show -H`
    // (quoted), a path with a space as is.
    let odd = tempfile::tempdir().unwrap();
    for (name, field) in [("a\tb", "\"{}/a\\tb\""), ("a b", "{}/a b")] {
        let p = odd.path().join(name);
        s.ok(&["mount", "myapp", p.to_str().unwrap()]);
        let want = field.replace("{}", odd.path().to_str().unwrap());
        let show = s.ok(&["dot", "show", "-H"]);
        assert!(
            show.lines()
                .any(|l| l == format!("mount\tmyapp\tmaster\t{want}")),
            "{show}"
        );
        s.ok(&["unmount", p.to_str().unwrap()]);
    }
    // Unmounted outside dm: no longer listed as showing the dot.
    let gone = odd.path().join("gone");
    s.ok(&["mount", "myapp", gone.to_str().unwrap()]);
    dm_tests::unmount_lazily(&gone);
    let show = s.ok(&["dot", "show", "-H"]);
    assert!(!show.contains("/gone"), "{show}");
    assert!(s.log().contains("was unmounted outside dm"), "{}", s.log());
    // What the user mounts there next is theirs: not unmounted by dm
    // forgetting its own (a bind mount went), nor by `dm unmount` of dm's
    // mount under it (refused until theirs is gone).
    let theirs = odd.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::fs::write(theirs.join("file"), b"user's").unwrap();
    let mount_bind = |at: &std::path::Path| {
        let st = std::process::Command::new("mount")
            .arg("--bind")
            .arg(&theirs)
            .arg(at)
            .status()
            .unwrap();
        assert!(st.success());
    };
    let again = odd.path().join("again");
    s.ok(&["mount", "myapp", again.to_str().unwrap()]);
    dm_tests::unmount_lazily(&again);
    mount_bind(&again);
    s.ok(&["dot", "show", "-H"]);
    assert_eq!(std::fs::read(again.join("file")).unwrap(), b"user's");
    dm_tests::unmount_lazily(&again);
    let covered = odd.path().join("covered");
    s.ok(&["mount", "myapp", covered.to_str().unwrap()]);
    mount_bind(&covered);
    let show = s.ok(&["dot", "show", "-H"]);
    assert!(show.contains("/covered"), "{show}");
    for cmd in ["unmount", "mount"] {
        let err = match cmd {
            "mount" => s.fail(&["mount", "myapp", covered.to_str().unwrap()]),
            _ => s.fail(&["unmount", covered.to_str().unwrap()]),
        };
        assert!(err.contains("another file system is mounted over"), "{err}");
    }
    assert_eq!(std::fs::read(covered.join("file")).unwrap(), b"user's");
    dm_tests::unmount_lazily(&covered);
    s.ok(&["unmount", covered.to_str().unwrap()]);

    let err = s.fail(&["commit", "-m", "x", "-d", "Upper=1"]);
    assert!(err.contains("lowercase"), "{err}");
    let err = s.fail(&["commit", "-m", "x", "-d", "novalue"]);
    assert!(err.contains("key=value"), "{err}");
    assert_eq!(s.ok(&["log"]), log);

    // Deleting needs confirmation; stdin is not a terminal here.
    let err = s.fail(&["dot", "delete", "myapp"]);
    assert!(err.contains("-f"), "{err}");
    assert!(s.ok(&["list", "-H"]).starts_with("myapp\t"));
    s.ok(&["dot", "delete", "-f", "myapp"]);
    assert_eq!(s.ok(&["list", "-H"]), "");
    assert!(!dm_tests::is_mounted(&mnt));
    let err = s.fail(&["log"]);
    assert!(err.contains("dm switch"), "{err}");
}

/// dm commands run at once (a script's `&`, parallel CI jobs) each change
/// the client's config file: none fails and the file stays whole. They
/// shared one temp file, so some failed ("writing config.toml: No such
/// file") and a rename could publish two writers' bytes mixed.
#[test]
fn commands_run_at_once_keep_the_config_whole() {
    let s = Server::start(DM);
    let long = "b".repeat(64);
    s.ok(&["init", &long]);
    s.ok(&["init", "a"]);
    for round in 0..6 {
        let children: Vec<_> = (0..16)
            .map(|i| {
                let dot = if i % 2 == 0 { "a" } else { long.as_str() };
                s.dm_command(&["switch", dot])
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .expect("starting dm")
            })
            .collect();
        for c in children {
            let out = c.wait_with_output().expect("waiting for dm");
            assert!(
                out.status.success(),
                "round {round}: a switch failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = std::fs::read_to_string(s.config()).unwrap();
        assert!(
            [
                "current_dot = \"a\"\n".to_string(),
                format!("current_dot = \"{long}\"\n")
            ]
            .contains(&text),
            "round {round}: config.toml holds {text:?}"
        );
        s.ok(&["list"]);
    }
}

/// A server whose Docker has no volume of its (`--no-plugin`, or Docker
/// never used dm) does not ask Docker about containers: a Docker that does
/// not answer stalled each list, checkout and reset 5 s, and filled the log.
#[test]
fn a_server_without_docker_volumes_does_not_ask_docker() {
    let dir = tempfile::tempdir().unwrap();
    let docker = dir.path().join("docker.sock");
    let listener = std::os::unix::net::UnixListener::bind(&docker).unwrap();
    // Takes connections and never answers.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in listener.incoming() {
            held.push(c);
        }
    });
    let s = Server::start_with_env(DM, &[("DM_DOCKER_SOCKET", docker.to_str().unwrap())]);
    s.ok(&["init", "quiet"]);
    s.ok(&["switch", "quiet"]);
    s.ok(&["commit", "-m", "empty"]);
    s.ok(&["list"]);
    s.ok(&["checkout", "-b", "other"]);
    s.ok(&["reset", "--hard"]);
    let log = s.log();
    assert!(!log.contains("Docker"), "{log}");
}

#[test]
fn server_not_running() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(DM)
        .args(["list"])
        .env("DM_SOCKET", dir.path().join("none.sock"))
        .env("DM_CONFIG", dir.path().join("config.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("dm server"), "{err}");
}

/// A server that takes a connection and never answers (wedged, or busy with
/// a long gc): the client says so once, then keeps waiting.
#[test]
fn a_silent_server_is_named_while_the_client_waits() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("silent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    // `dm ARGS` against the server that accepts and reads, never answers:
    // whether the client still waits 2 s after it said so, and its stderr.
    let call = |args: &[&str]| {
        use std::io::Read;
        let mut child = std::process::Command::new(DM)
            .args(args)
            .env("DM_SOCKET", &sock)
            .env("DM_CONFIG", dir.path().join("config.toml"))
            .env("DM_CLIENT_PATIENCE_SECS", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let (_conn, _) = listener.accept().unwrap();
        let said = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let reader = {
            let (mut stderr, said) = (child.stderr.take().unwrap(), said.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 512];
                while let Ok(n @ 1..) = stderr.read(&mut buf) {
                    said.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            })
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while said.lock().unwrap().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        // Twice the patience more: no second message, still waiting.
        std::thread::sleep(std::time::Duration::from_secs(2));
        let waiting = child.try_wait().unwrap().is_none();
        let _ = child.kill();
        child.wait().unwrap();
        reader.join().unwrap();
        let err = String::from_utf8_lossy(&said.lock().unwrap()).into_owned();
        (waiting, err)
    };
    let (waiting, err) = call(&["list"]);
    assert!(
        waiting,
        "the client gave up on a server that may only be busy: {err}"
    );
    assert!(
        err.contains("has not answered GET") && err.contains("silent.sock"),
        "{err}"
    );
    assert_eq!(err.matches("has not answered").count(), 1, "{err}");

    // fsck and gc are long by nature: said so, not "stuck".
    let (waiting, err) = call(&["fsck"]);
    assert!(
        waiting && err.contains("fsck is still running after 1 s") && !err.contains("stuck"),
        "{err}"
    );
}
/// `dm dot delete` without -f asks on a terminal (driven through `script`,
/// which gives the command a pty).
#[test]
fn delete_confirms_on_a_terminal() {
    if !std::path::Path::new("/usr/bin/script").exists() {
        eprintln!("skipped: /usr/bin/script (util-linux) not installed");
        return;
    }
    let s = Server::start(DM);
    s.ok(&["init", "a"]);
    let run = |answer: &str| {
        use std::io::Write;
        let mut child = std::process::Command::new("/usr/bin/script")
            .args(["-qec", &format!("{DM} dot delete a"), "/dev/null"])
            .env("DM_SOCKET", s.socket())
            .env("DM_CONFIG", s.config())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{answer}\n").as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    let (ok, out) = run("nope");
    assert!(!ok, "{out}");
    assert!(out.contains("Type the dot name"), "{out}");
    assert!(s.ok(&["list", "-H"]).starts_with("a\t"));
    let (ok, out) = run("a");
    assert!(ok, "{out}");
    assert_eq!(s.ok(&["list", "-H"]), "");
}

/// `dm remote add` reads the API key from the terminal without echoing it.
#[test]
fn the_api_key_prompt_does_not_echo() {
    if !std::path::Path::new("/usr/bin/script").exists() {
        eprintln!("skipped: /usr/bin/script (util-linux) not installed");
        return;
    }
    use std::io::{Read, Write};
    let s = Server::start(DM);
    let mut child = std::process::Command::new("/usr/bin/script")
        .args([
            "-qec",
            &format!("{DM} remote add hub bob@127.0.0.1:9"),
            "/dev/null",
        ])
        .env("DM_SOCKET", s.socket())
        .env("DM_CONFIG", s.config())
        .env_remove("DM_API_KEY")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The key goes in once the prompt is out (typed earlier, the terminal
    // would echo it before dm could turn echo off).
    let mut stdout = child.stdout.take().unwrap();
    let (prompted, wait_prompt) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        let mut prompted = Some(prompted);
        loop {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
            if String::from_utf8_lossy(&seen).contains("API key for") {
                if let Some(p) = prompted.take() {
                    let _ = p.send(());
                }
            }
        }
        String::from_utf8_lossy(&seen).to_string()
    });
    let mut stdin = child.stdin.take().unwrap();
    wait_prompt
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("no API key prompt");
    // Echo is off before the prompt is written.
    stdin.write_all(b"SECRET-KEY-4711\n").unwrap();
    drop(stdin);
    let _ = child.wait();
    let out = reader.join().unwrap();
    assert!(out.contains("API key for bob@127.0.0.1"), "{out}");
    assert!(
        !out.contains("SECRET-KEY-4711"),
        "the key was echoed:\n{out}"
    );
}

/// A full disk under the data directory (a 160 MiB tmpfs, of which
/// RocksDB's files took 76 MiB at once; on 96 MiB, too little was left to
/// fill): the writer gets
/// ENOSPC and data fsynced before stays; dm then refuses new data (a
/// write, a new file, directory, link or xattr, a clone, whose error names the disk and what to do, and which
/// leaves no dot behind) but frees space itself: the filling file is
/// deleted in the mount and `dm gc` gives its space back, after which
/// writes, commits and the clone work again. Dotmesh said "exit status 1",
/// and dm before this could not delete anything until space was freed
/// outside it.
#[test]
fn a_full_disk_is_named_and_freed_inside_dm() {
    use std::io::Write;
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|u| u.local_addr())
        .unwrap()
        .port();
    let hub = Server::start_with_hub(DM, &format!("127.0.0.1:{port}"));
    let key = hub.ok(&["user", "add", "alice"]).trim().to_string();
    let mut s = Server::start(DM);
    s.stop();
    let data = s.data_dir();
    let out = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=160m", "tmpfs"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _tmpfs = Unmount(data.clone());
    let data = data.join("store");
    s.restart();
    assert!(data.join("reserve").exists(), "no reserve file in {data:?}");
    s.remote_add("hub", &format!("alice@127.0.0.1:{port}"), &key);
    // A dot on the hub only, to clone once the disk is full.
    let big = random_bytes(11, 8 << 20);
    s.ok(&["init", "big"]);
    let bmnt = PathBuf::from(s.ok(&["mount", "big"]).trim());
    write_synced(&bmnt.join("big"), &big);
    s.ok(&["commit", "--dot", "big", "-m", "big"]);
    s.ok(&["push", "hub", "big"]);
    s.ok(&["dot", "delete", "-f", "big"]);
    s.ok(&["gc"]);

    s.ok(&["init", "full"]);
    s.ok(&["switch", "full"]);
    let mnt = PathBuf::from(s.ok(&["mount", "full"]).trim());
    write_synced(&mnt.join("kept"), b"fsynced before the disk filled");
    // Committed data in the same chunk log segment as what fills the disk:
    // GC must give back the dead blocks around it without moving it.
    let base = random_bytes(12, 3 << 20);
    write_synced(&mnt.join("base"), &base);
    s.ok(&["commit", "-m", "before"]);
    // Incompressible data until the disk is full.
    let mut f = std::fs::File::create(mnt.join("fill")).unwrap();
    let mut block = vec![0u8; 1 << 20];
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let mut err = None;
    for _ in 0..400 {
        for b in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes());
        }
        if let Err(e) = f.write_all(&block).and_then(|()| f.sync_data()) {
            err = Some(e);
            break;
        }
    }
    let err = err.expect("400 MiB fit on a 160 MiB disk");
    assert_eq!(err.raw_os_error(), Some(28), "{err}");
    drop(f);

    // Full: new data is refused, with the reason.
    let err = std::fs::write(mnt.join("more"), vec![1u8; 1 << 20]).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(28), "{err}");
    // So are new files, directories, links and extended attributes: they
    // grow the store too (creating files on a full disk used up the room
    // kept for deletions, then the reserve).
    for (what, r) in [
        ("create", std::fs::File::create(mnt.join("empty")).map(drop)),
        ("mkdir", std::fs::create_dir(mnt.join("dir"))),
        (
            "symlink",
            std::os::unix::fs::symlink("kept", mnt.join("sym")),
        ),
        (
            "link",
            std::fs::hard_link(mnt.join("kept"), mnt.join("hard")),
        ),
    ] {
        assert_eq!(r.unwrap_err().raw_os_error(), Some(28), "{what}");
    }
    let xattr = std::process::Command::new("setfattr")
        .args(["-n", "user.k", "-v", "v"])
        .arg(mnt.join("kept"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&xattr.stderr).contains("No space left"),
        "{xattr:?}"
    );
    assert!(s.ok(&["version"]).contains("still full"));
    let msg = s.fail(&["clone", "hub", "alice/big"]);
    assert!(
        msg.contains("disk that holds dm's data directory is full") && msg.contains("dm gc"),
        "{msg}"
    );
    assert!(
        !s.ok(&["list"]).contains("big"),
        "a refused clone left a dot"
    );
    assert_eq!(
        std::fs::read(mnt.join("kept")).unwrap(),
        b"fsynced before the disk filled"
    );

    // Freed inside dm: delete the file, collect its chunks.
    std::fs::remove_file(mnt.join("fill")).unwrap();
    let out = s.ok(&["gc"]);
    assert!(!out.contains("still full"), "{out}");
    assert!(
        data.join("reserve").exists(),
        "no reserve after the disk had room"
    );
    write_synced(&mnt.join("after"), &vec![2u8; 1 << 20]);
    s.ok(&["commit", "-m", "after"]);
    let log = s.ok(&["log"]);
    assert!(log.contains("before") && log.contains("after"), "{log}");
    assert!(std::fs::read(mnt.join("base")).unwrap() == base);
    s.ok(&["clone", "hub", "alice/big"]);
    let bmnt = PathBuf::from(s.ok(&["mount", "big"]).trim());
    assert!(std::fs::read(bmnt.join("big")).unwrap() == big);
    assert!(!s.ok(&["version"]).contains("still full"));
}

/// `dm mount` onto a file, or onto a directory with files in it (which the
/// mount would hide): refused, naming the path; nothing is mounted.
/// `dm mount DOT PATH` where the current directory has a directory named
/// like the dot (where it was mounted before) mounts it (it was refused as
/// arguments swapped); `..` after a symlink goes where the shell goes.
#[test]
fn mount_paths_are_read_as_the_shell_reads_them() {
    let s = Server::start(DM);
    s.ok(&["init", "webdb"]);
    let here = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        s.dm_command(args)
            .current_dir(here.path())
            .output()
            .unwrap()
    };
    assert!(run(&["mount", "webdb", "webdb"]).status.success());
    let out = run(&["mount", "webdb", "copy"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        here.path().join("copy").to_str().unwrap()
    );
    // Swapped for real: no dot of that name, and a directory here.
    std::fs::create_dir(here.path().join("plain")).unwrap();
    let out = run(&["mount", "plain", "webdb"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("`dm mount webdb plain`"),
        "{err}"
    );
    // `link/..` is the parent of the link's target.
    std::fs::create_dir_all(here.path().join("proj/sub")).unwrap();
    std::os::unix::fs::symlink(here.path().join("proj/sub"), here.path().join("link")).unwrap();
    let out = run(&["mount", "webdb", "link/../lexi"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        here.path().join("proj/lexi").to_str().unwrap(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // `..` after a symlink to nothing is refused, as mkdir refuses it.
    std::os::unix::fs::symlink("nowhere/deep", here.path().join("dangling")).unwrap();
    let out = run(&["mount", "webdb", "dangling/../z"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("symlink to nothing"),
        "{err}"
    );
    for m in ["webdb", "copy", "proj/lexi"] {
        s.ok(&["unmount", here.path().join(m).to_str().unwrap()]);
    }
}

#[test]
fn mount_refuses_files_and_non_empty_directories() {
    let s = Server::start(DM);
    s.ok(&["init", "app"]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("afile");
    std::fs::write(&file, b"x").unwrap();
    let err = s.fail(&["mount", "app", file.to_str().unwrap()]);
    assert!(err.contains("is a file, not a directory"), "{err}");
    let full = dir.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("mine"), b"keep").unwrap();
    let err = s.fail(&["mount", "app", full.to_str().unwrap()]);
    assert!(err.contains("is not empty"), "{err}");
    assert!(!dm_tests::is_mounted(&full));
    assert_eq!(std::fs::read(full.join("mine")).unwrap(), b"keep");
    // Inside a mount of dm (its own, or another dot's): refused.
    let app = PathBuf::from(s.ok(&["mount", "app"]).trim());
    for volume in ["app", "app@master"] {
        let err = s.fail(&["mount", volume, app.join("inside").to_str().unwrap()]);
        assert!(err.contains("inside the mount of"), "{err}");
    }
    assert!(!app.join("inside").exists());
    // An empty (or new) directory is fine, and mounting it again too.
    let empty = dir.path().join("empty");
    s.ok(&["mount", "app", empty.to_str().unwrap()]);
    s.ok(&["mount", "app", empty.to_str().unwrap()]);
    assert!(dm_tests::is_mounted(&empty));
    // A file open there (a database, say) keeps it mounted unless forced:
    // a lazy detach would leave the process writing where nothing is kept.
    let open = std::fs::File::create(empty.join("in-use")).unwrap();
    let err = s.fail(&["unmount", empty.to_str().unwrap()]);
    assert!(
        err.contains("1 open file") && err.contains("dm unmount --force"),
        "{err}"
    );
    assert!(dm_tests::is_mounted(&empty));
    s.ok(&["unmount", "--force", empty.to_str().unwrap()]);
    assert!(!dm_tests::is_mounted(&empty));
    drop(open);
    s.ok(&["mount", "app", empty.to_str().unwrap()]);
    // Through a symlink to the mount (it said nothing was mounted there).
    // Outside the server's directories: the test's cleanup would not see it.
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&empty, &link).unwrap();
    s.ok(&["unmount", link.to_str().unwrap()]);
    assert!(!dm_tests::is_mounted(&empty));
}

/// Mounts that would leave the server too few open files are refused,
/// naming the limit, and a server started with a lower limit than its
/// saved mounts need still starts (it exited, unable to open its own
/// socket, leaving dead mounts behind) and says which it left out.
#[test]
fn mounts_past_the_open_file_limit_are_refused_and_the_server_still_starts() {
    let mut s = Server::start(DM);
    s.stop();
    s.set_open_file_limit(220);
    s.restart();
    let mut mounted = 0;
    let mut refusal = String::new();
    for i in 0..60 {
        let dot = format!("d{i}");
        s.ok(&["init", &dot]);
        let out = s.dm(&["mount", &dot]);
        if !out.status.success() {
            refusal = String::from_utf8_lossy(&out.stderr).into_owned();
            break;
        }
        mounted += 1;
    }
    assert!(mounted >= 5, "only {mounted} mounts under 220 open files");
    assert!(
        refusal.contains("open-file limit"),
        "{mounted} mounted; {refusal}"
    );
    s.stop();
    s.set_open_file_limit(200);
    s.restart();
    assert!(s.ok(&["list"]).contains("d0"));
    assert!(s.log().contains("not mounting"), "{}", s.log());
}

/// While a restarted server restores its mounts (seconds for hundreds),
/// its socket does not listen yet: a client waits for it and says so,
/// rather than saying no server runs. A second server for the same socket
/// is refused meanwhile (and after, as the socket listens then).
#[test]
fn clients_wait_for_a_server_restoring_its_mounts() {
    let mut s = Server::start(DM);
    for i in 0..150 {
        s.ok(&["init", &format!("d{i}")]);
        s.ok(&["mount", &format!("d{i}")]);
    }
    s.stop();
    let marker = PathBuf::from(format!("{}.starting", s.socket().display()));
    for attempt in 0.. {
        s.restart_in_background();
        let t = std::time::Instant::now();
        while !marker.exists() && t.elapsed() < std::time::Duration::from_secs(10) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let second = std::process::Command::new(DM)
            .args(["server", "--no-plugin", "--socket"])
            .arg(s.socket())
            .arg("--data-dir")
            .arg(s.root().join("other-data"))
            .arg("--mount-dir")
            .arg(s.root().join("other-mnt"))
            .output()
            .unwrap();
        assert!(!second.status.success());
        let out = s.dm(&["list"]);
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "{stderr}\n{}", s.log());
        assert!(stdout.contains("d149"), "{stdout}");
        if stderr.contains("is starting") {
            let err = String::from_utf8_lossy(&second.stderr);
            assert!(
                !second.status.success() && err.contains("is starting"),
                "{err}"
            );
            assert!(!marker.exists());
            break;
        }
        assert!(attempt < 3, "never caught the server starting: {stderr}");
        s.stop();
    }
}

/// `dm mount` at a path inside a file system that hangs (another dm
/// server, stopped) is refused after a few seconds, and the server's other
/// commands go on meanwhile: the path was looked at with the mount table
/// locked, which held up every command until the other server went on
/// (and then mounted there after the client had given up).
#[test]
fn mount_in_a_hung_file_system_is_refused_without_holding_others_up() {
    let a = Server::start(DM);
    let b = Server::start(DM);
    a.ok(&["init", "here"]);
    b.ok(&["init", "there"]);
    let theirs = PathBuf::from(b.ok(&["mount", "there"]).trim());
    std::fs::create_dir(theirs.join("empty")).unwrap();
    let target = theirs.join("empty");
    let stop = |sig| {
        // SAFETY: kill(2) on the pid of a child server this test started.
        assert_eq!(unsafe { libc::kill(b.pid() as i32, sig) }, 0);
    };
    // Its attributes in the kernel's cache: a stat of it answers even
    // once the server stops (the first fix asked only that).
    std::fs::metadata(&target).unwrap();
    stop(libc::SIGSTOP);
    let mount = a
        .dm_command(&["mount", "here", target.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let list = a.dm(&["list"]);
    // Answered while the mount still waits for the path (the mount
    // waited holding Docker's lock, which `dm list` takes too).
    let mut mount = mount;
    let waiting = mount.try_wait().unwrap().is_none();
    let done = mount.wait_with_output();
    stop(libc::SIGCONT);
    assert!(list.status.success(), "{list:?}");
    assert!(waiting, "dm list waited for the mount");
    let out = done.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("does not answer"),
        "{err}"
    );
    assert!(!a
        .ok(&["dot", "show", "here"])
        .contains(target.to_str().unwrap()));
}
