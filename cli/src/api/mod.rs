//! The local API: the JSON types exchanged between `dm server` and its
//! clients (the `dm` CLI today, the Docker volume plugin and remote hubs
//! later). See docs/api.md for the endpoints.
//!
//! These types are the wire contract. They do not depend on the store's
//! internal types, so the store can change without breaking clients.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Version of the API described in docs/api.md. Bumped on breaking changes.
pub const API_VERSION: u32 = 1;

/// Prefix of every endpoint.
pub const PREFIX: &str = "/v1";

/// Body of every error response: `{"error": "..."}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// A user-facing message that names the dot/branch/commit and says what to do.
    pub error: String,
}

/// `GET /v1/version`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VersionInfo {
    /// The server's package version.
    pub version: String,
    /// [`API_VERSION`] of the server.
    pub api_version: u32,
    /// Short id of this server (the SERVER column of `dm list`).
    pub server_id: String,
    /// Set while the disk holding the data directory is full: the free
    /// bytes it needs before the server takes new data again.
    #[serde(default)]
    pub disk_full: Option<u64>,
}

/// A dot as listed by `GET /v1/dots`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DotSummary {
    /// Namespace (`admin` unless given).
    pub namespace: String,
    /// Dot name without namespace.
    pub name: String,
    /// `dot` in the default namespace, `ns/dot` otherwise.
    pub full_name: String,
    /// Internal numeric id of the dot.
    pub id: u64,
    /// Block size of the dot's files, fixed at creation.
    pub block_size: u32,
    /// Creation time, ns since the epoch.
    pub created_ns: u64,
    /// The branch unpinned mounts follow.
    pub current_branch: String,
    /// The branch checked out before it, while it exists (`dm checkout -`).
    #[serde(default)]
    pub previous_branch: Option<String>,
    /// All branch names.
    pub branches: Vec<String>,
    /// Server id holding the current branch.
    pub server: String,
    /// Running Docker containers using the dot.
    pub containers: Vec<String>,
    /// Bytes in the current branch's working state.
    pub size: u64,
    /// Commits reachable from the current branch's head.
    pub commits: u64,
    /// Uncommitted bytes on the current branch.
    pub dirty_bytes: u64,
    /// Whether the current branch has uncommitted changes, data or not.
    #[serde(default)]
    pub uncommitted: bool,
}

/// Full description of a dot: `GET /v1/dots/{ns}/{dot}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DotDetail {
    /// The summary fields.
    #[serde(flatten)]
    pub summary: DotSummary,
    /// Every branch in detail.
    pub branch_details: Vec<BranchView>,
    /// Mounts of this dot on this server.
    pub mounts: Vec<MountView>,
    /// Mounts the server's last start could not make again (kept for the
    /// next start; `dm unmount PATH` forgets one).
    #[serde(default)]
    pub unrestored: Vec<UnrestoredMount>,
    /// Running containers that follow the dot's current branch (not
    /// pinned with `@branch`): those a checkout stops and starts again.
    #[serde(default)]
    pub following: Vec<String>,
}

/// A mount that a start could not restore.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UnrestoredMount {
    /// Volume name.
    pub volume: String,
    /// Host path.
    pub path: String,
    /// Why it could not be mounted.
    pub error: String,
}

/// Where a branch grew from.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Origin {
    /// The branch it was created from.
    pub branch: String,
    /// The commit it forked at (64 hex digits).
    pub commit: String,
}

/// A branch of a dot.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BranchView {
    /// Branch name.
    pub name: String,
    /// Head commit id, None before the first commit.
    pub head: Option<String>,
    /// Number of commits reachable from the head.
    pub commits: u64,
    /// Where this branch was forked from (None for master).
    pub origin: Option<Origin>,
    /// Uncommitted bytes.
    pub dirty_bytes: u64,
    /// Whether it has uncommitted changes, data or not.
    #[serde(default)]
    pub uncommitted: bool,
    /// Bytes in the working state.
    pub size: u64,
    /// True for the dot's current branch.
    pub current: bool,
    /// Running Docker containers using this branch.
    pub containers: Vec<String>,
    /// In a checkout's answer: the branch that was current until this
    /// checkout made this one current (none when it was current already,
    /// perhaps made so by another checkout that ran meanwhile).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switched_from: Option<String>,
}

/// A commit.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CommitView {
    /// 64 hex digits.
    pub id: String,
    /// Parent ids.
    pub parents: Vec<String>,
    /// Author name.
    pub author: String,
    /// Commit message.
    pub message: String,
    /// Commit time, ns since the epoch.
    pub timestamp_ns: u64,
    /// User metadata (`dm commit -d key=value`).
    pub metadata: BTreeMap<String, String>,
    /// 1 for the first commit of a history.
    pub generation: u64,
}

/// `POST /v1/dots`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CreateDotRequest {
    /// `[ns/]dot`.
    pub name: String,
    /// Block size for the dot's files (server default when None).
    #[serde(default)]
    pub block_size: Option<u32>,
}

/// `POST /v1/dots/{ns}/{dot}/branches`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CreateBranchRequest {
    /// New branch name.
    pub name: String,
    /// Revision (on the current branch) to fork at; None = head of the current branch.
    #[serde(default)]
    pub from: Option<String>,
}

/// `POST /v1/dots/{ns}/{dot}/checkout`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckoutRequest {
    /// Branch to make current.
    pub branch: String,
    /// Create it from the current branch's head first (`dm checkout -b`).
    #[serde(default)]
    pub create: bool,
    /// With `create`: the revision it starts at instead (on the current
    /// branch: `HEAD^`, a commit id, another branch's name).
    #[serde(default)]
    pub start: Option<String>,
}

/// `POST /v1/dots/{ns}/{dot}/branches/{branch}/commits`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CommitRequest {
    /// Commit message (must not be empty).
    pub message: String,
    /// Author; the server uses `admin` for the local socket when None.
    #[serde(default)]
    pub author: Option<String>,
    /// Metadata; keys start with a lowercase letter.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

/// `POST /v1/dots/{ns}/{dot}/branches/{branch}/reset`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ResetRequest {
    /// Target revision: `HEAD`, `HEAD^`, `HEAD~3`, a commit id or unique prefix.
    pub rev: String,
    /// Discard uncommitted changes (without it a dirty branch is refused).
    #[serde(default)]
    pub hard: bool,
}

/// Answer of resolve and reset: the commit id a revision names.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ResolveResponse {
    /// 64 hex digits.
    pub id: String,
}

/// Answer of `POST .../reset`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ResetResponse {
    /// The commit the branch now points at (64 hex digits).
    pub id: String,
    /// That commit's message.
    #[serde(default)]
    pub message: String,
    /// How many commits the branch no longer has (those after `id`).
    #[serde(default)]
    pub dropped: usize,
    /// How many of those no other branch has either: destroyed.
    #[serde(default)]
    pub destroyed: usize,
    /// Mounts showing the branch where processes other than containers
    /// held files open across a hard reset: they now see the reset state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held_open: Vec<HeldOpen>,
}

/// Files open on one mount.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HeldOpen {
    /// The mount's path.
    pub path: String,
    /// How many files were open there.
    pub files: usize,
    /// The host processes that held them (servers before 2026-12-07 send
    /// none).
    #[serde(default)]
    pub processes: Vec<HeldBy>,
}

/// A process that holds files open.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HeldBy {
    /// Its command name.
    pub name: String,
    pub pid: u32,
}

impl std::fmt::Display for HeldBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (pid {})", self.name, self.pid)
    }
}

/// Query of `GET .../commits`: without it, the branch's whole history.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LogQuery {
    /// Up to this commit (full id) of the branch instead of its head.
    #[serde(default)]
    pub until: Option<String>,
    /// Only the N latest commits (of those up to `until`).
    #[serde(default)]
    pub max: Option<usize>,
}

/// Query of `GET .../resolve`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ResolveQuery {
    /// The revision to resolve.
    pub rev: String,
}

/// Query of `GET .../diff`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DiffQuery {
    /// From revision; None = branch head.
    #[serde(default)]
    pub from: Option<String>,
    /// To revision; None = the working state.
    #[serde(default)]
    pub to: Option<String>,
}

/// One changed path.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChangeView {
    /// `added`, `modified`, `deleted` or `renamed`.
    pub kind: String,
    /// Path inside the dot, `/subdot/dir/file`.
    pub path: String,
    /// Old path of a rename.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// The path's bytes, when they are not UTF-8 (`path` then shows each
    /// byte that is not as U+FFFD).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_bytes: Option<Vec<u8>>,
    /// The old path's bytes, when they are not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_bytes: Option<Vec<u8>>,
}

/// `GET .../diff`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DiffResponse {
    /// Resolved from commit (None = empty tree).
    pub from: Option<String>,
    /// Resolved to commit (None = working state).
    pub to: Option<String>,
    /// Changes, sorted by path.
    pub changes: Vec<ChangeView>,
}

/// `GET .../status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusResponse {
    /// Dot full name.
    pub dot: String,
    /// Branch name.
    pub branch: String,
    /// Head commit.
    pub head: Option<String>,
    /// True when the working state differs from the head.
    pub dirty: bool,
    /// Uncommitted bytes.
    pub dirty_bytes: u64,
    /// Changed paths since the head.
    pub changes: Vec<ChangeView>,
    /// Empty subdot directories that mounts made (`/sub`): not changes
    /// (neither in `changes` nor `dirty`), but the next commit records them.
    #[serde(default)]
    pub mount_made: Vec<String>,
}

/// `POST /v1/mounts`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MountRequest {
    /// `[ns/]dot[@branch][.subdot]`.
    pub volume: String,
    /// Absolute host path; None = a path under the server's mount dir.
    #[serde(default)]
    pub path: Option<String>,
}

/// `POST /v1/mounts/unmount`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UnmountRequest {
    /// The mount's path.
    pub path: String,
    /// Unmount even with files open there (detached lazily: the processes
    /// keep what they have open).
    #[serde(default)]
    pub force: bool,
}

/// Answer of `POST /v1/mounts/unmount`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct UnmountResponse {
    /// The mount was in use (by a process the server cannot see: another
    /// user's, when it does not run as root) and was only detached lazily:
    /// that process goes on using the dot through it until it leaves.
    #[serde(default)]
    pub detached_busy: bool,
}

/// A mount of a dot on this server.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MountView {
    /// Canonical volume name.
    pub volume: String,
    /// Dot full name.
    pub dot: String,
    /// Branch shown right now.
    pub branch: String,
    /// True for `dot@branch` mounts (they do not follow checkouts).
    pub pinned: bool,
    /// Subdot shown (`__default__`, `__root__`, or a name).
    pub subdot: String,
    /// Host path.
    pub path: String,
}

/// `POST /v1/gc`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GcResponse {
    /// Chunks removed.
    pub chunks_deleted: u64,
    /// Metadata objects removed.
    pub objects_deleted: u64,
    /// Stored bytes of what was deleted.
    pub bytes_freed: u64,
    /// Chunk log bytes given back to the disk (sparse segments compacted).
    #[serde(default)]
    pub log_bytes_freed: u64,
    /// Bytes RocksDB's files shrank by (GC compacts them after deleting
    /// many small chunks and tree nodes).
    #[serde(default)]
    pub table_bytes_freed: u64,
    /// Set while the disk is still full: the free bytes it needs before
    /// dm takes new data again.
    #[serde(default)]
    pub disk_full: Option<u64>,
}

/// `POST /v1/fsck`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FsckResponse {
    /// Objects verified.
    pub objects_checked: u64,
    /// Chunks verified.
    pub chunks_checked: u64,
    /// Problems found (empty = healthy).
    pub problems: Vec<String>,
    /// What fsck cannot call a problem or not (changes RocksDB's
    /// recovery dropped at the last start).
    #[serde(default)]
    pub notes: Vec<String>,
}

/// Empty success body `{}`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Empty {}

/// Percent-encodes a path segment or query value (everything except
/// `A-Za-z0-9-_.~`).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `/v1/dots/{ns}/{dot}`.
pub fn dot_path(namespace: &str, dot: &str) -> String {
    format!("{PREFIX}/dots/{}/{}", encode(namespace), encode(dot))
}

/// `/v1/dots/{ns}/{dot}/branches/{branch}`.
pub fn branch_path(namespace: &str, dot: &str, branch: &str) -> String {
    format!("{}/branches/{}", dot_path(namespace, dot), encode(branch))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes() {
        assert_eq!(encode("HEAD^"), "HEAD%5E");
        assert_eq!(encode("a b/c"), "a%20b%2Fc");
        assert_eq!(
            branch_path("admin", "x", "m"),
            "/v1/dots/admin/x/branches/m"
        );
    }
}
