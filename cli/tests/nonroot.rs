//! `dm server` run by a user other than root, with no path options: its
//! defaults (store under HOME, socket and mounts under /tmp/dm-UID), mounts
//! through fusermount3, a new dot that user can write to, a store only that
//! user can read, `dm unmount`, recovery after kill -9, a clean SIGTERM, and
//! a runtime directory another user controls refused.
//!
//! Needs root (to make the user) and what `ci/install-deps.sh` sets up:
//! /dev/fuse mode 0666 and fusermount3 setuid root, as Debian's fuse3 does.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const DM: &str = env!("CARGO_BIN_EXE_dm");
const USER: &str = "dmtest-nonroot";
/// A uid that is neither root nor the test user's.
const NOBODY: u32 = 65534;

/// The test user, made for the test and removed after it (with its server
/// and mounts).
struct TestUser {
    home: PathBuf,
    uid: u32,
    bin: PathBuf,
}

impl TestUser {
    fn make() -> TestUser {
        let _ = Command::new("userdel").args(["-r", USER]).output();
        let home = PathBuf::from(format!("/var/tmp/{USER}"));
        let _ = std::fs::remove_dir_all(&home);
        let out = Command::new("useradd")
            .args(["-m", "-d"])
            .arg(&home)
            .arg(USER)
            .output()
            .expect("running useradd");
        assert!(out.status.success(), "useradd: {}", text(&out.stderr));
        let uid = std::fs::metadata(&home).unwrap().uid();
        // The test binary's directory may not be open to other users.
        let bin = home.join("dm");
        std::fs::copy(DM, &bin).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        TestUser { home, uid, bin }
    }

    fn command(&self, prog: &Path) -> Command {
        let mut c = Command::new("runuser");
        c.args(["-u", USER, "--", "env", "-i"])
            .arg(format!("HOME={}", self.home.display()))
            .arg("PATH=/usr/local/bin:/usr/bin:/bin")
            .arg(prog)
            .stdin(Stdio::null());
        c
    }

    fn dm(&self, args: &[&str]) -> Output {
        self.command(&self.bin).args(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.dm(args);
        assert!(
            out.status.success(),
            "dm {args:?} as {USER} failed: {}\nserver log: {}",
            text(&out.stderr),
            self.log()
        );
        text(&out.stdout)
    }

    fn sh(&self, script: &str) -> Output {
        self.command(Path::new("/bin/sh"))
            .args(["-c", script])
            .output()
            .unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.home.join("server.log")).unwrap_or_default()
    }

    fn start_server(&self, extra_env: &[(&str, &str)]) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.home.join("server.log"))
            .unwrap();
        let mut c = Command::new("runuser");
        c.args(["-u", USER, "--", "env", "-i"])
            .arg(format!("HOME={}", self.home.display()))
            .arg("PATH=/usr/local/bin:/usr/bin:/bin");
        for (k, v) in extra_env {
            c.arg(format!("{k}={v}"));
        }
        c.arg(&self.bin)
            .args(["server", "--listen", "off"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    fn wait_ready(&self, server: &mut Child) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.dm(&["version"]).status.success() {
                return;
            }
            if let Ok(Some(st)) = server.try_wait() {
                panic!("the server exited ({st}): {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the server did not answer: {}", self.log());
    }

    fn runtime_dir(&self) -> PathBuf {
        PathBuf::from(format!("/tmp/dm-{}", self.uid))
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("pkill").args(["-KILL", "-u", USER]).output();
        std::thread::sleep(Duration::from_millis(200));
        for m in dm_tests::mounts_under(&self.runtime_dir())
            .into_iter()
            .chain(dm_tests::mounts_under(&self.home))
        {
            let _ = Command::new("umount").arg("-l").arg(&m).output();
        }
        let _ = std::fs::remove_dir_all(self.runtime_dir());
        let _ = Command::new("userdel").args(["-r", USER]).output();
        let _ = std::fs::remove_dir_all(&self.home);
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

fn stop(server: &mut Child) {
    // runuser passes SIGTERM on to the server.
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(server.id().to_string())
        .output();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = server.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the server did not stop on SIGTERM");
}

#[test]
fn a_server_run_by_another_user_than_root() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to make a test user");
        return;
    }
    let fuse_mode = std::fs::metadata("/dev/fuse").unwrap().mode();
    let fusermount = ["/usr/bin/fusermount3", "/bin/fusermount3"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("fusermount3 is installed (ci/install-deps.sh)");
    let setuid = std::fs::metadata(fusermount).unwrap().mode() & 0o4000 != 0;
    assert!(
        fuse_mode & 0o006 == 0o006 && setuid,
        "users other than root cannot mount here: /dev/fuse mode {:o}, {fusermount} setuid {setuid} \
         (bash ci/install-deps.sh sets both as Debian's fuse3 does)",
        fuse_mode & 0o777
    );
    let u = TestUser::make();

    // A runtime directory someone else controls is refused.
    let rt = u.home.join("rt");
    std::fs::create_dir_all(rt.join("dm")).unwrap();
    std::fs::set_permissions(rt.join("dm"), std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut refused = u.start_server(&[("XDG_RUNTIME_DIR", rt.to_str().unwrap())]);
    let st = refused.wait().unwrap();
    assert!(
        !st.success(),
        "a server started on a directory others control"
    );
    assert!(u.log().contains("others may write to it"), "{}", u.log());
    // So is one reached through another user's symlink (it may point it
    // elsewhere later), even to a directory of the user's own.
    let own = u.home.join("own-rt");
    std::fs::create_dir_all(&own).unwrap();
    std::os::unix::fs::chown(&own, Some(u.uid), None).unwrap();
    let rt2 = u.home.join("rt2");
    std::fs::create_dir_all(&rt2).unwrap();
    std::os::unix::fs::symlink(&own, rt2.join("dm")).unwrap();
    std::os::unix::fs::lchown(rt2.join("dm"), Some(NOBODY), Some(NOBODY)).unwrap();
    let mut refused = u.start_server(&[("XDG_RUNTIME_DIR", rt2.to_str().unwrap())]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let st = loop {
        if let Some(st) = refused.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            stop(&mut refused);
            panic!("a server started in another user's symlink: {}", u.log());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!st.success());
    assert!(
        u.log().contains(&format!("belongs to uid {NOBODY}")),
        "{}",
        u.log()
    );

    let mut server = u.start_server(&[]);
    u.wait_ready(&mut server);
    // Defaults: the socket and mounts under /tmp/dm-UID, the store under
    // HOME, both this user's only.
    let rt = u.runtime_dir();
    assert!(rt.join("dm.sock").exists(), "no socket in {}", rt.display());
    let store = u.home.join(".local/share/dm/store");
    for dir in [&rt, &store] {
        let m = std::fs::metadata(dir).unwrap();
        assert_eq!(
            (m.uid(), m.mode() & 0o777),
            (u.uid, 0o700),
            "{}",
            dir.display()
        );
    }

    // Without HOME (`env -i`, some service managers): the home of the
    // password database (the client looked for its config in /root, the
    // server put its store under /tmp).
    let out = u.sh(&format!("unset HOME; {} list", u.bin.display()));
    assert!(out.status.success(), "{}", text(&out.stderr));

    // A new dot is this user's to write (its root and subdot directories
    // are theirs, not root's).
    u.ok(&["init", "app"]);
    u.ok(&["switch", "app"]);
    let path = PathBuf::from(u.ok(&["mount", "app"]).trim());
    assert!(path.starts_with(&rt), "{}", path.display());
    assert_eq!(std::fs::metadata(&path).unwrap().uid(), u.uid);
    let out = u.sh(&format!(
        "echo hello > {p}/f && mkdir {p}/d && sync {p}/f",
        p = path.display()
    ));
    assert!(out.status.success(), "writing: {}", text(&out.stderr));
    u.ok(&["commit", "-m", "one"]);
    // allow_other (user_allow_other in /etc/fuse.conf): root reads it too.
    assert_eq!(std::fs::read(path.join("f")).unwrap(), b"hello\n");
    // A file of another uid (root's here, as in a dot cloned from root's
    // hub) is shown as the user's, who can read it although it is 0600;
    // its stored owner stays for commits and pushes.
    let roots = path.join("roots");
    std::fs::write(&roots, b"root's\n").unwrap();
    std::fs::set_permissions(&roots, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(std::fs::metadata(&roots).unwrap().uid(), u.uid);
    let out = u.sh(&format!("cat {}", roots.display()));
    assert_eq!(text(&out.stdout), "root's\n", "{}", text(&out.stderr));

    // Not over another user's directory, even one open to all (that user
    // saw this server's files in it, and could not unmount them).
    let theirs = tempfile::tempdir().unwrap();
    std::fs::set_permissions(theirs.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    std::os::unix::fs::chown(theirs.path(), Some(NOBODY), Some(NOBODY)).unwrap();
    let out = u.dm(&["mount", "app", theirs.path().to_str().unwrap()]);
    assert!(
        !out.status.success()
            && text(&out.stderr).contains("belongs to")
            && text(&out.stderr).contains("directories of its own user"),
        "{}",
        text(&out.stderr)
    );
    assert!(!dm_tests::is_mounted(theirs.path()));

    // Another mount, then `dm unmount` of it through fusermount3.
    let pin = u.home.join("pin");
    u.ok(&["mount", "app@master", pin.to_str().unwrap()]);
    assert!(dm_tests::is_mounted(&pin));
    // Refused while a shell of the user works in it (it was detached
    // lazily, and the shell went on changing the dot through it, unseen),
    // or holds a directory of it open.
    for script in ["cd {} && sleep 4", "exec 3< {}; sleep 4"] {
        let mut user = u
            .command(Path::new("/bin/sh"))
            .args(["-c", &script.replace("{}", pin.to_str().unwrap())])
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(1000));
        let out = u.dm(&["unmount", pin.to_str().unwrap()]);
        assert!(
            !out.status.success() && text(&out.stderr).contains("is in use"),
            "{script}: {}",
            text(&out.stderr)
        );
        user.wait().unwrap();
    }
    // Another user's process working in it (root's, through allow_other)
    // is not this server's to see: the mount is detached lazily, and
    // `dm unmount` says so (it said nothing).
    let mut other = Command::new("sh")
        .args(["-c", &format!("cd {} && sleep 3", pin.display())])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let out = u.dm(&["unmount", pin.to_str().unwrap()]);
    assert!(
        out.status.success() && text(&out.stderr).contains("detached lazily"),
        "{}",
        text(&out.stderr)
    );
    other.wait().unwrap();
    assert!(!dm_tests::is_mounted(&pin));

    // kill -9, then a restart: the dead mount is cleaned up (fusermount3
    // again) and comes back with the data.
    let out = u.sh(&format!("echo more > {}/g && sync {0}/g", path.display()));
    assert!(out.status.success(), "writing: {}", text(&out.stderr));
    let _ = Command::new("pkill")
        .args(["-KILL", "-u", USER, "-f", "dm server"])
        .output();
    let _ = server.wait();
    let mut server = u.start_server(&[]);
    u.wait_ready(&mut server);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dm_tests::is_mounted(&path) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = u.sh(&format!("cat {p}/f {p}/g", p = path.display()));
    assert_eq!(
        text(&out.stdout),
        "hello\nmore\n",
        "{}\n{}",
        text(&out.stderr),
        u.log()
    );
    assert!(
        !u.log().contains("could not restore"),
        "a mount was not restored: {}",
        u.log()
    );
    // A client with another XDG_RUNTIME_DIR than the server had (it
    // started without one) is told where the server's socket is.
    let out = u.sh(&format!(
        "XDG_RUNTIME_DIR={} {} list",
        u.home.display(),
        u.bin.display()
    ));
    assert!(
        !out.status.success()
            && text(&out.stderr).contains(&format!(
                "a socket of a server of yours is at {}",
                rt.join("dm.sock").display()
            )),
        "{}",
        text(&out.stderr)
    );
    // Nor is the user told of another user's server when the directory
    // (another user's XDG_RUNTIME_DIR, after `su` without `-`) is closed.
    let closed = tempfile::tempdir().unwrap();
    std::fs::set_permissions(closed.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let list_under = |xdg: &Path| {
        let out = u.sh(&format!(
            "XDG_RUNTIME_DIR={} {} list",
            xdg.display(),
            u.bin.display()
        ));
        (out.status.success(), text(&out.stderr))
    };
    let (ok, err) = list_under(closed.path());
    assert!(
        !ok && err.contains("you may not enter")
            && err.contains("su -")
            && err.contains(&rt.join("dm.sock").display().to_string())
            && !err.contains("belongs to another user"),
        "{err}"
    );
    // Nor when that directory is open and holds another user's socket.
    let open = tempfile::tempdir().unwrap();
    std::fs::set_permissions(open.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir(open.path().join("dm")).unwrap();
    let _roots = std::os::unix::net::UnixListener::bind(open.path().join("dm/dm.sock")).unwrap();
    std::fs::set_permissions(
        open.path().join("dm/dm.sock"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let (ok, err) = list_under(open.path());
    assert!(
        !ok && err.contains("belongs to another user") && err.contains("su -"),
        "{err}"
    );
    // Root's client does not talk to this user's server (nor would the
    // user's client to another user's: API keys go over the socket).
    let cfg = tempfile::tempdir().unwrap();
    let out = Command::new(DM)
        .arg("list")
        .env("DM_SOCKET", rt.join("dm.sock"))
        .env("DM_CONFIG", cfg.path().join("config.toml"))
        .output()
        .unwrap();
    assert!(
        !out.status.success()
            && text(&out.stderr).contains(&format!("runs as uid {}, not as you (uid 0)", u.uid)),
        "{}",
        text(&out.stderr)
    );

    // A mount whose path another user turned into a symlink while the
    // server was down is not made again there.
    let pin = u.home.join("pin2");
    u.ok(&["mount", "app@master", pin.to_str().unwrap()]);
    stop(&mut server);
    let elsewhere = u.home.join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::remove_dir(&pin).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &pin).unwrap();
    std::os::unix::fs::lchown(&pin, Some(NOBODY), Some(NOBODY)).unwrap();
    let mut server = u.start_server(&[]);
    u.wait_ready(&mut server);
    assert!(dm_tests::is_mounted(&path), "{}", u.log());
    assert!(!dm_tests::is_mounted(&elsewhere), "{}", u.log());
    assert!(
        u.log().contains("not restoring the mount of")
            && u.log().contains(&format!(
                "at {}: {} is a symlink of uid {NOBODY}",
                pin.display(),
                pin.display()
            )),
        "{}",
        u.log()
    );

    // SIGTERM unmounts everything.
    stop(&mut server);
    assert!(
        dm_tests::mounts_under(&rt).is_empty(),
        "{:?}",
        dm_tests::mounts_under(&rt)
    );

    // A mount dir (or data dir) of root's that this user cannot write in
    // is said as such (it was "Permission denied" on a lock file, or on
    // RocksDB's files).
    let roots = tempfile::tempdir_in("/var/tmp").unwrap();
    std::fs::set_permissions(roots.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = u
        .command(&u.bin)
        .arg("server")
        .arg("--mount-dir")
        .arg(roots.path())
        .arg("--data-dir")
        .arg(u.home.join("data2"))
        .arg("--socket")
        .arg(u.home.join("dm2.sock"))
        .args(["--listen", "off", "--no-plugin"])
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains(&format!(
                "(uid {}) cannot write in {}, which belongs to uid 0",
                u.uid,
                roots.path().display()
            )),
        "{err}"
    );
}
