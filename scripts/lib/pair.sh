# Sourced (bash) by scripts/demo.sh and bench/run.sh: a lab PKI and two
# vmreplicad daemons on loopback ("primary" and "replica").
#
# The caller sets, before calling anything here:
#   vmr, vmrd   paths of the vmreplica CLI and the vmreplicad daemon
#   work        a directory of its own (the PKI and the daemons live in it)
# and kills the daemons it started: their pids are in the array PAIR_PIDS
# (pair_stop_daemons does it).

PAIR_PIDS=()

# A TCP port nothing listens on (ss is in iproute2).
pair_free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 40000))
    [[ -z "$(ss -Htln "sport = :$p")" ]] && { echo "$p"; return; }
  done
}

# A lab CA in $work/pki and one certificate per host name given (default:
# primary replica), issued for localhost and 127.0.0.1.
pair_make_pki() {
  local h hosts=("$@")
  ((${#hosts[@]})) || hosts=(primary replica)
  $vmr cert ca --cert "$work/pki/ca.crt" --key "$work/pki/ca.key" --cn "vmreplica demo CA"
  for h in "${hosts[@]}"; do
    $vmr cert issue --ca-cert "$work/pki/ca.crt" --ca-key "$work/pki/ca.key" --cn "$h.demo.vmreplica" \
      --san localhost --san 127.0.0.1 --cert "$work/pki/$h.crt" --key "$work/pki/$h.key"
  done
}

# pair_start_daemon NAME PORT [EXTRA_TOML]: starts vmreplicad NAME listening
# on 127.0.0.1:PORT with $work/NAME as its home, and waits until its admin
# socket answers. EXTRA_TOML is appended to its config file (e.g. a
# [testing] section). Exits the script when the daemon does not come up.
pair_start_daemon() {
  local name=$1 port=$2 extra=${3:-}
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
$extra
TOML
  $vmrd --config "$work/$name/vmreplicad.toml" &
  PAIR_PIDS+=($!)
  for _ in $(seq 100); do
    $vmr --socket "$work/$name/admin.sock" service status >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "vmreplicad $name did not start:"; cat "$work/$name/vmreplicad.log"; exit 1
}

# The pid of the Nth daemon started here (0 = the first).
pair_pid() { echo "${PAIR_PIDS[$1]}"; }

# Stops every daemon started here: SIGTERM, up to 30 s to finish, then SIGKILL.
pair_stop_daemons() {
  local p
  for p in "${PAIR_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PAIR_PIDS[@]}"; do
    for _ in $(seq 300); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  PAIR_PIDS=()
}
