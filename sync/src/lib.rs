//! dm-sync: push, pull and clone of dots between dm servers over QUIC.
//!
//! A hub ([`server::Hub`]) serves the dots of its store; a client
//! ([`client::Remote`]) connects with a user name and API key, pinning the
//! hub's certificate fingerprint. [`client::push`] sends only the commits,
//! changed tree nodes and chunks the hub lacks; [`client::pull`] fetches
//! only what the local store lacks. The wire protocol is in
//! docs/protocol.md.

pub mod client;
pub mod delta;
pub mod error;
pub mod progress;
pub mod proto;
pub mod server;
pub mod tls;
pub mod users;

pub use client::{
    delete_branch, fetch_for_pull, host_port, probe_fingerprint, pull, push, FetchedPull, Remote,
    RemoteSpec, TransferOptions, TransferReport,
};
pub use error::{Error, Result};
pub use progress::{Bar, Progress};
pub use server::{Hub, LiveBranches};
pub use tls::Trust;
