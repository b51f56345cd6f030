//! `dm mount`, `dm unmount`.

use super::Ctx;
use crate::api::{Empty, MountRequest, MountView, UnmountRequest};
use anyhow::{Context, Result};
use std::path::{Component, Path, PathBuf};

/// Makes `p` absolute against the current directory, lexically (no stat:
/// the path may be a FUSE mount whose server is busy or gone).
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
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    Ok(out)
}

pub fn mount(ctx: &mut Ctx, volume: &str, path: Option<PathBuf>) -> Result<()> {
    let path = path.map(|p| absolute(&p)).transpose()?;
    let req = MountRequest {
        volume: volume.to_string(),
        path: path.map(|p| p.display().to_string()),
    };
    let m: MountView = ctx.client()?.post("/v1/mounts", &req)?;
    println!("{}", m.path);
    Ok(())
}

pub fn unmount(ctx: &mut Ctx, path: &Path, force: bool) -> Result<()> {
    let req = UnmountRequest {
        path: absolute(path)?.display().to_string(),
        force,
    };
    let _: Empty = ctx.client()?.post("/v1/mounts/unmount", &req)?;
    Ok(())
}
