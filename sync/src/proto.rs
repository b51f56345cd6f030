//! The wire protocol (see docs/protocol.md): one request and one response
//! per bidirectional QUIC stream, each a length-prefixed postcard frame.

use crate::error::{Error, Result};
use dm_store::Id;
use serde::{Deserialize, Serialize};

/// Protocol version sent in [`Request::Hello`]. Bumped on any incompatible
/// change; a server answers other versions with [`ErrorCode::Version`].
pub const PROTOCOL_VERSION: u32 = 1;
/// TLS ALPN of this protocol.
pub const ALPN: &[u8] = b"dm-sync/1";
/// Default UDP port of a hub.
pub const DEFAULT_PORT: u16 = 32607;
/// Largest frame either side accepts.
pub const MAX_FRAME: usize = 24 << 20;
/// Soft limit of the payload bytes in one batch of objects or chunks.
pub const BATCH_BYTES: usize = 4 << 20;
/// Most ids in one has-query or fetch.
pub const BATCH_IDS: usize = 4096;

/// True for the block sizes a dot may have: powers of two, 4 KiB to 4 MiB.
pub fn valid_block_size(b: u32) -> bool {
    b.is_power_of_two() && (4096..=(4 << 20)).contains(&b)
}

/// A dot on the hub: `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DotRef {
    /// Owner namespace (a user name).
    pub namespace: String,
    /// Dot name.
    pub name: String,
}

/// A request. The first one on a connection must be `Hello`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Request {
    /// Authenticates the connection.
    Hello {
        /// [`PROTOCOL_VERSION`] of the client.
        version: u32,
        /// User name.
        user: String,
        /// API key.
        key: String,
    },
    /// The dot's block size and branch heads (read access).
    Branches {
        /// The dot.
        dot: DotRef,
    },
    /// The commit ids of `head`'s ancestry, newest first (read access).
    Ancestry {
        /// The dot.
        dot: DotRef,
        /// A commit of the dot.
        head: Id,
    },
    /// Which objects the hub has.
    HasObjects {
        /// The ids.
        ids: Vec<Id>,
    },
    /// Which chunks the hub has.
    HasChunks {
        /// The ids.
        ids: Vec<Id>,
    },
    /// Stored forms of objects (read access to `dot`).
    GetObjects {
        /// The dot the objects belong to.
        dot: DotRef,
        /// The ids.
        ids: Vec<Id>,
    },
    /// Stored forms of chunks (read access to `dot`).
    GetChunks {
        /// The dot the chunks belong to.
        dot: DotRef,
        /// The ids.
        ids: Vec<Id>,
    },
    /// Imports objects in order, each verified (write access to `dot`).
    PutObjects {
        /// The dot they are for.
        dot: DotRef,
        /// (id, stored form).
        items: Vec<(Id, Vec<u8>)>,
    },
    /// Imports chunks, each verified (write access to `dot`).
    PutChunks {
        /// The dot they are for.
        dot: DotRef,
        /// (id, stored form).
        items: Vec<(Id, Vec<u8>)>,
    },
    /// Compare-and-swap of a branch head (write access); creates the dot
    /// and branch when missing.
    SetHead {
        /// The dot.
        dot: DotRef,
        /// The branch.
        branch: String,
        /// The head the client saw (None: no branch).
        expected: Option<Id>,
        /// The new head.
        new: Id,
        /// The sender's block size.
        block_size: u32,
    },
    /// [`Request::SetHead`] of `branch` from `expected` to `new` that first
    /// keeps `expected` on the new branch `keep_as` (a push with
    /// `--stash-on-divergence`): both or neither happen, so a refused move
    /// leaves no stash branch behind.
    SetHeadKeeping {
        /// The dot.
        dot: DotRef,
        /// The branch.
        branch: String,
        /// The head the client saw, kept on `keep_as`.
        expected: Id,
        /// The new head.
        new: Id,
        /// The sender's block size.
        block_size: u32,
        /// The branch to create at `expected`; must not exist.
        keep_as: String,
    },
    /// Deletes a branch of the dot (write access; `dm push --delete`).
    /// Answered with `Ids` holding its head (empty: it had no commit).
    /// Refused for the dot's current branch on the hub, one with
    /// uncommitted changes or in use there, and, without `force`, one with
    /// commits no other branch of the dot has.
    DeleteBranch {
        /// The dot.
        dot: DotRef,
        /// The branch.
        branch: String,
        /// Delete it even if its commits are on no other branch.
        force: bool,
    },
}

/// Why the hub refused a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// Unsupported protocol version.
    Version,
    /// Unknown user or wrong API key.
    BadKey,
    /// The user may not read or write this dot.
    NoAccess,
    /// No such dot (or branch).
    UnknownDot,
    /// The branch is not where the client expected.
    Moved {
        /// Its actual head.
        actual: Option<Id>,
    },
    /// Refused by the store (uncommitted changes, block size, ...).
    Refused,
    /// Data did not match its id, or arrived out of order.
    Corrupt,
    /// Malformed request.
    BadRequest,
    /// Server-side failure.
    Internal,
}

/// A response.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Response {
    /// Hello accepted.
    Welcome {
        /// The server's protocol version.
        version: u32,
    },
    /// Answer to `Branches`.
    Branches {
        /// Block size of the dot.
        block_size: u32,
        /// (branch, head).
        branches: Vec<(String, Option<Id>)>,
    },
    /// A list of ids.
    Ids(Vec<Id>),
    /// One bool per asked id.
    Bools(Vec<bool>),
    /// (id, stored form) for a prefix of the asked ids (the rest did not
    /// fit in one frame: ask again).
    Blobs(Vec<(Id, Vec<u8>)>),
    /// Done; `new` items were not stored before.
    Done {
        /// Newly stored items.
        new: u64,
    },
    /// Refused.
    Err {
        /// What kind of refusal.
        code: ErrorCode,
        /// Explanation for the user.
        message: String,
    },
}

/// Writes one frame.
pub async fn write_frame<T: Serialize>(send: &mut quinn::SendStream, v: &T) -> Result<()> {
    let body = postcard::to_stdvec(v).map_err(|e| Error::Connection(format!("encoding: {e}")))?;
    if body.len() > MAX_FRAME {
        return Err(Error::Connection(format!(
            "frame of {} bytes is over the limit",
            body.len()
        )));
    }
    send.write_all(&(body.len() as u32).to_be_bytes()).await?;
    send.write_all(&body).await?;
    Ok(())
}

/// Reads one frame.
pub async fn read_frame<T: for<'de> Deserialize<'de>>(recv: &mut quinn::RecvStream) -> Result<T> {
    read_frame_limited(recv, MAX_FRAME).await
}

/// Reads one frame of at most `limit` bytes (the hub reads `Hello`, from
/// peers not yet authenticated, with a small limit).
pub async fn read_frame_limited<T: for<'de> Deserialize<'de>>(
    recv: &mut quinn::RecvStream,
    limit: usize,
) -> Result<T> {
    read_frame_within(recv, limit, None).await
}

/// Reads one frame of at most `limit` bytes; with `first`, fails when its
/// first bytes (the length) do not arrive within that time. Only the wait
/// is bounded: the body, however large, may take as long as the link needs.
pub async fn read_frame_within<T: for<'de> Deserialize<'de>>(
    recv: &mut quinn::RecvStream,
    limit: usize,
    first: Option<std::time::Duration>,
) -> Result<T> {
    let mut len = [0u8; 4];
    match first {
        Some(t) => tokio::time::timeout(t, recv.read_exact(&mut len))
            .await
            .map_err(|_| {
                Error::Connection(format!("the hub did not answer within {} s", t.as_secs()))
            })??,
        None => recv.read_exact(&mut len).await?,
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > limit {
        return Err(Error::Connection(format!(
            "peer sent a frame of {len} bytes (limit {limit})"
        )));
    }
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await?;
    postcard::from_bytes(&body).map_err(|e| Error::Connection(format!("malformed frame: {e}")))
}
