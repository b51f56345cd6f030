#!/usr/bin/env bash
# PostgreSQL on dm vs on a native directory, in the same run (issue 6):
#  - pgbench TPS (scale 10, 2 clients, fixed time) on a native dir and on dm
#    mounts with block sizes 8K, 16K, 64K, 128K; ratio dm/native;
#  - the time of `dm commit` while pgbench runs, and pgbench's TPS with a
#    commit every COMMIT_EVERY (2) seconds against without;
#  - the store's size after 10 commits of a growing pgbench database vs 10
#    full copies of the data directory (dedup at work).
# Prints a Markdown report on stdout. Run as root:
#   bash bench/pg/pgbench.sh            (PGBENCH_SECONDS=30 by default)
. "$(dirname "$0")/../lib.sh"
SECS="${PGBENCH_SECONDS:-30}"
SIZES="${PGBENCH_BLOCK_SIZES:-8K 16K 64K 128K}"
need_pg
bench_workdir dm-pgbench
pg_sockdir
cleanup() {
  set +e
  for d in "$work"/native/pgdata "$work"/mnt/*/*/__default__/pgdata; do [ -d "$d" ] && pg_stop "$d"; done
  stop_server
  rm -rf "$work"
}
trap cleanup EXIT

# Creates a cluster in $1, loads scale 10, runs pgbench; prints TPS.
tps_of() {
  local dir=$1
  mkdir -p "$dir"; chown postgres:postgres "$dir"
  pg initdb -D "$dir" -A trust -U postgres >/dev/null
  pg_start "$dir"
  pgb -i -s 10 -q >/dev/null 2>&1
  local out; out=$(pgb -c 2 -j 2 -T "$SECS" -n 2>&1)
  pg_stop "$dir"
  echo "$out" | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | tail -1
}

start_server
echo "# PostgreSQL on dm vs native"
echo
echo "Machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB RAM, disk $(df -h "$work" | awk 'NR==2{print $1, $2}'), $("$PGBIN/postgres" --version)."
echo "Command: \`PGBENCH_SECONDS=$SECS bash bench/pg/pgbench.sh\` (pgbench scale 10, 2 clients, ${SECS}s, fsync on)."
echo
native=$(tps_of "$work/native/pgdata")
rm -rf "$work/native"
echo "| data directory | block size | TPS | ratio vs native |"
echo "|---|---|---|---|"
echo "| native ($(df -T "$work" | awk 'NR==2{print $2}')) | - | $native | 1.00 |"
for bs in $SIZES; do
  dot="pg$bs"
  "$DM" init "$dot" --block-size "$bs" >/dev/null
  path=$("$DM" --dot "$dot" mount "$dot")
  t=$(tps_of "$path/pgdata")
  echo "| dm | $bs | $t | $(awk -v a="$t" -v b="$native" 'BEGIN{printf "%.2f", a/b}') |"
done
echo

# Commit time while pgbench runs, and dedup over 10 commits.
dot=pgdedup
"$DM" init "$dot" >/dev/null
path=$("$DM" --dot "$dot" mount "$dot")
dir="$path/pgdata"; mkdir -p "$dir"; chown postgres:postgres "$dir"
pg initdb -D "$dir" -A trust -U postgres >/dev/null
pg_start "$dir"
pgb -i -s 10 -q >/dev/null 2>&1
before=$(du -sb "$work/data" | cut -f1)
copies=0
times=()
for i in $(seq 1 10); do
  pgb -c 2 -j 2 -T 3 -n >/dev/null 2>&1 &
  bench=$!
  sleep 1.5
  t0=$(date +%s%N)
  "$DM" --dot "$dot" commit -m "pgbench $i" >/dev/null
  t1=$(date +%s%N)
  times+=($(( (t1 - t0) / 1000000 )))
  wait $bench
  copies=$((copies + $(du -sb "$dir" | cut -f1)))
done
pg_stop "$dir"
sleep 2
after=$(du -sb "$work/data" | cut -f1)

# Throughput while someone commits every COMMIT_EVERY seconds, against
# the same dot without commits, alternating (the commits hold the
# branch's writers while they store what changed).
every="${COMMIT_EVERY:-2}"
pg_start "$dir"
quiet_tps=(); busy_tps=(); ctimes=()
for round in 1 2; do
  quiet_tps+=($(pgb -c 2 -j 2 -T "$SECS" -n 2>&1 | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | tail -1))
  pgb -c 2 -j 2 -T "$SECS" -n >"$work/busy.out" 2>&1 &
  bench=$!
  while kill -0 "$bench" 2>/dev/null; do
    sleep "$every"
    kill -0 "$bench" 2>/dev/null || break
    t0=$(date +%s%N)
    "$DM" --dot "$dot" commit -m "under load $round" >/dev/null
    ctimes+=($(( ($(date +%s%N) - t0) / 1000000 )))
  done
  wait "$bench"
  busy_tps+=($(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$work/busy.out" | tail -1))
done
pg_stop "$dir"
sorted=$(printf '%s\n' "${times[@]}" | sort -n | tr '\n' ' ')
echo "## dm commit while pgbench runs"
echo
echo "10 commits during pgbench (ms, sorted): $sorted"
echo
echo "## TPS with a \`dm commit\` every ${every} s"
echo
echo "| round | TPS without commits | TPS with commits | ratio |"
echo "|---|---|---|---|"
for i in 0 1; do
  echo "| $((i + 1)) | ${quiet_tps[$i]} | ${busy_tps[$i]} | $(awk -v a="${busy_tps[$i]}" -v b="${quiet_tps[$i]}" 'BEGIN{printf "%.2f", a/b}') |"
done
echo
echo "${#ctimes[@]} commits meanwhile (ms, sorted): $(printf '%s\n' "${ctimes[@]}" | sort -n | tr '\n' ' ')"
echo
echo "## Space: 10 commits of a growing pgbench database"
echo
echo "| | bytes | ratio |"
echo "|---|---|---|"
echo "| 10 full copies of the data directory | $copies | 1.00 |"
echo "| dm store growth (working state + 10 commits) | $((after - before)) | $(awk -v a="$((after - before))" -v b="$copies" 'BEGIN{printf "%.3f", a/b}') |"
