//! Typed errors of push, pull and the hub.

use crate::proto::ErrorCode;

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong in a transfer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The local store failed or refused.
    #[error("{0}")]
    Store(#[from] dm_store::Error),
    /// The remote answered with an error (wrong key, no access, unknown
    /// dot, refused, ...).
    #[error("{message}")]
    Remote {
        /// What kind of error (callers match on it).
        code: ErrorCode,
        /// The remote's explanation.
        message: String,
    },
    /// The two sides' histories are such that the transfer cannot proceed
    /// as asked (diverged, destination ahead, remote branch moved...).
    #[error("{0}")]
    Refused(String),
    /// The connection failed or the peer broke the protocol.
    #[error("{0}")]
    Connection(String),
    /// A local file (certificate, key) could not be read or written.
    #[error("{context}: {cause}")]
    Io {
        /// What we were doing.
        context: String,
        /// The cause (in the message, not a `source`: shown by a chain of
        /// causes, it read twice).
        cause: std::io::Error,
    },
    /// TLS setup failed.
    #[error("TLS: {0}")]
    Tls(String),
}

impl Error {
    /// Shorthand for an I/O error with context.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |cause| Error::Io { context, cause }
    }

    /// The remote error code, if this came from the remote.
    pub fn code(&self) -> Option<&ErrorCode> {
        match self {
            Error::Remote { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// Why a connection was lost, in words: a peer that went silent (killed,
/// frozen, or cut off by the network) shows as a timeout.
fn lost(e: &quinn::ConnectionError) -> String {
    match e {
        quinn::ConnectionError::TimedOut => format!(
            "no answer from the other side for {} s (stopped, frozen, or cut off by the network)",
            crate::tls::IDLE_TIMEOUT.as_secs()
        ),
        e => e.to_string(),
    }
}

impl From<quinn::ConnectionError> for Error {
    fn from(e: quinn::ConnectionError) -> Self {
        Error::Connection(format!("connection lost: {}", lost(&e)))
    }
}
impl From<quinn::WriteError> for Error {
    fn from(e: quinn::WriteError) -> Self {
        match e {
            quinn::WriteError::ConnectionLost(c) => {
                Error::Connection(format!("sending: connection lost: {}", lost(&c)))
            }
            e => Error::Connection(format!("sending: {e}")),
        }
    }
}
impl From<quinn::ReadExactError> for Error {
    fn from(e: quinn::ReadExactError) -> Self {
        match e {
            quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(c)) => {
                Error::Connection(format!("receiving: connection lost: {}", lost(&c)))
            }
            e => Error::Connection(format!("receiving: {e}")),
        }
    }
}
impl From<quinn::ClosedStream> for Error {
    fn from(e: quinn::ClosedStream) -> Self {
        Error::Connection(format!("stream closed: {e}"))
    }
}
impl From<tokio::task::JoinError> for Error {
    fn from(e: tokio::task::JoinError) -> Self {
        Error::Connection(format!("internal task failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::Error;

    #[test]
    fn a_silent_peer_is_said_to_be_silent() {
        let e: Error = quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(
            quinn::ConnectionError::TimedOut,
        ))
        .into();
        let m = e.to_string();
        assert!(
            m.starts_with("receiving: connection lost: no answer"),
            "{m}"
        );
        assert!(m.contains("30 s"), "{m}");
    }
}
