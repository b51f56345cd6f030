//! Sections whose feature lives in another issue and does not exist yet.
//! Each is the function to fill in: replace the body with the measurement
//! (baseline and dm measured in the same run, reported as a ratio).

use super::{Ctx, Outcome};
use anyhow::Result;

/// FUSE vs native: fio (seq/rand read/write, 4 KiB and 1 MiB) on a dm-fs
/// mount vs an ext4 directory on the same disk; ratio dm/native.
pub fn fuse_vs_native(_ctx: &mut Ctx) -> Result<Outcome> {
    Ok(Outcome::NotMeasured(
        "needs the FUSE issue's macro benchmark: mount a dot through dm-fs (or `dm server`) \
         and run the same fio jobs there and on a native directory"
            .into(),
    ))
}

/// Push bytes: bytes on the wire for a push after a change vs the ideal
/// (compressed chunks the receiver lacks + new metadata) and vs rsync of the
/// same directories.
pub fn push_bytes(_ctx: &mut Ctx) -> Result<Outcome> {
    Ok(Outcome::NotMeasured(
        "needs push/pull (the sync issue, QUIC): count wire bytes of `dm push` after each \
         data-set snapshot and compare with the dedup section's added bytes and with \
         `rsync --stats`"
            .into(),
    ))
}

/// PostgreSQL TPS: pgbench on a data directory in a dm mount vs native.
pub fn postgres_tps(_ctx: &mut Ctx) -> Result<Outcome> {
    Ok(Outcome::NotMeasured(
        "needs PostgreSQL end-to-end on a dm mount (the PostgreSQL issue): pgbench TPS on a \
         dot vs on a native directory, same scale and client count"
            .into(),
    ))
}
