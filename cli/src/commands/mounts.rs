//! `dm mount`, `dm unmount`.

use super::Ctx;
use crate::api::{MountRequest, MountView, UnmountRequest, UnmountResponse};
use anyhow::{Context, Result};
use std::path::{Component, Path, PathBuf};

/// Makes `p` absolute against the current directory, lexically (no stat:
/// the path may be a FUSE mount whose server is busy or gone), except
/// that `..` after an existing directory leads where the kernel goes:
/// `link/..` is the parent of the symlink's target, not the link's.
fn absolute(p: &Path) -> Result<PathBuf> {
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .context("reading the current directory")?
            .join(p)
    };
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            Component::ParentDir => {
                match std::fs::canonicalize(&out) {
                    Ok(real) => out = real,
                    // The kernel and mkdir refuse `dangling/..`.
                    Err(_) if std::fs::symlink_metadata(&out).is_ok_and(|m| m.is_symlink()) => {
                        anyhow::bail!(
                            "{}: {} is a symlink to nothing (`..` after it leads nowhere)",
                            p.display(),
                            out.display()
                        )
                    }
                    Err(_) => {}
                }
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    Ok(out)
}

pub fn mount(ctx: &mut Ctx, volume: &str, path: Option<PathBuf>) -> Result<()> {
    // `dm mount PATH DOT`: the arguments swapped (a dot name has no `/`
    // but its namespace's, and starts with none of these). A directory
    // named like the dot (where it was mounted before) is no sign of it:
    // that is only said when no such dot exists.
    let swapped = |p: &Path| format!("the dot comes first (`dm mount {} {volume}`)", p.display());
    if let (true, Some(p)) = (volume.starts_with(['/', '.', '~']), &path) {
        anyhow::bail!("{volume} looks like a path, not a dot: {}", swapped(p));
    }
    let is_dir_here = Path::new(volume).is_dir();
    let swapped = path.as_deref().map(swapped);
    let path = path.map(|p| absolute(&p)).transpose()?;
    let req = MountRequest {
        volume: volume.to_string(),
        path: path.map(|p| p.display().to_string()),
    };
    let m: MountView = ctx.client()?.post("/v1/mounts", &req).map_err(|e| {
        let msg = e.to_string();
        let dot = volume.split(['@', '.']).next().unwrap_or(volume);
        if let (true, true, Some(swapped)) = (msg.contains("dot not found"), is_dir_here, &swapped)
        {
            anyhow::anyhow!("{msg}, and {volume} is a directory here: {swapped}")
        } else if msg.contains("dot not found") {
            anyhow::anyhow!("{msg} (see `dm list`, or create it with `dm init {dot}`)")
        } else if msg.contains("branch not found") {
            anyhow::anyhow!(
                "{msg} (see `dm branch`; make it with `dm branch NAME`, or `dm checkout -b NAME`)"
            )
        } else {
            e
        }
    })?;
    println!("{}", m.path);
    Ok(())
}

/// The mount `p` leads to: a symlink to a mount, or a path through a
/// symlinked directory, names the mount point itself (the server knows
/// mounts by it). Left as is where it cannot be resolved (a dead mount).
fn resolved(p: PathBuf) -> PathBuf {
    if let Ok(m) = std::fs::symlink_metadata(&p) {
        if m.file_type().is_symlink() {
            if let Ok(c) = std::fs::canonicalize(&p) {
                return c;
            }
        }
    }
    match (p.parent(), p.file_name()) {
        (Some(d), Some(n)) => std::fs::canonicalize(d).map_or(p.clone(), |d| d.join(n)),
        _ => p,
    }
}

pub fn unmount(ctx: &mut Ctx, path: &Path, force: bool) -> Result<()> {
    let req = UnmountRequest {
        path: resolved(absolute(path)?).display().to_string(),
        force,
    };
    let r: UnmountResponse = ctx.client()?.post("/v1/mounts/unmount", &req)?;
    if r.detached_busy {
        // Without --force the server found no process using it.
        let by = if force {
            ""
        } else {
            " (by a process this server cannot see, such as another user's working directory)"
        };
        eprintln!(
            "warning: {} was still in use{by}: it was detached lazily, and what uses it goes on \
             using the dot through it until it leaves",
            req.path
        );
    }
    Ok(())
}
