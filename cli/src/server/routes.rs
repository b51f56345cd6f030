//! The API's routes and handlers (see docs/api.md). Store calls block, so
//! every handler runs its work in `spawn_blocking`.

use super::convert::{branch_view, change_view, commit_view, dot_summary};
use super::error::{ApiError, ApiResult};
use super::AppState;
use crate::api::*;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use dm_store::{DotName, Id, Store};
use serde::Deserialize;
use std::sync::Arc;

type S = State<Arc<AppState>>;

/// The API router.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/version", get(version))
        .route("/v1/dots", get(list_dots).post(create_dot))
        .route("/v1/dots/{ns}/{dot}", get(get_dot).delete(delete_dot))
        .route(
            "/v1/dots/{ns}/{dot}/branches",
            get(list_branches).post(create_branch),
        )
        .route("/v1/dots/{ns}/{dot}/checkout", post(checkout))
        .route(
            "/v1/dots/{ns}/{dot}/branches/{branch}",
            get(get_branch).delete(delete_branch),
        )
        .route(
            "/v1/dots/{ns}/{dot}/branches/{branch}/commits",
            get(log).post(commit),
        )
        .route(
            "/v1/dots/{ns}/{dot}/branches/{branch}/resolve",
            get(resolve),
        )
        .route("/v1/dots/{ns}/{dot}/branches/{branch}/reset", post(reset))
        .route("/v1/dots/{ns}/{dot}/branches/{branch}/diff", get(diff))
        .route("/v1/dots/{ns}/{dot}/branches/{branch}/status", get(status))
        .route("/v1/commits/{id}", get(get_commit))
        .route("/v1/mounts", get(list_mounts).post(mount))
        .route("/v1/mounts/unmount", post(unmount))
        .route("/v1/sync", post(sync))
        .route("/v1/gc", post(gc))
        .route("/v1/fsck", post(fsck))
        .fallback(not_found)
        .layer(axum::middleware::from_fn(log_request))
        .with_state(state)
}

/// Logs every request with its status and duration (debug level), and
/// turns axum's plain-text rejections (bad JSON, bad query, wrong method)
/// into the API's `{"error": "..."}` form.
async fn log_request(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let method = req.method().clone();
    let uri = req.uri().clone();
    let start = std::time::Instant::now();
    let resp = next.run(req).await;
    let status = resp.status();
    tracing::debug!(
        "{method} {uri} -> {} in {:?}",
        status.as_u16(),
        start.elapsed()
    );
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if (status.is_client_error() || status.is_server_error()) && !is_json {
        let bytes = axum::body::to_bytes(resp.into_body(), 64 * 1024)
            .await
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes).trim().to_string();
        let message = if text.is_empty() {
            format!(
                "{method} {uri}: {}",
                status.canonical_reason().unwrap_or("error").to_lowercase()
            )
        } else {
            format!("{method} {uri}: {text}")
        };
        return ApiError { status, message }.into_response();
    }
    resp
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!(
        "no such API endpoint {uri}; is the client newer than the server? (`dm version`)"
    ))
}

/// Runs blocking store work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<Json<T>> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map(Json),
        Err(e) => Err(ApiError::internal(format!("internal error: {e}"))),
    }
}

fn dot_name(ns: &str, dot: &str) -> ApiResult<DotName> {
    Ok(DotName::parse(&format!("{ns}/{dot}"))?)
}

fn check_branch(branch: &str) -> ApiResult<()> {
    Ok(dm_store::names::validate("branch", branch)?)
}

/// Names of the running or paused containers (from Docker) that use `dot`
/// (with `@BRANCH` for one pinned to a branch other than the current one,
/// `current`: `dm list` showed them beside the current branch as if they
/// used it), or of those that show `branch` of it.
fn container_names(
    containers: &[dm_volume_plugin::Container],
    dot: &DotName,
    current: &str,
    branch: Option<&str>,
) -> Vec<String> {
    containers
        .iter()
        .filter(|c| c.is_up())
        .filter_map(|c| match branch {
            Some(b) => c.shows_branch(dot, b, current).then(|| c.name()),
            None if c.shows_branch(dot, current, current) => Some(c.name()),
            None => c
                .dm_volumes()
                .into_iter()
                .find_map(|v| v.branch.filter(|_| &v.dot == dot))
                .map(|b| format!("{}@{b}", c.name())),
        })
        .collect()
}

fn summary(st: &AppState, dot: &DotName) -> ApiResult<DotSummary> {
    let info = st.store.dot_info(dot)?;
    let cur = st.store.branch_info(dot, &info.current_branch)?;
    Ok(dot_summary(&info, &cur, &st.server_id))
}

/// The branch name a revision starts with (`feature` of `feature~2`), for
/// recording where a branch made at it grew from.
fn rev_branch(rev: &str) -> &str {
    rev.split(['^', '~']).next().unwrap_or(rev)
}

/// Resolves an optional revision on a branch, with an error naming both.
fn resolve_rev(store: &Store, dot: &DotName, branch: &str, rev: &str) -> ApiResult<Id> {
    store.resolve(dot, branch, rev).map_err(|e| {
        let mut err = ApiError::from(e);
        if !err.message.contains(rev) {
            err.message = format!("{rev} on {dot}@{branch}: {}", err.message);
        }
        err
    })
}

async fn version(State(st): S) -> ApiResult<Json<VersionInfo>> {
    blocking(move || {
        Ok(VersionInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            api_version: API_VERSION,
            server_id: st.server_id.clone(),
            // Looks at the disk (and may make the reserve again).
            disk_full: st.store.disk_full(),
        })
    })
    .await
}

async fn list_dots(State(st): S) -> ApiResult<Json<Vec<DotSummary>>> {
    blocking(move || {
        let mut out = Vec::new();
        let containers = st.docker.all_containers();
        for info in st.store.list_dots()? {
            let cur = st.store.branch_info(&info.name, &info.current_branch);
            let Some(cur) = dm_store::store::gone_meanwhile(cur)? else {
                continue;
            };
            let mut s = dot_summary(&info, &cur, &st.server_id);
            s.containers = container_names(&containers, &info.name, &info.current_branch, None);
            out.push(s);
        }
        Ok(out)
    })
    .await
}

async fn create_dot(
    State(st): S,
    Json(req): Json<CreateDotRequest>,
) -> ApiResult<(StatusCode, Json<DotSummary>)> {
    let out = blocking(move || {
        let dot = DotName::parse(&req.name)?;
        st.store.create_dot(&dot, req.block_size)?;
        summary(&st, &dot)
    })
    .await?;
    Ok((StatusCode::CREATED, out))
}

/// `?branch=NAME` on a dot's details: only the current branch's and
/// NAME's (a command about one branch; each branch's details cost a read
/// of its working state, so a dot of 3,000 branches took 0.1 s per command).
#[derive(Deserialize)]
struct DotQuery {
    branch: Option<String>,
}

async fn get_dot(
    State(st): S,
    Path((ns, dot)): Path<(String, String)>,
    Query(q): Query<DotQuery>,
) -> ApiResult<Json<DotDetail>> {
    blocking(move || {
        let dot = dot_name(&ns, &dot)?;
        let info = st.store.dot_info(&dot)?;
        let cur = st.store.branch_info(&dot, &info.current_branch)?;
        let mut summary = dot_summary(&info, &cur, &st.server_id);
        let containers = st.docker.containers_using(&dot);
        let current = summary.current_branch.clone();
        summary.containers = container_names(&containers, &dot, &current, None);
        let branches = match &q.branch {
            None => st.store.list_branches(&dot)?,
            // The current branch's, as the summary read them (not read
            // twice), and NAME's, in name order.
            Some(named) => {
                let mut out = vec![cur];
                if *named != current && info.branches.contains(named) {
                    // Deleted since the summary was read: left out.
                    if let Some(b) =
                        dm_store::store::gone_meanwhile(st.store.branch_info(&dot, named))?
                    {
                        out.push(b);
                    }
                }
                out.sort_by(|a, b| a.name.cmp(&b.name));
                out
            }
        };
        let branch_details = branches
            .iter()
            .map(|b| {
                let mut v = branch_view(b, &current);
                v.containers = container_names(&containers, &dot, &current, Some(&b.name));
                v
            })
            .collect();
        let mounts = st.mounts.list_dot(&dot);
        let following = containers
            .iter()
            .filter(|c| c.is_up() && c.follows_dot(&dot))
            .map(|c| c.name())
            .collect();
        Ok(DotDetail {
            summary,
            branch_details,
            mounts,
            following,
            unrestored: st.mounts.unrestored_of(&dot),
        })
    })
    .await
}

async fn delete_dot(
    State(st): S,
    Path((ns, dot)): Path<(String, String)>,
) -> ApiResult<Json<Empty>> {
    blocking(move || {
        let dot = dot_name(&ns, &dot)?;
        st.store.dot_info(&dot)?;
        // As `docker volume rm` refuses a volume in use: a database whose
        // files vanish under it loses what it has not written yet.
        refuse_if_running(&st, &dot, &format!("dot {dot}"), |_| true)?;
        refuse_open_files(&st, &format!("dot {dot}"), |v| v.dot == dot)?;
        st.mounts
            .unmount_dot_then(&dot, || Ok(st.store.delete_dot(&dot)?))?;
        tracing::info!("deleted dot {dot}");
        Ok(Empty {})
    })
    .await
}

async fn list_branches(
    State(st): S,
    Path((ns, dot)): Path<(String, String)>,
) -> ApiResult<Json<Vec<BranchView>>> {
    blocking(move || {
        let dot = dot_name(&ns, &dot)?;
        let info = st.store.dot_info(&dot)?;
        Ok(st
            .store
            .list_branches(&dot)?
            .iter()
            .map(|b| branch_view(b, &info.current_branch))
            .collect())
    })
    .await
}

async fn create_branch(
    State(st): S,
    Path((ns, dot)): Path<(String, String)>,
    Json(req): Json<CreateBranchRequest>,
) -> ApiResult<(StatusCode, Json<BranchView>)> {
    let out = blocking(move || {
        let dot = dot_name(&ns, &dot)?;
        check_branch(&req.name)?;
        let info = st.store.dot_info(&dot)?;
        let from = match &req.from {
            Some(rev) => Some(resolve_rev(&st.store, &dot, &info.current_branch, rev)?),
            None => None,
        };
        let origin = req.from.as_deref().map(rev_branch);
        let b = st.store.create_branch_from(&dot, &req.name, from, origin)?;
        Ok(branch_view(&b, &info.current_branch))
    })
    .await?;
    Ok((StatusCode::CREATED, out))
}

async fn get_branch(
    State(st): S,
    Path((ns, dot, branch)): Path<(String, String, String)>,
) -> ApiResult<Json<BranchView>> {
    blocking(move || {
        let dot = dot_name(&ns, &dot)?;
        check_branch(&branch)?;
        let info = st.store.dot_info(&dot)?;
        let b = st.store.branch_info(&dot, &branch)?;
        Ok(branch_view(&b, &info.current_branch))
    })
    .await
}

/// Refuses (naming them) when running or paused containers that use `dot`
/// and match `uses` exist: `what` is what they use, for the message (a
/// paused one deleted under went on with its files gone when unpaused).
fn refuse_if_running(
    st: &AppState,
    dot: &DotName,
    what: &str,
    uses: impl Fn(&dm_volume_plugin::Container) -> bool,
) -> ApiResult<()> {
    let running: Vec<(String, bool)> = st
        .docker
        .containers_using_checked(dot)?
        .into_iter()
        .filter(|c| c.is_up() && uses(c))
        .map(|c| (c.name().trim_start_matches('/').to_string(), c.is_paused()))
        .collect();
    if running.is_empty() {
        return Ok(());
    }
    let described: Vec<String> = running
        .iter()
        .map(|(name, paused)| match paused {
            true => format!("{name} (paused)"),
            false => name.clone(),
        })
        .collect();
    let names: Vec<&str> = running.iter().map(|(name, _)| name.as_str()).collect();
    Err(ApiError::conflict(format!(
        "{what} is in use by containers {}; stop them first (`docker stop {}`)",
        described.join(", "),
        names.join(" ")
    )))
}

/// Refuses, -f or not, while processes have files open on the mounts of
/// the volumes `which` picks (after the releases of files just closed): a
/// deletion would unmount them, and a database whose files vanish under it
/// loses what it has not written yet. `dm unmount --force` detaches such a
/// mount on purpose.
fn refuse_open_files(
    st: &AppState,
    what: &str,
    which: impl Fn(&dm_store::VolumeName) -> bool,
) -> ApiResult<()> {
    let open = files_open(st, RELEASE_WAIT, which);
    if open.is_empty() {
        return Ok(());
    }
    let (n, paths) = files_and_paths(&open);
    let one = paths.len() == 1;
    Err(ApiError::conflict(format!(
        "{what}: {n} file{} open on {} (`fuser -vm {}` names the process{}); nothing was \
         deleted. Stop {} first, or detach {} with `dm unmount --force {}`{} (the process keeps \
         the files it has open, and its new writes go nowhere)",
        if n == 1 { "" } else { "s" },
        paths.join(", "),
        paths.join(" "),
        if one { "" } else { "es" },
        if one { "it" } else { "them" },
        if one { "the mount" } else { "each mount" },
        if one { paths[0].as_str() } else { "PATH" },
        if one { "" } else { " for each" },
    )))
}

#[derive(Deserialize)]
struct ForceQuery {
    #[serde(default)]
    force: bool,
}

async fn delete_branch(
    State(st): S,
    Path((ns, dot, branch)): Path<(String, String, String)>,
    Query(q): Query<ForceQuery>,
) -> ApiResult<Json<Empty>> {
    blocking(move || {
        let dot = dot_name(&ns, &dot)?;
        check_branch(&branch)?;
        // Refusals first: nothing is unmounted for a deletion that fails.
        st.store.check_branch_delete(&dot, &branch, q.force)?;
        let by = match q.force {
            true => Deleter::LocalForced,
            false => Deleter::Local,
        };
        around_branch_delete(&st, &dot, &branch, by, || {
            Ok(st.store.delete_branch(&dot, &branch, q.force)?)
        })?;
        tracing::info!("deleted branch {branch} of {dot}");
        Ok(Empty {})
    })
    .await
}

/// Who deletes a branch, for [`around_branch_delete`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Deleter {
    /// `dm branch -d` here: refused while the branch is mounted at a path.
    Local,
    /// `dm branch -D` here: those mounts are unmounted first.
    LocalForced,
    /// A `dm push --delete` to this hub: refused while mounted here.
    Push,
}

/// Runs `delete` (which deletes `branch` of `dot`) unless a running
/// container uses the branch (never, as `dm dot delete`), a process has
/// files open on it, or it is mounted at a path (see [`Deleter`]): then
/// refused, saying which.
pub(crate) fn around_branch_delete(
    st: &AppState,
    dot: &DotName,
    branch: &str,
    by: Deleter,
    delete: impl FnOnce() -> ApiResult<()>,
) -> ApiResult<()> {
    // A pusher cannot run the hub's commands the local refusals name.
    let in_use = |e: ApiError| match by {
        Deleter::Push => ApiError::conflict(format!(
            "branch {branch} of {dot} is in use on the hub (a container or a process there uses \
             its files); it can be deleted once they stop there"
        )),
        _ => e,
    };
    refuse_if_running(st, dot, &format!("branch {branch} of {dot}"), |c| {
        c.dm_volumes()
            .iter()
            .any(|v| v.branch.as_deref() == Some(branch))
    })
    .map_err(in_use)?;
    refuse_open_files(st, &format!("branch {branch} of {dot}"), |v| {
        v.dot == *dot && v.branch.as_deref() == Some(branch)
    })
    .map_err(in_use)?;
    let pinned = st.mounts.pinned_paths(dot, branch);
    if !pinned.is_empty() {
        if by != Deleter::LocalForced {
            return Err(ApiError::conflict(format!(
                "branch {branch} of {dot} is mounted at {}{}",
                pinned
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                match by {
                    Deleter::Push => " on the hub; it can be deleted once unmounted there",
                    _ => "; unmount it first (`dm unmount PATH`) or use -f",
                }
            )));
        }
        for p in pinned {
            st.mounts.unmount(&p)?;
        }
    }
    delete()
}

async fn checkout(
    State(st): S,
    Path((ns, dot)): Path<(String, String)>,
    Json(req): Json<CheckoutRequest>,
) -> ApiResult<Json<BranchView>> {
    blocking(move || {
        let dot = dot_name(&ns, &dot)?;
        check_branch(&req.branch)?;
        // Where a new branch starts (`checkout -b NAME START`), resolved
        // before anything is stopped.
        let create = match (req.create, &req.start) {
            (false, _) => None,
            (true, None) => Some((None, None)),
            (true, Some(rev)) => {
                let current = st.store.dot_info(&dot)?.current_branch;
                let id = resolve_rev(&st.store, &dot, &current, rev)?;
                Some((Some(id), Some(rev_branch(rev))))
            }
        };
        // Checked first (once no other switch of the dot runs), so that
        // containers are not restarted for nothing.
        let pre = || -> ApiResult<Option<BranchView>> {
            let info = st.store.dot_info(&dot)?;
            match st.store.branch_info(&dot, &req.branch) {
                Ok(b) if !req.create && info.current_branch == req.branch => {
                    return Ok(Some(branch_view(&b, &req.branch)))
                }
                Ok(_) if req.create => {
                    return Err(ApiError::conflict(format!(
                        "branch {} of {dot} already exists; check it out without -b",
                        req.branch
                    )))
                }
                Err(e) if !req.create => return Err(e.into()),
                _ => {}
            }
            refuse_host_processes_following(&st, &dot, &req.branch)?;
            refuse_two_containers_on_one_branch(&st, &dot, &req.branch)?;
            Ok(None)
        };
        // Containers following the dot are stopped, switched and started;
        // other processes with files open on a followed path are not ours
        // to stop: refused (they would write what they hold of this branch
        // into the other one).
        let view = st.docker.around_switch(&dot, pre, || {
            refuse_open_files_following(&st, &dot, &req.branch)?;
            let old = st.store.dot_info(&dot)?.current_branch;
            st.mounts.checkout(&dot, &req.branch, create)?;
            let b = st.store.branch_info(&dot, &req.branch)?;
            Ok(BranchView {
                switched_from: Some(old),
                ..branch_view(&b, &req.branch)
            })
        })?;
        tracing::info!("dot {dot}: checked out {}", req.branch);
        Ok(view)
    })
    .await
}

async fn log(
    State(st): S,
    Path((ns, dot, branch)): Path<(String, String, String)>,
    Query(q): Query<LogQuery>,
) -> ApiResult<Json<Vec<CommitView>>> {
    blocking(move || {
        let dot = dot_name(&ns, &dot)?;
        check_branch(&branch)?;
        let until = q.until.as_deref().map(Id::from_hex).transpose()?;
        let mut found = st.store.log_until(&dot, &branch, until.as_ref(), q.max);
        // A commit of another branch (`dm log side~0`, or its id): its
        // history up to it, as `git log REV`, from a branch that has it.
        if let (Err(dm_store::Error::NotFound { .. }), Some(id)) = (&found, &until) {
            for other in st.store.dot_info(&dot)?.branches {
                if let Ok(c) = st.store.log_until(&dot, &other, Some(id), q.max) {
                    found = Ok(c);
                    break;
                }
            }
        }
        let commits = found.map_err(|e| match (e, &until) {
            (
                dm_store::Error::NotFound {
                    what: "commit on the branch",
                    ..
                },
                Some(id),
            ) => ApiError::not_found(format!(
                "commit {} of dot {dot} is on no branch",
                id.short()
            )),
            (e, _) => e.into(),
        })?;
        Ok(commits.iter().map(commit_view).collect())
    })
    .await
}

async fn commit(
    State(st): S,
    Path((ns, dot, branch)): Path<(String, String, String)>,
    Json(req): Json<CommitRequest>,
) -> ApiResult<(StatusCode, Json<CommitView>)> {
    let out = blocking(move || {
        let dot = dot_name(&ns, &dot)?;
        check_branch(&branch)?;
        if req.message.trim().is_empty() {
            return Err(ApiError::bad_request(
                "a commit needs a message: dm commit -m \"what changed\"",
            ));
        }
        for k in req.metadata.keys() {
            if !k.starts_with(|c: char| c.is_ascii_lowercase())
                || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
            {
                return Err(ApiError::bad_request(format!(
                    "invalid metadata key {k:?}: keys start with a lowercase letter and use A-Z, a-z, 0-9, '_', '-', '.'"
                )));
            }
        }
        st.store.branch_info(&dot, &branch)?;
        st.mounts.sync_kernel(&dot, &branch);
        let c = st.store.commit(
            &dot,
            &branch,
            dm_store::CommitRequest {
                message: req.message,
                author: req.author.unwrap_or_else(|| "admin".to_string()),
                metadata: req.metadata,
            },
        )?;
        st.mounts.refresh_shared(&dot, &branch)?;
        tracing::info!("dot {dot}@{branch}: commit {}", c.id.short());
        Ok(commit_view(&c))
    })
    .await?;
    Ok((StatusCode::CREATED, out))
}

async fn resolve(
    State(st): S,
    Path((ns, dot, branch)): Path<(String, String, String)>,
    Query(q): Query<ResolveQuery>,
) -> ApiResult<Json<ResolveResponse>> {
    blocking(move || {
        let dot = dot_name(&ns, &dot)?;
        check_branch(&branch)?;
        let id = resolve_rev(&st.store, &dot, &branch, &q.rev)?;
        Ok(ResolveResponse { id: id.to_hex() })
    })
    .await
}

/// What a reset of `branch` from `head` to `target` takes away: the
/// commits the branch no longer has, and how many of those no other branch
/// has either (destroyed). Allowed when `target` is one of the branch's own
/// commits (a roll back) or continues the branch (a fast-forward, e.g. to
/// the head of a branch that grew from it); any other target is refused:
/// the branch's commits that `target`'s history lacks would go without a
/// word (`dm reset` to another branch's commit did that).
fn what_a_reset_drops(
    store: &Store,
    dot: &DotName,
    branch: &str,
    head: Option<Id>,
    target: Id,
    rev: &str,
) -> ApiResult<(usize, usize)> {
    let Some(head) = head else { return Ok((0, 0)) };
    let ours = store.ancestry(Some(head))?;
    let destroyed = |dropped: &[Id]| -> ApiResult<usize> {
        if dropped.is_empty() {
            return Ok(0);
        }
        let mut kept = std::collections::HashSet::new();
        for b in store.list_branches(dot)? {
            if b.name != branch {
                kept.extend(store.ancestry(b.head)?);
            }
        }
        Ok(dropped.iter().filter(|c| !kept.contains(*c)).count())
    };
    if let Some(i) = ours.iter().position(|c| *c == target) {
        return Ok((i, destroyed(&ours[..i])?));
    }
    let theirs: std::collections::HashSet<Id> = store.ancestry(Some(target))?.into_iter().collect();
    if theirs.contains(&head) {
        return Ok((0, 0));
    }
    let n = ours.iter().take_while(|c| !theirs.contains(c)).count();
    let lost = destroyed(&ours[..n])?;
    let anyway = match ours.get(n) {
        Some(common) => format!(
            "to replace {branch} with it anyway, `dm reset --hard {}` (their latest common commit) first, then `dm reset --hard {rev}`",
            common.short()
        ),
        None => format!(
            "they share no commit: to keep that state under this name anyway, rename by hand (`dm checkout -b NEW {rev}`, then delete {branch})"
        ),
    };
    let kept = match (lost, n) {
        (0, 1) => "another branch has it".to_string(),
        (0, _) => "other branches have them all".to_string(),
        (1, 1) => "on no other branch".to_string(),
        (l, n) if l == n => "none of them on another branch".to_string(),
        (l, _) => format!("{l} of them on no other branch"),
    };
    Err(ApiError::conflict(format!(
        "not resetting branch {branch} of dot {dot} to {rev} ({}): that commit is not in {branch}'s history, so {branch} would lose {n} commit{} it has ({kept}). To use that state, check out the branch it is on; {anyway}",
        target.short(),
        if n == 1 { "" } else { "s" }
    )))
}

async fn reset(
    State(st): S,
    Path((ns, dot, branch)): Path<(String, String, String)>,
    Json(req): Json<ResetRequest>,
) -> ApiResult<Json<ResetResponse>> {
    blocking(move || {
        let dot = dot_name(&ns, &dot)?;
        check_branch(&branch)?;
        // The head `rev` is resolved against: the reset is refused if the
        // branch moves before it happens (a commit racing it is kept).
        let head = st.store.branch_info(&dot, &branch)?.head;
        let target = resolve_rev(&st.store, &dot, &branch, &req.rev)?;
        let (dropped, destroyed) =
            what_a_reset_drops(&st.store, &dot, &branch, head, target, &req.rev)?;
        if !req.hard && st.store.has_uncommitted(&dot, &branch)? {
            return Err(ApiError::conflict(format!(
                "branch {branch} of dot {dot} has uncommitted changes; commit them (`dm commit`), or discard them (`dm reset --hard HEAD`), then reset"
            )));
        }
        // Without --hard nothing is destroyed: dm keeps no reflog to give
        // commits back, and a git user's `git reset HEAD^` keeps the files
        // (dm has no mixed reset: the files become REF's either way).
        if !req.hard && destroyed > 0 {
            return Err(ApiError::conflict(format!(
                "resetting branch {branch} of dot {dot} to {} would destroy {destroyed} commit{} that no other branch has, and dm keeps no reflog to get {} back; \
                 `dm branch NAME` keeps {} on a branch first, or `dm reset --hard {}` destroys {}. \
                 (Unlike git's, a reset always makes the files those of the commit it goes to.)",
                req.rev,
                if destroyed == 1 { "" } else { "s" },
                if destroyed == 1 { "it" } else { "them" },
                if destroyed == 1 { "it" } else { "them" },
                req.rev,
                if destroyed == 1 { "it" } else { "them" },
            )));
        }
        let current = st.store.dot_info(&dot)?.current_branch;
        // To the state the branch has (`dm reset --hard HEAD` with nothing
        // changed): the files held open see no other state, so no warning
        // (it told to stop a database and reset again, for nothing).
        let same_state = head == Some(target) && !st.store.has_uncommitted(&dot, &branch)?;
        let do_reset = || {
            // Files held open by processes other than the containers just
            // stopped (whose releases may still be on their way): those
            // processes see the reset state under them, which a running
            // database does not survive. Allowed (a log writer appends
            // after the reset content), but the user is told.
            // Asked for a short while only: it is a warning, and the
            // reset waits for it (writes meanwhile are discarded with it).
            let held = match req.hard && !same_state {
                true => held_open_showing(&st, &dot, &branch, &current),
                false => Vec::new(),
            };
            if req.hard {
                // Kernel-cached writes belong to the state being discarded, but
                // flush them first so that nothing lands after the reset.
                st.mounts.sync_kernel(&dot, &branch);
            }
            st.mounts.reset(&dot, &branch, || {
                st.store
                    .reset_from(&dot, &branch, head, target, req.hard)
                    .map_err(|e| match e {
                        // Clean when checked above: written since, most
                        // likely by a database its containers stopped.
                        dm_store::Error::Refused(ref m)
                            if !req.hard
                                && !m.contains("moved while the reset")
                                && st.store.has_uncommitted(&dot, &branch).unwrap_or(false) =>
                        {
                            ApiError::conflict(format!(
                            "branch {branch} of dot {dot} has uncommitted changes, written after the reset began (a database writes as its container stops); commit them (`dm commit`) or discard them (`dm reset --hard`)"
                        ))
                        }
                        e => e.into(),
                    })?;
                Ok(())
            })?;
            Ok(held)
        };
        // Containers that show this branch (pinned to it, or following the
        // dot while it is the current one) are stopped around the reset,
        // not when it is refused.
        let held = st
            .docker
            .around_branch_change(&dot, &branch, &current, do_reset)?;
        tracing::info!(
            "dot {dot}@{branch}: reset to {}, {dropped} later commit(s) dropped, {destroyed} of them destroyed",
            target.short()
        );
        let message = st.store.commit_record(&target)?.message;
        Ok(ResetResponse {
            id: target.to_hex(),
            message,
            dropped,
            destroyed,
            held_open: held_open_by(held),
        })
    })
    .await
}

async fn diff(
    State(st): S,
    Path((ns, dot, branch)): Path<(String, String, String)>,
    Query(q): Query<DiffQuery>,
) -> ApiResult<Json<DiffResponse>> {
    blocking(move || {
        let dot = dot_name(&ns, &dot)?;
        check_branch(&branch)?;
        let from = match &q.from {
            Some(r) => Some(resolve_rev(&st.store, &dot, &branch, r)?),
            None => None,
        };
        let to = match &q.to {
            Some(r) => Some(resolve_rev(&st.store, &dot, &branch, r)?),
            None => None,
        };
        if to.is_none() {
            st.mounts.sync_kernel(&dot, &branch);
        }
        let from_shown = match from {
            Some(f) => Some(f),
            None => st.store.branch_info(&dot, &branch)?.head,
        };
        let changes = st.store.diff(&dot, &branch, from, to)?;
        Ok(DiffResponse {
            from: from_shown.map(|i| i.to_hex()),
            to: to.map(|i| i.to_hex()),
            changes: changes.iter().map(change_view).collect(),
        })
    })
    .await
}

async fn status(
    State(st): S,
    Path((ns, dot, branch)): Path<(String, String, String)>,
) -> ApiResult<Json<StatusResponse>> {
    blocking(move || {
        let dot = dot_name(&ns, &dot)?;
        check_branch(&branch)?;
        st.mounts.sync_kernel(&dot, &branch);
        let b = st.store.branch_info(&dot, &branch)?;
        let dirty = st.store.has_uncommitted(&dot, &branch)?;
        let (changes, mount_made) = st.store.diff_and_mount_made(&dot, &branch, None, None)?;
        Ok(StatusResponse {
            mount_made: mount_made
                .iter()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect(),
            dot: dot.to_string(),
            branch,
            head: b.head.map(|h| h.to_hex()),
            dirty,
            dirty_bytes: b.dirty_bytes,
            changes: changes.iter().map(change_view).collect(),
        })
    })
    .await
}

async fn get_commit(State(st): S, Path(id): Path<String>) -> ApiResult<Json<CommitView>> {
    blocking(move || {
        let id = Id::from_hex(&id)?;
        Ok(commit_view(&st.store.commit_info(&id)?))
    })
    .await
}

async fn list_mounts(State(st): S) -> ApiResult<Json<Vec<MountView>>> {
    blocking(move || Ok(st.mounts.list())).await
}

async fn mount(State(st): S, Json(req): Json<MountRequest>) -> ApiResult<Json<MountView>> {
    blocking(move || {
        // Before any lock: a path that hangs holds up only this request.
        if let Some(p) = req.path.as_deref().map(std::path::Path::new) {
            if p.is_absolute() {
                crate::mounts::check_answers(p)?;
            }
        }
        st.docker.user_mount(|| {
            st.mounts
                .mount(&req.volume, req.path.map(std::path::PathBuf::from))
        })
    })
    .await
}

async fn unmount(
    State(st): S,
    Json(req): Json<UnmountRequest>,
) -> ApiResult<Json<UnmountResponse>> {
    blocking(move || {
        let path = std::path::Path::new(&req.path);
        let users = st.docker.containers_on(path);
        if !users.is_empty() {
            return Err(ApiError::conflict(format!(
                "{} is the mount of a Docker volume that running containers {} use; stop them first (`docker stop {}`), and Docker unmounts it",
                path.display(),
                users.join(", "),
                users.join(" ")
            )));
        }
        let open = match req.force {
            true => 0,
            false => after_releases(|| st.mounts.open_files(path), |n| *n > 0),
        };
        if open > 0 {
            return Err(ApiError::conflict(format!(
                "{} has {open} open file{} (a process is using it; `fuser -vm {}` names it): \
                 stop it first, or `dm unmount --force {}` to detach the mount now (the process \
                 keeps the files it has open there, and what it writes to them still goes to \
                 the dot)",
                path.display(),
                if open == 1 { "" } else { "s" },
                path.display(),
                path.display()
            )));
        }
        // No file open, but a process working in it (a shell cd'ed there):
        // the unmount detached it lazily and that process went on changing
        // the dot through it, unseen.
        if !req.force && st.mounts.is_busy(path) {
            return Err(ApiError::conflict(format!(
                "{} is in use: a process works in it (a shell's or a program's working directory), \
                 holds a directory of it open, or something is mounted inside it (`fuser -vm {}` names it): leave it first, or \
                 `dm unmount --force {}` to detach the mount now",
                path.display(),
                path.display(),
                path.display()
            )));
        }
        let detached_busy = st.mounts.unmount(path)?;
        Ok(UnmountResponse { detached_busy })
    })
    .await
}

/// What `probe` finds once files closed just before are released: a file
/// counts as open until the kernel's RELEASE, sent after close(2) returns,
/// arrives, so while `open` holds `probe` is asked again for up to 1 s.
fn after_releases<T>(probe: impl FnMut() -> T, open: impl Fn(&T) -> bool) -> T {
    after_releases_within(RELEASE_WAIT, probe, open)
}

/// How long a refusal over open files waits for the releases of files
/// closed just before.
const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// [`after_releases`] asking for up to `wait`.
fn after_releases_within<T>(
    wait: std::time::Duration,
    mut probe: impl FnMut() -> T,
    open: impl Fn(&T) -> bool,
) -> T {
    let deadline = std::time::Instant::now() + wait;
    let mut found = probe();
    while open(&found) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
        found = probe();
    }
    found
}

/// Files open on the mounts of the volumes `which` picks: (path, how
/// many) for each mount that has any, once files closed just before are
/// released (asked again for up to `wait`; see [`after_releases`]).
fn files_open(
    st: &AppState,
    wait: std::time::Duration,
    which: impl Fn(&dm_store::VolumeName) -> bool,
) -> Vec<(std::path::PathBuf, usize)> {
    after_releases_within(
        wait,
        || st.mounts.open_files_where(&which),
        |o| !o.is_empty(),
    )
}

/// `held` (mount path, files open) for the API, with the host processes
/// that hold them: a database's own stop command may not find it once the
/// branch moved (its PID file is the new state's), so the user needs its pid.
pub(crate) fn held_open_by(held: Vec<(std::path::PathBuf, usize)>) -> Vec<HeldOpen> {
    let paths: Vec<std::path::PathBuf> = held.iter().map(|(p, _)| p.clone()).collect();
    let procs = match paths.is_empty() {
        true => Vec::new(),
        false => super::host_procs::using(&paths),
    };
    // Each named by the process to stop (a database's main process, not
    // the children that hold its files).
    let tops: Vec<_> = procs
        .iter()
        .map(|h| super::host_procs::top_of(h, &paths))
        .collect();
    held.into_iter()
        .map(|(p, files)| {
            let mut processes: Vec<HeldBy> = Vec::new();
            for h in tops.iter().filter(|h| h.file.starts_with(&p)) {
                if !processes.iter().any(|b| b.pid == h.pid) {
                    processes.push(HeldBy {
                        name: h.name.clone(),
                        pid: h.pid,
                    });
                }
            }
            HeldOpen {
                processes,
                path: p.display().to_string(),
                files,
            }
        })
        .collect()
}

/// Files held open on the mounts that show `branch` of `dot` (`current`
/// being the dot's current branch), asked for a short while only (250 ms):
/// for the warning that a reset or a pull moved the branch under processes
/// other than the stopped containers, which then see the new state.
pub(crate) fn held_open_showing(
    st: &AppState,
    dot: &DotName,
    branch: &str,
    current: &str,
) -> Vec<(std::path::PathBuf, usize)> {
    files_open(st, std::time::Duration::from_millis(250), |v| {
        v.shows_branch(dot, branch, current)
    })
}

/// The number of files in `open` (from [`files_open`]) and its mount paths.
pub(crate) fn files_and_paths(open: &[(std::path::PathBuf, usize)]) -> (usize, Vec<String>) {
    let n = open.iter().map(|(_, n)| n).sum();
    let paths = open.iter().map(|(p, _)| p.display().to_string()).collect();
    (n, paths)
}

/// Refuses a checkout of `branch` that would start the running containers
/// that follow `dot` on the files of a running container pinned to that
/// branch (`dot@branch`): two programs on one branch's files (two
/// PostgreSQL servers ran on one data directory, and corrupted it).
/// Subdots apart do not meet; `__root__` meets every subdot.
fn refuse_two_containers_on_one_branch(
    st: &AppState,
    dot: &DotName,
    branch: &str,
) -> ApiResult<()> {
    use dm_store::names::ROOT_SUBDOT;
    let containers: Vec<_> = st
        .docker
        .containers_using(dot)
        .into_iter()
        .filter(|c| c.is_up())
        .collect();
    let following: Vec<(String, String)> = containers
        .iter()
        .flat_map(|c| {
            c.dm_volumes()
                .into_iter()
                .filter(|v| &v.dot == dot && v.branch.is_none())
                .map(|v| (c.name(), v.subdot))
        })
        .collect();
    for pinned in &containers {
        for v in pinned.dm_volumes() {
            if &v.dot != dot || v.branch.as_deref() != Some(branch) {
                continue;
            }
            let meets = |s: &str| s == v.subdot || s == ROOT_SUBDOT || v.subdot == ROOT_SUBDOT;
            let mut movers: Vec<&str> = following
                .iter()
                .filter(|(n, s)| *n != pinned.name() && meets(s))
                .map(|(n, _)| n.as_str())
                .collect();
            movers.dedup();
            if !movers.is_empty() {
                return Err(ApiError::conflict(format!(
                    "checking out branch {branch} of dot {dot} would start {} {} (following \
                     the dot) on the files that container {} runs on (pinned to {dot}@{branch}): \
                     two programs on one branch's files, as two databases on one data \
                     directory, corrupt them. Stop {} first (`docker stop`), or check out \
                     another branch",
                    if movers.len() == 1 {
                        "container"
                    } else {
                        "containers"
                    },
                    movers.join(", "),
                    pinned.name(),
                    pinned.name(),
                )));
            }
        }
    }
    Ok(())
}

/// Refuses a checkout of `branch`, before any container is stopped for it,
/// while processes of this host (not a container's) have files open on a
/// mount that follows `dot`, naming them. Checked only after the stop, the
/// refusal restarted every container for nothing.
/// [`refuse_open_files_following`] checks again after the stop (it also
/// sees what processes opened meanwhile).
fn refuse_host_processes_following(st: &AppState, dot: &DotName, branch: &str) -> ApiResult<()> {
    let open = st
        .mounts
        .open_files_where(|v| &v.dot == dot && v.branch.is_none());
    if open.is_empty() {
        return Ok(());
    }
    let paths: Vec<std::path::PathBuf> = open.into_iter().map(|(p, _)| p).collect();
    let procs = super::host_procs::using(&paths);
    let Some(first) = procs.first() else {
        return Ok(());
    };
    let names: Vec<String> = procs
        .iter()
        .take(5)
        .map(|h| format!("{} (pid {}) has {} open", h.name, h.pid, h.file.display()))
        .collect();
    Err(ApiError::conflict(format!(
        "dot {dot}: {}{}; a checkout would change the files under {}; nothing was changed (no container was stopped). \
         Stop {} first, or give {} a mount that stays on its branch (`dm mount {}@BRANCH PATH`), then check out {branch}",
        names.join(", "),
        if procs.len() > 5 { format!(" and {} more", procs.len() - 5) } else { String::new() },
        if procs.len() == 1 { "it" } else { "them" },
        if procs.len() == 1 { format!("pid {}", first.pid) } else { "them".to_string() },
        if procs.len() == 1 { "it" } else { "them" },
        dot.name
    )))
}

/// Refuses a checkout of `branch` while processes have files open on a
/// mount that follows `dot` (after the releases of files just closed, e.g.
/// by the containers stopped for the switch).
fn refuse_open_files_following(st: &AppState, dot: &DotName, branch: &str) -> ApiResult<()> {
    let open = files_open(st, RELEASE_WAIT, |v| &v.dot == dot && v.branch.is_none());
    if open.is_empty() {
        return Ok(());
    }
    let (n, paths) = files_and_paths(&open);
    Err(ApiError::conflict(format!(
        "dot {dot}: {n} file{} open on {} (a process other than a container uses {}; `fuser -vm {}` names it), \
         and a checkout would change the files under it; nothing was changed. Stop it first, or give it a mount \
         that stays on its branch (`dm mount {}@BRANCH PATH`), then check out {branch}",
        if n == 1 { "" } else { "s" },
        paths.join(", "),
        if paths.len() == 1 { "it" } else { "them" },
        paths[0],
        dot.name
    )))
}

async fn sync(State(st): S) -> ApiResult<Json<Empty>> {
    blocking(move || {
        st.store.sync()?;
        Ok(Empty {})
    })
    .await
}

async fn gc(State(st): S) -> ApiResult<Json<GcResponse>> {
    blocking(move || {
        let r = st.store.gc()?;
        Ok(GcResponse {
            chunks_deleted: r.chunks_deleted,
            objects_deleted: r.objects_deleted,
            bytes_freed: r.bytes_freed,
            log_bytes_freed: r.log_bytes_freed,
            table_bytes_freed: r.table_bytes_freed,
            disk_full: st.store.disk_full(),
        })
    })
    .await
}

async fn fsck(State(st): S) -> ApiResult<Json<FsckResponse>> {
    blocking(move || {
        let r = st.store.fsck()?;
        Ok(FsckResponse {
            objects_checked: r.objects_checked,
            chunks_checked: r.chunks_checked,
            problems: r.problems,
            notes: r.notes,
        })
    })
    .await
}
