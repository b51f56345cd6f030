#!/usr/bin/env bash
# FUSE vs native, in the same run (issue 3): fio sequential 1 MiB writes with
# end_fsync (also timed without fio's start-up) and sequential reads (page
# cache dropped first), random 8 KiB
# writes with an fsync every 16 and random 8 KiB reads (dm's server restarted
# first, so its own cache is cold too), create+stat+unlink of 10,000 small
# files (also with the benchmark and the server pinned to one CPU, which shows
# what a FUSE round trip costs when no other vCPU has to be woken), and stat(2)
# of missing names. Prints a Markdown table with ratios dm/native.
# Run as root:  bash bench/fuse/fio.sh      (FIO_SIZE=1g, FIO_SECONDS=20)
. "$(dirname "$0")/../lib.sh"
SIZE="${FIO_SIZE:-1g}"
SECS="${FIO_SECONDS:-20}"
bench_workdir dm-fio
trap 'stop_server; rm -rf "$work"' EXIT
start_server
"$DM" init fio >/dev/null
dm_dir=$("$DM" --dot fio mount fio)
# The same random-write job on a dot with 8 KiB blocks (what PostgreSQL
# users create): no read-modify-write of 64 KiB blocks.
"$DM" init fio8 --block-size 8K >/dev/null
dm8_dir=$("$DM" --dot fio8 mount fio8)
native="$work/native"; mkdir -p "$native"

# fio JSON -> MiB/s of the job's main direction.
bw() { python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; d=sys.argv[1]; print("%.1f" % (j[d]["bw_bytes"]/1048576))' "$1"; }
# Before each job: write back what earlier jobs left dirty and drop the page
# cache, so no job pays for another's writeback and reads start cold on both
# sides (dm's chunk log included).
settle() { sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; }
# Before a cold read on dm, restart the server too: its own chunk cache
# (128 MiB) would otherwise still hold what the write job just stored.
# The mounts come back at the same paths. Call it in this shell, not in a
# $(...) subshell, so that $server follows the new process.
cold() { # dir
  if [ "$1" != "$native" ]; then
    stop_server; start_server
    for _ in $(seq 1 200); do mountpoint -q "$1" && break; sleep 0.05; done
    mountpoint -q "$1" || { echo "dm did not mount $1 again after a restart" >&2; exit 1; }
  fi
}
job() { # dir name direction fio-args...
  local dir=$1 name=$2 dirn=$3; shift 3
  settle
  fio --name="$name" --directory="$dir" --output-format=json "$@" 2>/dev/null | bw "$dirn"
}
durable() { # dir -> MiB/s of a sequential 1 MiB write until its end fsync
  # returns. fio's own figure stops before the end fsync (native then
  # measures the page cache); this one times the whole run.
  local t0 t1
  settle
  t0=$(date +%s.%N)
  fio --name=seqd --directory="$1" --rw=write --bs=1m --size="$SIZE" --end_fsync=1 >/dev/null 2>&1
  t1=$(date +%s.%N)
  python3 -c 'import sys; s=sys.argv[1]; n=float(s[:-1])*{"k":1/1024,"m":1,"g":1024}[s[-1].lower()]; print("%.1f" % (n/(float(sys.argv[3])-float(sys.argv[2]))))' "$SIZE" "$t0" "$t1"
}
written() { # dir -> MiB/s of SIZE distinct bytes written in 1 MiB write(2)s
  # then fsync'ed, timed from the first write until the fsync returns: what
  # durable() measures without fio's start-up (forking, scanning
  # /sys/block), which took 0.2-0.4 s of the 0.5-1 s that run lasts.
  settle
  python3 - "$1" "$SIZE" <<'PY'
import os, sys, time
s = sys.argv[2]
n = int(float(s[:-1]) * {"k": 1 / 1024, "m": 1, "g": 1024}[s[-1].lower()])
bufs = [os.urandom(1 << 20) for _ in range(n)]
fd = os.open(os.path.join(sys.argv[1], "written"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
t = time.perf_counter()
for b in bufs:
    os.write(fd, b)
os.fsync(fd)
print("%.1f" % (n / (time.perf_counter() - t)))
os.close(fd)
PY
}
files() { # dir -> seconds for create+stat+unlink of 10,000 files of 100
  # bytes, with the system calls tar, cp and git make (open, write, close).
  # Python's open() would add an isatty ioctl per file (one more FUSE round
  # trip), which CPython 3.14 no longer makes for regular files.
  settle
  python3 - "$1" <<'PY'
import os, sys, time
d = os.path.join(sys.argv[1], "many"); os.makedirs(d, exist_ok=True)
data = b"x" * 100
t = time.perf_counter()
for i in range(10000):
    fd = os.open(os.path.join(d, f"f{i}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, data)
    os.close(fd)
for i in range(10000): os.stat(os.path.join(d, f"f{i}"))
for i in range(10000): os.unlink(os.path.join(d, f"f{i}"))
print("%.2f" % (time.perf_counter() - t))
PY
}
absent() { # dir pass -> microseconds per stat(2) of a missing name. Pass 1:
  # names never asked for (on dm one FUSE round trip each); pass 2: the same
  # names again (dm's negative entries let the kernel answer, as ext4's
  # dcache does). Names 'absent-*' are left for pass 2.
  python3 - "$1" "$2" <<'PY'
import os, sys, time
p = [os.path.join(sys.argv[1], f"absent-{i}") for i in range(20000)]
t = time.perf_counter()
for q in p:
    try: os.stat(q)
    except FileNotFoundError: pass
print("%.1f" % ((time.perf_counter() - t) / len(p) * 1e6))
PY
}
pinned() { # dir -> files() with the benchmark and dm's server on CPU 0 only:
  # the request and its answer then need no wakeup of another (halted) vCPU
  local r
  [ "$1" != "$native" ] && taskset -a -p -c 0 "$server" >/dev/null
  r=$(taskset -c 0 bash -c "$(declare -f settle files); files '$1'")
  [ "$1" != "$native" ] && taskset -a -p -c "0-$(($(nproc) - 1))" "$server" >/dev/null
  echo "$r"
}
row() { # label native dm higher-is-better(1/0)
  local r
  if [ "$4" = 1 ]; then r=$(awk -v a="$3" -v b="$2" 'BEGIN{printf "%.2f", a/b}')
  else r=$(awk -v a="$3" -v b="$2" 'BEGIN{printf "%.2f", b/a}'); fi
  echo "| $1 | $2 | $3 | $r |"
}
echo "# FUSE vs native"
echo
echo "Machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB RAM, $(df -T "$work" | awk 'NR==2{print $2, $1}'). Command: \`FIO_SIZE=$SIZE FIO_SECONDS=$SECS bash bench/fuse/fio.sh\`."
echo
echo "| workload | native | dm | dm/native (higher is better) |"
echo "|---|---|---|---|"
for d in "$native" "$dm_dir"; do
  out=()
  out+=("$(job "$d" seqw write --rw=write --bs=1m --size="$SIZE" --end_fsync=1)")
  cold "$d"
  out+=("$(job "$d" seqw read --rw=read --bs=1m --size="$SIZE" --invalidate=1)")
  out+=("$(job "$d" randw write --rw=randwrite --bs=8k --size=256m --fsync=16 --time_based --runtime="$SECS")")
  cold "$d"
  out+=("$(job "$d" randw read --rw=randread --bs=8k --size=256m --invalidate=1 --time_based --runtime="$SECS")")
  out+=("$(files "$d")")
  out+=("$(durable "$d")")
  out+=("$(absent "$d" 1)")
  out+=("$(absent "$d" 2)")
  out+=("$(pinned "$d")")
  out+=("$(written "$d")")
  rm -rf "$d"/seqw* "$d"/seqd* "$d"/randw* "$d"/many "$d"/written
  if [ "$d" = "$native" ]; then n=("${out[@]}"); else m=("${out[@]}"); fi
done
row "sequential write 1 MiB, end_fsync (MiB/s, fio's figure: the end fsync not timed)" "${n[0]}" "${m[0]}" 1
row "sequential write 1 MiB until the end fsync returns (MiB/s, wall clock)" "${n[5]}" "${m[5]}" 1
row "the same without fio's start-up: $SIZE in distinct 1 MiB writes, then fsync (MiB/s)" "${n[9]}" "${m[9]}" 1
row "sequential read 1 MiB, cold cache (MiB/s)" "${n[1]}" "${m[1]}" 1
row "random write 8 KiB, fsync every 16 (MiB/s)" "${n[2]}" "${m[2]}" 1
m8=$(job "$dm8_dir" randw write --rw=randwrite --bs=8k --size=256m --fsync=16 --time_based --runtime="$SECS")
row "random write 8 KiB, fsync every 16, dot with 8 KiB blocks (MiB/s)" "${n[2]}" "$m8" 1
row "random read 8 KiB, cold cache (MiB/s)" "${n[3]}" "${m[3]}" 1
row "create+stat+unlink 10,000 files (s)" "${n[4]}" "${m[4]}" 0
row "the same, benchmark and dm server pinned to CPU 0 (s)" "${n[8]}" "${m[8]}" 0
row "stat(2) of a missing name (us; on dm one FUSE round trip)" "${n[6]}" "${m[6]}" 0
row "stat(2) of the same missing names again (us)" "${n[7]}" "${m[7]}" 0
