//! Helpers for end-to-end tests: start a real `dm server` on temporary
//! directories, drive the real `dm` binary against it, and clean up (kill
//! the server, unmount leftovers) on drop.
//!
//! The tests themselves live in `cli/tests/`, where Cargo provides the path
//! of the built binary (`env!("CARGO_BIN_EXE_dm")`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A running `dm server` with its own data dir, mount dir, socket and client
/// config, all inside one temporary directory.
pub struct Server {
    bin: PathBuf,
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// The Docker plugin socket (`None`: `--no-plugin`).
    plugin_socket: Option<PathBuf>,
    /// The hub's listen address (`None`: the server's default).
    listen: Option<String>,
    /// Environment variables of the server process (and its restarts).
    env: Vec<(String, String)>,
    /// The open-file limit (soft and hard) of the server's next starts.
    open_files: Option<u64>,
}

impl Server {
    /// Starts a server with fresh directories and waits until it answers.
    pub fn start(bin: &str) -> Server {
        Server::start_with(bin, None, None)
    }

    /// Starts a server that serves the Docker volume plugin on
    /// `plugin_socket` (Docker only looks at `/run/docker/plugins/dm.sock`,
    /// so tests using it must not run in parallel).
    pub fn start_with_plugin(bin: &str, plugin_socket: &Path) -> Server {
        Server::start_with(bin, Some(plugin_socket), None)
    }

    /// [`Server::start_with_plugin`] whose hub listens on `listen`
    /// (`127.0.0.1:PORT`), so that the server can push to and pull from
    /// itself.
    pub fn start_with_plugin_and_hub(bin: &str, plugin_socket: &Path, listen: &str) -> Server {
        Server::start_with(bin, Some(plugin_socket), Some(listen))
    }

    /// A server whose hub listens on `listen` (`127.0.0.1:PORT`), without
    /// the Docker volume plugin.
    pub fn start_with_hub(bin: &str, listen: &str) -> Server {
        Server::start_with(bin, None, Some(listen))
    }

    /// A server (no Docker plugin) whose process has the variables `env`
    /// besides the test's own environment.
    pub fn start_with_env(bin: &str, env: &[(&str, &str)]) -> Server {
        let mut s = Server::new(bin, None, None);
        s.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        s.spawn();
        s
    }

    fn start_with(bin: &str, plugin_socket: Option<&Path>, listen: Option<&str>) -> Server {
        let mut s = Server::new(bin, plugin_socket, listen);
        s.spawn();
        s
    }

    fn new(bin: &str, plugin_socket: Option<&Path>, listen: Option<&str>) -> Server {
        let dir = tempfile::Builder::new()
            .prefix("dm-e2e-")
            .tempdir()
            .expect("creating a temp dir");
        Server {
            bin: PathBuf::from(bin),
            child: None,
            dir,
            plugin_socket: plugin_socket.map(Path::to_path_buf),
            listen: listen.map(str::to_string),
            env: Vec::new(),
            open_files: None,
        }
    }

    /// Sets the variable `key` of the server's next starts (a hub moved
    /// with `DM_LISTEN`).
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
    }

    /// Gives the server's next starts at most `n` open files (`ulimit -n`,
    /// hard limit too, which the server cannot raise).
    pub fn set_open_file_limit(&mut self, n: u64) {
        self.open_files = Some(n);
    }

    /// The temporary directory holding everything.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// The server's data dir.
    pub fn data_dir(&self) -> PathBuf {
        self.root().join("data")
    }

    /// The server's mount dir.
    pub fn mount_dir(&self) -> PathBuf {
        self.root().join("mnt")
    }

    /// The API socket.
    pub fn socket(&self) -> PathBuf {
        self.root().join("dm.sock")
    }

    /// The client config file.
    pub fn config(&self) -> PathBuf {
        self.root().join("config.toml")
    }

    /// The server's log (stderr), appended across restarts.
    pub fn log_path(&self) -> PathBuf {
        self.root().join("server.log")
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn spawn(&mut self) {
        self.spawn_in_background();
        self.wait_ready();
    }

    /// Starts the server process without waiting for it to answer.
    fn spawn_in_background(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("opening the server log");
        let mut cmd = Command::new(&self.bin);
        cmd.arg("server")
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--mount-dir")
            .arg(self.mount_dir())
            .arg("--socket")
            .arg(self.socket());
        match &self.plugin_socket {
            Some(p) => cmd.arg("--plugin-socket").arg(p),
            None => cmd.arg("--no-plugin"),
        };
        if let Some(l) = &self.listen {
            cmd.arg("--listen").arg(l);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(n) = self.open_files {
            use std::os::unix::process::CommandExt;
            let lim = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            // SAFETY: only setrlimit (async-signal-safe) between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .env("DM_LOG", "info,dm_fs=info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("starting dm server");
        self.child = Some(child);
    }

    /// Polls `dm version` until the server answers (30 s at most).
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("dm server exited early with {status}:\n{}", self.log());
                }
            }
            if std::os::unix::net::UnixStream::connect(self.socket()).is_ok()
                && self.dm(&["version"]).status.success()
            {
                return;
            }
            if Instant::now() > deadline {
                panic!("dm server did not come up in 30 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `dm ARGS` against this server and config, not started yet.
    /// `dm ARGS` against this server and config, to run as the caller likes
    /// (spawned, with more environment).
    pub fn dm_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .env("DM_SOCKET", self.socket())
            .env("DM_CONFIG", self.config())
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `dm ARGS` against this server and config.
    pub fn dm(&self, args: &[&str]) -> Output {
        self.dm_command(args).output().expect("running dm")
    }

    /// `dm remote add NAME TARGET` with the API key `key` (from the
    /// environment, as a user would give it); asserts success.
    pub fn remote_add(&self, name: &str, target: &str, key: &str) {
        let out = Command::new(&self.bin)
            .args(["remote", "add", name, target])
            .env("DM_SOCKET", self.socket())
            .env("DM_CONFIG", self.config())
            .env("DM_API_KEY", key)
            .stdin(Stdio::null())
            .output()
            .expect("running dm");
        assert!(
            out.status.success(),
            "dm remote add {name} {target} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs `dm ARGS`, asserts success and returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.dm(args);
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            out.status.success(),
            "dm {args:?} failed ({}):\nstdout: {stdout}\nstderr: {stderr}\nserver log:\n{}",
            out.status,
            self.log()
        );
        stdout
    }

    /// Runs `dm ARGS`, asserts failure (non-zero exit, no panic) and returns stderr.
    pub fn fail(&self, args: &[&str]) -> String {
        let out = self.dm(args);
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            !out.status.success(),
            "dm {args:?} succeeded but should have failed:\nstdout: {stdout}\nstderr: {stderr}"
        );
        assert_eq!(
            out.status.code(),
            Some(1),
            "dm {args:?} did not exit with 1 (a panic or a signal?): {stderr}"
        );
        assert!(
            !stderr.contains("panicked"),
            "dm {args:?} panicked: {stderr}"
        );
        stderr
    }

    /// Kills the server with SIGKILL (a crash) and waits for it.
    /// The server's pid (0 when it is not running).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGKILL to the server and returns its process without waiting
    /// for it (a process that cannot finish exiting would hang a wait).
    pub fn kill9_no_wait(&mut self) -> Option<Child> {
        let mut child = self.child.take()?;
        let _ = child.kill();
        Some(child)
    }

    /// `dm ARGS` against this server, started and not waited for.
    pub fn dm_spawn(&self, args: &[&str]) -> Child {
        self.dm_command(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("running dm")
    }

    /// Stops the server with SIGTERM and returns its exit code.
    pub fn stop(&mut self) -> Option<i32> {
        self.stop_with(nix::sys::signal::Signal::SIGTERM)
    }

    /// Stops the server with `signal` and returns its exit code.
    pub fn stop_with(&mut self, signal: nix::sys::signal::Signal) -> Option<i32> {
        let mut child = self.child.take()?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, signal);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("dm server ignored {signal} for 30 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the server again on the same directories.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart: the server is still running");
        self.spawn();
    }

    /// [`Server::restart`] without waiting for the server to answer
    /// ([`Server::wait_ready`] does).
    pub fn restart_in_background(&mut self) {
        assert!(self.child.is_none(), "restart: the server is still running");
        self.spawn_in_background();
    }
}

/// Mount points (from /proc/self/mountinfo) under `dir`.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// True when `path` is a mount point.
pub fn is_mounted(path: &Path) -> bool {
    mounts_under(path).iter().any(|p| p == path)
}

/// Detaches the mount at `path` (`umount -l`), if any.
pub fn unmount_lazily(path: &Path) {
    if let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) {
        // SAFETY: c is a valid C string for the call.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
        // Detach whatever the killed server left mounted, deepest first.
        let mut left = mounts_under(self.root());
        left.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for p in left {
            unmount_lazily(&p);
        }
    }
}

/// Every file, directory and symlink under `dir`: relative path -> content
/// (`dir` for directories, `-> target` for symlinks, the bytes for files).
pub fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
            .map(|e| e.expect("dir entry").path())
            .collect();
        entries.sort();
        for p in entries {
            let rel = p
                .strip_prefix(base)
                .expect("under base")
                .display()
                .to_string();
            let meta = std::fs::symlink_metadata(&p).expect("lstat");
            if meta.file_type().is_symlink() {
                let t = std::fs::read_link(&p).expect("readlink");
                out.insert(rel, format!("-> {}", t.display()).into_bytes());
            } else if meta.is_dir() {
                out.insert(rel, b"dir".to_vec());
                walk(base, &p, out);
            } else {
                out.insert(rel, std::fs::read(&p).expect("read"));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// `len` pseudo-random bytes from `seed` (deterministic).
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

/// Writes `data` to `path` and fsyncs it.
pub fn write_synced(path: &Path, data: &[u8]) {
    use std::io::Write;
    let mut f =
        std::fs::File::create(path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    f.write_all(data)
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    f.sync_all()
        .unwrap_or_else(|e| panic!("fsync {}: {e}", path.display()));
}

impl Server {
    /// One raw HTTP/1.1 request to the API (`Connection: close`); returns
    /// the status code and the JSON body.
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
        use std::io::{Read, Write};
        let mut sock = std::os::unix::net::UnixStream::connect(self.socket())
            .expect("connecting to the API socket");
        let body = body.unwrap_or("");
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        sock.write_all(req.as_bytes()).expect("sending the request");
        let mut resp = Vec::new();
        sock.read_to_end(&mut resp).expect("reading the answer");
        let text = String::from_utf8_lossy(&resp).to_string();
        let (head, payload) = text
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no HTTP header end in {text:?}"));
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line in {head:?}"));
        assert!(
            !head
                .to_ascii_lowercase()
                .contains("transfer-encoding: chunked"),
            "chunked answers are not expected: {head}"
        );
        let json = serde_json::from_str(payload)
            .unwrap_or_else(|e| panic!("answer is not JSON ({e}): {payload:?}"));
        (status, json)
    }
}

/// `fchmod` of an open file in a loop, from a thread of its own, between
/// 0600 and 0777, until [`FchmodLoop::finish`] or a call fails: for tests
/// of requests by inode racing a reset or a pull.
pub struct FchmodLoop {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(u32, Option<i32>)>,
}

impl FchmodLoop {
    /// Starts the loop on `file`, and lets it run 200 ms.
    pub fn start(file: std::fs::File) -> FchmodLoop {
        use std::os::unix::fs::PermissionsExt;
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut n = 0u32;
            while !stopped.load(Ordering::SeqCst) {
                let mode = if n.is_multiple_of(2) { 0o600 } else { 0o777 };
                if let Err(e) = file.set_permissions(std::fs::Permissions::from_mode(mode)) {
                    return (n, e.raw_os_error());
                }
                n += 1;
            }
            (n, None)
        });
        std::thread::sleep(Duration::from_millis(200));
        FchmodLoop { stop, thread }
    }

    /// After 200 ms more, stops the loop: how many calls succeeded, and
    /// the errno of the one that failed (None: none did).
    pub fn finish(self) -> (u32, Option<i32>) {
        std::thread::sleep(Duration::from_millis(200));
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.join().expect("the fchmod loop panicked")
    }
}
