#!/usr/bin/env bash
# Runs the whole test suite (what README's second quick-start command runs):
# every crate's unit, property, crash and end-to-end tests (real FUSE mounts,
# real `dm` binaries, Docker, PostgreSQL), then pjdfstest and fsx on a mount.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/dm-target}"
# What the tests need (idempotent: a no-op once installed), so this command
# alone works on a fresh machine, as the README says.
bash ci/install-deps.sh
cargo build --release --workspace --all-targets
cargo test --release --workspace -- --test-threads=2
# POSIX conformance and the file exerciser, on a real dm mount.
# The gate tolerates 2 failures: open::etxtbsy failed in 2 of 8 full runs on
# 2026-11-25 (another test's child, forked by the multithreaded runner, briefly
# holds the copied executable open for writing); usually 0.
PJD_MAX_FAILED="${PJD_MAX_FAILED:-2}" bash ci/fs-suites.sh
