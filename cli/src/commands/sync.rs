//! `dm push`, `dm pull`, `dm clone`, `dm dot set-upstream`, `dm user add`,
//! `dm dot collaborator add`, and the key and fingerprint half of
//! `dm remote add`.
//!
//! Secrets and sync state live beside the config file in `sync.toml`
//! (mode 0600): per remote the API key and the pinned hub fingerprint, per
//! local dot and remote the upstream dot. Transfers run in the local
//! daemon (it holds the store); this client starts them over the local API
//! and draws their progress.

use super::Ctx;
use crate::config::Remote;
use crate::format::short_id;
use crate::server::hub::{
    BranchDeleted, BranchDeletionReq, BranchReport, CollaboratorReq, RemoteReq, TransferReq,
    TransferStatus, UserKey, UserRemoved, UserReq,
};
use anyhow::{anyhow, bail, Context, Result};
use dm_store::DotName;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Per-remote secrets.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RemoteSecret {
    /// API key.
    pub api_key: String,
    /// Pinned hub certificate fingerprint (empty with `ca_pem`).
    pub fingerprint: String,
    /// CA certificates (PEM) the hub's certificate must chain to, instead of a pin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
}

/// `sync.toml`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SyncConfig {
    /// By remote name.
    #[serde(default)]
    pub remotes: BTreeMap<String, RemoteSecret>,
    /// Upstream dot on a remote, keyed `LOCAL_DOT remote`.
    #[serde(default)]
    pub upstreams: BTreeMap<String, String>,
    /// Clones cut short after they made their dot (keyed as `upstreams`):
    /// running the same clone again goes on with them.
    #[serde(default, skip_serializing_if = "std::collections::BTreeSet::is_empty")]
    pub unfinished_clones: std::collections::BTreeSet<String>,
}

/// `sync.toml` beside `config.toml`; `NAME.sync.toml` beside any other
/// config file `NAME.toml`, so that configs sharing a directory (one per
/// user or per hub) keep their keys apart.
fn sync_path(config_path: &Path) -> PathBuf {
    match config_path.file_stem().and_then(|s| s.to_str()) {
        Some("config") | None => config_path.with_file_name("sync.toml"),
        Some(stem) => config_path.with_file_name(format!("{stem}.sync.toml")),
    }
}

impl SyncConfig {
    fn load(config_path: &Path) -> Result<SyncConfig> {
        crate::config::load_file(&sync_path(config_path))
    }

    /// Changes `sync.toml` with `f` under its lock (see
    /// [`crate::config::update_file`]).
    fn update(config_path: &Path, f: impl FnOnce(&mut SyncConfig)) -> Result<()> {
        crate::config::update_file(&sync_path(config_path), |sc: &mut SyncConfig| {
            f(sc);
            Ok(())
        })
        .map(|_| ())
    }
}

fn upstream_key(local: &DotName, remote: &str) -> String {
    format!("{local} {remote}")
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")
}

fn port_of(r: &Remote) -> u16 {
    r.port.unwrap_or(dm_sync::proto::DEFAULT_PORT)
}

/// The API key for remote `name`, from DM_API_KEY, stdin or a prompt;
/// refused when it cannot be one (a pasted file: a 17,000-character key
/// broke the connection with "closed by peer: 0").
fn read_key(name: &str, r: &Remote) -> Result<String> {
    let k = read_key_as_given(name, r)?;
    if k.len() > 1024 || k.chars().any(|c| c.is_whitespace() || c.is_control()) {
        bail!(
            "that is not an API key ({} characters{}): give the one line `dm user add {}` printed on {} \
             (via DM_API_KEY, stdin or the prompt)",
            k.chars().count(),
            if k.chars().any(char::is_whitespace) { ", with spaces or line breaks" } else { "" },
            r.user,
            r.hostname
        );
    }
    Ok(k)
}

fn read_key_as_given(name: &str, r: &Remote) -> Result<String> {
    if let Ok(k) = std::env::var("DM_API_KEY") {
        if !k.trim().is_empty() {
            return Ok(k.trim().to_string());
        }
    }
    use std::io::{BufRead, IsTerminal, Write};
    if !std::io::stdin().is_terminal() {
        // Piped in (`... | dm remote add`), as `docker login --password-stdin`.
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("reading the API key from stdin")?;
        if !line.trim().is_empty() {
            return Ok(line.trim().to_string());
        }
        bail!(
            "no API key for remote {name}: set DM_API_KEY, or pipe it on stdin (the key `dm user add {}` printed on {})",
            r.user,
            r.hostname
        );
    }
    // Not echoed, as a password prompt: the key is a secret. Echo goes off
    // before the prompt shows, so that nothing typed after it is echoed.
    use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
    let stdin = std::io::stdin();
    let saved = tcgetattr(&stdin).ok();
    if let Some(t) = &saved {
        let mut quiet = t.clone();
        quiet.local_flags.remove(LocalFlags::ECHO);
        let _ = tcsetattr(&stdin, SetArg::TCSANOW, &quiet);
    }
    eprint!("API key for {}@{}: ", r.user, r.hostname);
    std::io::stderr().flush().ok();
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    if let Some(t) = &saved {
        let _ = tcsetattr(&stdin, SetArg::TCSANOW, t);
        eprintln!();
    }
    read.context("reading the API key")?;
    let k = line.trim().to_string();
    if k.is_empty() {
        bail!("no API key given");
    }
    Ok(k)
}

/// Reads a CA file given with `--ca`.
fn read_ca(ca: Option<&Path>) -> Result<Option<(String, String)>> {
    ca.map(|ca| match std::fs::read_to_string(ca) {
        Ok(pem) => Ok((pem, ca.display().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => bail!(
            "the CA file {} is not PEM text (a DER certificate? `openssl x509 -inform der -in {} \
                 -out ca.pem` converts it)",
            ca.display(),
            ca.display()
        ),
        Err(e) => Err(e).with_context(|| format!("reading the CA file {}", ca.display())),
    })
    .transpose()
}

/// The second half of `dm remote add NAME`: reads the key, fetches and
/// shows the hub's fingerprint, checks the key, and pins both.
pub fn remote_added(ctx: &mut Ctx, name: &str, ca: Option<&Path>) -> Result<()> {
    let r = ctx
        .config
        .remotes
        .get(name)
        .cloned()
        .ok_or_else(|| anyhow!("no remote {name}"))?;
    let key = read_key(name, &r)?;
    check_and_pin(ctx, name, &r, key, read_ca(ca)?, false)
}

/// The second half of `dm remote set-url NAME TARGET` (a hub that moved,
/// or a new certificate): checks the hub at `new` as `dm remote add` does
/// and pins it for `name`, keeping the remote's upstreams. The saved key
/// serves while the user stays the same (DM_API_KEY replaces it); the CA
/// the remote trusted serves unless `--ca` gives another. A hub presenting
/// another fingerprint than the pinned one is pinned anew, and said so.
pub fn remote_moved(
    ctx: &Ctx,
    name: &str,
    old: &Remote,
    new: &Remote,
    ca: Option<&Path>,
) -> Result<()> {
    let saved = SyncConfig::load(&ctx.config_path)?
        .remotes
        .get(name)
        .cloned();
    let from_env = std::env::var("DM_API_KEY").is_ok_and(|k| !k.trim().is_empty());
    let key = match &saved {
        Some(s) if old.user == new.user && !from_env => s.api_key.clone(),
        _ => read_key(name, new)?,
    };
    let ca = match read_ca(ca)? {
        Some(ca) => Some(ca),
        None => saved
            .and_then(|s| s.ca_pem)
            .map(|pem| (pem, format!("the CA remote {name} trusted"))),
    };
    check_and_pin(ctx, name, new, key, ca, true)
}

/// Connects to the hub `r` with `key`, trusting the CA `ca` (PEM, and
/// where it came from) or else the fingerprint the hub presents (shown),
/// and saves both for remote `name`. A fingerprint other than the one
/// pinned for `name` is refused unless `repin`.
fn check_and_pin(
    ctx: &Ctx,
    name: &str,
    r: &Remote,
    key: String,
    ca: Option<(String, String)>,
    repin: bool,
) -> Result<()> {
    let rt = runtime()?;
    let port = port_of(r);
    let hub = dm_sync::host_port(&r.hostname, port);
    // How the hub is trusted, and what is saved for it: a CA, or the
    // fingerprint it presents now (shown before the key is tried).
    let (trust, fingerprint) = match &ca {
        Some((pem, _)) => (dm_sync::Trust::Ca(pem.clone()), String::new()),
        None => {
            let fp = rt
                .block_on(dm_sync::probe_fingerprint(&r.hostname, port))
                .map_err(|e| anyhow!("{e}"))?;
            // Adding the same remote again (a new key) keeps trusting the
            // same hub only: another certificate is not pinned silently.
            let pinned = SyncConfig::load(&ctx.config_path)?
                .remotes
                .get(name)
                .map(|old| old.fingerprint.clone())
                .filter(|old| !old.is_empty() && *old != fp);
            if let (Some(old), false) = (&pinned, repin) {
                bail!(
                    "the hub {hub} now presents the fingerprint {fp}, not the pinned {old}; if its certificate \
                     was replaced on purpose, `dm remote set-url {name} {}` pins the new one (upstreams kept; \
                     with DM_API_KEY set it saves that key too)",
                    r.target()
                );
            }
            println!("The hub {hub} presents the certificate fingerprint");
            println!("  {fp}");
            if let Some(old) = &pinned {
                println!("which is not the one pinned for remote {name} until now ({old})");
            }
            (dm_sync::Trust::Pinned(fp.clone()), fp)
        }
    };
    let spec = dm_sync::RemoteSpec {
        host: r.hostname.clone(),
        port,
        user: r.user.clone(),
        key: key.clone(),
        trust,
    };
    let conn = rt
        .block_on(dm_sync::Remote::connect(&spec))
        .map_err(|e| match e.code() {
            // The key the command tried: say how to give another (a hub
            // reinstalled with a new certificate and new keys sent users
            // from set-url to remote add and back).
            Some(dm_sync::proto::ErrorCode::BadKey) => anyhow!(
                "{e}. Nothing was saved; with the new key run `DM_API_KEY=<key> dm remote {} {name} {}`",
                if repin { "set-url" } else { "add" },
                r.target()
            ),
            _ => anyhow!("{e}"),
        })?;
    if let Some((_, from)) = &ca {
        println!(
            "The hub {hub} has a certificate from {from} (fingerprint {})",
            conn.fingerprint()
        );
    }
    rt.block_on(conn.close());
    let pinned = ca.is_none();
    SyncConfig::update(&ctx.config_path, |sc| {
        sc.remotes.insert(
            name.to_string(),
            RemoteSecret {
                api_key: key,
                fingerprint,
                ca_pem: ca.map(|(pem, _)| pem),
            },
        );
    })?;
    // Only once the key was accepted and the remote saved.
    if pinned {
        println!("(pinned: later connections fail if it changes)");
    }
    Ok(())
}

/// Forgets a removed remote's key and upstreams.
pub fn remote_removed(ctx: &mut Ctx, name: &str) -> Result<()> {
    let suffix = format!(" {name}");
    SyncConfig::update(&ctx.config_path, |sc| {
        sc.remotes.remove(name);
        sc.upstreams.retain(|k, _| !k.ends_with(&suffix));
    })
}

/// Forgets the upstreams of a deleted dot: a new dot of that name starts
/// without them (its pushes went to the old dot's remote dot).
pub fn dot_deleted(ctx: &Ctx, dot: &DotName) -> Result<()> {
    let prefix = format!("{dot} ");
    SyncConfig::update(&ctx.config_path, |sc| {
        sc.upstreams.retain(|k, _| !k.starts_with(&prefix))
    })
}

/// Prints the pinned fingerprints (`dm remote -v`).
pub fn fingerprint_of(ctx: &Ctx, name: &str) -> Option<String> {
    SyncConfig::load(&ctx.config_path)
        .ok()?
        .remotes
        .get(name)
        .map(|s| match s.ca_pem {
            Some(_) => "certificate from a CA (--ca)".to_string(),
            None => s.fingerprint.clone(),
        })
}

/// Arguments of push and pull.
pub struct TransferArgs {
    /// REMOTE.
    pub remote: String,
    /// DOT.
    pub dot: Option<String>,
    /// BRANCH.
    pub branch: Option<String>,
    /// --remote-name.
    pub remote_name: Option<String>,
    /// --stash-on-divergence.
    pub stash_on_divergence: bool,
    /// --force.
    pub force: bool,
    /// --all.
    pub all: bool,
}

/// A remote that is not configured: how to add it, or, for a name no
/// remote has (`alice/myapp`: the arguments swapped), that it comes first.
fn no_remote(name: &str) -> anyhow::Error {
    if name.contains('/') {
        anyhow!(
            "no remote {name}: that looks like a dot; the remote comes first \
             (`dm clone REMOTE {name}`, `dm push REMOTE [DOT [BRANCH]]`; see `dm remote`)"
        )
    } else {
        anyhow!("no remote {name}: add it with `dm remote add {name} USER@HOST[:PORT]` (see `dm remote`)")
    }
}

fn remote_req(ctx: &Ctx, name: &str) -> Result<(Remote, RemoteReq)> {
    let r = ctx
        .config
        .remotes
        .get(name)
        .cloned()
        .ok_or_else(|| no_remote(name))?;
    let sc = SyncConfig::load(&ctx.config_path)?;
    let secret = sc.remotes.get(name).cloned().ok_or_else(|| {
        anyhow!(
            "remote {name} has no API key yet: add it again (`dm remote add {name} {}`)",
            r.target()
        )
    })?;
    let req = RemoteReq {
        host: r.hostname.clone(),
        port: port_of(&r),
        user: r.user.clone(),
        key: secret.api_key,
        fingerprint: secret.fingerprint,
        ca_pem: secret.ca_pem,
    };
    Ok((r, req))
}

/// The remote dot: `--remote-name`, else the upstream, else `USER/DOT`.
fn remote_dot(
    sc: &SyncConfig,
    local: &DotName,
    remote: &str,
    user: &str,
    given: Option<&str>,
) -> Result<DotName> {
    let name = match given {
        Some(g) if g.contains('/') => g.to_string(),
        Some(g) => format!("{user}/{g}"),
        None => match sc.upstreams.get(&upstream_key(local, remote)) {
            Some(u) => u.clone(),
            None => format!("{user}/{}", local.name),
        },
    };
    DotName::parse(&name).map_err(|e| anyhow!("{e}"))
}

/// `dm push` and `dm pull`.
pub fn transfer(ctx: &mut Ctx, push: bool, a: TransferArgs) -> Result<()> {
    let (r, rreq) = remote_req(ctx, &a.remote)?;
    let local = ctx.dot(a.dot.as_deref())?;
    let branch = match (&a.branch, &a.dot) {
        (Some(b), _) => b.clone(),
        // `master`, as in Dotmesh; but a dot cloned as one other branch
        // (`dm clone hub alice/myapp newbranch`, then `dm pull hub myapp`)
        // has no master here: its current branch, then.
        (None, Some(_)) => match ctx.dot_brief(&local) {
            Ok(d)
                if !d
                    .summary
                    .branches
                    .iter()
                    .any(|b| b == dm_store::names::MASTER) =>
            {
                d.summary.current_branch
            }
            _ => dm_store::names::MASTER.to_string(),
        },
        (None, None) => match ctx.dot_brief(&local) {
            Ok(d) => d.summary.current_branch,
            Err(e) if push => return Err(e),
            Err(_) => dm_store::names::MASTER.to_string(),
        },
    };
    let sc = SyncConfig::load(&ctx.config_path)?;
    let rdot = remote_dot(&sc, &local, &a.remote, &r.user, a.remote_name.as_deref())?;
    let req = TransferReq {
        direction: if push { "push" } else { "pull" }.into(),
        remote: rreq,
        local_dot: local.to_string(),
        remote_dot: format!("{}/{}", rdot.namespace, rdot.name),
        branches: if a.all {
            Vec::new()
        } else {
            vec![branch.clone()]
        },
        all: a.all,
        stash_on_divergence: a.stash_on_divergence,
        force: a.force,
    };
    let verb = if push { "Pushing" } else { "Pulling" };
    let label = format!(
        "{verb} {local} {} {} ({}/{})",
        if push { "to" } else { "from" },
        a.remote,
        rdot.namespace,
        rdot.name
    );
    // The remote dot's name guessed: no --remote-name, no upstream.
    let guessed =
        a.remote_name.is_none() && !sc.upstreams.contains_key(&upstream_key(&local, &a.remote));
    run(ctx, &req, &label).map_err(|e| {
        let mut m = with_remote_hints(&format!("{e:#}"), &a.remote, a.remote_name.as_deref(), &r);
        if guessed && !push && m.contains("no dot ") {
            m.push_str(&format!(
                " ({local} has no upstream on {remote}, so its name there was taken to be {ns}/{name}: \
                 give it with `--remote-name NS/DOT`, or once with `dm dot set-upstream {local} {remote} NS/DOT`)",
                remote = a.remote,
                ns = rdot.namespace,
                name = rdot.name
            ));
        }
        anyhow!("{m}")
    })?;
    // Only commits travel: say so when the pushed branch has more.
    if push {
        let dirty = ctx.dot_detail_of(&local, Some(&branch)).ok().and_then(|d| {
            d.branch_details
                .into_iter()
                .find(|b| b.name == branch)
                .filter(|b| b.uncommitted)
        });
        if dirty.is_some() {
            eprintln!(
                "note: branch {branch} of {local} has uncommitted changes; they were not pushed (only commits are): `dm commit` them, then push again"
            );
        }
    }
    // The first transfer records the upstream.
    let key = upstream_key(&local, &a.remote);
    if !sc.upstreams.contains_key(&key) {
        SyncConfig::update(&ctx.config_path, |sc| {
            sc.upstreams
                .entry(key)
                .or_insert_with(|| format!("{}/{}", rdot.namespace, rdot.name));
        })?;
    }
    Ok(())
}

/// `dm clone REMOTE [NS/]DOT [BRANCH] [--local-name DOT] [--all]`.
pub fn clone(
    ctx: &mut Ctx,
    remote: &str,
    dot: &str,
    branch: Option<&str>,
    local_name: Option<&str>,
    all: bool,
) -> Result<()> {
    let (r, rreq) = remote_req(ctx, remote)?;
    let rdot = if dot.contains('/') {
        DotName::parse(dot)
    } else {
        DotName::parse(&format!("{}/{dot}", r.user))
    }
    .map_err(|e| anyhow!("{e}"))?;
    // `--local-name` as any dot name, a namespace included (`team/hist`,
    // as `dm pull` makes one).
    let local = match local_name {
        Some(n) => DotName::parse(n),
        None => DotName::new(&rdot.name),
    }
    .map_err(|e| anyhow!("{e}"))?;
    let upstream = format!("{}/{}", rdot.namespace, rdot.name);
    // The same clone run again after it was cut short goes on (its dot is
    // there, with this upstream), as the message of the first run said.
    let key = upstream_key(&local, remote);
    let sc = SyncConfig::load(&ctx.config_path)?;
    let rerun = sc.unfinished_clones.contains(&key) && sc.upstreams.get(&key) == Some(&upstream);
    let exists = ctx.dot_brief(&local).is_ok();
    if let Some(other) = sc.upstreams.get(&key).filter(|u| exists && **u != upstream) {
        bail!(
            "a dot named {local} exists here already, a clone of {other} on {remote}: clone {upstream} under another name with --local-name"
        );
    }
    if !exists {
        // Said before "Cloning ..." (the server refuses them too).
        dm_store::names::validate_new("namespace", &local.namespace)
            .and_then(|()| dm_store::names::validate_new("dot", &local.name))
            .map_err(|e| anyhow!("{e}"))?;
    }
    if exists && !rerun {
        // With the branch asked for (`dm pull hub myapp` pulls master).
        let branch = match (&branch, all) {
            (_, true) => " --all".to_string(),
            (Some(b), false) => format!(" {b}"),
            (None, false) => String::new(),
        };
        // The pull finds the remote dot by the upstream, else by the local
        // name: name it when they differ (a clone cut short before it
        // recorded the upstream).
        let pull = if rdot.name == local.name && rdot.namespace == r.user {
            format!("dm pull {remote} {local}{branch}")
        } else {
            format!(
                "dm pull {remote} {local}{branch} --remote-name {}/{}",
                rdot.namespace, rdot.name
            )
        };
        bail!("a dot named {local} exists here already: use `{pull}`, or clone under another name with --local-name");
    }
    let req = TransferReq {
        direction: "pull".into(),
        remote: rreq,
        local_dot: local.to_string(),
        remote_dot: format!("{}/{}", rdot.namespace, rdot.name),
        branches: if all {
            Vec::new()
        } else {
            vec![branch.unwrap_or(dm_store::names::MASTER).to_string()]
        },
        all,
        stash_on_divergence: false,
        force: false,
    };
    // Recorded first: Ctrl-C ends this process inside `run`.
    SyncConfig::update(&ctx.config_path, |sc| {
        sc.upstreams.insert(key.clone(), upstream.clone());
        sc.unfinished_clones.insert(key.clone());
    })?;
    let result = run(
        ctx,
        &req,
        &format!(
            "Cloning {}/{} from {remote} as {local}",
            rdot.namespace, rdot.name
        ),
    )
    // A broken connection is said as for push and pull (what broke, and
    // that running it again goes on from what arrived).
    .map_err(|e| anyhow!("{}", with_remote_hints(&format!("{e:#}"), remote, None, &r)));
    // Finished: a clone again is refused. Failed before it made the dot:
    // nothing to go on with, nothing recorded.
    let cut_short = result.is_err() && ctx.dot_brief(&local).is_ok();
    SyncConfig::update(&ctx.config_path, |sc| {
        if !cut_short {
            sc.unfinished_clones.remove(&key);
        }
        if result.is_err() && !cut_short && !exists {
            sc.upstreams.remove(&key);
        }
    })?;
    // `dm log` right after a clone said only "no current dot".
    let current = ctx
        .config
        .current_dot
        .as_deref()
        .and_then(|c| DotName::parse(c).ok());
    if result.is_ok() && current.as_ref() != Some(&local) {
        eprintln!("Cloned as dot {local}; `dm switch {local}` makes it the current dot");
    }
    result
}

/// Fills the hub's generic advice in a failed transfer's message with what
/// this command line used: the remote's name (the hub knows none), the
/// `--remote-name` given, and how to replace a refused API key (push and
/// pull use the key saved by `dm remote add`, not DM_API_KEY).
fn with_remote_hints(msg: &str, remote: &str, remote_name: Option<&str>, r: &Remote) -> String {
    remote_hints(
        msg,
        remote,
        remote_name,
        r,
        "Run the same command again: it goes on from what arrived",
    )
}

/// [`with_remote_hints`], with `rerun` said after a broken connection.
fn remote_hints(
    msg: &str,
    remote: &str,
    remote_name: Option<&str>,
    r: &Remote,
    rerun: &str,
) -> String {
    let mut m = msg
        .replace("`dm push REMOTE ", &format!("`dm push {remote} "))
        .replace("`dm pull REMOTE ", &format!("`dm pull {remote} "))
        .replace(
            "`dm remote set-url REMOTE USER@HOST[:PORT]`",
            &format!("`dm remote set-url {remote} {}`", r.target()),
        );
    if let Some(n) = remote_name {
        for flag in [" --stash-on-divergence`", " --force`"] {
            m = m.replace(flag, &format!(" --remote-name {n}{flag}"));
        }
    }
    m = m.replacen(
        "the hub's disk is full",
        &format!("the disk of remote {remote} ({}) is full", r.hostname),
        1,
    );
    let broken = ["connection lost", "receiving:", "sending:", "stream closed"];
    if broken.iter().any(|b| m.starts_with(b)) {
        m = format!(
            "the connection to remote {remote} ({}) broke: {m}. {rerun}",
            r.hostname
        );
    }
    if m.contains("wrong API key") {
        m.push_str(&format!(
            ". The key saved for remote {remote} was refused: with a new key from the hub's admin, run `dm remote add {remote} {}` again (it asks for the key, or reads DM_API_KEY; upstreams are kept); if the hub's certificate changed too, `DM_API_KEY=<key> dm remote set-url {remote} {}` pins it and saves the key",
            r.target(),
            r.target()
        ));
    }
    m
}

fn human(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// From now on, the first Ctrl-C (SIGINT) sets the returned flag instead
/// of ending the process, so that a transfer stops in the server as well;
/// a second one ends the process as usual.
fn on_ctrl_c() -> &'static std::sync::atomic::AtomicBool {
    static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    extern "C" fn note(_: libc::c_int) {
        INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    // SAFETY: the handler only stores to an atomic (async-signal-safe);
    // the struct is zeroed, then filled as sigaction(2) describes.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = note as *const () as libc::sighandler_t;
        // SA_RESETHAND: the default action is back after the first one.
        sa.sa_flags = libc::SA_RESTART | libc::SA_RESETHAND;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut());
    }
    &INTERRUPTED
}

fn run(ctx: &mut Ctx, req: &TransferReq, label: &str) -> Result<()> {
    // Before the transfer starts: a Ctrl-C while the server starts it
    // stops it as well, once its id is known (not the client alone).
    let interrupted = on_ctrl_c();
    let started: serde_json::Value = ctx.client()?.post("/v1/sync/transfers", req)?;
    let id = started
        .get("id")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| anyhow!("the server did not start the transfer"))?;
    let mut bar = dm_sync::Bar::new(label);
    let t0 = std::time::Instant::now();
    let status = loop {
        if interrupted.load(std::sync::atomic::Ordering::SeqCst) {
            // The transfer runs in the server: stop it there too, or a
            // rerun would race it.
            let s: TransferStatus = match ctx
                .client()
                .and_then(|c| c.delete(&format!("/v1/sync/transfers/{id}")))
            {
                Ok(s) => s,
                Err(e) => {
                    bar.finish();
                    eprintln!(
                        "could not stop the transfer in the server, which may go on with it: {e:#}"
                    );
                    std::process::exit(130);
                }
            };
            use crate::server::hub::{
                STOPPED, STOPPED_MOVING, STOPPED_PULL_MOVING, STOPPED_PULL_RESTARTING,
                STOPPED_PULL_STOPPING,
            };
            let said = match s.error.as_deref() {
                Some(STOPPED) => {
                    "stopped; what arrived is kept, and the same command goes on from there"
                }
                Some(STOPPED_PULL_STOPPING) => {
                    "stopped; nothing moved: the containers stopped for the move start again once \
                     stopped (Docker gives each its stop timeout); what arrived is kept, and the \
                     same command goes on from there"
                }
                Some(STOPPED_PULL_MOVING) => {
                    "stopped, but the containers had stopped for the branch's move, which may \
                     have happened (`dm log` tells); they start again either way"
                }
                Some(STOPPED_PULL_RESTARTING) => {
                    "stopped, but the pull had moved the branch already (`dm log` shows it); \
                     the containers stopped for the move start again"
                }
                Some(STOPPED_MOVING) => {
                    "stopped, but the data had arrived and the hub had been asked to move its \
                     branch: it may still do so (it waits for containers using the branch to \
                     stop first); the same command tells where it is"
                }
                _ => break s,
            };
            bar.finish();
            // The branches done before the stop (`--all`) moved.
            print_reports(&s.reports, &req.direction);
            eprintln!("{said}");
            std::process::exit(130);
        }
        let s: TransferStatus = match ctx
            .client()
            .and_then(|c| c.get(&format!("/v1/sync/transfers/{id}")))
        {
            Ok(s) => s,
            Err(e) => {
                bar.finish();
                return Err(e.context(
                    "following the transfer in the dm server, which stopped or restarted \
                     meanwhile, and the transfer with it (its log says why): once it runs, the \
                     same command goes on from what arrived",
                ));
            }
        };
        bar.update(&s.phase, s.done, s.total);
        if s.finished {
            break s;
        }
        std::thread::sleep(std::time::Duration::from_millis(150));
    };
    bar.finish();
    let secs = t0.elapsed().as_secs_f64();
    print_reports(&status.reports, &req.direction);
    if let Some(e) = status.error {
        bail!("{e}");
    }
    println!(
        "{} sent, {} received in {secs:.1} s",
        human(status.wire_sent),
        human(status.wire_received)
    );
    Ok(())
}

/// What each branch of a transfer did (also the branches done before a
/// Ctrl-C stopped the rest: `--all`).
fn print_reports(reports: &[BranchReport], direction: &str) {
    for r in reports {
        if r.up_to_date {
            match &r.note {
                Some(n) => println!("{}: {n}", r.branch),
                None => println!("{}: up to date", r.branch),
            }
            continue;
        }
        println!(
            "{}: {}, {} chunk{} ({}), {} of metadata; now at {}",
            r.branch,
            commits_line(r.moved, r.commits),
            r.chunks,
            if r.chunks == 1 { "" } else { "s" },
            human(r.chunk_bytes),
            human(r.object_bytes),
            r.head.as_deref().unwrap_or("-")
        );
        if let Some(s) = &r.stashed {
            match direction {
                "push" => println!(
                    "  the hub's diverged commits kept on branch {s} there (`dm pull` of {s} brings them)"
                ),
                _ => println!("  your diverged commits kept on branch {s} here"),
            }
        }
        if let Some((origin, fork)) = &r.origin_created {
            println!(
                "  created branch {origin} there at {}, where {} grew from (the remote lacked it)",
                short_id(fork),
                r.branch
            );
        }
        if let Some(n) = &r.note {
            eprintln!("warning: {}: {n}", r.branch);
        }
        if r.destroyed > 0 {
            println!(
                "  forced: {} commit{} the destination branch had left it (destroyed unless another branch there has {})",
                r.destroyed,
                if r.destroyed == 1 { "" } else { "s" },
                if r.destroyed == 1 { "it" } else { "them" }
            );
        }
    }
}

/// How many commits a branch gained in a transfer, and how many of them
/// were transferred: `3 commits (1 transferred, 2 already stored)`, or
/// `3 commits`.
fn commits_line(moved: usize, transferred: usize) -> String {
    // An older server reports no `moved`.
    let moved = moved.max(transferred);
    let mut line = format!("{moved} commit{}", if moved == 1 { "" } else { "s" });
    if moved > transferred {
        line += &format!(
            " ({transferred} transferred, {} already stored)",
            moved - transferred
        );
    }
    line
}

/// `dm dot set-upstream [DOT] REMOTE REMOTE_DOT`.
pub fn set_upstream(
    ctx: &mut Ctx,
    dot: Option<&str>,
    remote: &str,
    remote_dot: &str,
) -> Result<()> {
    let r = ctx
        .config
        .remotes
        .get(remote)
        .cloned()
        .ok_or_else(|| no_remote(remote))?;
    let local = ctx.dot(dot)?;
    ctx.dot_brief(&local)?;
    let sc = SyncConfig::load(&ctx.config_path)?;
    let rd = self::remote_dot(&sc, &local, remote, &r.user, Some(remote_dot))?;
    SyncConfig::update(&ctx.config_path, |sc| {
        sc.upstreams.insert(
            upstream_key(&local, remote),
            format!("{}/{}", rd.namespace, rd.name),
        );
    })?;
    println!(
        "Upstream of {local} on {remote} is now {}/{}",
        rd.namespace, rd.name
    );
    Ok(())
}

/// The upstreams of a dot, for `dm dot show`: (remote, remote dot).
pub fn upstreams_of(ctx: &Ctx, dot: &DotName) -> Vec<(String, String)> {
    let prefix = format!("{dot} ");
    SyncConfig::load(&ctx.config_path)
        .map(|sc| {
            sc.upstreams
                .into_iter()
                .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|r| (r.to_string(), v)))
                .collect()
        })
        .unwrap_or_default()
}

/// `dm user add NAME` (local API: root on this server).
pub fn user_add(ctx: &mut Ctx, name: &str, new_key: bool) -> Result<()> {
    let k: UserKey = ctx.client()?.post(
        "/v1/sync/users",
        &UserReq {
            name: name.to_string(),
            new_key,
        },
    )?;
    println!("{}", k.key);
    eprintln!(
        "API key of user {} (shown once). They add this server with `DM_API_KEY=... dm remote add NAME {}@HOST`.",
        k.name, k.name
    );
    Ok(())
}

/// `dm dot collaborator add DOT USER`.
pub fn collaborator_add(ctx: &mut Ctx, dot: &str, user: &str) -> Result<()> {
    let d = DotName::parse(dot).map_err(|e| anyhow!("{e}"))?;
    let _: serde_json::Value = ctx.client()?.post(
        "/v1/sync/collaborators",
        &CollaboratorReq {
            dot: d.to_string(),
            user: user.to_string(),
        },
    )?;
    println!("{user} may now push to and pull from {d}");
    Ok(())
}

/// `dm push` arguments.
#[derive(clap::Args, Debug)]
pub struct PushArgs {
    /// The push itself.
    #[command(flatten)]
    pub common: PushPullArgs,
    /// Delete BRANCH on the remote instead (`dm push REMOTE [DOT] BRANCH
    /// --delete`, as git's `push --delete`); refused there for a branch with commits no
    /// other branch there has, unless --force.
    #[arg(long, conflicts_with_all = ["all", "stash_on_divergence"])]
    pub delete: bool,
}

/// `dm push REMOTE [DOT] BRANCH --delete`: one BRANCH after REMOTE is
/// the branch (of the current dot), as in git.
pub fn delete_remote_branch(ctx: &mut Ctx, a: PushPullArgs) -> Result<()> {
    let (dot, branch) = match (a.dot, a.branch) {
        (Some(d), Some(b)) => (Some(d), b),
        (Some(b), None) => (None, b),
        (None, _) => bail!(
            "name the branch to delete on remote {remote}: `dm push {remote} --delete BRANCH`",
            remote = a.remote
        ),
    };
    dm_store::names::validate("branch", &branch).map_err(|e| anyhow!("{e}"))?;
    let (r, rreq) = remote_req(ctx, &a.remote)?;
    let local = ctx.dot(dot.as_deref())?;
    let sc = SyncConfig::load(&ctx.config_path)?;
    let rdot = remote_dot(&sc, &local, &a.remote, &r.user, a.remote_name.as_deref())?;
    let req = BranchDeletionReq {
        remote: rreq,
        remote_dot: format!("{}/{}", rdot.namespace, rdot.name),
        branch: branch.clone(),
        force: a.force,
    };
    let done: BranchDeleted = ctx
        .client()?
        .post("/v1/sync/branch-deletions", &req)
        .map_err(|e| {
            // A delete is whole or not at all: nothing to go on from.
            let mut m = remote_hints(
                &format!("{e:#}"),
                &a.remote,
                a.remote_name.as_deref(),
                &r,
                "The branch was deleted there whole or not at all: run the same command again \
                 (it says the hub has no such branch if it was)",
            );
            if m.contains("malformed frame") {
                m.push_str(" (the hub runs a dm older than `push --delete`)");
            }
            anyhow!(
                "deleting branch {branch} of {}/{} on remote {}: {m}",
                rdot.namespace,
                rdot.name,
                a.remote
            )
        })?;
    // As git says it: the id undoes a mistake (push it back from a clone
    // that has it).
    println!(
        "Deleted branch {branch} of {}/{} on {} (was {}).",
        rdot.namespace,
        rdot.name,
        a.remote,
        done.head.as_deref().map_or("no commits", short_id)
    );
    Ok(())
}

/// `dm push` / `dm pull` arguments.
#[derive(clap::Args, Debug)]
pub struct PushPullArgs {
    /// The remote (see `dm remote`).
    pub remote: String,
    /// The local dot [default: the current dot].
    pub dot: Option<String>,
    /// The branch [default: master with DOT (the current branch of a dot
    /// without master), else the current branch].
    pub branch: Option<String>,
    /// The dot on the remote, `[NS/]DOT` [default: the upstream, else REMOTE_USER/DOT].
    #[arg(long, value_name = "NS/DOT")]
    pub remote_name: Option<String>,
    /// On divergence keep the destination's commits on BRANCH-DIVERGED-<timestamp> and proceed.
    #[arg(long)]
    pub stash_on_divergence: bool,
    /// Move the destination branch to this side's head even when it has commits this side
    /// lacks (ahead or diverged); those commits are destroyed there, unless
    /// --stash-on-divergence keeps diverged ones.
    #[arg(long, short = 'f')]
    pub force: bool,
    /// Every branch.
    #[arg(long, conflicts_with = "branch")]
    pub all: bool,
}

impl From<PushPullArgs> for TransferArgs {
    fn from(a: PushPullArgs) -> Self {
        TransferArgs {
            remote: a.remote,
            dot: a.dot,
            branch: a.branch,
            remote_name: a.remote_name,
            stash_on_divergence: a.stash_on_divergence,
            force: a.force,
            all: a.all,
        }
    }
}

/// `dm clone` arguments.
#[derive(clap::Args, Debug)]
pub struct CloneArgs {
    /// The remote (see `dm remote`).
    pub remote: String,
    /// `[NS/]DOT` on the remote (NS defaults to the remote's user).
    pub dot: String,
    /// The branch [default: master].
    pub branch: Option<String>,
    /// Name of the local dot [default: DOT].
    #[arg(long, value_name = "DOT")]
    pub local_name: Option<String>,
    /// Every branch.
    #[arg(long, conflicts_with = "branch")]
    pub all: bool,
}

/// `dm user ...`.
#[derive(clap::Subcommand, Debug)]
pub enum UserCommand {
    /// Add a user (owner of the namespace NAME) and print their API key.
    Add {
        /// User name.
        name: String,
        /// Give an existing user a new API key (the old one stops working).
        #[arg(long)]
        new_key: bool,
    },
    /// Remove a user: their API key stops working and their collaborator
    /// grants go; the dots of their namespace stay.
    #[command(alias = "remove")]
    Rm {
        /// User name.
        name: String,
    },
    /// List the users.
    #[command(alias = "ls")]
    List,
}

/// `dm dot collaborator ...`.
#[derive(clap::Subcommand, Debug)]
pub enum CollaboratorCommand {
    /// Let USER push to and pull from DOT.
    Add {
        /// `[NS/]DOT`.
        dot: String,
        /// User name.
        user: String,
    },
    /// Take back USER's access to DOT.
    #[command(alias = "remove")]
    Rm {
        /// `[NS/]DOT`.
        dot: String,
        /// User name.
        user: String,
    },
    /// List the collaborators of DOT.
    #[command(alias = "ls")]
    List {
        /// `[NS/]DOT`.
        dot: String,
    },
}

/// `--listen`: `PORT`, `ADDR:PORT` or `off`.
pub fn parse_listen(s: &str) -> Result<Option<std::net::SocketAddr>> {
    if s == "off" || s == "none" {
        return Ok(None);
    }
    if let Ok(port) = s.parse::<u16>() {
        return Ok(Some(([0, 0, 0, 0], port).into()));
    }
    s.parse()
        .map(Some)
        .map_err(|_| anyhow!("--listen {s:?}: give a UDP port, ADDR:PORT, or off"))
}

/// `dm clone`.
pub fn clone_cmd(ctx: &mut Ctx, a: CloneArgs) -> Result<()> {
    clone(
        ctx,
        &a.remote,
        &a.dot,
        a.branch.as_deref(),
        a.local_name.as_deref(),
        a.all,
    )
}

/// `dm user`.
pub fn user_cmd(ctx: &mut Ctx, c: UserCommand) -> Result<()> {
    match c {
        UserCommand::Add { name, new_key } => user_add(ctx, &name, new_key),
        UserCommand::Rm { name } => {
            dm_store::names::validate("user", &name).map_err(|e| anyhow!("{e}"))?;
            let r: UserRemoved = ctx.client()?.delete(&format!("/v1/sync/users/{name}"))?;
            println!(
                "removed user {name}: their API key no longer works{}; the dots of namespace {name} \
                 are kept (`dm dot delete {name}/DOT` deletes one)",
                match r.grants {
                    0 => String::new(),
                    1 => ", and they are no longer a collaborator of 1 dot".to_string(),
                    n => format!(", and they are no longer a collaborator of {n} dots"),
                }
            );
            Ok(())
        }
        UserCommand::List => {
            let users: Vec<String> = ctx.client()?.get("/v1/sync/users")?;
            for u in users {
                println!("{u}");
            }
            Ok(())
        }
    }
}

/// `dm dot collaborator`.
pub fn collaborator_cmd(ctx: &mut Ctx, c: CollaboratorCommand) -> Result<()> {
    match c {
        CollaboratorCommand::Add { dot, user } => collaborator_add(ctx, &dot, &user),
        CollaboratorCommand::Rm { dot, user } => {
            let d = DotName::parse(&dot).map_err(|e| anyhow!("{e}"))?;
            dm_store::names::validate("user", &user).map_err(|e| anyhow!("{e}"))?;
            let _: serde_json::Value = ctx
                .client()?
                .delete(&format!("/v1/sync/collaborators?dot={d}&user={user}"))?;
            println!("{user} may no longer push to or pull from {d}");
            Ok(())
        }
        CollaboratorCommand::List { dot } => {
            let d = DotName::parse(&dot).map_err(|e| anyhow!("{e}"))?;
            let users: Vec<String> = ctx
                .client()?
                .get(&format!("/v1/sync/collaborators?dot={d}"))?;
            for u in users {
                println!("{u}");
            }
            Ok(())
        }
    }
}

/// `dm dot set-upstream [DOT] REMOTE REMOTE_DOT`.
pub fn set_upstream_cmd(ctx: &mut Ctx, args: &[String]) -> Result<()> {
    match args {
        [remote, rdot] => set_upstream(ctx, None, remote, rdot),
        [dot, remote, rdot] => set_upstream(ctx, Some(dot), remote, rdot),
        _ => bail!("usage: dm dot set-upstream [DOT] REMOTE REMOTE_DOT"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_config_file_has_its_own_sync_file() {
        let p = |s: &str| sync_path(Path::new(s));
        assert_eq!(p("/h/.dm/config.toml"), Path::new("/h/.dm/sync.toml"));
        assert_eq!(p("/h/alice.toml"), Path::new("/h/alice.sync.toml"));
        assert_ne!(p("/h/alice.toml"), p("/h/bob.toml"));
    }

    #[test]
    fn hints_name_the_remote_and_what_to_run() {
        let r = Remote {
            user: "alice".into(),
            hostname: "hub.example".into(),
            port: None,
        };
        let m = with_remote_hints(
            "push refused: ... Run `dm push REMOTE app master --stash-on-divergence` to keep ...",
            "hub",
            Some("alice/other"),
            &r,
        );
        assert!(
            m.contains("`dm push hub app master --remote-name alice/other --stash-on-divergence`"),
            "{m}"
        );
        let m = with_remote_hints("receiving: connection lost", "hub", None, &r);
        assert!(
            m.starts_with("the connection to remote hub (hub.example) broke")
                && m.contains("again"),
            "{m}"
        );
        let m = with_remote_hints("wrong API key for user \"alice\": ...", "hub", None, &r);
        assert!(
            m.contains("`dm remote add hub alice@hub.example` again") && !m.contains("remote rm"),
            "{m}"
        );
        // A hub whose certificate changed: set-url, named for this remote.
        let m = with_remote_hints(
            "the hub's certificate fingerprint is sha256:b, not the pinned sha256:a: ... \
             `dm remote set-url REMOTE USER@HOST[:PORT]` pins the new one (upstreams kept)",
            "hub",
            None,
            &r,
        );
        assert!(
            m.contains("`dm remote set-url hub alice@hub.example` pins"),
            "{m}"
        );
    }
}
