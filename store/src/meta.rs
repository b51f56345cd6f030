//! Records of dots and branches in the `meta` column family.
//!
//! | key | value |
//! |---|---|
//! | `d 00 namespace 00 name` | [`DotRec`] |
//! | `b 00 dot id:8 name` | [`BranchRec`] |
//! | `n 00 next-id` | next dot/branch id (u64 BE) |
//! | `p 00 dot id:8` | the branch checked out before the current one (`dm checkout -`) |

use crate::id::Id;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DotRec {
    pub id: u64,
    pub namespace: String,
    pub name: String,
    pub block_size: u32,
    pub created_ns: u64,
    pub current_branch: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BranchRec {
    /// Overlay id of the branch's working state (never 0).
    pub bid: u64,
    pub head: Option<Id>,
    /// Root of the head's snapshot (the empty tree without a head).
    pub root: Id,
    /// The branch and commit this branch was created from.
    pub origin: Option<(String, Id)>,
}

pub fn dot_key(namespace: &str, name: &str) -> Vec<u8> {
    let mut k = b"d\0".to_vec();
    k.extend_from_slice(namespace.as_bytes());
    k.push(0);
    k.extend_from_slice(name.as_bytes());
    k
}

pub const DOT_PREFIX: &[u8] = b"d\0";

pub fn branch_prefix(dot_id: u64) -> Vec<u8> {
    let mut k = b"b\0".to_vec();
    k.extend_from_slice(&dot_id.to_be_bytes());
    k
}

pub fn branch_key(dot_id: u64, name: &str) -> Vec<u8> {
    let mut k = branch_prefix(dot_id);
    k.extend_from_slice(name.as_bytes());
    k
}

pub const BRANCH_PREFIX: &[u8] = b"b\0";

/// Where the dot's previous branch is kept (a key of its own, so that
/// [`DotRec`]s written before it still decode).
pub fn previous_branch_key(dot_id: u64) -> Vec<u8> {
    let mut k = b"p\0".to_vec();
    k.extend_from_slice(&dot_id.to_be_bytes());
    k
}
pub const NEXT_ID_KEY: &[u8] = b"n\0next-id";
/// Present from a dot or branch deletion until a GC that started after it
/// finishes: the GC it makes due is run by the next start too, after a
/// crash or stop took the one due away (an 11 GiB store kept 3.7 GiB of a
/// deleted dot across restarts).
pub const GC_DUE_KEY: &[u8] = b"n\0gc-due";
/// The lowest chunk segment number a new segment may take (LE u32), above
/// every segment an index entry ever named: a segment file lost from the
/// chunk directory (a partial restore) leaves its number unused, so that
/// putting the file back later restores its chunks (a new segment of that
/// number took them over).
pub const NEXT_SEGMENT_KEY: &[u8] = b"n\0next-segment";
