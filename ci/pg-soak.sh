#!/usr/bin/env bash
# Soak: the PostgreSQL crash-safety test (kill -9 of the dm daemon under
# pgbench, restart, recovery, pg_amcheck) with 100 rounds instead of the
# default run's 5. Not part of ci/test.sh. Run as root:  bash ci/pg-soak.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/dm-target}"
DM_PG_CRASH_ROUNDS="${1:-100}" cargo test --release -p dm-cli --test postgres \
  -- postgres_survives_dm_kill9_under_pgbench --exact --nocapture
