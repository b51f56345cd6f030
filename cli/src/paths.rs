//! Default locations of the server's data, mounts and socket: system paths
//! for root, XDG paths for other users.

use std::path::{Path, PathBuf};

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The user's home: `$HOME`, else the password database's (`env -i`,
/// some service managers: a server fell back to /tmp for its store, a
/// client to /root for its config). `/` when neither knows one.
pub fn home() -> PathBuf {
    match std::env::var_os("HOME") {
        Some(h) if !h.is_empty() => PathBuf::from(h),
        _ => nix::unistd::User::from_uid(nix::unistd::geteuid())
            .ok()
            .flatten()
            .map_or_else(|| PathBuf::from("/"), |u| u.dir),
    }
}

/// When `path` is under an `XDG_RUNTIME_DIR` that is not this user's (after
/// `su` without `-` it still names the first user's), the likely reason a
/// socket or directory there is closed to them, and what to do: for a
/// message. None otherwise.
pub fn foreign_runtime_dir_hint(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let x = xdg_dir("XDG_RUNTIME_DIR")?;
    let x = x.as_path();
    let mine = std::fs::metadata(x).is_ok_and(|m| m.uid() == nix::unistd::geteuid().as_raw());
    (path.starts_with(x) && !mine).then(|| {
        format!(
            "it is under XDG_RUNTIME_DIR={}, another user's directory: after `su` without `-` it \
             still names the first user's; `su - USER` or `unset XDG_RUNTIME_DIR`",
            x.display()
        )
    })
}

/// An XDG base directory variable's value, when set to an absolute path:
/// the spec says to ignore relative ones (taken as they were, a server
/// started from another directory found another store, and the dots seemed
/// gone).
fn xdg_dir(var: &str) -> Option<PathBuf> {
    absolute(std::env::var_os(var))
}

fn absolute(value: Option<std::ffi::OsString>) -> Option<PathBuf> {
    value.map(PathBuf::from).filter(|d| d.is_absolute())
}

fn runtime_dir() -> PathBuf {
    match xdg_dir("XDG_RUNTIME_DIR") {
        Some(d) => d.join("dm"),
        None => fallback_runtime_dir(),
    }
}

/// The runtime directory without `XDG_RUNTIME_DIR` (`su -`, cron, some
/// ssh logins leave it unset).
fn fallback_runtime_dir() -> PathBuf {
    PathBuf::from(format!("/tmp/dm-{}", nix::unistd::geteuid()))
}

/// Where else a server of this user may keep its socket by default, when
/// it was started with another `XDG_RUNTIME_DIR` than this client has:
/// `/tmp/dm-UID/dm.sock` (started without one) or systemd's
/// `/run/user/UID/dm/dm.sock`; the first that exists (None for root, whose
/// place is fixed).
pub fn other_default_socket() -> Option<PathBuf> {
    if is_root() {
        return None;
    }
    let here = default_socket();
    let uid = nix::unistd::geteuid();
    [
        fallback_runtime_dir().join("dm.sock"),
        PathBuf::from(format!("/run/user/{uid}/dm/dm.sock")),
    ]
    .into_iter()
    .find(|p| *p != here && p.exists())
}

/// `/var/lib/dm` for root, `$XDG_DATA_HOME/dm` (or `~/.local/share/dm`) otherwise.
pub fn default_data_dir() -> PathBuf {
    if is_root() {
        return PathBuf::from("/var/lib/dm");
    }
    match xdg_dir("XDG_DATA_HOME") {
        Some(d) => d.join("dm"),
        None => home().join(".local/share/dm"),
    }
}

/// `/run/dm/mnt` for root, `$XDG_RUNTIME_DIR/dm/mnt` (or `/tmp/dm-UID/mnt`) otherwise.
pub fn default_mount_dir() -> PathBuf {
    if is_root() {
        PathBuf::from("/run/dm/mnt")
    } else {
        runtime_dir().join("mnt")
    }
}

/// `/run/dm/dm.sock` for root, `$XDG_RUNTIME_DIR/dm/dm.sock` (or `/tmp/dm-UID/dm.sock`) otherwise.
pub fn default_socket() -> PathBuf {
    if is_root() {
        PathBuf::from("/run/dm/dm.sock")
    } else {
        runtime_dir().join("dm.sock")
    }
}

/// `SOCKET.starting` beside the socket: the pid of a server that is
/// starting (opening the store, restoring its mounts) and does not listen
/// yet, so that clients wait for it instead of saying no server runs.
pub fn starting_marker(socket: &Path) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".starting");
    PathBuf::from(name)
}

/// Process `pid`'s state letter and flags from `/proc/PID/stat` (`None`
/// once it is gone; an empty state and no flags if the line does not
/// parse).
fn proc_stat(pid: u32) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name (which may hold spaces and parentheses):
    // state, ppid, pgrp, session, tty_nr, tpgid, flags.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return Some((String::new(), 0));
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first().copied().unwrap_or("").to_string();
    let flags: u64 = fields.get(6).and_then(|f| f.parse().ok()).unwrap_or(0);
    Some((state, flags))
}

/// Whether process `pid` died and cannot finish exiting (a zombie): a dm
/// server killed while one of its threads waited on one of its own mounts
/// (see README) keeps its socket, and its clients waited on it for good.
pub fn is_zombie(pid: i32) -> bool {
    u32::try_from(pid)
        .ok()
        .and_then(proc_stat)
        .is_some_and(|(state, _)| state == "Z")
}

/// Whether process `pid` is gone or on its way out: a zombie, or exiting
/// (PF_EXITING in its flags: killed, it tears down).
fn is_exiting(pid: u32) -> bool {
    const PF_EXITING: u64 = 0x4;
    proc_stat(pid)
        .is_none_or(|(state, flags)| matches!(state.as_str(), "Z" | "X") || flags & PF_EXITING != 0)
}

/// The pid in `socket`'s [`starting_marker`], if that process is alive
/// (not a zombie or exiting: one killed while it started, which the next
/// server clears; a restart right after such a `kill -9` was refused) and
/// a `dm server` (not a reused pid).
pub fn starting_server(socket: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(starting_marker(socket))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    if is_exiting(pid) {
        return None;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    cmdline
        .split(|b| *b == 0)
        .any(|arg| arg == b"server")
        .then_some(pid)
}

/// `/run/docker/plugins/dm.sock` (where Docker looks for the `dm` volume
/// plugin) for root; none otherwise (Docker runs as root).
pub fn default_plugin_socket() -> Option<PathBuf> {
    is_root().then(|| PathBuf::from("/run/docker/plugins/dm.sock"))
}

#[cfg(test)]
mod tests {
    /// A live process is not exiting; a zombie (exited, not reaped) and a
    /// pid that is gone are.
    #[test]
    fn exiting_processes_are_told_from_live_ones() {
        assert!(!super::is_exiting(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let t = std::time::Instant::now();
        while !super::is_exiting(child.id()) {
            assert!(t.elapsed().as_secs() < 10, "never seen exiting");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        child.wait().unwrap();
        assert!(super::is_exiting(child.id()));
    }

    #[test]
    fn relative_or_empty_xdg_values_are_ignored() {
        let v = |s: &str| super::absolute(Some(s.into()));
        assert_eq!(v("/run/user/1000"), Some("/run/user/1000".into()));
        assert_eq!(v("reldata"), None);
        assert_eq!(v("./x"), None);
        assert_eq!(v(""), None);
        assert_eq!(super::absolute(None), None);
    }
}
