#!/usr/bin/env bash
# Runs the whole test suite (what README's second quick-start command runs).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/dm-target}"
cargo build --release --workspace --all-targets
cargo test --release --workspace -- --test-threads=2
