#!/usr/bin/env bash
# Quick start: build dm, run `dm server`, create the dot `demo` and mount it.
# The server runs in the foreground; Ctrl-C stops it and unmounts cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/dm-target}"
bash ci/install-deps.sh
cargo build --release -p dm-cli
DM="$CARGO_TARGET_DIR/release/dm"
install -m 0755 "$DM" /usr/local/bin/dm

dm server &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server' INT TERM
for _ in $(seq 1 100); do
  dm version >/dev/null 2>&1 && break
  sleep 0.1
done
dm dot show demo >/dev/null 2>&1 || dm init demo
dm switch demo
path=$(dm mount demo)
echo
echo "dm server is running (pid $server); the dot 'demo' is mounted at:"
echo "  $path"
echo "Try:  echo hello > $path/hello && dm commit -m hello && dm log"
echo "Ctrl-C stops the server."
wait $server
