//! Commits and branches of the current dot: `dm commit`, `dm log`,
//! `dm branch`, `dm checkout`, `dm reset`, `dm diff`, `dm status`.

use super::Ctx;
use crate::api::{
    self, BranchView, ChangeView, CheckoutRequest, CommitRequest, CommitView, DiffResponse,
    DotDetail, Empty, ResetRequest, ResetResponse, StatusResponse,
};
use crate::format::{human_size, quote_path, short_id};
use anyhow::{anyhow, bail, Result};
use dm_store::DotName;
use std::collections::BTreeMap;

/// The current dot, with its current branch's details only.
fn current(ctx: &mut Ctx) -> Result<(DotName, DotDetail)> {
    current_with(ctx, None)
}

/// The current dot, with the details of its current branch and of `branch`.
fn current_with(ctx: &mut Ctx, branch: Option<&str>) -> Result<(DotName, DotDetail)> {
    let dot = ctx.dot(None)?;
    let detail = ctx.dot_detail_of(&dot, Some(branch.unwrap_or("")))?;
    Ok((dot, detail))
}

/// The author of commits without `--author`: `admin` for root on the
/// local socket (like Dotmesh), the user name otherwise.
fn default_author() -> String {
    if nix::unistd::geteuid().is_root() {
        return "admin".to_string();
    }
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "admin".to_string())
}

/// The one wording of "no such branch", with the dot's branches to pick from.
fn branch_not_found(dot: &DotName, branch: &str, branches: &[String]) -> String {
    format!(
        "branch {branch} not found in dot {dot} (branches: {})",
        branches.join(", ")
    )
}

pub fn commit(
    ctx: &mut Ctx,
    message: &str,
    metadata: &[String],
    branch: Option<&str>,
    author: Option<&str>,
) -> Result<()> {
    let author = match author.map(str::trim) {
        // DM_AUTHOR set but empty: as if unset, as git's GIT_AUTHOR_NAME.
        None | Some("") => default_author(),
        Some(a) => {
            let n = a.chars().count();
            let problem = match a.chars().find(|c| c.is_control()) {
                Some(c) => Some(format!("has a control character ({c:?})")),
                None if n > 256 => Some(format!("is {n} characters long")),
                None => None,
            };
            if let Some(problem) = problem {
                let shown: String = a.chars().take(40).collect();
                let more = if shown.len() < a.len() { "..." } else { "" };
                bail!(
                    "author {shown:?}{more} {problem}: give a name of 1 to 256 characters on one line, with no tabs or other control characters (--author or DM_AUTHOR)"
                )
            }
            a.to_string()
        }
    };
    let mut meta = BTreeMap::new();
    for kv in metadata {
        let Some((k, v)) = kv.split_once('=') else {
            bail!("metadata {kv:?} is not key=value (e.g. -d ticket=1234)");
        };
        if !k.starts_with(|c: char| c.is_ascii_lowercase()) {
            bail!("metadata key {k:?} must start with a lowercase letter");
        }
        if meta.insert(k.to_string(), v.to_string()).is_some() {
            bail!("metadata key {k:?} is given twice; give each key once");
        }
    }
    let (dot, d) = current_with(ctx, branch)?;
    let branch = branch.unwrap_or(&d.summary.current_branch);
    let Some(before) = d.branch_details.iter().find(|b| b.name == branch) else {
        // The summary, read a moment before the details, may still name a
        // branch deleted meanwhile.
        let names: Vec<String> = d
            .summary
            .branches
            .iter()
            .filter(|b| *b != branch)
            .cloned()
            .collect();
        bail!(branch_not_found(&dot, branch, &names));
    };
    // As seen just before: a write meanwhile makes the note wrong, never
    // the commit.
    let unchanged = before.head.is_some() && !before.uncommitted;
    let path = format!(
        "{}/commits",
        api::branch_path(&dot.namespace, &dot.name, branch)
    );
    let c: CommitView = ctx.client()?.post(
        &path,
        &CommitRequest {
            message: clean_message(message),
            author: Some(author),
            metadata: meta,
        },
    )?;
    println!("{}", c.id);
    if let (true, Some(parent)) = (unchanged, &before.head) {
        // dm commits a snapshot whatever changed (as Dotmesh); git would
        // have refused without --allow-empty. What it recorded: nothing
        // new, or the empty subdot directories that mounts made (which
        // are no one's change, but are recorded).
        let path = format!(
            "{}/diff?from={parent}&to={}",
            api::branch_path(&dot.namespace, &dot.name, branch),
            c.id
        );
        // The commit is made: a failure here only leaves the note out.
        let Ok(diff) = ctx.client()?.get::<DiffResponse>(&path) else {
            return Ok(());
        };
        let recorded: Vec<&str> = diff.changes.iter().map(|c| c.path.as_str()).collect();
        if recorded.is_empty() {
            eprintln!(
                "note: nothing had changed on {dot}@{branch} since its last commit: \
                 this commit has the same files (writes to another branch's mount \
                 do not show here)"
            );
        } else if diff
            .changes
            .iter()
            .all(|c| c.kind == "added" && c.path.rfind('/') == Some(0))
        {
            eprintln!(
                "note: nothing had changed on {dot}@{branch} since its last commit but \
                 the empty subdot directories that mounts made, which this commit \
                 records: {}",
                recorded.join(", ")
            );
        }
    }
    Ok(())
}

/// A commit message as git's `--cleanup=whitespace` leaves it: no
/// trailing whitespace, no blank lines before or after, runs of blank lines
/// as one (`-m $'\nsubject'` showed an empty subject in `dm log --oneline`).
fn clean_message(m: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let mut blank = false;
    for line in m.lines().map(str::trim_end) {
        if line.is_empty() {
            blank = !out.is_empty();
            continue;
        }
        if blank {
            out.push("");
            blank = false;
        }
        out.push(line);
    }
    out.join("\n")
}

/// `dm log [BRANCH] [-n N] [--oneline]`.
pub fn log(
    ctx: &mut Ctx,
    branch: Option<&str>,
    max_count: Option<usize>,
    oneline: bool,
) -> Result<()> {
    let (dot, d) = current(ctx)?;
    let current_branch = d.summary.current_branch.clone();
    // BRANCH, or a revision of the current branch (`HEAD~2`, a commit id):
    // its commits up to that one, as `git log REV`.
    let (branch, until) = match branch {
        None => (current_branch, None),
        Some(b) if d.summary.branches.iter().any(|x| x == b) => (b.to_string(), None),
        Some(b) => {
            let resolve = format!(
                "{}/resolve?rev={}",
                api::branch_path(&dot.namespace, &dot.name, &current_branch),
                api::encode(b)
            );
            match ctx.client()?.get::<api::ResolveResponse>(&resolve) {
                Ok(r) => (current_branch, Some((b, r.id))),
                Err(e) if e.to_string().contains("ambiguous") => bail!("{e}"),
                // Not a branch name: the revision's own error (`HEAD~99`
                // past the first commit said "invalid branch name").
                Err(e) if dm_store::names::validate("branch", b).is_err() => bail!("{e}"),
                Err(e) => bail!(
                    "{}; nor is it a revision: {}",
                    branch_not_found(&dot, b, &d.summary.branches),
                    // Said once already.
                    e.to_string()
                        .replace(&format!(" (and no branch is called {b})"), "")
                ),
            }
        }
    };
    // The server reads only the commits asked for (-n of a long history).
    let mut query = Vec::new();
    if let Some((_, id)) = &until {
        query.push(format!("until={id}"));
    }
    if let Some(n) = max_count {
        query.push(format!("max={n}"));
    }
    let path = format!(
        "{}/commits{}{}",
        api::branch_path(&dot.namespace, &dot.name, &branch),
        if query.is_empty() { "" } else { "?" },
        query.join("&")
    );
    let commits: Vec<CommitView> = ctx.client()?.get(&path).map_err(|e| match &until {
        Some((rev, _)) => anyhow!("{rev}: {e}"),
        None => e,
    })?;
    if commits.is_empty() && max_count != Some(0) {
        // As git says it (it prints nothing only for `-n 0`); on stderr,
        // so a script reading the log reads nothing.
        eprintln!("branch {branch} of dot {dot} has no commits yet");
        return Ok(());
    }
    let mut out = String::new();
    for c in &commits {
        if oneline {
            let first = c.message.lines().next().unwrap_or("");
            out.push_str(&format!("{} {first}\n", short_id(&c.id)));
            continue;
        }
        out.push_str(&format!(
            "commit {}\nAuthor: {}\nDate:   {}\n",
            c.id,
            c.author,
            log_date(c.timestamp_ns)
        ));
        for (k, v) in &c.metadata {
            // Further lines of a value indented, so that none reads as a
            // field of its own (git indents continued trailers the same way).
            out.push_str(&format!("{k}: {}\n", v.replace('\n', "\n    ")));
        }
        out.push('\n');
        for line in c.message.lines() {
            out.push_str(&format!("    {line}\n"));
        }
        out.push('\n');
    }
    print!("{out}");
    Ok(())
}

/// A commit's time as `dm log` shows it: RFC 2822 in UTC as git's
/// `--date=rfc` prints it, the day of the month unpadded (Dotmesh printed
/// nanoseconds since 1970).
fn log_date(ns: u64) -> String {
    match time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ns)) {
        Ok(t) => format!(
            "{}, {} {} {} {:02}:{:02}:{:02} +0000",
            &t.weekday().to_string()[..3],
            t.day(),
            &t.month().to_string()[..3],
            t.year(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => format!("{ns} ns after 1970"),
    }
}

pub fn list_branches(ctx: &mut Ctx) -> Result<()> {
    let (_, d) = current(ctx)?;
    for b in &d.summary.branches {
        let mark = if *b == d.summary.current_branch {
            "*"
        } else {
            " "
        };
        println!("{mark} {b}");
    }
    Ok(())
}

/// `dm branch NAME`: a new branch at the current head; the current branch
/// stays (`dm checkout -b NAME` also switches to it).
pub fn create_branch(ctx: &mut Ctx, branch: &str, start: Option<&str>) -> Result<()> {
    dm_store::names::validate_new("branch", branch).map_err(|e| anyhow!("{e}"))?;
    let (dot, _) = current(ctx)?;
    let path = format!("{}/branches", api::dot_path(&dot.namespace, &dot.name));
    let _: serde_json::Value = ctx.client()?.post(
        &path,
        &api::CreateBranchRequest {
            name: branch.to_string(),
            from: start.map(str::to_string),
        },
    )?;
    Ok(())
}

pub fn delete_branch(ctx: &mut Ctx, branch: &str, force: bool) -> Result<()> {
    dm_store::names::validate("branch", branch).map_err(|e| anyhow!("{e}"))?;
    let (dot, d) = current_with(ctx, Some(branch))?;
    let Some(b) = d.branch_details.iter().find(|b| b.name == branch) else {
        bail!(branch_not_found(&dot, branch, &d.summary.branches));
    };
    let path = format!(
        "{}?force={force}",
        api::branch_path(&dot.namespace, &dot.name, branch)
    );
    let _: Empty = ctx.client()?.delete(&path)?;
    // As git says it, so that a mistake can be undone from the id.
    match &b.head {
        Some(h) => println!("Deleted branch {branch} (was {}).", short_id(h)),
        None => println!("Deleted branch {branch} (no commits)."),
    }
    Ok(())
}

pub fn checkout(ctx: &mut Ctx, branch: &str, create: bool, start: Option<&str>) -> Result<()> {
    let (dot, d) = current(ctx)?;
    // git's `git checkout -`: back to the branch checked out before.
    let previous;
    let branch = if branch == "-" && !create {
        previous = d.summary.previous_branch.clone().ok_or_else(|| {
            anyhow!(
                "no previous branch in dot {dot}: `dm checkout -` goes back to the branch \
                 checked out before {}, and there is none (or it was deleted)",
                d.summary.current_branch
            )
        })?;
        previous.as_str()
    } else {
        branch
    };
    let valid = dm_store::names::validate("branch", branch);
    let exists = d.summary.branches.iter().any(|b| b == branch);
    if create && exists {
        bail!(
            "branch {branch} already exists in dot {dot}; switch to it with `dm checkout {branch}`"
        );
    }
    if !create && !exists {
        // A commit (or HEAD~2), not a branch: dm has no detached HEAD
        // (each branch has its own working state), so say how to start a
        // branch there.
        let resolve = format!(
            "{}/resolve?rev={}",
            api::branch_path(&dot.namespace, &dot.name, &d.summary.current_branch),
            api::encode(branch)
        );
        match ctx.client()?.get::<api::ResolveResponse>(&resolve) {
            Ok(r) => bail!(
                "{branch} is commit {} of dot {dot}, not a branch; dm has no detached HEAD: \
                 `dm checkout -b NAME {branch}` makes branch NAME starting there",
                short_id(&r.id)
            ),
            Err(e) if e.to_string().contains("ambiguous") => bail!("{e}"),
            Err(_) => {}
        }
        valid.map_err(|e| anyhow!("{e}"))?;
        // Only a name a new branch may have is offered (`dm checkout -b -`
        // was told to make a branch "-").
        if dm_store::names::validate_new("branch", branch).is_err() {
            bail!(branch_not_found(&dot, branch, &d.summary.branches));
        }
        bail!(
            "{}; create it with `dm checkout -b {branch}`",
            branch_not_found(&dot, branch, &d.summary.branches)
        );
    }
    valid.map_err(|e| anyhow!("{e}"))?;
    let path = format!("{}/checkout", api::dot_path(&dot.namespace, &dot.name));
    // Those it stops: the ones following the dot (pinned ones stay).
    let note = super::SlowNote::for_containers(&dot, &d.following);
    let view: BranchView = ctx.client()?.post(
        &path,
        &CheckoutRequest {
            branch: branch.to_string(),
            create,
            start: start.map(str::to_string),
        },
    )?;
    drop(note);
    // What the server did decides (another checkout may have run since
    // this one read the current branch).
    let Some(old) = &view.switched_from else {
        eprintln!("Already on '{branch}'");
        return Ok(());
    };
    eprintln!(
        "Switched to {}branch '{branch}'",
        if create { "a new " } else { "" }
    );
    // Unlike git, uncommitted changes do not come along: each branch has
    // its own working state. Said where a git user would expect them.
    let before = d.branch_details.iter().find(|b| &b.name == old);
    // Read again after the switch: what its containers wrote as they
    // stopped (a database's shutdown checkpoint) counts too.
    let after = ctx.dot_detail_of(&dot, Some(old)).ok();
    let from = after
        .as_ref()
        .and_then(|a| a.branch_details.iter().find(|b| &b.name == old))
        .or(before);
    let by_stop = before.is_some_and(|b| !b.uncommitted) && !d.following.is_empty();
    if let Some(from) = from.filter(|b| b.uncommitted) {
        let start = match (&from.head, start) {
            (_, Some(s)) => format!("starts at {s}"),
            (Some(h), None) if create => {
                format!("starts at {old}'s last commit {}", short_id(h))
            }
            (None, None) if create => format!("starts empty ({old} has no commit yet)"),
            _ => "shows its own working state".to_string(),
        };
        eprintln!(
            "note: the uncommitted changes on {old}{} stay there (each branch keeps its own \
             working state); {branch} {start}. `dm checkout {old}` goes back to them.",
            if by_stop {
                ", written as its containers stopped (a database's shutdown checkpoint),"
            } else {
                ""
            }
        );
    }
    Ok(())
}

pub fn reset(ctx: &mut Ctx, rev: &str, hard: bool) -> Result<()> {
    let (dot, d) = current(ctx)?;
    let path = format!(
        "{}/reset",
        api::branch_path(&dot.namespace, &dot.name, &d.summary.current_branch)
    );
    // Those it stops: the ones showing the branch (pinned to it too).
    let shown: &[String] = d
        .branch_details
        .iter()
        .find(|b| b.current)
        .map_or(&[], |b| &b.containers);
    let note = super::SlowNote::for_containers(&dot, shown);
    let r: ResetResponse = ctx.client()?.post(
        &path,
        &ResetRequest {
            rev: rev.to_string(),
            hard,
        },
    )?;
    drop(note);
    // As git says it; and how much the reset threw away, which git's
    // reflog would keep but dm cannot give back.
    println!(
        "HEAD is now at {} {}{}",
        short_id(&r.id),
        r.message.lines().next().unwrap_or(""),
        match (r.dropped, r.destroyed) {
            (0, _) => String::new(),
            (1, 1) => " (1 later commit destroyed)".to_string(),
            (n, d) if n == d => format!(" ({n} later commits destroyed)"),
            (1, 0) => " (1 later commit left it; another branch has it)".to_string(),
            (n, 0) => format!(" ({n} later commits left it; other branches have them)"),
            (n, d) =>
                format!(" ({n} later commits left it; {d} of them, on no other branch, destroyed)"),
        }
    );
    // A database keeps the old state in memory and writes it back, also
    // as it stops cleanly: restarted as the warning once said, it undid
    // the reset. Stopped first, the same reset again gives the commit.
    for h in &r.held_open {
        let (by, stop) = match h.processes.as_slice() {
            [] => (
                format!(" (`fuser -vm {}` names the process)", h.path),
                "stop it by its process id".to_string(),
            ),
            procs => (
                format!(
                    " by {}",
                    procs
                        .iter()
                        .map(|p| p.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                format!(
                    "stop it by its process id (`kill {}`)",
                    procs
                        .iter()
                        .map(|p| p.pid.to_string())
                        .collect::<Vec<_>>()
                        .join(" ")
                ),
            ),
        };
        eprintln!(
            "warning: {} file{} held open on {}{by} across the reset; {} now the reset \
             state under {} (a file deleted while open ends: ESTALE, and SIGBUS in a mapping \
             of it). A database running there still holds the old state and writes it back, \
             also as it stops: {stop}, as its own stop command reads a PID file that now is \
             the reset's (`pg_ctl stop` finds none, or a stale one), then run \
             `dm reset --hard {}` again (and stop it before a reset next time).",
            h.files,
            if h.files == 1 { " was" } else { "s were" },
            h.path,
            if h.processes.len() > 1 {
                "they see"
            } else {
                "it sees"
            },
            if h.processes.len() > 1 { "them" } else { "it" },
            short_id(&r.id),
        );
    }
    Ok(())
}

fn change_line(c: &ChangeView) -> String {
    let shown = |text: &str, bytes: &Option<Vec<u8>>| match bytes {
        Some(b) => quote_path(b),
        None => quote_path(text.as_bytes()),
    };
    let path = shown(&c.path, &c.path_bytes);
    match (c.kind.as_str(), &c.from) {
        ("renamed", Some(from)) => format!("R  {} -> {path}", shown(from, &c.from_bytes)),
        ("added", _) => format!("A  {path}"),
        ("deleted", _) => format!("D  {path}"),
        ("modified", _) => format!("M  {path}"),
        (k, _) => format!("?  {path} ({k})"),
    }
}

pub fn diff(ctx: &mut Ctx, from: Option<&str>, to: Option<&str>) -> Result<()> {
    let (dot, d) = current(ctx)?;
    let mut path = format!(
        "{}/diff",
        api::branch_path(&dot.namespace, &dot.name, &d.summary.current_branch)
    );
    let mut sep = '?';
    if let Some(f) = from {
        path.push_str(&format!("{sep}from={}", api::encode(f)));
        sep = '&';
    }
    if let Some(t) = to {
        path.push_str(&format!("{sep}to={}", api::encode(t)));
    }
    let r: DiffResponse = ctx.client()?.get(&path)?;
    for c in &r.changes {
        println!("{}", change_line(c));
    }
    Ok(())
}

pub fn status(ctx: &mut Ctx) -> Result<()> {
    let (dot, d) = current(ctx)?;
    let path = format!(
        "{}/status",
        api::branch_path(&dot.namespace, &dot.name, &d.summary.current_branch)
    );
    let s: StatusResponse = ctx.client()?.get(&path)?;
    print_status(&s);
    // The default subdot's directory is never seen as one (a mount of the
    // plain dot name shows what is in it): not named, a new dot's first
    // status said it.
    let made: Vec<&str> = s
        .mount_made
        .iter()
        .map(String::as_str)
        .filter(|p| *p != "/__default__")
        .collect();
    let one = made.len() == 1;
    if !made.is_empty() {
        println!(
            "Empty subdot director{} made by a mount, not counted as changes; the next \
             commit records {}: {}",
            if one { "y" } else { "ies" },
            if one { "it" } else { "them" },
            made.join(", ")
        );
    }
    Ok(())
}

/// `dm status`'s lines about the head and the changes.
fn print_status(s: &StatusResponse) {
    println!("On dot {}, branch {}", s.dot, s.branch);
    match &s.head {
        Some(h) => println!("HEAD: {h}"),
        None => println!("HEAD: none (no commits yet)"),
    }
    if !s.dirty {
        println!("No changes: the working state matches HEAD");
        return;
    }
    // Before the first commit there is no HEAD to go back to.
    let discard = match s.head {
        Some(_) => ", discard them with `dm reset --hard HEAD`",
        None => "",
    };
    // A file renamed and changed has two lines under its new path.
    let paths = s
        .changes
        .iter()
        .map(|c| &c.path)
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    if paths == 0 && s.dirty_bytes == 0 {
        // What no path shows: times of directories (a file made and
        // removed again, a rename undone). They still count (a pull or a
        // plain reset would discard them).
        println!(
            "Uncommitted changes: directory times only (e.g. a file created and removed again; commit them with `dm commit -m MSG`{discard})"
        );
        return;
    }
    if paths == 0 {
        // Written, but to what it was (a file saved unchanged, its times
        // set back): no path differs ("6 B in 0 paths" read as a bug).
        println!(
            "Uncommitted changes: {} written, but no path differs from HEAD (the same bytes written again, or a change undone; commit them with `dm commit -m MSG`{discard})",
            human_size(s.dirty_bytes)
        );
        return;
    }
    // Paths first: deletes write no data ("0 B in 223 paths" read as if
    // nothing had changed).
    println!(
        "Uncommitted changes in {paths} path{}, {} of data written (commit them with `dm commit -m MSG`{discard})",
        if paths == 1 { "" } else { "s" },
        human_size(s.dirty_bytes)
    );
    for c in &s.changes {
        println!("  {}", change_line(c));
    }
}

#[cfg(test)]
mod tests {
    use super::{clean_message, log_date};

    #[test]
    fn commit_messages_are_cleaned_up_as_git_does() {
        assert_eq!(
            clean_message("\n\n  subject  \n\n\n\nbody\t\n\n"),
            "  subject\n\nbody"
        );
        assert_eq!(clean_message("one line"), "one line");
        assert_eq!(clean_message(" \n\t\n"), "");
    }

    #[test]
    fn log_dates_read_as_dates() {
        assert_eq!(
            log_date(1_796_554_820_123_456_789),
            "Sun, 6 Dec 2026 11:00:20 +0000"
        );
    }
}
