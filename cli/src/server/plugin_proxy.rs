//! `dm plugin-proxy`: a tiny process that owns Docker's plugin socket
//! (`/run/docker/plugins/dm.sock`) and forwards every request to the dm
//! server's internal plugin socket (`DATA_DIR/plugin.sock`).
//!
//! Docker retries a plugin socket that is missing or refuses connections
//! for 15 s (lookup) to 30 s (each call) before failing. The proxy outlives
//! the server, so when the server is down or restarting Docker gets an
//! immediate `{"Err": "the dm server is not running ..."}` instead. A
//! starting server re-targets a running proxy (`POST /dm-proxy/upstream`)
//! or starts one. The proxy exits when its socket file is removed or
//! replaced, on SIGTERM, or on `POST /dm-proxy/exit`.

use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, Full};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// What the proxy answers Docker while no server runs (the server, once
/// up again, looks for it in the errors of containers Docker gave up on).
pub const SERVER_DOWN: &str = "the dm server is not running";

/// One `Connection: close` request to a unix socket; returns status and body.
fn raw_request(socket: &Path, method: &str, path: &str, body: &str) -> Result<(u16, String)> {
    let mut s = std::os::unix::net::UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.set_write_timeout(Some(Duration::from_secs(3)))?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: dm\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp).to_string();
    let Some((head, payload)) = text.split_once("\r\n\r\n") else {
        bail!("no HTTP answer from {}", socket.display());
    };
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, payload.to_string()))
}

/// Makes sure a proxy listens on `plugin_socket` and forwards to `upstream`:
/// re-targets a running one, or starts one (detached, logging to
/// `DATA_DIR/plugin-proxy.log`). Returns what was done.
pub fn ensure(plugin_socket: &Path, upstream: &Path, data_dir: &Path) -> Result<String> {
    let body = serde_json::json!({ "upstream": upstream }).to_string();
    if std::os::unix::net::UnixStream::connect(plugin_socket).is_ok() {
        // Another live server behind the proxy keeps it: taking it over
        // would hand that server's containers and volumes to this one.
        if let Some(other) = live_other_upstream(plugin_socket, upstream) {
            bail!(
                "{} already serves Docker for the dm server whose data directory is {} (it answers on {}); \
                 this server runs without the Docker plugin. Stop the other server first, or start this \
                 one with --no-plugin or another --plugin-socket",
                plugin_socket.display(),
                other.parent().unwrap_or(&other).display(),
                other.display()
            );
        }
        let (status, answer) = raw_request(plugin_socket, "POST", "/dm-proxy/upstream", &body)?;
        if status == 200 {
            return Ok(format!(
                "Docker volume plugin: the proxy on {} now forwards to {}",
                plugin_socket.display(),
                upstream.display()
            ));
        }
        bail!(
            "{} is served by something that is not a dm plugin proxy ({status} {}); stop it or use --plugin-socket",
            plugin_socket.display(),
            answer.trim()
        );
    }
    if plugin_socket.exists() {
        std::fs::remove_file(plugin_socket)
            .with_context(|| format!("removing the stale socket {}", plugin_socket.display()))?;
    }
    if let Some(dir) = plugin_socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let log_path = data_dir.join("plugin-proxy.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let exe = std::env::current_exe().context("finding the dm binary")?;
    use std::os::unix::process::CommandExt;
    let mut child = std::process::Command::new(exe)
        .arg("plugin-proxy")
        .arg("--listen")
        .arg(plugin_socket)
        .arg("--upstream")
        .arg(upstream)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting dm plugin-proxy")?;
    let pid = child.id();
    // Reap it if it ever exits while this server runs.
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::os::unix::net::UnixStream::connect(plugin_socket).is_err() {
        if Instant::now() > deadline {
            bail!(
                "dm plugin-proxy (pid {pid}) did not come up on {}; see {}",
                plugin_socket.display(),
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(format!(
        "Docker volume plugin: started dm plugin-proxy (pid {pid}) on {}, forwarding to {}",
        plugin_socket.display(),
        upstream.display()
    ))
}

/// Where the proxy on `plugin_socket` forwards to (none: no proxy answers).
pub fn upstream_of(plugin_socket: &Path) -> Option<PathBuf> {
    let (status, info) = raw_request(plugin_socket, "GET", "/dm-proxy/info", "").ok()?;
    if status != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&info).ok()?;
    Some(PathBuf::from(v.get("upstream")?.as_str()?))
}

/// The upstream of the proxy on `plugin_socket`, when it is not `ours` and
/// a server answers there.
pub fn live_other_upstream(plugin_socket: &Path, ours: &Path) -> Option<PathBuf> {
    let other = upstream_of(plugin_socket)?;
    (other != ours && std::os::unix::net::UnixStream::connect(&other).is_ok()).then_some(other)
}

struct Proxy {
    upstream: RwLock<PathBuf>,
    exit: tokio::sync::Notify,
}

fn json(status: StatusCode, v: serde_json::Value) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            dm_volume_plugin::protocol::CONTENT_TYPE,
        )],
        v.to_string(),
    )
        .into_response()
}

async fn forward(upstream: &Path, method: Method, uri: &Uri, body: Bytes) -> Result<Response> {
    let stream = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::UnixStream::connect(upstream),
    )
    .await
    .context("timed out")??;
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = hyper::Request::builder()
        .method(method)
        .uri(uri.path())
        .header("host", "dm")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    Ok((
        status,
        [(
            header::CONTENT_TYPE,
            dm_volume_plugin::protocol::CONTENT_TYPE,
        )],
        bytes,
    )
        .into_response())
}

async fn handler(State(p): State<Arc<Proxy>>, method: Method, uri: Uri, body: Bytes) -> Response {
    let path = uri.path();
    let upstream = p.upstream.read().unwrap_or_else(|e| e.into_inner()).clone();
    match path {
        "/dm-proxy/upstream" => {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let Some(u) = v.get("upstream").and_then(|u| u.as_str()) else {
                return json(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({"Err": "expected {\"upstream\": \"/path/plugin.sock\"}"}),
                );
            };
            eprintln!("dm plugin-proxy: forwarding to {u}");
            *p.upstream.write().unwrap_or_else(|e| e.into_inner()) = PathBuf::from(u);
            return json(StatusCode::OK, serde_json::json!({}));
        }
        "/dm-proxy/info" => {
            return json(
                StatusCode::OK,
                serde_json::json!({"upstream": upstream, "pid": std::process::id()}),
            );
        }
        "/dm-proxy/exit" => {
            p.exit.notify_one();
            return json(StatusCode::OK, serde_json::json!({}));
        }
        _ => {}
    }
    match forward(&upstream, method, &uri, body.clone()).await {
        Ok(r) => r,
        Err(e) => match path {
            // Keep Docker from waiting on the lookup: the driver exists,
            // its calls fail with the message below until the server is back.
            "/Plugin.Activate" => json(
                StatusCode::OK,
                serde_json::json!({"Implements": ["VolumeDriver"]}),
            ),
            // Docker asks Get first for volumes it already knows (e.g. one
            // a container still references) and replaces an error with its
            // own vague one; answer it for dm's volumes so that the next call
            // (Mount) fails with the message below. Any other name is not
            // ours: Docker also asks every driver it has used about a new
            // volume created without a driver, and must not be told that dm
            // has it.
            "/VolumeDriver.Get" => {
                let name = serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v.get("Name").and_then(|n| n.as_str()).map(String::from))
                    .unwrap_or_default();
                if known_volume(&upstream, &name) {
                    json(
                        StatusCode::OK,
                        serde_json::json!({"Volume": {"Name": name, "Status": {"error": SERVER_DOWN}}, "Err": ""}),
                    )
                } else {
                    json(
                        StatusCode::OK,
                        serde_json::json!({"Err": format!("no such volume: {name}")}),
                    )
                }
            }
            "/VolumeDriver.Capabilities" => json(
                StatusCode::OK,
                serde_json::json!({"Capabilities": {"Scope": "local"}}),
            ),
            _ => json(
                StatusCode::OK,
                serde_json::json!({"Err": format!(
                    "{SERVER_DOWN} (nothing answers on {}: {e:#}); start it with `dm server`, then retry",
                    upstream.display()
                )}),
            ),
        },
    }
}

/// True when the volume table of the server behind `upstream`
/// (`DATA_DIR/plugin.sock` -> `DATA_DIR/docker-volumes.json`) lists `name`.
fn known_volume(upstream: &Path, name: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct Table {
        #[serde(default)]
        volumes: Vec<String>,
    }
    let Some(dir) = upstream.parent() else {
        return false;
    };
    std::fs::read(dir.join(super::docker::VOLUME_TABLE))
        .ok()
        .and_then(|b| serde_json::from_slice::<Table>(&b).ok())
        .is_some_and(|t| t.volumes.iter().any(|v| v == name))
}

/// Runs the proxy until its socket is removed or replaced, SIGTERM/SIGINT,
/// or `POST /dm-proxy/exit`.
pub fn run(listen: &Path, upstream: &Path) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async {
        let _ = std::fs::remove_file(listen);
        let listener = tokio::net::UnixListener::bind(listen)
            .with_context(|| format!("listening on {}", listen.display()))?;
        let ino = std::fs::metadata(listen)?.ino();
        eprintln!(
            "dm plugin-proxy (pid {}) on {}, forwarding to {}",
            std::process::id(),
            listen.display(),
            upstream.display()
        );
        let proxy = Arc::new(Proxy {
            upstream: RwLock::new(upstream.to_path_buf()),
            exit: tokio::sync::Notify::new(),
        });
        let app = axum::Router::new()
            .fallback(handler)
            .with_state(proxy.clone());
        let listen2 = listen.to_path_buf();
        let shutdown = async move {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate()).ok();
            let gone = async {
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    match std::fs::metadata(&listen2) {
                        Ok(m) if m.ino() == ino => {}
                        _ => break,
                    }
                }
            };
            tokio::select! {
                _ = gone => eprintln!("dm plugin-proxy: socket removed or replaced, exiting"),
                _ = proxy.exit.notified() => eprintln!("dm plugin-proxy: asked to exit"),
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => eprintln!("dm plugin-proxy: SIGTERM"),
                _ = tokio::signal::ctrl_c() => eprintln!("dm plugin-proxy: SIGINT"),
            }
        };
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
            .context("serving")?;
        // Remove the socket only if it is still ours.
        if std::fs::metadata(listen).map(|m| m.ino()) .ok() == Some(ino) {
            let _ = std::fs::remove_file(listen);
        }
        Ok(())
    })
}
