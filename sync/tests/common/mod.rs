//! Test helpers: in-process dm nodes (a store plus a hub on 127.0.0.1).
#![allow(dead_code)]

use dm_store::{CommitRequest, DotName, FileKind, Id, Store, ROOT_INO};
use dm_sync::{Hub, Progress, Remote, RemoteSpec, TransferOptions, TransferReport, Trust};
use rand::{RngCore, SeedableRng};
use std::sync::Arc;

/// A dm server: its store and its hub endpoint.
pub struct Node {
    pub dir: tempfile::TempDir,
    pub store: Arc<Store>,
    pub hub: Hub,
}

impl Node {
    pub fn start() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let hub = Hub::start(store.clone(), dir.path(), "127.0.0.1:0".parse().unwrap()).unwrap();
        Node { dir, store, hub }
    }

    pub fn admin_key(&self) -> String {
        std::fs::read_to_string(dm_sync::users::admin_key_path(self.dir.path()))
            .unwrap()
            .trim()
            .to_string()
    }

    pub fn add_user(&self, name: &str) -> String {
        dm_sync::users::add_user(&self.store, name).unwrap()
    }

    pub fn spec(&self, user: &str, key: &str) -> RemoteSpec {
        RemoteSpec {
            host: "127.0.0.1".into(),
            port: self.hub.local_addr().unwrap().port(),
            user: user.into(),
            key: key.into(),
            trust: Trust::Pinned(self.hub.fingerprint().to_string()),
        }
    }

    pub async fn connect(&self, user: &str, key: &str) -> Remote {
        Remote::connect(&self.spec(user, key)).await.unwrap()
    }
}

pub fn dot(s: &str) -> DotName {
    DotName::parse(s).unwrap()
}

/// Deterministic incompressible bytes.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    r.fill_bytes(&mut v);
    v
}

/// Writes `data` at `offset` of file `name` in the branch's default subdot.
pub fn write(s: &Store, d: &DotName, branch: &str, name: &str, offset: u64, data: &[u8]) {
    let fs = s.branch_fs(d, branch).unwrap();
    let sub = fs.subdot_ino("__default__", true).unwrap();
    let ino = match fs.lookup(sub, name.as_bytes()) {
        Ok(a) => a.ino,
        Err(_) => {
            fs.mknod(sub, name.as_bytes(), FileKind::File, 0o644, 0, 0, 0)
                .unwrap()
                .ino
        }
    };
    for (i, part) in data.chunks(1 << 20).enumerate() {
        fs.write(ino, offset + (i as u64) * (1 << 20), part)
            .unwrap();
    }
    fs.flush(ino).unwrap();
}

/// Reads file `name` of the branch's default subdot.
pub fn read(s: &Store, d: &DotName, branch: &str, name: &str) -> Vec<u8> {
    let fs = s.branch_fs(d, branch).unwrap();
    let sub = fs.lookup(ROOT_INO, b"__default__").unwrap().ino;
    let a = fs.lookup(sub, name.as_bytes()).unwrap();
    let mut out = Vec::new();
    while (out.len() as u64) < a.size {
        let part = fs.read(a.ino, out.len() as u64, 1 << 20).unwrap();
        if part.is_empty() {
            break;
        }
        out.extend(part);
    }
    out
}

pub fn commit(s: &Store, d: &DotName, branch: &str, msg: &str) -> Id {
    s.commit(
        d,
        branch,
        CommitRequest {
            message: msg.into(),
            author: "test".into(),
            ..Default::default()
        },
    )
    .unwrap()
    .id
}

pub async fn push(
    n: &Node,
    r: &Remote,
    local: &str,
    branch: &str,
    remote: &str,
    opts: &TransferOptions,
) -> dm_sync::Result<TransferReport> {
    dm_sync::push(
        n.store.clone(),
        r,
        &dot(local),
        branch,
        &dot(remote),
        opts,
        &Progress::new(),
    )
    .await
}

pub async fn pull(
    n: &Node,
    r: &Remote,
    local: &str,
    branch: &str,
    remote: &str,
    opts: &TransferOptions,
) -> dm_sync::Result<TransferReport> {
    dm_sync::pull(
        n.store.clone(),
        r,
        &dot(local),
        branch,
        &dot(remote),
        opts,
        &Progress::new(),
    )
    .await
}
