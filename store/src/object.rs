//! Content-addressed metadata objects: tree nodes and commits.
//!
//! Stored form: `FORMAT_VERSION || kind || postcard(payload)`; the id is the
//! blake3 of the whole stored form. See docs/format.md.

use crate::error::{Error, Result};
use crate::id::Id;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Version byte that starts every stored object.
pub const FORMAT_VERSION: u8 = 1;
/// Object kind: a tree leaf.
pub const KIND_LEAF: u8 = 1;
/// Object kind: an inner tree node.
pub const KIND_INNER: u8 = 2;
/// Object kind: a commit.
pub const KIND_COMMIT: u8 = 3;

/// A node of the persistent, content-addressed B+tree that holds a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Node {
    /// Sorted (key, value) entries.
    Leaf(Vec<(Vec<u8>, Vec<u8>)>),
    /// Sorted (lower bound key, child id) entries.
    Inner(Vec<(Vec<u8>, Id)>),
}

/// A commit: a snapshot root plus history and description.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    /// Root node id of the snapshot tree.
    pub root: Id,
    /// Parent commits (first parent = the branch's previous head).
    pub parents: Vec<Id>,
    pub author: String,
    pub message: String,
    /// Nanoseconds since the Unix epoch.
    pub timestamp_ns: u64,
    /// User metadata (`dm commit -d key=value`).
    pub metadata: BTreeMap<String, String>,
    /// 1 for a first commit, parent's + 1 otherwise: the branch's commit count.
    pub generation: u64,
    /// Sum of the sizes of the regular files in the snapshot.
    pub size: u64,
}

/// Encodes an object of `kind` and returns (id, stored bytes).
pub fn encode<T: Serialize>(kind: u8, value: &T) -> (Id, Vec<u8>) {
    let mut out = vec![FORMAT_VERSION, kind];
    // postcard serialisation into a Vec cannot fail for these types (no
    // maps with non-string keys, no unsized sequences): it only fails on
    // a full fixed-size buffer, which a Vec never is.
    let body = postcard::to_stdvec(value).expect("postcard into Vec cannot fail");
    out.extend_from_slice(&body);
    (Id::of(&out), out)
}

/// Decodes a stored object, checking version and kind.
pub fn decode<T: for<'de> Deserialize<'de>>(id: &Id, kind: u8, bytes: &[u8]) -> Result<T> {
    match bytes {
        [FORMAT_VERSION, k, body @ ..] if *k == kind => postcard::from_bytes(body)
            .map_err(|e| Error::Corrupt(format!("object {} does not decode: {e}", id.short()))),
        [FORMAT_VERSION, k, ..] => Err(Error::Corrupt(format!(
            "object {} has kind {k}, expected {kind}",
            id.short()
        ))),
        [v, ..] => Err(Error::Corrupt(format!(
            "object {} has format version {v}; this dm reads version {FORMAT_VERSION}",
            id.short()
        ))),
        [] => Err(Error::Corrupt(format!("object {} is empty", id.short()))),
    }
}

/// Encodes a tree node.
pub fn encode_node(node: &Node) -> (Id, Vec<u8>) {
    let kind = match node {
        Node::Leaf(_) => KIND_LEAF,
        Node::Inner(_) => KIND_INNER,
    };
    encode(kind, node)
}

/// Decodes a tree node of either kind.
pub fn decode_node(id: &Id, bytes: &[u8]) -> Result<Node> {
    let kind = bytes.get(1).copied().unwrap_or(0);
    if kind != KIND_LEAF && kind != KIND_INNER {
        return Err(Error::Corrupt(format!(
            "object {} is not a tree node (kind {kind})",
            id.short()
        )));
    }
    decode(id, kind, bytes)
}
