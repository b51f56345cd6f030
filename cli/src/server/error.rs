//! API errors: an HTTP status plus `{"error": "..."}`.

use crate::api::ErrorBody;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

/// An error answered to an API client.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// User-facing message.
    pub message: String,
}

/// Result of handlers and server-side helpers.
pub type ApiResult<T> = std::result::Result<T, ApiError>;

impl ApiError {
    /// 400: the request is malformed or names something invalid.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
        }
    }

    /// 409: refused because of the current state.
    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::CONFLICT,
            message: message.into(),
        }
    }

    /// 500.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
        }
    }
}

/// What a full disk under the data directory needs from the user.
const DISK_FULL: &str =
    "The disk that holds dm's data directory is full. dm now refuses new data and keeps the \
     room it reserved for freeing space: delete files in the dot, branches (`dm branch -d`) or \
     dots (`dm dot delete`), or `dm reset --hard` away uncommitted data, then run `dm gc` (or free \
     space outside dm); new data is taken again once enough is free (`dm gc` and `dm version` \
     say how much)";

/// What a full disk needs once RocksDB itself met it (its own words,
/// "IO error: No space left on device"): it then takes no write, a
/// deletion's included, so the advice to delete in dm failed every time.
const DISK_FULL_DATABASE: &str =
    "The disk that holds dm's data directory is full, and dm's database met it: it takes no \
     writes, deletions included, until space is freed outside dm (about 64 MiB: what else is on \
     that disk). dm goes on by itself then; `dm version` says whether the disk is still full";

/// The answer to an error of a full disk (ENOSPC, from the chunk log or
/// RocksDB), if it is one.
fn disk_full(errno: i32, message: &str) -> Option<ApiError> {
    (errno == dm_store::error::libc_consts::ENOSPC || message.contains("No space left on device"))
        .then(|| ApiError {
            status: StatusCode::INSUFFICIENT_STORAGE,
            message: format!(
                "{message}. {}",
                if message.contains("IO error: No space left on device") {
                    DISK_FULL_DATABASE
                } else {
                    DISK_FULL
                }
            ),
        })
}

/// The message of a failed transfer, with what to do when a disk filled:
/// this machine's, or (`remote`: the error came from the hub) the hub's,
/// where nothing done here would help.
pub fn job_error(message: String, remote: Option<&dm_sync::proto::ErrorCode>) -> String {
    use dm_sync::proto::ErrorCode;
    let Some(full) = disk_full(0, &message) else {
        return match remote {
            // Said as the hub's: the same words from this machine's store
            // sent users to check theirs, which was fine.
            Some(ErrorCode::Corrupt | ErrorCode::Internal) => format!(
                "the hub could not serve this: {message}. That is the hub's store, not this \
                 machine's; its admin can run `dm fsck` there"
            ),
            _ => message,
        };
    };
    if remote.is_some() {
        return format!(
            "the hub's disk is full: it could not store what was sent ({message}). Nothing on \
             this machine needs to change: once the hub's admin frees space there, the same \
             command goes on from what arrived. Space freed outside dm keeps that; deleting \
             dots or branches on the hub and then `dm gc` there also drops what this transfer \
             sent so far (it holds no branch yet), and the command starts over"
        );
    }
    format!(
        "{}. What this pull or clone received is not kept on a full disk: the GC that the \
         server runs every minute while the disk is full frees it, and the next run fetches \
         it again; free space outside dm (or in dm, as above), then run the same command again",
        full.message
    )
}

impl From<dm_store::Error> for ApiError {
    fn from(e: dm_store::Error) -> ApiError {
        use dm_store::Error as E;
        let message = e.to_string();
        if let Some(full) = disk_full(e.errno(), &message) {
            return full;
        }
        let status = match &e {
            E::InvalidName { .. } | E::BadRevision(_) => StatusCode::BAD_REQUEST,
            E::NotFound { .. } => StatusCode::NOT_FOUND,
            E::AlreadyExists { .. } | E::Refused(_) => StatusCode::CONFLICT,
            E::Fs { .. } => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError { status, message }
    }
}

impl From<std::io::Error> for ApiError {
    fn from(e: std::io::Error) -> ApiError {
        let message = e.to_string();
        disk_full(e.raw_os_error().unwrap_or(0), &message)
            .unwrap_or_else(|| ApiError::internal(message))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, "{}", self.message);
        } else {
            tracing::info!(status = %self.status, "{}", self.message);
        }
        (
            self.status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::job_error;
    use dm_sync::proto::ErrorCode;

    #[test]
    fn a_full_disk_in_a_transfer_says_whose_and_what_to_do_there() {
        let msg = "storing the chunks of a transfer: No space left on device (os error 28)";
        let here = job_error(msg.to_string(), None);
        assert!(here.contains("dm's data directory is full") && here.contains("not kept"));
        let hub = job_error(msg.to_string(), Some(&ErrorCode::Internal));
        assert!(hub.starts_with("the hub's disk is full"), "{hub}");
        assert!(!hub.contains("dm branch -d"), "no local advice: {hub}");
        let other = "remote branch master moved".to_string();
        assert_eq!(job_error(other.clone(), Some(&ErrorCode::Refused)), other);
        let bad = "chunk 49a2e89 in segment 00000002.log at offset 12: checksum mismatch";
        let hub = job_error(bad.to_string(), Some(&ErrorCode::Corrupt));
        assert!(
            hub.starts_with("the hub could not serve this: chunk"),
            "{hub}"
        );
        assert_eq!(job_error(bad.to_string(), None), bad);
    }

    /// Once RocksDB itself met the full disk, nothing deleted in dm helps:
    /// the advice is to free space outside it (it was to delete in dm,
    /// which failed every time).
    #[test]
    fn a_full_disk_the_database_met_is_freed_outside_dm() {
        let db = "database error while committing branch master of dot app: IO error: No space \
                  left on device: While appending to file: /d/store/db/000053.log: No space left \
                  on device";
        let e = super::disk_full(0, db).expect("a full disk");
        assert!(
            e.message.contains("space is freed outside dm") && !e.message.contains("dm branch -d"),
            "{}",
            e.message
        );
        let chunks = "writing to app@master: No space left on device (os error 28)";
        let e = super::disk_full(28, chunks).expect("a full disk");
        assert!(e.message.contains("dm branch -d"), "{}", e.message);
    }
}
