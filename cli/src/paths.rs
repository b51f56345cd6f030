//! Default locations of the server's data, mounts and socket: system paths
//! for root, XDG paths for other users.

use std::path::PathBuf;

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"))
}

fn runtime_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("dm"),
        _ => PathBuf::from(format!("/tmp/dm-{}", nix::unistd::geteuid())),
    }
}

/// `/var/lib/dm` for root, `$XDG_DATA_HOME/dm` (or `~/.local/share/dm`) otherwise.
pub fn default_data_dir() -> PathBuf {
    if is_root() {
        return PathBuf::from("/var/lib/dm");
    }
    match std::env::var_os("XDG_DATA_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("dm"),
        _ => home().join(".local/share/dm"),
    }
}

/// `/run/dm/mnt` for root, `$XDG_RUNTIME_DIR/dm/mnt` otherwise.
pub fn default_mount_dir() -> PathBuf {
    if is_root() {
        PathBuf::from("/run/dm/mnt")
    } else {
        runtime_dir().join("mnt")
    }
}

/// `/run/dm/dm.sock` for root, `$XDG_RUNTIME_DIR/dm/dm.sock` otherwise.
pub fn default_socket() -> PathBuf {
    if is_root() {
        PathBuf::from("/run/dm/dm.sock")
    } else {
        runtime_dir().join("dm.sock")
    }
}

/// `/run/docker/plugins/dm.sock` (where Docker looks for the `dm` volume
/// plugin) for root; none otherwise (Docker runs as root).
pub fn default_plugin_socket() -> Option<PathBuf> {
    is_root().then(|| PathBuf::from("/run/docker/plugins/dm.sock"))
}
