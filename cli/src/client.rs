//! HTTP+JSON client of the local API over the server's unix socket.

use crate::api::ErrorBody;
use anyhow::{anyhow, bail, Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// A connection-per-request client of `dm server`.
pub struct Client {
    socket: PathBuf,
    rt: tokio::runtime::Runtime,
}

impl Client {
    /// A client for the server listening on `socket`.
    pub fn new(socket: &Path) -> Result<Client> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the client runtime")?;
        Ok(Client {
            socket: socket.to_path_buf(),
            rt,
        })
    }

    /// `GET path`.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call(Method::GET, path, None)
    }

    /// `POST path` with a JSON body.
    pub fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        let body = serde_json::to_vec(body).context("encoding the request")?;
        self.call(Method::POST, path, Some(body))
    }

    /// `DELETE path`.
    pub fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call(Method::DELETE, path, None)
    }

    fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T> {
        let (status, bytes) = self.rt.block_on(self.send(method, path, body))?;
        if status.is_success() {
            serde_json::from_slice(&bytes).with_context(|| {
                format!(
                    "the server sent an answer this client cannot read ({} bytes); are client and server the same version? (`dm version`)",
                    bytes.len()
                )
            })
        } else {
            match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(e) => Err(anyhow!(e.error)),
                Err(_) => Err(anyhow!(
                    "server error {}: {}",
                    status,
                    String::from_utf8_lossy(&bytes).trim()
                )),
            }
        }
    }

    /// Where a server of this user started with another XDG_RUNTIME_DIR
    /// (or none) keeps its socket, as a hint for a message; empty if none.
    fn elsewhere(&self) -> String {
        crate::paths::other_default_socket()
            .filter(|o| *o != self.socket)
            .map(|o| {
                format!(
                    "; a socket of a server of yours is at {} (started with another XDG_RUNTIME_DIR): `export DM_SOCKET={}`",
                    o.display(),
                    o.display()
                )
            })
            .unwrap_or_default()
    }

    /// The error of a socket nothing listens on.
    fn unreachable(&self, e: std::io::Error) -> anyhow::Error {
        anyhow::Error::new(e).context(format!(
            "cannot reach the dm server at {}: is `dm server` running? (start it, or point --server / DM_SOCKET at its socket){}",
            self.socket.display(),
            self.elsewhere()
        ))
    }

    /// The error of a socket in a directory this user may not enter: no
    /// server of another user's, but (after `su` without `-`) another
    /// user's XDG_RUNTIME_DIR.
    fn closed_directory(&self) -> anyhow::Error {
        let dir = self.socket.parent().unwrap_or(Path::new("/"));
        anyhow!(
            "cannot reach the dm server socket {}: you may not enter {}{}; point --server / DM_SOCKET \
             at the socket of your own `dm server`{}",
            self.socket.display(),
            dir.display(),
            self.xdg_hint(),
            self.elsewhere()
        )
    }

    /// When the socket is under another user's XDG_RUNTIME_DIR: the likely
    /// reason, for a message; empty otherwise.
    fn xdg_hint(&self) -> String {
        crate::paths::foreign_runtime_dir_hint(&self.socket)
            .map(|h| format!("; {h}"))
            .unwrap_or_default()
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes)> {
        let mut told = false;
        let stream = loop {
            match tokio::net::UnixStream::connect(&self.socket).await {
                Ok(s) => break s,
                Err(e)
                    if e.kind() == std::io::ErrorKind::PermissionDenied
                        && std::fs::symlink_metadata(&self.socket).is_err_and(|m| {
                            m.kind() == std::io::ErrorKind::PermissionDenied
                        }) =>
                {
                    return Err(self.closed_directory())
                }
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => bail!(
                    "you may not use the dm server socket {} (it belongs to another user, whose \
                     server it is{}): run your own `dm server`, or point --server / DM_SOCKET at yours{}",
                    self.socket.display(),
                    self.xdg_hint(),
                    self.elsewhere()
                ),
                Err(e) => {
                    // A server still opening its store or restoring its
                    // mounts: waited for (as long as it lives).
                    if let Some(pid) = crate::paths::starting_server(&self.socket) {
                        if !told {
                            eprintln!(
                                "dm: the dm server (pid {pid}) is starting (opening the store, \
                                 restoring its mounts); waiting for it (Ctrl-C stops waiting)"
                            );
                            told = true;
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                    return Err(self.unreachable(e));
                }
            }
        };
        // Only a server of this user or root is told anything (API keys
        // travel over this socket): a socket another user put where this
        // user's server keeps it (/tmp/dm-UID) is not.
        let me = nix::unistd::geteuid().as_raw();
        let cred = stream
            .peer_cred()
            .with_context(|| format!("asking who listens on {}", self.socket.display()))?;
        let (peer, server_pid) = (cred.uid(), cred.pid());
        if peer != me && peer != 0 {
            bail!(
                "the process listening on {} runs as uid {peer}, not as you (uid {me}) or root: \
                 not talking to it (it could be another user's server posing as yours). Remove \
                 that socket if it is not yours, or point --server / DM_SOCKET at your own server",
                self.socket.display()
            );
        }
        let io = hyper_util::rt::TokioIo::new(stream);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .context("talking to the dm server")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(method.clone())
            .uri(path)
            .header("host", "localhost");
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .context("building the request")?;
        let answer = sender.send_request(req);
        tokio::pin!(answer);
        // A server that takes long is busy (a gc, an fsck, a checkout
        // stopping containers) or stuck; either way the user is told once
        // rather than left before a silent terminal.
        let resp = match tokio::time::timeout(patience(), &mut answer).await {
            Ok(resp) => resp,
            Err(_) => {
                // The server's pid, once it died.
                let dead = || server_pid.filter(|pid| crate::paths::is_zombie(*pid));
                if let Some(pid) = dead() {
                    bail!(died_waiting(pid, &method, path));
                }
                match path {
                    // Long by nature: they read the whole store.
                    "/v1/fsck" | "/v1/gc" => eprintln!(
                        "dm: {} is still running after {} s (it reads every commit and chunk; \
                         a store of a few GiB takes a minute or more). Still waiting; Ctrl-C \
                         stops waiting, not the server.",
                        path.trim_start_matches("/v1/"),
                        patience().as_secs()
                    ),
                    _ => eprintln!(
                        "dm: the server at {} has not answered {method} {path} for {} s; it may be \
                         busy (gc, fsck, a checkout stopping containers) or stuck (see its log). \
                         Still waiting; Ctrl-C stops waiting, not the server (a checkout or \
                         reset it has begun goes on: `dm branch` and its log tell).",
                        self.socket.display(),
                        patience().as_secs()
                    ),
                }
                // A server that died meanwhile never answers: said, rather
                // than waited on for good.
                loop {
                    tokio::select! {
                        resp = &mut answer => break resp,
                        () = tokio::time::sleep(std::time::Duration::from_secs(2)) => {
                            if let Some(pid) = dead() {
                                bail!(died_waiting(pid, &method, path));
                            }
                        }
                    }
                }
            }
        }
        .with_context(|| match method {
            // What it was doing may have happened whole before it died.
            Method::GET => "the dm server closed the connection (did it crash? see its log)".to_string(),
            // A check changes nothing: run again.
            _ if path == "/v1/fsck" => "the dm server closed the connection during the fsck \
                 (did it crash? see its log); run `dm fsck` again once a server runs"
                .to_string(),
            // A GC cut short lost nothing; the next one finishes its work.
            _ if path == "/v1/gc" => "the dm server closed the connection during the GC \
                 (did it crash? see its log); nothing is lost by that: run `dm gc` again once a \
                 server runs"
                .to_string(),
            _ => format!(
                "the dm server closed the connection while answering {method} {path} (did it crash? \
                 see its log); that may have been done or not: once a server runs again, \
                 `dm list`, `dm log` and `dm branch` tell"
            ),
        })?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .context("reading the server's answer")?
            .to_bytes();
        Ok((status, bytes))
    }
}

/// What a client says of a server that died under its call.
fn died_waiting(pid: i32, method: &Method, path: &str) -> String {
    format!(
        "the dm server (pid {pid}) died while answering {method} {path}, and cannot finish exiting \
         (one of its threads waits on one of its own mounts): it will never answer. Start `dm server` \
         again (it clears the dead one, keeping the store), then see whether that was done: \
         `dm list`, `dm log` and `dm branch` tell"
    )
}

/// How long a call waits before saying that the server has not answered
/// (`DM_CLIENT_PATIENCE_SECS`, default 30).
fn patience() -> std::time::Duration {
    let secs = std::env::var("DM_CLIENT_PATIENCE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    std::time::Duration::from_secs(secs)
}
