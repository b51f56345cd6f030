//! The client side: a connection to a hub, and push / pull (clone is a pull
//! into a dot that does not exist yet). The process that runs these holds
//! the local store (in dm, the local daemon).

use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::proto::{self, DotRef, ErrorCode, Request, Response, BATCH_BYTES, BATCH_IDS};
use crate::tls::Trust;
use dm_store::{
    divergence, plan_trees, Divergence, DotName, Hold, Id, ImportSession, SetHead, Store,
};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::runtime::Handle;

/// Where and as whom to connect.
#[derive(Clone, Debug)]
pub struct RemoteSpec {
    /// Host name or address.
    pub host: String,
    /// UDP port.
    pub port: u16,
    /// User name.
    pub user: String,
    /// API key.
    pub key: String,
    /// How to authenticate the hub.
    pub trust: Trust,
}

/// An authenticated connection to a hub.
pub struct Remote {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    fingerprint: String,
    user: String,
    /// Answers of [`Remote::branches`] by dot, once
    /// [`Remote::remember_branches`] was called.
    memo: parking_lot::Mutex<Option<std::collections::HashMap<String, Option<RemoteBranches>>>>,
}

/// A remote dot's block size and branch heads.
pub type RemoteBranches = (u32, Vec<(String, Option<Id>)>);

/// The refusal of a pull whose local branch changed while it downloaded:
/// moved (a commit or a reset), or deleted with its dot (which read as a
/// move, and "pull again" then found no upstream).
pub fn moved_while_pulling(store: &Store, dot: &DotName, branch: &str) -> Error {
    let what = match (store.dot_info(dot), store.branch_info(dot, branch)) {
        (Err(_), _) => {
            return Error::Refused(format!(
                "dot {dot} was deleted while pulling into it: nothing was pulled (`dm clone` \
                 makes it again)"
            ))
        }
        (_, Err(_)) => "was deleted",
        _ => "moved (a commit or a reset?)",
    };
    Error::Refused(format!(
        "branch {branch} of {dot} {what} while pulling: pull again (what arrived is kept)"
    ))
}

/// `HOST:PORT`, with an IPv6 address in brackets (`[::1]:32607`).
pub fn host_port(host: &str, port: u16) -> String {
    match host.contains(':') {
        true => format!("[{host}]:{port}"),
        false => format!("{host}:{port}"),
    }
}

async fn resolve(host: &str, port: u16) -> Result<SocketAddr> {
    tokio::net::lookup_host((host, port))
        .await
        .map_err(Error::io(format!("resolving {host}")))?
        .next()
        .ok_or_else(|| Error::Connection(format!("{host} has no address")))
}

async fn open(
    host: &str,
    port: u16,
    trust: Trust,
) -> Result<(quinn::Endpoint, quinn::Connection, String)> {
    let addr = resolve(host, port).await?;
    let bind: SocketAddr = if addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    // With a CA the certificate must name the host; a pin ignores names.
    let server_name = match &trust {
        Trust::Ca(_) => host.to_string(),
        _ => crate::tls::SERVER_NAME.to_string(),
    };
    let (cfg, seen) = crate::tls::client_config(trust)?;
    let mut endpoint = quinn::Endpoint::client(bind).map_err(Error::io("opening a UDP socket"))?;
    endpoint.set_default_client_config(cfg);
    let connecting = endpoint
        .connect(addr, &server_name)
        .map_err(|e| Error::Connection(format!("connecting to {}: {e}", host_port(host, port))))?;
    let handshake = tokio::time::timeout(std::time::Duration::from_secs(15), connecting);
    let conn = tokio::select! {
        biased;
        why = not_a_hub(addr, bind) => {
            return Err(Error::Connection(format!("no dm hub at {}: {why}", host_port(host, port))));
        }
        r = handshake => r,
    }
    .map_err(|_| {
        Error::Connection(format!(
            "no answer from the hub at {} (UDP) within 15 s: is `dm server` running there, with that port open?",
            host_port(host, port)
        ))
    })?
    .map_err(|e| {
        let why = seen.problem().unwrap_or_else(|| e.to_string());
        Error::Connection(format!("connecting to {}: {why}", host_port(host, port)))
    })?;
    let fp = conn
        .peer_identity()
        .and_then(|id| {
            id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .and_then(|certs| certs.first().map(|c| crate::tls::fingerprint(c)))
        .or_else(|| seen.get())
        .unwrap_or_default();
    Ok((endpoint, conn, fp))
}

/// What a datagram of one byte to `addr` finds while the QUIC handshake
/// waits, if it tells that no hub is there: nothing listening (the host
/// answers "port unreachable", as on loopback and most LANs), or a service
/// that answers it (a hub drops it unanswered). Pending otherwise. A port
/// of the wrong service, or of nothing, waited 15 s for "no answer".
async fn not_a_hub(addr: SocketAddr, bind: SocketAddr) -> &'static str {
    let probe = async {
        let sock = tokio::net::UdpSocket::bind(bind).await.ok()?;
        sock.connect(addr).await.ok()?;
        sock.send(&[0u8]).await.ok()?;
        let mut buf = [0u8; 64];
        match sock.recv(&mut buf).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                Some("nothing listens on that UDP port (its host said so): is `dm server` running there, and is that its hub port (`--listen`)?")
            }
            Ok(_) => Some(
                "something else answers on that UDP port (a dm hub speaks QUIC, and ignores what it cannot read): is that the hub's port (`--listen`)?",
            ),
            Err(_) => None,
        }
    };
    match probe.await {
        Some(why) => why,
        None => std::future::pending().await,
    }
}

/// Connects without a pinned fingerprint and returns the hub's fingerprint
/// (for `dm remote add`, which shows it and pins it).
pub async fn probe_fingerprint(host: &str, port: u16) -> Result<String> {
    let (endpoint, conn, fp) = open(host, port, Trust::FirstUse).await?;
    conn.close(0u32.into(), b"probe");
    endpoint.wait_idle().await;
    Ok(fp)
}

impl Remote {
    /// Connects and authenticates.
    pub async fn connect(spec: &RemoteSpec) -> Result<Remote> {
        let (endpoint, conn, fingerprint) = open(&spec.host, spec.port, spec.trust.clone()).await?;
        let r = Remote {
            endpoint,
            conn,
            fingerprint,
            user: spec.user.clone(),
            memo: parking_lot::Mutex::new(None),
        };
        match r
            .call(&Request::Hello {
                version: proto::PROTOCOL_VERSION,
                user: spec.user.clone(),
                key: spec.key.clone(),
            })
            .await?
        {
            Response::Welcome { .. } => Ok(r),
            other => Err(unexpected(&other)),
        }
    }

    /// The hub's certificate fingerprint.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The user this connection authenticated as.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// UDP bytes sent so far on this connection (everything on the wire).
    pub fn bytes_sent(&self) -> u64 {
        self.conn.stats().udp_tx.bytes
    }

    /// Bytes of the packets QUIC declared lost so far on this connection
    /// (sent again: in [`Remote::bytes_sent`] twice).
    pub fn bytes_lost(&self) -> u64 {
        self.conn.stats().path.lost_bytes
    }

    /// UDP bytes received so far on this connection.
    pub fn bytes_received(&self) -> u64 {
        self.conn.stats().udp_rx.bytes
    }

    /// Closes the connection.
    pub async fn close(self) {
        self.conn.close(0u32.into(), b"done");
        self.endpoint.wait_idle().await;
    }

    /// One request, one response; remote errors become [`Error::Remote`].
    pub async fn call(&self, req: &Request) -> Result<Response> {
        call_on(&self.conn, req).await
    }

    async fn bools(&self, req: Request, n: usize) -> Result<Vec<bool>> {
        match self.call(&req).await? {
            Response::Bools(b) if b.len() == n => Ok(b),
            other => Err(unexpected(&other)),
        }
    }

    /// The block size and branch heads of a remote dot (None: no such dot).
    pub async fn branches(&self, dot: &DotName) -> Result<Option<RemoteBranches>> {
        let key = dot.to_string();
        if let Some(known) = self.memo.lock().as_ref().and_then(|m| m.get(&key)) {
            return Ok(known.clone());
        }
        let answer = match self.call(&Request::Branches { dot: dot_ref(dot) }).await {
            Ok(Response::Branches {
                block_size,
                branches,
            }) => Some((block_size, branches)),
            Ok(other) => return Err(unexpected(&other)),
            Err(Error::Remote {
                code: ErrorCode::UnknownDot,
                ..
            }) => None,
            Err(e) => return Err(e),
        };
        if let Some(m) = self.memo.lock().as_mut() {
            m.insert(key, answer.clone());
        }
        Ok(answer)
    }

    /// From now on [`Remote::branches`] asks the hub once per dot and keeps
    /// the answer up to date with the branch moves made through this
    /// connection (not with others'): for transfers of every branch, which
    /// asked for the whole list once per branch (2,700 branches: 276 MiB
    /// received by a push with nothing to send).
    pub fn remember_branches(&self) {
        self.memo.lock().get_or_insert_with(Default::default);
    }

    /// Notes that this connection moved (or made) `branch` of `dot` on the
    /// hub to `head` (see [`Remote::remember_branches`]).
    fn moved(&self, dot: &DotName, branch: &str, head: Id, block_size: u32) {
        let mut memo = self.memo.lock();
        let Some(known) = memo.as_mut().and_then(|m| m.get_mut(&dot.to_string())) else {
            return;
        };
        let (_, branches) = known.get_or_insert_with(|| (block_size, Vec::new()));
        match branches.iter_mut().find(|(n, _)| n == branch) {
            Some((_, h)) => *h = Some(head),
            None => branches.push((branch.to_string(), Some(head))),
        }
    }

    /// Notes that this connection deleted `branch` of `dot` on the hub
    /// (see [`Remote::remember_branches`]).
    fn deleted(&self, dot: &DotName, branch: &str) {
        let mut memo = self.memo.lock();
        let known = memo.as_mut().and_then(|m| m.get_mut(&dot.to_string()));
        if let Some(Some((_, branches))) = known {
            branches.retain(|(n, _)| n != branch);
        }
    }

    /// The commit ids of `head`'s ancestry on the hub, newest first.
    pub async fn ancestry(&self, dot: &DotName, head: Id) -> Result<Vec<Id>> {
        match self
            .call(&Request::Ancestry {
                dot: dot_ref(dot),
                head,
            })
            .await?
        {
            Response::Ids(ids) => Ok(ids),
            other => Err(unexpected(&other)),
        }
    }

    /// Fetches blobs (objects or chunks), re-asking for what did not fit.
    async fn fetch(&self, dot: &DotName, ids: &[Id], chunks: bool) -> Result<Vec<(Id, Vec<u8>)>> {
        let mut out = Vec::with_capacity(ids.len());
        let mut rest = ids;
        while !rest.is_empty() {
            let part = &rest[..rest.len().min(BATCH_IDS)];
            let req = if chunks {
                Request::GetChunks {
                    dot: dot_ref(dot),
                    ids: part.to_vec(),
                }
            } else {
                Request::GetObjects {
                    dot: dot_ref(dot),
                    ids: part.to_vec(),
                }
            };
            let got = match self.call(&req).await? {
                Response::Blobs(b) => b,
                other => return Err(unexpected(&other)),
            };
            if got.is_empty() || got.len() > part.len() {
                return Err(Error::Connection(
                    "the hub answered a fetch with nothing".into(),
                ));
            }
            for (i, (id, _)) in got.iter().enumerate() {
                if *id != part[i] {
                    return Err(Error::Connection(
                        "the hub answered a fetch out of order".into(),
                    ));
                }
            }
            rest = &rest[got.len()..];
            out.extend(got);
        }
        Ok(out)
    }
}

fn unexpected(r: &Response) -> Error {
    Error::Connection(format!("unexpected answer from the hub: {r:?}"))
}

fn dot_ref(d: &DotName) -> DotRef {
    DotRef {
        namespace: d.namespace.clone(),
        name: d.name.clone(),
    }
}

/// Options of a push or pull.
#[derive(Clone, Debug)]
pub struct TransferOptions {
    /// Keep diverged destination work on `BRANCH-DIVERGED-<timestamp>` and
    /// proceed.
    pub stash_on_divergence: bool,
    /// Move the destination branch to the source's head even when it has
    /// commits the source lacks (ahead or diverged); those are destroyed
    /// there, unless `stash_on_divergence` keeps diverged ones.
    pub force: bool,
    /// Requests in flight at once (QUIC streams).
    pub streams: usize,
    /// Test hook: fail after sending (or fetching) this many chunk bytes.
    pub fail_after_chunk_bytes: Option<u64>,
    /// Test hook: flip a bit in every chunk sent.
    pub corrupt_chunks: bool,
}

impl Default for TransferOptions {
    fn default() -> Self {
        TransferOptions {
            stash_on_divergence: false,
            force: false,
            streams: 8,
            fail_after_chunk_bytes: None,
            corrupt_chunks: false,
        }
    }
}

/// What a transfer of one branch did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TransferReport {
    /// The branch.
    pub branch: String,
    /// Commits sent (or fetched): those the destination's store lacked.
    pub commits: usize,
    /// Commits the destination branch gained (its new head's history
    /// less its old head's): more than `commits` when the destination had
    /// some already (another branch's, or an earlier refused transfer's).
    pub moved: usize,
    /// Tree nodes sent.
    pub objects: usize,
    /// Chunks sent.
    pub chunks: usize,
    /// Stored bytes of the chunks sent.
    pub chunk_bytes: u64,
    /// Stored bytes of the objects sent.
    pub object_bytes: u64,
    /// Already there.
    pub up_to_date: bool,
    /// Something the user should know (e.g. the destination is ahead).
    pub note: Option<String>,
    /// Where diverged destination work was kept.
    pub stashed: Option<String>,
    /// Commits the destination branch had that a forced move dropped.
    pub destroyed: usize,
    /// The new head.
    pub head: Option<Id>,
    /// The branch this one grew from, created on the hub at the fork
    /// commit because the hub lacked it (a push of a new branch).
    pub origin_created: Option<(String, Id)>,
}

/// Names tried for one stash: `BRANCH-DIVERGED-<secs>`, then with `-2`,
/// `-3`, ... appended.
const STASH_NAMES: u32 = 100;

/// Picks the branch that keeps the diverged destination work of `branch`
/// of `dot`: the first of `BRANCH-DIVERGED-<secs>`, `BRANCH-DIVERGED-<secs>-2`,
/// ... for which `taken` says no. Never an existing branch: moving one
/// would lose the commits only it reached. Refused when the name would be
/// longer than branch names may be.
fn choose_stash_name(
    dot: &DotName,
    branch: &str,
    taken: &mut dyn FnMut(&str) -> Result<bool>,
) -> Result<String> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    for n in 1..=STASH_NAMES {
        let name = if n == 1 {
            format!("{branch}-DIVERGED-{secs}")
        } else {
            format!("{branch}-DIVERGED-{secs}-{n}")
        };
        if dm_store::names::validate("branch", &name).is_err() {
            return Err(Error::Refused(format!(
                "cannot stash the diverged work of branch {branch} of {dot}: the stash branch would be {name}, too long ({}). Nothing was changed; resolve the divergence without --stash-on-divergence, or under a shorter branch name",
                dm_store::names::NAME_RULE
            )));
        }
        if !taken(&name)? {
            return Ok(name);
        }
    }
    Err(Error::Refused(format!(
        "cannot stash the diverged work of branch {branch} of {dot}: branches {branch}-DIVERGED-{secs} to {branch}-DIVERGED-{secs}-{STASH_NAMES} all exist. Nothing was changed; try again in a second"
    )))
}

/// True when `branch` of local `dot` exists.
fn local_branch_exists(store: &Store, dot: &DotName, branch: &str) -> Result<bool> {
    match store.branch_info(dot, branch) {
        Ok(_) => Ok(true),
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Why a transfer into a diverged branch is refused, and what
/// `--stash-on-divergence` would keep where: the destination's commits (the
/// hub's for a push, this server's for a pull) on a branch of their own.
fn diverged_message(what: &str, dot: &DotName, branch: &str, d: &Divergence, cmd: &str) -> String {
    let kept = if what.starts_with("push") {
        "the hub's commits"
    } else {
        "your local commits"
    };
    let mut how = format!(
        "Run `{cmd} --stash-on-divergence` to keep {kept} on {branch}-DIVERGED-<timestamp> and proceed, \
         or `{cmd} --force` to overwrite them (they are destroyed)"
    );
    // dm does not merge: a push that would keep both sides goes through a
    // pull that keeps this side's commits aside.
    if let Some(pull) = cmd.strip_prefix("dm push ") {
        how.push_str(&format!(
            ". To keep both sides' work (dm does not merge), `dm pull {pull} --stash-on-divergence` \
             first: it brings the hub's commits onto {branch} here and keeps yours on \
             {branch}-DIVERGED-<timestamp>; take your changes over from there (`dm diff`, \
             `dm mount DOT@BRANCH DIR`), commit, and push"
        ));
    }
    match d {
        Divergence::Diverged { common } => format!(
            "{what}: branch {branch} of {dot} has diverged: both sides have commits the other lacks; the latest common commit is {}. {how}",
            common.to_hex()
        ),
        _ => format!("{what}: branch {branch} of {dot} shares no commit with the other side. {how}"),
    }
}

/// Deletes `branch` of `remote_dot` on the hub (`dm push --delete`); the
/// hub refuses, saying why, when the branch is its current one, has
/// uncommitted changes or is in use there, or (without `force`) has
/// commits no other branch there has. Returns the branch's head.
pub async fn delete_branch(
    remote: &Remote,
    remote_dot: &DotName,
    branch: &str,
    force: bool,
) -> Result<Option<Id>> {
    let req = Request::DeleteBranch {
        dot: dot_ref(remote_dot),
        branch: branch.to_string(),
        force,
    };
    match remote.call(&req).await? {
        Response::Ids(ids) if ids.len() <= 1 => {
            remote.deleted(remote_dot, branch);
            Ok(ids.first().copied())
        }
        other => Err(unexpected(&other)),
    }
}

/// Pushes `branch` of local `dot` to `remote_dot` on the hub: the commits
/// the hub lacks (including those of the branches it grew from), their
/// changed tree nodes and the chunks the hub does not have, then a
/// compare-and-swap of the remote head. The branch the pushed one grew
/// from is created on the hub at the fork commit when missing there.
pub async fn push(
    store: Arc<Store>,
    remote: &Remote,
    dot: &DotName,
    branch: &str,
    remote_dot: &DotName,
    opts: &TransferOptions,
    progress: &Progress,
) -> Result<TransferReport> {
    let info = store.branch_info(dot, branch)?;
    let block_size = store.dot_info(dot)?.block_size;
    let Some(local) = info.head else {
        return Err(Error::Refused(format!(
            "branch {branch} of {dot} has no commits to push; `dm commit` first"
        )));
    };
    // What is pushed stays while it is sent, even if the branch is deleted
    // or reset meanwhile and a GC runs (it failed as "chunk missing").
    let hold = Hold::new(store.clone());
    if hold.objects(&[local])? != [true] {
        return Err(Error::Refused(format!(
            "branch {branch} of {dot} moved off commit {} as the push began (deleted, or reset?): push again",
            local.short()
        )));
    }
    let mut report = TransferReport {
        branch: branch.to_string(),
        head: Some(local),
        ..Default::default()
    };
    let remote_state = remote.branches(remote_dot).await?;
    let remote_head = remote_state
        .as_ref()
        .and_then(|(_, b)| b.iter().find(|(n, _)| n == branch).and_then(|(_, h)| *h));
    if let Some((bs, _)) = &remote_state {
        if *bs != block_size {
            return Err(Error::Refused(format!(
                "{remote_dot} on the hub has block size {bs}, the local dot {block_size}: push under another name (--remote-name)"
            )));
        }
    }
    let mut stash = None;
    let ours: HashSet<Id> = {
        let st = store.clone();
        tokio::task::spawn_blocking(move || st.ancestry(Some(local)))
            .await??
            .into_iter()
            .collect()
    };
    report.moved = ours.len();
    if let Some(r) = remote_head {
        let theirs = if ours.contains(&r) {
            // A fast-forward: the hub's history is part of ours.
            let st = store.clone();
            let had = tokio::task::spawn_blocking(move || st.ancestry(Some(r))).await??;
            report.moved = ours.len().saturating_sub(had.len());
            vec![r]
        } else {
            let theirs = remote.ancestry(remote_dot, r).await?;
            let had: HashSet<&Id> = theirs.iter().collect();
            report.moved = ours.iter().filter(|c| !had.contains(c)).count();
            theirs
        };
        match divergence(Some(local), &ours, Some(r), &theirs) {
            Divergence::UpToDate => {
                report.up_to_date = true;
                return Ok(report);
            }
            Divergence::FastForward => {}
            Divergence::Ahead if !opts.force => {
                return Err(Error::Refused(format!(
                    "branch {branch} of {remote_dot} on the hub has commits that {dot} lacks (it is ahead): `dm pull` first, \
                     or `dm push REMOTE {dot} {branch} --force` to move it back to yours (they are destroyed on the hub)"
                )))
            }
            // Forced (diverged work not stashed): the hub's commits that
            // this branch lacks go.
            d if d == Divergence::Ahead || (opts.force && !opts.stash_on_divergence) => {
                report.destroyed = theirs.iter().filter(|c| !ours.contains(c)).count();
            }
            d => {
                if !opts.stash_on_divergence {
                    return Err(Error::Refused(diverged_message(
                        "push refused",
                        remote_dot,
                        branch,
                        &d,
                        &format!("dm push REMOTE {dot} {branch}"),
                    )));
                }
                let remote_branches: HashSet<&str> = remote_state
                    .iter()
                    .flat_map(|(_, b)| b.iter().map(|(n, _)| n.as_str()))
                    .collect();
                stash = Some(choose_stash_name(remote_dot, branch, &mut |n| {
                    Ok(remote_branches.contains(n))
                })?);
            }
        }
    }
    // What the hub lacks.
    progress.set_phase("comparing");
    let (commits, plan) = {
        let st = store.clone();
        let handle = Handle::current();
        let rem: &Remote = remote;
        // SAFETY of lifetimes: block_in_place keeps `remote` borrowed on
        // this thread while the blocking walk calls back into it.
        tokio::task::block_in_place(|| -> Result<_> {
            let mut has = |ids: &[Id]| -> Result<Vec<bool>> {
                handle.block_on(rem.bools(Request::HasObjects { ids: ids.to_vec() }, ids.len()))
            };
            let commits = st.missing_commits(local, 1024, &mut has)?;
            let mut roots = Vec::new();
            for c in &commits {
                roots.push(st.commit_record(c)?.root);
            }
            let mut get = |ids: &[Id]| -> Result<Vec<Vec<u8>>> {
                ids.iter()
                    .map(|id| {
                        st.object_bytes(id)?.ok_or_else(|| {
                            Error::Store(dm_store::Error::Corrupt(format!(
                                "object {} is missing locally",
                                id.short()
                            )))
                        })
                    })
                    .collect()
            };
            let plan = plan_trees(&roots, BATCH_IDS, &mut has, &mut get)?;
            Ok((commits, plan))
        })?
    };
    // Chunks to ask about: those of the new leaves that the snapshots the
    // hub already has (parents of the oldest new commits) do not name.
    let to_check = {
        let st = store.clone();
        let new_nodes: Vec<Id> = plan.levels.iter().flatten().copied().collect();
        let commit_set: HashSet<Id> = commits.iter().copied().collect();
        tokio::task::block_in_place(|| -> Result<Vec<(Id, u32)>> {
            let bases = base_roots(&st, &commits, &commit_set)?;
            let mut read = |id: &Id| -> Result<Option<Vec<u8>>> { Ok(st.object_bytes(id)?) };
            crate::delta::chunks_to_check(&new_nodes, &bases, &mut read)
        })?
    };
    let mut need = Vec::new();
    for part in to_check.chunks(BATCH_IDS) {
        let ids: Vec<Id> = part.iter().map(|(id, _)| *id).collect();
        let have = remote.bools(Request::HasChunks { ids }, part.len()).await?;
        need.extend(part.iter().zip(have).filter(|(_, h)| !h).map(|(c, _)| *c));
    }
    // Chunks, several requests in flight.
    progress.set_phase("sending");
    // Chunks count as the data they hold, in the total and as they go:
    // what they take on the wire is known only once read (compressed data
    // ended a bar at 48%), and a total that grew under the bar sat at
    // 100% for most of a transfer of random data.
    progress.add_total(data_bytes(&need) + plan.bytes);
    let mut sent = 0u64;
    let mut inflight = tokio::task::JoinSet::new();
    let mut batch: Vec<(Id, Vec<u8>)> = Vec::new();
    let mut batch_bytes = 0;
    let conn = remote.conn.clone();
    let send_batch = |items: Vec<(Id, Vec<u8>)>, chunks: bool| {
        let conn = conn.clone();
        let dot = dot_ref(remote_dot);
        async move {
            let req = if chunks {
                Request::PutChunks { dot, items }
            } else {
                Request::PutObjects { dot, items }
            };
            call_on(&conn, &req).await
        }
    };
    // Read chunks in groups on a blocking thread (one RocksDB multi-read
    // per group), send them in batches of about BATCH_BYTES / 2.
    for group in need.chunks(64) {
        let st = store.clone();
        let ids: Vec<Id> = group.iter().map(|(id, _)| *id).collect();
        let items = tokio::task::spawn_blocking(move || -> Result<Vec<(Id, Vec<u8>)>> {
            ids.iter()
                .map(|id| {
                    let b = st.chunk_bytes(id)?.ok_or_else(|| {
                        Error::Store(dm_store::Error::Corrupt(format!(
                            "chunk {} is missing locally",
                            id.short()
                        )))
                    })?;
                    Ok((*id, b))
                })
                .collect()
        })
        .await??;
        for ((cid, mut bytes), (_, len)) in items.into_iter().zip(group) {
            if opts.corrupt_chunks {
                if let Some(b) = bytes.last_mut() {
                    *b ^= 1;
                }
            }
            batch_bytes += bytes.len();
            sent += bytes.len() as u64;
            progress.add_done(u64::from(*len));
            batch.push((cid, bytes));
            if batch_bytes >= BATCH_BYTES / 2 {
                while inflight.len() >= opts.streams.max(1) {
                    if let Some(r) = inflight.join_next().await {
                        r??;
                    }
                }
                inflight.spawn(send_batch(std::mem::take(&mut batch), true));
                batch_bytes = 0;
            }
        }
        if let Some(limit) = opts.fail_after_chunk_bytes {
            if sent >= limit {
                while let Some(r) = inflight.join_next().await {
                    r??;
                }
                return Err(Error::Connection(format!(
                    "test hook: interrupted after {sent} chunk bytes"
                )));
            }
        }
    }
    if !batch.is_empty() {
        inflight.spawn(send_batch(std::mem::take(&mut batch), true));
    }
    while let Some(r) = inflight.join_next().await {
        r??;
    }
    report.chunks = need.len();
    report.chunk_bytes = sent;
    // Tree nodes bottom-up, one level at a time.
    for level in &plan.levels {
        let mut items = Vec::new();
        let mut size = 0;
        for id in level {
            let b = store.object_bytes(id)?.ok_or_else(|| {
                Error::Store(dm_store::Error::Corrupt(format!(
                    "object {} is missing locally",
                    id.short()
                )))
            })?;
            size += b.len();
            progress.add_done(b.len() as u64);
            report.object_bytes += b.len() as u64;
            items.push((*id, b));
            if size >= BATCH_BYTES / 2 {
                while inflight.len() >= opts.streams.max(1) {
                    if let Some(r) = inflight.join_next().await {
                        r??;
                    }
                }
                inflight.spawn(send_batch(std::mem::take(&mut items), false));
                size = 0;
            }
        }
        if !items.is_empty() {
            inflight.spawn(send_batch(items, false));
        }
        while let Some(r) = inflight.join_next().await {
            r??;
        }
        report.objects += level.len();
    }
    // Commits, oldest first, in order, in batches of at most 256 commits
    // and about BATCH_BYTES (messages and metadata have no fixed size).
    let mut items = Vec::new();
    let mut size = 0;
    for id in &commits {
        let b = store.object_bytes(id)?.ok_or_else(|| {
            Error::Store(dm_store::Error::Corrupt(format!(
                "commit {} is missing locally",
                id.short()
            )))
        })?;
        report.object_bytes += b.len() as u64;
        if !items.is_empty() && (items.len() >= 256 || size + b.len() > BATCH_BYTES) {
            send_batch(std::mem::take(&mut items), false).await?;
            size = 0;
        }
        size += b.len();
        items.push((*id, b));
    }
    if !items.is_empty() {
        send_batch(items, false).await?;
    }
    report.commits = commits.len();
    // From here the hub is asked to move branches: a stop (Ctrl-C) no
    // longer takes that back (the hub may wait for its containers first).
    progress.set_phase(crate::progress::MOVING);
    // The branch it grew from, when the hub lacks it, at the branch's
    // first push only: one deleted on the hub since (`push --delete`) came
    // back with every later push of a branch grown from it.
    if let Some((origin, fork)) = info.origin.as_ref().filter(|_| remote_head.is_none()) {
        let has_origin = remote_state
            .as_ref()
            .is_some_and(|(_, b)| b.iter().any(|(n, _)| n == origin));
        if !has_origin && origin != branch {
            // Best effort: the branch may have appeared there meanwhile.
            if set_head(remote, remote_dot, origin, None, *fork, block_size)
                .await
                .is_ok()
            {
                report.origin_created = Some((origin.clone(), *fork));
            }
        }
    }
    match (&stash, remote_head) {
        (Some(name), Some(r)) => {
            // One request: the hub creates the stash only once the move
            // passed its checks (a branch with uncommitted changes there
            // refuses both), and a name that appeared meanwhile refuses it.
            let req = Request::SetHeadKeeping {
                dot: dot_ref(remote_dot),
                branch: branch.to_string(),
                expected: r,
                new: local,
                block_size,
                keep_as: name.clone(),
            };
            remote
                .call(&req)
                .await
                .map_err(|e| moved_as_refusal(e, remote_dot, branch))?;
            remote.moved(remote_dot, name, r, block_size);
            remote.moved(remote_dot, branch, local, block_size);
            report.stashed = Some(name.clone());
        }
        _ => set_head(remote, remote_dot, branch, remote_head, local, block_size).await?,
    }
    progress.set_phase("done");
    Ok(report)
}

/// The data chunks hold, by their blocks' valid lengths.
fn data_bytes(chunks: &[(Id, u32)]) -> u64 {
    chunks.iter().map(|(_, len)| u64::from(*len)).sum()
}

/// Most parent snapshots used to skip has-queries (see [`crate::delta`]).
const MAX_BASES: usize = 8;

/// Roots of the parents of `commits` that are not themselves in the
/// transfer: snapshots the receiver already has.
fn base_roots(store: &Store, commits: &[Id], set: &HashSet<Id>) -> Result<Vec<Id>> {
    let mut out = Vec::new();
    for c in commits {
        for p in store.commit_record(c)?.parents {
            if !set.contains(&p) && out.len() < MAX_BASES {
                let root = store.commit_record(&p)?.root;
                if !out.contains(&root) {
                    out.push(root);
                }
            }
        }
    }
    Ok(out)
}

/// How long the hub may stay silent after a request was sent, before its
/// answer starts. QUIC keep-alives hold a connection open while the hub is
/// silent, so a hub stuck on a request would otherwise hang the transfer
/// for ever. The slowest legitimate answer is a branch move that stops and
/// restarts containers on the hub. Sending a request and receiving its
/// answer take as long as the link needs.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

async fn call_on(conn: &quinn::Connection, req: &Request) -> Result<Response> {
    let (mut send, mut recv) = conn.open_bi().await?;
    proto::write_frame(&mut send, req).await?;
    send.finish()?;
    let resp =
        proto::read_frame_within::<Response>(&mut recv, proto::MAX_FRAME, Some(REQUEST_TIMEOUT))
            .await?;
    match resp {
        Response::Err { code, message } => Err(Error::Remote { code, message }),
        r => Ok(r),
    }
}

async fn set_head(
    remote: &Remote,
    dot: &DotName,
    branch: &str,
    expected: Option<Id>,
    new: Id,
    block_size: u32,
) -> Result<()> {
    match remote
        .call(&Request::SetHead {
            dot: dot_ref(dot),
            branch: branch.to_string(),
            expected,
            new,
            block_size,
        })
        .await
    {
        Ok(_) => {
            remote.moved(dot, branch, new, block_size);
            Ok(())
        }
        Err(e) => Err(moved_as_refusal(e, dot, branch)),
    }
}

/// A hub's `Moved` answer to a push's branch move, said for the pusher.
fn moved_as_refusal(e: Error, dot: &DotName, branch: &str) -> Error {
    match e {
        Error::Remote {
            code: ErrorCode::Moved { actual: Some(a) },
            ..
        } => Error::Refused(format!(
            "remote branch {branch} of {dot} moved (now at {}) while pushing: someone pushed \
             to it meanwhile. Pull it (with --stash-on-divergence if your commits and theirs \
             diverged: yours stay on {branch}-DIVERGED-<time>), then push again",
            a.short()
        )),
        // Nothing to pull: "pull first" sent users looking for commits.
        Error::Remote {
            code: ErrorCode::Moved { actual: None },
            ..
        } => Error::Refused(format!(
            "remote branch {branch} of {dot} was deleted on the hub while pushing (the branch or \
             the whole dot, by someone else): push again to make it anew"
        )),
        e => e,
    }
}

/// Pulls `branch` of `remote_dot` from the hub into local `dot` (creating
/// the dot and branch when missing: a clone). Fetches only the commits,
/// tree nodes and chunks the local store lacks; moves the local branch
/// only after everything is stored, and never over uncommitted changes.
/// [`fetch_for_pull`] then [`FetchedPull::finish`].
pub async fn pull(
    store: Arc<Store>,
    remote: &Remote,
    dot: &DotName,
    branch: &str,
    remote_dot: &DotName,
    opts: &TransferOptions,
    progress: &Progress,
) -> Result<TransferReport> {
    let fetched = fetch_for_pull(
        store,
        remote,
        dot,
        branch,
        remote_dot,
        opts,
        progress,
        &|| Ok(()),
    )
    .await?;
    let report = tokio::task::block_in_place(|| fetched.finish())?;
    progress.set_phase("done");
    Ok(report)
}

/// A pull whose data is all stored here, its branch not moved yet: what
/// it brought stays (held from GC) until [`FetchedPull::finish`] or drop.
pub struct FetchedPull {
    report: TransferReport,
    /// None: nothing to move (up to date, or ahead of the hub).
    moving: Option<Move>,
}

/// The branch move a fetched pull makes.
struct Move {
    store: Arc<Store>,
    session: Arc<ImportSession>,
    dot: DotName,
    branch: String,
    /// The local head the fetch found (None: a new branch here).
    expected: Option<Id>,
    theirs: Id,
    block_size: u32,
    /// The branch that keeps diverged local work (first choice).
    stash: Option<String>,
}

impl FetchedPull {
    /// Up to date, or ahead of the hub: [`FetchedPull::finish`] answers
    /// `report` as it is.
    fn nothing_to_move(report: TransferReport) -> FetchedPull {
        FetchedPull {
            report,
            moving: None,
        }
    }

    /// True when [`FetchedPull::finish`] moves a branch (or makes one).
    pub fn moves(&self) -> bool {
        self.moving.is_some()
    }

    /// True when [`FetchedPull::finish`] moves a branch that has commits
    /// here (not a new one): what shows it sees its files replaced.
    pub fn moves_existing_branch(&self) -> bool {
        self.moving.as_ref().is_some_and(|m| m.expected.is_some())
    }

    /// The local head the fetch found, when it moves a branch that has one:
    /// [`FetchedPull::finish`] refuses if the branch left it meanwhile.
    pub fn expected_head(&self) -> Option<Id> {
        self.moving.as_ref().and_then(|m| m.expected)
    }

    /// Moves the branch (stashing diverged local work first when asked).
    /// Blocking (store writes); refused, changing nothing, when the branch
    /// moved or has uncommitted changes.
    pub fn finish(self) -> Result<TransferReport> {
        let FetchedPull { mut report, moving } = self;
        let Some(m) = moving else {
            return Ok(report);
        };
        let Move {
            store,
            session,
            dot,
            branch,
            expected,
            theirs,
            block_size,
            stash,
        } = m;
        let (dot, branch) = (&dot, branch.as_str());
        if let (Some(first), Some(l)) = (stash, expected) {
            // Expecting no head: a branch of that name made meanwhile (another
            // diverged pull in the same second) is never moved; pick another.
            let mut name = first;
            let mut tries = 0;
            loop {
                match store.set_branch_head(dot, &name, None, l, block_size)? {
                    SetHead::Updated => break,
                    SetHead::Moved { .. } if tries < 3 => {
                        tries += 1;
                        name = choose_stash_name(dot, branch, &mut |n| {
                            local_branch_exists(&store, dot, n)
                        })?;
                    }
                    SetHead::Moved { actual } => {
                        return Err(Error::Refused(format!(
                            "branch {name} of {dot} appeared while pulling (at {}), so the diverged work of {branch} was not stashed there and {branch} was not moved: pull again",
                            actual.map(|a| a.short()).unwrap_or_else(|| "no commit".into())
                        )))
                    }
                }
            }
            report.stashed = Some(name);
        }
        let moved = match store.set_branch_head(dot, branch, expected, theirs, block_size) {
            Ok(SetHead::Updated) => {
                session.moved_branch(dot);
                Ok(())
            }
            Ok(SetHead::Moved { .. }) => Err(moved_while_pulling(&store, dot, branch)),
            Err(e) => Err(e.into()),
        };
        if let Err(e) = moved {
            // The stash kept the branch's own head, which the branch still has.
            if let Some(name) = &report.stashed {
                if let Err(d) = store.delete_branch(dot, name, true) {
                    tracing::warn!(
                        "removing stash branch {name} of {dot} after a refused pull: {d}"
                    );
                }
            }
            return Err(e);
        }
        Ok(report)
    }
}

/// The first part of [`pull`]: compares, refuses what it would refuse
/// (diverged, uncommitted work a forced move would drop), and stores every
/// commit, tree node and chunk the move needs, moving nothing.
/// `before_download` is asked once it is known that the pull moves a
/// branch that has commits here, before anything is fetched: its error
/// ends the pull.
#[allow(clippy::too_many_arguments)] // a pull's parts, and the caller's check
pub async fn fetch_for_pull(
    store: Arc<Store>,
    remote: &Remote,
    dot: &DotName,
    branch: &str,
    remote_dot: &DotName,
    opts: &TransferOptions,
    progress: &Progress,
    before_download: &(dyn Fn() -> Result<()> + Sync),
) -> Result<FetchedPull> {
    let Some((block_size, branches)) = remote.branches(remote_dot).await? else {
        return Err(Error::Remote {
            code: ErrorCode::UnknownDot,
            message: format!("no dot {remote_dot} on the hub"),
        });
    };
    if !proto::valid_block_size(block_size) {
        return Err(Error::Connection(format!(
            "the hub reports block size {block_size} for {remote_dot}, which no dot can have"
        )));
    }
    let found = branches.iter().find(|(n, _)| n == branch).map(|(_, h)| *h);
    let Some(Some(theirs)) = found else {
        let names: Vec<&str> = branches.iter().map(|(n, _)| n.as_str()).collect();
        // Named as the user would fetch one (`dm pull`/`dm clone` with
        // the branch); "no commits" was said of a branch not there at all.
        return Err(Error::Remote {
            code: ErrorCode::UnknownDot,
            message: format!(
                "{remote_dot} on the hub {} (its branches: {}); name one of them as BRANCH",
                match found {
                    Some(None) => format!("has no commits on branch {branch} yet"),
                    _ => format!("has no branch {branch}"),
                },
                names.join(", ")
            ),
        });
    };
    let local_head = match store.branch_info(dot, branch) {
        Ok(b) => b.head,
        Err(e) if e.is_not_found() => None,
        Err(e) => return Err(e.into()),
    };
    if let Ok(d) = store.dot_info(dot) {
        if d.block_size != block_size {
            return Err(Error::Refused(format!(
                "local dot {dot} has block size {}, {remote_dot} on the hub {block_size}: clone it under another name (`dm clone REMOTE {remote_dot} --local-name NAME`)",
                d.block_size
            )));
        }
    }
    let mut report = TransferReport {
        branch: branch.to_string(),
        head: Some(theirs),
        ..Default::default()
    };
    progress.set_phase("comparing");
    // Up to date: the hub's history is not asked for (it checks the commit
    // against every branch of the dot: a pull --all of 2,700 branches
    // with nothing new took 48 s, mostly on the hub).
    if local_head == Some(theirs) {
        report.up_to_date = true;
        return Ok(FetchedPull::nothing_to_move(report));
    }
    let remote_anc = remote.ancestry(remote_dot, theirs).await?;
    let mut stash = None;
    let mut forced = false;
    report.moved = remote_anc.len();
    if let Some(l) = local_head {
        let anc: HashSet<Id> = remote_anc.iter().copied().collect();
        let local_anc = store.ancestry(Some(l))?;
        let had: HashSet<&Id> = local_anc.iter().collect();
        report.moved = remote_anc.iter().filter(|c| !had.contains(c)).count();
        match divergence(Some(theirs), &anc, Some(l), &local_anc) {
            Divergence::UpToDate => {
                report.up_to_date = true;
                return Ok(FetchedPull::nothing_to_move(report));
            }
            Divergence::FastForward => {}
            // Forced: the local commits the hub's branch lacks go (as a
            // `dm reset --hard` to the hub's head would).
            d if opts.force && (d == Divergence::Ahead || !opts.stash_on_divergence) => {
                if store.has_uncommitted(dot, branch)? {
                    return Err(Error::Refused(format!(
                        "branch {branch} of dot {dot} has uncommitted changes; commit them (or `dm reset --hard HEAD`) first. Nothing was changed on that branch"
                    )));
                }
                forced = true;
                report.destroyed = local_anc.iter().filter(|c| !anc.contains(c)).count();
            }
            Divergence::Ahead => {
                report.up_to_date = true;
                report.head = Some(l);
                report.note = Some(format!(
                    "branch {branch} of {dot} is ahead of {remote_dot} on the hub: nothing to pull (`dm push` sends your commits; `dm pull --force` moves {branch} back to the hub's head, destroying them)"
                ));
                return Ok(FetchedPull::nothing_to_move(report));
            }
            d => {
                if !opts.stash_on_divergence {
                    return Err(Error::Refused(diverged_message(
                        "pull refused",
                        dot,
                        branch,
                        &d,
                        &format!("dm pull REMOTE {dot} {branch}"),
                    )));
                }
                // The branch could not move anyway: no stash to leave behind.
                if store.has_uncommitted(dot, branch)? {
                    return Err(Error::Refused(format!(
                        "branch {branch} of dot {dot} has uncommitted changes; commit them (or `dm reset --hard HEAD`) first. Nothing was stashed"
                    )));
                }
                stash = Some(choose_stash_name(dot, branch, &mut |n| {
                    local_branch_exists(&store, dot, n)
                })?);
            }
        }
    }
    if local_head.is_some() {
        before_download()?;
    }
    // What this pull finds here stays until it ends, what it brings until
    // a branch names it (or, if it is interrupted, for the rerun).
    let session = Arc::new(ImportSession::new(store.clone()));
    session.into_dot(dot);
    // Commits the local store lacks (a present commit has its ancestry).
    let mut missing = Vec::new();
    for part in remote_anc.chunks(BATCH_IDS) {
        let have = session.has_objects(part)?;
        missing.extend(part.iter().zip(have).filter(|(_, h)| !h).map(|(id, _)| *id));
    }
    missing.reverse();
    let commit_blobs = remote.fetch(remote_dot, &missing, false).await?;
    let mut roots = Vec::new();
    let mut commit_items = Vec::new();
    for (id, bytes) in commit_blobs {
        if Id::of(&bytes) != id {
            return Err(Error::Remote {
                code: ErrorCode::Corrupt,
                message: format!("commit {} from the hub does not match its id", id.short()),
            });
        }
        let c: dm_store::object::Commit =
            dm_store::object::decode(&id, dm_store::object::KIND_COMMIT, &bytes)?;
        roots.push(c.root);
        commit_items.push((id, bytes));
    }
    let mut node_bytes: HashMap<Id, Vec<u8>> = HashMap::new();
    let plan = {
        let sess = &session;
        let handle = Handle::current();
        let rem: &Remote = remote;
        let nb = &mut node_bytes;
        tokio::task::block_in_place(|| -> Result<_> {
            let mut has = |ids: &[Id]| -> Result<Vec<bool>> { Ok(sess.has_objects(ids)?) };
            let mut get = |ids: &[Id]| -> Result<Vec<Vec<u8>>> {
                let got = handle.block_on(rem.fetch(remote_dot, ids, false))?;
                let mut out = Vec::with_capacity(got.len());
                for (id, b) in got {
                    nb.insert(id, b.clone());
                    out.push(b);
                }
                Ok(out)
            };
            plan_trees(&roots, BATCH_IDS, &mut has, &mut get)
        })?
    };
    let to_check = {
        let st = store.clone();
        let new_nodes: Vec<Id> = plan.levels.iter().flatten().copied().collect();
        let commit_set: HashSet<Id> = missing.iter().copied().collect();
        // Parents of the new commits that are here already.
        let mut bases = Vec::new();
        for (_, bytes) in &commit_items {
            let c: dm_store::object::Commit =
                dm_store::object::decode(&Id::of(bytes), dm_store::object::KIND_COMMIT, bytes)?;
            for p in c.parents {
                if !commit_set.contains(&p) && bases.len() < MAX_BASES {
                    if let Ok(pc) = st.commit_record(&p) {
                        if !bases.contains(&pc.root) {
                            bases.push(pc.root);
                        }
                    }
                }
            }
        }
        let nb = &node_bytes;
        tokio::task::block_in_place(|| -> Result<Vec<(Id, u32)>> {
            let mut read = |id: &Id| -> Result<Option<Vec<u8>>> {
                match nb.get(id) {
                    Some(b) => Ok(Some(b.clone())),
                    None => Ok(st.object_bytes(id)?),
                }
            };
            crate::delta::chunks_to_check(&new_nodes, &bases, &mut read)
        })?
    };
    let need: Vec<(Id, u32)> = {
        let mut need = Vec::new();
        for part in to_check.chunks(BATCH_IDS) {
            let ids: Vec<Id> = part.iter().map(|(id, _)| *id).collect();
            let have = session.has_chunks(&ids)?;
            need.extend(part.iter().zip(have).filter(|(_, h)| !h).map(|(c, _)| *c));
        }
        need
    };
    progress.set_phase("receiving");
    // The data the chunks hold, in the total and as they arrive (see push).
    progress.add_total(data_bytes(&need));
    let mut inflight = tokio::task::JoinSet::new();
    let mut got_bytes = 0u64;
    let per = 32usize;
    for part in need.chunks(per) {
        while inflight.len() >= opts.streams.max(1) {
            if let Some(r) = inflight.join_next().await {
                let (bytes, data) = r??;
                got_bytes += bytes;
                progress.add_done(data);
            }
        }
        let conn = remote.conn.clone();
        let ids: Vec<Id> = part.iter().map(|(id, _)| *id).collect();
        let data = data_bytes(part);
        let sess = session.clone();
        let rdot = remote_dot.clone();
        inflight.spawn(async move {
            let r = Remote::fetch_on(&conn, &rdot, &ids).await?;
            tokio::task::spawn_blocking(move || -> Result<(u64, u64)> {
                let mut n = 0;
                for (id, b) in r {
                    sess.import_chunk(&id, &b)?;
                    n += b.len() as u64;
                }
                // Found by a resumed pull even if this process crashes.
                sess.index_received()?;
                Ok((n, data))
            })
            .await?
        });
        if let Some(limit) = opts.fail_after_chunk_bytes {
            if got_bytes >= limit {
                while let Some(r) = inflight.join_next().await {
                    r??;
                }
                return Err(Error::Connection("test hook: interrupted".into()));
            }
        }
    }
    while let Some(r) = inflight.join_next().await {
        let (bytes, data) = r??;
        got_bytes += bytes;
        progress.add_done(data);
    }
    report.chunks = need.len();
    report.chunk_bytes = got_bytes;
    for level in &plan.levels {
        for id in level {
            let b = node_bytes
                .get(id)
                .ok_or_else(|| Error::Connection(format!("node {} was not fetched", id.short())))?;
            session.import_object(id, b)?;
            report.object_bytes += b.len() as u64;
        }
        report.objects += level.len();
    }
    for (id, b) in &commit_items {
        session.import_object(id, b)?;
        report.object_bytes += b.len() as u64;
    }
    report.commits = commit_items.len();
    if let (None, Some(l), false) = (&stash, local_head, forced) {
        // A fast-forward, as the hub's ancestry said: checked on what
        // arrived, so that a wrong answer cannot move the branch off
        // commits of its own (GC would then reclaim them).
        if !store.ancestry(Some(theirs))?.contains(&l) {
            return Err(Error::Refused(format!(
                "the hub said commit {} of {remote_dot} descends from {} (the head of {branch} of {dot}), but the commits it sent do not; {branch} was not moved",
                theirs.short(),
                l.short()
            )));
        }
    }
    Ok(FetchedPull {
        report,
        moving: Some(Move {
            store,
            session,
            dot: dot.clone(),
            branch: branch.to_string(),
            expected: local_head,
            theirs,
            block_size,
            stash,
        }),
    })
}

impl Remote {
    async fn fetch_on(
        conn: &quinn::Connection,
        dot: &DotName,
        ids: &[Id],
    ) -> Result<Vec<(Id, Vec<u8>)>> {
        let mut out = Vec::new();
        let mut rest = ids;
        while !rest.is_empty() {
            let got = match call_on(
                conn,
                &Request::GetChunks {
                    dot: dot_ref(dot),
                    ids: rest.to_vec(),
                },
            )
            .await?
            {
                Response::Blobs(b) => b,
                other => return Err(unexpected(&other)),
            };
            if got.is_empty() || got.len() > rest.len() {
                return Err(Error::Connection(
                    "the hub answered a fetch with nothing".into(),
                ));
            }
            for (i, (id, _)) in got.iter().enumerate() {
                if *id != rest[i] {
                    return Err(Error::Connection(
                        "the hub answered a fetch out of order".into(),
                    ));
                }
            }
            rest = &rest[got.len()..];
            out.extend(got);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ipv6_hosts_are_bracketed() {
        assert_eq!(super::host_port("::1", 32607), "[::1]:32607");
        assert_eq!(super::host_port("hub.example", 1), "hub.example:1");
        assert_eq!(super::host_port("10.0.0.1", 2), "10.0.0.1:2");
    }

    /// A pull whose branch changed under it says how: moved, or deleted
    /// with its dot (which read as a move).
    #[test]
    fn a_pull_cut_by_a_change_says_which() {
        let dir = tempfile::tempdir().unwrap();
        let store = dm_store::Store::open(dir.path()).unwrap();
        let dot = dm_store::DotName::new("app").unwrap();
        store.create_dot(&dot, None).unwrap();
        let said = || super::moved_while_pulling(&store, &dot, "master").to_string();
        assert!(said().contains("branch master of app moved"), "{}", said());
        let side = super::moved_while_pulling(&store, &dot, "gone").to_string();
        assert!(side.contains("branch gone of app was deleted"), "{side}");
        store.delete_dot(&dot).unwrap();
        assert!(
            said().contains("dot app was deleted while pulling"),
            "{}",
            said()
        );
    }
}
