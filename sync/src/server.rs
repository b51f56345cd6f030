//! The hub: a QUIC endpoint that serves push, pull and clone for the dots
//! of a store. Every connection authenticates once (`Hello`, argon2-checked
//! API key); every request is then authorized against the dot it names.

use crate::error::{Error, Result};
use crate::proto::{self, DotRef, ErrorCode, Request, Response, BATCH_BYTES, BATCH_IDS};
use crate::users::{self, User};
use dm_store::{DotName, ImportSession, SetHead, Store};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use tokio::sync::Semaphore;

/// API key checks run at once. Each holds argon2's memory cost (about
/// 19 MiB with the default parameters) on a blocking thread until it ends,
/// and anyone can start one with a `Hello`: without a bound, hundreds of
/// concurrent unauthenticated handshakes could exhaust the hub's memory.
/// Those beyond the bound wait their turn.
pub const MAX_CONCURRENT_KEY_CHECKS: usize = 4;

/// Connections that have not authenticated yet, at once. Each holds QUIC
/// buffers; beyond this, new ones are closed at once ("busy").
pub const MAX_UNAUTHENTICATED: usize = 64;

/// How long a new connection has to open its first stream and send `Hello`.
pub const HELLO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Largest `Hello` frame (a user name and an API key): a peer that has not
/// authenticated cannot make the hub allocate a full frame.
const MAX_HELLO: usize = 16 << 10;

/// What uses a branch of this hub besides the hub: its own mounts and
/// containers, which the daemon owns (this crate knows neither). A push
/// that moves a branch runs its compare-and-swap inside
/// [`LiveBranches::around_move`].
pub trait LiveBranches: Send + Sync {
    /// Runs `set` (the move of `branch` of `dot` to a pushed commit) with
    /// whatever uses the branch quiesced: containers stopped and started
    /// again, what mounts' kernels cache written back before and dropped
    /// after. `Err(message)`: refused (a container that cannot be
    /// stopped); nothing moved.
    fn around_move(
        &self,
        dot: &DotName,
        branch: &str,
        set: &mut dyn FnMut() -> dm_store::Result<SetHead>,
    ) -> std::result::Result<dm_store::Result<SetHead>, String>;

    /// Runs `delete`, which deletes `branch` of `dot`, unless something
    /// here uses the branch (a container, a mount, open files): then the
    /// refusal, saying what.
    fn around_delete(
        &self,
        dot: &DotName,
        branch: &str,
        delete: &mut dyn FnMut() -> dm_store::Result<()>,
    ) -> std::result::Result<dm_store::Result<()>, String>;
}

/// A hub whose branches nothing else uses (tests, tools).
struct Unused;

impl LiveBranches for Unused {
    fn around_move(
        &self,
        _dot: &DotName,
        _branch: &str,
        set: &mut dyn FnMut() -> dm_store::Result<SetHead>,
    ) -> std::result::Result<dm_store::Result<SetHead>, String> {
        Ok(set())
    }

    fn around_delete(
        &self,
        _dot: &DotName,
        _branch: &str,
        delete: &mut dyn FnMut() -> dm_store::Result<()>,
    ) -> std::result::Result<dm_store::Result<()>, String> {
        Ok(delete())
    }
}

/// A running hub endpoint.
pub struct Hub {
    endpoint: quinn::Endpoint,
    fingerprint: String,
    task: tokio::task::JoinHandle<()>,
}

impl Hub {
    /// Starts serving `store` on `listen` (UDP). The certificate and the
    /// admin key are created in `data_dir` on first start. Call inside a
    /// tokio runtime.
    pub fn start(store: Arc<Store>, data_dir: &Path, listen: SocketAddr) -> Result<Hub> {
        Hub::start_with(store, data_dir, listen, Arc::new(Unused))
    }

    /// [`Hub::start`] for a store whose branches are also mounted or used
    /// by containers on this host (`live`).
    pub fn start_with(
        store: Arc<Store>,
        data_dir: &Path,
        listen: SocketAddr,
        live: Arc<dyn LiveBranches>,
    ) -> Result<Hub> {
        let (chain, key) = crate::tls::load_or_create_cert(data_dir)?;
        // load_or_create_cert returns the leaf at least.
        let fingerprint = chain
            .first()
            .map_or_else(String::new, |c| crate::tls::fingerprint(c));
        if let Some(_key) = users::ensure_admin(&store, data_dir)? {
            tracing::info!(
                "created the hub's admin user; its API key is in {}",
                users::admin_key_path(data_dir).display()
            );
        }
        let endpoint_config = crate::tls::endpoint_config(&key);
        let server_config = crate::tls::server_config(chain, key)?;
        let endpoint = std::net::UdpSocket::bind(listen)
            .and_then(|socket| {
                quinn::Endpoint::new(
                    endpoint_config,
                    Some(server_config),
                    socket,
                    Arc::new(quinn::TokioRuntime),
                )
            })
            .map_err(Error::io(format!("listening on UDP {listen}")))?;
        let ep = endpoint.clone();
        let key_checks = Arc::new(Semaphore::new(MAX_CONCURRENT_KEY_CHECKS));
        let unauthenticated = Arc::new(Semaphore::new(MAX_UNAUTHENTICATED));
        let task = tokio::spawn(async move {
            while let Some(incoming) = ep.accept().await {
                let store = store.clone();
                let key_checks = key_checks.clone();
                let live = live.clone();
                let unauthenticated = unauthenticated.clone();
                tokio::spawn(async move {
                    let addr = incoming.remote_address();
                    // The handshake has the Hello's deadline too.
                    let conn = match tokio::time::timeout(HELLO_TIMEOUT, incoming).await {
                        Ok(c) => c,
                        Err(_) => {
                            tracing::debug!("hub handshake from {addr} timed out");
                            return;
                        }
                    };
                    match conn {
                        Ok(conn) => {
                            // Counted once the handshake is done: packets
                            // from spoofed addresses never get this far.
                            let Ok(permit) = unauthenticated.try_acquire_owned() else {
                                tracing::warn!(
                                    "refusing a hub connection from {addr}: {MAX_UNAUTHENTICATED} others are still authenticating"
                                );
                                conn.close(0u32.into(), b"busy");
                                return;
                            };
                            if let Err(e) =
                                serve_connection(store, live, conn, key_checks, permit).await
                            {
                                tracing::debug!("hub connection ended: {e}");
                            }
                        }
                        Err(e) => tracing::debug!("hub handshake failed: {e}"),
                    }
                });
            }
        });
        Ok(Hub {
            endpoint,
            fingerprint,
            task,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.endpoint
            .local_addr()
            .map_err(Error::io("reading the hub's address"))
    }

    /// `sha256:HEX` of the hub certificate (what clients pin).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Stops accepting and closes every connection.
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"hub shutting down");
        self.task.abort();
    }
}

/// Per-connection state.
struct Session {
    store: Arc<Store>,
    user: User,
    import: ImportSession,
    /// Ids this session was shown in dots it may read: branch heads, their
    /// ancestry, and what the objects it fetched name. It may fetch only
    /// those: knowing an id (a commit id pasted in a chat, a chunk id) of
    /// a dot one may not read gives none of its data.
    shown: std::sync::Mutex<HashSet<dm_store::Id>>,
    /// Commits this session sent with their stored form (verified against
    /// their ids). With `shown`, the commits it may name: as a parent of a
    /// commit it sends, or as the new head of a branch. Without this, a
    /// user who knows a commit id of a dot they may not read (pasted from
    /// `dm log`) could point a branch of their own at it, or at a commit
    /// they make on top of it, and clone that.
    proven: std::sync::Mutex<HashSet<dm_store::Id>>,
    /// The daemon's mounts and containers, quiesced around branch moves.
    live: Arc<dyn LiveBranches>,
    /// Dots whose branches this session was shown, and whether all their
    /// commits were added to `shown` yet (done once, when a has-query
    /// meets a commit this session may not name yet: pushing a new
    /// branch of a dot whose history the hub has).
    readable: std::sync::Mutex<std::collections::HashMap<DotName, bool>>,
}

impl Session {
    /// Whether this session may name commit `id`: it was shown it in a dot
    /// it may read, or it sent it.
    fn may_name(&self, id: &dm_store::Id) -> bool {
        self.shown
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(id)
            || self
                .proven
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(id)
    }

    /// Shows every commit of the dots whose branches this session was
    /// shown and whose histories it was not shown yet. Returns whether
    /// it showed anything.
    fn show_readable_histories(&self) -> dm_store::Result<bool> {
        let todo: Vec<DotName> = self
            .readable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter_mut()
            .filter(|(_, done)| !**done)
            .map(|(d, done)| {
                *done = true;
                d.clone()
            })
            .collect();
        for dot in &todo {
            // Access is checked again: a collaborator removed meanwhile.
            if !users::may_access(&self.store, &self.user, dot).unwrap_or(false) {
                continue;
            }
            self.show(dot_commits(&self.store, dot)?);
        }
        Ok(!todo.is_empty())
    }

    /// Refuses a commit id this session may not name (see `proven`).
    fn check_may_name(&self, what: &str, id: &dm_store::Id) -> std::result::Result<(), Response> {
        if self.may_name(id) {
            return Ok(());
        }
        Err(err(
            ErrorCode::Refused,
            format!(
                "{what} {} was neither sent on this connection nor shown to it in a dot user {} may read; send the commit itself",
                id.short(),
                self.user.name
            ),
        ))
    }

    fn show(&self, ids: impl IntoIterator<Item = dm_store::Id>) {
        self.shown
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(ids);
    }

    /// Refuses when any of `ids` was not shown to this session.
    fn check_shown(&self, what: &str, ids: &[dm_store::Id]) -> std::result::Result<(), Response> {
        let shown = self.shown.lock().unwrap_or_else(|e| e.into_inner());
        match ids.iter().find(|id| !shown.contains(id)) {
            None => Ok(()),
            Some(id) => Err(err(
                ErrorCode::UnknownDot,
                format!(
                    "{what} {} is not part of what this connection was shown of the dots it may read: ask for the branches and their ancestry first",
                    id.short()
                ),
            )),
        }
    }
}

fn err(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Err {
        code,
        message: message.into(),
    }
}

/// Runs `f` (a key check) on a blocking thread once `limit` grants a
/// permit; the permit is held until `f` returns, even when the caller
/// stops waiting (a dropped connection does not free memory still in use).
async fn bounded_blocking<T, F>(limit: &Arc<Semaphore>, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let permit = limit
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| Error::Connection("the hub is shutting down".into()))?;
    Ok(tokio::task::spawn_blocking(move || {
        let r = f();
        drop(permit);
        r
    })
    .await?)
}

async fn serve_connection(
    store: Arc<Store>,
    live: Arc<dyn LiveBranches>,
    conn: quinn::Connection,
    key_checks: Arc<Semaphore>,
    unauthenticated: tokio::sync::OwnedSemaphorePermit,
) -> Result<()> {
    // The first stream must be Hello, soon.
    let hello = async {
        let (send, mut recv) = conn.accept_bi().await?;
        let req: Request = proto::read_frame_limited(&mut recv, MAX_HELLO).await?;
        Ok::<_, Error>((send, req))
    };
    let (mut send, req) = match tokio::time::timeout(HELLO_TIMEOUT, hello).await {
        Ok(r) => r?,
        Err(_) => {
            conn.close(0u32.into(), b"no Hello in time");
            return Err(Error::Connection(format!(
                "no Hello within {} s",
                HELLO_TIMEOUT.as_secs()
            )));
        }
    };
    let Request::Hello { version, user, key } = req else {
        proto::write_frame(&mut send, &err(ErrorCode::BadRequest, "say Hello first")).await?;
        send.finish()?;
        return Ok(());
    };
    if version != proto::PROTOCOL_VERSION {
        let r = err(
            ErrorCode::Version,
            format!(
                "this hub speaks protocol version {}, the client {version}: upgrade the older side",
                proto::PROTOCOL_VERSION
            ),
        );
        proto::write_frame(&mut send, &r).await?;
        send.finish()?;
        return Ok(());
    }
    let st = store.clone();
    let name = user.clone();
    let auth = bounded_blocking(&key_checks, move || users::authenticate(&st, &user, &key)).await?;
    let peer = conn.remote_address();
    let user = match auth {
        Ok(u) => {
            tracing::info!("hub: user {} connected from {peer}", u.name);
            u
        }
        Err(Error::Remote { code, message }) => {
            // The hub admin's record of who tried (a wrong or old key).
            tracing::warn!("hub: refused user {name:?} from {peer}: {message}");
            proto::write_frame(&mut send, &Response::Err { code, message }).await?;
            send.finish()?;
            let _ = send.stopped().await;
            return Ok(());
        }
        Err(e) => {
            proto::write_frame(&mut send, &err(ErrorCode::Internal, e.to_string())).await?;
            send.finish()?;
            return Ok(());
        }
    };
    proto::write_frame(
        &mut send,
        &Response::Welcome {
            version: proto::PROTOCOL_VERSION,
        },
    )
    .await?;
    send.finish()?;
    drop(unauthenticated);
    // Authenticated: the full windows (tls.rs).
    conn.set_max_concurrent_bi_streams(crate::tls::STREAMS.into());
    conn.set_receive_window(crate::tls::RECEIVE_WINDOW.into());
    let session = Arc::new(Session {
        import: ImportSession::new(store.clone()),
        store,
        user,
        shown: Default::default(),
        proven: Default::default(),
        live,
        readable: Default::default(),
    });
    loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(_) => return Ok(()),
        };
        let session = session.clone();
        tokio::spawn(async move {
            let resp = match proto::read_frame::<Request>(&mut recv).await {
                Ok(req) => {
                    let s = session.clone();
                    match tokio::task::spawn_blocking(move || handle(&s, req)).await {
                        Ok(r) => r,
                        Err(e) => err(ErrorCode::Internal, format!("request failed: {e}")),
                    }
                }
                Err(e) => err(ErrorCode::BadRequest, e.to_string()),
            };
            if proto::write_frame(&mut send, &resp).await.is_ok() {
                let _ = send.finish();
                let _ = send.stopped().await;
            }
        });
    }
}

fn dot_name(d: &DotRef) -> std::result::Result<DotName, Response> {
    DotName::parse(&format!("{}/{}", d.namespace, d.name))
        .map_err(|e| err(ErrorCode::BadRequest, e.to_string()))
}

/// Checks access; `must_exist` also requires the dot to exist.
fn authorize(s: &Session, d: &DotRef, must_exist: bool) -> std::result::Result<DotName, Response> {
    let dot = dot_name(d)?;
    match users::may_access(&s.store, &s.user, &dot) {
        Ok(true) => {}
        Ok(false) => {
            // Said without telling whether the dot exists: a collaborator
            // can be added to an existing dot only, and only the
            // namespace's user (or the admin) creates dots in it.
            // Reads (clone, pull) need an existing dot: only writes (a
            // push) hear how to make a new one.
            let new_dot = match must_exist {
                true => String::new(),
                false => format!(
                    "; to push a new dot, name one in your own namespace (`--remote-name {}/{}`): namespace {} belongs to user {} and the hub's admin",
                    s.user.name, dot.name, dot.namespace, dot.namespace
                ),
            };
            return Err(err(
                ErrorCode::NoAccess,
                format!(
                    "user {user} has no access to dot {ns}/{name} on this hub: if it exists, ask the hub's admin to run \
                     `dm dot collaborator add {ns}/{name} {user}` there{new_dot}",
                    user = s.user.name,
                    ns = dot.namespace,
                    name = dot.name,
                ),
            ));
        }
        Err(e) => return Err(err(ErrorCode::Internal, e.to_string())),
    }
    if must_exist {
        match s.store.dot_info(&dot) {
            Ok(_) => {}
            Err(e) if e.is_not_found() => {
                return Err(err(
                    ErrorCode::UnknownDot,
                    format!("no dot {}/{} on the hub", dot.namespace, dot.name),
                ))
            }
            Err(e) => return Err(err(ErrorCode::Internal, e.to_string())),
        }
    }
    Ok(dot)
}

/// Walks the commits of `dot` (its branch heads and all their ancestors),
/// each once, until `stop` says so; returns whether it did. A dot deleted
/// meanwhile has none.
fn walk_dot(
    store: &Store,
    dot: &DotName,
    mut stop: impl FnMut(&dm_store::Id) -> bool,
) -> dm_store::Result<bool> {
    let mut stack: Vec<dm_store::Id> = match store.list_branches(dot) {
        Ok(b) => b.into_iter().filter_map(|b| b.head).collect(),
        Err(e) if e.is_not_found() => Vec::new(),
        Err(e) => return Err(e),
    };
    let mut seen = HashSet::new();
    while let Some(id) = stack.pop() {
        if seen.insert(id) {
            if stop(&id) {
                return Ok(true);
            }
            stack.extend(store.commit_record(&id)?.parents);
        }
    }
    Ok(false)
}

/// Whether `head` is a commit of `dot`: a branch head or an ancestor of one.
/// Clients ask for the ancestry of heads they were shown; without this a
/// user allowed on one dot could list the history of any commit on the hub
/// by its id.
fn commit_of_dot(store: &Store, dot: &DotName, head: dm_store::Id) -> dm_store::Result<bool> {
    walk_dot(store, dot, |id| *id == head)
}

/// Every commit of `dot`.
fn dot_commits(store: &Store, dot: &DotName) -> dm_store::Result<HashSet<dm_store::Id>> {
    let mut all = HashSet::new();
    walk_dot(store, dot, |id| {
        all.insert(*id);
        false
    })?;
    Ok(all)
}

/// A SetHead whose `expected` is not the branch's head.
fn moved_err(dot: &DotName, branch: &str, actual: Option<dm_store::Id>) -> Response {
    err(
        ErrorCode::Moved { actual },
        format!(
            "remote branch {branch} of {}/{} moved since this transfer started (now at {}): pull first",
            dot.namespace,
            dot.name,
            actual.map(|a| a.short()).unwrap_or_else(|| "nothing".into())
        ),
    )
}

/// A SetHead refused for uncommitted changes on the hub, said from the
/// hub's side: the pusher cannot fix it.
fn uncommitted_on_hub(dot: &DotName, branch: &str) -> Response {
    err(
        ErrorCode::Refused,
        format!(
            "branch {branch} of {ns}/{name} has uncommitted changes on the hub (made there, e.g. through a mount); \
             it takes pushes once the hub's admin commits them there (`dm commit --dot {ns}/{name} \
             --branch {branch} -m ...`) or discards them (`dm reset --hard HEAD` with {branch} checked out)",
            ns = dot.namespace,
            name = dot.name
        ),
    )
}

fn store_err(e: dm_store::Error) -> Response {
    match e {
        dm_store::Error::Corrupt(m) => {
            // The hub's own failures go to its log too: its admin is the
            // one to act (a damaged chunk failed clones without a word here).
            tracing::warn!("answering a request: {m}");
            err(ErrorCode::Corrupt, m)
        }
        dm_store::Error::Refused(m) => err(ErrorCode::Refused, m),
        e @ dm_store::Error::InvalidName { .. } => err(ErrorCode::BadRequest, e.to_string()),
        e if e.is_not_found() => err(ErrorCode::UnknownDot, e.to_string()),
        e => {
            tracing::warn!("answering a request: {e}");
            err(ErrorCode::Internal, e.to_string())
        }
    }
}

fn handle(s: &Session, req: Request) -> Response {
    match handle_inner(s, req) {
        Ok(r) | Err(r) => r,
    }
}

fn handle_inner(s: &Session, req: Request) -> std::result::Result<Response, Response> {
    let store = &s.store;
    match req {
        Request::Hello { .. } => Err(err(ErrorCode::BadRequest, "already authenticated")),
        Request::Branches { dot } => {
            let dot = authorize(s, &dot, true)?;
            let info = store.dot_info(&dot).map_err(store_err)?;
            let branches: Vec<_> = store
                .list_branches(&dot)
                .map_err(store_err)?
                .into_iter()
                .map(|b| (b.name, b.head))
                .collect();
            s.show(branches.iter().filter_map(|(_, h)| *h));
            s.readable
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(dot.clone())
                .or_insert(false);
            Ok(Response::Branches {
                block_size: info.block_size,
                branches,
            })
        }
        Request::Ancestry { dot, head } => {
            let dot = authorize(s, &dot, true)?;
            if !commit_of_dot(store, &dot, head).map_err(store_err)? {
                return Err(err(
                    ErrorCode::UnknownDot,
                    format!(
                        "no commit {} in dot {}/{} on the hub",
                        head.short(),
                        dot.namespace,
                        dot.name
                    ),
                ));
            }
            let ids = store.ancestry(Some(head)).map_err(store_err)?;
            s.show(ids.iter().copied());
            Ok(Response::Ids(ids))
        }
        Request::HasObjects { ids } => {
            if ids.len() > BATCH_IDS {
                return Err(err(ErrorCode::BadRequest, "too many ids in one query"));
            }
            // Present ones stay until this connection ends (the client
            // skips them and what they name), whatever a GC does meanwhile.
            let mut present = s.import.has_objects(&ids).map_err(store_err)?;
            // A commit this session may not name counts as absent: the
            // client then sends it, which shows it has it (see `proven`).
            // Tree nodes count as they are: their ids are never shown to
            // users, and a commit naming one must itself be sent.
            let unseen = |s: &Session| -> Vec<usize> {
                (0..ids.len())
                    .filter(|&i| present[i] && !s.may_name(&ids[i]))
                    .collect()
            };
            let mut unseen_now = unseen(s);
            if !unseen_now.is_empty() && s.show_readable_histories().map_err(store_err)? {
                unseen_now = unseen(s);
            }
            let unseen = unseen_now;
            let asked: Vec<dm_store::Id> = unseen.iter().map(|&i| ids[i]).collect();
            let commits = store.stored_commits(&asked).map_err(store_err)?;
            for (&i, is_commit) in unseen.iter().zip(commits) {
                if is_commit {
                    present[i] = false;
                }
            }
            Ok(Response::Bools(present))
        }
        Request::HasChunks { ids } => {
            if ids.len() > BATCH_IDS {
                return Err(err(ErrorCode::BadRequest, "too many ids in one query"));
            }
            Ok(Response::Bools(
                s.import.has_chunks(&ids).map_err(store_err)?,
            ))
        }
        Request::GetObjects { dot, ids } | Request::GetChunks { dot, ids }
            if ids.len() > BATCH_IDS =>
        {
            let _ = dot;
            Err(err(ErrorCode::BadRequest, "too many ids in one fetch"))
        }
        Request::GetObjects { dot, ids } => {
            authorize(s, &dot, true)?;
            s.check_shown("object", &ids)?;
            let mut out = Vec::new();
            let mut size = 0;
            for id in ids {
                let b = store.object_bytes(&id).map_err(store_err)?.ok_or_else(|| {
                    err(
                        ErrorCode::UnknownDot,
                        format!(
                            "no object {} on the hub any more: the branch being fetched was \
                             deleted or moved there meanwhile, and the hub's GC freed what it \
                             held; run the same command again (it fetches what is there now)",
                            id.short()
                        ),
                    )
                })?;
                let (objects, chunks) =
                    dm_store::transfer::object_refs(&id, &b).map_err(store_err)?;
                s.show(objects.into_iter().chain(chunks));
                size += b.len();
                out.push((id, b));
                if size >= BATCH_BYTES {
                    break;
                }
            }
            Ok(Response::Blobs(out))
        }
        Request::GetChunks { dot, ids } => {
            authorize(s, &dot, true)?;
            s.check_shown("chunk", &ids)?;
            let mut out = Vec::new();
            let mut size = 0;
            for id in ids {
                let b = store.chunk_bytes(&id).map_err(store_err)?.ok_or_else(|| {
                    err(
                        ErrorCode::UnknownDot,
                        format!(
                            "no chunk {} on the hub any more: the branch being fetched was \
                             deleted or moved there meanwhile, and the hub's GC freed what it \
                             held; run the same command again (it fetches what is there now)",
                            id.short()
                        ),
                    )
                })?;
                size += b.len();
                out.push((id, b));
                if size >= BATCH_BYTES {
                    break;
                }
            }
            Ok(Response::Blobs(out))
        }
        Request::PutObjects { dot, items } => {
            s.import.into_dot(&authorize(s, &dot, false)?);
            let mut new = 0;
            for (id, bytes) in items {
                let parents = dm_store::transfer::commit_parents(&id, &bytes).map_err(store_err)?;
                if let Some(parents) = &parents {
                    for p in parents {
                        s.check_may_name(&format!("commit {} names parent", id.short()), p)?;
                    }
                }
                if s.import.import_object(&id, &bytes).map_err(store_err)? {
                    new += 1;
                }
                if parents.is_some() {
                    s.proven
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(id);
                }
            }
            Ok(Response::Done { new })
        }
        Request::PutChunks { dot, items } => {
            s.import.into_dot(&authorize(s, &dot, false)?);
            let mut new = 0;
            for (id, bytes) in items {
                if s.import.import_chunk(&id, &bytes).map_err(store_err)? {
                    new += 1;
                }
            }
            // Found by a resumed push even if the hub crashes meanwhile.
            s.import.index_received().map_err(store_err)?;
            Ok(Response::Done { new })
        }
        Request::SetHead {
            dot,
            branch,
            expected,
            new,
            block_size,
        } => set_head(s, &dot, &branch, expected, new, block_size, None),
        Request::SetHeadKeeping {
            dot,
            branch,
            expected,
            new,
            block_size,
            keep_as,
        } => set_head(
            s,
            &dot,
            &branch,
            Some(expected),
            new,
            block_size,
            Some(&keep_as),
        ),
        Request::DeleteBranch { dot, branch, force } => delete_branch(s, &dot, &branch, force),
    }
}

/// `SetHead`, and `SetHeadKeeping` when `keep_as` names the branch that
/// keeps `expected`: created only once every check of the move passed, and
/// removed again if the move fails after all.
fn set_head(
    s: &Session,
    dot: &DotRef,
    branch: &str,
    expected: Option<dm_store::Id>,
    new: dm_store::Id,
    block_size: u32,
    keep_as: Option<&str>,
) -> std::result::Result<Response, Response> {
    let store = &s.store;
    let dot = authorize(s, dot, false)?;
    if !crate::proto::valid_block_size(block_size) {
        return Err(err(
            ErrorCode::BadRequest,
            format!("block size {block_size} is not a power of two between 4 KiB and 4 MiB"),
        ));
    }
    s.check_may_name("commit", &new)?;
    // A move that cannot happen (stale `expected`, uncommitted
    // changes) is answered before the hub stops any container for
    // it; the checks are made again, under the branch's lock, by
    // set_branch_head.
    let now = match store.branch_info(&dot, branch) {
        Ok(b) => Some(b.head),
        Err(e) if e.is_not_found() => None,
        Err(e) => return Err(store_err(e)),
    };
    if let Some(actual) = now.filter(|h| *h != expected) {
        return Err(moved_err(&dot, branch, actual));
    }
    if now.is_some() && store.has_uncommitted(&dot, branch).unwrap_or(false) {
        return Err(uncommitted_on_hub(&dot, branch));
    }
    if let (Some(keep), Some(old)) = (keep_as, expected) {
        dm_store::names::validate("branch", keep)
            .map_err(|e| err(ErrorCode::BadRequest, e.to_string()))?;
        match store
            .set_branch_head(&dot, keep, None, old, block_size)
            .map_err(store_err)?
        {
            SetHead::Updated => {}
            SetHead::Moved { .. } => {
                return Err(err(
                    ErrorCode::Refused,
                    format!(
                        "branch {keep} of {}/{} appeared on the hub while pushing, so the diverged work of {branch} was not stashed there and {branch} was not moved: push again",
                        dot.namespace, dot.name
                    ),
                ))
            }
        }
    }
    let moved = s
        .live
        .around_move(&dot, branch, &mut || {
            store.set_branch_head(&dot, branch, expected, new, block_size)
        })
        .map_err(|m| err(ErrorCode::Refused, m));
    let moved = match moved {
        Ok(Err(dm_store::Error::Refused(_)))
            if store.has_uncommitted(&dot, branch).unwrap_or(false) =>
        {
            Err(uncommitted_on_hub(&dot, branch))
        }
        Ok(r) => r.map_err(store_err),
        Err(e) => Err(e),
    };
    let moved = match moved {
        Ok(SetHead::Updated) => Ok(()),
        Ok(SetHead::Moved { actual }) => Err(moved_err(&dot, branch, actual)),
        Err(e) => Err(e),
    };
    if let Err(e) = moved {
        if let Some(keep) = keep_as {
            if let Err(d) = store.delete_branch(&dot, keep, true) {
                tracing::warn!("hub: removing branch {keep} of {dot} after a refused move: {d}");
            }
        }
        return Err(e);
    }
    s.import.moved_branch(&dot);
    tracing::info!(
        "hub: user {} moved branch {branch} of {dot} from {} to {}{}",
        s.user.name,
        expected.map_or_else(|| "nothing".to_string(), |e| e.short()),
        new.short(),
        keep_as.map_or_else(String::new, |k| format!(", keeping the old head on {k}"))
    );
    Ok(Response::Done { new: 1 })
}

/// `DeleteBranch` (`dm push --delete`).
fn delete_branch(
    s: &Session,
    dot: &DotRef,
    branch: &str,
    force: bool,
) -> std::result::Result<Response, Response> {
    let store = &s.store;
    let dot = authorize(s, dot, true)?;
    let (ns, name) = (&dot.namespace, &dot.name);
    let head = match store.branch_info(&dot, branch) {
        Ok(b) => b.head,
        Err(e) if e.is_not_found() => {
            return Err(err(
                ErrorCode::UnknownDot,
                format!("dot {ns}/{name} on the hub has no branch {branch}: nothing to delete"),
            ))
        }
        Err(e) => return Err(store_err(e)),
    };
    if store.dot_info(&dot).map_err(store_err)?.current_branch == branch {
        return Err(err(
            ErrorCode::Refused,
            format!(
                "branch {branch} is the current branch of {ns}/{name} on the hub (what the \
                 dot's mounts and containers there show, as a git remote's HEAD); it cannot be \
                 deleted from here: the hub's admin can check out another branch there first"
            ),
        ));
    }
    if store.has_uncommitted(&dot, branch).unwrap_or(false) {
        return Err(uncommitted_on_hub(&dot, branch));
    }
    if !force {
        if let Some((h, subject)) = store.unique_head(&dot, branch).map_err(store_err)? {
            return Err(err(
                ErrorCode::Refused,
                format!(
                    "branch {branch} of {ns}/{name} on the hub has commits no other branch there has \
                     (head {}, \"{subject}\"); deleting it destroys them there: pull it first to keep \
                     them, or add --force to delete it anyway",
                    h.short()
                ),
            ));
        }
    }
    s.live
        .around_delete(&dot, branch, &mut || {
            // What was checked above is what goes: a push that moved the
            // branch meanwhile is not deleted unseen.
            if store.branch_info(&dot, branch)?.head != head {
                return Err(dm_store::Error::Refused(format!(
                    "branch {branch} of {ns}/{name} moved on the hub while it was being deleted \
                     (someone pushed): nothing was deleted; look again (`dm pull`) and run the \
                     same command again if it should still go"
                )));
            }
            store.delete_branch(&dot, branch, true)
        })
        .map_err(|m| err(ErrorCode::Refused, m))?
        .map_err(store_err)?;
    tracing::info!(
        "hub: user {} deleted branch {branch} of {dot} (was at {})",
        s.user.name,
        head.map_or_else(|| "no commit".to_string(), |h| h.short())
    );
    Ok(Response::Ids(head.into_iter().collect()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn key_checks_run_at_most_the_bound_at_once() {
        let limit = Arc::new(Semaphore::new(MAX_CONCURRENT_KEY_CHECKS));
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..(MAX_CONCURRENT_KEY_CHECKS * 5) {
            let (limit, running, most) = (limit.clone(), running.clone(), most.clone());
            tasks.spawn(async move {
                bounded_blocking(&limit, move || {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    running.fetch_sub(1, Ordering::SeqCst);
                    i
                })
                .await
            });
        }
        let mut done = 0;
        while let Some(r) = tasks.join_next().await {
            r.unwrap().unwrap();
            done += 1;
        }
        assert_eq!(done, MAX_CONCURRENT_KEY_CHECKS * 5);
        let most = most.load(Ordering::SeqCst);
        assert!(
            most <= MAX_CONCURRENT_KEY_CHECKS,
            "{most} checks ran at once"
        );
        // A caller that gives up does not release the permit early.
        let (limit, running) = (Arc::new(Semaphore::new(1)), running.clone());
        let l = limit.clone();
        let (started, has_started) = tokio::sync::oneshot::channel();
        let waiter = tokio::spawn(async move {
            bounded_blocking(&l, move || {
                running.fetch_add(1, Ordering::SeqCst);
                let _ = started.send(());
                std::thread::sleep(std::time::Duration::from_millis(1000));
            })
            .await
        });
        has_started.await.expect("the check started");
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(limit.available_permits(), 0, "still checking");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while limit.available_permits() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "permit never given back"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}
