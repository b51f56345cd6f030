//! The `dm` Docker volume driver on the real Docker engine of this machine:
//! the scenarios of issue 8. Docker only looks for the plugin at
//! `/run/docker/plugins/dm.sock`, so every test here takes one lock and the
//! servers use that real path. The test image is Debian's busybox-static in
//! a `FROM scratch` image, built in the setup (no registry needed).
//!
//! Set `DM_TEST_NO_DOCKER=1` to skip these tests on a machine without Docker.

use dm_tests::Server;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

const DM: &str = env!("CARGO_BIN_EXE_dm");
const PLUGIN_SOCKET: &str = "/run/docker/plugins/dm.sock";
const IMAGE: &str = "dm-test-busybox";
/// A container command that runs until `docker stop` (SIGTERM).
const LOOP: &str = "trap 'exit 0' TERM; while :; do sleep 0.1; done";

static LOCK: Mutex<()> = Mutex::new(());
static IMAGE_BUILT: OnceLock<()> = OnceLock::new();

/// Serializes the tests (one plugin socket) and builds the image once.
/// `None` when Docker tests are disabled.
fn setup() -> Option<MutexGuard<'static, ()>> {
    if std::env::var_os("DM_TEST_NO_DOCKER").is_some() {
        eprintln!("DM_TEST_NO_DOCKER is set: skipping a Docker test");
        return None;
    }
    let guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    IMAGE_BUILT.get_or_init(build_image);
    Some(guard)
}

fn build_image() {
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.exists(),
        "/bin/busybox is missing: install busybox-static (ci/install-deps.sh)"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::copy(busybox, dir.path().join("busybox")).expect("copying busybox");
    std::fs::write(
        dir.path().join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\",\"--install\",\"-s\",\"/bin\"]\nCMD [\"/bin/sh\"]\n",
    )
    .expect("writing the Dockerfile");
    let out = Command::new("docker")
        .args(["build", "-q", "-t", IMAGE])
        .arg(dir.path())
        .output()
        .expect("running docker build");
    assert!(
        out.status.success(),
        "docker build failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running docker")
}

/// Runs `docker ARGS`, asserts success, returns stdout.
fn docker_ok(s: &Server, args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        s.log()
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// A throwaway container on `volume` (at /data) running `sh -c script`.
fn run(s: &Server, volume: &str, script: &str) -> String {
    let v = format!("{volume}:/data");
    docker_ok(
        s,
        &[
            "run",
            "--rm",
            "--volume-driver",
            "dm",
            "-v",
            &v,
            IMAGE,
            "sh",
            "-c",
            script,
        ],
    )
}

/// A container `name` on `volume` (`dot...:/path`, dm's driver) running
/// `sh -c script` in the background.
fn run_detached(s: &Server, name: &str, volume: &str, script: &str) {
    run_detached_with(s, &[], name, volume, script)
}

/// [`run_detached`] with more `docker run` options (`--rm`).
fn run_detached_with(s: &Server, opts: &[&str], name: &str, volume: &str, script: &str) {
    let mut args = vec!["run", "-d"];
    args.extend_from_slice(opts);
    args.extend_from_slice(&[
        "--name",
        name,
        "--volume-driver",
        "dm",
        "-v",
        volume,
        IMAGE,
        "sh",
        "-c",
        script,
    ]);
    docker_ok(s, &args);
    if script.starts_with("trap ") {
        // Until its shell has set the trap, a SIGTERM would end it at once.
        wait_until(
            || term_handled(name),
            || format!("{name} never set its TERM trap"),
        );
    }
}

/// Whether PID 1 of container `name` catches or ignores SIGTERM
/// (`SigCgt`/`SigIgn` of /proc/1/status hold bit 15-1).
fn term_handled(name: &str) -> bool {
    let out = docker(&["exec", name, "cat", "/proc/1/status"]);
    String::from_utf8_lossy(&out.stdout).lines().any(|l| {
        let mask = l
            .strip_prefix("SigCgt:")
            .or_else(|| l.strip_prefix("SigIgn:"));
        mask.and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
            .is_some_and(|m| m & (1 << (libc::SIGTERM - 1)) != 0)
    })
}

/// Removes what a test made in Docker, also when it fails. Dropped before
/// the server (declare it after), so that Docker can still unmount.
struct Cleanup {
    containers: Vec<String>,
    volumes: Vec<String>,
    compose: Option<(Vec<String>, PathBuf, String)>,
}

impl Cleanup {
    fn new(containers: &[&str], volumes: &[&str]) -> Cleanup {
        let c = Cleanup {
            containers: containers.iter().map(|s| s.to_string()).collect(),
            volumes: volumes.iter().map(|s| s.to_string()).collect(),
            compose: None,
        };
        // Leftovers of an earlier failed run.
        c.clean();
        c
    }

    fn clean(&self) {
        if let Some((cmd, file, project)) = &self.compose {
            let _ = Command::new(&cmd[0])
                .args(&cmd[1..])
                .args(["-p", project, "-f"])
                .arg(file)
                .args(["down", "-v", "-t", "1"])
                .output();
        }
        for c in &self.containers {
            let _ = docker(&["rm", "-f", "-v", c]);
        }
        for v in &self.volumes {
            let _ = docker(&["volume", "rm", "-f", v]);
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.clean();
    }
}

/// Asks the plugin proxy to exit at the end of a test (declare it first).
struct ProxyGuard;

impl Drop for ProxyGuard {
    fn drop(&mut self) {
        use std::io::{Read, Write};
        if let Ok(mut s) = std::os::unix::net::UnixStream::connect(PLUGIN_SOCKET) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
            let _ = s.write_all(
                b"POST /dm-proxy/exit HTTP/1.1\r\nHost: dm\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            );
            let mut v = Vec::new();
            let _ = s.read_to_end(&mut v);
        }
    }
}

/// A UDP port free on 127.0.0.1 (for a hub).
fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|u| u.local_addr())
        .unwrap()
        .port()
}

fn start_server() -> Server {
    Server::start_with_plugin(DM, Path::new(PLUGIN_SOCKET))
}

/// One raw request to the plugin socket (`Connection: close`).
fn plugin_call(endpoint: &str, body: &str) -> serde_json::Value {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(PLUGIN_SOCKET).expect("plugin socket");
    let req = format!(
        "POST /{endpoint} HTTP/1.1\r\nHost: dm\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("write");
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).expect("read");
    let text = String::from_utf8_lossy(&resp).to_string();
    let (_, payload) = text.split_once("\r\n\r\n").expect("HTTP answer");
    serde_json::from_str(payload).unwrap_or_else(|e| panic!("not JSON ({e}): {payload}"))
}

fn started_at(s: &Server, name: &str) -> String {
    docker_ok(s, &["inspect", "-f", "{{.State.StartedAt}}", name])
        .trim()
        .to_string()
}

fn running(s: &Server, name: &str) -> bool {
    docker_ok(s, &["inspect", "-f", "{{.State.Running}}", name]).trim() == "true"
}

#[test]
fn commit_and_reset_hard_with_containers() {
    let Some(_lock) = setup() else { return };
    let _proxy = ProxyGuard;
    let s = start_server();
    let _clean = Cleanup::new(&[], &["myapp"]);

    run(&s, "myapp", "echo one > /data/f");
    s.ok(&["switch", "myapp"]);
    s.ok(&["commit", "-m", "one"]);
    run(&s, "myapp", "echo two > /data/f");
    s.ok(&["reset", "--hard", "HEAD"]);
    assert_eq!(
        run(&s, "myapp", "cat /data/f"),
        "one\n",
        "the uncommitted two is discarded"
    );

    run(&s, "myapp", "echo two > /data/f");
    s.ok(&["commit", "-m", "two"]);
    assert_eq!(run(&s, "myapp", "cat /data/f"), "two\n");
    s.ok(&["reset", "--hard", "HEAD^"]);
    assert_eq!(run(&s, "myapp", "cat /data/f"), "one\n");
    assert!(s.ok(&["log"]).contains("one") && !s.ok(&["log"]).contains("    two"));

    // A container that writes as it stops (as a database does): a reset
    // without --hard then finds changes, says where they came from, and
    // the container runs again.
    let c = "dmtest-writes-on-stop";
    let _stopper = Cleanup::new(&[c], &[]);
    run_detached(
        &s,
        c,
        "myapp:/data",
        "trap 'echo bye > /data/shutdown; exit 0' TERM; while :; do sleep 0.1; done",
    );
    let err = s.fail(&["reset", "HEAD"]);
    assert!(err.contains("written after the reset began"), "{err}");
    assert!(running(&s, c));
    // Its files closed as it stopped: no warning about files held open.
    let out = s.dm(&["reset", "--hard", "HEAD"]);
    assert!(out.status.success() && out.stderr.is_empty(), "{out:?}");
    assert!(running(&s, c));
    // A checkout says what it wrote as it stopped stays on the branch left
    // (read after the stop: the note said nothing, the branch clean before).
    let out = s.dm(&["checkout", "-b", "other"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success()
            && err.contains("the uncommitted changes on master, written as its containers stopped"),
        "{err}"
    );
    assert!(running(&s, c));
}

#[test]
fn checkout_restarts_followers_and_leaves_pinned_running() {
    let Some(_lock) = setup() else { return };
    let _proxy = ProxyGuard;
    let s = start_server();
    let (follow, sub, pinned) = ("dmtest-follow", "dmtest-follow-sub", "dmtest-pinned");
    let _clean = Cleanup::new(
        &[follow, sub, pinned],
        &["myapp", "myapp.logs", "myapp@master"],
    );

    run(&s, "myapp", "echo master-data > /data/f");
    s.ok(&["switch", "myapp"]);
    s.ok(&["commit", "-m", "base"]);
    for (name, volume) in [
        (follow, "myapp:/data"),
        (sub, "myapp.logs:/data"),
        (pinned, "myapp@master:/data"),
    ] {
        run_detached(&s, name, volume, LOOP);
    }
    let list = s.ok(&["list"]);
    for name in [follow, sub, pinned] {
        assert!(
            list.contains(&format!("/{name}")),
            "{name} not in dm list:\n{list}"
        );
    }
    let before: Vec<String> = [follow, sub, pinned]
        .iter()
        .map(|n| started_at(&s, n))
        .collect();

    s.ok(&["checkout", "-b", "other"]);

    assert!(running(&s, follow) && running(&s, sub) && running(&s, pinned));
    assert_ne!(
        started_at(&s, follow),
        before[0],
        "the follower was not restarted"
    );
    assert_ne!(
        started_at(&s, sub),
        before[1],
        "the subdot user was not restarted"
    );
    assert_eq!(
        started_at(&s, pinned),
        before[2],
        "the pinned container was restarted"
    );
    // dm list says which branch the pinned one uses (beside the current
    // branch, it read as if it used that one).
    let list = s.ok(&["list"]);
    assert!(list.contains(&format!("/{pinned}@master")), "{list}");
    assert!(!list.contains(&format!("/{follow}@")), "{list}");

    docker_ok(
        &s,
        &["exec", follow, "sh", "-c", "echo other-data > /data/f"],
    );
    assert_eq!(
        docker_ok(&s, &["exec", follow, "cat", "/data/f"]),
        "other-data\n"
    );
    assert_eq!(
        docker_ok(&s, &["exec", pinned, "cat", "/data/f"]),
        "master-data\n"
    );
    s.ok(&["commit", "-m", "on other"]);
    assert_eq!(s.ok(&["log"]).matches("commit ").count(), 2);
    // Checking out the branch it is on already restarts nothing.
    let on_other = started_at(&s, follow);
    s.ok(&["checkout", "other"]);
    assert_eq!(started_at(&s, follow), on_other, "restarted for nothing");

    // dm dot show puts each container on the branch it sees.
    let show = s.ok(&["dot", "show"]);
    let line = |b: &str| {
        show.lines()
            .find(|l| {
                l.trim_start_matches(['*', ' '])
                    .starts_with(&format!("{b} ("))
            })
            .unwrap_or_else(|| panic!("no branch {b} in:\n{show}"))
            .to_string()
    };
    assert!(line("other").contains(&format!("/{follow}")), "{show}");
    assert!(line("other").contains(&format!("/{sub}")), "{show}");
    assert!(line("master").contains(&format!("/{pinned}")), "{show}");
    assert!(!line("master").contains(&format!("/{follow}")), "{show}");

    // Back to master would start the follower on the files the pinned
    // one runs on (two databases on one data directory corrupt it):
    // refused, naming both, before anything stops.
    let err = s.fail(&["checkout", "master"]);
    assert!(
        err.contains(&format!(
            "would start container /{follow} (following the dot)"
        )) && err.contains(&format!(
            "container /{pinned} runs on (pinned to myapp@master)"
        )),
        "{err}"
    );
    assert_eq!(started_at(&s, follow), on_other, "stopped for a refusal");
    assert_eq!(started_at(&s, pinned), before[2]);
    // Once the pinned one is stopped, the follower sees master again.
    docker_ok(&s, &["stop", "-t", "1", pinned]);
    s.ok(&["checkout", "master"]);
    assert_eq!(
        docker_ok(&s, &["exec", follow, "cat", "/data/f"]),
        "master-data\n"
    );
    docker_ok(&s, &["start", pinned]);
    let pinned_started = started_at(&s, pinned);
    // A reset changes what the container pinned to the branch shows too:
    // it is stopped and started around it, like the follower.
    let follower_before = started_at(&s, follow);
    s.ok(&["reset", "--hard", "HEAD"]);
    assert!(running(&s, pinned) && running(&s, follow));
    assert_ne!(
        started_at(&s, pinned),
        pinned_started,
        "pinned: not restarted"
    );
    assert_ne!(
        started_at(&s, follow),
        follower_before,
        "follower: not restarted"
    );
}

/// A process on the host that uses a container's volume path (its
/// Mountpoint) is not a container: stopping the containers for a checkout
/// must not take the mount from under it. A file held open refuses the
/// checkout (its writes would go to the branch left behind); a shell
/// whose working directory is there follows the dot to the new branch.
#[test]
fn host_processes_on_a_volume_path_follow_the_dot_across_checkout() {
    use std::io::Write;
    let Some(_lock) = setup() else { return };
    let _proxy = ProxyGuard;
    let s = start_server();
    let name = "dmtest-hostuse";
    let _clean = Cleanup::new(&[name], &["hostapp"]);
    run_detached(&s, name, "hostapp:/data", LOOP);
    s.ok(&["switch", "hostapp"]);
    s.ok(&["commit", "-m", "base"]);
    let mnt = PathBuf::from(
        docker_ok(
            &s,
            &["volume", "inspect", "-f", "{{.Mountpoint}}", "hostapp"],
        )
        .trim(),
    );
    assert!(mnt.is_absolute(), "no Mountpoint: {}", mnt.display());

    let mut held = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(mnt.join("hostlog"))
        .unwrap();
    held.write_all(b"before\n").unwrap();
    // Refused before the container is stopped (it was restarted for
    // nothing), naming the process.
    let started = started_at(&s, name);
    let err = s.fail(&["checkout", "-b", "feat"]);
    assert!(
        err.contains(&format!("(pid {}) has ", std::process::id()))
            && err.contains("no container was stopped"),
        "{err}"
    );
    assert!(running(&s, name), "the container was not started again");
    assert_eq!(started_at(&s, name), started, "the container was restarted");
    assert!(s.ok(&["branch"]).contains("* master"));
    drop(held);

    // A shell sitting in the directory, no file open: the checkout goes
    // ahead, and the shell's directory shows the new branch.
    let mut shell = Command::new("sh")
        .args(["-c", "exec sleep 60"])
        .current_dir(&mnt)
        .spawn()
        .unwrap();
    s.ok(&["checkout", "-b", "feat"]);
    let cwd = PathBuf::from(format!("/proc/{}/cwd", shell.id()));
    std::fs::write(cwd.join("on-feat"), b"x").unwrap();
    let _ = shell.kill();
    let _ = shell.wait();
    assert!(
        mnt.join("on-feat").exists(),
        "the shell wrote where the dot's path does not show"
    );
    assert!(
        s.ok(&["diff"]).contains("on-feat"),
        "not on feat: {}",
        s.ok(&["diff"])
    );
    s.ok(&["checkout", "master"]);
    assert!(!mnt.join("on-feat").exists(), "the file is on master");
}

/// Two names of one mount (`aliasapp` and `aliasapp.__default__`):
/// removing the name no container uses is Docker's to allow, and the
/// container on the other name keeps its mount.
#[test]
fn removing_one_name_of_a_mount_leaves_it_to_the_other() {
    let Some(_lock) = setup() else { return };
    let _proxy = ProxyGuard;
    let s = start_server();
    let name = "dmtest-alias";
    let _clean = Cleanup::new(&[name], &["aliasapp", "aliasapp.__default__"]);
    run(&s, "aliasapp", "echo kept > /data/f");
    run_detached(&s, name, "aliasapp.__default__:/data", LOOP);
    docker_ok(&s, &["volume", "rm", "aliasapp"]);
    assert_eq!(docker_ok(&s, &["exec", name, "cat", "/data/f"]), "kept\n");
    docker_ok(&s, &["exec", name, "sh", "-c", "echo more > /data/g"]);
    assert!(s.ok(&["list"]).contains("aliasapp"));
}

/// A pull that moves a branch stops the containers that show it and
/// starts them again, as a reset does (a database must not see its files
/// replaced under it); a pull with nothing new restarts nothing. The
/// server is its own hub.
#[test]
fn pull_restarts_the_containers_that_show_the_branch() {
    let Some(_lock) = setup() else { return };
    let _proxy = ProxyGuard;
    let port = free_udp_port();
    let s = Server::start_with_plugin_and_hub(
        DM,
        Path::new(PLUGIN_SOCKET),
        &format!("127.0.0.1:{port}"),
    );
    let name = "dmtest-pull";
    let pushed = "dmtest-pushed";
    let _clean = Cleanup::new(&[name, pushed], &["myapp", "myapp2"]);
    let key = s.ok(&["user", "add", "alice"]).trim().to_string();
    s.remote_add("hub", &format!("alice@127.0.0.1:{port}"), &key);

    run(&s, "myapp", "echo one > /data/f");
    s.ok(&["switch", "myapp"]);
    s.ok(&["commit", "-m", "one"]);
    run(&s, "myapp", "echo two > /data/f");
    s.ok(&["commit", "-m", "two"]);
    s.ok(&["push", "hub"]);
    s.ok(&["reset", "--hard", "HEAD^"]);
    // A container that writes as it stops, as a database does.
    run_detached(
        &s,
        name,
        "myapp:/data",
        "trap 'echo bye >> /data/stopped; exit 0' TERM; while :; do sleep 0.1; done",
    );
    assert_eq!(docker_ok(&s, &["exec", name, "cat", "/data/f"]), "one\n");
    let before = started_at(&s, name);
    // Uncommitted work refuses the pull before any container stops.
    docker_ok(&s, &["exec", name, "sh", "-c", "echo wip > /data/wip"]);
    let err = s.fail(&["pull", "hub", "myapp", "master"]);
    assert!(err.contains("uncommitted changes"), "{err}");
    assert_eq!(started_at(&s, name), before, "stopped for a refused pull");
    s.ok(&["reset", "--hard"]);
    wait_until(
        || term_handled(name),
        || format!("{name} never set its TERM trap again"),
    );
    let before = started_at(&s, name);
    let out = s.ok(&["pull", "hub", "myapp", "master"]);
    // The commit is in this store already (the hub is the same server):
    // nothing to transfer, but the branch moves. What the container wrote
    // as it stopped did not refuse the pull as uncommitted work.
    assert!(
        out.contains("now at") && !out.contains("up to date"),
        "{out}"
    );
    assert!(running(&s, name));
    assert_ne!(
        started_at(&s, name),
        before,
        "not restarted around the pull"
    );
    assert_eq!(docker_ok(&s, &["exec", name, "cat", "/data/f"]), "two\n");
    assert!(!docker(&["exec", name, "test", "-e", "/data/stopped"])
        .status
        .success());
    let after = started_at(&s, name);
    assert!(s
        .ok(&["pull", "hub", "myapp", "master"])
        .contains("up to date"));
    assert_eq!(started_at(&s, name), after, "restarted for nothing");
    // Diverged (the hub has "hub", this branch "mine" instead): the pull
    // is refused without stopping the container.
    run(&s, "myapp", "echo hub > /data/f");
    s.ok(&["commit", "-m", "hub"]);
    s.ok(&["push", "hub"]);
    s.ok(&["reset", "--hard", "HEAD^"]);
    run(&s, "myapp", "echo mine > /data/f");
    s.ok(&["commit", "-m", "mine"]);
    wait_until(
        || term_handled(name),
        || format!("{name} never set its TERM trap again"),
    );
    let before = started_at(&s, name);
    let err = s.fail(&["pull", "hub", "myapp", "master"]);
    assert!(err.contains("diverged"), "{err}");
    assert_eq!(started_at(&s, name), before, "stopped for a refused pull");
    s.ok(&["reset", "--hard", "HEAD^"]);

    // A push into a dot that containers on the hub use moves their branch
    // as a reset would: they are stopped and started again around it (the
    // server is the hub; its admin pushes myapp to the hub's dot myapp2).
    let admin_key = std::fs::read_to_string(s.data_dir().join("admin-key")).unwrap();
    s.remote_add(
        "hubadmin",
        &format!("admin@127.0.0.1:{port}"),
        admin_key.trim(),
    );
    s.ok(&[
        "push",
        "hubadmin",
        "myapp",
        "master",
        "--remote-name",
        "myapp2",
    ]);
    run_detached(
        &s,
        pushed,
        "myapp2:/data",
        "trap 'echo bye >> /data/stopped; exit 0' TERM; while :; do sleep 0.1; done",
    );
    assert_eq!(docker_ok(&s, &["exec", pushed, "cat", "/data/f"]), "two\n");
    let before = started_at(&s, pushed);
    run(&s, "myapp", "echo three > /data/f");
    s.ok(&["commit", "-m", "three"]);
    s.ok(&[
        "push",
        "hubadmin",
        "myapp",
        "master",
        "--remote-name",
        "myapp2",
    ]);
    assert!(running(&s, pushed));
    assert_ne!(
        started_at(&s, pushed),
        before,
        "not restarted around the push"
    );
    assert_eq!(
        docker_ok(&s, &["exec", pushed, "cat", "/data/f"]),
        "three\n"
    );
}

/// A pull downloads with the containers that show its branch running and
/// stops them only around the branch's move (they waited for the whole
/// download before). A writer server pushes 256 MiB through a separate hub;
/// while the pull says it is receiving, the container runs, unrestarted.
/// A paused container refuses the pull before the download (it refused
/// after it); a Ctrl-C while the containers stop for the move moves
/// nothing (the pull moved the branch, and said it had stopped) and keeps
/// what they wrote as they stopped (it was discarded).
#[test]
fn a_pull_downloads_before_it_stops_the_containers() {
    let Some(_lock) = setup() else { return };
    let _proxy = ProxyGuard;
    let port = free_udp_port();
    let hub = Server::start_with_hub(DM, &format!("127.0.0.1:{port}"));
    let writer = Server::start(DM);
    let s = start_server();
    let name = "dmtest-fetchfirst";
    let slow = "dmtest-fetchfirst-slow";
    let bye = "dmtest-fetchfirst-bye";
    let _clean = Cleanup::new(&[name, slow, bye], &["bigapp"]);
    let key = hub.ok(&["user", "add", "alice"]).trim().to_string();
    for x in [&writer, &s] {
        x.remote_add("hub", &format!("alice@127.0.0.1:{port}"), &key);
    }
    writer.ok(&["init", "bigapp"]);
    let path = PathBuf::from(writer.ok(&["mount", "bigapp"]).trim());
    std::fs::write(path.join("f"), "one\n").unwrap();
    writer.ok(&["commit", "--dot", "bigapp", "-m", "one"]);
    writer.ok(&["push", "hub", "bigapp"]);
    s.ok(&["clone", "hub", "bigapp"]);
    run_detached(&s, name, "bigapp:/data", LOOP);
    assert_eq!(docker_ok(&s, &["exec", name, "cat", "/data/f"]), "one\n");
    const BIG: usize = 256 << 20;
    std::fs::write(path.join("big"), dm_tests::random_bytes(7, BIG)).unwrap();
    writer.ok(&["commit", "--dot", "bigapp", "-m", "big"]);
    writer.ok(&["push", "hub", "bigapp"]);

    let before = started_at(&s, name);
    let mut pull = s.dm_spawn(&["pull", "hub", "bigapp", "master"]);
    // The transfer's phase, from the API (a finished one is forgotten
    // when read: polled only while it receives, never once it moves on).
    // The pulls here are the server's transfers 2 to 5.
    let phase = || {
        (1..=6)
            .map(|id| s.api("GET", &format!("/v1/sync/transfers/{id}"), None))
            .find(|(code, v)| *code == 200 && v["finished"] == false)
            .map(|(_, v)| v["phase"].as_str().unwrap_or("").to_string())
    };
    let mut seen = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(
            Instant::now() < deadline,
            "the pull never got past receiving"
        );
        let p1 = phase();
        if !matches!(
            p1.as_deref(),
            None | Some("" | "connecting" | "comparing" | "receiving")
        ) {
            break;
        }
        if p1.as_deref() != Some("receiving") {
            if pull.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let (up, at) = (running(&s, name), started_at(&s, name));
        if phase().as_deref() == Some("receiving") {
            assert!(
                up && at == before,
                "the container was stopped during the download"
            );
            seen += 1;
        }
    }
    assert!(pull.wait().unwrap().success(), "{}", s.log());
    assert!(
        seen > 0,
        "the download was never seen under way (too fast?)"
    );
    assert!(running(&s, name));
    assert_ne!(
        started_at(&s, name),
        before,
        "not restarted around the move"
    );
    assert_eq!(
        docker_ok(&s, &["exec", name, "wc", "-c", "/data/big"]).trim(),
        format!("{BIG} /data/big")
    );

    // A paused container that shows the branch refuses the pull before
    // the download (the next pull downloads it all).
    std::fs::write(path.join("big2"), dm_tests::random_bytes(8, 32 << 20)).unwrap();
    writer.ok(&["commit", "--dot", "bigapp", "-m", "big2"]);
    writer.ok(&["push", "hub", "bigapp"]);
    docker_ok(&s, &["pause", name]);
    let err = s.fail(&["pull", "hub", "bigapp", "master"]);
    assert!(err.contains("paused"), "{err}");
    docker_ok(&s, &["unpause", name]);
    let out = s.ok(&["pull", "hub", "bigapp", "master"]);
    assert!(out.contains("MiB)") && !out.contains(" 0 chunks"), "{out}");

    // Ctrl-C while the containers stop for the move (one takes 3 s): the
    // branch does not move, they start again, and the rerun moves it.
    std::fs::write(path.join("c3"), "three\n").unwrap();
    writer.ok(&["commit", "--dot", "bigapp", "-m", "c3"]);
    writer.ok(&["push", "hub", "bigapp"]);
    run_detached_with(
        &s,
        &["--stop-timeout", "3"],
        slow,
        "bigapp:/data",
        "while :; do sleep 0.1; done",
    );
    // One that writes as it stops, as a database does.
    run_detached(
        &s,
        bye,
        "bigapp:/data",
        "trap 'echo bye >> /data/bye; exit 0' TERM; while :; do sleep 0.1; done",
    );
    let before_slow = started_at(&s, slow);
    let pull = s
        .dm_command(&["pull", "hub", "bigapp", "master"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(
        || phase().is_some_and(|p| p.starts_with("stopping") && p.contains(slow)),
        || "the pull never said it stops the containers".into(),
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pull.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = pull.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("stopped; nothing moved"),
        "{err}"
    );
    wait_until(
        || running(&s, slow) && started_at(&s, slow) != before_slow,
        || format!("{slow} was not started again"),
    );
    assert!(!docker(&["exec", name, "test", "-e", "/data/c3"])
        .status
        .success());
    // What it wrote as it stopped stays: nothing moved (it was discarded).
    let status = s.ok(&["--dot", "bigapp", "status"]);
    assert!(status.contains("bye"), "{status}");
    s.ok(&["--dot", "bigapp", "reset", "--hard"]);
    let out = s.ok(&["pull", "hub", "bigapp", "master"]);
    assert!(out.contains("now at"), "{out}");
    assert_eq!(docker_ok(&s, &["exec", slow, "cat", "/data/c3"]), "three\n");
}

/// `docker compose` when it works, else `docker-compose`.
fn compose_cmd() -> Vec<String> {
    let v2 = Command::new("docker")
        .args(["compose", "version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if v2 {
        vec!["docker".into(), "compose".into()]
    } else {
        vec!["docker-compose".into()]
    }
}

#[test]
fn compose_two_subdots_commit_and_reset_together() {
    let Some(_lock) = setup() else { return };
    let _proxy = ProxyGuard;
    let s = start_server();
    // The seed's compose file, the images replaced by the test image (and a
    // command that keeps them up, which the database images had).
    let file = s.root().join("docker-compose.yml");
    std::fs::write(
        &file,
        format!(
            r#"version: '3'
services:
  orders-db:
    image: {IMAGE}
    command: ["sh", "-c", "{LOOP}"]
    hostname: orders-db
    volumes:
     - myapp.orders-db:/data/db
  catalog-db:
    image: {IMAGE}
    command: ["sh", "-c", "{LOOP}"]
    environment:
     - MYSQL_ROOT_PASSWORD=secret
    hostname: catalog-db
    volumes:
     - myapp.catalog-db:/var/lib/mysql

volumes:
  myapp.orders-db:
    driver: dm
  myapp.catalog-db:
    driver: dm
"#
        ),
    )
    .expect("writing the compose file");
    let project = "dmtest";
    let cmd = compose_cmd();
    let mut clean = Cleanup::new(&[], &[]);
    clean.compose = Some((cmd.clone(), file.clone(), project.to_string()));
    clean.clean();
    let compose = |args: &[&str]| -> String {
        let out = Command::new(&cmd[0])
            .args(&cmd[1..])
            .args(["-p", project, "-f"])
            .arg(&file)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running compose");
        assert!(
            out.status.success(),
            "{cmd:?} {args:?} failed: {}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            s.log()
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    compose(&["up", "-d"]);
    let id = |service: &str| compose(&["ps", "-q", service]).trim().to_string();
    let (orders, catalog) = (id("orders-db"), id("catalog-db"));
    assert!(!orders.is_empty() && !catalog.is_empty());

    // Compose prefixes volume names with the project: the dot is
    // `dmtest_myapp`, with the subdots orders-db and catalog-db.
    let dot = format!("{project}_myapp");
    let list = s.ok(&["list"]);
    assert!(list.contains(&dot), "{list}");
    s.ok(&["switch", &dot]);

    let write = |c: &str, path: &str, text: &str| {
        docker_ok(
            &s,
            &["exec", c, "sh", "-c", &format!("echo {text} > {path}")],
        );
    };
    let read = |c: &str, path: &str| docker_ok(&s, &["exec", c, "cat", path]);
    write(&orders, "/data/db/orders", "orders-1");
    write(&catalog, "/var/lib/mysql/catalog", "catalog-1");
    s.ok(&["commit", "-m", "data in two dbs"]);
    // Both subdots are in the one commit.
    let root = s.root().join("whole");
    s.ok(&[
        "mount",
        &format!("{dot}.__root__"),
        root.to_str().expect("utf-8"),
    ]);
    assert_eq!(
        std::fs::read_to_string(root.join("orders-db/orders")).expect("orders"),
        "orders-1\n"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("catalog-db/catalog")).expect("catalog"),
        "catalog-1\n"
    );
    s.ok(&["unmount", root.to_str().expect("utf-8")]);

    write(&orders, "/data/db/orders", "orders-2");
    write(&catalog, "/var/lib/mysql/catalog", "catalog-2");
    s.ok(&["reset", "--hard", "HEAD"]);
    // The containers were restarted around the reset and see the commit.
    assert!(running(&s, &orders) && running(&s, &catalog));
    assert_eq!(read(&orders, "/data/db/orders"), "orders-1\n");
    assert_eq!(read(&catalog, "/var/lib/mysql/catalog"), "catalog-1\n");
    compose(&["down", "-t", "1"]);
}

#[test]
fn docker_volume_ls_inspect_rm_and_bad_names() {
    let Some(_lock) = setup() else { return };
    let _proxy = ProxyGuard;
    let s = start_server();
    let c = "dmtest-user";
    let _clean = Cleanup::new(
        &[c],
        &[
            "myapp",
            "myapp@nosuch",
            "myapp@HEAD",
            "x.y.z",
            "newdot@dev",
            "stale",
        ],
    );

    docker_ok(&s, &["volume", "create", "-d", "dm", "myapp"]);
    assert!(s.ok(&["list"]).contains("myapp"));
    let ls = docker_ok(&s, &["volume", "ls", "--format", "{{.Driver}} {{.Name}}"]);
    assert!(ls.lines().any(|l| l == "dm myapp"), "{ls}");
    let inspect: serde_json::Value =
        serde_json::from_str(&docker_ok(&s, &["volume", "inspect", "myapp"])).expect("JSON");
    assert_eq!(inspect[0]["Driver"], "dm");
    assert_eq!(inspect[0]["Status"]["dot"], "myapp");
    assert_eq!(inspect[0]["Status"]["branch"], "master");
    assert_eq!(inspect[0]["Status"]["pinned"], false);
    // The dot's creation time, not Docker's zero time.
    let created = inspect[0]["CreatedAt"].as_str().unwrap_or_default();
    assert!(
        created.len() >= 20 && !created.starts_with("0001"),
        "CreatedAt should be the dot's creation time: {inspect}"
    );

    // A pinned branch must exist; bad names are refused with the reason.
    let out = docker(&["volume", "create", "-d", "dm", "myapp@nosuch"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("`dm --dot myapp branch nosuch`"),
        "{err}"
    );
    // No advice to make a branch that cannot be made.
    let out = docker(&["volume", "create", "-d", "dm", "myapp@HEAD"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && !err.contains("branch HEAD`") && err.contains("HEAD"),
        "{err}"
    );
    let out = docker(&["volume", "create", "-d", "dm", "x.y.z"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("invalid dm volume name"),
        "{err}"
    );
    // A branch of a dot that does not exist: refused, and no dot is left.
    let out = docker(&["volume", "create", "-d", "dm", "newdot@dev"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("dm init newdot"),
        "{err}"
    );
    assert!(!s.ok(&["list"]).contains("newdot"));
    // Malformed requests on the plugin socket get an Err, not a hang or a crash.
    let v = plugin_call("VolumeDriver.Create", "{not json");
    assert!(
        v["Err"]
            .as_str()
            .is_some_and(|e| e.contains("VolumeDriver.Create: malformed request")),
        "{v}"
    );
    let v = plugin_call("VolumeDriver.Mount", r#"{"Name":"myapp"}"#);
    assert!(v["Err"].as_str().is_some_and(|e| e.contains("ID")), "{v}");
    assert_eq!(
        plugin_call("Plugin.Activate", "")["Implements"][0],
        "VolumeDriver"
    );
    // A mount request whose Unmount never came (Docker died meanwhile)
    // does not block `docker volume rm` forever once no container uses it.
    docker_ok(&s, &["volume", "create", "-d", "dm", "stale"]);
    let v = plugin_call(
        "VolumeDriver.Mount",
        r#"{"Name":"stale","ID":"never-unmounted"}"#,
    );
    assert!(v["Err"].as_str().unwrap_or("").is_empty(), "{v}");
    docker_ok(&s, &["volume", "rm", "stale"]);
    assert!(
        !s.ok(&["dot", "show", "stale"]).contains("/stale/"),
        "still mounted"
    );

    // In use: Docker refuses rm; once the container is gone rm works, the
    // volume leaves `docker volume ls`, and the dot (the data) stays.
    // The volume exists: no --volume-driver needed.
    docker_ok(
        &s,
        &[
            "run",
            "-d",
            "--name",
            c,
            "-v",
            "myapp:/data",
            IMAGE,
            "sh",
            "-c",
            LOOP,
        ],
    );
    let mnt = docker_ok(&s, &["volume", "inspect", "-f", "{{.Mountpoint}}", "myapp"]);
    assert!(mnt.trim().ends_with("admin/myapp/__default__"), "{mnt}");
    // `dm mount` of the same path takes it over: the container's end does
    // not unmount it from under the user.
    let user = s.ok(&["mount", "myapp"]);
    assert_eq!(user.trim(), mnt.trim());
    docker_ok(&s, &["exec", c, "sh", "-c", "echo shared > /data/u"]);
    assert!(!docker(&["volume", "rm", "myapp"]).status.success());
    // Nor does dm delete a dot a running container uses, -f or not.
    let err = s.fail(&["dot", "delete", "-f", "myapp"]);
    assert!(err.contains(c) && err.contains("docker stop"), "{err}");
    assert!(s.ok(&["list"]).contains("myapp"));
    docker_ok(&s, &["rm", "-f", c]);
    assert_eq!(
        std::fs::read_to_string(Path::new(user.trim()).join("u")).expect("dm mount kept"),
        "shared\n"
    );
    s.ok(&["unmount", user.trim()]);
    docker_ok(&s, &["volume", "rm", "myapp"]);
    let ls = docker_ok(&s, &["volume", "ls", "--format", "{{.Driver}} {{.Name}}"]);
    assert!(!ls.lines().any(|l| l == "dm myapp"), "{ls}");
    assert!(!docker(&["volume", "inspect", "myapp"]).status.success());
    assert!(
        s.ok(&["list"]).contains("myapp"),
        "docker volume rm keeps the dot"
    );
}

#[test]
fn daemon_down_fails_fast_and_restart_serves_volumes() {
    let Some(_lock) = setup() else { return };
    let _proxy = ProxyGuard;
    let mut s = start_server();
    let c = "dmtest-survivor";
    let crashy = "dmtest-crashy";
    let never = "dmtest-never-started";
    let down = "dmtest-stopped-while-down";
    let _clean = Cleanup::new(
        &[c, crashy, never, down],
        &["keepme", "dmtest-plain", "downvol"],
    );
    run_detached(&s, down, "downvol:/data", LOOP);
    let downvol = s.mount_dir().join("admin/downvol/__default__");
    assert!(dm_tests::is_mounted(&downvol));
    run(&s, "keepme", "echo kept > /data/f");
    // A container running across the restarts. (Not one with --rm: the
    // server restarts it with `docker restart`, which usually keeps it, but
    // Docker removes it when it handles the exit after the restart.)
    run_detached(&s, c, "keepme:/data", LOOP);
    // One that exits when its files go away, as a database does, with a
    // restart policy: Docker's restart finds no server and gives up; the
    // server, once up, starts it.
    run_detached_with(
        &s,
        &["--restart", "unless-stopped"],
        crashy,
        "keepme:/data",
        "while cat /data/f >/dev/null; do sleep 0.2; done; exit 1",
    );

    // A plugin proxy killed while the server runs is replaced.
    let pid = plugin_call("dm-proxy/info", "")["pid"].as_i64().unwrap();
    let st = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(PLUGIN_SOCKET).is_err() {
        assert!(
            Instant::now() < deadline,
            "no new plugin proxy\n{}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(run(&s, "keepme", "cat /data/f"), "kept\n");

    for crash in [false, true] {
        if crash {
            s.kill9();
        } else {
            assert_eq!(s.stop(), Some(0));
        }
        let t = Instant::now();
        let out = docker(&[
            "run",
            "--rm",
            "--volume-driver",
            "dm",
            "-v",
            "keepme:/data",
            IMAGE,
            "cat",
            "/data/f",
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains("the dm server is not running"), "{err}");
        // Docker's own retries of an unreachable plugin take 30 s; a
        // loaded machine needs some seconds to create a container.
        assert!(
            t.elapsed() < Duration::from_secs(12),
            "took {:?}",
            t.elapsed()
        );
        let t = Instant::now();
        docker(&["volume", "ls"]);
        assert!(
            t.elapsed() < Duration::from_secs(12),
            "ls took {:?}",
            t.elapsed()
        );
        // Docker asks every driver it has used about a new volume made
        // without a driver: dm's proxy must not claim it.
        docker_ok(&s, &["run", "--rm", "-v", "dmtest-plain:/c", IMAGE, "true"]);
        let driver = docker_ok(
            &s,
            &["volume", "inspect", "-f", "{{.Driver}}", "dmtest-plain"],
        );
        assert_eq!(driver.trim(), "local");
        docker_ok(&s, &["volume", "rm", "dmtest-plain"]);
        // A container whose first start failed for want of a server never
        // ran: the user was told to retry, so the server must not start it
        // later (a retried `docker run` would then run twice).
        if !crash {
            let out = docker(&[
                "run",
                "-d",
                "--restart",
                "always",
                "--name",
                never,
                "--volume-driver",
                "dm",
                "-v",
                "keepme:/data",
                IMAGE,
                "sh",
                "-c",
                "echo ran >> /data/never; sleep 1000",
            ]);
            assert!(!out.status.success(), "started with the server down");
            // Its Unmount finds no server.
            docker_ok(&s, &["stop", "-t", "1", down]);
        }

        s.restart();
        // No `docker volume create`: the volume is served again.
        assert_eq!(run(&s, "keepme", "cat /data/f"), "kept\n");
        let ls = docker_ok(&s, &["volume", "ls", "--format", "{{.Driver}} {{.Name}}"]);
        assert!(ls.lines().any(|l| l == "dm keepme"), "{ls}");
        // The running container was restarted onto a live mount.
        {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let out = docker(&["exec", c, "cat", "/data/f"]);
                if out.status.success() && out.stdout == b"kept\n" {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{c} still has a dead mount: {}\nserver log:\n{}",
                    String::from_utf8_lossy(&out.stderr),
                    s.log()
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(running(&s, crashy)
            && docker(&["exec", crashy, "cat", "/data/f"]).stdout == b"kept\n")
        {
            assert!(
                Instant::now() < deadline,
                "{crashy} was not started again (crash: {crash})\n{}",
                s.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        // The stale containers were restarted above, at once.
        let state = docker_ok(&s, &["inspect", "-f", "{{.State.Status}}", never]);
        // Mount requests whose Unmount came while no server ran are
        // forgotten: none pins a mount, and the restarted containers
        // count once each.
        let deadline = Instant::now() + Duration::from_secs(20);
        while dm_tests::is_mounted(&downvol) {
            assert!(
                Instant::now() < deadline,
                "{down} was stopped, but its volume stays mounted\n{}",
                s.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let table: serde_json::Value = serde_json::from_slice(
            &std::fs::read(s.data_dir().join("docker-volumes.json")).expect("volume table"),
        )
        .expect("JSON");
        let keepme = s.mount_dir().join("admin/keepme/__default__");
        assert_eq!(
            table["mounts"][keepme.display().to_string()]["ids"]
                .as_array()
                .map(Vec::len),
            Some(2),
            "{c} and {crashy} each mount keepme once: {table}"
        );
        assert_eq!(state.trim(), "created", "{}", s.log());
        assert_eq!(
            run(
                &s,
                "keepme",
                "test -e /data/never && echo ran || echo never"
            ),
            "never\n"
        );
    }
}

#[test]
fn docker_cp_rm_containers_options_anonymous_and_deleted_dots() {
    let Some(_lock) = setup() else { return };
    let _proxy = ProxyGuard;
    let s = start_server();
    let (c, rm, pinned) = ("dmtest-cp", "dmtest-autoremove", "dmtest-cp-pinned");
    let _clean = Cleanup::new(
        &[
            c,
            rm,
            pinned,
            "dmtest-anon",
            "dmtest-anon-pinned",
            "dmtest-cp-twice",
        ],
        &[
            "cptwice",
            "cpvol",
            "cpvol@side",
            "rmvol",
            "bs8",
            "gone",
            "gone@master",
            "keep",
        ],
    );

    // `docker cp` on a running container mounts its volumes again with the
    // same id and unmounts them after: the container's mount must stay.
    run_detached(&s, c, "cpvol:/data", LOOP);
    docker_ok(&s, &["exec", c, "sh", "-c", "echo before > /data/f"]);
    let copied = docker_ok(&s, &["cp", &format!("{c}:/data/f"), "-"]);
    assert!(copied.contains("before"), "{copied}");
    let mnt = docker_ok(&s, &["volume", "inspect", "-f", "{{.Mountpoint}}", "cpvol"]);
    assert!(
        mnt.trim().ends_with("admin/cpvol/__default__"),
        "docker cp unmounted the running container's volume: {mnt:?}\n{}",
        s.log()
    );
    docker_ok(&s, &["exec", c, "sh", "-c", "echo after > /data/f"]);
    assert_eq!(
        std::fs::read_to_string(Path::new(mnt.trim()).join("f")).unwrap(),
        "after\n"
    );
    // One volume at two mount points of a container: a `docker cp` into it
    // leaves the mount (it took both of the container's requests away).
    let twice = "dmtest-cp-twice";
    docker_ok(
        &s,
        &[
            "run",
            "-d",
            "--name",
            twice,
            "--volume-driver",
            "dm",
            "-v",
            "cptwice:/a",
            "-v",
            "cptwice:/b",
            IMAGE,
            "sh",
            "-c",
            LOOP,
        ],
    );
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("z"), "copied in\n").unwrap();
    let from = src.path().join("z").display().to_string();
    docker_ok(&s, &["cp", &from, &format!("{twice}:/b/z1")]);
    let mnt2 = docker_ok(
        &s,
        &["volume", "inspect", "-f", "{{.Mountpoint}}", "cptwice"],
    );
    assert!(
        mnt2.trim().ends_with("admin/cptwice/__default__")
            && Path::new(mnt2.trim()).join("z1").exists(),
        "docker cp unmounted a volume mounted twice: {mnt2:?}\n{}",
        s.log()
    );
    docker_ok(&s, &["rm", "-f", twice]);
    // Neither `dm unmount` nor `dm branch -d -f` pulls a mount from under
    // a running container.
    let err = s.fail(&["unmount", mnt.trim()]);
    assert!(err.contains(c) && err.contains("docker stop"), "{err}");
    s.ok(&["switch", "cpvol"]);
    s.ok(&["commit", "-m", "one"]);
    s.ok(&["checkout", "-b", "side"]);
    s.ok(&["checkout", "master"]);
    run_detached(&s, pinned, "cpvol@side:/data", LOOP);
    let err = s.fail(&["branch", "-d", "-f", "side"]);
    assert!(err.contains(pinned) && err.contains("docker stop"), "{err}");
    assert!(running(&s, pinned));

    // A `--rm` container would be deleted by the stop around a checkout:
    // the checkout is refused, and nothing changes.
    run_detached_with(&s, &["--rm"], rm, "rmvol:/data", LOOP);
    s.ok(&["switch", "rmvol"]);
    s.ok(&["commit", "-m", "one"]);
    let err = s.fail(&["checkout", "-b", "other"]);
    assert!(err.contains("--rm") && err.contains(rm), "{err}");
    assert!(running(&s, rm), "the --rm container is gone");
    assert!(!s.ok(&["branch"]).contains("other"), "a branch was made");
    let err = s.fail(&["reset", "--hard", "HEAD"]);
    assert!(err.contains("--rm"), "{err}");
    assert!(running(&s, rm));
    docker_ok(&s, &["rm", "-f", rm]);

    // Driver options: block-size for a new dot; anything else is refused.
    docker_ok(
        &s,
        &["volume", "create", "-d", "dm", "-o", "block-size=8K", "bs8"],
    );
    assert!(
        s.ok(&["dot", "show", "-H", "bs8"])
            .contains("block_size\t8192"),
        "{}",
        s.ok(&["dot", "show", "-H", "bs8"])
    );
    let out = docker(&[
        "volume",
        "create",
        "-d",
        "dm",
        "-o",
        "colour=red",
        "bad-opt",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("block-size"), "{err}");
    assert!(!s.ok(&["list"]).contains("bad-opt"));

    // Anonymous volumes (`-v /path`) go with their `--rm` container, as
    // Docker's own do.
    docker_ok(
        &s,
        &[
            "run",
            "--rm",
            "--volume-driver",
            "dm",
            "-v",
            "/scratch",
            IMAGE,
            "sh",
            "-c",
            "echo x > /scratch/f",
        ],
    );
    let list = s.ok(&["list", "-H"]);
    assert!(
        !list
            .split_whitespace()
            .any(|w| w.trim_start_matches("admin/").len() == 64),
        "an anonymous volume's dot was left:\n{list}"
    );

    // ... but not while its dot is in use otherwise: the volume goes, its
    // dot stays with what was written there. Used by a `dm mount` of it
    // (at a path of the user's, or at dm's own path, which the plugin's
    // mount has: it was deleted under that), by a shell working in its
    // mount, or by another volume name Docker remembers for a stopped
    // container.
    let (anon, pinned_user) = ("dmtest-anon", "dmtest-anon-pinned");
    let users = ["dm mount", "dm mount at dm's path", "shell", "volume name"];
    for (i, user) in users.into_iter().enumerate() {
        run_detached_with(&s, &["-v", "/scratch"], anon, "keep:/unused", LOOP);
        let name = docker_ok(
            &s,
            &[
                "inspect",
                "-f",
                "{{range .Mounts}}{{if eq .Destination \"/scratch\"}}{{.Name}}{{end}}{{end}}",
                anon,
            ],
        );
        let name = name.trim().to_string();
        // Docker's .Source is empty for a plugin's volume: its mountpoint.
        let source = docker_ok(&s, &["volume", "inspect", "-f", "{{.Mountpoint}}", &name]);
        let source = source.trim();
        docker_ok(&s, &["exec", anon, "sh", "-c", "echo kept > /scratch/f"]);
        let host = tempfile::tempdir().unwrap();
        let mut shell = None;
        match user {
            "dm mount" => {
                s.ok(&["mount", &name, host.path().to_str().unwrap()]);
            }
            "dm mount at dm's path" => {
                assert_eq!(s.ok(&["mount", &name]).trim(), source);
            }
            "shell" => {
                shell = Some(
                    Command::new("sh")
                        .args(["-c", &format!("cd {source} && sleep 6")])
                        .spawn()
                        .unwrap(),
                );
                std::thread::sleep(Duration::from_millis(500));
            }
            _ => {
                let volume = format!("{name}@master:/y");
                docker_ok(
                    &s,
                    &[
                        "run",
                        "--name",
                        pinned_user,
                        "--volume-driver",
                        "dm",
                        "-v",
                        &volume,
                        IMAGE,
                        "true",
                    ],
                );
            }
        }
        docker_ok(&s, &["rm", "-f", "-v", anon]);
        assert!(
            s.ok(&["list", "-H"]).contains(&name),
            "{user}: the dot went with the volume:\n{}",
            s.log()
        );
        assert_eq!(
            s.log().matches("is kept, in use at").count(),
            i + 1,
            "{}",
            s.log()
        );
        match user {
            "dm mount" => {
                assert_eq!(
                    std::fs::read_to_string(host.path().join("f")).unwrap(),
                    "kept\n"
                );
                s.ok(&["unmount", host.path().to_str().unwrap()]);
            }
            "dm mount at dm's path" => {
                assert_eq!(
                    std::fs::read_to_string(Path::new(source).join("f")).unwrap(),
                    "kept\n"
                );
            }
            "shell" => {
                shell.unwrap().wait().unwrap();
            }
            _ => {
                docker_ok(&s, &["rm", "-v", pinned_user]);
                docker_ok(&s, &["volume", "rm", &format!("{name}@master")]);
            }
        }
        s.ok(&["dot", "delete", "-f", &name]);
    }

    // A dot deleted behind Docker's back is made again when Docker mounts
    // the volume it still knows, with the options the volume was created
    // with (Docker shows them still and does not call Create again), also
    // through another name of the dot.
    docker_ok(
        &s,
        &[
            "volume",
            "create",
            "-d",
            "dm",
            "-o",
            "block-size=8K",
            "gone",
        ],
    );
    s.ok(&["dot", "delete", "-f", "gone"]);
    // Listed meanwhile, as inspect shows it (a cleanup by `ls` missed it).
    let ls = docker_ok(&s, &["volume", "ls", "-q", "--filter", "driver=dm"]);
    assert!(ls.lines().any(|l| l == "gone"), "{ls}");
    assert_eq!(
        run(&s, "gone", "echo back > /data/f; cat /data/f"),
        "back\n"
    );
    let show = s.ok(&["dot", "show", "-H", "gone"]);
    assert!(show.contains("block_size\t8192"), "{show}");
    s.ok(&["dot", "delete", "-f", "gone"]);
    assert_eq!(run(&s, "gone@master", "ls /data"), "");
    let show = s.ok(&["dot", "show", "-H", "gone"]);
    assert!(show.contains("block_size\t8192"), "{show}");
}

#[test]
fn switch_waits_for_containers_starting_meanwhile_and_refuses_paused_ones() {
    let Some(_lock) = setup() else { return };
    let _proxy = ProxyGuard;
    let s = start_server();
    let (slow, late, paused, pinned) = (
        "dmtest-slow-stop",
        "dmtest-late",
        "dmtest-paused",
        "dmtest-pinned",
    );
    let _clean = Cleanup::new(&[slow, late, paused, pinned], &["sep", "sep@master", "pz"]);
    run(&s, "sep", "echo base > /data/f");
    s.ok(&["switch", "sep"]);
    s.ok(&["commit", "-m", "base"]);
    // Pinned: a checkout leaves it running, and its note does not name it
    // (it named every container of the dot).
    run_detached(&s, pinned, "sep@master:/data", LOOP);
    // Ignores SIGTERM: the stop around the checkout takes Docker's 10 s.
    run_detached(
        &s,
        slow,
        "sep:/data",
        "trap '' TERM; while :; do sleep 0.1; done",
    );
    let stops = |s: &Server| {
        s.log()
            .lines()
            .filter(|l| l.contains("stopping container") && l.contains(slow))
            .count()
    };
    let before = stops(&s);
    let checkout = {
        let (dm, sock, cfg) = (DM.to_string(), s.socket(), s.config());
        std::thread::spawn(move || {
            Command::new(dm)
                .args(["checkout", "-b", "other"])
                .env("DM_SOCKET", sock)
                .env("DM_CONFIG", cfg)
                .output()
                .expect("running dm checkout")
        })
    };
    wait_until(
        || stops(&s) > before,
        || format!("the checkout never stopped {slow}:\n{}", s.log()),
    );
    // Started while the checkout stops the slow one: it must start on the
    // new branch, not on master and then be switched under its feet.
    run_detached(
        &s,
        late,
        "sep:/data",
        &format!("echo started > /data/late; {LOOP}"),
    );
    let out = checkout.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "checkout failed: {err}");
    // Not silent for the 10 s.
    assert!(
        err.contains(&format!(
            "waiting for the containers using sep to stop ({slow})"
        )),
        "{err}"
    );
    let inspect = tempfile::tempdir().unwrap();
    let master = inspect.path();
    s.ok(&["mount", "sep@master", master.to_str().unwrap()]);
    assert!(
        !master.join("late").exists(),
        "the late container wrote on master before being switched"
    );
    s.ok(&["unmount", master.to_str().unwrap()]);
    assert_eq!(
        docker_ok(&s, &["exec", late, "cat", "/data/late"]),
        "started\n"
    );
    // Back on master the followers would run on the pinned one's files:
    // refused until it stops (see checkout_restarts_followers_and_leaves_pinned_running).
    docker_ok(&s, &["stop", "-t", "1", pinned]);
    // A client interrupted while the switch waits says that it goes on in
    // the server (it ended without a word, and the dot switched later).
    let before = stops(&s);
    let child = s
        .dm_command(&["checkout", "master"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(
        || stops(&s) > before,
        || format!("the checkout never stopped {slow}:\n{}", s.log()),
    );
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("the server goes on with the switch"), "{err}");
    wait_until(
        || s.ok(&["branch"]).contains("* master"),
        || format!("the interrupted checkout did not go on:\n{}", s.log()),
    );

    // A paused container cannot be stopped: refused, nothing switched.
    run_detached(&s, paused, "pz:/data", LOOP);
    docker_ok(&s, &["exec", paused, "sh", "-c", "echo kept > /data/f"]);
    s.ok(&["switch", "pz"]);
    s.ok(&["commit", "-m", "one"]);
    docker_ok(&s, &["pause", paused]);
    let err = s.fail(&["checkout", "-b", "x"]);
    assert!(err.contains("paused") && err.contains(paused), "{err}");
    assert!(!s.ok(&["branch"]).contains('x'));
    // Nor is its dot deleted under it (unpaused, it went on without its
    // files).
    let err = s.fail(&["dot", "delete", "-f", "pz"]);
    assert!(err.contains(&format!("{paused} (paused)")), "{err}");
    // A server that restarts restarts it too: its mount died with the
    // previous server (unpaused, it failed at its first file access).
    let mut s = s;
    s.kill9();
    s.restart();
    wait_until(
        || running(&s, paused) && docker(&["exec", paused, "cat", "/data/f"]).stdout == b"kept\n",
        || format!("{paused} was left on a dead mount:\n{}", s.log()),
    );
    assert!(s.log().contains("it was paused"), "{}", s.log());
}

/// A switch stops the containers that use the dot all at once, each as
/// `docker stop` would, with its own stop timeout: a database that asks for
/// 40 s (`--stop-timeout`) gets the time to shut down cleanly (dm used a
/// fixed 10 s, then killed it), and containers do not wait for each other
/// to stop (they were stopped one after another, 10 s each at worst).
#[test]
fn a_switch_stops_containers_at_once_with_their_own_stop_timeout() {
    let Some(_lock) = setup() else { return };
    let _proxy = ProxyGuard;
    let s = start_server();
    let (slow, other) = ("dmtest-stop-slow", "dmtest-stop-other");
    let _clean = Cleanup::new(&[slow, other], &["stopapp.a", "stopapp.b"]);
    run(&s, "stopapp.a", "true");
    s.ok(&["switch", "stopapp"]);
    s.ok(&["commit", "-m", "base"]);
    // Each notes when SIGTERM came, then takes a while to shut down and
    // notes that it did.
    let shutdown = |secs: u32| {
        format!(
            "trap 'date +%s > /data/term; sleep {secs}; echo clean > /data/marker; exit 0' TERM; \
             while :; do sleep 0.1; done"
        )
    };
    run_detached_with(
        &s,
        &["--stop-timeout", "40"],
        slow,
        "stopapp.a:/data",
        &shutdown(12),
    );
    run_detached(&s, other, "stopapp.b:/data", &shutdown(6));

    s.ok(&["checkout", "-b", "other"]);

    assert!(running(&s, slow) && running(&s, other));
    // What they wrote while stopping is master's.
    let read = |subdot: &str, file: &str| {
        let mnt = PathBuf::from(s.ok(&["mount", &format!("stopapp@master.{subdot}")]).trim());
        std::fs::read_to_string(mnt.join(file)).unwrap_or_default()
    };
    assert_eq!(
        read("a", "marker"),
        "clean\n",
        "killed before its stop timeout"
    );
    assert_eq!(read("b", "marker"), "clean\n");
    let term = |subdot: &str| -> i64 { read(subdot, "term").trim().parse().unwrap() };
    let (a, b) = (term("a"), term("b"));
    assert!(
        (a - b).abs() < 4,
        "stopped one after the other: SIGTERM at {a} and {b}"
    );

    // A checkout of the current branch while another checkout runs waits
    // for it, then switches back (it said done at once and did nothing,
    // leaving the dot on the branch the first one chose).
    let stops = || s.log().matches("stopping container").count();
    let before = stops();
    let first = s
        .dm_command(&["checkout", "master"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once the first has the dot (it stops the containers under the lock).
    wait_until(
        || stops() > before,
        || format!("the first checkout stopped nothing:\n{}", s.log()),
    );
    s.ok(&["checkout", "other"]);
    let out = first.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(s.ok(&["branch"]), "  master\n* other\n");
}

/// Polls `cond` for up to 20 s; panics with `what()` if it never holds.
fn wait_until(mut cond: impl FnMut() -> bool, what: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "{}", what());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_second_server_leaves_the_plugin_to_the_first() {
    let Some(_lock) = setup() else { return };
    let _proxy = ProxyGuard;
    let upstream = || {
        plugin_call("dm-proxy/info", "")["upstream"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let first = start_server();
    let ours = |s: &Server| s.data_dir().join("plugin.sock").display().to_string();
    wait_until(
        || upstream() == ours(&first),
        || {
            format!(
                "the proxy never forwarded to the first server\n{}",
                first.log()
            )
        },
    );
    // Another server with the same plugin socket (another data directory)
    // runs without the plugin rather than taking the first one's volumes.
    let mut second = start_server();
    wait_until(
        || second.log().contains("already serves Docker"),
        || {
            format!(
                "the second server did not say why it has no plugin\n{}",
                second.log()
            )
        },
    );
    assert_eq!(upstream(), ours(&first));
    let _clean = Cleanup::new(&[], &["dmtest-firsts"]);
    docker_ok(&first, &["volume", "create", "-d", "dm", "dmtest-firsts"]);
    assert!(first.ok(&["list"]).contains("dmtest-firsts"));
    assert!(!second.ok(&["list"]).contains("dmtest-firsts"));
    // Its stop leaves the first server's plugin alone.
    assert_eq!(second.stop(), Some(0));
    assert_eq!(
        run(&first, "dmtest-firsts", "echo here > /data/f; cat /data/f"),
        "here\n"
    );
    docker_ok(&first, &["volume", "rm", "dmtest-firsts"]);
    // Once the first server is gone, a server takes the proxy over.
    drop(first);
    second.restart();
    wait_until(
        || upstream() == ours(&second),
        || {
            format!(
                "the proxy did not follow the server that is left\n{}",
                second.log()
            )
        },
    );
    // A proxy another server took over (told to exit while this one ran,
    // then started anew by the other: it forwarded there for good, and
    // Docker's volumes were the other's) is taken back once nothing
    // answers there; meanwhile the log says whose it is.
    let other = second.root().join("other-plugin.sock");
    let listener = std::os::unix::net::UnixListener::bind(&other).unwrap();
    plugin_call(
        "dm-proxy/upstream",
        &serde_json::json!({ "upstream": other }).to_string(),
    );
    wait_until(
        || second.log().contains("forwards to another dm server"),
        || {
            format!(
                "the server did not say whose the proxy is\n{}",
                second.log()
            )
        },
    );
    assert_eq!(upstream(), other.display().to_string());
    drop(listener);
    std::fs::remove_file(&other).unwrap();
    wait_until(
        || upstream() == ours(&second),
        || format!("the proxy was not taken back\n{}", second.log()),
    );
}

/// Runs `dm ARGS` (a checkout), stops the server (SIGTERM) while the
/// checkout stops the containers, and checks what the checkout said: that
/// the server starts them again when it next starts.
fn stop_during_checkout(s: &mut Server, args: &[&str]) {
    let stops = |s: &Server| s.log().matches("stopping container").count();
    let before = stops(s);
    let checkout = s
        .dm_command(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(
        || stops(s) > before,
        || format!("the checkout stopped nothing:\n{}", s.log()),
    );
    assert_eq!(s.stop(), Some(0));
    let out = checkout.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("the dm server is stopping")
            && err.contains("stays stopped until the next `dm server` starts it")
            && !err.contains("docker start"),
        "{err}"
    );
}

/// A server stopped (SIGTERM) while a checkout stops its containers leaves
/// them stopped and says so, rather than starting them on mounts the stop
/// removes a moment later (a database died there on "Transport endpoint
/// is not connected"), and starts them at its next start (they stayed
/// down, a pull's too, and nothing said so).
#[test]
fn a_stopping_server_leaves_the_containers_of_a_switch_stopped() {
    let Some(_lock) = setup() else { return };
    let _proxy = ProxyGuard;
    let mut s = start_server();
    let c = "dmtest-stop-during-switch";
    let _clean = Cleanup::new(&[c], &["stopsw"]);
    run(&s, "stopsw", "true");
    s.ok(&["switch", "stopsw"]);
    s.ok(&["commit", "-m", "base"]);
    run_detached(
        &s,
        c,
        "stopsw:/data",
        "trap 'sleep 3; exit 0' TERM; while :; do sleep 0.1; done",
    );
    stop_during_checkout(&mut s, &["checkout", "-b", "other"]);
    assert!(!running(&s, c));
    // The next start starts it again (it stayed down with no one told).
    s.restart();
    wait_until(
        || running(&s, c),
        || format!("the next start left it down:\n{}", s.log()),
    );
    assert!(
        s.log().contains("the previous server stopped it"),
        "{}",
        s.log()
    );
}

/// A relay of Docker's API socket that can stop answering: the server's
/// view of a Docker daemon that hangs, over the real engine (whose
/// containers go on running, as they do when dockerd hangs or dies).
struct DockerRelay {
    dir: tempfile::TempDir,
    hung: std::sync::Arc<std::sync::atomic::AtomicBool>,
    slow_stops: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl DockerRelay {
    fn start() -> DockerRelay {
        use std::os::unix::net::{UnixListener, UnixStream};
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let listener = UnixListener::bind(dir.path().join("docker.sock")).unwrap();
        let hung = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let h = hung.clone();
        let slow_stops = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let slow = slow_stops.clone();
        std::thread::spawn(move || {
            // Connections taken while hung: held open, never answered.
            let mut held = Vec::new();
            for conn in listener.incoming() {
                let Ok(client) = conn else { return };
                if h.load(Ordering::SeqCst) {
                    held.push(client);
                    continue;
                }
                let Ok(docker) = UnixStream::connect("/var/run/docker.sock") else {
                    continue;
                };
                let (mut c2, mut d2) = (client.try_clone().unwrap(), docker.try_clone().unwrap());
                // Set when a stop request passes while stops are slow: its
                // answer is held back 6 s (Docker stops the container).
                let held_back = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                let (hb, hb2, slow) = (held_back.clone(), held_back, slow.clone());
                std::thread::spawn(move || {
                    use std::io::{Read, Write};
                    let mut buf = vec![0u8; 64 << 10];
                    while let Ok(n) = c2.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        let stop = buf[..n]
                            .windows(6)
                            .any(|w| w == b"/stop?" || w == b"/stop ");
                        if stop && slow.load(Ordering::SeqCst) {
                            hb.store(true, Ordering::SeqCst);
                        }
                        if d2.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = d2.shutdown(std::net::Shutdown::Write);
                });
                std::thread::spawn(move || {
                    use std::io::{Read, Write};
                    let (mut client, mut docker) = (client, docker);
                    let mut buf = vec![0u8; 64 << 10];
                    while let Ok(n) = docker.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        if hb2.swap(false, Ordering::SeqCst) {
                            std::thread::sleep(std::time::Duration::from_secs(6));
                        }
                        if client.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = client.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        DockerRelay {
            dir,
            hung,
            slow_stops,
        }
    }

    /// Holds back Docker's answers to stop requests for 6 s (Docker
    /// stops the containers, late for dm).
    fn slow_stops(&self, slow: bool) {
        self.slow_stops
            .store(slow, std::sync::atomic::Ordering::SeqCst);
    }

    fn socket(&self) -> String {
        self.dir.path().join("docker.sock").display().to_string()
    }

    fn hang(&self, hung: bool) {
        self.hung.store(hung, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A switch given up because Docker did not stop a container in time (a
/// `docker cp` into it held the stop up until the copy ended; here Docker's
/// answer is held back) leaves the container running: Docker stopped it
/// later, and it stayed down although nothing was switched.
#[test]
fn a_container_whose_stop_outlasts_a_switch_runs_again() {
    let Some(_lock) = setup() else { return };
    let _proxy = ProxyGuard;
    let relay = DockerRelay::start();
    let mut s = start_server();
    s.set_env("DM_DOCKER_SOCKET", &relay.socket());
    s.set_env("DM_DOCKER_STOP_SLACK_SECS", "2");
    s.stop();
    s.restart();
    let c = "dmtest-slowstop";
    let _clean = Cleanup::new(&[c], &["slowstop"]);
    run(&s, "slowstop", "true");
    s.ok(&["switch", "slowstop"]);
    s.ok(&["commit", "-m", "base"]);
    run_detached_with(&s, &["--stop-timeout", "1"], c, "slowstop:/data", LOOP);
    let started = started_at(&s, c);
    relay.slow_stops(true);
    let err = s.fail(&["checkout", "-b", "other"]);
    relay.slow_stops(false);
    assert!(
        err.contains("nothing was switched")
            && err
                .contains("Docker may still stop dmtest-slowstop: dm starts it again once it has"),
        "{err}"
    );
    assert!(s.ok(&["branch"]).contains("* master"));
    // Stopped by Docker, then started again by dm.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(running(&s, c) && started_at(&s, c) != started) {
        assert!(
            Instant::now() < deadline,
            "{c} not started again\nserver log:\n{}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(s.log().contains("was started again"), "{}", s.log());
}

/// Docker hung (or dead: its containers run on under their shims) is no
/// container using the dot: a checkout or a delete of a dot that Docker has
/// mounted for containers is refused until Docker answers (a checkout
/// switched under a writer, which then wrote into the new branch, and a
/// delete removed the dot of a running container). A dot Docker has no
/// mount of is not held up. Containers a stopping server left down for a
/// switch are started once Docker answers at the next start (started with
/// Docker down, the server forgot them).
#[test]
fn a_docker_that_does_not_answer_holds_up_changes_under_its_containers() {
    let Some(_lock) = setup() else { return };
    let _proxy = ProxyGuard;
    let relay = DockerRelay::start();
    let mut s = start_server();
    s.set_env("DM_DOCKER_SOCKET", &relay.socket());
    s.stop();
    s.restart();
    let c = "dmtest-docker-hung";
    let _clean = Cleanup::new(&[c], &["hungdot"]);
    run(&s, "hungdot", "true");
    s.ok(&["switch", "hungdot"]);
    s.ok(&["commit", "-m", "base"]);
    run_detached(
        &s,
        c,
        "hungdot:/data",
        "trap 'sleep 2; exit 0' TERM; while :; do echo x >> /data/log; sleep 0.1; done",
    );
    relay.hang(true);
    for args in [
        &["checkout", "-b", "other"][..],
        &["reset", "--hard", "HEAD"],
        &["dot", "delete", "-f", "hungdot"],
    ] {
        let err = s.fail(args);
        assert!(
            err.contains("Docker did not answer")
                && err.contains("hungdot")
                && err.contains("nothing was changed"),
            "{args:?}: {err}"
        );
    }
    assert!(s.ok(&["branch"]).contains("* master"));
    assert!(!s.ok(&["branch"]).contains("other"));
    assert!(running(&s, c));
    // A dot Docker has not mounted: Docker's silence holds nothing up.
    s.ok(&["init", "idle"]);
    s.ok(&["switch", "idle"]);
    s.ok(&["commit", "-m", "idle"]);
    s.ok(&["checkout", "-b", "b2"]);
    s.ok(&["dot", "delete", "-f", "idle"]);
    // Docker answers again: the checkout stops and starts the container.
    relay.hang(false);
    s.ok(&["switch", "hungdot"]);
    s.ok(&["checkout", "-b", "other"]);
    assert!(running(&s, c));
    // A server stopped during a switch, started again while Docker hangs.
    stop_during_checkout(&mut s, &["checkout", "master"]);
    assert!(!running(&s, c));
    relay.hang(true);
    s.restart();
    wait_until(
        || s.log().contains("are started once Docker answers"),
        || format!("no word of the containers left down:\n{}", s.log()),
    );
    assert!(!running(&s, c));
    relay.hang(false);
    wait_until(
        || running(&s, c),
        || format!("not started once Docker answered:\n{}", s.log()),
    );
}
