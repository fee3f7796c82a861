#!/usr/bin/env bash
# Side-by-side benchmarks of issue 8: vmreplica against what a user would do
# by hand (qemu-img convert, nbdcopy, rsync), on the same data in the same
# run, runs alternating. Builds nothing: give it a build directory that holds
# vmreplica, vmreplicad and bench_workload (docs/benchmarks.md says how).
#
#   bench/run.sh [--build DIR] [--quick] [--scenarios P1,P2,P3,P4,P5,P6] [--runs N]
#                [--size N] [--out FILE] [--keep] [--dir DIR] [--stage-deltas] [--seed-copy]
#
# Prints a table (scenario, tool, min / median / max seconds, wire bytes,
# ratios against the goals) and writes a JSON result file (default
# ./bench-results.json). Temporary data lives in DIR/vmreplica-bench-*
# (default DIR /var/tmp; /dev/shm takes the disk out of the measurement)
# and is deleted at exit (kept with --keep, to read the daemons' logs); every
# daemon it starts is stopped at exit. --stage-deltas runs the daemons with
# [replica] apply_while_receiving = false (every delta staged on disk first,
# as before session 16), to compare both ways of applying. P3 hands the
# copy to `mark-replica --move` (the copy becomes the replica's disk, as
# rsync updates its copy in place); --seed-copy copies it instead.
set -euo pipefail
shopt -s inherit_errexit
root=$(cd "$(dirname "$0")/.." && pwd)

build=$root/build/default
quick=0
keep=0
scenarios=P1,P2,P3,P4,P5,P6
runs=""
size=""
out=$PWD/bench-results.json
dir=/var/tmp
replica_toml=""
seed_move=1
usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
while (($#)); do
  case $1 in
    --build) build=$(cd "$2" && pwd); shift 2 ;;
    --quick) quick=1; shift ;;
    --keep) keep=1; shift ;;
    --scenarios) scenarios=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --out) out=$(realpath -m "$2"); shift 2 ;;
    --dir) dir=$(cd "$2" && pwd); shift 2 ;;
    --stage-deltas) replica_toml=$'[replica]\napply_while_receiving = false'; shift ;;
    --seed-copy) seed_move=0; shift ;;
    -h|--help) usage 0 ;;
    *) echo "unknown option $1"; usage ;;
  esac
done

# Sizes: the issue's by default, scaled down by --quick.
if ((quick)); then
  : "${size:=512M}" "${runs:=3}"
  p4_size=256M; p5_disk=512M; p5_bytes=1G; p6_vms=5; p6_disk=64M; p6_seconds=75
else
  : "${size:=8G}" "${runs:=3}"
  p4_size=2G; p5_disk=8G; p5_bytes=4G; p6_vms=50; p6_disk=256M; p6_seconds=300
fi

vmr=$build/tools/vmreplica/vmreplica
vmrd=$build/tools/vmreplicad/vmreplicad
wl=$build/bench/workload/bench_workload
for f in "$vmr" "$vmrd" "$wl"; do
  [[ -x $f ]] || { echo "missing $f: build the targets vmreplica vmreplicad bench_workload in $build"; exit 1; }
done
for t in qemu-img qemu-storage-daemon nbdcopy rsync zstd ss python3; do
  command -v "$t" >/dev/null || { echo "missing tool $t (scripts/install-deps.sh installs it)"; exit 1; }
done

# The harness must not compete with what it measures for the 2 cores: its
# many small python3 calls use the system interpreter directly, not a
# version manager's shim (a bash script started before every call).
if [[ -x /usr/bin/python3 ]]; then python3() { /usr/bin/python3 "$@"; }; fi

work=$(mktemp -d "$dir/vmreplica-bench-XXXXXX")
# shellcheck source=../scripts/lib/pair.sh
source "$root/scripts/lib/pair.sh"
# Replaces pair.sh's pair_free_port for the benchmark: a port below the
# kernel's ephemeral range, with no socket in any state. (Inside that range
# any outgoing connection may take the port between the check, which
# pair.sh makes on listening sockets only, and the daemon's bind: a daemon
# failed once with "cannot listen" on such a port.)
pair_free_port() {
  local p lo
  lo=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
  ((lo > 11000)) || lo=60000
  while :; do
    p=$((10000 + RANDOM % (lo - 10000)))
    [[ -z "$(ss -Htan "sport = :$p")" ]] && { echo "$p"; return; }
  done
}
qsd_pids=()
other_pids=()
cleanup() {
  local p
  pair_stop_daemons
  for p in "${qsd_pids[@]}" "${other_pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if ((keep)); then echo "kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

runs_file=$work/runs.jsonl
: > "$runs_file"
log() { printf '\033[1m[%s] %s\033[0m\n' "$(date +%T)" "$*" >&2; }
now() { date +%s.%N; }
ms_to_s() { python3 -c "print(int('$1') / 1000)"; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.6f}')" "$1" "$2"; }
# record KEY=VALUE...: one run line (numbers stay numbers, the rest strings).
record() {
  python3 - "$@" >> "$runs_file" <<'PY'
import json, sys
d = {}
for kv in sys.argv[1:]:
    k, v = kv.split("=", 1)
    try:
        d[k] = int(v)
    except ValueError:
        try:
            d[k] = float(v)
        except ValueError:
            d[k] = v
print(json.dumps(d))
PY
}
bytes_of() { numfmt --from=iec "$1"; }
json_field() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"; }
# utime + stime of a process (all its threads), in clock ticks; the
# children's (reaped ones: cutime + cstime) with child_cpu_ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
child_cpu_ticks() { awk '{print $16 + $17}' "/proc/$1/stat"; }
ticks_to_s() { python3 -c "import os; print($1 / os.sysconf('SC_CLK_TCK'))"; }
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
hwm_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }
# timed OUTFILE CMD...: runs CMD under /usr/bin/time; OUTFILE gets
# "user_s sys_s max_rss_kib".
timed() { local o=$1; shift; /usr/bin/time -f '%U %S %M' -o "$o" "$@"; }
time_cpu_s() { awk '{print $1 + $2}' "$1"; }
time_rss_bytes() { awk '{print $3 * 1024}' "$1"; }
# await WHAT CMD...: polls CMD every $poll seconds (default 0.25) until it
# succeeds; after 30 minutes it gives up, shows the daemons' logs and ends
# the run. No measured time depends on when it returns (the daemons' own
# timestamps end the clocks); each poll (the CLI and python3, about 55 ms of
# CPU) takes CPU from the daemons being measured, so it polls slowly (every
# 20 ms until session 18; cycle() every second since session 19).
await() {
  local what=$1 deadline=$(( $(date +%s) + 1800 )); shift
  until "$@"; do
    if (( $(date +%s) > deadline )); then
      echo "timed out waiting for $what; primary and replica logs:" >&2
      tail -n 20 "$work/primary/vmreplicad.log" "$work/replica/vmreplicad.log" >&2 || true
      exit 1
    fi
    sleep "${poll:-0.25}"
  done
}
more_than() { (( $("${@:2}") > $1 )); }

# ------------------------------------------------------------ building blocks

# qsd_start NAME QCOW2: a qemu-storage-daemon serving QCOW2 (node disk0) as
# the writable NBD export "disk0" on $work/qsd/NAME/nbd.sock, with its QMP
# monitor on $work/qsd/NAME/qmp.sock.
qsd_start() {
  local name=$1 img=$2 d=$work/qsd/$1
  mkdir -p "$d"
  local args=(
    --blockdev "driver=file,node-name=file0,filename=$img"
    --blockdev "driver=qcow2,node-name=disk0,file=file0"
    --nbd-server "addr.type=unix,addr.path=$d/nbd.sock"
    --export "type=nbd,id=exp0,node-name=disk0,name=disk0,writable=on"
    --chardev "socket,id=mon0,path=$d/qmp.sock,server=on,wait=off"
    --monitor "chardev=mon0"
  )
  qemu-storage-daemon "${args[@]}" > "$d/qsd.log" 2>&1 &
  qsd_pids+=($!)
  echo $! > "$d/pid"
  for _ in $(seq 200); do [[ -S $d/qmp.sock && -S $d/nbd.sock ]] && return 0; sleep 0.05; done
  echo "qemu-storage-daemon $name did not start:"; cat "$d/qsd.log"; exit 1
}
qsd_uri() { echo "nbd+unix:///disk0?socket=$work/qsd/$1/nbd.sock"; }
# Stops a QSD cleanly (SIGTERM keeps its persistent bitmaps consistent).
qsd_stop() {
  local d=$work/qsd/$1 pid
  pid=$(cat "$d/pid")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  rm -rf "$d"
}
# Removes the dirty bitmaps earlier relationships left in a (stopped) image.
drop_bitmaps() {
  local b
  for b in $(qemu-img info -U --output=json "$1" | python3 -c '
import json, sys
d = json.load(sys.stdin)
for b in d.get("format-specific", {}).get("data", {}).get("bitmaps", []):
    print(b["name"])'); do
    qemu-img bitmap --remove "$1" "$b"
  done
}

# pair_up [EXTRA_TOML]: fresh primary and replica daemons (new state), the
# replica authorising the primary.
pair_up() {
  pair_stop_daemons
  rm -rf "$work/primary" "$work/replica"
  p_port=$(pair_free_port)
  r_port=$(pair_free_port)
  while ((r_port == p_port)); do r_port=$(pair_free_port); done
  pair_start_daemon primary "$p_port" "${1:-}"$'\n'"$replica_toml"
  pair_start_daemon replica "$r_port" "${1:-}"$'\n'"$replica_toml"
  P="$vmr --socket $work/primary/admin.sock"
  R="$vmr --socket $work/replica/admin.sock"
  $R server set --enable --auth certificate >/dev/null
  $R auth add primary.demo.vmreplica --storage "$work/replica/vms" --trust-group bench >/dev/null
}
# A single delta cycle on demand: the interval is stretched to an hour (a
# TEST-ONLY key, docs/configuration.md); cycles are triggered by resume.
one_cycle_toml=$'[testing]\nreplication_interval_override_ms = 3600000'
back_to_back_toml=$'[testing]\nreplication_interval_override_ms = 100'

# bind_vm NAME QSD [enable options...]: vm add + enable.
bind_vm() {
  local name=$1 q=$2; shift 2
  $P vm add "$name" --disk vda=disk0 --qmp "$work/qsd/$q/qmp.sock" --nbd-socket "$work/qsd/$q/nbd.sock" \
    --vcpus 1 --memory 512 >/dev/null
  $P enable "$name" --replica-server 127.0.0.1 --replica-port "$r_port" "$@" >/dev/null
}
# rel_field SIDE NAME FIELD...: members of VM NAME's relationship as
# `vmreplica --json get` shows it on SIDE (P primary, R replica), one line,
# space-separated; "last_cycle.data_bytes" reaches into a message. A member
# or VM that is absent reads 0 (the primary keeps its last cycle in memory:
# absent before its first cycle). NAME "*" sums over every relationship;
# NAME "#" counts those whose (first) FIELD is at least 1.
rel_field() {
  local cli
  if [[ $1 == P ]]; then cli=$P; else cli=$R; fi
  $cli --json get | python3 -c '
import json, sys
name, fields = sys.argv[1], sys.argv[2:]
def get(r, path):
    for p in path.split("."):
        r = r.get(p, 0) if isinstance(r, dict) else 0
    return int(r)
rels = json.load(sys.stdin).get("relationships", [])
if name == "*":
    print(" ".join(str(sum(get(r, f) for r in rels)) for f in fields))
elif name == "#":
    print(sum(1 for r in rels if get(r, fields[0]) >= 1))
else:
    mine = [r for r in rels if r.get("vm_name") == name]
    print(" ".join(str(get(mine[0], f) if mine else 0) for f in fields))' "${@:2}"
}
at_least() { (( $("${@:2}") >= $1 )); }
# applied_by_replica NAME SEQ: waits until the replica applied log SEQ of
# NAME (its applied_sequence); prints the replica's own apply timestamp
# (seconds).
applied_by_replica() {
  await "the replica to apply log $2 of $1" at_least "$2" rel_field R "$1" applied_sequence
  ms_to_s "$(rel_field R "$1" last_apply_time_unix_ms)"
}
# job_result FIELD...: reads what `vmreplica --json` printed for a job
# method (one JSON document per answer; the last one with a job is the
# finished job) on stdin and prints the named fields of its result_json,
# space-separated; a FIELD ending in ? may be missing (0).
job_result() {
  python3 -c '
import json, sys
text, pos, job, dec = sys.stdin.read(), 0, None, json.JSONDecoder()
while True:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    if pos >= len(text):
        break
    d, pos = dec.raw_decode(text, pos)
    if isinstance(d, dict) and "job" in d:
        job = d["job"]
r = json.loads(job["result_json"])
print(*[r.get(f[:-1], 0) if f.endswith("?") else r[f] for f in sys.argv[1:]])' "$@"
}
# initial NAME [START_OPTIONS...]: runs the initial replication (`start
# NAME START_OPTIONS...`), waits until the replica has applied it; prints
# "wall_s data_bytes wire_bytes duration_ms zero_bytes read_bytes
# hole_bytes" (the numbers from the job's result; the last two only for a
# seeded one). wall_s runs from just before the CLI call to the
# replica's own apply timestamp (so the polling here adds nothing to it).
initial() {
  local name=$1 t0 t1 res seq
  t0=$(now)
  res=$($P --json start "$name" "${@:2}")
  # The job is done: the primary's last cycle is its log (1, or 2 seeded).
  seq=$(rel_field P "$name" last_cycle.sequence)
  ((seq >= 1)) || { echo "no last cycle on the primary after the initial copy of $name" >&2; exit 1; }
  t1=$(applied_by_replica "$name" "$seq")
  echo "$(elapsed "$t0" "$t1") $(job_result data_bytes wire_bytes duration_ms zero_bytes? read_bytes? hole_bytes? \
    <<< "$res")"
}
# cycle NAME: resumes NAME (suspended), which runs one delta cycle at once;
# waits until the primary reports it (its relationship's last_cycle) and the
# replica applied it (applied_sequence). wall_s runs from just before the
# resume call to the replica's own apply timestamp. Prints "wall_s
# data_bytes wire_bytes duration_ms" (the numbers the primary reports).
cycle() {
  local name=$1 before seq data wire ms t0 t1
  before=$(rel_field P "$name" last_cycle.sequence)
  t0=$(now)
  $P resume "$name" >/dev/null
  # Polled once a second: a P2 cycle at 8 GiB (1.3 s) met 5 polls at 0.25 s,
  # 0.3 s of CPU taken from the daemons on 2 cores (perf, session 19).
  poll=1 await "a delta cycle of $name" more_than "$before" rel_field P "$name" last_cycle.sequence
  # With the hour-long interval no other cycle follows: this one is the last.
  read -r seq data wire ms < <(rel_field P "$name" last_cycle.sequence last_cycle.data_bytes \
    last_cycle.wire_bytes last_cycle.duration_ms)
  t1=$(applied_by_replica "$name" "$seq")
  echo "$(elapsed "$t0" "$t1") $data $wire $ms"
}

rsyncd_up() {
  [[ -n ${rsync_port:-} ]] && return 0
  mkdir -p "$work/rsyncd/dst"
  rsync_port=$(pair_free_port)
  cat > "$work/rsyncd/rsyncd.conf" <<CONF
use chroot = no
pid file = $work/rsyncd/rsyncd.pid
log file = $work/rsyncd/rsyncd.log
[bench]
path = $work/rsyncd/dst
read only = no
uid = root
gid = root
CONF
  rsync --daemon --no-detach --address=127.0.0.1 --port="$rsync_port" --config="$work/rsyncd/rsyncd.conf" &
  rsyncd_pid=$!
  other_pids+=("$rsyncd_pid")
  for _ in $(seq 100); do [[ -n "$(ss -Htln "sport = :$rsync_port")" ]] && return 0; sleep 0.05; done
  echo "rsync daemon did not start"; exit 1
}
# rsync_to NAME OPTIONS...: rsync $work/img/disk.raw to the daemon as NAME;
# prints "wall_s wire_bytes cpu_s": bytes sent + received (from --stats),
# CPU of the client plus the daemon's children (the receiving side).
rsync_to() {
  local name=$1 t0 t1 stats c0 c1; shift
  c0=$(child_cpu_ticks "$rsyncd_pid")
  t0=$(now)
  stats=$(timed "$work/rsync-time.txt" rsync --stats "$@" "$work/img/disk.raw" \
    "rsync://127.0.0.1:$rsync_port/bench/$name")
  sync "$work/rsyncd/dst/$name"
  t1=$(now)
  c1=$(child_cpu_ticks "$rsyncd_pid")
  python3 - "$stats" "$(elapsed "$t0" "$t1")" "$(time_cpu_s "$work/rsync-time.txt")" \
    "$(ticks_to_s $((c1 - c0)))" <<'PY'
import re, sys
s = sys.argv[1]
sent = int(re.search(r"Total bytes sent: ([\d,]+)", s).group(1).replace(",", ""))
recv = int(re.search(r"Total bytes received: ([\d,]+)", s).group(1).replace(",", ""))
print(sys.argv[2], sent + recv, float(sys.argv[3]) + float(sys.argv[4]))
PY
}

# The benchmark image: half pseudo-random data, half zeros (4 MiB chunks
# alternating), as a raw file (what rsync copies) and the same bytes as a
# qcow2 (what qemu-storage-daemon serves to vmreplica, qemu-img and nbdcopy).
make_images() {
  [[ -f $work/img/disk.qcow2 ]] && return 0
  mkdir -p "$work/img"
  log "preparing a $size image (half random, half zeros)"
  "$wl" image --out "$work/img/disk.raw" --size "$size" --seed 8 >/dev/null
  qemu-img convert -f raw -O qcow2 "$work/img/disk.raw" "$work/img/disk.qcow2"
}

# ---------------------------------------------------------------- scenarios

scenario_p1() {
  make_images
  rsyncd_up
  qsd_start p1 "$work/img/disk.qcow2"
  local uri; uri=$(qsd_uri p1)
  mkdir -p "$work/out"
  local tools=(vmreplica convert nbdcopy rsync) i t res wall data wire dur cpu c0 c1
  for ((i = 1; i <= runs; i++)); do
    # Alternate: each run starts at a different tool.
    for ((t = 0; t < ${#tools[@]}; t++)); do
      local tool=${tools[$(((t + i - 1) % ${#tools[@]}))]}
      log "P1 run $i: $tool"
      case $tool in
        vmreplica)
          qsd_stop p1; drop_bitmaps "$work/img/disk.qcow2"; qsd_start p1 "$work/img/disk.qcow2"
          pair_up
          bind_vm p1 p1
          c0=$(( $(cpu_ticks "$(pair_pid 0)") + $(cpu_ticks "$(pair_pid 1)") ))
          res=$(initial p1); read -r wall data wire dur _ <<< "$res"
          c1=$(( $(cpu_ticks "$(pair_pid 0)") + $(cpu_ticks "$(pair_pid 1)") ))
          record scenario=P1 tool=vmreplica run="$i" seconds="$wall" data_bytes="$data" wire_bytes="$wire" \
            product_duration_s="$(python3 -c "print($dur/1000)")" cpu_s="$(ticks_to_s $((c1 - c0)))" \
            max_rss_bytes="$(( ($(hwm_kib "$(pair_pid 0)") + $(hwm_kib "$(pair_pid 1)")) * 1024 ))"
          pair_stop_daemons
          rm -rf "$work/primary" "$work/replica" ;;
        convert)
          local t0 t1; t0=$(now)
          timed "$work/time.txt" qemu-img convert -f raw -O raw "$uri" "$work/out/convert.raw"
          sync "$work/out/convert.raw"; t1=$(now)
          record scenario=P1 tool="qemu-img convert" run="$i" seconds="$(elapsed "$t0" "$t1")" \
            cpu_s="$(time_cpu_s "$work/time.txt")" max_rss_bytes="$(time_rss_bytes "$work/time.txt")"
          rm -f "$work/out/convert.raw" ;;
        nbdcopy)
          local t0 t1; t0=$(now)
          timed "$work/time.txt" nbdcopy "$uri" "$work/out/nbdcopy.raw"
          sync "$work/out/nbdcopy.raw"; t1=$(now)
          record scenario=P1 tool=nbdcopy run="$i" seconds="$(elapsed "$t0" "$t1")" \
            cpu_s="$(time_cpu_s "$work/time.txt")" max_rss_bytes="$(time_rss_bytes "$work/time.txt")"
          rm -f "$work/out/nbdcopy.raw" ;;
        rsync)
          res=$(rsync_to p1.raw --sparse); read -r wall wire cpu <<< "$res"
          record scenario=P1 tool="rsync --sparse" run="$i" seconds="$wall" wire_bytes="$wire" cpu_s="$cpu"
          rm -f "$work/rsyncd/dst/p1.raw" ;;
      esac
    done
  done
  qsd_stop p1
}

scenario_p2() {
  make_images
  rsyncd_up
  qsd_stop p2 2>/dev/null || true
  drop_bitmaps "$work/img/disk.qcow2"
  # P2 changes the image: work on copies.
  cp --sparse=always "$work/img/disk.qcow2" "$work/img/p2.qcow2"
  qsd_start p2 "$work/img/p2.qcow2"
  pair_up "$one_cycle_toml"
  bind_vm p2 p2 --history 0
  log "P2: initial copies (not timed): vmreplica and rsync"
  initial p2 >/dev/null
  rsync_to p2.raw --sparse >/dev/null
  local uri i first wall data wire dur zsize cpu c0 c1 res
  uri=$(qsd_uri p2)
  for ((i = 1; i <= runs; i++)); do
    # 1% of the disk in 4 KiB random writes, the same on both sides.
    $P suspend p2 >/dev/null
    "$wl" write --target "$uri" --size "$size" --block 4096 --fraction 0.01 --seed "$((200 + i))" \
      --changed-out "$work/changed.bin" >/dev/null
    "$wl" write --target "$work/img/disk.raw" --size "$size" --block 4096 --fraction 0.01 --seed "$((200 + i))" >/dev/null
    zsize=$(zstd -1 -q -c "$work/changed.bin" | wc -c)
    rm -f "$work/changed.bin"
    for first in $((i % 2)) $(((i + 1) % 2)); do
      if ((first)); then
        log "P2 run $i: vmreplica (one delta cycle)"
        c0=$(( $(cpu_ticks "$(pair_pid 0)") + $(cpu_ticks "$(pair_pid 1)") ))
        res=$(cycle p2); read -r wall data wire dur <<< "$res"
        c1=$(( $(cpu_ticks "$(pair_pid 0)") + $(cpu_ticks "$(pair_pid 1)") ))
        record scenario=P2 tool=vmreplica run="$i" seconds="$wall" data_bytes="$data" wire_bytes="$wire" \
          zstd_changed_bytes="$zsize" product_duration_s="$(python3 -c "print($dur/1000)")" \
          cpu_s="$(ticks_to_s $((c1 - c0)))"
      else
        log "P2 run $i: rsync --inplace --no-whole-file"
        res=$(rsync_to p2.raw --inplace --no-whole-file); read -r wall wire cpu <<< "$res"
        record scenario=P2 tool="rsync --inplace --no-whole-file" run="$i" seconds="$wall" wire_bytes="$wire" \
          cpu_s="$cpu"
      fi
    done
  done
  pair_stop_daemons
  qsd_stop p2
  rm -f "$work/img/p2.qcow2" "$work/rsyncd/dst/p2.raw"
  # disk.raw now differs from disk.qcow2: make it again if a later scenario needs it.
  rm -f "$work/img/disk.raw" "$work/img/disk.qcow2"
}

# P3: seeded initial replication. The replica side already holds a copy of
# the image in which 1% of the 4 KiB blocks differ (random data at random
# offsets, the same copy for both tools). Each run gets a fresh copy of it,
# written and synced before the clock starts (not timed, for either tool).
# vmreplica: `mark-replica --move` makes that copy the replica's disk (or,
# with --seed-copy, `mark-replica` copies it into the disk), timed as part
# of the product's cost, then `start --seeded` sends the blocks whose
# hashes differ; rsync: the copy is the destination file it updates.
scenario_p3() {
  make_images
  rsyncd_up
  cp --sparse=always "$work/img/disk.raw" "$work/img/seed.raw"
  "$wl" write --target "$work/img/seed.raw" --size "$size" --block 4096 --fraction 0.01 --seed 300 >/dev/null
  qsd_stop p3 2>/dev/null || true
  drop_bitmaps "$work/img/disk.qcow2"
  qsd_start p3 "$work/img/disk.qcow2"
  local tools=(vmreplica rsync) i t tool res wall data wire dur zero cpu c0 c1 t0 t1 mark mres mjob mkernel pread pholes
  for ((i = 1; i <= runs; i++)); do
    for ((t = 0; t < ${#tools[@]}; t++)); do
      tool=${tools[$(((t + i - 1) % ${#tools[@]}))]}
      log "P3 run $i: $tool"
      case $tool in
        vmreplica)
          qsd_stop p3; drop_bitmaps "$work/img/disk.qcow2"; qsd_start p3 "$work/img/disk.qcow2"
          pair_up
          bind_vm p3 p3
          cp --sparse=always "$work/img/seed.raw" "$work/img/seed-run.raw"
          sync "$work/img/seed-run.raw"
          c0=$(( $(cpu_ticks "$(pair_pid 0)") + $(cpu_ticks "$(pair_pid 1)") ))
          t0=$(now)
          mres=$($R --json mark-replica p3 $( ((seed_move)) && echo --move ) --disk "vda=$work/img/seed-run.raw")
          rm -f "$work/img/seed-run.raw"
          t1=$(now); mark=$(elapsed "$t0" "$t1")
          # What the job itself reports: its copy's duration and how much the kernel copied.
          read -r mjob mkernel <<< "$(job_result duration_ms? kernel_copied_bytes? <<< "$mres")"
          mjob=$(python3 -c "print($mjob / 1000)")
          res=$(initial p3 --seeded); read -r wall data wire dur zero pread pholes <<< "$res"
          c1=$(( $(cpu_ticks "$(pair_pid 0)") + $(cpu_ticks "$(pair_pid 1)") ))
          record scenario=P3 tool=vmreplica run="$i" seconds="$(python3 -c "print($mark + $wall)")" \
            mark_replica_s="$mark" mark_copy_s="$mjob" mark_kernel_bytes="$mkernel" data_bytes="$data" \
            primary_read_bytes="$pread" primary_hole_bytes="$pholes" zero_bytes="$zero" wire_bytes="$wire" \
            product_duration_s="$(python3 -c "print($dur/1000)")" cpu_s="$(ticks_to_s $((c1 - c0)))" \
            max_rss_bytes="$(( ($(hwm_kib "$(pair_pid 0)") + $(hwm_kib "$(pair_pid 1)")) * 1024 ))"
          pair_stop_daemons
          rm -rf "$work/primary" "$work/replica" ;;
        rsync)
          cp --sparse=always "$work/img/seed.raw" "$work/rsyncd/dst/p3.raw"
          sync "$work/rsyncd/dst/p3.raw"
          res=$(rsync_to p3.raw --inplace --no-whole-file); read -r wall wire cpu <<< "$res"
          record scenario=P3 tool="rsync --inplace --no-whole-file" run="$i" seconds="$wall" wire_bytes="$wire" \
            cpu_s="$cpu"
          rm -f "$work/rsyncd/dst/p3.raw" ;;
      esac
    done
  done
  qsd_stop p3
  rm -f "$work/img/seed.raw"
}

# Bytes the replica daemon handed to write() (wchar in /proc/PID/io).
wchar_of() { awk '/^wchar:/ {print $2}' "/proc/$1/io"; }
# rchar: what a process got from read() and friends, sockets included.
rchar_of() { awk '/^rchar:/ {print $2}' "/proc/$1/io"; }

scenario_p4() {
  # Two VMs on one pair, same data: history off (0 points) and on (24).
  mkdir -p "$work/img"
  "$wl" image --out "$work/img/p4.raw" --size "$p4_size" --seed 4 --chunk 4M >/dev/null
  # A disk full of data: overwritten blocks have before-images to keep.
  "$wl" write --target "$work/img/p4.raw" --size "$p4_size" --block 4M --fraction 1 --seed 5 >/dev/null
  qemu-img convert -f raw -O qcow2 "$work/img/p4.raw" "$work/img/p4off.qcow2"
  cp "$work/img/p4off.qcow2" "$work/img/p4on.qcow2"
  rm -f "$work/img/p4.raw"
  qsd_start p4off "$work/img/p4off.qcow2"
  qsd_start p4on "$work/img/p4on.qcow2"
  pair_up "$one_cycle_toml"
  bind_vm p4off p4off --history 0
  bind_vm p4on p4on --history 24
  log "P4: initial copies (not timed)"
  initial p4off >/dev/null
  initial p4on >/dev/null
  local rpid i first mode w0 w1 r0 r1 wall data wire dur
  rpid=$(pair_pid 1)
  for ((i = 1; i <= runs; i++)); do
    $P suspend p4off >/dev/null
    $P suspend p4on >/dev/null
    for mode in off on; do
      "$wl" write --target "$(qsd_uri "p4$mode")" --size "$p4_size" --block 4096 --fraction 0.01 \
        --seed "$((400 + i))" >/dev/null
    done
    for first in $((i % 2)) $(((i + 1) % 2)); do
      mode=$([[ $first == 1 ]] && echo on || echo off)
      log "P4 run $i: history $mode"
      w0=$(wchar_of "$rpid"); r0=$(rchar_of "$rpid")
      res=$(cycle "p4$mode"); read -r wall data wire dur <<< "$res"
      w1=$(wchar_of "$rpid"); r1=$(rchar_of "$rpid")
      record scenario=P4 tool="vmreplica, history $mode" run="$i" seconds="$wall" data_bytes="$data" \
        written_bytes="$((w1 - w0))" \
        written_per_changed="$(python3 -c "print(($w1 - $w0) / max($data, 1))")" \
        read_per_changed="$(python3 -c "print(($r1 - $r0) / max($data, 1))")"
    done
  done
  pair_stop_daemons
  qsd_stop p4off; qsd_stop p4on
  rm -f "$work/img/p4off.qcow2" "$work/img/p4on.qcow2"
}

scenario_p5() {
  mkdir -p "$work/img"
  qemu-img create -q -f qcow2 "$work/img/p5rep.qcow2" "$p5_disk"
  qemu-img create -q -f qcow2 "$work/img/p5base.qcow2" "$p5_disk"
  qsd_start p5rep "$work/img/p5rep.qcow2"
  qsd_start p5base "$work/img/p5base.qcow2"
  pair_up "$back_to_back_toml"
  bind_vm p5 p5rep --history 0
  initial p5 >/dev/null
  local ppid i first res cpu0 cpu1 t0 t1 d0 d1
  ppid=$(pair_pid 0)
  for ((i = 1; i <= runs; i++)); do
    for first in $((i % 2)) $(((i + 1) % 2)); do
      if ((first)); then
        log "P5 run $i: guest writes while cycles run back to back"
        d0=$(rel_field P p5 last_cycle.sequence); cpu0=$(cpu_ticks "$ppid"); t0=$(now)
        res=$("$wl" write --target "$(qsd_uri p5rep)" --size "$p5_disk" --block 64K --bytes "$p5_bytes" \
          --seed "$((500 + i))")
        t1=$(now); cpu1=$(cpu_ticks "$ppid"); d1=$(rel_field P p5 last_cycle.sequence)
        record scenario=P5 tool="writes, replicating (cycles back to back)" run="$i" \
          seconds="$(json_field "$res" seconds)" mib_per_s="$(json_field "$res" mib_per_s)" \
          cycles_during="$((d1 - d0))" \
          daemon_cpu_share="$(python3 -c "print(($cpu1 - $cpu0) / $(getconf CLK_TCK) / ($t1 - $t0))")"
      else
        log "P5 run $i: guest writes, no replication"
        # Our VM's cycles must not compete with the baseline.
        $P suspend p5 >/dev/null
        res=$("$wl" write --target "$(qsd_uri p5base)" --size "$p5_disk" --block 64K --bytes "$p5_bytes" \
          --seed "$((500 + i))")
        $P resume p5 >/dev/null
        record scenario=P5 tool="writes, no replication" run="$i" \
          seconds="$(json_field "$res" seconds)" mib_per_s="$(json_field "$res" mib_per_s)"
      fi
    done
  done
  pair_stop_daemons
  qsd_stop p5rep; qsd_stop p5base
  rm -f "$work/img/p5rep.qcow2" "$work/img/p5base.qcow2"
}

scenario_p6() {
  mkdir -p "$work/img"
  local n j
  log "P6: $p6_vms disks of $p6_disk, 30 s interval, light writes for $p6_seconds s"
  pair_up
  for ((j = 1; j <= p6_vms; j++)); do
    qemu-img create -q -f qcow2 "$work/img/p6-$j.qcow2" "$p6_disk"
    qsd_start "p6-$j" "$work/img/p6-$j.qcow2"
    bind_vm "p6-$j" "p6-$j" --interval 30
  done
  for ((j = 1; j <= p6_vms; j++)); do $P --async start "p6-$j" >/dev/null; done
  await "$p6_vms initial copies" at_least "$p6_vms" rel_field R "#" applied_sequence
  local ppid rpid pc0 rc0 pc1 rc1 t0 t1 peak_p=0 peak_r=0 v writes=0 d0 d1
  ppid=$(pair_pid 0); rpid=$(pair_pid 1)
  d0=$(rel_field P "*" last_cycle.sequence)
  pc0=$(cpu_ticks "$ppid"); rc0=$(cpu_ticks "$rpid"); t0=$(now)
  local end=$(( $(date +%s) + p6_seconds ))
  # Light writes: one 64 KiB write to a random VM about every 0.5 s; RSS sampled meanwhile.
  while (( $(date +%s) < end )); do
    n=$((RANDOM % p6_vms + 1))
    "$wl" write --target "$(qsd_uri "p6-$n")" --size "$p6_disk" --block 64K --bytes 64K --seed "$RANDOM" >/dev/null
    writes=$((writes + 1))
    v=$(rss_kib "$ppid"); ((v > peak_p)) && peak_p=$v
    v=$(rss_kib "$rpid"); ((v > peak_r)) && peak_r=$v
    sleep 0.5
  done
  pc1=$(cpu_ticks "$ppid"); rc1=$(cpu_ticks "$rpid"); t1=$(now); d1=$(rel_field P "*" last_cycle.sequence)
  local tck; tck=$(getconf CLK_TCK)
  record scenario=P6 tool="vmreplica primary daemon ($p6_vms VMs)" run=1 \
    cpu_share_of_one_core="$(python3 -c "print(($pc1 - $pc0) / $tck / ($t1 - $t0))")" \
    peak_rss_bytes="$((peak_p * 1024))" lifetime_peak_rss_bytes="$(( $(hwm_kib "$ppid") * 1024 ))" \
    cycles="$((d1 - d0))" guest_writes="$writes" window_s="$(elapsed "$t0" "$t1")"
  record scenario=P6 tool="vmreplica replica daemon ($p6_vms VMs)" run=1 \
    cpu_share_of_one_core="$(python3 -c "print(($rc1 - $rc0) / $tck / ($t1 - $t0))")" \
    peak_rss_bytes="$((peak_r * 1024))" lifetime_peak_rss_bytes="$(( $(hwm_kib "$rpid") * 1024 ))"
  pair_stop_daemons
  for ((j = 1; j <= p6_vms; j++)); do qsd_stop "p6-$j"; done
  rm -f "$work"/img/p6-*.qcow2
}

# ---------------------------------------------------------------------- main

loadavg_before=$(cut -d' ' -f1-3 /proc/loadavg)
build_type=$(awk -F= '/^CMAKE_BUILD_TYPE:/ {print $2}' "$build/CMakeCache.txt" 2>/dev/null || echo unknown)
log "work dir $work, build $build ($build_type), size $size, runs $runs, load $loadavg_before"
mkdir -p "$work/pki"
pair_make_pki primary replica >/dev/null

IFS=, read -r -a wanted <<< "$scenarios"
for s in "${wanted[@]}"; do
  case $s in
    P1) scenario_p1 ;;
    P2) scenario_p2 ;;
    P3) scenario_p3 ;;
    P4) scenario_p4 ;;
    P5) scenario_p5 ;;
    P6) scenario_p6 ;;
    *) echo "unknown scenario $s"; exit 2 ;;
  esac
done

python3 - "$work/meta.json" <<PY
import json, sys, platform, os
json.dump({"when": "$(date -u +%FT%TZ)", "size": $(bytes_of "$size"), "runs": $runs, "quick": bool($quick),
           "build": "$build", "build_type": "$build_type", "dir": "$dir", "loadavg_before": "$loadavg_before",
           "loadavg_after": open("/proc/loadavg").read().split()[:3], "cpus": os.cpu_count(),
           "kernel": platform.release(), "scenarios": "$scenarios",
           "apply_while_receiving": $( [[ -n $replica_toml ]] && echo False || echo True ),
           "p3_seed": "$( ((seed_move)) && echo move || echo copy )"}, open(sys.argv[1], "w"))
PY
python3 "$root/bench/report.py" "$runs_file" "$out" "$work/meta.json"
