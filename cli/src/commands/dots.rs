//! `dm init`, `dm list`, `dm switch`, `dm dot show`, `dm dot delete`.

use super::Ctx;
use crate::api::{self, CreateDotRequest, DotSummary, Empty};
use crate::format::{human_size, table, tsv_field};
use anyhow::{anyhow, bail, Context, Result};
use dm_store::DotName;
use std::io::{BufRead, IsTerminal, Write};

fn parse_dot(name: &str) -> Result<DotName> {
    DotName::parse(name).map_err(|e| anyhow!("{e}"))
}

pub fn init(ctx: &mut Ctx, dot: &str, block_size: Option<u32>) -> Result<()> {
    let name = parse_dot(dot).map_err(|e| match dot.split_once('.') {
        // `dm init myapp.orders-db`: subdots are made by using them.
        Some((d, sub)) => anyhow!(
            "{e}; '.' separates a subdot: `dm init {d}`, then use {d}.{sub} as a volume name or `dm mount {d}.{sub} PATH` (a subdot is made when first used)"
        ),
        None => e,
    })?;
    let _: DotSummary = ctx
        .client()?
        .post(
            "/v1/dots",
            &CreateDotRequest {
                name: name.to_string(),
                block_size,
            },
        )
        .map_err(|e| {
            if e.to_string().contains("already exists") {
                anyhow!("{e}; pick another name, or use it with `dm switch {name}`")
            } else {
                e
            }
        })?;
    Ok(())
}

/// Uncommitted bytes as `dm list` shows them: `.` for none; changes that
/// wrote no data (deletes, truncates, chmod) show as `0 B`, not as clean.
fn dirty_cell(bytes: u64, uncommitted: bool) -> String {
    if bytes == 0 && !uncommitted {
        ".".to_string()
    } else {
        human_size(bytes)
    }
}

pub fn list(ctx: &mut Ctx, scripting: bool) -> Result<()> {
    let dots: Vec<DotSummary> = ctx.client()?.get("/v1/dots")?;
    let current = ctx.config.current_dot.clone();
    let is_current = |d: &DotSummary| {
        current
            .as_deref()
            .and_then(|c| DotName::parse(c).ok())
            .is_some_and(|c| c.namespace == d.namespace && c.name == d.name)
    };
    if scripting {
        for d in &dots {
            println!(
                "{}\t{}\t{}\t{}\t{}\t{}\t{}",
                d.full_name,
                d.current_branch,
                d.server,
                d.containers.join(","),
                d.size,
                d.commits,
                d.dirty_bytes
            );
        }
        return Ok(());
    }
    if !ctx.config.remotes.is_empty() {
        println!(
            "Current remote: {} (use 'dm remote -v' to list and 'dm remote switch' to switch)",
            ctx.config.current_remote.as_deref().unwrap_or("(none)")
        );
        println!();
    }
    let mut rows = vec![[
        "  DOT",
        "BRANCH",
        "SERVER",
        "CONTAINERS",
        "SIZE",
        "COMMITS",
        "DIRTY",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect::<Vec<_>>()];
    for d in &dots {
        let mark = if is_current(d) { "* " } else { "  " };
        rows.push(vec![
            format!("{mark}{}", d.full_name),
            d.current_branch.clone(),
            d.server.chars().take(7).collect(),
            d.containers.join(","),
            human_size(d.size),
            d.commits.to_string(),
            dirty_cell(d.dirty_bytes, d.uncommitted),
        ]);
    }
    print!("{}", table(&rows));
    Ok(())
}

pub fn switch(ctx: &mut Ctx, dot: &str) -> Result<()> {
    let name = parse_dot(dot)?;
    ctx.dot_brief(&name)?;
    ctx.update_config(|c| c.current_dot = Some(name.to_string()))
}

pub fn show(ctx: &mut Ctx, dot: Option<&str>, scripting: bool) -> Result<()> {
    let name = ctx.dot(dot)?;
    let d = ctx.dot_detail(&name)?;
    let s = &d.summary;
    if scripting {
        println!("dot\t{}", s.full_name);
        println!("namespace\t{}", s.namespace);
        println!("id\t{}", s.id);
        println!("server\t{}", s.server);
        println!("current_branch\t{}", s.current_branch);
        println!("size\t{}", s.size);
        println!("commits\t{}", s.commits);
        println!("dirty\t{}", s.dirty_bytes);
        println!("block_size\t{}", s.block_size);
        for b in &d.branch_details {
            println!(
                "branch\t{}\t{}\t{}\t{}\t{}",
                b.name,
                b.head.as_deref().unwrap_or(""),
                b.commits,
                b.dirty_bytes,
                b.containers.join(",")
            );
        }
        for m in &d.mounts {
            println!("mount\t{}\t{}\t{}", m.volume, m.branch, tsv_field(&m.path));
        }
        for m in &d.unrestored {
            println!(
                "unrestored\t{}\t{}\t{}",
                m.volume,
                tsv_field(&m.path),
                tsv_field(&m.error)
            );
        }
        for (remote, rdot) in super::sync::upstreams_of(ctx, &name) {
            println!("upstream\t{remote}\t{rdot}");
        }
        return Ok(());
    }
    println!("Dot {}:", s.full_name);
    println!("  Namespace:      {}", s.namespace);
    println!("  Dot id:         {}", s.id);
    println!("  Server:         {}", s.server);
    println!("  Current branch: {}", s.current_branch);
    println!("  Size:           {}", human_size(s.size));
    println!("  Commits:        {}", s.commits);
    println!(
        "  Dirty:          {}",
        match (s.dirty_bytes, s.uncommitted) {
            (0, false) => "no".to_string(),
            (b, _) => format!("{} (uncommitted changes)", human_size(b)),
        }
    );
    println!("  Block size:     {}", human_size(s.block_size as u64));
    println!("  Branches:");
    for b in &d.branch_details {
        let mark = if b.current { "*" } else { " " };
        let head = b
            .head
            .as_deref()
            .map(|h| format!(", head {}", h.chars().take(7).collect::<String>()))
            .unwrap_or_default();
        let plural = if b.commits == 1 { "" } else { "s" };
        let origin = b
            .origin
            .as_ref()
            .map(|o| {
                format!(
                    ", from {} at {}",
                    o.branch,
                    &o.commit[..7.min(o.commit.len())]
                )
            })
            .unwrap_or_default();
        let containers = if b.containers.is_empty() {
            String::new()
        } else {
            format!(", containers {}", b.containers.join(","))
        };
        println!(
            "  {mark} {} ({} commit{plural}{head}, {}{origin}{containers})",
            b.name,
            b.commits,
            match (b.dirty_bytes, b.uncommitted) {
                (0, false) => "clean".to_string(),
                (n, _) => format!("dirty {}", human_size(n)),
            }
        );
    }
    if !d.mounts.is_empty() {
        println!("  Mounts:");
        for m in &d.mounts {
            let how = if m.pinned {
                format!("pinned to {}", m.branch)
            } else {
                format!("follows the current branch, now {}", m.branch)
            };
            println!("    {}  {} ({how})", m.path, m.volume);
        }
    }
    if !d.unrestored.is_empty() {
        println!("  Not mounted (the server's start could not; it tries again at the next, `dm unmount PATH` forgets one):");
        for m in &d.unrestored {
            println!("    {}  {}: {}", m.path, m.volume, m.error);
        }
    }
    for (remote, rdot) in super::sync::upstreams_of(ctx, &name) {
        println!("  Upstream on {remote}: {rdot}");
    }
    Ok(())
}

pub fn delete(ctx: &mut Ctx, dot: &str, force: bool) -> Result<()> {
    let name = parse_dot(dot)?;
    let d = ctx.dot_brief(&name)?;
    if !force {
        if !std::io::stdin().is_terminal() {
            bail!(
                "not deleting dot {name}: confirmation needs a terminal; use `dm dot delete -f {name}` to delete without asking"
            );
        }
        let n = d.summary.branches.len();
        print!(
            "Delete dot {name} with its {n} branch{} and all their commits? This cannot be undone. Type the dot name to confirm: ",
            if n == 1 { "" } else { "es" }
        );
        std::io::stdout().flush().ok();
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("reading the confirmation")?;
        if line.trim() != name.to_string() && line.trim() != name.name {
            bail!("not deleting dot {name}: the confirmation did not match");
        }
    }
    let _: Empty = ctx
        .client()?
        .delete(&api::dot_path(&name.namespace, &name.name))?;
    // As `dm branch -D` says it.
    let n = d.summary.branches.len();
    println!(
        "Deleted dot {name} ({n} branch{}).",
        if n == 1 { "" } else { "es" }
    );
    super::sync::dot_deleted(ctx, &name)?;
    let is_current = |c: &Option<String>| {
        c.as_deref().and_then(|c| DotName::parse(c).ok()).as_ref() == Some(&name)
    };
    if is_current(&ctx.config.current_dot) {
        // Checked again under the lock: another command may have switched.
        ctx.update_config(|c| {
            if is_current(&c.current_dot) {
                c.current_dot = None;
            }
        })?;
    }
    Ok(())
}
