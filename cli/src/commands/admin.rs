//! `dm gc`, `dm fsck`, `dm version`, `dm completions`.

use super::Ctx;
use crate::api::{Empty, FsckResponse, GcResponse, VersionInfo};
use crate::format::human_size;
use anyhow::{bail, Result};
use clap::CommandFactory;

pub fn gc(ctx: &mut Ctx) -> Result<()> {
    let r: GcResponse = ctx.client()?.post("/v1/gc", &Empty {})?;
    let given_back = r.log_bytes_freed + r.table_bytes_freed;
    println!(
        "Deleted {} chunks and {} objects, freed {} ({} given back to the disk{})",
        r.chunks_deleted,
        r.objects_deleted,
        human_size(r.bytes_freed),
        human_size(given_back),
        // Space a GC freed but could not give back (stopped, or a busy
        // segment) comes back at a later one.
        if given_back > r.bytes_freed {
            ", with what earlier collections had freed"
        } else {
            ""
        }
    );
    if r.chunks_deleted == 0 && r.objects_deleted == 0 {
        println!("(unless it runs with --auto-gc off, the server also collects by itself as the store grows and after deletes: its log says when)");
    }
    if let Some(needed) = r.disk_full {
        println!("{}", still_full(needed));
    }
    Ok(())
}

/// What a user reads while the server's disk is full.
fn still_full(needed: u64) -> String {
    format!(
        "The disk holding dm's data is still full: dm takes new data again once {} are free. \
         Delete files, branches (`dm branch -d`) or dots (`dm dot delete`), or `dm reset --hard` \
         away uncommitted data, then run `dm gc`; or free space outside dm.",
        human_size(needed)
    )
}

pub fn fsck(ctx: &mut Ctx) -> Result<()> {
    let r: FsckResponse = ctx.client()?.post("/v1/fsck", &Empty {})?;
    println!(
        "Checked {} objects and {} chunks",
        r.objects_checked, r.chunks_checked
    );
    for n in &r.notes {
        println!("note: {n}");
    }
    if r.problems.is_empty() {
        println!("No problems found");
        return Ok(());
    }
    for p in &r.problems {
        println!("problem: {p}");
    }
    bail!(
        "fsck found {} problem{}",
        r.problems.len(),
        if r.problems.len() == 1 { "" } else { "s" }
    )
}

pub fn version(ctx: &mut Ctx) -> Result<()> {
    println!("Client: dm {}", env!("CARGO_PKG_VERSION"));
    let v: VersionInfo = ctx.client()?.get("/v1/version")?;
    println!(
        "Server: dm {} (API {}, server id {})",
        v.version, v.api_version, v.server_id
    );
    if let Some(needed) = v.disk_full {
        println!("{}", still_full(needed));
    }
    Ok(())
}

pub fn completions(shell: clap_complete::Shell) -> Result<()> {
    let mut cmd = crate::cli::Cli::command();
    clap_complete::generate(shell, &mut cmd, "dm", &mut std::io::stdout());
    Ok(())
}
