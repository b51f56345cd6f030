//! Sections measured by the feature owners' own benchmarks, run here as
//! separate programs whose Markdown output is embedded in the report. Each
//! compares dm with a baseline measured in the same run (native directory,
//! rsync) and reports ratios. A benchmark that cannot run here (not root, no
//! PostgreSQL, no fio) says why instead of failing the report.

use super::{Ctx, Outcome};
use anyhow::Result;
use std::path::PathBuf;
use std::process::Command;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `cmd`, embeds its Markdown (without its `# ` title) in the report,
/// and adds a headline of its first table's rows.
fn embed(ctx: &mut Ctx, what: &str, cmd: &mut Command) -> Result<Outcome> {
    let out = match cmd.current_dir(repo_root()).output() {
        Ok(out) => out,
        Err(e) => return Ok(Outcome::NotMeasured(format!("{what} could not run: {e}"))),
    };
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(5).collect();
        return Ok(Outcome::NotMeasured(format!(
            "{what} failed ({}): {}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let body: Vec<&str> = text.lines().filter(|l| !l.starts_with("# ")).collect();
    ctx.report.raw(&format!("{}\n", body.join("\n")));
    // Headline: the rows of the first table, cells joined with " / ".
    let cells: Vec<String> = body
        .iter()
        .skip_while(|l| !l.starts_with("| "))
        .take_while(|l| l.starts_with('|'))
        .filter(|l| !l.starts_with("|---"))
        .skip(1)
        .map(|l| {
            let c: Vec<&str> = l
                .split('|')
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .collect();
            c.join(" / ")
        })
        .collect();
    if !cells.is_empty() {
        ctx.headlines.push(format!("{what}: {}", cells.join("; ")));
    }
    Ok(Outcome::Done)
}

/// FUSE vs native: `bench/fuse/fio.sh` (fio sequential and random reads and
/// writes, create+stat+unlink of 10,000 files) on a dm mount and on a native
/// directory of the same disk.
pub fn fuse_vs_native(ctx: &mut Ctx) -> Result<Outcome> {
    embed(
        ctx,
        "FUSE vs native",
        Command::new("bash")
            .arg("bench/fuse/fio.sh")
            .env("FIO_SIZE", "512m")
            .env("FIO_SECONDS", "10"),
    )
}

/// Push bytes: sync's `push_bench` example (first push, 1% change, a dot the
/// hub mostly has) against `rsync -az` of the same files and the size of the
/// changed blocks.
pub fn push_bytes(ctx: &mut Ctx) -> Result<Outcome> {
    embed(
        ctx,
        "Push",
        Command::new("cargo")
            .args([
                "run",
                "--quiet",
                "--release",
                "-p",
                "dm-sync",
                "--example",
                "push_bench",
            ])
            .env("DM_BENCH_MIB", "256"),
    )
}

/// PostgreSQL TPS: `bench/pg/pgbench.sh` (pgbench on dm mounts with 8 KiB
/// and 64 KiB blocks vs a native directory, commit time under load, space of
/// 10 commits vs 10 copies).
pub fn postgres_tps(ctx: &mut Ctx) -> Result<Outcome> {
    embed(
        ctx,
        "PostgreSQL",
        Command::new("bash")
            .arg("bench/pg/pgbench.sh")
            .env("PGBENCH_SECONDS", "10")
            .env("PGBENCH_BLOCK_SIZES", "8K 64K"),
    )
}

/// Server memory: `bench/mem/rss.sh` (the server's resident set after each
/// round of writes, fsyncs, deletes and a commit, against the first
/// round's, and the store's own accounting of its caches and buffers).
pub fn server_memory(ctx: &mut Ctx) -> Result<Outcome> {
    embed(
        ctx,
        "Server memory",
        Command::new("bash")
            .arg("bench/mem/rss.sh")
            .env("ROUNDS", "8"),
    )
}
