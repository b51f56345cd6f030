//! Store types -> API views.

use crate::api::{BranchView, ChangeView, CommitView, DotSummary, Origin};
use dm_store::{BranchInfo, Change, ChangeKind, CommitInfo, DotInfo};

/// A dot summary from its info and its current branch.
pub fn dot_summary(info: &DotInfo, current: &BranchInfo, server: &str) -> DotSummary {
    DotSummary {
        namespace: info.name.namespace.clone(),
        name: info.name.name.clone(),
        full_name: info.name.to_string(),
        id: info.id,
        block_size: info.block_size,
        created_ns: info.created_ns,
        current_branch: info.current_branch.clone(),
        previous_branch: info.previous_branch.clone(),
        branches: info.branches.clone(),
        server: server.to_string(),
        containers: Vec::new(),
        size: current.size,
        commits: current.commits,
        dirty_bytes: current.dirty_bytes,
        uncommitted: current.uncommitted,
    }
}

/// A branch view.
pub fn branch_view(b: &BranchInfo, current: &str) -> BranchView {
    BranchView {
        name: b.name.clone(),
        head: b.head.map(|h| h.to_hex()),
        commits: b.commits,
        origin: b.origin.as_ref().map(|(branch, id)| Origin {
            branch: branch.clone(),
            commit: id.to_hex(),
        }),
        dirty_bytes: b.dirty_bytes,
        uncommitted: b.uncommitted,
        size: b.size,
        current: b.name == current,
        containers: Vec::new(),
        switched_from: None,
    }
}

/// A commit view.
pub fn commit_view(c: &CommitInfo) -> CommitView {
    CommitView {
        id: c.id.to_hex(),
        parents: c.parents.iter().map(|p| p.to_hex()).collect(),
        author: c.author.clone(),
        message: c.message.clone(),
        timestamp_ns: c.timestamp_ns,
        metadata: c.metadata.clone(),
        generation: c.generation,
    }
}

/// A change view.
pub fn change_view(c: &Change) -> ChangeView {
    let (kind, from) = match &c.kind {
        ChangeKind::Added => ("added", None),
        ChangeKind::Modified => ("modified", None),
        ChangeKind::Deleted => ("deleted", None),
        ChangeKind::Renamed { from } => ("renamed", Some(from.as_slice())),
    };
    // Shown as text; the bytes too where that loses some.
    let text = |p: &[u8]| String::from_utf8_lossy(p).into_owned();
    let bytes = |p: &[u8]| std::str::from_utf8(p).is_err().then(|| p.to_vec());
    ChangeView {
        kind: kind.to_string(),
        path: text(&c.path),
        from: from.map(text),
        path_bytes: bytes(&c.path),
        from_bytes: from.and_then(bytes),
    }
}
