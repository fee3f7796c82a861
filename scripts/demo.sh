#!/usr/bin/env bash
# The README's demo command. Installs what is missing, builds, then on
# loopback: makes a lab CA and two host certificates, starts two vmreplicad
# daemons, makes the second a replica server that authorises the first, and
# runs a real connection test (mutual TLS, authorization) from the first;
# then protects a VM disk, replicates writes in cycles, loses the primary,
# fails over on the replica and proves the failover disk holds the data.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
./scripts/build.sh default
bin=$PWD/build/default/tools
vmr=$bin/vmreplica/vmreplica
vmrd=$bin/vmreplicad/vmreplicad

work=$(mktemp -d /tmp/vmreplica-demo.XXXXXX)
# shellcheck source=lib/pair.sh
source scripts/lib/pair.sh  # pair_make_pki, pair_start_daemon (PKI + two daemons)
pids=()
cleanup() {
  for p in "${pids[@]}" "${PAIR_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "lab PKI in $work/pki"
pair_make_pki primary replica

p_port=$(pair_free_port); r_port=$(pair_free_port)
say "starting vmreplicad 'primary' (127.0.0.1:$p_port) and 'replica' (127.0.0.1:$r_port)"
pair_start_daemon primary "$p_port"
pair_start_daemon replica "$r_port"
P="$vmr --socket $work/primary/admin.sock"
R="$vmr --socket $work/replica/admin.sock"

say "replica: enable the replica server, certificate authentication"
$R server set --enable --auth certificate
$R server get
say "replica: authorise primary.demo.vmreplica, store its replicas under $work/replica/vms"
$R auth add primary.demo.vmreplica --storage "$work/replica/vms" --trust-group demo
$R auth list
say "primary: certificates it presents"
$P cert list
say "primary: Test-VMReplicationConnection 127.0.0.1 $r_port"
$P test-connection 127.0.0.1 "$r_port"
say "replica log (authorization decision)"
grep -h "hello from" "$work/replica/vmreplicad.log"

# ---------------------------------------------------------------- replication
say "primary: a VM disk (qcow2, 256 MiB) in a qemu-storage-daemon, exported over NBD for our writes"
mkdir -p "$work/vm"
qemu-img create -q -f qcow2 "$work/vm/vda.qcow2" 256M
qemu-storage-daemon \
  --blockdev "driver=file,node-name=vda-file,filename=$work/vm/vda.qcow2" \
  --blockdev driver=qcow2,node-name=vda,file=vda-file \
  --nbd-server "addr.type=unix,addr.path=$work/vm/nbd.sock" \
  --export type=nbd,id=vda-rw,node-name=vda,name=vda,writable=on \
  --chardev "socket,path=$work/vm/qmp.sock,server=on,wait=off,id=qmp0" --monitor chardev=qmp0 \
  > "$work/vm/qsd.log" 2>&1 &
qsd_pid=$!
pids+=($qsd_pid)
for _ in $(seq 100); do [[ -S "$work/vm/qmp.sock" && -S "$work/vm/nbd.sock" ]] && break; sleep 0.1; done
disk="nbd+unix:///vda?socket=$work/vm/nbd.sock"
write() { qemu-io -f raw "$disk" "$@" >/dev/null; }
# Some text-like (compressible) data and some random data.
write -c "write -P 0x41 0 16M" -c "write -P 0x42 64M 8M"
head -c 8M /dev/urandom > "$work/vm/random.bin"
qemu-io -f raw "$disk" -c "write -s $work/vm/random.bin 128M 8M" >/dev/null

say "primary: vm add demo (bind the running qemu-storage-daemon by its QMP socket)"
$P vm add demo --qmp "$work/vm/qmp.sock" --nbd-socket "$work/vm/nbd.sock" --disk vda=vda --memory 512 --vcpus 1
$P vm list
say "primary: Enable-VMReplication demo -> 127.0.0.1:$r_port, every 30 s, compressed"
$P enable demo --replica-server 127.0.0.1 --replica-port "$r_port" --interval 30 --compression
say "primary: Start-VMInitialReplication demo (network)"
$P start demo
$P get demo

hash_primary() { qemu-img convert -f raw -O raw "$disk" "$work/primary.raw" && sha256sum < "$work/primary.raw" | cut -d' ' -f1; }
vm_id=$($P --json vm get demo | python3 -c 'import json,sys; print(json.load(sys.stdin)["vm"]["id"])')
replica_disk="$work/replica/vms/$vm_id/disks/vda.img"
last_time() { $P --json get demo | python3 -c 'import json,sys; print(int(json.load(sys.stdin)["relationships"][0].get("last_replication_time_unix_ms", 0)))'; }
hash_padded() {  # sha256 of file $1 padded with zeros to the disk size (a sparse replica file may be shorter)
  python3 - "$1" $((256 << 20)) <<'PY'
import hashlib, sys
h = hashlib.sha256(); n = 0; size = int(sys.argv[2])
with open(sys.argv[1], 'rb') as f:
    while True:
        b = f.read(1 << 20)
        if not b: break
        h.update(b); n += len(b)
h.update(bytes(size - n)); print(h.hexdigest())
PY
}
hash_replica() { hash_padded "$replica_disk"; }  # the replica's latest image

verify() {
  local want got
  want=$(hash_primary)
  for _ in $(seq 150); do
    got=$(hash_replica)
    [[ "$got" == "$want" ]] && { echo "verified: replica sha256 $got == primary sha256 $want"; return 0; }
    sleep 0.2
  done
  echo "MISMATCH: replica $got != primary $want"; return 1
}
verify

for cycle in 1 2; do
  say "cycle $cycle: 2 MiB of random data and 32 patterned 64 KiB blocks written, then we wait for the next 30 s cycle"
  head -c 2M /dev/urandom > "$work/vm/random.bin"
  qemu-io -f raw "$disk" -c "write -s $work/vm/random.bin $(( (RANDOM % 120) * 2 ))M 2M" >/dev/null
  for i in $(seq 32); do
    off=$(( (RANDOM * 32768 + RANDOM) % 4096 * 65536 ))
    printf -- '-c\0write -P %d %d 65536\0' $((RANDOM % 255 + 1)) "$off"
  done | xargs -0 qemu-io -f raw "$disk" >/dev/null
  t=$(($(date +%s%N) / 1000000))
  while (( $(last_time) <= t )); do sleep 1; done
  grep -h "delta .* sent" "$work/primary/vmreplicad.log" | tail -1
  verify
done

say "Measure-VMReplication demo (statistics of this window)"
$P measure demo
say "what moved: initial copy and cycles (from the primary's log)"
grep -h -E "initial replication done|delta .* sent" "$work/primary/vmreplicad.log" | sed 's/^\[[^]]*\] \[[a-z]*\] //'
python3 - "$work/primary/vmreplicad.log" <<'PY'
import re, sys
data = wire = 0
for line in open(sys.argv[1]):
    m = re.search(r'(\d+) bytes (?:of data|changed) \((\d+) on the wire', line)
    if m: data += int(m.group(1)); wire += int(m.group(2))
print(f"total: {data} bytes of changed data, {wire} bytes on the wire, compression ratio {data / max(wire, 1):.2f}")
PY
# ---------------------------------------------------------------- failover
want=$(hash_primary)
say "host A lost: the primary VM's qemu-storage-daemon is killed (its last data: sha256 $want)"
kill -9 "$qsd_pid"
wait "$qsd_pid" 2>/dev/null || true
say "replica: the recovery points of demo"
$R points demo
say "replica: Start-VMFailover demo (unplanned, latest point; vmreplicad asks host A, which answers that the VM is not running)"
fo=$($R --json failover demo)
$R get demo
# The failover VM's disks are qcow2 overlays over the chosen point's NBD
# view, served by the replica's vmreplicad: nothing was copied. Reading that
# view through QEMU shows what the failover VM boots from.
seq=$(python3 -c 'import json,sys
doc = None
for line in sys.stdin:
    line = line.strip()
    if line: doc = json.loads(line)
print(json.loads(doc["job"]["result_json"])["sequence"])' <<< "$fo")
view="nbd+unix:///$vm_id/vda@$seq?socket=$work/replica/state/run/points.sock"
echo "failover point $seq, disk view $view"
qemu-img convert -f raw -O raw "$view" "$work/failover.raw"
got=$(hash_padded "$work/failover.raw")
if [[ "$got" != "$want" ]]; then echo "MISMATCH: failover disk $got != primary's last data $want"; exit 1; fi
echo "verified: the failover VM's disk (point $seq) sha256 $got == the primary's last data"
say "replica: Stop-VMFailover demo (the failover ends: its export goes, the state is back to Replicating)"
$R stop-failover demo
$R get demo

say "demo OK: VM 'demo' replicated from primary to replica every 30 s, failed over to the latest point on the replica, and its data arrived intact"
