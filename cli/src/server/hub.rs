//! The daemon's side of push, pull and clone: the QUIC hub endpoint
//! (dm-sync) and the local API routes under `/v1/sync/` that the `dm`
//! client uses. Transfers run inside the daemon (it holds the store): the
//! client starts one with `POST /v1/sync/transfers` and polls
//! `GET /v1/sync/transfers/{id}` for progress and the result.

use super::error::{ApiError, ApiResult};
use super::routes::blocking;
use super::AppState;
use axum::extract::{Path as UrlPath, Query, State};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use dm_store::DotName;
use dm_sync::{Progress, Remote, RemoteSpec, TransferOptions, Trust};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A std mutex that shrugs off poisoning (a panicked holder leaves plain data).
#[derive(Default)]
struct Mutex<T>(std::sync::Mutex<T>);

impl<T> Mutex<T> {
    fn new(v: T) -> Self {
        Mutex(std::sync::Mutex::new(v))
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, T> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A push to this server moves a branch that its mounts and containers
/// may be using: as for a pull or a reset, containers are stopped around
/// it, and the mounts' kernels write back before and drop their caches
/// after.
struct Live(Arc<AppState>);

impl dm_sync::LiveBranches for Live {
    fn around_move(
        &self,
        dot: &DotName,
        branch: &str,
        set: &mut dyn FnMut() -> dm_store::Result<dm_store::SetHead>,
    ) -> Result<dm_store::Result<dm_store::SetHead>, String> {
        let app = &self.0;
        let current = app
            .store
            .dot_info(dot)
            .map(|d| d.current_branch)
            .unwrap_or_default();
        if !is_clean(app, dot, branch) {
            // Refused as the move itself refuses, with nothing stopped.
            return Ok(Err(dm_store::Error::Refused(format!(
                "branch {branch} of dot {dot} has uncommitted changes"
            ))));
        }
        app.docker
            .around_branch_change(dot, branch, &current, || {
                discard_shutdown_writes(app, dot, branch)?;
                // As a pull or reset here warns its user: the hub's admin
                // hears of processes that now see the pushed state.
                let held = super::routes::held_open_showing(app, dot, branch, &current);
                let moved = app.mounts.reset(dot, branch, || Ok(set()))?;
                if let Some(note) = held_across(&held, &format!("a push that moved {dot}@{branch}"))
                    .filter(|_| matches!(moved, Ok(dm_store::SetHead::Updated)))
                {
                    tracing::warn!("{note}");
                }
                Ok(moved)
            })
            .map_err(|e| e.message)
    }

    fn around_delete(
        &self,
        dot: &DotName,
        branch: &str,
        delete: &mut dyn FnMut() -> dm_store::Result<()>,
    ) -> Result<dm_store::Result<()>, String> {
        let mut result = None;
        super::routes::around_branch_delete(
            &self.0,
            dot,
            branch,
            super::routes::Deleter::Push,
            || {
                result = Some(delete());
                Ok(())
            },
        )
        .map_err(|e| e.message)?;
        // Set by the closure, which ran since no refusal came back.
        Ok(result.unwrap_or(Ok(())))
    }
}

/// What to say of files `held` open (by mount path) across `what`, which
/// moved the branch they show: none when there were none. As a reset
/// says it.
fn held_across(held: &[(std::path::PathBuf, usize)], what: &str) -> Option<String> {
    if held.is_empty() {
        return None;
    }
    let (_, paths) = super::routes::files_and_paths(held);
    let procs: Vec<String> = super::routes::held_open_by(held.to_vec())
        .into_iter()
        .flat_map(|h| h.processes)
        .map(|p| p.to_string())
        .collect();
    let by = match procs.is_empty() {
        true => " (`fuser -vm` names the processes)".to_string(),
        false => format!(" by {}", procs.join(", ")),
    };
    Some(format!(
        "files were held open on {}{by} across {what}; they now see the new state under them \
         (a file deleted while open ends: ESTALE, and SIGBUS in a mapping of it); a database \
         running there still holds the old state and writes it back, also as it stops: stop it \
         by its process id (its own stop command reads a PID file that now is the new state's), \
         then `dm reset --hard HEAD` on that branch",
        paths.join(", ")
    ))
}

/// Whether `branch` of `dot` has nothing uncommitted (what the mounts'
/// kernels hold written back first). A pull or a push moves a branch
/// only then: this is asked before the containers that show it are
/// stopped, so that a refusal stops none (a database container was
/// stopped and started again for nothing), and again once they stopped
/// ([`discard_shutdown_writes`]).
fn is_clean(app: &AppState, dot: &DotName, branch: &str) -> bool {
    app.mounts.sync_kernel(dot, branch);
    // A branch (or dot) not here yet is clean; any other error is the
    // move's to report.
    !matches!(app.store.has_uncommitted(dot, branch), Ok(true))
}

/// Called with the containers stopped, for a branch that
/// [`is_clean`] found clean: discards what they wrote while they
/// stopped (a database writes its shutdown checkpoint), which would
/// otherwise refuse the pull or push as uncommitted work of the user's.
/// The move replaces the working state with the new head's anyway, as
/// `dm reset --hard` would.
fn discard_shutdown_writes(app: &AppState, dot: &DotName, branch: &str) -> ApiResult<()> {
    if is_clean(app, dot, branch) {
        return Ok(());
    }
    let Some(head) = app.store.branch_info(dot, branch)?.head else {
        return Ok(());
    };
    app.mounts.reset(dot, branch, || {
        app.store.reset(dot, branch, head, true)?;
        Ok(())
    })?;
    tracing::info!(
        "{dot}@{branch}: discarded what the containers stopped for a pull or push wrote while they stopped"
    );
    Ok(())
}

/// Starts the hub endpoint on `listen` (inside the runtime). A hub that
/// cannot start (port in use, ...) is logged and skipped: the rest of the
/// server works without it.
pub fn start(
    app: Arc<AppState>,
    data_dir: &std::path::Path,
    listen: std::net::SocketAddr,
) -> Option<dm_sync::Hub> {
    match dm_sync::Hub::start_with(app.store.clone(), data_dir, listen, Arc::new(Live(app))) {
        Ok(hub) => {
            let addr = hub.local_addr().map(|a| a.to_string()).unwrap_or_default();
            tracing::info!(
                listen = %addr,
                fingerprint = hub.fingerprint(),
                "hub listening (QUIC, UDP); admin key in {}",
                dm_sync::users::admin_key_path(data_dir).display()
            );
            Some(hub)
        }
        Err(e) => {
            tracing::warn!("no hub endpoint on UDP {listen}: {e}; push/pull to this server are off (see --listen)");
            None
        }
    }
}

/// A remote as the client sends it with a transfer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RemoteReq {
    /// Host name or address.
    pub host: String,
    /// UDP port.
    pub port: u16,
    /// User on the hub.
    pub user: String,
    /// API key.
    pub key: String,
    /// Pinned fingerprint `sha256:HEX`.
    pub fingerprint: String,
    /// Or: CA certificates (PEM) the hub's certificate must chain to.
    #[serde(default)]
    pub ca_pem: Option<String>,
}

impl RemoteReq {
    fn spec(&self) -> RemoteSpec {
        RemoteSpec {
            host: self.host.clone(),
            port: self.port,
            user: self.user.clone(),
            key: self.key.clone(),
            trust: match &self.ca_pem {
                Some(pem) => Trust::Ca(pem.clone()),
                None => Trust::Pinned(self.fingerprint.clone()),
            },
        }
    }
}

/// `POST /v1/sync/branch-deletions` (`dm push --delete`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BranchDeletionReq {
    /// The hub.
    pub remote: RemoteReq,
    /// Dot on the hub `ns/dot`.
    pub remote_dot: String,
    /// The branch to delete there.
    pub branch: String,
    /// Delete it even if its commits are on no other branch there.
    pub force: bool,
}

/// `POST /v1/sync/branch-deletions` answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BranchDeleted {
    /// The deleted branch's head on the hub (None: it had no commit).
    pub head: Option<String>,
}

/// Deletes a branch on a hub: one request, no transfer.
async fn delete_remote_branch(
    Json(req): Json<BranchDeletionReq>,
) -> ApiResult<Json<BranchDeleted>> {
    let remote_dot = DotName::parse(&req.remote_dot)?;
    let run = async {
        let remote = Remote::connect(&req.remote.spec()).await?;
        let head = dm_sync::delete_branch(&remote, &remote_dot, &req.branch, req.force).await;
        remote.close().await;
        head
    };
    match run.await {
        Ok(head) => Ok(Json(BranchDeleted {
            head: head.map(|h| h.to_hex()),
        })),
        Err(e) => Err(ApiError::conflict(e.to_string())),
    }
}

/// `POST /v1/sync/transfers`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TransferReq {
    /// `push` or `pull` (clone is a pull).
    pub direction: String,
    /// The hub.
    pub remote: RemoteReq,
    /// Local dot `[ns/]dot`.
    pub local_dot: String,
    /// Dot on the hub `ns/dot`.
    pub remote_dot: String,
    /// Branches to transfer; empty with `all` = every branch.
    pub branches: Vec<String>,
    /// Every branch.
    pub all: bool,
    /// `--stash-on-divergence`.
    pub stash_on_divergence: bool,
    /// `--force`.
    #[serde(default)]
    pub force: bool,
}

/// What one branch's transfer did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BranchReport {
    /// Branch.
    pub branch: String,
    /// Commits transferred (those the destination's store lacked).
    pub commits: usize,
    /// Commits the destination branch gained (some may have been there).
    #[serde(default)]
    pub moved: usize,
    /// Chunks transferred.
    pub chunks: usize,
    /// Stored bytes of the chunks.
    pub chunk_bytes: u64,
    /// Stored bytes of the tree nodes and commits.
    pub object_bytes: u64,
    /// Nothing to do.
    pub up_to_date: bool,
    /// Something the user should know.
    #[serde(default)]
    pub note: Option<String>,
    /// Where diverged work was kept.
    pub stashed: Option<String>,
    /// Commits of the destination branch a `--force` move dropped.
    #[serde(default)]
    pub destroyed: usize,
    /// The new head (hex).
    pub head: Option<String>,
    /// The branch the pushed one grew from and the fork commit (hex), when
    /// the push created it on the hub.
    #[serde(default)]
    pub origin_created: Option<(String, String)>,
}

/// `GET /v1/sync/transfers/{id}`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TransferStatus {
    /// Phase (connecting, comparing, sending, receiving, done).
    pub phase: String,
    /// Bytes done.
    pub done: u64,
    /// Estimated total bytes.
    pub total: u64,
    /// Finished (successfully or not).
    pub finished: bool,
    /// The error, when it failed.
    pub error: Option<String>,
    /// Per-branch results (also those done before an error).
    pub reports: Vec<BranchReport>,
    /// UDP bytes sent and received on the connection.
    pub wire_sent: u64,
    /// UDP bytes received.
    pub wire_received: u64,
}

/// A stopped transfer's error.
pub const STOPPED: &str = "stopped (Ctrl-C)";
/// A stopped push's error once the hub had been asked to move its branch
/// (it may still: the request was sent).
pub const STOPPED_MOVING: &str = "stopped (Ctrl-C) after the hub was asked to move its branch";

/// A stopped pull's error while the containers that show its branch
/// stop for the move: nothing moves, and they start again once stopped.
pub const STOPPED_PULL_STOPPING: &str =
    "stopped (Ctrl-C) while the containers stopped for the pull's move";
/// A stopped pull's error once its containers had stopped for the move
/// (it may have moved its branch).
pub const STOPPED_PULL_MOVING: &str = "stopped (Ctrl-C) as the pull moved its branch";
/// A stopped pull's error once its branch had moved, while the containers
/// it stopped start again.
pub const STOPPED_PULL_RESTARTING: &str =
    "stopped (Ctrl-C) after the pull moved its branch, as its containers start again";

/// How long a finished transfer's result waits for its client.
const FINISHED_JOBS_KEPT: std::time::Duration = std::time::Duration::from_secs(600);

struct Job {
    progress: Progress,
    status: Mutex<TransferStatus>,
    /// Stops the transfer's task (`DELETE /v1/sync/transfers/{id}`).
    abort: Mutex<Option<tokio::task::AbortHandle>>,
    /// Set by the same DELETE, for a pull running where aborting the task
    /// does not reach (see `pull_branch`).
    stop: tokio::sync::watch::Sender<bool>,
    /// When it finished, for [`forget_old_jobs`].
    finished_at: Mutex<Option<std::time::Instant>>,
}

/// Forgets the results of transfers that finished long ago: a client that
/// stopped polling (Ctrl-C) never asks for them. (A timer per transfer
/// did it, which panicked when the server stopped meanwhile.)
fn forget_old_jobs(jobs: &Mutex<HashMap<u64, Arc<Job>>>) {
    jobs.lock().retain(|_, j| {
        j.finished_at
            .lock()
            .is_none_or(|t| t.elapsed() < FINISHED_JOBS_KEPT)
    });
}

/// Resolves once `stop` is set (never, if its sender is gone).
async fn stopped(mut stop: tokio::sync::watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// State of the sync routes.
#[derive(Clone)]
pub struct SyncState {
    app: Arc<AppState>,
    jobs: Arc<Mutex<HashMap<u64, Arc<Job>>>>,
    next: Arc<AtomicU64>,
    /// One transfer at a time per local dot: a rerun while the first still
    /// runs (its client killed, say) waits for it, rather than racing it
    /// into "the branch moved while pulling".
    dots: Arc<Mutex<HashMap<DotName, Arc<tokio::sync::Mutex<()>>>>>,
}

/// The `/v1/sync/` routes (merged into the local API router).
pub fn router(app: Arc<AppState>) -> Router {
    let st = SyncState {
        app,
        jobs: Arc::new(Mutex::new(HashMap::new())),
        next: Arc::new(AtomicU64::new(1)),
        dots: Arc::new(Mutex::new(HashMap::new())),
    };
    Router::new()
        .route("/v1/sync/transfers", post(start_transfer))
        .route(
            "/v1/sync/transfers/{id}",
            get(transfer_status).delete(cancel_transfer),
        )
        .route("/v1/sync/branch-deletions", post(delete_remote_branch))
        .route("/v1/sync/users", post(add_user).get(list_users))
        .route("/v1/sync/users/{name}", delete(remove_user))
        .route(
            "/v1/sync/collaborators",
            post(add_collaborator)
                .get(list_collaborators)
                .delete(remove_collaborator),
        )
        .with_state(st)
}

/// `POST /v1/sync/users` body.
#[derive(Debug, Serialize, Deserialize)]
pub struct UserReq {
    /// User name.
    pub name: String,
    /// Give an existing user a new key instead of adding one.
    #[serde(default)]
    pub new_key: bool,
}

/// `POST /v1/sync/users` answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct UserKey {
    /// User name.
    pub name: String,
    /// The new API key (shown once).
    pub key: String,
}

fn sync_err(e: dm_sync::Error) -> ApiError {
    match e {
        dm_sync::Error::Store(e) => e.into(),
        e @ dm_sync::Error::Refused(_) => ApiError::conflict(e.to_string()),
        e => ApiError::bad_request(e.to_string()),
    }
}

async fn add_user(
    State(st): State<SyncState>,
    Json(req): Json<UserReq>,
) -> ApiResult<Json<UserKey>> {
    let store = st.app.store.clone();
    blocking(move || {
        let key = match req.new_key {
            true => dm_sync::users::new_key_for(&store, &req.name),
            false => dm_sync::users::add_user(&store, &req.name),
        }
        .map_err(sync_err)?;
        Ok(UserKey {
            name: req.name,
            key,
        })
    })
    .await
}

/// `DELETE /v1/sync/users/{name}` answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct UserRemoved {
    /// User name.
    pub name: String,
    /// Collaborator grants that went with the user.
    pub grants: usize,
}

async fn remove_user(
    State(st): State<SyncState>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Json<UserRemoved>> {
    let store = st.app.store.clone();
    blocking(move || {
        let grants = dm_sync::users::remove_user(&store, &name).map_err(sync_err)?;
        Ok(UserRemoved { name, grants })
    })
    .await
}

async fn list_users(State(st): State<SyncState>) -> ApiResult<Json<Vec<String>>> {
    Ok(Json(
        dm_sync::users::list_users(&st.app.store).map_err(sync_err)?,
    ))
}

/// `POST /v1/sync/collaborators` body.
#[derive(Debug, Serialize, Deserialize)]
pub struct CollaboratorReq {
    /// `[ns/]dot`.
    pub dot: String,
    /// User name.
    pub user: String,
}

async fn add_collaborator(
    State(st): State<SyncState>,
    Json(req): Json<CollaboratorReq>,
) -> ApiResult<Json<serde_json::Value>> {
    let dot = DotName::parse(&req.dot)?;
    dm_sync::users::add_collaborator(&st.app.store, &dot, &req.user).map_err(sync_err)?;
    Ok(Json(serde_json::json!({})))
}

/// `GET`/`DELETE /v1/sync/collaborators` query: `dot`, and `user` to remove.
#[derive(Debug, Deserialize)]
pub struct CollaboratorQuery {
    dot: String,
    #[serde(default)]
    user: String,
}

async fn list_collaborators(
    State(st): State<SyncState>,
    Query(q): Query<CollaboratorQuery>,
) -> ApiResult<Json<Vec<String>>> {
    let dot = DotName::parse(&q.dot)?;
    Ok(Json(
        dm_sync::users::collaborators(&st.app.store, &dot).map_err(sync_err)?,
    ))
}

async fn remove_collaborator(
    State(st): State<SyncState>,
    Query(q): Query<CollaboratorQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    let dot = DotName::parse(&q.dot)?;
    dm_sync::users::remove_collaborator(&st.app.store, &dot, &q.user).map_err(sync_err)?;
    Ok(Json(serde_json::json!({})))
}

async fn transfer_status(
    State(st): State<SyncState>,
    UrlPath(id): UrlPath<u64>,
) -> ApiResult<Json<TransferStatus>> {
    let job = st
        .jobs
        .lock()
        .get(&id)
        .cloned()
        .ok_or_else(|| ApiError::not_found(format!("no transfer {id}")))?;
    let mut s = job.status.lock().clone();
    let (done, total) = job.progress.get();
    s.phase = if s.finished && s.error.is_some() {
        "failed".into()
    } else if s.finished {
        "done".into()
    } else {
        job.progress.phase()
    };
    s.done = done;
    s.total = total;
    if s.finished {
        // Answered once finished: forget it.
        st.jobs.lock().remove(&id);
    }
    Ok(Json(s))
}

/// `DELETE /v1/sync/transfers/{id}`: stops a transfer (the client's
/// Ctrl-C). What arrived stays, verified; no branch moved unless the
/// transfer had already got that far. A rerun goes on from there.
async fn cancel_transfer(
    State(st): State<SyncState>,
    UrlPath(id): UrlPath<u64>,
) -> ApiResult<Json<TransferStatus>> {
    let job = st
        .jobs
        .lock()
        .remove(&id)
        .ok_or_else(|| ApiError::not_found(format!("no transfer {id}")))?;
    job.stop.send_replace(true);
    if let Some(a) = job.abort.lock().take() {
        a.abort();
    }
    let mut s = job.status.lock().clone();
    if !s.finished {
        s.finished = true;
        let phase = job.progress.phase();
        s.error = Some(if phase == dm_sync::progress::MOVING {
            STOPPED_MOVING.into()
        } else if phase == PULL_MOVING {
            STOPPED_PULL_MOVING.into()
        } else if phase == PULL_RESTARTING {
            STOPPED_PULL_RESTARTING.into()
        } else if phase.starts_with(PULL_STOPPING) {
            STOPPED_PULL_STOPPING.into()
        } else {
            STOPPED.into()
        });
    }
    Ok(Json(s))
}

async fn start_transfer(
    State(st): State<SyncState>,
    Json(req): Json<TransferReq>,
) -> ApiResult<Json<serde_json::Value>> {
    let local = DotName::parse(&req.local_dot)?;
    let remote_dot = DotName::parse(&req.remote_dot)?;
    if req.direction != "push" && req.direction != "pull" {
        return Err(ApiError::bad_request("direction must be push or pull"));
    }
    let id = st.next.fetch_add(1, Ordering::Relaxed);
    let job = Arc::new(Job {
        progress: Progress::new(),
        status: Mutex::new(TransferStatus::default()),
        abort: Mutex::new(None),
        stop: tokio::sync::watch::channel(false).0,
        finished_at: Mutex::new(None),
    });
    job.progress.set_phase("connecting");
    forget_old_jobs(&st.jobs);
    st.jobs.lock().insert(id, job.clone());
    let app = st.app.clone();
    let running = job.clone();
    let dot_lock = st.dots.lock().entry(local.clone()).or_default().clone();
    let dots = st.dots.clone();
    let task = tokio::spawn(async move {
        let job = running;
        let guard = match dot_lock.try_lock() {
            Ok(g) => g,
            Err(_) => {
                job.progress.set_phase(&format!(
                    "waiting for another transfer of {local} to finish"
                ));
                let g = dot_lock.lock().await;
                job.progress.set_phase("connecting");
                g
            }
        };
        let result = run_transfer(&app, &job, &req, &local, &remote_dot).await;
        drop(guard);
        // Forget the lock once no transfer holds or waits for it.
        {
            let mut d = dots.lock();
            if Arc::strong_count(&dot_lock) == 2 {
                d.remove(&local);
            }
        }
        {
            let mut s = job.status.lock();
            s.finished = true;
            if let Err(e) = result {
                s.error = Some(super::error::job_error(e.to_string(), e.code()));
            }
        }
        *job.finished_at.lock() = Some(std::time::Instant::now());
    });
    *job.abort.lock() = Some(task.abort_handle());
    Ok(Json(serde_json::json!({ "id": id })))
}

/// Pulls `branch` of `local`: fetches first, with everything still
/// running, then, when that moves a branch that has commits here, stops
/// the running containers that show it around the move alone and starts
/// them again (as around a reset), so that no database sees its files
/// replaced under it and none waits for a download; mounts showing the
/// branch drop their cached view.
#[allow(clippy::too_many_arguments)] // a pull's parts, and how to stop it
async fn pull_branch(
    app: &Arc<AppState>,
    remote: &Remote,
    local: &DotName,
    branch: &str,
    remote_dot: &DotName,
    opts: &TransferOptions,
    progress: &Progress,
    stop: tokio::sync::watch::Receiver<bool>,
) -> dm_sync::Result<dm_sync::TransferReport> {
    let current = || {
        app.store
            .dot_info(local)
            .map(|d| d.current_branch)
            .unwrap_or_default()
    };
    // What refuses a move (uncommitted work; a paused or `--rm` container
    // showing the branch) is said before a download that would then wait
    // for nothing, and before any container stops. The names of the
    // running containers the move stops.
    let ready = || {
        tokio::task::block_in_place(|| {
            if !is_clean(app, local, branch) {
                return Err(uncommitted(app, local, branch, &current()));
            }
            app.docker
                .ahead_of_branch_change(local, branch, &current())
                .map_err(|e| dm_sync::Error::Refused(e.message))
        })
    };
    let before_download = || ready().map(|_| ());
    // Ctrl-C: the pull stops here; what arrived stays for a rerun.
    let fetch = dm_sync::fetch_for_pull(
        app.store.clone(),
        remote,
        local,
        branch,
        remote_dot,
        opts,
        progress,
        &before_download,
    );
    let fetched = tokio::select! {
        r = fetch => r?,
        () = stopped(stop.clone()) => return Err(dm_sync::Error::Refused(STOPPED.into())),
    };
    if !fetched.moves_existing_branch() {
        // Up to date, ahead of the hub, or a branch new here: no
        // container shows its files change.
        let r = tokio::task::block_in_place(|| finish_held_off(app, local, branch, fetched));
        progress.set_phase("done");
        return r;
    }
    // Asked again: the download took its time.
    let names = ready()?;
    let current = current();
    // The server's runtime has several threads: this task may block its own.
    let r = tokio::task::block_in_place(|| {
        if app
            .store
            .branch_info(local, branch)
            .ok()
            .and_then(|b| b.head)
            != fetched.expected_head()
        {
            return Err(dm_sync::client::moved_while_pulling(
                &app.store, local, branch,
            ));
        }
        if !names.is_empty() {
            progress.set_phase(&format!(
                "{PULL_STOPPING}{} (each gets its stop timeout)",
                names.join(", ")
            ));
        }
        app.docker
            .around_branch_change(local, branch, &current, || {
                // The phase first, then the stop asked: a Ctrl-C that
                // comes later finds the phase and says the branch may
                // have moved. Stopped, nothing moves, and what the
                // containers wrote as they stopped stays (it was
                // discarded for a move that did not come).
                progress.set_phase(PULL_MOVING);
                if *stop.borrow() {
                    return Ok(Err(dm_sync::Error::Refused(STOPPED.into())));
                }
                discard_shutdown_writes(app, local, branch)?;
                let r = finish_held_off(app, local, branch, fetched);
                if !names.is_empty() {
                    progress.set_phase(PULL_RESTARTING);
                }
                // As after `dm reset --hard`: processes other than the
                // stopped containers that held files open now see the
                // pulled state under them; the user is told.
                Ok(r.map(|mut rep| {
                    let held = super::routes::held_open_showing(app, local, branch, &current);
                    if let Some(note) = held_across(&held, "the pull") {
                        rep.note = Some(note);
                    }
                    rep
                }))
            })
            .unwrap_or_else(|e| Err(dm_sync::Error::Store(dm_store::Error::Refused(e.message))))
    });
    progress.set_phase("done");
    r
}

/// Moves the branch of a fetched pull with the mounts that show it held
/// off, as a reset does: a request by a node id that raced the move before
/// the mounts' switch reached the pulled state by a number that may now
/// name another file (see `Mount::freeze`).
fn finish_held_off(
    app: &AppState,
    local: &DotName,
    branch: &str,
    fetched: dm_sync::FetchedPull,
) -> dm_sync::Result<dm_sync::TransferReport> {
    if !fetched.moves() {
        return fetched.finish();
    }
    let mut moved = None;
    if let Err(e) = app.mounts.reset(local, branch, || {
        moved = Some(fetched.finish());
        Ok(())
    }) {
        tracing::warn!("refreshing mounts of {local}@{branch}: {}", e.message);
    }
    moved.unwrap_or_else(|| {
        Err(dm_sync::Error::Refused(format!(
            "{local}@{branch} did not move: its mounts could not be held off (the server's log says why); pull again"
        )))
    })
}

/// The start of a pull's phase while it stops the containers that show
/// its branch (their names follow).
pub const PULL_STOPPING: &str = "stopping ";
/// A pull's phase once it moves its branch (containers stopped).
pub const PULL_MOVING: &str = "moving the branch";
/// A pull's phase once its branch moved, while the containers it stopped
/// start again.
pub const PULL_RESTARTING: &str = "starting the containers again";

/// The refusal of a pull into a branch with uncommitted changes, naming
/// the running containers that show it (one that writes all the time
/// makes it dirty again after a commit or reset).
fn uncommitted(app: &AppState, dot: &DotName, branch: &str, current: &str) -> dm_sync::Error {
    let names = app
        .docker
        .ahead_of_branch_change(dot, branch, current)
        .unwrap_or_default();
    let writers = if names.is_empty() {
        String::new()
    } else {
        format!(
            " The running containers that show it ({}) may be writing: stop them first (`docker stop`), then commit their work or discard it, pull, and start them again.",
            names.join(", ")
        )
    };
    dm_sync::Error::Refused(format!(
        "branch {branch} of dot {dot} has uncommitted changes; commit them (or `dm reset --hard HEAD`) first. Nothing was changed on that branch.{writers}"
    ))
}

async fn run_transfer(
    app: &Arc<AppState>,
    job: &Arc<Job>,
    req: &TransferReq,
    local: &DotName,
    remote_dot: &DotName,
) -> dm_sync::Result<()> {
    let remote = Remote::connect(&req.remote.spec()).await?;
    let opts = TransferOptions {
        stash_on_divergence: req.stash_on_divergence,
        force: req.force,
        ..TransferOptions::default()
    };
    let push = req.direction == "push";
    let mut branches = req.branches.clone();
    if req.all {
        // One list of the hub's branches for the whole run, not one per
        // branch (quadratic).
        remote.remember_branches();
        branches = if push {
            app.store
                .list_branches(local)?
                .into_iter()
                .filter(|b| b.head.is_some())
                .map(|b| b.name)
                .collect()
        } else {
            let Some((_, remote_branches)) = remote.branches(remote_dot).await? else {
                return Err(dm_sync::Error::Remote {
                    code: dm_sync::proto::ErrorCode::UnknownDot,
                    message: format!("no dot {remote_dot} on the hub"),
                });
            };
            remote_branches
                .into_iter()
                .filter(|(_, h)| h.is_some())
                .map(|(n, _)| n)
                .collect()
        };
        // master first: the other branches usually grew from it.
        branches.sort_by_key(|b| (b != dm_store::names::MASTER, b.clone()));
    }
    let mut failed: Vec<(String, dm_sync::Error)> = Vec::new();
    let mut fatal = None;
    for branch in &branches {
        let r = if push {
            dm_sync::push(
                app.store.clone(),
                &remote,
                local,
                branch,
                remote_dot,
                &opts,
                &job.progress,
            )
            .await
        } else {
            pull_branch(
                app,
                &remote,
                local,
                branch,
                remote_dot,
                &opts,
                &job.progress,
                job.stop.subscribe(),
            )
            .await
        };
        match r {
            Ok(rep) => job.status.lock().reports.push(BranchReport {
                branch: rep.branch,
                commits: rep.commits,
                moved: rep.moved,
                chunks: rep.chunks,
                chunk_bytes: rep.chunk_bytes,
                object_bytes: rep.object_bytes,
                up_to_date: rep.up_to_date,
                note: rep.note,
                stashed: rep.stashed,
                destroyed: rep.destroyed,
                head: rep.head.map(|h| h.to_hex()),
                origin_created: rep.origin_created.map(|(b, c)| (b, c.to_hex())),
            }),
            Err(e) => {
                // A broken connection or a refused key ends it all; a
                // branch refused on its own (diverged, uncommitted
                // changes) leaves the others of `--all` to go.
                use dm_sync::proto::ErrorCode;
                let ends_all = matches!(
                    e,
                    dm_sync::Error::Connection(_)
                        | dm_sync::Error::Io { .. }
                        | dm_sync::Error::Tls(_)
                        | dm_sync::Error::Remote {
                            code: ErrorCode::BadKey | ErrorCode::NoAccess | ErrorCode::Version,
                            ..
                        }
                );
                // Ctrl-C ends it all too.
                if ends_all || *job.stop.borrow() {
                    fatal = Some(e);
                    break;
                }
                failed.push((branch.clone(), e));
            }
        }
    }
    let result = match (fatal, branches.len(), failed.len()) {
        (Some(e), _, _) => Err(e),
        (None, _, 0) => Ok(()),
        (None, 1, _) => Err(failed.remove(0).1),
        (None, _, n) => Err(dm_sync::Error::Refused(format!(
            "{n} of {} branches were not transferred: {}",
            branches.len(),
            failed
                .iter()
                .map(|(b, e)| format!("branch {b}: {e}"))
                .collect::<Vec<_>>()
                .join("; ")
        ))),
    };
    {
        let mut s = job.status.lock();
        s.wire_sent = remote.bytes_sent();
        s.wire_received = remote.bytes_received();
    }
    remote.close().await;
    result
}
