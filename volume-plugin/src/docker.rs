//! A minimal Docker Engine API client over the daemon's unix socket: list
//! the containers that use a dot, stop and start them.

use crate::protocol::DRIVER_NAME;
use dm_store::{DotName, VolumeName};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The Docker daemon's default socket.
pub const DEFAULT_DOCKER_SOCKET: &str = "/var/run/docker.sock";

/// How long `docker stop` waits before killing a container that sets no
/// stop timeout of its own (seconds; Docker's default).
pub const STOP_TIMEOUT_SECS: u64 = 10;

/// The longest dm waits for a container whose stop timeout is negative
/// (Docker then waits for it without end).
const STOP_WAIT_MAX: Duration = Duration::from_secs(3600);

/// Why a Docker Engine API call failed.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// No Docker daemon answers on the socket.
    #[error("cannot reach Docker at {socket}: {source}")]
    Unreachable {
        /// The socket tried.
        socket: PathBuf,
        /// The connection error.
        source: std::io::Error,
    },
    /// The call did not finish in time.
    #[error("Docker did not answer {what} within {secs} s")]
    Timeout {
        /// The call.
        what: String,
        /// The limit.
        secs: u64,
    },
    /// HTTP-level failure talking to Docker.
    #[error("talking to Docker ({what}): {reason}")]
    Transport {
        /// The call.
        what: String,
        /// What went wrong.
        reason: String,
    },
    /// Docker answered with an error status.
    #[error("Docker refused {what}: {status} {message}")]
    Status {
        /// The call.
        what: String,
        /// HTTP status.
        status: u16,
        /// Docker's message.
        message: String,
    },
    /// Docker's answer could not be read.
    #[error("unreadable answer from Docker to {what}: {reason}")]
    BadAnswer {
        /// The call.
        what: String,
        /// The parse error.
        reason: String,
    },
}

/// A mount of a container, as `GET /containers/json` lists it.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ContainerMount {
    /// `volume`, `bind`, `tmpfs`...
    #[serde(rename = "Type", default)]
    pub kind: String,
    /// The volume name (volumes only).
    #[serde(rename = "Name", default)]
    pub name: String,
    /// The volume driver (volumes only).
    #[serde(rename = "Driver", default)]
    pub driver: String,
    /// The path in the container.
    #[serde(rename = "Destination", default)]
    pub destination: String,
}

/// A container, as `GET /containers/json?all=1` lists it.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Container {
    /// The full id.
    #[serde(rename = "Id")]
    pub id: String,
    /// Names, each with a leading `/`.
    #[serde(rename = "Names", default)]
    pub names: Vec<String>,
    /// `running`, `exited`, `created`...
    #[serde(rename = "State", default)]
    pub state: String,
    /// Its mounts.
    #[serde(rename = "Mounts", default)]
    pub mounts: Vec<ContainerMount>,
}

impl Container {
    /// The container's name as `docker ps` shows it, with the leading `/`
    /// (the id's first 12 digits when it has none).
    pub fn name(&self) -> String {
        match self.names.first() {
            Some(n) => n.clone(),
            None => self.id.chars().take(12).collect(),
        }
    }

    /// True when the container is running.
    pub fn is_running(&self) -> bool {
        self.state == "running"
    }

    /// True when the container is paused (`docker pause`).
    pub fn is_paused(&self) -> bool {
        self.state == "paused"
    }

    /// True when the container holds its mounts: running, or paused (it
    /// goes on where it stopped once unpaused).
    pub fn is_up(&self) -> bool {
        self.is_running() || self.is_paused()
    }

    /// The dm volumes this container mounts (names that do not parse are skipped).
    pub fn dm_volumes(&self) -> Vec<VolumeName> {
        self.mounts
            .iter()
            .filter(|m| m.driver == DRIVER_NAME && (m.kind.is_empty() || m.kind == "volume"))
            .filter_map(|m| VolumeName::parse(&m.name).ok())
            .collect()
    }

    /// True when the container mounts any volume of `dot` (any branch or subdot).
    pub fn uses_dot(&self, dot: &DotName) -> bool {
        self.dm_volumes().iter().any(|v| &v.dot == dot)
    }

    /// True when the container mounts a volume of `dot` that follows the
    /// dot's current branch (not pinned with `@branch`).
    pub fn follows_dot(&self, dot: &DotName) -> bool {
        self.dm_volumes()
            .iter()
            .any(|v| &v.dot == dot && v.branch.is_none())
    }

    /// True when the container shows `branch` of `dot`, given the dot's
    /// current branch: pinned to it, or following the dot while it is current.
    pub fn shows_branch(&self, dot: &DotName, branch: &str, current: &str) -> bool {
        self.dm_volumes()
            .iter()
            .any(|v| v.shows_branch(dot, branch, current))
    }
}

#[derive(Deserialize)]
struct DockerMessage {
    #[serde(default)]
    message: String,
}

/// A client of the Docker Engine API.
#[derive(Clone, Debug)]
pub struct DockerClient {
    socket: PathBuf,
    /// Limit of the quick calls (listing).
    pub list_timeout: Duration,
}

impl DockerClient {
    /// A client of the daemon listening on `socket`.
    pub fn new(socket: &Path) -> DockerClient {
        DockerClient {
            socket: socket.to_path_buf(),
            list_timeout: Duration::from_secs(5),
        }
    }

    /// The socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// True when a Docker daemon might be there (the socket exists).
    /// Whether Docker's socket is there and this process may use it (a
    /// dm server run by another user than root has no Docker to drive).
    pub fn present(&self) -> bool {
        use std::os::unix::ffi::OsStrExt;
        let Ok(c) = std::ffi::CString::new(self.socket.as_os_str().as_bytes()) else {
            return false;
        };
        // SAFETY: c is a valid NUL-terminated path for the call.
        self.socket.exists() && unsafe { libc::access(c.as_ptr(), libc::W_OK) } == 0
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        what: &str,
        limit: Duration,
    ) -> Result<(u16, Bytes), DockerError> {
        let fut = async {
            let stream = tokio::net::UnixStream::connect(&self.socket)
                .await
                .map_err(|source| DockerError::Unreachable {
                    socket: self.socket.clone(),
                    source,
                })?;
            let transport = |e: hyper::Error| DockerError::Transport {
                what: what.to_string(),
                reason: e.to_string(),
            };
            let io = hyper_util::rt::TokioIo::new(stream);
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(transport)?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let req = Request::builder()
                .method(method)
                .uri(path)
                .header("host", "docker")
                .body(Full::new(Bytes::new()))
                .map_err(|e| DockerError::Transport {
                    what: what.to_string(),
                    reason: e.to_string(),
                })?;
            let resp = sender.send_request(req).await.map_err(transport)?;
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(transport)?
                .to_bytes();
            Ok((status, body))
        };
        match tokio::time::timeout(limit, fut).await {
            Ok(r) => r,
            Err(_) => Err(DockerError::Timeout {
                what: what.to_string(),
                secs: limit.as_secs(),
            }),
        }
    }

    fn check(what: &str, status: u16, body: &Bytes) -> Result<(), DockerError> {
        // 304: already stopped / already started.
        if (200..300).contains(&status) || status == 304 {
            return Ok(());
        }
        let message = serde_json::from_slice::<DockerMessage>(body)
            .map(|m| m.message)
            .unwrap_or_else(|_| String::from_utf8_lossy(body).trim().to_string());
        Err(DockerError::Status {
            what: what.to_string(),
            status,
            message,
        })
    }

    /// Every container (running or not).
    pub async fn containers(&self) -> Result<Vec<Container>, DockerError> {
        let what = "listing containers";
        let (status, body) = self
            .call(
                Method::GET,
                "/containers/json?all=1",
                what,
                self.list_timeout,
            )
            .await?;
        Self::check(what, status, &body)?;
        serde_json::from_slice(&body).map_err(|e| DockerError::BadAnswer {
            what: what.to_string(),
            reason: e.to_string(),
        })
    }

    /// The containers that mount any volume of `dot`.
    pub async fn containers_using(&self, dot: &DotName) -> Result<Vec<Container>, DockerError> {
        Ok(self
            .containers()
            .await?
            .into_iter()
            .filter(|c| c.uses_dot(dot))
            .collect())
    }

    /// Stops a container as `docker stop` does: SIGTERM (or its own stop
    /// signal), then SIGKILL after its own stop timeout (`--stop-timeout`,
    /// else [`STOP_TIMEOUT_SECS`]), so a database gets the time its
    /// container asks for to shut down cleanly.
    pub async fn stop(&self, id: &str) -> Result<(), DockerError> {
        let what = format!("stopping container {}", short(id));
        let path = format!("/containers/{}/stop", encode(id));
        let timeout = self.details(id).await.ok().and_then(|d| d.stop_timeout);
        let (status, body) = self
            .call(Method::POST, &path, &what, stop_wait(timeout))
            .await?;
        Self::check(&what, status, &body)
    }

    /// Starts a container.
    pub async fn start(&self, id: &str) -> Result<(), DockerError> {
        let what = format!("starting container {}", short(id));
        let path = format!("/containers/{}/start", encode(id));
        let (status, body) = self
            .call(Method::POST, &path, &what, Duration::from_secs(60))
            .await?;
        Self::check(&what, status, &body)
    }
}

#[derive(Deserialize)]
struct Inspect {
    #[serde(rename = "Config", default)]
    config: InspectConfig,
    #[serde(rename = "HostConfig", default)]
    host_config: InspectHostConfig,
    #[serde(rename = "State", default)]
    state: InspectState,
}

#[derive(Default, Deserialize)]
struct InspectConfig {
    #[serde(rename = "StopTimeout", default)]
    stop_timeout: Option<i64>,
}

#[derive(Default, Deserialize)]
struct InspectHostConfig {
    #[serde(rename = "AutoRemove", default)]
    auto_remove: bool,
    #[serde(rename = "RestartPolicy", default)]
    restart_policy: InspectRestartPolicy,
}

#[derive(Default, Deserialize)]
struct InspectRestartPolicy {
    #[serde(rename = "Name", default)]
    name: String,
}

#[derive(Default, Deserialize)]
struct InspectState {
    #[serde(rename = "Error", default)]
    error: String,
}

/// What `docker inspect` says of a container that dm needs.
#[derive(Clone, Debug, Default)]
pub struct ContainerDetails {
    /// Started with `--rm`: Docker deletes it when it stops.
    pub auto_remove: bool,
    /// `--restart` policy: "", "no", "always", "unless-stopped", "on-failure".
    pub restart_policy: String,
    /// Why Docker last failed to start it ("" when it did not fail).
    pub error: String,
    /// `--stop-timeout` in seconds, if it set one (negative: no limit).
    pub stop_timeout: Option<i64>,
}

impl ContainerDetails {
    /// Docker is to keep it running (a `--restart` policy other than no).
    pub fn restarts(&self) -> bool {
        !matches!(self.restart_policy.as_str(), "" | "no")
    }
}

impl DockerClient {
    /// `docker inspect` of a container: what dm needs of it.
    pub async fn details(&self, id: &str) -> Result<ContainerDetails, DockerError> {
        let what = format!("inspecting container {}", short(id));
        let path = format!("/containers/{}/json", encode(id));
        let (status, body) = self
            .call(Method::GET, &path, &what, self.list_timeout)
            .await?;
        Self::check(&what, status, &body)?;
        let i: Inspect = serde_json::from_slice(&body).map_err(|e| DockerError::BadAnswer {
            what: what.clone(),
            reason: e.to_string(),
        })?;
        Ok(ContainerDetails {
            auto_remove: i.host_config.auto_remove,
            restart_policy: i.host_config.restart_policy.name,
            error: i.state.error,
            stop_timeout: i.config.stop_timeout,
        })
    }

    /// True when the container was started with `--rm` (Docker deletes it
    /// when it stops, so it cannot be stopped and started again).
    pub async fn auto_removes(&self, id: &str) -> Result<bool, DockerError> {
        Ok(self.details(id).await?.auto_remove)
    }

    /// Restarts a container (`docker restart`: a `--rm` container is kept;
    /// its own stop timeout applies, as for [`DockerClient::stop`]).
    pub async fn restart(&self, id: &str) -> Result<(), DockerError> {
        let what = format!("restarting container {}", short(id));
        let path = format!("/containers/{}/restart", encode(id));
        let timeout = self.details(id).await.ok().and_then(|d| d.stop_timeout);
        let limit = stop_wait(timeout) + Duration::from_secs(60);
        let (status, body) = self.call(Method::POST, &path, &what, limit).await?;
        Self::check(&what, status, &body)
    }
}

/// How long to wait for Docker to stop a container whose stop timeout is
/// `timeout` (seconds; `None`: Docker's default; negative: no limit).
fn stop_wait(timeout: Option<i64>) -> Duration {
    // Past the container's own stop timeout, for Docker to answer (30 s;
    // `DM_DOCKER_STOP_SLACK_SECS` sets it, for tests).
    let slack = Duration::from_secs(
        std::env::var("DM_DOCKER_STOP_SLACK_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(30),
    );
    match timeout {
        None => Duration::from_secs(STOP_TIMEOUT_SECS) + slack,
        Some(t) => u64::try_from(t)
            .map(|t| Duration::from_secs(t) + slack)
            .unwrap_or(STOP_WAIT_MAX)
            .min(STOP_WAIT_MAX),
    }
}

fn short(id: &str) -> String {
    id.chars().take(12).collect()
}

/// Percent-encodes everything but unreserved characters (ids are hex, but
/// never trust input in a path).
fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(mounts: &[(&str, &str)]) -> Container {
        Container {
            id: "0123456789abcdef".into(),
            names: vec!["/web".into()],
            state: "running".into(),
            mounts: mounts
                .iter()
                .map(|(driver, name)| ContainerMount {
                    kind: "volume".into(),
                    name: name.to_string(),
                    driver: driver.to_string(),
                    destination: "/data".into(),
                })
                .collect(),
        }
    }

    #[test]
    fn matching() {
        let myapp = DotName::parse("myapp").unwrap();
        let other = DotName::parse("ns/myapp").unwrap();
        let c = container(&[("dm", "myapp.orders-db"), ("local", "myapp")]);
        assert!(c.uses_dot(&myapp) && c.follows_dot(&myapp));
        assert!(!c.uses_dot(&other));
        assert!(c.shows_branch(&myapp, "master", "master"));
        assert!(!c.shows_branch(&myapp, "dev", "master"));
        let pinned = container(&[("dm", "myapp@master")]);
        assert!(pinned.uses_dot(&myapp) && !pinned.follows_dot(&myapp));
        assert!(pinned.shows_branch(&myapp, "master", "other"));
        let local = container(&[("local", "myapp")]);
        assert!(!local.uses_dot(&myapp));
        let garbage = container(&[("dm", "a b c")]);
        assert!(garbage.dm_volumes().is_empty());
        assert_eq!(c.name(), "/web");
    }

    #[test]
    fn parses_docker_listing() {
        let json = r#"[{"Id":"abc","Names":["/x"],"State":"exited","Mounts":[{"Type":"volume","Name":"myapp@master","Source":"/s","Destination":"/data","Driver":"dm","Mode":"","RW":true,"Propagation":""}],"Labels":{}}]"#;
        let v: Vec<Container> = serde_json::from_str(json).unwrap();
        assert_eq!(v[0].dm_volumes()[0].branch.as_deref(), Some("master"));
        assert!(!v[0].is_running());
        assert_eq!(encode("a/b?"), "a%2Fb%3F");
    }

    #[tokio::test]
    async fn missing_socket_fails_fast() {
        let c = DockerClient::new(Path::new("/nonexistent/docker.sock"));
        let t = std::time::Instant::now();
        let e = c.containers().await.unwrap_err();
        assert!(matches!(e, DockerError::Unreachable { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(2));
    }
}
