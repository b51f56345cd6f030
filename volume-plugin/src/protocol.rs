//! Docker's legacy volume plugin protocol (`VolumeDriver`).
//!
//! Docker POSTs JSON to `/Plugin.Activate` and `/VolumeDriver.<Method>` on
//! the plugin's unix socket. [`handle`] turns one such request into the
//! answer, calling a [`Backend`] for the work. Every failure is answered
//! with `{"Err": "..."}`; Docker shows that text to the user.

use dm_store::VolumeName;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The driver name users pass to `--volume-driver` / `driver:`.
pub const DRIVER_NAME: &str = "dm";

/// The content type of plugin answers.
pub const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1.2+json";

/// Why a plugin call failed. The text is what Docker shows to users.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The request body is not the JSON the endpoint expects.
    #[error("{endpoint}: malformed request: {reason}")]
    BadRequest {
        /// The endpoint called.
        endpoint: String,
        /// What is wrong with the body.
        reason: String,
    },
    /// The volume name does not follow `[namespace/]dot[@branch][.subdot]`.
    #[error("invalid dm volume name {name:?}: {reason} (dm volume names are [namespace/]dot[@branch][.subdot])")]
    BadName {
        /// The name as given.
        name: String,
        /// Which part is wrong.
        reason: String,
    },
    /// No such endpoint in the protocol.
    #[error("unknown plugin endpoint {0}; dm implements Plugin.Activate and VolumeDriver.*")]
    UnknownEndpoint(String),
    /// Docker asked about a volume dm does not know.
    #[error("no such dm volume: {0}")]
    NoSuchVolume(String),
    /// The server failed (the message says why and what to do).
    #[error("{0}")]
    Backend(String),
}

/// A volume as Docker names it, and its parsed form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Volume {
    /// The name exactly as Docker spells it (Docker's key for the volume).
    pub name: String,
    /// The parsed name.
    pub parsed: VolumeName,
}

impl Volume {
    /// Parses a Docker volume name.
    pub fn parse(name: &str) -> Result<Volume, PluginError> {
        match VolumeName::parse(name) {
            Ok(parsed) => Ok(Volume {
                name: name.to_string(),
                parsed,
            }),
            Err(e) => Err(PluginError::BadName {
                name: name.to_string(),
                reason: e.to_string(),
            }),
        }
    }
}

/// A volume in `Get` and `List` answers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VolumeInfo {
    /// The volume's name as Docker knows it.
    #[serde(rename = "Name")]
    pub name: String,
    /// Where it is mounted on the host, when it is.
    #[serde(
        rename = "Mountpoint",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub mountpoint: Option<String>,
    /// When the dot was created (RFC 3339), shown by `docker volume inspect`.
    #[serde(rename = "CreatedAt", skip_serializing_if = "Option::is_none", default)]
    pub created_at: Option<String>,
    /// Extra details shown by `docker volume inspect` (dot, branch, ...).
    #[serde(rename = "Status", skip_serializing_if = "BTreeMap::is_empty", default)]
    pub status: BTreeMap<String, serde_json::Value>,
}

/// What `dm server` implements for the plugin. Calls block (the server
/// runs them off its async threads).
pub trait Backend {
    /// Makes the volume exist: creates the dot if missing (a pinned branch
    /// must exist) and the subdot directory; remembers the volume.
    fn create(&self, volume: &Volume, opts: &BTreeMap<String, String>) -> Result<(), PluginError>;
    /// Forgets the volume (`docker volume rm`).
    fn remove(&self, volume: &Volume) -> Result<(), PluginError>;
    /// Mounts the volume for the mount request `id` (a container) and
    /// returns the host path.
    fn mount(&self, volume: &Volume, id: &str) -> Result<PathBuf, PluginError>;
    /// Releases the mount request `id`.
    fn unmount(&self, volume: &Volume, id: &str) -> Result<(), PluginError>;
    /// The host path of the volume when mounted.
    fn path(&self, volume: &Volume) -> Result<Option<PathBuf>, PluginError>;
    /// One volume.
    fn get(&self, volume: &Volume) -> Result<VolumeInfo, PluginError>;
    /// Every volume Docker created through dm.
    fn list(&self) -> Result<Vec<VolumeInfo>, PluginError>;
}

/// A request naming a volume (Create, Remove, Mount, Unmount, Path, Get).
#[derive(Debug, Deserialize)]
pub struct NameRequest {
    /// The volume name.
    #[serde(rename = "Name")]
    pub name: String,
    /// Driver options (`docker volume create -o k=v`; Create only).
    #[serde(rename = "Opts", default)]
    pub opts: Option<BTreeMap<String, String>>,
    /// The mount request id (Mount and Unmount).
    #[serde(rename = "ID", default)]
    pub id: Option<String>,
}

/// `Plugin.Activate`'s answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct ActivateResponse {
    /// `["VolumeDriver"]`.
    #[serde(rename = "Implements")]
    pub implements: Vec<String>,
}

/// Answer of the calls that return nothing but an error.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrResponse {
    /// Empty on success.
    #[serde(rename = "Err")]
    pub err: String,
}

/// `Mount` and `Path` answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct MountpointResponse {
    /// The host path.
    #[serde(rename = "Mountpoint")]
    pub mountpoint: String,
    /// Empty on success.
    #[serde(rename = "Err")]
    pub err: String,
}

/// `Get`'s answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct GetResponse {
    /// The volume.
    #[serde(rename = "Volume")]
    pub volume: VolumeInfo,
    /// Empty on success.
    #[serde(rename = "Err")]
    pub err: String,
}

/// `List`'s answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct ListResponse {
    /// The volumes.
    #[serde(rename = "Volumes")]
    pub volumes: Vec<VolumeInfo>,
    /// Empty on success.
    #[serde(rename = "Err")]
    pub err: String,
}

/// `Capabilities`' answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct CapabilitiesResponse {
    /// `{"Scope": "local"}`.
    #[serde(rename = "Capabilities")]
    pub capabilities: Capabilities,
}

/// The driver's capabilities.
#[derive(Debug, Serialize, Deserialize)]
pub struct Capabilities {
    /// `local`: volumes belong to this host.
    #[serde(rename = "Scope")]
    pub scope: String,
}

/// An HTTP answer: status and JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// HTTP status (200 also for `Err` answers, as Docker expects).
    pub status: u16,
    /// The JSON body.
    pub body: Vec<u8>,
}

impl Response {
    fn json<T: Serialize>(value: &T) -> Response {
        match serde_json::to_vec(value) {
            Ok(body) => Response { status: 200, body },
            Err(e) => Response::error(500, &PluginError::Backend(format!("encoding: {e}"))),
        }
    }

    /// An `{"Err": ...}` answer.
    pub fn error(status: u16, err: &PluginError) -> Response {
        let body = serde_json::to_vec(&ErrResponse {
            err: err.to_string(),
        })
        .unwrap_or_else(|_| b"{\"Err\":\"dm: error\"}".to_vec());
        Response { status, body }
    }
}

fn parse_request(endpoint: &str, body: &[u8]) -> Result<(NameRequest, Volume), PluginError> {
    let req: NameRequest = serde_json::from_slice(body).map_err(|e| PluginError::BadRequest {
        endpoint: endpoint.to_string(),
        reason: format!("{e} (expected {{\"Name\": \"VOLUME\"}})"),
    })?;
    let volume = Volume::parse(&req.name)?;
    Ok((req, volume))
}

fn request_id(endpoint: &str, req: &NameRequest) -> Result<String, PluginError> {
    match &req.id {
        Some(id) if !id.is_empty() => Ok(id.clone()),
        _ => Err(PluginError::BadRequest {
            endpoint: endpoint.to_string(),
            reason: "missing \"ID\" (the mount request id)".to_string(),
        }),
    }
}

/// Answers one plugin request: `path` is the HTTP path (`/VolumeDriver.Mount`),
/// `body` the raw request body. Never panics on any input.
pub fn handle(backend: &dyn Backend, path: &str, body: &[u8]) -> Response {
    let endpoint = path.trim_start_matches('/');
    let res = dispatch(backend, endpoint, body);
    match res {
        Ok(r) => r,
        Err(e @ PluginError::UnknownEndpoint(_)) => Response::error(404, &e),
        Err(e) => Response::error(200, &e),
    }
}

fn dispatch(backend: &dyn Backend, endpoint: &str, body: &[u8]) -> Result<Response, PluginError> {
    match endpoint {
        "Plugin.Activate" => Ok(Response::json(&ActivateResponse {
            implements: vec!["VolumeDriver".to_string()],
        })),
        "VolumeDriver.Capabilities" => Ok(Response::json(&CapabilitiesResponse {
            capabilities: Capabilities {
                scope: "local".to_string(),
            },
        })),
        "VolumeDriver.List" => {
            let volumes = backend.list()?;
            Ok(Response::json(&ListResponse {
                volumes,
                err: String::new(),
            }))
        }
        "VolumeDriver.Create" => {
            let (req, volume) = parse_request(endpoint, body)?;
            backend.create(&volume, &req.opts.unwrap_or_default())?;
            Ok(Response::json(&ErrResponse { err: String::new() }))
        }
        "VolumeDriver.Remove" => {
            let (_, volume) = parse_request(endpoint, body)?;
            backend.remove(&volume)?;
            Ok(Response::json(&ErrResponse { err: String::new() }))
        }
        "VolumeDriver.Mount" => {
            let (req, volume) = parse_request(endpoint, body)?;
            let id = request_id(endpoint, &req)?;
            let path = backend.mount(&volume, &id)?;
            Ok(Response::json(&MountpointResponse {
                mountpoint: path.display().to_string(),
                err: String::new(),
            }))
        }
        "VolumeDriver.Unmount" => {
            let (req, volume) = parse_request(endpoint, body)?;
            let id = request_id(endpoint, &req)?;
            backend.unmount(&volume, &id)?;
            Ok(Response::json(&ErrResponse { err: String::new() }))
        }
        "VolumeDriver.Path" => {
            let (_, volume) = parse_request(endpoint, body)?;
            let path = backend.path(&volume)?;
            Ok(Response::json(&MountpointResponse {
                mountpoint: path.map(|p| p.display().to_string()).unwrap_or_default(),
                err: String::new(),
            }))
        }
        "VolumeDriver.Get" => {
            let (_, volume) = parse_request(endpoint, body)?;
            let mut info = backend.get(&volume)?;
            // Docker keys volumes by the name it asked for.
            info.name = volume.name.clone();
            Ok(Response::json(&GetResponse {
                volume: info,
                err: String::new(),
            }))
        }
        other => Err(PluginError::UnknownEndpoint(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Fake {
        calls: Mutex<Vec<String>>,
    }

    impl Backend for Fake {
        fn create(&self, v: &Volume, _: &BTreeMap<String, String>) -> Result<(), PluginError> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("create {}", v.parsed));
            Ok(())
        }
        fn remove(&self, v: &Volume) -> Result<(), PluginError> {
            Err(PluginError::NoSuchVolume(v.name.clone()))
        }
        fn mount(&self, v: &Volume, id: &str) -> Result<PathBuf, PluginError> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("mount {} {id}", v.parsed));
            Ok(PathBuf::from("/m").join(&v.parsed.subdot))
        }
        fn unmount(&self, _: &Volume, _: &str) -> Result<(), PluginError> {
            Ok(())
        }
        fn path(&self, _: &Volume) -> Result<Option<PathBuf>, PluginError> {
            Ok(None)
        }
        fn get(&self, v: &Volume) -> Result<VolumeInfo, PluginError> {
            Ok(VolumeInfo {
                name: "canonical".into(),
                mountpoint: None,
                created_at: None,
                status: [("dot".to_string(), v.parsed.dot.to_string().into())].into(),
            })
        }
        fn list(&self) -> Result<Vec<VolumeInfo>, PluginError> {
            Ok(vec![VolumeInfo {
                name: "myapp".into(),
                ..Default::default()
            }])
        }
    }

    fn call(path: &str, body: &str) -> (u16, serde_json::Value) {
        let r = handle(&Fake::default(), path, body.as_bytes());
        (
            r.status,
            serde_json::from_slice(&r.body).expect("answers are JSON"),
        )
    }

    #[test]
    fn activate_and_capabilities() {
        let (s, v) = call("/Plugin.Activate", "");
        assert_eq!(s, 200);
        assert_eq!(v, serde_json::json!({"Implements": ["VolumeDriver"]}));
        let (_, v) = call("/VolumeDriver.Capabilities", "null");
        assert_eq!(v["Capabilities"]["Scope"], "local");
    }

    #[test]
    fn mount_path_get_list() {
        let (_, v) = call(
            "/VolumeDriver.Mount",
            r#"{"Name":"ns/app@dev.db","ID":"c1"}"#,
        );
        assert_eq!(v, serde_json::json!({"Mountpoint": "/m/db", "Err": ""}));
        let (_, v) = call("/VolumeDriver.Get", r#"{"Name":"app"}"#);
        assert_eq!(v["Volume"]["Name"], "app");
        assert_eq!(v["Volume"]["Status"]["dot"], "app");
        assert_eq!(v["Err"], "");
        let (_, v) = call("/VolumeDriver.List", "{}");
        assert_eq!(v["Volumes"][0]["Name"], "myapp");
        let (_, v) = call(
            "/VolumeDriver.Create",
            r#"{"Name":"app.__root__","Opts":null}"#,
        );
        assert_eq!(v["Err"], "");
        let (_, v) = call("/VolumeDriver.Remove", r#"{"Name":"gone"}"#);
        assert_eq!(v["Err"], "no such dm volume: gone");
    }

    #[test]
    fn errors_name_the_problem() {
        let (s, v) = call("/VolumeDriver.Create", "{not json");
        assert_eq!(s, 200);
        let e = v["Err"].as_str().unwrap();
        assert!(e.contains("VolumeDriver.Create: malformed request"), "{e}");
        let (_, v) = call("/VolumeDriver.Create", r#"{"Nom":"x"}"#);
        assert!(v["Err"].as_str().unwrap().contains("missing field `Name`"));
        let (_, v) = call("/VolumeDriver.Mount", r#"{"Name":"a b","ID":"x"}"#);
        let e = v["Err"].as_str().unwrap();
        assert!(e.contains("invalid dm volume name \"a b\""), "{e}");
        let (_, v) = call("/VolumeDriver.Mount", r#"{"Name":"ok"}"#);
        assert!(v["Err"].as_str().unwrap().contains("missing \"ID\""));
        let (s, v) = call("/VolumeDriver.Frobnicate", "{}");
        assert_eq!(s, 404);
        assert!(v["Err"]
            .as_str()
            .unwrap()
            .contains("unknown plugin endpoint"));
        for bad in ["", "x.y.z", "@b", "a@", "a.", "/a", "a/b/c", "a\u{0}b"] {
            let body = serde_json::json!({"Name": bad}).to_string();
            let (_, v) = call("/VolumeDriver.Create", &body);
            assert!(
                v["Err"]
                    .as_str()
                    .unwrap()
                    .contains("invalid dm volume name"),
                "{bad:?}: {v}"
            );
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let fake = Fake::default();
        let mut x: u64 = 0x1234_5678;
        for n in 0..2000 {
            let len = n % 64;
            let body: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x & 0xff) as u8
                })
                .collect();
            for ep in [
                "/VolumeDriver.Create",
                "/VolumeDriver.Mount",
                "/VolumeDriver.Get",
            ] {
                let r = handle(&fake, ep, &body);
                let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
                assert!(v.get("Err").is_some() || v.get("Volume").is_some());
            }
        }
    }
}
