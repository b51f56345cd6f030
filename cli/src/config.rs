//! Client-side state: the current dot and the remotes, kept in a TOML file
//! (`--config`, `DM_CONFIG`, default `~/.dm/config.toml`), like Dotmesh.

use anyhow::{Context, Result};
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
        match self.port {
            Some(p) => format!("{}@{}:{p}", self.user, self.hostname),
            None => format!("{}@{}", self.user, self.hostname),
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
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/root"));
        home.join(".dm").join("config.toml")
    }

    /// Loads `path`; a missing file is an empty config.
    pub fn load(path: &Path) -> Result<Config> {
        match std::fs::read_to_string(path) {
            Ok(s) => toml::from_str(&s).with_context(|| {
                format!(
                    "reading the config file {} (fix or delete it)",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Writes the config atomically (temp file + rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
        }
        let text = toml::to_string_pretty(self).context("encoding the config")?;
        let tmp = path.with_extension("toml.tmp");
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }
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
        c.save(&path).unwrap();
        assert_eq!(Config::load(&path).unwrap(), c);
        let _ = std::fs::remove_dir_all(dir);
    }
}
