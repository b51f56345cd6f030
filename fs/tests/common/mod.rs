//! Shared by the FUSE test binaries.

use std::path::Path;

/// Whether this process may mount (root, /dev/fuse); says why not.
pub fn can_mount() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || !Path::new("/dev/fuse").exists() {
        eprintln!("skipping: needs root and /dev/fuse");
        return false;
    }
    true
}
