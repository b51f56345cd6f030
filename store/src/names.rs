//! Names of dots, branches, subdots and namespaces, and Docker-style volume
//! names `[namespace/]dot[@branch][.subdot]`.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The rule every dot, branch, subdot and namespace name follows.
pub const NAME_RULE: &str = "names are 1 to 64 characters of A-Z, a-z, 0-9, '_' and '-'";

/// The namespace of dots named without one.
pub const DEFAULT_NAMESPACE: &str = "admin";
/// The subdot of a plain dot name.
pub const DEFAULT_SUBDOT: &str = "__default__";
/// The pseudo-subdot that names the whole dot tree.
pub const ROOT_SUBDOT: &str = "__root__";
/// The branch every dot has from its creation.
pub const MASTER: &str = "master";

/// Checks `name` against [`NAME_RULE`]; `kind` names it in the error.
pub fn validate(kind: &'static str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidName {
            kind,
            name: name.to_string(),
            rule: NAME_RULE,
        })
    }
}

/// Checks the name of a dot or branch being created: [`validate`], and not
/// one a command line would read as something else: a leading '-' looks
/// like an option, and a branch `HEAD` would be shadowed by the revision
/// `HEAD` (`dm reset --hard HEAD`). Names that exist already stay usable.
pub fn validate_new(kind: &'static str, name: &str) -> Result<()> {
    validate(kind, name)?;
    let reason = if name.starts_with('-') {
        Some("it would read as an option: start it with a letter, digit or '_'")
    } else if kind == "branch" && name.eq_ignore_ascii_case("HEAD") {
        Some("HEAD names the current commit in revisions")
    } else {
        None
    };
    match reason {
        Some(rule) => Err(Error::InvalidName {
            kind,
            name: name.to_string(),
            rule,
        }),
        None => Ok(()),
    }
}

/// Checks a POSIX file name: not empty, no '/', no NUL, at most 255 bytes,
/// not "." or "..".
pub fn validate_file_name(name: &[u8]) -> Result<()> {
    use crate::error::libc_consts::*;
    if name.len() > 255 {
        return Err(Error::fs("file name", ENAMETOOLONG));
    }
    if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
        return Err(Error::fs("file name", EINVAL));
    }
    if name == b"." || name == b".." {
        return Err(Error::fs("file name", EINVAL));
    }
    Ok(())
}

/// A dot's full name: namespace and dot.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DotName {
    pub namespace: String,
    pub name: String,
}

impl DotName {
    /// Parses `[namespace/]dot` (namespace defaults to `admin`).
    pub fn parse(s: &str) -> Result<DotName> {
        let (namespace, name) = match s.split_once('/') {
            Some((ns, n)) => (ns, n),
            None => (DEFAULT_NAMESPACE, s),
        };
        validate("namespace", namespace)?;
        validate("dot", name)?;
        Ok(DotName {
            namespace: namespace.to_string(),
            name: name.to_string(),
        })
    }

    /// A dot in the default namespace.
    pub fn new(name: &str) -> Result<DotName> {
        validate("dot", name)?;
        Ok(DotName {
            namespace: DEFAULT_NAMESPACE.to_string(),
            name: name.to_string(),
        })
    }
}

impl fmt::Display for DotName {
    /// `dot` in the default namespace, `namespace/dot` otherwise.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace == DEFAULT_NAMESPACE {
            f.write_str(&self.name)
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

/// A parsed volume name `[namespace/]dot[@branch][.subdot]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VolumeName {
    pub dot: DotName,
    /// A pinned branch, or None to follow the dot's current branch.
    pub branch: Option<String>,
    /// The subdot (`__default__` when not given, `__root__` for the whole dot).
    pub subdot: String,
}

impl VolumeName {
    /// True when this volume shows `branch` of `dot`, given the dot's
    /// current branch: pinned to it, or following the dot while it is
    /// current.
    pub fn shows_branch(&self, dot: &DotName, branch: &str, current: &str) -> bool {
        &self.dot == dot && self.branch.as_deref().unwrap_or(current) == branch
    }

    /// Parses `[namespace/]dot[@branch][.subdot]`.
    pub fn parse(s: &str) -> Result<VolumeName> {
        if s.is_empty() {
            return Err(Error::InvalidName {
                kind: "volume",
                name: s.into(),
                rule: "volume names are [namespace/]dot[@branch][.subdot]",
            });
        }
        let (rest, subdot) = match s.split_once('.') {
            Some((r, sd)) => {
                if sd != ROOT_SUBDOT && sd != DEFAULT_SUBDOT {
                    validate("subdot", sd)?;
                }
                (r, sd.to_string())
            }
            None => (s, DEFAULT_SUBDOT.to_string()),
        };
        let (dot, branch) = match rest.split_once('@') {
            Some((d, b)) => {
                validate("branch", b)?;
                (d, Some(b.to_string()))
            }
            None => (rest, None),
        };
        Ok(VolumeName {
            dot: DotName::parse(dot)?,
            branch,
            subdot,
        })
    }
}

impl fmt::Display for VolumeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.dot)?;
        if let Some(b) = &self.branch {
            write!(f, "@{b}")?;
        }
        if self.subdot != DEFAULT_SUBDOT {
            write!(f, ".{}", self.subdot)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_names() {
        let v = VolumeName::parse("alice/myapp@dev.orders-db").unwrap();
        assert_eq!(v.dot.namespace, "alice");
        assert_eq!(v.dot.name, "myapp");
        assert_eq!(v.branch.as_deref(), Some("dev"));
        assert_eq!(v.subdot, "orders-db");
        assert_eq!(v.to_string(), "alice/myapp@dev.orders-db");
        let v = VolumeName::parse("myapp").unwrap();
        assert_eq!(v.dot.namespace, "admin");
        assert_eq!(v.subdot, DEFAULT_SUBDOT);
        assert_eq!(v.to_string(), "myapp");
        assert!(VolumeName::parse("myapp.__root__").is_ok());
    }

    #[test]
    fn bad_names() {
        for bad in [
            "",
            "a/b/c",
            "..",
            "a b",
            "a\0b",
            "x.y.z",
            "@b",
            "a@",
            "a.",
            "/a",
            &"x".repeat(65),
        ] {
            assert!(VolumeName::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate("dot", &"x".repeat(64)).is_ok());
        assert!(validate("branch", "feature/x").is_err());
        for (kind, bad) in [("dot", "-x"), ("branch", "-f"), ("branch", "HEAD")] {
            assert!(validate_new(kind, bad).is_err(), "{bad:?} accepted");
            assert!(
                validate(kind, bad).is_ok(),
                "{bad:?} refused where it exists"
            );
        }
        assert!(validate_new("dot", "head").is_ok());
        assert!(validate_new("branch", "x-1").is_ok());
        assert!(validate_file_name(b"a/b").is_err());
        assert!(validate_file_name(&[b'a'; 256]).is_err());
        assert!(validate_file_name(&[b'a'; 255]).is_ok());
        assert!(validate_file_name(b"..").is_err());
        assert!(validate_file_name(b"a\0").is_err());
    }
}
