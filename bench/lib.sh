# Sourced by the macro benchmarks (bench/*/*.sh): the dm binary, a private
# work directory with its own `dm server`, and PostgreSQL helpers.
#   . "$(dirname "$0")/../lib.sh"; bench_workdir dm-NAME; start_server
# DM=/path/to/dm runs another build (an older one, for a comparison).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/dm-target}"
DM="${DM:-$CARGO_TARGET_DIR/release/dm}"
[ -x "$DM" ] || cargo build --release -p dm-cli >&2

# bench_workdir PREFIX: a fresh $work under /var/tmp for the server's data,
# mounts, socket and log (readable by others: PostgreSQL runs as postgres).
bench_workdir() {
  work=$(mktemp -d "/var/tmp/$1.XXXXXX")
  chmod 755 "$work"
  export DM_SOCKET="$work/dm.sock" DM_CONFIG="$work/config.toml"
}

# start_server [VAR=VALUE...]: starts `dm server` on $work with those
# variables in its environment ($server is its pid) and waits until it
# answers. Flags an older binary lacks are left out.
server=
start_server() {
  local help flags=()
  help=$("$DM" server --help)
  grep -q -- --no-plugin <<<"$help" && flags+=(--no-plugin)
  grep -q -- --listen <<<"$help" && flags+=(--listen off)
  env "$@" "$DM" server --data-dir "$work/data" --mount-dir "$work/mnt" --socket "$DM_SOCKET" \
    "${flags[@]}" >>"$work/server.log" 2>&1 &
  server=$!
  for _ in $(seq 1 200); do "$DM" version >/dev/null 2>&1 && return; sleep 0.05; done
  echo "dm server did not start; see $work/server.log" >&2
  exit 1
}
stop_server() {
  [ -n "$server" ] || return 0
  kill -TERM "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
}

# PostgreSQL from Debian's packages, on a private port and socket directory
# ($sock, made by pg_sockdir).
PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
port=$((40000 + $$ % 10000))
need_pg() { [ -x "$PGBIN/pgbench" ] || { echo "PostgreSQL is not installed (ci/install-deps.sh)" >&2; exit 1; }; }
pg_sockdir() { sock="$work/pgsock"; mkdir -p "$sock"; chown postgres:postgres "$sock"; }
pg() { runuser -u postgres -- "$PGBIN/$1" "${@:2}"; }
pg_start() { rm -f "$1/postmaster.pid"; pg pg_ctl -D "$1" -o "-p $port -k $sock -c listen_addresses=''" -l "$sock/pg.log" -w -t 120 start >/dev/null; }
pg_stop() { pg pg_ctl -D "$1" -m fast -w -t 120 stop >/dev/null 2>&1 || true; }
pgb() { pg pgbench -h "$sock" -p "$port" -U postgres "$@" postgres; }
