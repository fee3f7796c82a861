#!/usr/bin/env bash
# The README's demo command. Installs what is missing, builds, then on
# loopback: makes a lab CA and two host certificates, starts two vmreplicad
# daemons, makes the second a replica server that authorises the first, and
# runs a real connection test (mutual TLS, authorization) from the first.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
./scripts/build.sh default
bin=$PWD/build/default/tools
vmr=$bin/vmreplica/vmreplica
vmrd=$bin/vmreplicad/vmreplicad

work=$(mktemp -d /tmp/vmreplica-demo.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

free_port() {  # a TCP port nothing listens on (ss is in iproute2)
  local p
  while :; do
    p=$((20000 + RANDOM % 40000))
    [[ -z "$(ss -Htln "sport = :$p")" ]] && { echo "$p"; return; }
  done
}

say "lab PKI in $work/pki"
$vmr cert ca --cert "$work/pki/ca.crt" --key "$work/pki/ca.key" --cn "vmreplica demo CA"
for h in primary replica; do
  $vmr cert issue --ca-cert "$work/pki/ca.crt" --ca-key "$work/pki/ca.key" --cn "$h.demo.vmreplica" \
    --san localhost --san 127.0.0.1 --cert "$work/pki/$h.crt" --key "$work/pki/$h.key"
done

start_daemon() {  # name port
  local name=$1 port=$2
  mkdir -p "$work/$name"
  cat > "$work/$name/vmreplicad.toml" <<TOML
[daemon]
state_dir = "$work/$name/state"
admin_socket = "$work/$name/admin.sock"
log_file = "$work/$name/vmreplicad.log"
[listener]
address = "127.0.0.1"
port = $port
[tls]
ca = "$work/pki/ca.crt"
certificate = "$work/pki/$name.crt"
key = "$work/pki/$name.key"
TOML
  $vmrd --config "$work/$name/vmreplicad.toml" &
  pids+=($!)
  for _ in $(seq 100); do
    $vmr --socket "$work/$name/admin.sock" service status >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "vmreplicad $name did not start:"; cat "$work/$name/vmreplicad.log"; exit 1
}

p_port=$(free_port); r_port=$(free_port)
say "starting vmreplicad 'primary' (127.0.0.1:$p_port) and 'replica' (127.0.0.1:$r_port)"
start_daemon primary "$p_port"
start_daemon replica "$r_port"
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
say "demo OK: the primary reached the replica over mutual TLS and is authorised to replicate to it"
