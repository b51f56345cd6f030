//! The Docker integration of `dm server`: the `dm` volume plugin (the
//! [`dm_volume_plugin::Backend`] over the store and the [`MountManager`]),
//! its socket, and the containers around checkout and reset.
//!
//! Docker volumes are dots: `VolumeDriver.Create` makes the dot (and the
//! subdot directory) and remembers the name in `DATA_DIR/docker-volumes.json`
//! so that `docker volume ls` lists it and a restarted server serves it again.
//! `Mount` mounts the volume at the server's default path through the mount
//! table (an unpinned volume follows the dot's current branch) and counts the
//! mount requests; the last `Unmount` unmounts what the plugin mounted.

use crate::mounts::MountManager;
use crate::server::error::ApiError;
use dm_store::{DotName, Store, VolumeName};
use dm_volume_plugin::protocol::{Backend, PluginError, Volume, VolumeInfo};
use dm_volume_plugin::{Container, DockerClient};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Mount requests (container mount ids) of one mount path.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct MountRefs {
    /// One entry per `Mount` not yet undone by an `Unmount`. An id can be
    /// there more than once: Docker mounts a running container's volumes
    /// again with the same id for `docker cp` and unmounts them after.
    ids: Vec<String>,
    /// True when the plugin made the mount (so the last Unmount undoes it).
    owned: bool,
}

/// The file name of the volume table in the data dir.
pub const VOLUME_TABLE: &str = "docker-volumes.json";

/// `docker-volumes.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct State {
    /// Volume names as Docker spells them.
    volumes: BTreeSet<String>,
    /// The driver options a volume was created with (`-o block-size=8K`),
    /// by volume name, for volumes created with some: a dot that
    /// `dm dot delete` removed is made again with them when Docker mounts
    /// the volume it still knows (Docker does not call Create again).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    options: BTreeMap<String, BTreeMap<String, String>>,
    /// Mount path -> requests.
    mounts: BTreeMap<PathBuf, MountRefs>,
    /// Containers a checkout, reset, pull or push stopped and has not
    /// started again yet (id -> dot): the server stopped or died between
    /// the two, and they stayed down with no one told. The next start
    /// starts them (see [`DockerIntegration::restart_stale_containers`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    stopped_for_switch: BTreeMap<String, String>,
    /// Paths mounted for Docker since this server started (not saved).
    #[serde(skip)]
    mounted_since_start: BTreeSet<PathBuf>,
}

/// The Docker side of the server.
pub struct DockerIntegration {
    store: Arc<Store>,
    mounts: Arc<MountManager>,
    docker: DockerClient,
    state_file: PathBuf,
    state: Mutex<State>,
    /// Dots whose containers are being stopped, switched and started
    /// ([`DockerIntegration::around`]): a Mount of one of their volumes
    /// waits, so that a container started meanwhile gets the new branch
    /// instead of being switched under its feet. With each, the ids of the
    /// containers whose stops are under way: one of those that exited
    /// meanwhile and that Docker restarts (its restart policy) holds its
    /// stop until its Mount answers, so that Mount goes ahead (on the
    /// state before the switch; the stop then stops it and the switch
    /// starts it again). Waiting, each held the other for the stop's 40 s,
    /// and the stop then hit the restarted container, left down.
    switching: Mutex<BTreeMap<DotName, BTreeSet<String>>>,
    switched: Condvar,
    /// The server is stopping (SIGTERM, Ctrl-C): a switch in progress
    /// leaves the containers it stopped stopped (see
    /// [`DockerIntegration::server_stopping`]).
    stopping: std::sync::atomic::AtomicBool,
}

/// How long a Mount waits for a switch of its dot to end: under Docker's
/// own timeout for a plugin call (2 minutes), so that the user reads dm's
/// message rather than Docker's "context deadline exceeded".
const SWITCH_WAIT: Duration = Duration::from_secs(100);

/// Marks a dot as switching until dropped (see [`DockerIntegration::switching`]).
struct Switching<'a> {
    docker: &'a DockerIntegration,
    dot: DotName,
}

impl Drop for Switching<'_> {
    fn drop(&mut self) {
        self.docker.switching_lock().remove(&self.dot);
        self.docker.switched.notify_all();
    }
}

fn backend_err(e: impl Into<ApiError>) -> PluginError {
    PluginError::Backend(e.into().message)
}

impl DockerIntegration {
    /// Loads the volume table from `state_file`.
    pub fn new(
        store: Arc<Store>,
        mounts: Arc<MountManager>,
        docker_socket: &Path,
        state_file: &Path,
    ) -> DockerIntegration {
        let state = match std::fs::read(state_file) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!("ignoring unreadable {}: {e}", state_file.display());
                State::default()
            }),
            Err(_) => State::default(),
        };
        DockerIntegration {
            store,
            mounts,
            docker: DockerClient::new(docker_socket),
            state_file: state_file.to_path_buf(),
            state: Mutex::new(state),
            switching: Mutex::new(BTreeMap::new()),
            switched: Condvar::new(),
            stopping: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The options `volume`, or else another remembered volume of its dot
    /// (`app` for `app@master`), was created with.
    fn options_of_dot(&self, volume: &Volume) -> BTreeMap<String, String> {
        let st = self.lock();
        st.options
            .get(&volume.name)
            .or_else(|| {
                st.options.iter().find_map(|(n, o)| {
                    VolumeName::parse(n)
                        .is_ok_and(|v| v.dot == volume.parsed.dot)
                        .then_some(o)
                })
            })
            .cloned()
            .unwrap_or_default()
    }

    fn switching_lock(&self) -> MutexGuard<'_, BTreeMap<DotName, BTreeSet<String>>> {
        self.switching.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks `dot` as switching (waiting for another switch of it first).
    fn begin_switch(&self, dot: &DotName) -> Switching<'_> {
        let mut set = self.switching_lock();
        while set.contains_key(dot) {
            set = self.switched.wait(set).unwrap_or_else(|p| p.into_inner());
        }
        set.insert(dot.clone(), BTreeSet::new());
        Switching {
            docker: self,
            dot: dot.clone(),
        }
    }

    /// Waits until no switch of `dot` runs (up to [`SWITCH_WAIT`]), unless
    /// the Mount (at `path`) is that of a container the switch is stopping
    /// and Docker is restarting (see [`DockerIntegration::switching`]).
    fn wait_for_switch(&self, dot: &DotName, path: &Path) -> Result<(), PluginError> {
        let deadline = Instant::now() + SWITCH_WAIT;
        let mut set = self.switching_lock();
        while let Some(stopping) = set.get(dot) {
            if !stopping.is_empty() {
                let stopping = stopping.clone();
                drop(set);
                if let Some(c) = self.restarting_among(&stopping, path) {
                    tracing::info!(
                        "docker: container {} restarts while dm stops it for a switch of {dot}: \
                         its mount goes ahead, for the stop",
                        c.name()
                    );
                    return Ok(());
                }
                set = self.switching_lock();
                if !set.contains_key(dot) {
                    break;
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(PluginError::Backend(format!(
                    "dot {dot} is being switched to another branch or its branch moved (dm checkout, reset or pull) for over {} s; start the container again when that is done",
                    SWITCH_WAIT.as_secs()
                )));
            }
            // Looked at again each second while stops are under way.
            set = self
                .switched
                .wait_timeout(set, left.min(Duration::from_secs(1)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    /// A container of `ids` that Docker is restarting (restart policy)
    /// and that mounts `path`.
    fn restarting_among(&self, ids: &BTreeSet<String>, path: &Path) -> Option<Container> {
        self.all_containers().into_iter().find(|c| {
            c.state == "restarting"
                && ids.contains(&c.id)
                && c.dm_volumes()
                    .iter()
                    .any(|v| self.mounts.default_path(v) == path)
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self, state: &State) {
        let res = serde_json::to_vec_pretty(state)
            .map_err(std::io::Error::other)
            .and_then(|bytes| {
                let tmp = self.state_file.with_extension("json.tmp");
                std::fs::write(&tmp, bytes)?;
                std::fs::rename(&tmp, &self.state_file)
            });
        if let Err(e) = res {
            tracing::error!("saving {}: {e}", self.state_file.display());
        }
    }

    /// The branch a volume shows now.
    fn branch_of(&self, v: &VolumeName) -> Result<String, PluginError> {
        let info = self.store.dot_info(&v.dot).map_err(backend_err)?;
        match &v.branch {
            Some(b) => {
                self.store.branch_info(&v.dot, b).map_err(|e| {
                    PluginError::Backend(format!(
                        "{}: {} (a pinned @branch must exist: {})",
                        v,
                        ApiError::from(e).message,
                        how_to_make_branch(&v.dot, b, true)
                    ))
                })?;
                Ok(b.clone())
            }
            None => Ok(info.current_branch),
        }
    }

    fn mounted_paths(&self) -> BTreeSet<PathBuf> {
        self.mounts
            .list()
            .into_iter()
            .map(|m| PathBuf::from(m.path))
            .collect()
    }

    fn info(&self, name: &str, v: &VolumeName, mounted: &BTreeSet<PathBuf>) -> VolumeInfo {
        let path = self.mounts.default_path(v);
        let mut status = BTreeMap::new();
        status.insert("dot".to_string(), v.dot.to_string().into());
        status.insert("subdot".to_string(), v.subdot.clone().into());
        status.insert("pinned".to_string(), v.branch.is_some().into());
        match self.branch_of(v) {
            Ok(b) => status.insert("branch".to_string(), b.into()),
            Err(e) if self.store.dot_info(&v.dot).is_err_and(|e| e.is_not_found()) => {
                let again = match &v.branch {
                    Some(b) if b != "master" => format!(
                        "make the dot and its branch {b} again to use it (`dm init`, `dm branch {b}`)"
                    ),
                    _ => "a container that mounts the volume makes it again".to_string(),
                };
                let why = format!(
                    "{e}: deleted (`dm dot delete`, or with its anonymous volume); {again}, \
                     `docker volume rm {name}` forgets it"
                );
                status.insert("error".to_string(), why.into())
            }
            Err(e) => status.insert("error".to_string(), e.to_string().into()),
        };
        let created_at = self.store.dot_info(&v.dot).ok().and_then(|d| {
            time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(d.created_ns))
                .ok()?
                .format(&time::format_description::well_known::Rfc3339)
                .ok()
        });
        VolumeInfo {
            name: name.to_string(),
            mountpoint: mounted.contains(&path).then(|| path.display().to_string()),
            created_at,
            status,
        }
    }

    /// Runs `mount` (a `dm mount`, which answers with the mount's path) so
    /// that a mount the plugin made for containers becomes the user's too:
    /// the containers' last Unmount leaves it in place.
    pub fn user_mount(
        &self,
        mount: impl FnOnce() -> Result<crate::api::MountView, ApiError>,
    ) -> Result<crate::api::MountView, ApiError> {
        let mut st = self.lock();
        let view = mount()?;
        if let Some(refs) = st.mounts.get_mut(Path::new(&view.path)) {
            if refs.owned {
                refs.owned = false;
                self.save(&st);
            }
        }
        Ok(view)
    }

    /// The running or paused containers (names) whose dm volumes are
    /// mounted at `path`.
    pub fn containers_on(&self, path: &Path) -> Vec<String> {
        self.up_on(path)
            .into_iter()
            .map(|(c, _)| c.name().trim_start_matches('/').to_string())
            .collect()
    }

    /// How many mount points of running or paused containers show `path`
    /// (a container may mount one volume at several points: `-v app:/a
    /// -v app:/b`, each its own Mount with its own id).
    fn mount_points_on(&self, path: &Path) -> usize {
        self.up_on(path).iter().map(|(_, n)| n).sum()
    }

    /// The running or paused containers that mount `path`, each with how
    /// many of its mount points do. Docker is not asked when the plugin
    /// has no Mount of `path`.
    fn up_on(&self, path: &Path) -> Vec<(Container, usize)> {
        if self
            .lock()
            .mounts
            .get(path)
            .is_none_or(|r| r.ids.is_empty())
        {
            return Vec::new();
        }
        self.all_containers()
            .into_iter()
            .filter(|c| c.is_up())
            .map(|c| {
                let n = c
                    .dm_volumes()
                    .iter()
                    .filter(|v| self.mounts.default_path(v) == path)
                    .count();
                (c, n)
            })
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// True when `dot` has only its first branch and no commit on it.
    fn never_committed(&self, dot: &DotName) -> bool {
        self.store
            .list_branches(dot)
            .is_ok_and(|bs| bs.len() == 1 && bs[0].head.is_none())
    }

    /// Containers (from the Docker Engine API) using `dot`. Empty when
    /// Docker is not there; a Docker error is logged.
    pub fn containers_using(&self, dot: &DotName) -> Vec<Container> {
        self.all_containers()
            .into_iter()
            .filter(|c| c.uses_dot(dot))
            .collect()
    }

    /// [`Self::containers_using`] for a change that takes the dot's files
    /// from under its containers (checkout, reset, pull, push, delete):
    /// refused, naming the reason, when Docker is there but does not answer
    /// while Docker has volumes of `dot` mounted (Mount without Unmount).
    /// A Docker that hangs or died leaves its containers running (their
    /// shims go on); taken as none, a checkout switched under a writer
    /// and a delete removed a dot a container was writing to.
    pub fn containers_using_checked(&self, dot: &DotName) -> Result<Vec<Container>, ApiError> {
        match self.try_all_containers() {
            Ok(all) => Ok(all.into_iter().filter(|c| c.uses_dot(dot)).collect()),
            Err(e) => {
                let in_use = self.mounted_for_docker(dot);
                if in_use.is_empty() {
                    tracing::warn!("{e} (no volume of dot {dot} is mounted for Docker: going on)");
                    return Ok(Vec::new());
                }
                Err(ApiError::conflict(format!(
                    "dot {dot}: {e}, and Docker has {} of this dot mounted for containers ({}), \
                     which may still run; nothing was changed. Retry once Docker answers \
                     (`docker ps`)",
                    match in_use.len() {
                        1 => "a volume".to_string(),
                        n => format!("{n} volumes"),
                    },
                    in_use.join(", ")
                )))
            }
        }
    }

    /// Volumes of `dot` that Docker has mounted (a Mount not yet undone by
    /// an Unmount), as Docker names them.
    fn mounted_for_docker(&self, dot: &DotName) -> Vec<String> {
        let st = self.lock();
        st.volumes
            .iter()
            .filter(|name| {
                VolumeName::parse(name).is_ok_and(|v| {
                    &v.dot == dot
                        && st
                            .mounts
                            .get(&self.mounts.default_path(&v))
                            .is_some_and(|r| !r.ids.is_empty())
                })
            })
            .cloned()
            .collect()
    }

    /// Every container, or none when Docker is absent or fails (logged),
    /// each with only the dm volumes of this server (its volume table):
    /// another dm server on the host may serve volumes of the same names.
    pub fn all_containers(&self) -> Vec<Container> {
        self.try_all_containers().unwrap_or_else(|e| {
            tracing::warn!("{e}");
            Vec::new()
        })
    }

    /// [`Self::all_containers`], with Docker's failure to answer as an
    /// error (none when Docker is absent).
    fn try_all_containers(&self) -> Result<Vec<Container>, String> {
        // No volume of ours in Docker's hands (`--no-plugin`, or Docker
        // never asked): no container can use our mounts, and Docker is not
        // asked (a Docker restarting stalled resets 5 s per question).
        let known = self.lock().volumes.clone();
        if known.is_empty() || !self.docker.present() {
            return Ok(Vec::new());
        }
        let mut all = block_on(self.docker.containers()).map_err(|e| e.to_string())?;
        for c in &mut all {
            c.mounts
                .retain(|m| m.driver != dm_volume_plugin::DRIVER_NAME || known.contains(&m.name));
        }
        Ok(all)
    }

    /// Runs `f` (a checkout: the dot's current branch changes) between
    /// stopping the running containers that follow `dot` (unpinned volumes,
    /// subdots included) and starting them again. Containers pinned with
    /// `@branch` keep running. The containers are started again also when
    /// `f` fails.
    ///
    /// `pre` runs first, once no other switch of the dot runs (they are
    /// one at a time): its answer, when it has one (the branch is current
    /// already, or cannot be checked out), is the switch's, and nothing is
    /// stopped. Checked before waiting, a checkout of the branch that was
    /// current while another checkout ran said "done" and did nothing.
    /// The server is stopping: a checkout or reset in progress does not
    /// start the containers it stopped again. Started, they ran on mounts
    /// the stop removed a moment later (a database exited on "Transport
    /// endpoint is not connected", one step from an entrypoint's initdb).
    pub fn server_stopping(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether [`Self::server_stopping`] was called.
    fn is_stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn around_switch<T>(
        &self,
        dot: &DotName,
        pre: impl FnOnce() -> Result<Option<T>, ApiError>,
        f: impl FnOnce() -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        self.around(dot, |c| c.follows_dot(dot), true, pre, f)
    }

    /// Runs `f` (a reset: what `branch` of `dot` holds changes) between
    /// stopping the running containers that show the branch (pinned to it,
    /// or following the dot while it is the current branch) and starting
    /// them again, as [`Self::around_switch`] does.
    pub fn around_branch_change<T>(
        &self,
        dot: &DotName,
        branch: &str,
        current: &str,
        f: impl FnOnce() -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        self.around(
            dot,
            |c| c.shows_branch(dot, branch, current),
            false,
            || Ok(None),
            f,
        )
    }

    /// Refuses a switch or branch change that would have to stop the
    /// containers in `using` (those it affects) when one of them cannot
    /// be stopped safely: paused, or started with `--rm`. Nothing is
    /// stopped.
    fn refuse_blockers(
        &self,
        dot: &DotName,
        using: &[Container],
        pin_helps: bool,
    ) -> Result<(), ApiError> {
        // A checkout switches the dot; a reset, pull or push moves a branch.
        let what = if pin_helps {
            "the switch"
        } else {
            "the branch's move"
        };
        // A paused container cannot stop; switched under it, it would wake
        // up to files that changed (and EIO on the ones it has open).
        let paused: Vec<String> = using
            .iter()
            .filter(|c| c.is_paused())
            .map(|c| c.name())
            .collect();
        if !paused.is_empty() {
            return Err(ApiError::conflict(format!(
                "dot {dot}: {} paused and cannot be stopped for {what}; nothing was changed. \
                 Unpause (`docker unpause`) or stop {}, then retry",
                paused.join(", "),
                if paused.len() == 1 { "it" } else { "them" }
            )));
        }
        // Docker deletes a `--rm` container when it stops: refuse rather
        // than lose it (nothing is stopped or switched yet).
        let auto_removed: Vec<String> = using
            .iter()
            .filter(|c| c.is_running())
            .filter(|c| block_on(self.docker.auto_removes(&c.id)).unwrap_or(false))
            .map(|c| c.name())
            .collect();
        if !auto_removed.is_empty() {
            let (noun, them, were) = match auto_removed.len() {
                1 => ("container", "it", "was"),
                _ => ("containers", "them", "were"),
            };
            let pin = if pin_helps {
                format!(", or pin the volume to a branch (`{}@BRANCH`)", dot.name)
            } else {
                String::new()
            };
            return Err(ApiError::conflict(format!(
                "dot {dot}: {noun} {} {were} started with --rm, and stopping {them} for {what} would delete {them}; \
                 nothing was changed. Stop {them} yourself (`docker stop`), run {them} without --rm{pin}, then retry",
                auto_removed.join(", "),
            )));
        }
        Ok(())
    }

    /// What [`Self::around_branch_change`] would find, asked ahead (a pull
    /// asks before its download): refused as it would refuse (a paused or
    /// `--rm` container shows the branch), else the names of the running
    /// containers it would stop.
    pub fn ahead_of_branch_change(
        &self,
        dot: &DotName,
        branch: &str,
        current: &str,
    ) -> Result<Vec<String>, ApiError> {
        let using: Vec<Container> = self
            .containers_using_checked(dot)?
            .into_iter()
            .filter(|c| c.shows_branch(dot, branch, current))
            .collect();
        self.refuse_blockers(dot, &using, false)?;
        Ok(using
            .iter()
            .filter(|c| c.is_running())
            .map(|c| c.name().trim_start_matches('/').to_string())
            .collect())
    }

    /// `pin_helps`: whether pinning the volume to a branch would keep a
    /// container out of it (a checkout; not a reset of that branch).
    fn around<T>(
        &self,
        dot: &DotName,
        affected: impl Fn(&Container) -> bool,
        pin_helps: bool,
        pre: impl FnOnce() -> Result<Option<T>, ApiError>,
        f: impl FnOnce() -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        // Containers started from here on wait in Mount until the switch is
        // done, then get the new state.
        let switching = self.begin_switch(dot);
        if let Some(done) = pre()? {
            return Ok(done);
        }
        let using: Vec<Container> = self
            .containers_using_checked(dot)?
            .into_iter()
            .filter(|c| affected(c))
            .collect();
        self.refuse_blockers(dot, &using, pin_helps)?;
        let followers: Vec<Container> = using.into_iter().filter(|c| c.is_running()).collect();
        if let Some(ids) = self.switching_lock().get_mut(dot) {
            ids.extend(followers.iter().map(|c| c.id.clone()));
        }
        if !followers.is_empty() {
            let mut st = self.lock();
            for c in &followers {
                st.stopped_for_switch.insert(c.id.clone(), dot.to_string());
            }
            self.save(&st);
        }
        // All at once: each may take its own stop timeout.
        let results = block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for (i, c) in followers.iter().enumerate() {
                tracing::info!("dot {dot}: stopping container {}", c.name());
                let (docker, id) = (self.docker.clone(), c.id.clone());
                set.spawn(async move { (i, docker.stop(&id).await) });
            }
            let mut results = Vec::new();
            while let Some(joined) = set.join_next().await {
                // A stop task that panicked: its container's state is unknown.
                results.push(joined.unwrap_or_else(|e| {
                    let e = dm_volume_plugin::docker::DockerError::Transport {
                        what: "stopping a container".into(),
                        reason: e.to_string(),
                    };
                    (usize::MAX, Err(e))
                }));
            }
            // Those stopped are started again in the order Docker listed them.
            results.sort_by_key(|(i, _)| *i);
            results
        });
        // Stopped: from here on their starts wait for the switch too.
        if let Some(ids) = self.switching_lock().get_mut(dot) {
            ids.clear();
        }
        let mut stopped: Vec<&Container> = Vec::new();
        let mut stop_err = None;
        // Those left down stay recorded, for the next start.
        let mut left_down = BTreeSet::new();
        for (i, result) in results {
            match (followers.get(i), result) {
                (Some(c), Ok(())) => stopped.push(c),
                (c, Err(e)) => {
                    // The server stops under the call: Docker may go on
                    // stopping it.
                    if let Some(c) = c.filter(|_| self.is_stopping()) {
                        left_down.insert(c.id.clone());
                    }
                    // Docker may still stop it (a `docker cp` into it held
                    // the stop up past dm's wait: it stopped a moment
                    // later, and stayed down although nothing switched).
                    let pending =
                        matches!(e, dm_volume_plugin::docker::DockerError::Timeout { .. });
                    let later = match c.filter(|_| pending && !self.is_stopping()) {
                        Some(c) => {
                            self.start_once_stopped(dot, c);
                            format!(
                                "; Docker may still stop {}: dm starts it again once it has",
                                c.name().trim_start_matches('/')
                            )
                        }
                        None => String::new(),
                    };
                    stop_err.get_or_insert(ApiError::internal(format!(
                        "{e}; nothing was switched (the containers stopped were started again{later})"
                    )));
                }
                (None, Ok(())) => {}
            }
        }
        let out = match stop_err {
            Some(e) => Err(e),
            None => f(),
        };
        // Mounts go on (the containers started below mount again).
        drop(switching);
        let mut start_errs = Vec::new();
        // Left for the next start of the server (it is stopping).
        let mut next_start = Vec::new();
        if self.is_stopping() {
            for c in stopped.drain(..) {
                tracing::warn!(
                    "dot {dot}: the server is stopping: container {} left stopped; the server starts it again when it next starts",
                    c.name()
                );
                next_start.push(c.name());
                left_down.insert(c.id.clone());
            }
        }
        for c in stopped {
            tracing::info!("dot {dot}: starting container {}", c.name());
            match block_on(self.docker.start(&c.id)) {
                Ok(()) => {}
                // Removed meanwhile (`docker rm -f` racing the switch): nothing to start.
                Err(dm_volume_plugin::docker::DockerError::Status {
                    status, message, ..
                }) if status == 404
                    || (status == 409 && message.contains("marked for removal")) =>
                {
                    tracing::info!("dot {dot}: container {} was removed meanwhile", c.name());
                }
                // The server stops under the call (its runtime goes).
                Err(e) if self.is_stopping() => {
                    tracing::warn!(
                        "dot {dot}: the server is stopping: starting container {} failed ({e}); the server starts it again when it next starts",
                        c.name()
                    );
                    next_start.push(c.name());
                    left_down.insert(c.id.clone());
                }
                Err(e) => {
                    tracing::error!("{e}");
                    start_errs.push(format!("{} ({e})", c.name()));
                }
            }
        }
        if !followers.is_empty() {
            let mut st = self.lock();
            for c in &followers {
                if !left_down.contains(&c.id) {
                    st.stopped_for_switch.remove(&c.id);
                }
            }
            self.save(&st);
        }
        let next_start = match next_start.len() {
            0 => String::new(),
            n => format!(
                "the dm server is stopping (its mounts go with it), so container{} {} stay{} \
                 stopped until the next `dm server` starts {}",
                if n == 1 { "" } else { "s" },
                next_start.join(", "),
                if n == 1 { "s" } else { "" },
                if n == 1 { "it" } else { "them" },
            ),
        };
        match out {
            Ok(v) if start_errs.is_empty() && next_start.is_empty() => Ok(v),
            Ok(_) if start_errs.is_empty() => {
                Err(ApiError::internal(format!("switched, but {next_start}")))
            }
            Ok(_) => Err(ApiError::internal(format!(
                "switched, but could not start again: {}; start them with `docker start`{}",
                start_errs.join(", "),
                if next_start.is_empty() {
                    String::new()
                } else {
                    format!("; {next_start}")
                }
            ))),
            Err(e) => Err(e),
        }
    }

    /// For a container whose stop Docker did not finish within dm's wait,
    /// in a switch given up for it: Docker goes on stopping it, so it is
    /// started again once it has stopped (looked at every 2 s, for up to
    /// 10 minutes), as the switch that was not made left the others.
    fn start_once_stopped(&self, dot: &DotName, c: &Container) {
        let (docker, id, name, dot) = (
            self.docker.clone(),
            c.id.clone(),
            c.name().trim_start_matches('/').to_string(),
            dot.to_string(),
        );
        std::thread::spawn(move || {
            for _ in 0..300 {
                std::thread::sleep(Duration::from_secs(2));
                let Ok(all) = block_on(docker.containers()) else {
                    continue;
                };
                let Some(now) = all.iter().find(|x| x.id == id) else {
                    return; // removed
                };
                if now.state != "exited" {
                    continue;
                }
                match block_on(docker.start(&id)) {
                    Ok(()) => tracing::info!(
                        "dot {dot}: container {name}, which Docker stopped after the switch that \
                         waited for it was given up, was started again"
                    ),
                    Err(e) => tracing::error!(
                        "dot {dot}: container {name} stopped after the switch that waited for it \
                         was given up; starting it again failed: {e}; start it with `docker start`"
                    ),
                }
                return;
            }
            tracing::warn!(
                "dot {dot}: container {name}: Docker had not stopped it 10 minutes after the switch \
                 that waited for it was given up; left as it is"
            );
        });
    }
}

/// Mounts the FUSE control file system (`fusectl`) at
/// /sys/fs/fuse/connections if it is not there (many hosts do not mount it),
/// so that connections can be aborted.
fn ensure_fusectl() {
    let dir = std::path::Path::new("/sys/fs/fuse/connections");
    let mounted = std::fs::read_to_string("/proc/self/mounts")
        .map(|m| m.lines().any(|l| l.split(' ').nth(2) == Some("fusectl")))
        .unwrap_or(false);
    if mounted || !dir.is_dir() {
        return;
    }
    if let Err(e) = nix::mount::mount(
        Some("fusectl"),
        dir,
        Some("fusectl"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    ) {
        tracing::warn!("mounting fusectl at {}: {e}", dir.display());
    }
}

impl DockerIntegration {
    /// At shutdown: aborts the FUSE connection of every mount that
    /// containers still use (they see ENOTCONN until the server is back and
    /// restarts them; see [`Self::restart_stale_containers`]).
    pub fn abort_in_use_mounts(&self) {
        use std::os::unix::fs::MetadataExt;
        let paths: Vec<PathBuf> = self
            .lock()
            .mounts
            .iter()
            .filter(|(_, r)| !r.ids.is_empty())
            .map(|(p, _)| p.clone())
            .collect();
        if !paths.is_empty() {
            ensure_fusectl();
        }
        for p in paths {
            let Ok(meta) = std::fs::metadata(&p) else {
                continue;
            };
            let minor = libc::minor(meta.dev());
            let abort = PathBuf::from(format!("/sys/fs/fuse/connections/{minor}/abort"));
            match std::fs::write(&abort, b"1") {
                Ok(()) => tracing::info!(
                    "aborted the FUSE connection of {} (in use by containers)",
                    p.display()
                ),
                Err(e) => tracing::warn!("aborting {}: {e}", abort.display()),
            }
        }
    }

    /// At startup: forgets the mount requests of paths no running (or
    /// paused) container uses (their Unmount came while no server ran:
    /// `docker stop`, or a container that exited when its mount died),
    /// unmounting what the plugin mounted for them, so that they neither
    /// pin the mount nor block `docker volume rm`. Running containers keep
    /// theirs, and so do paths Docker mounted since this server started (a
    /// container starting meanwhile is not running yet).
    pub fn forget_unmounted_requests(&self) {
        if !self.docker.present() {
            return;
        }
        let containers = match block_on(self.docker.containers()) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("{e}; mount requests are kept as they are");
                return;
            }
        };
        let in_use: BTreeSet<PathBuf> = containers
            .iter()
            .filter(|c| c.is_up())
            .flat_map(|c| c.dm_volumes())
            .map(|v| self.mounts.default_path(&v))
            .collect();
        let mut st = self.lock();
        let unused: Vec<PathBuf> = st
            .mounts
            .keys()
            .filter(|p| !in_use.contains(*p) && !st.mounted_since_start.contains(*p))
            .cloned()
            .collect();
        if unused.is_empty() {
            return;
        }
        let mounted = self.mounted_paths();
        for p in unused {
            let Some(refs) = st.mounts.remove(&p) else {
                continue;
            };
            tracing::info!(
                "docker: {} had {} mount request(s) whose Unmount came while no server ran; no running or paused container uses it",
                p.display(),
                refs.ids.len()
            );
            if refs.owned && mounted.contains(&p) {
                if let Err(e) = self.mounts.unmount(&p) {
                    tracing::warn!("docker: {}", e.message);
                }
            }
        }
        self.save(&st);
    }

    /// At startup: running (or paused) containers that use a volume of this
    /// server were started against the previous server's mounts, which died
    /// with it. Restart them so that they get live mounts again (a paused
    /// one runs afterwards: unpaused on its dead mount, it failed at its
    /// first file access, a database with a PANIC).
    pub fn restart_stale_containers(&self) {
        if self.lock().volumes.is_empty() {
            return;
        }
        let recorded = self.lock().stopped_for_switch.clone();
        // Docker down or hung (dm started before it, at boot): the
        // containers left down for a switch wait for it; dropped from the
        // record, they stayed down for good.
        let mut told = false;
        let all = loop {
            match self.try_all_containers() {
                Ok(all) => break all,
                Err(e) if recorded.is_empty() => {
                    tracing::warn!("{e}");
                    return;
                }
                Err(e) => {
                    if !told {
                        tracing::warn!(
                            "{e}; the containers the previous server stopped for a switch ({}) \
                             are started once Docker answers",
                            recorded
                                .keys()
                                .map(|id| id.chars().take(12).collect::<String>())
                                .collect::<Vec<_>>()
                                .join(", ")
                        );
                        told = true;
                    }
                    for _ in 0..5 {
                        if self.is_stopping() {
                            return;
                        }
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            }
        };
        if told {
            tracing::info!("Docker answers again");
        }
        // all_containers() keeps only the volumes of this server's table.
        let ours: Vec<Container> = all
            .into_iter()
            .filter(|c| !c.dm_volumes().is_empty())
            .collect();
        // Running on a mount that died with the previous server; or stopped
        // although Docker is to keep it running, because Docker's restart
        // (a database exits when its files go away) found the server down
        // and gave up. Not one that never ran ("created": its first start
        // failed for want of a server; the user was told and may have run
        // another in its place).
        // Or stopped by a checkout, reset, pull or push that the previous
        // server did not live to finish (see `State::stopped_for_switch`).
        let mut stale = Vec::new();
        for c in ours {
            let given_up = !c.is_up()
                && c.state != "created"
                && block_on(self.docker.details(&c.id)).is_ok_and(|d| {
                    d.restarts() && d.error.contains(crate::server::plugin_proxy::SERVER_DOWN)
                });
            let left_down = !c.is_up() && c.state == "exited" && recorded.contains_key(&c.id);
            if c.is_up() || given_up || left_down {
                stale.push(c);
            }
        }
        // All at once: one that ignores SIGTERM takes Docker's full stop
        // timeout, and the others should not wait on dead mounts meanwhile.
        // A restart, not a stop and a start: Docker usually keeps a `--rm`
        // container through a restart (a stop always deletes it).
        block_on(async {
            let mut restarts = tokio::task::JoinSet::new();
            for c in stale {
                match recorded.get(&c.id).filter(|_| !c.is_up()) {
                    Some(dot) => tracing::info!(
                        "starting container {} again: the previous server stopped it for a change \
                         of dot {dot}'s branch (checkout, reset, pull or push) and stopped itself \
                         before starting it again",
                        c.name()
                    ),
                    None => tracing::info!(
                        "restarting container {}: its dm mount died with the previous server{}",
                        c.name(),
                        if c.is_running() {
                            ""
                        } else if c.is_paused() {
                            " (it was paused: it runs after the restart)"
                        } else {
                            " (Docker gave up restarting it while no server ran)"
                        }
                    ),
                }
                let docker = self.docker.clone();
                restarts.spawn(async move { (docker.restart(&c.id).await, c.name()) });
            }
            while let Some(done) = restarts.join_next().await {
                match done {
                    Ok((Ok(()), _)) => {}
                    Ok((Err(e), name)) => {
                        tracing::error!("{e}; restart {name} with `docker restart`")
                    }
                    Err(e) => tracing::error!("restarting a container: {e}"),
                }
            }
        });
        if !recorded.is_empty() {
            let mut st = self.lock();
            st.stopped_for_switch
                .retain(|id, _| !recorded.contains_key(id));
            self.save(&st);
        }
    }
}

/// How to make branch `b` of `dot` for a pinned volume (making the dot
/// first unless it exists), or why there can be no such branch.
fn how_to_make_branch(dot: &DotName, b: &str, dot_exists: bool) -> String {
    match dm_store::names::validate_new("branch", b) {
        // `dm branch`, not `checkout -b`: a switch stops and starts every
        // container that follows the dot.
        Ok(()) if dot_exists => {
            format!("create it with `dm --dot {dot} branch {b}`, or use the volume without @{b}")
        }
        Ok(()) => format!(
            "create the dot, then the branch (`dm init {dot}`, then `dm --dot {dot} branch {b}`), \
             or use the volume without @{b}"
        ),
        Err(e) => format!("{e}; name an existing branch after @, or none"),
    }
}

/// True for the names Docker gives anonymous volumes (64 hex digits).
fn is_anonymous(name: &str) -> bool {
    name.len() == 64
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The block size asked for with `docker volume create -o block-size=8K`
/// (or a Compose file's `driver_opts`); any other option is refused.
fn volume_block_size(opts: &BTreeMap<String, String>) -> Result<Option<u32>, PluginError> {
    let mut size = None;
    for (k, v) in opts {
        match k.as_str() {
            "block-size" | "blocksize" => {
                size = Some(crate::cli::parse_block_size(v).map_err(PluginError::Backend)?)
            }
            _ => {
                return Err(PluginError::Backend(format!(
                    "unknown option {k:?} for the dm volume driver: the only option is block-size (e.g. -o block-size=8K)"
                )))
            }
        }
    }
    Ok(size)
}

/// Runs a future from blocking code (the handlers' `spawn_blocking` threads).
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    match tokio::runtime::Handle::try_current() {
        Ok(h) => h.block_on(f),
        Err(_) => match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(f),
            Err(e) => panic!("cannot start a runtime: {e}"),
        },
    }
}

impl Backend for DockerIntegration {
    fn create(&self, volume: &Volume, opts: &BTreeMap<String, String>) -> Result<(), PluginError> {
        let v = &volume.parsed;
        let block_size = volume_block_size(opts)?;
        match self.store.dot_info(&v.dot) {
            Ok(info) => {
                if let Some(b) = block_size.filter(|b| *b != info.block_size) {
                    return Err(PluginError::Backend(format!(
                        "{v}: dot {} exists with block size {}; block-size={} applies only to a new dot",
                        v.dot,
                        crate::format::human_size(info.block_size.into()),
                        crate::format::human_size(b.into()),
                    )));
                }
            }
            Err(e) if e.is_not_found() => {
                // A new dot has master only: refused before anything is made.
                if let Some(b) = v
                    .branch
                    .as_deref()
                    .filter(|b| *b != dm_store::names::MASTER)
                {
                    return Err(PluginError::Backend(format!(
                        "{v}: there is no dot {}, and a new dot has only branch {}: {}",
                        v.dot,
                        dm_store::names::MASTER,
                        how_to_make_branch(&v.dot, b, false)
                    )));
                }
                // Made again after `dm dot delete`: as the volumes that
                // name it were created.
                let block_size = match block_size {
                    Some(b) => Some(b),
                    None => volume_block_size(&self.options_of_dot(volume)).unwrap_or(None),
                };
                match self.store.create_dot(&v.dot, block_size) {
                    Ok(_) => tracing::info!("docker: created dot {}", v.dot),
                    // Created meanwhile by another request.
                    Err(dm_store::Error::AlreadyExists { .. }) => {}
                    Err(e) => return Err(backend_err(e)),
                }
            }
            Err(e) => return Err(backend_err(e)),
        }
        let branch = self.branch_of(v)?;
        let fs = self.store.branch_fs(&v.dot, &branch).map_err(backend_err)?;
        fs.subdot_ino(&v.subdot, true).map_err(backend_err)?;
        let mut st = self.lock();
        if st.volumes.insert(volume.name.clone()) {
            tracing::info!("docker: volume {} created", volume.name);
        }
        if !opts.is_empty() {
            st.options.insert(volume.name.clone(), opts.clone());
        }
        self.save(&st);
        Ok(())
    }

    fn remove(&self, volume: &Volume) -> Result<(), PluginError> {
        let path = self.mounts.default_path(&volume.parsed);
        // Docker asks to remove only volumes no container references; if
        // no container mounts it indeed, the mount requests still recorded
        // are ones whose Unmount never came (Docker died meanwhile), and
        // would refuse the removal forever. Other names of the same mount
        // (`myapp` and `myapp.__default__`) count as uses too.
        // Docker removes only a name no container uses, so containers that
        // use the mount do so under another of its names: it stays theirs.
        // None when Docker cannot tell.
        let in_use: Option<bool> = match self.docker.present() {
            true => block_on(self.docker.containers()).ok().map(|cs| {
                cs.iter().any(|c| {
                    c.dm_volumes()
                        .iter()
                        .any(|v| self.mounts.default_path(v) == path)
                })
            }),
            false => None,
        };
        let unused = in_use == Some(false);
        let used_under_other_names = in_use == Some(true);
        let mut st = self.lock();
        if let Some(r) = st.mounts.get(&path).filter(|r| unused && !r.ids.is_empty()) {
            tracing::warn!(
                "docker: volume {} had {} mount request(s) Docker never released; no container uses it, so they are dropped",
                volume.name,
                r.ids.len()
            );
            let owned = r.owned;
            st.mounts.remove(&path);
            if owned && self.mounted_paths().contains(&path) {
                if let Err(e) = self.mounts.unmount(&path) {
                    tracing::warn!("docker: {}", e.message);
                }
            }
        }
        if let Some(r) = st.mounts.get(&path) {
            if !r.ids.is_empty() && !used_under_other_names {
                return Err(PluginError::Backend(format!(
                    "volume {} is in use ({} mount{}); stop its containers first",
                    volume.name,
                    r.ids.len(),
                    if r.ids.len() == 1 { "" } else { "s" }
                )));
            }
        }
        // Docker's own name for an image's VOLUME or `-v /path`: removed
        // with its container (`--rm`, `docker rm -v`), as Docker removes its
        // local anonymous volumes. Kept once committed to.
        let dot = &volume.parsed.dot;
        let anonymous =
            is_anonymous(&volume.name) && !used_under_other_names && self.never_committed(dot);
        // Not while its dot is in use otherwise (asked only of an anonymous
        // one): mounted elsewhere (`dm mount` of it), its mount here busy
        // (a file open, a shell working in it), or named by another volume
        // Docker remembers (`V@master` of a stopped container): it was
        // deleted under them.
        let kept_for = anonymous
            .then(|| {
                let mut users: Vec<String> = Vec::new();
                // The plugin's mount path is the one `dm mount DOT` uses
                // too: mounted and not the plugin's, it is the user's.
                let plugins = st.mounts.get(&path).is_some_and(|r| r.owned);
                for m in self.mounts.list_dot(dot) {
                    if Path::new(&m.path) != path || !plugins {
                        users.push(m.path);
                    } else if self.mounts.is_busy(&path) {
                        users.push(format!("{} (a process uses it)", m.path));
                    }
                }
                users.extend(
                    st.volumes
                        .iter()
                        .filter(|n| **n != volume.name)
                        .filter(|n| VolumeName::parse(n).is_ok_and(|v| v.dot == *dot))
                        .map(|n| format!("Docker volume {n}")),
                );
                users
            })
            .filter(|users| !users.is_empty())
            .map(|users| users.join(", "));
        let anonymous = anonymous && kept_for.is_none();
        if anonymous {
            self.mounts
                .unmount_dot_then(dot, || match self.store.delete_dot(dot) {
                    Ok(()) | Err(dm_store::Error::NotFound { .. }) => Ok(()),
                    Err(e) => Err(e.into()),
                })
                .map_err(|e| PluginError::Backend(e.message))?;
        }
        st.volumes.remove(&volume.name);
        st.options.remove(&volume.name);
        self.save(&st);
        if anonymous {
            tracing::info!(
                "docker: anonymous volume {} removed with its dot",
                volume.name
            );
        } else if let Some(users) = kept_for {
            tracing::warn!(
                "docker: anonymous volume {} removed; its dot {dot} is kept, in use at {users} \
                 (`dm dot delete {dot}` deletes it)",
                volume.name
            );
        } else if self.store.dot_info(dot).is_err_and(|e| e.is_not_found()) {
            tracing::info!(
                "docker: volume {} removed (its dot {dot} was deleted before)",
                volume.name
            );
        } else {
            tracing::info!(
                "docker: volume {} removed; dot {} and its data are kept (`dm dot delete` deletes them)",
                volume.name,
                volume.parsed.dot
            );
        }
        Ok(())
    }

    fn mount(&self, volume: &Volume, id: &str) -> Result<PathBuf, PluginError> {
        let v = &volume.parsed;
        // Docker still knows a volume whose dot `dm dot delete` removed, and
        // mounts it without creating it again: make it as Create would.
        if self.store.dot_info(&v.dot).is_err_and(|e| e.is_not_found()) {
            self.create(volume, &BTreeMap::new())?;
        }
        let path = self.mounts.default_path(v);
        self.wait_for_switch(&v.dot, &path)?;
        self.branch_of(v)?;
        // An id counted already: `docker cp` of a running container mounts
        // again with its id (then each mount point of a running container
        // has a request at least); otherwise it is a container started
        // again after an Unmount that never reached dm (no server ran), and
        // that old request, one more than the running mount points, is
        // this one. Counted by containers, a container that mounts the
        // volume twice had one request too many: a `docker cp` into it
        // took both away, and the mount went from under it.
        let counted = self
            .lock()
            .mounts
            .get(&path)
            .filter(|r| r.ids.iter().any(|x| x == id))
            .map_or(0, |r| r.ids.len());
        let again = counted > 0 && counted > self.mount_points_on(&path);
        let mut st = self.lock();
        let was_mounted = self.mounted_paths().contains(&path);
        let view = self
            .mounts
            .mount(&v.to_string(), None)
            .map_err(backend_err)?;
        st.volumes.insert(volume.name.clone());
        st.mounted_since_start.insert(PathBuf::from(&view.path));
        let refs = st.mounts.entry(PathBuf::from(&view.path)).or_default();
        if refs.ids.is_empty() && !was_mounted {
            refs.owned = true;
        }
        // Counted per request, not per ID: `docker cp` on a running
        // container mounts again with the container's ID, then unmounts once.
        if !again {
            refs.ids.push(id.to_string());
        }
        self.save(&st);
        tracing::info!(
            "docker: mounted {} (branch {}) at {} for {}",
            volume.name,
            view.branch,
            view.path,
            id
        );
        Ok(PathBuf::from(view.path))
    }

    fn unmount(&self, volume: &Volume, id: &str) -> Result<(), PluginError> {
        let path = self.mounts.default_path(&volume.parsed);
        let mut st = self.lock();
        let Some(refs) = st.mounts.get_mut(&path) else {
            return Ok(());
        };
        if let Some(i) = refs.ids.iter().position(|x| x == id) {
            refs.ids.remove(i);
        }
        if refs.ids.is_empty() {
            let owned = refs.owned;
            let mounted = owned && self.mounted_paths().contains(&path);
            if mounted && self.mounts.is_busy(&path) {
                // The containers are gone, but a process on the host uses
                // the path (a shell there, a file open). Detached, its
                // mount would keep the branch it showed, out of dm's sight:
                // a checkout would not see its open files, and its writes
                // would go to the branch left behind. Left mounted (and
                // the plugin's, for the next Unmount), it follows the dot.
                tracing::info!(
                    "docker: the containers of {} are gone, but another process uses {}; it stays mounted",
                    volume.name,
                    path.display()
                );
                self.save(&st);
                return Ok(());
            }
            st.mounts.remove(&path);
            if mounted {
                if let Err(e) = self.mounts.unmount(&path) {
                    // Keep serving: the mount stays and is reused next time.
                    tracing::warn!("docker: {}", e.message);
                }
            }
        }
        self.save(&st);
        Ok(())
    }

    fn path(&self, volume: &Volume) -> Result<Option<PathBuf>, PluginError> {
        let path = self.mounts.default_path(&volume.parsed);
        Ok(self.mounted_paths().contains(&path).then_some(path))
    }

    fn get(&self, volume: &Volume) -> Result<VolumeInfo, PluginError> {
        if !self.lock().volumes.contains(&volume.name) {
            return Err(PluginError::NoSuchVolume(volume.name.clone()));
        }
        let mounted = self.mounted_paths();
        Ok(self.info(&volume.name, &volume.parsed, &mounted))
    }

    /// Every remembered volume, those whose dot `dm dot delete` removed
    /// too (as `inspect` shows them: hidden from `ls` alone, a cleanup by
    /// `docker volume ls -q | xargs docker volume rm` missed them).
    fn list(&self) -> Result<Vec<VolumeInfo>, PluginError> {
        let names: Vec<String> = self.lock().volumes.iter().cloned().collect();
        let mounted = self.mounted_paths();
        Ok(names
            .iter()
            .filter_map(|n| VolumeName::parse(n).ok().map(|v| (n, v)))
            .map(|(n, v)| self.info(n, &v, &mounted))
            .collect())
    }
}

/// Serves the plugin protocol on `listener` until `shutdown` resolves.
pub async fn serve_plugin(
    docker: Arc<DockerIntegration>,
    listener: tokio::net::UnixListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::body::Bytes;
    use axum::extract::State;
    use axum::http::{header, StatusCode, Uri};
    use axum::response::IntoResponse;

    async fn plugin(
        State(d): State<Arc<DockerIntegration>>,
        uri: Uri,
        body: Bytes,
    ) -> axum::response::Response {
        let path = uri.path().to_string();
        let started = std::time::Instant::now();
        let p = path.clone();
        let resp = tokio::task::spawn_blocking(move || {
            dm_volume_plugin::handle(d.as_ref() as &dyn Backend, &p, &body)
        })
        .await
        .unwrap_or_else(|e| {
            dm_volume_plugin::protocol::Response::error(
                500,
                &PluginError::Backend(format!("dm server internal error: {e}")),
            )
        });
        tracing::debug!(
            "plugin {path} -> {} in {:?}",
            resp.status,
            started.elapsed()
        );
        let status = StatusCode::from_u16(resp.status).unwrap_or(StatusCode::OK);
        (
            status,
            [(
                header::CONTENT_TYPE,
                dm_volume_plugin::protocol::CONTENT_TYPE,
            )],
            resp.body,
        )
            .into_response()
    }

    let app = axum::Router::new().fallback(plugin).with_state(docker);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// The running plugin server.
pub struct PluginHandle {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
    watchdog: tokio::task::JoinHandle<()>,
    docker: Arc<DockerIntegration>,
}

/// How often the server checks that its plugin proxy still answers.
const PROXY_CHECK: Duration = Duration::from_secs(5);

impl PluginHandle {
    /// Stops serving (the proxy stays and answers that the server is down),
    /// then aborts the FUSE connections of mounts that running containers
    /// still use: their bind mounts keep the connection alive, so unmounting
    /// would otherwise wait for the containers forever.
    pub async fn stop(self) {
        // The proxy stays up to answer that the server is down.
        self.watchdog.abort();
        let _ = self.stop.send(());
        let _ = self.task.await;
        let docker = self.docker;
        let _ = tokio::task::spawn_blocking(move || docker.abort_in_use_mounts()).await;
    }
}

/// Serves the plugin on `DATA_DIR/plugin.sock` and makes sure a plugin
/// proxy (`dm plugin-proxy`, a separate process that outlives this server)
/// listens on `plugin_socket` and forwards there. Docker only ever talks to
/// the proxy, so when this server is down Docker gets an immediate error
/// instead of retrying a dead socket for 15 to 30 s per call.
pub async fn start_plugin(
    docker: Arc<DockerIntegration>,
    plugin_socket: &Path,
    data_dir: &Path,
) -> Option<PluginHandle> {
    let internal = data_dir.join("plugin.sock");
    let _ = std::fs::remove_file(&internal);
    let listener = match tokio::net::UnixListener::bind(&internal) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(
                "cannot serve the Docker plugin on {}: {e}; Docker volumes will not work",
                internal.display()
            );
            return None;
        }
    };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let docker2 = docker.clone();
    let docker3 = docker.clone();
    let task = tokio::spawn(async move {
        let shutdown = async {
            let _ = rx.await;
        };
        if let Err(e) = serve_plugin(docker, listener, shutdown).await {
            tracing::error!("serving the Docker plugin: {e}");
        }
    });
    let (plugin_socket, internal2, data_dir) = (
        plugin_socket.to_path_buf(),
        internal.clone(),
        data_dir.to_path_buf(),
    );
    let (ps, is, dd) = (plugin_socket.clone(), internal2.clone(), data_dir.clone());
    let res = tokio::task::spawn_blocking(move || {
        crate::server::plugin_proxy::ensure(&plugin_socket, &internal2, &data_dir)
    })
    .await;
    match res {
        Ok(Ok(msg)) => {
            tracing::info!("{msg}");
            tokio::task::spawn_blocking(move || {
                docker2.forget_unmounted_requests();
                docker2.restart_stale_containers();
            });
        }
        Ok(Err(e)) => {
            // No plugin for this server (another one keeps the proxy, or
            // none could be started): its watchdog must not take the
            // socket later either.
            tracing::error!("Docker volume plugin: {e:#}");
            let _ = tx.send(());
            let _ = task.await;
            let _ = std::fs::remove_file(&internal);
            return None;
        }
        Err(e) => tracing::error!("Docker volume plugin: {e}"),
    }
    // A proxy killed meanwhile (OOM killer, kill -9) would leave every dm
    // volume failing until this server restarts: start another. One that
    // another server took over (told to exit, then started anew by it)
    // forwarded there for good, even once that server stopped: taken
    // back once nothing answers there, and said so while something does.
    let watchdog = tokio::spawn(async move {
        let mut told = false;
        loop {
            tokio::time::sleep(PROXY_CHECK).await;
            let (ps, is, dd) = (ps.clone(), is.clone(), dd.clone());
            told = tokio::task::spawn_blocking(move || {
                use crate::server::plugin_proxy::{ensure, live_other_upstream, upstream_of};
                let why = if std::os::unix::net::UnixStream::connect(&ps).is_err() {
                    "stopped answering; starting another"
                } else if let Some(other) = live_other_upstream(&ps, &is) {
                    if !told {
                        tracing::warn!(
                            "the Docker plugin proxy on {} forwards to another dm server ({}): \
                             Docker's dm volumes are that server's, not this one's, until it stops",
                            ps.display(),
                            other.display()
                        );
                    }
                    return true;
                } else if upstream_of(&ps).is_some_and(|u| u != is) {
                    "forwards to a dm server that stopped; taking it back"
                } else {
                    return false;
                };
                tracing::warn!("the Docker plugin proxy on {} {why}", ps.display());
                match ensure(&ps, &is, &dd) {
                    Ok(msg) => tracing::info!("{msg}"),
                    Err(e) => tracing::error!("Docker volume plugin: {e:#}"),
                }
                false
            })
            .await
            .unwrap_or(told);
        }
    });
    Some(PluginHandle {
        stop: tx,
        task,
        watchdog,
        docker: docker3,
    })
}
