//! Key layout of a snapshot tree (and of a branch's working overlay, which
//! uses the same keys under the branch's prefix). All integers big-endian so
//! that byte order is numeric order. See docs/format.md.
//!
//! | key | value |
//! |---|---|
//! | `ino:8 00` | inode record ([`crate::inode::InodeRec`]) |
//! | `ino:8 01 hash:8 name` | directory entry ([`crate::inode::Dirent`]) |
//! | `ino:8 02 index:8` | block: chunk id (32) + valid length (u32 LE) |
//! | `ino:8 03 name` | extended attribute value |
//! | `0:8 00` | superblock ([`crate::inode::Super`]) |
//! | `0:8 04 ino:8` | orphan: unlinked while open, to purge |

pub const TAG_INODE: u8 = 0;
pub const TAG_DIRENT: u8 = 1;
pub const TAG_BLOCK: u8 = 2;
pub const TAG_XATTR: u8 = 3;
pub const TAG_ORPHAN: u8 = 4;

/// The superblock pseudo-inode.
pub const SUPER_INO: u64 = 0;

pub fn prefix(ino: u64, tag: u8) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.extend_from_slice(&ino.to_be_bytes());
    k.push(tag);
    k
}

/// End (exclusive) of the key range with `prefix(ino, tag)`.
pub fn prefix_end(ino: u64, tag: u8) -> Vec<u8> {
    let mut k = prefix(ino, tag);
    // tag < 255, so incrementing it gives the exclusive end.
    *k.last_mut().expect("prefix is 9 bytes") += 1;
    k
}

pub fn inode(ino: u64) -> Vec<u8> {
    prefix(ino, TAG_INODE)
}

pub fn superblock() -> Vec<u8> {
    inode(SUPER_INO)
}

/// Readdir cookie of a name: stable, >= 3 (1 and 2 are "." and "..").
pub fn name_hash(name: &[u8]) -> u64 {
    let h = blake3::hash(name);
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.as_bytes()[..8]);
    (u64::from_le_bytes(b) >> 2) + 3
}

pub fn dirent(parent: u64, name: &[u8]) -> Vec<u8> {
    let mut k = prefix(parent, TAG_DIRENT);
    k.extend_from_slice(&name_hash(name).to_be_bytes());
    k.extend_from_slice(name);
    k
}

/// First dirent key of `parent` with cookie >= `cookie`.
pub fn dirent_from(parent: u64, cookie: u64) -> Vec<u8> {
    let mut k = prefix(parent, TAG_DIRENT);
    k.extend_from_slice(&cookie.to_be_bytes());
    k
}

/// Splits a dirent key into (cookie, name).
pub fn parse_dirent(key: &[u8]) -> Option<(u64, &[u8])> {
    if key.len() < 17 || key[8] != TAG_DIRENT {
        return None;
    }
    let cookie = u64::from_be_bytes(key[9..17].try_into().ok()?);
    Some((cookie, &key[17..]))
}

pub fn block(ino: u64, index: u64) -> Vec<u8> {
    let mut k = prefix(ino, TAG_BLOCK);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

/// The block index of a block key.
pub fn parse_block(key: &[u8]) -> Option<u64> {
    if key.len() != 17 || key[8] != TAG_BLOCK {
        return None;
    }
    Some(u64::from_be_bytes(key[9..17].try_into().ok()?))
}

/// The smallest key after `key` (for going on with a scan past it).
pub fn next_key(key: &[u8]) -> Vec<u8> {
    let mut k = key.to_vec();
    k.push(0);
    k
}

pub fn xattr(ino: u64, name: &[u8]) -> Vec<u8> {
    let mut k = prefix(ino, TAG_XATTR);
    k.extend_from_slice(name);
    k
}

pub fn orphan(ino: u64) -> Vec<u8> {
    let mut k = prefix(SUPER_INO, TAG_ORPHAN);
    k.extend_from_slice(&ino.to_be_bytes());
    k
}

/// The inode number an orphan marker key ([`orphan`]) names.
pub fn parse_orphan(key: &[u8]) -> Option<u64> {
    match (parse(key), key.len()) {
        (Some((SUPER_INO, TAG_ORPHAN)), 17) => {
            Some(u64::from_be_bytes(key[9..17].try_into().ok()?))
        }
        _ => None,
    }
}

/// The inode number and tag of any tree key.
pub fn parse(key: &[u8]) -> Option<(u64, u8)> {
    if key.len() < 9 {
        return None;
    }
    Some((u64::from_be_bytes(key[..8].try_into().ok()?), key[8]))
}

/// Block value: chunk id + valid length.
pub fn block_value(id: &crate::Id, len: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(36);
    v.extend_from_slice(&id.0);
    v.extend_from_slice(&len.to_le_bytes());
    v
}

pub fn parse_block_value(v: &[u8]) -> Option<(crate::Id, u32)> {
    if v.len() != 36 {
        return None;
    }
    let id = crate::Id(v[..32].try_into().ok()?);
    Some((id, u32::from_le_bytes(v[32..36].try_into().ok()?)))
}
