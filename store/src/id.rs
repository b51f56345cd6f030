//! Content ids: blake3 hashes of stored bytes.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt;

/// A 32-byte blake3 content id (of a chunk's uncompressed bytes, or of an
/// object's encoded bytes).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Id(pub [u8; 32]);

impl Id {
    /// The id of `bytes`.
    pub fn of(bytes: &[u8]) -> Id {
        Id(*blake3::hash(bytes).as_bytes())
    }

    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 7 hex digits, for display.
    pub fn short(&self) -> String {
        self.to_hex()[..7].to_string()
    }

    /// Parses a full 64-digit hex id.
    pub fn from_hex(s: &str) -> Result<Id> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out)
            .map_err(|_| Error::BadRevision(format!("{s:?} is not a 64-digit hex commit id")))?;
        Ok(Id(out))
    }

    /// Builds an id from a 32-byte slice (keys read back from the database).
    pub fn from_slice(b: &[u8]) -> Result<Id> {
        let arr: [u8; 32] = b
            .try_into()
            .map_err(|_| Error::Corrupt(format!("id of {} bytes, expected 32", b.len())))?;
        Ok(Id(arr))
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Id({})", self.short())
    }
}
