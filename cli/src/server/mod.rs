//! `dm server`: opens the store, restores the mounts and serves the local
//! API on a unix socket until SIGINT/SIGTERM/SIGHUP.

pub mod convert;
pub mod docker;
pub mod error;
pub mod host_procs;
pub mod hub;
pub mod plugin_proxy;
pub mod routes;

use crate::mounts::MountManager;
use anyhow::{bail, Context, Result};
use dm_store::Store;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where the server keeps its state.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// RocksDB and the server's own files.
    pub data_dir: PathBuf,
    /// Where volumes are mounted by default.
    pub mount_dir: PathBuf,
    /// The local API socket.
    pub socket: PathBuf,
    /// Where to serve the Docker volume plugin (`None`: not at all).
    pub plugin_socket: Option<PathBuf>,
    /// The Docker daemon's API socket (to find, stop and start containers).
    pub docker_socket: PathBuf,
    /// UDP address of the hub endpoint (push/pull), `None`: no hub.
    pub listen: Option<std::net::SocketAddr>,
    /// Run GC by itself once the store grew by this many bytes (and a
    /// quarter) since the last one (see [`Store::gc_due`]); `None`: never.
    pub auto_gc: Option<u64>,
}

impl ServerOptions {
    /// The same with absolute data dir, mount dir and socket: mount paths
    /// go to Docker and into the saved mounts, which a later start (from
    /// another directory) restores.
    fn made_absolute(mut self) -> Result<ServerOptions> {
        for p in [&mut self.data_dir, &mut self.mount_dir, &mut self.socket] {
            *p = std::path::absolute(&*p).with_context(|| format!("resolving {}", p.display()))?;
        }
        Ok(self)
    }
}

/// Shared state of the handlers.
pub struct AppState {
    /// The store.
    pub store: Arc<Store>,
    /// The mount table.
    pub mounts: Arc<MountManager>,
    /// This server's short id.
    pub server_id: String,
    /// The Docker volume plugin and the containers using dots.
    pub docker: Arc<docker::DockerIntegration>,
}

fn server_id(data_dir: &Path) -> Result<String> {
    let file = data_dir.join("server-id");
    if let Ok(s) = std::fs::read_to_string(&file) {
        let s = s.trim();
        if !s.is_empty() {
            return Ok(s.to_string());
        }
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    // splitmix64 of time and pid: unique enough for a display id.
    let mut x = (nanos as u64) ^ ((std::process::id() as u64) << 32);
    x = x.wrapping_add(0x9e3779b97f4a7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d049bb133111eb);
    x ^= x >> 31;
    let id = format!("{x:016x}");
    std::fs::write(&file, &id).with_context(|| format!("writing {}", file.display()))?;
    Ok(id)
}

/// Creates `dir` (and missing parents) readable by this user only; an
/// existing one is left as it is.
fn create_private_dir(dir: &Path) -> Result<()> {
    create_dir_with_mode(dir, 0o700)
}

/// Creates `dir` and missing parents with `mode` (before the umask); an
/// existing one is left as it is.
fn create_dir_with_mode(dir: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

/// Creates `dir` with `mode` (before the umask) and missing parents for
/// the server's own use, refusing a path another user controls: for a
/// server run by a user other than root, a component (or symlink) of it
/// owned by another user than this one or root (checked before anything
/// is created in it); for every server, a `dir` writable by others
/// ([`refuse_foreign_dir`]). Root may keep its directories in a user's
/// home (`sudo dm server --data-dir ~/dm`): that user is trusted. `dir`
/// is absolute ([`ServerOptions::made_absolute`]).
fn create_own_dir(dir: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let me = nix::unistd::geteuid().as_raw();
    if me != 0 {
        for a in dir.ancestors() {
            match std::fs::symlink_metadata(a) {
                Ok(m) if m.uid() != me && m.uid() != 0 => bail!(
                    "{} belongs to uid {}, who could put something else in place of {}; a dm \
                     server of uid {me} keeps its store, socket and mounts only where no other \
                     user can: give --data-dir, --socket and --mount-dir elsewhere",
                    a.display(),
                    m.uid(),
                    dir.display()
                ),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    let xdg = crate::paths::foreign_runtime_dir_hint(a)
                        .map(|h| format!(" ({h}; or give --socket and --mount-dir)"))
                        .unwrap_or_default();
                    return Err(e).with_context(|| format!("reading {}{xdg}", a.display()));
                }
            }
        }
    }
    create_dir_with_mode(dir, mode)?;
    // Root's (a copy made as root): said before RocksDB or a lock file
    // fails on it with a bare "Permission denied".
    if me != 0
        && nix::unistd::access(
            dir,
            nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
        )
        .is_err()
    {
        bail!(
            "this dm server (uid {me}) cannot write in {}, which belongs to uid {}: `chown -R` it \
             to this user, or give another directory",
            dir.display(),
            std::fs::metadata(dir).map(|m| m.uid()).unwrap_or(0)
        );
    }
    refuse_foreign_dir(dir)
}

/// Refuses a directory for the socket or the mounts that another user
/// controls: owned by someone else, or writable by others without the
/// sticky bit (/tmp/dm-UID made in advance by another user would let them
/// put their own server's socket in place of this one).
fn refuse_foreign_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    let me = nix::unistd::geteuid().as_raw();
    // Group write is harmless when the group is this user's own (a umask
    // of 002 with a group per user, as Debian and Ubuntu make them).
    let others = if m.gid() == nix::unistd::getegid().as_raw() {
        0o002
    } else {
        0o022
    };
    let writable_by_others = m.mode() & others != 0 && m.mode() & 0o1000 == 0;
    if (m.uid() != me && m.uid() != 0) || writable_by_others {
        bail!(
            "{} belongs to uid {} or others may write to it (mode {:o}); a dm server of uid {me} \
             keeps its socket and mounts only in a directory that is its own: remove it, or give \
             --socket and --mount-dir elsewhere",
            dir.display(),
            m.uid(),
            m.mode() & 0o7777
        );
    }
    Ok(())
}

/// Refuses a mount dir inside a dm mount (a dot of this or another
/// server: its lock file and mounts landed in that dot as files) or inside
/// the mount dir of another running server.
fn refuse_nested_mount_dir(mount_dir: &Path) -> Result<()> {
    if let Some(at) = dm_fs::dm_mount_holding(mount_dir).context("reading the mount table")? {
        bail!(
            "the mount dir {} is inside a dm mount (at {}): its mounts would land in that dot; \
             give a --mount-dir outside dm's mounts",
            mount_dir.display(),
            at.display()
        );
    }
    for above in mount_dir.ancestors().skip(1) {
        let lock = above.join(".dm-server.lock");
        let Ok(file) = std::fs::File::open(&lock) else {
            continue;
        };
        if let Err(std::fs::TryLockError::WouldBlock) = file.try_lock_shared() {
            bail!(
                "the mount dir {} is inside {}, the mount dir of another dm server that runs; \
                 give a --mount-dir outside it",
                mount_dir.display(),
                above.display()
            );
        }
    }
    Ok(())
}

/// Takes the mount dir for this server (a lock on `MOUNT_DIR/.dm-server.lock`
/// held while it runs, with its pid in it), refusing one another server
/// uses: a second server given the same mount dir (started on a copy of
/// the data dir, with only --data-dir and --socket changed) took over the
/// first one's mounts, and its writers' files went into the copy.
fn lock_mount_dir(mount_dir: &Path) -> Result<std::fs::File> {
    use std::io::{Read, Seek, Write};
    let path = mount_dir.join(".dm-server.lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            bail!(
                "another dm server{} uses the mount dir {}; give this one its own --mount-dir",
                if pid.is_empty() {
                    String::new()
                } else {
                    format!(" (pid {pid})")
                },
                mount_dir.display()
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "{}", std::process::id()))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(file)
}

/// Removes a socket file left by a dead server; fails if a server answers.
/// `mount_dir` and `mounts_file` (the saved mounts) name the mounts of a
/// server of this data directory, for [`unstick_dead_server`].
fn claim_socket(socket: &Path, mount_dir: &Path, mounts_file: &Path) -> Result<()> {
    use std::os::unix::net::UnixStream;
    if socket.exists() {
        if let Ok(stream) = UnixStream::connect(socket) {
            if answers(stream) {
                bail!(
                    "another dm server is already listening on {}; stop it first or use --socket",
                    socket.display()
                );
            }
            // Connectable but silent: a server still exiting (after kill -9
            // the kernel ends its FUSE sessions first). Given a while.
            let deadline = std::time::Instant::now() + SILENT_SERVER_WAIT;
            let mut holder = socket_holder(socket);
            while UnixStream::connect(socket).is_ok() {
                if holder.is_some_and(|pid| unstick_dead_server(pid, mount_dir, mounts_file)) {
                    holder = None;
                }
                if std::time::Instant::now() > deadline {
                    bail!(
                        "a process listening on {} does not answer (a dm server that hangs?); \
                         stop it (`fuser {}` names it) or use --socket",
                        socket.display(),
                        socket.display()
                    );
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
        std::fs::remove_file(socket)
            .with_context(|| format!("removing the stale socket {}", socket.display()))?;
    }
    Ok(())
}

/// A server killed (kill -9) while one of its threads waited on one of its
/// own mounts (an invalidation waiting for a page that it was writing back
/// to itself) stays a zombie for good: that thread waits for an answer
/// only the dead threads could give, and it keeps the process's files (the
/// socket, the store's lock, /dev/fuse) open. If `pid`, the process holding
/// the socket, is such a zombie, aborts the FUSE connections of the mounts
/// under `mount_dir` and of the saved mounts, which ends the wait and lets
/// it go. Returns whether it was one.
fn unstick_dead_server(pid: u32, mount_dir: &Path, mounts_file: &Path) -> bool {
    let state = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    if !state
        .lines()
        .any(|l| l.starts_with("State:") && l.contains("zombie"))
    {
        return false;
    }
    let saved = crate::mounts::saved_paths(mounts_file);
    let mount_dir = (mount_dir.canonicalize()).unwrap_or_else(|_| mount_dir.to_path_buf());
    let points = dm_fs::fuse_mount_points().unwrap_or_default();
    for p in points
        .iter()
        .filter(|p| p.starts_with(&mount_dir) || saved.contains(p))
    {
        match dm_fs::abort_connection(p) {
            Ok(_) => tracing::warn!(
                "the previous dm server (pid {pid}) died waiting on its own mount; aborted the FUSE connection of {} so that it can exit",
                p.display()
            ),
            Err(e) => tracing::warn!("the previous dm server (pid {pid}) died waiting on its own mount; {e}"),
        }
    }
    true
}

/// The process that has the unix socket bound at `socket` open (one of its
/// threads: a zombie's main thread has no files left to list).
fn socket_holder(socket: &Path) -> Option<u32> {
    // /proc/net/unix: "Num RefCount Protocol Flags Type St Inode Path"; the
    // listening socket has flag __SO_ACCEPTCON (connections waiting in its
    // backlog show the path too).
    let table = std::fs::read_to_string("/proc/net/unix").ok()?;
    let wanted = socket.as_os_str().to_str()?;
    let inode = table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let listening = f
            .get(3)
            .and_then(|v| u32::from_str_radix(v, 16).ok())
            .is_some_and(|v| v & 0x10000 != 0);
        (f.len() >= 8 && f[7] == wanted && listening).then(|| f[6].to_string())
    })?;
    let link = std::ffi::OsString::from(format!("socket:[{inode}]"));
    for proc_entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = proc_entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(tasks) = std::fs::read_dir(proc_entry.path().join("task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let Ok(fds) = std::fs::read_dir(task.path().join("fd")) else {
                continue;
            };
            if fds
                .flatten()
                .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == link))
            {
                return Some(pid);
            }
        }
    }
    None
}

/// How long a start waits for a silent process on its socket to go.
const SILENT_SERVER_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Whether the server behind `stream` answers an HTTP request within 2 s.
fn answers(mut stream: std::os::unix::net::UnixStream) -> bool {
    use std::io::{Read, Write};
    let timeout = Some(std::time::Duration::from_secs(2));
    let mut byte = [0u8; 1];
    stream.set_read_timeout(timeout).is_ok()
        && stream.set_write_timeout(timeout).is_ok()
        && stream
            .write_all(b"GET /v1/version HTTP/1.1\r\nHost: dm\r\nConnection: close\r\n\r\n")
            .is_ok()
        && stream.read(&mut byte).is_ok_and(|n| n > 0)
}

/// Raises the soft limit on open files to the hard limit: the store keeps
/// one descriptor per chunk log segment (256 MiB each), and FUSE sessions,
/// clients and containers take more.
fn raise_open_file_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                tracing::warn!("could not raise the open file limit to {}", lim.rlim_max);
            }
        }
    }
}

/// Runs the server until SIGINT, SIGTERM or SIGHUP.
pub fn run(opts: ServerOptions) -> Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            // fuser warns "Unmount failed: Invalid argument" whenever a
            // session ends that dm had already unmounted itself (every
            // clean unmount and shutdown): not a failure, so not shown.
            // fuser also logs an error for every reply the kernel no
            // longer waits for (ENOENT: the caller was interrupted by a
            // signal, dozens a minute under PostgreSQL): not shown either.
            // Also under a DM_LOG that does not name fuser (`DM_LOG=info`
            // showed them all).
            {
                const QUIET: &str = "fuser::mnt=error,fuser::reply=off";
                let filter = match std::env::var("DM_LOG") {
                    Ok(f) if f.contains("fuser") => f,
                    Ok(f) if !f.trim().is_empty() => format!("{f},{QUIET}"),
                    _ => format!("info,{QUIET}"),
                };
                tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|e| {
                    eprintln!("DM_LOG={filter:?} is not a log filter ({e}); logging at info");
                    tracing_subscriber::EnvFilter::new(format!("info,{QUIET}"))
                })
            },
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();

    let opts = opts.made_absolute()?;
    if let Some(pid) = crate::paths::starting_server(&opts.socket) {
        bail!(
            "another dm server (pid {pid}) is starting on {}; stop it first or use --socket",
            opts.socket.display()
        );
    }
    // The socket's directory first: by default the mounts are made in it.
    if let Some(dir) = opts.socket.parent().filter(|d| !d.as_os_str().is_empty()) {
        create_own_dir(dir, 0o700)?;
    }
    // Root's mounts are allow_other, for containers and services of any
    // uid (PostgreSQL runs as postgres): their directory lets others
    // through. Another user's stay its own.
    let mount_dir_mode = if nix::unistd::geteuid().is_root() {
        0o755
    } else {
        0o700
    };
    refuse_nested_mount_dir(&opts.mount_dir)?;
    create_own_dir(&opts.mount_dir, mount_dir_mode)?;
    create_own_dir(&opts.data_dir, 0o700)?;
    claim_socket(
        &opts.socket,
        &opts.mount_dir,
        &opts.data_dir.join("mounts.json"),
    )?;
    // Until the socket listens, clients wait for this server rather than
    // say none runs (restoring hundreds of mounts takes seconds).
    let starting = StartingMarker::create(&opts.socket);
    raise_open_file_limit();
    // The store holds every dot's data: only this user reads it.
    create_private_dir(&opts.data_dir.join("store"))?;
    let store = Store::open_with(
        &opts.data_dir.join("store"),
        dm_store::StoreOptions {
            owner: (
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            ),
            ..Default::default()
        },
    )
    .with_context(|| format!("opening the store in {}", opts.data_dir.display()))?;
    // After the store: a server that died stuck on its own mount holds
    // both until `claim_socket` unstuck it.
    let _mount_dir_lock = lock_mount_dir(&opts.mount_dir)?;
    // Segment files missing from the chunk directory (a partial restore):
    // said in the log, which said nothing while reads failed. One pass
    // over the index, beside the start.
    {
        let store = store.clone();
        let _ = std::thread::Builder::new()
            .name("dm-segment-check".into())
            .spawn(move || match store.missing_segments() {
                Ok(missing) => {
                    for m in missing {
                        tracing::error!("{m}; `dm fsck` lists this too");
                    }
                }
                Err(e) => tracing::warn!("checking the chunk segments: {e}"),
            });
    }
    let server_id = server_id(&opts.data_dir)?;
    let mounts = Arc::new(MountManager::new(
        store.clone(),
        &opts.mount_dir,
        &opts.data_dir.join("mounts.json"),
    ));
    mounts.restore();
    let patches = start_patch_writer(store.clone());
    let auto_gc = opts.auto_gc.map(|min| start_auto_gc(store.clone(), min));
    tracing::info!(
        data_dir = %opts.data_dir.display(),
        mount_dir = %opts.mount_dir.display(),
        socket = %opts.socket.display(),
        "dm server {} started",
        env!("CARGO_PKG_VERSION")
    );

    let docker = Arc::new(docker::DockerIntegration::new(
        store.clone(),
        mounts.clone(),
        &opts.docker_socket,
        &opts.data_dir.join(docker::VOLUME_TABLE),
    ));
    let state = Arc::new(AppState {
        store: store.clone(),
        mounts: mounts.clone(),
        server_id,
        docker: docker.clone(),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let plugin = match &opts.plugin_socket {
        Some(p) => rt.block_on(docker::start_plugin(docker, p, &opts.data_dir)),
        None => None,
    };
    let hub = match opts.listen {
        Some(addr) => {
            let _in_rt = rt.enter();
            hub::start(state.clone(), &opts.data_dir, addr)
        }
        None => None,
    };
    let served = rt.block_on(serve(state, &opts.socket, starting));
    if let Some(h) = hub {
        h.close();
    }
    if let Some(p) = plugin {
        rt.block_on(p.stop());
    }

    tracing::info!("shutting down: unmounting everything");
    mounts.shutdown();
    patches.stop();
    // A GC running (automatic, or `dm gc`) stops at its next step.
    store.stop_gc();
    if let Some(gc) = auto_gc {
        gc.stop();
    }
    // Mounts still in use were only detached: their sessions may still
    // take writes. What they acknowledged is flushed here, what comes
    // after is refused.
    if let Err(e) = store.stop_writes() {
        tracing::error!("final sync: {e}");
    }
    let _ = std::fs::remove_file(&opts.socket);
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    served?;
    tracing::info!("dm server stopped");
    Ok(())
}

/// How often the blocks that fsyncs stored as patches are stored whole
/// (ZFS writes out its intent log's blocks every 5 s too).
const PATCH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// A background thread that calls a function every so often until stopped.
struct Periodic {
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Periodic {
    fn start(every: std::time::Duration, mut f: impl FnMut() + Send + 'static) -> Periodic {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every)
            {
                f();
            }
        });
        Periodic { stop, thread }
    }

    /// Stops the thread, after the call in progress if any.
    fn stop(self) {
        drop(self.stop);
        let _ = self.thread.join();
    }
}

/// Calls [`Store::materialize_patches`] every [`PATCH_INTERVAL`].
fn start_patch_writer(store: Arc<Store>) -> Periodic {
    Periodic::start(PATCH_INTERVAL, move || {
        // `DM_LOG=info,dm::memory=debug` shows where the server's
        // memory goes (bench/mem/rss.sh reads it).
        tracing::debug!(
            target: "dm::memory",
            "{}; allocator: {}",
            store.memory(),
            crate::alloc::stats()
        );
        match store.materialize_patches() {
            Ok(0) => {}
            Ok(n) => tracing::debug!("stored {n} patched blocks whole"),
            Err(e) => tracing::warn!("storing patched blocks whole: {e}"),
        }
    })
}

/// How often the server asks whether a GC is due (a look at the sizes of
/// the chunk log's files).
const AUTO_GC_CHECK: std::time::Duration = std::time::Duration::from_secs(5);

/// How long the server waits after an automatic GC failed (said in its
/// log) before it tries again.
const AUTO_GC_RETRY: std::time::Duration = std::time::Duration::from_secs(600);

/// Runs a GC whenever [`Store::gc_due`] says so (`min_growth` bytes).
fn start_auto_gc(store: Arc<Store>, min_growth: u64) -> Periodic {
    let mut failed: Option<std::time::Instant> = None;
    Periodic::start(AUTO_GC_CHECK, move || {
        if failed.is_some_and(|t| t.elapsed() < AUTO_GC_RETRY) {
            return;
        }
        match store.gc_due(min_growth) {
            Ok(false) => return,
            Ok(true) => {}
            Err(e) => return tracing::warn!("automatic gc: {e}"),
        }
        let t = std::time::Instant::now();
        match store.gc() {
            Ok(r) => tracing::info!(
                "automatic gc (a dot or branch was deleted, the store grew by a quarter since \
                 the last, or the disk is full; `dm server --auto-gc off` leaves it to `dm gc`): deleted {} chunks \
                 and {} objects, gave {} back to the disk, in {:.1?}",
                r.chunks_deleted,
                r.objects_deleted,
                crate::format::human_size(r.log_bytes_freed + r.table_bytes_freed),
                t.elapsed()
            ),
            Err(e) if store.gc_is_stopped() => tracing::info!("automatic gc: {e}"),
            Err(e) => {
                tracing::warn!(
                    "automatic gc: {e} (tried again in {} minutes; `dm gc` runs one now)",
                    AUTO_GC_RETRY.as_secs() / 60
                );
                failed = Some(std::time::Instant::now());
            }
        }
    })
}

/// The server's [`crate::paths::starting_marker`], removed when dropped.
struct StartingMarker(Option<PathBuf>);

impl StartingMarker {
    fn create(socket: &Path) -> StartingMarker {
        let path = crate::paths::starting_marker(socket);
        match std::fs::write(&path, std::process::id().to_string()) {
            Ok(()) => StartingMarker(Some(path)),
            Err(e) => {
                // Clients then say no server runs until it listens.
                tracing::warn!("writing {}: {e}", path.display());
                StartingMarker(None)
            }
        }
    }
}

impl Drop for StartingMarker {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

async fn serve(state: Arc<AppState>, socket: &Path, starting: StartingMarker) -> Result<()> {
    let stop = StopSignals::catch()?;
    // Create the socket with no access for others from the start, then set
    // the final mode explicitly.
    let old_mask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let listener = tokio::net::UnixListener::bind(socket);
    nix::sys::stat::umask(old_mask);
    let listener = listener.with_context(|| format!("listening on {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", socket.display()))?;
    drop(starting);
    let docker = state.docker.clone();
    let store = state.store.clone();
    let app = routes::router(state.clone()).merge(hub::router(state));
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            stop.recv().await;
            // Before the requests in progress end (a checkout stopping
            // containers): it must not start them on mounts going away.
            docker.server_stopping();
            // Nor wait for a `dm gc` or `dm fsck` to finish (a minute).
            store.stop_gc();
        })
        .await
        .context("serving the API")?;
    Ok(())
}

/// The signals that stop the server cleanly once it serves: SIGINT,
/// SIGTERM and SIGHUP (the terminal of a user who logs out: by default it
/// ended the server with its mounts dead). Before, while the mounts are
/// restored, they end it as by default (a start stuck on a mount can be
/// interrupted).
struct StopSignals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Call inside the runtime.
    fn catch() -> Result<StopSignals> {
        use tokio::signal::unix::{signal, SignalKind};
        let catch =
            |kind: SignalKind, name: &str| signal(kind).with_context(|| format!("catching {name}"));
        Ok(StopSignals {
            int: catch(SignalKind::interrupt(), "SIGINT")?,
            term: catch(SignalKind::terminate(), "SIGTERM")?,
            hup: catch(SignalKind::hangup(), "SIGHUP")?,
        })
    }

    async fn recv(mut self) {
        let name = tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
            _ = self.hup.recv() => "SIGHUP",
        };
        tracing::info!("{name} received");
    }
}
