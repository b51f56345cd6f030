#!/usr/bin/env bash
# Memory of `dm server` under a long write load, printed per round with its
# ratio to the first round's (the baseline, same run): a daemon whose memory
# is bounded levels off; one that leaks keeps climbing. Also prints the
# store's own accounting (RocksDB memtables and block cache, dm's chunk
# cache, write buffers) from the server's log at the end.
#  WORKLOAD=files (default): each round writes MB MiB (default 100) of fresh
#    data in 1 MiB writes to new files with an fsync each, makes random 8 KiB
#    overwrites of a 64 MiB file with an fsync every 16 for
#    SECONDS_PER_ROUND seconds (default 5), deletes the new files, commits.
#  WORKLOAD=smallfiles: each round creates FILES (default 50000) files of
#    100 bytes in directories of 100, commits, deletes them all, commits.
#  WORKLOAD=keepfiles: each round adds FILES (default 20000) files of 100
#    bytes in directories of 100 and commits; nothing is deleted, so the
#    files stay known to the mount's kernel (a per-file leak shows as a climb
#    of RSS with the number of files; the rounds above delete theirs).
#  WORKLOAD=pgbench: PostgreSQL on the dot (8 KiB blocks), pgbench scale 20
#    loaded once, then per round SECONDS_PER_ROUND seconds (default 60) of
#    pgbench with 2 clients and a commit.
# RSS_LOG=FILE keeps a copy of the server log (one accounting line per 5 s).
# Run as root:  bash bench/mem/rss.sh     (ROUNDS=12)
. "$(dirname "$0")/../lib.sh"
ROUNDS="${ROUNDS:-12}"
WORKLOAD="${WORKLOAD:-files}"
MB="${MB:-100}"
if [ "$WORKLOAD" = pgbench ]; then SECS="${SECONDS_PER_ROUND:-60}"; else SECS="${SECONDS_PER_ROUND:-5}"; fi
bench_workdir dm-rss
cleanup() {
  set +e
  [ -f "${dir:-/nonexistent}/pgdata/postmaster.pid" ] && pg_stop "$dir/pgdata"
  stop_server
  [ -z "${RSS_LOG:-}" ] || cp "$work/server.log" "$RSS_LOG"
  rm -rf "$work"
}
trap cleanup EXIT
# SERVER_ENV="VAR=VALUE ..." adds variables to the server's environment (MALLOC_ARENA_MAX=2, say).
# shellcheck disable=SC2086
start_server DM_LOG=info,dm::memory=debug ${SERVER_ENV:-}
"$DM" init rss --block-size 8K >/dev/null
dir=$("$DM" --dot rss mount rss)
rss() { awk '/^VmRSS/{printf "%.0f", $2/1024}' "/proc/$server/status"; }

echo "# dm server memory under load"
echo
echo "Machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB RAM. Command: \`WORKLOAD=$WORKLOAD ROUNDS=$ROUNDS SECONDS_PER_ROUND=$SECS bash bench/mem/rss.sh\`."
if [ "$WORKLOAD" = pgbench ]; then
  need_pg
  pg_sockdir
  mkdir -p "$dir/pgdata"; chown postgres:postgres "$dir/pgdata"
  pg initdb -D "$dir/pgdata" -A trust -U postgres >/dev/null
  pg_start "$dir/pgdata"
  pgb -i -s 20 -q >/dev/null 2>&1
  echo "Each round: ${SECS} s of pgbench (scale 20, 2 clients) on the dot, then a commit."
elif [ "$WORKLOAD" = keepfiles ]; then
  echo "Each round: ${FILES:-20000} more files of 100 bytes in directories of 100, kept, and a commit."
elif [ "$WORKLOAD" = smallfiles ]; then
  echo "Each round: ${FILES:-50000} files of 100 bytes created in directories of 100, a commit, all deleted, a commit."
else
  echo "Each round: $MB MiB written to new files and fsynced, ${SECS} s of random 8 KiB writes with an fsync every 16 to a 64 MiB file, the new files deleted, a commit."
fi
echo
echo "| round | RSS (MiB) | RSS / round 1 |"
echo "|---|---|---|"
first=
for r in $(seq 1 "$ROUNDS"); do
  if [ "$WORKLOAD" = pgbench ]; then
    pgb -c 2 -j 2 -T "$SECS" -n >/dev/null 2>&1
  elif [ "$WORKLOAD" = smallfiles ] || [ "$WORKLOAD" = keepfiles ]; then
    if [ "$WORKLOAD" = keepfiles ]; then n="${FILES:-20000}"; else n="${FILES:-50000}"; fi
    python3 - "$dir" "$n" "$r" <<'PY'
import os, sys
d, n, r = sys.argv[1], int(sys.argv[2]), sys.argv[3]
for i in range(0, n, 100):
    os.mkdir(os.path.join(d, f"dir-{r}-{i}"))
    for j in range(100):
        with open(os.path.join(d, f"dir-{r}-{i}", f"f{j}"), "wb") as f:
            f.write(os.urandom(100))
PY
    if [ "$WORKLOAD" = smallfiles ]; then
      "$DM" --dot rss commit -m "round $r: created" >/dev/null
      rm -rf "$dir"/dir-*
    fi
  else
    python3 - "$dir" "$MB" "$SECS" "$r" <<'PY'
import os, random, sys, time
d, mb, secs, r = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
for i in range(mb // 10):
    fd = os.open(os.path.join(d, f"new-{i}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for _ in range(10):
        os.write(fd, os.urandom(1 << 20))
    os.fsync(fd); os.close(fd)
fd = os.open(os.path.join(d, "table"), os.O_RDWR | os.O_CREAT, 0o644)
if os.fstat(fd).st_size == 0:
    os.ftruncate(fd, 64 << 20)
rnd = random.Random(r)
end = time.monotonic() + secs
n = 0
while time.monotonic() < end:
    os.pwrite(fd, os.urandom(8192), rnd.randrange(8192) * 8192)
    n += 1
    if n % 16 == 0:
        os.fsync(fd)
os.fsync(fd); os.close(fd)
for i in range(mb // 10):
    os.unlink(os.path.join(d, f"new-{i}"))
PY
  fi
  "$DM" --dot rss commit -m "round $r" >/dev/null
  m=$(rss)
  [ -n "$first" ] || first=$m
  echo "| $r | $m | $(awk -v a="$m" -v b="$first" 'BEGIN{printf "%.2f", a/b}') |"
done
echo
echo "Peak (VmHWM): $(awk '/^VmHWM/{printf "%.0f", $2/1024}' "/proc/$server/status") MiB."
echo "The store's accounting at the end: $(grep 'dm::memory' "$work/server.log" | tail -1 | sed 's/.*dm::memory: //')."
if [ "$WORKLOAD" = keepfiles ]; then
  # What the server keeps for the files its mount's kernel knows (lookup
  # counts, names) goes once the kernel forgets them; a leak would stay.
  sync; echo 2 >/proc/sys/vm/drop_caches; sleep 6
  echo
  echo "After the kernel dropped its cached inodes (\`echo 2 > /proc/sys/vm/drop_caches\`): RSS $(rss) MiB; the store's accounting: $(grep 'dm::memory' "$work/server.log" | tail -1 | sed 's/.*dm::memory: //')."
fi
