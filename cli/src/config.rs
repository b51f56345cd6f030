//! Client-side state: the current dot and the remotes, kept in a TOML file
//! (`--config`, `DM_CONFIG`, default `~/.dm/config.toml`), like Dotmesh.

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A remote server (hub) the user can push to and pull from.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Remote {
    /// User name on the remote.
    pub user: String,
    /// Host name or address.
    pub hostname: String,
    /// Port (server default when None).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

impl Remote {
    /// `USER@HOST[:PORT]`, as `dm remote add` takes it.
    pub fn target(&self) -> String {
        let host = match self.hostname.contains(':') {
            true => format!("[{}]", self.hostname),
            false => self.hostname.clone(),
        };
        match self.port {
            Some(p) => format!("{}@{host}:{p}", self.user),
            None => format!("{}@{host}", self.user),
        }
    }
}

/// The client configuration file.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Config {
    /// The dot commands use when none is given (`dm switch`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_dot: Option<String>,
    /// The remote transfers use by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_remote: Option<String>,
    /// Known remotes by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub remotes: BTreeMap<String, Remote>,
}

impl Config {
    /// The default config path: `~/.dm/config.toml`.
    pub fn default_path() -> PathBuf {
        crate::paths::home().join(".dm").join("config.toml")
    }

    /// Loads `path`; a missing file is an empty config.
    pub fn load(path: &Path) -> Result<Config> {
        load_file(path)
    }

    /// Changes the config with `f` under the lock (see [`update_file`]).
    pub fn update(path: &Path, f: impl FnOnce(&mut Config)) -> Result<Config> {
        update_file(path, |c: &mut Config| {
            f(c);
            Ok(())
        })
        .map(|(c, ())| c)
    }
}

/// Loads one of the client's TOML files; a missing file is the default.
pub fn load_file<T: Default + DeserializeOwned>(path: &Path) -> Result<T> {
    match std::fs::read_to_string(path) {
        Ok(s) => toml::from_str(&s)
            .with_context(|| format!("reading {} (fix or delete it)", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Reads, changes with `f` and writes back one of the client's TOML files
/// (`config.toml`, `sync.toml`) while holding an exclusive lock on
/// `FILE.lock` beside it, so that dm commands run at once (scripts, CI)
/// neither lose each other's changes nor mix their bytes. The file is
/// replaced atomically by a temp file of its own (mode 0600: `sync.toml`
/// holds API keys). Nothing is written when `f` fails.
pub fn update_file<T, R>(path: &Path, f: impl FnOnce(&mut T) -> Result<R>) -> Result<(T, R)>
where
    T: Default + Serialize + DeserializeOwned,
{
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    // This user's only, whatever the umask: whoever may write in it could
    // replace the files (and the hub fingerprints pinned in them).
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let mut lock_name = path.as_os_str().to_owned();
    lock_name.push(".lock");
    let lock_path = PathBuf::from(lock_name);
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .with_context(|| format!("locking {}", lock_path.display()))?;
    let mut value: T = load_file(path)?;
    let r = f(&mut value)?;
    let text =
        toml::to_string_pretty(&value).with_context(|| format!("encoding {}", path.display()))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a temp file in {}", dir.display()))?;
    tmp.write_all(text.as_bytes())
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("writing {}", tmp.path().display()))?;
    tmp.persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok((value, r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let dir = std::env::temp_dir().join(format!("dm-config-test-{}", std::process::id()));
        let path = dir.join("config.toml");
        assert_eq!(Config::load(&path).unwrap(), Config::default());
        let mut c = Config {
            current_dot: Some("myapp".into()),
            ..Config::default()
        };
        c.remotes.insert(
            "hub".into(),
            Remote {
                user: "alice".into(),
                hostname: "dothub.com".into(),
                port: None,
            },
        );
        let saved = Config::update(&path, |f| *f = c.clone()).unwrap();
        assert_eq!(saved, c);
        assert_eq!(Config::load(&path).unwrap(), c);
        let _ = std::fs::remove_dir_all(dir);
    }
}
