#!/usr/bin/env bash
# Provision one meshagent node. The Vagrantfile runs it in every VM with
# MESHAGENT_PROVISION_VM=1; tests/integration/test_vagrant.py runs it with
# MESHAGENT_PROVISION_VM=0 inside a network-namespace "node" with every path
# pointed into a temporary directory. Steps (idempotent, safe to re-run):
#
#   1. scripts/setup.sh                  packages, headers, bpffs, venv (the one install path)
#   2. net.ipv4.ip_forward=1             (VM: also persisted in /etc/sysctl.d)
#   3. the config file                   mesh_cidrs = every node's pod CIDR
#   4. the mesh CA                       node 1 creates it in the shared folder if missing,
#                                        every node copies it to tunnel.ca_dir (root-only)
#   5. the CNI conflist                  ptp + host-local (this node's pod CIDR) + meshagent-cni
#   6. VM: routes to the other nodes' pod CIDRs via their private IPs
#   7. agent + tunnel                    VM: systemd units meshagent.service and
#                                        meshagent-tunnel.service, enabled and (re)started;
#                                        local: background processes (pid + log in the run dir)
#   8. demo pods through the CNI path    vagrant/make-pod.sh add NAME
#
# Environment:
#   MESHAGENT_PROVISION_VM     1 (VM: systemd, routes, persisted sysctl) or 0 (local); required
#   MESHAGENT_PROVISION_ROOT   the repository (default: this script's parent directory)
#   MESHAGENT_NODE_INDEX       N, 1-based (default 1): pod CIDR <prefix>.N.0/24
#   MESHAGENT_NODE_COUNT       number of nodes (default 1)
#   MESHAGENT_NODE_IPS         VM: comma-separated private IPs of nodes 1..COUNT
#   MESHAGENT_POD_CIDR_PREFIX  default 10.244
#   MESHAGENT_DEMO_PODS        pods to create (default "nN-a nN-b"; "" for none)
#   MESHAGENT_VENV             default <root>/.venv (the Vagrantfile uses /opt/meshagent/venv)
#   MESHAGENT_CONFIG, MESHAGENT_AGENT_SOCKET, MESHAGENT_AGENT_STATE_DIR,
#   MESHAGENT_AGENT_BPF_PIN_DIR, MESHAGENT_TUNNEL_CA_DIR, MESHAGENT_TUNNEL_POLICY_DIR,
#   MESHAGENT_TUNNEL_TRUST_DOMAIN   as in agent/config.py (written into the config file)
#   MESHAGENT_SHARED_CA_DIR    where node 1 leaves the CA for the others (default <root>/.vagrant-ca)
#   MESHAGENT_CA_WAIT_S        how long nodes 2.. wait for it (default 900)
#   MESHAGENT_READY_WAIT_S     how long to wait for agent + tunnel (default 120)
#   MESHAGENT_CNI_CONFLIST, MESHAGENT_CNI_CACHE_DIR, MESHAGENT_CNI_IPAM_DIR,
#   MESHAGENT_CNI_LOG_FILE     CNI paths (defaults under /etc/cni, /var/lib/cni, /var/log)
#   MESHAGENT_PROVISION_RUN_DIR  local mode: pid and log files (default /run/meshagent-provision)
set -euo pipefail

ROOT="${MESHAGENT_PROVISION_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
VM="${MESHAGENT_PROVISION_VM:-}"
N="${MESHAGENT_NODE_INDEX:-1}"
COUNT="${MESHAGENT_NODE_COUNT:-1}"
IPS="${MESHAGENT_NODE_IPS:-}"
POD_PREFIX="${MESHAGENT_POD_CIDR_PREFIX:-10.244}"
PODS="${MESHAGENT_DEMO_PODS-n$N-a n$N-b}"
export MESHAGENT_VENV="${MESHAGENT_VENV:-$ROOT/.venv}"
VENV="$MESHAGENT_VENV"
export MESHAGENT_CONFIG="${MESHAGENT_CONFIG:-/etc/meshagent/config.toml}"
CONFIG="$MESHAGENT_CONFIG"
SOCKET="${MESHAGENT_AGENT_SOCKET:-/run/meshagent/agent.sock}"
STATE_DIR="${MESHAGENT_AGENT_STATE_DIR:-/var/lib/meshagent}"
PIN_DIR="${MESHAGENT_AGENT_BPF_PIN_DIR:-/sys/fs/bpf/meshagent}"
CA_DIR="${MESHAGENT_TUNNEL_CA_DIR:-/etc/meshagent/ca}"
POLICY_DIR="${MESHAGENT_TUNNEL_POLICY_DIR:-/etc/meshagent/policies}"
TRUST_DOMAIN="${MESHAGENT_TUNNEL_TRUST_DOMAIN:-cluster.local}"
SHARED_CA="${MESHAGENT_SHARED_CA_DIR:-$ROOT/.vagrant-ca}"
CA_WAIT_S="${MESHAGENT_CA_WAIT_S:-900}"
CNI_CONFLIST="${MESHAGENT_CNI_CONFLIST:-/etc/cni/net.d/10-meshagent.conflist}"
export MESHAGENT_CNI_CONFLIST="$CNI_CONFLIST"
export MESHAGENT_CNI_CACHE_DIR="${MESHAGENT_CNI_CACHE_DIR:-/var/lib/cni/meshagent-demo}"
CNI_IPAM_DIR="${MESHAGENT_CNI_IPAM_DIR:-/var/lib/cni/networks}"
CNI_LOG="${MESHAGENT_CNI_LOG_FILE:-/var/log/meshagent-cni.log}"
RUN_DIR="${MESHAGENT_PROVISION_RUN_DIR:-/run/meshagent-provision}"
READY_WAIT_S="${MESHAGENT_READY_WAIT_S:-120}"
MA="$VENV/bin/meshagent"

log() { printf '[provision node%s] %s\n' "$N" "$*" >&2; }
die() { printf '[provision node%s] error: %s\n' "$N" "$*" >&2; exit 1; }

case "$VM" in
  1|0) ;;
  *) die "set MESHAGENT_PROVISION_VM=1 (a VM: systemd units, routes) or 0 (local: background processes)" ;;
esac
[ "$(id -u)" -eq 0 ] || die "run as root"
[[ "$N" =~ ^[0-9]+$ && "$COUNT" =~ ^[0-9]+$ ]] || die "MESHAGENT_NODE_INDEX/COUNT must be numbers"
[[ "$READY_WAIT_S" =~ ^[0-9]+$ && "$CA_WAIT_S" =~ ^[0-9]+$ ]] || die "MESHAGENT_READY_WAIT_S/CA_WAIT_S must be seconds"
if [ "$N" -lt 1 ] || [ "$N" -gt "$COUNT" ] || [ "$COUNT" -gt 254 ]; then
  die "MESHAGENT_NODE_INDEX=$N is not in 1..MESHAGENT_NODE_COUNT=$COUNT (at most 254)"
fi
IFS=, read -r -a NODE_IPS <<< "$IPS"
if [ "$VM" = 1 ] && [ "${#NODE_IPS[@]}" -ne "$COUNT" ]; then
  die "MESHAGENT_NODE_IPS has ${#NODE_IPS[@]} addresses for $COUNT nodes"
fi
pod_cidr() { printf '%s.%s.0/24' "$POD_PREFIX" "$1"; }

# --- 1. node setup: the same script as a bare node and CI ------------------
log "scripts/setup.sh (venv $VENV)"
bash "$ROOT/scripts/setup.sh"
[ -x "$MA" ] || die "$MA missing after setup.sh"

# --- 2. forwarding: pods' traffic is routed through the node ----------------
sysctl -qw net.ipv4.ip_forward=1
if [ "$VM" = 1 ]; then
  printf '# meshagent (vagrant/provision.sh): the node routes pod traffic\nnet.ipv4.ip_forward = 1\n' \
    > /etc/sysctl.d/90-meshagent.conf
fi

# --- 3. config ----------------------------------------------------------------
cidrs=()
for m in $(seq 1 "$COUNT"); do cidrs+=("\"$(pod_cidr "$m")\""); done
mkdir -p "$(dirname "$CONFIG")"
tmp="$CONFIG.tmp.$$"
cat > "$tmp" <<EOF
# Written by vagrant/provision.sh for node $N of $COUNT; provisioning rewrites it.
[agent]
socket = "$SOCKET"
state_dir = "$STATE_DIR"
bpf_pin_dir = "$PIN_DIR"

[tunnel]
mode = "hbone"
trust_domain = "$TRUST_DOMAIN"
ca_dir = "$CA_DIR"
policy_dir = "$POLICY_DIR"
# Every node's pod CIDR goes over HBONE (no control plane to list workloads).
mesh_cidrs = [$(IFS=,; echo "${cidrs[*]}")]
# A dial to another node's 15008 waits out that node's tunnel restart (its SYNs
# are dropped until the new tunnel listens, and retransmitted): under QEMU
# without KVM a tunnel takes ~21 s to start, past the 5 s default. ztunnel sets
# no connect timeout at all (src/config.rs), leaving it to the kernel's SYN retries.
connect_timeout_seconds = 45.0
EOF
"$VENV/bin/python" -c 'import sys; from agent import config; config.load(sys.argv[1], env={})' "$tmp" \
  || { rm -f "$tmp"; die "the generated config is invalid"; }
mv -f "$tmp" "$CONFIG"
mkdir -p "$POLICY_DIR"
log "wrote $CONFIG (mesh_cidrs ${cidrs[*]})"

# --- 4. the mesh CA, shared through the synced folder ---------------------
if [ ! -f "$SHARED_CA/ca.crt" ] || [ ! -f "$SHARED_CA/ca.key" ]; then
  if [ "$N" -eq 1 ]; then
    # Create it aside and rename: the other nodes never see half a CA.
    staging="$SHARED_CA.tmp.$(hostname).$$"
    rm -rf "$staging"
    "$MA" ca init --dir "$staging" --trust-domain "$TRUST_DOMAIN"
    printf '*\n' > "$staging/.gitignore"  # lab key material: never committed
    rm -rf "$SHARED_CA"
    mv -T "$staging" "$SHARED_CA"
    log "created the mesh CA in $SHARED_CA"
  else
    log "waiting (at most ${CA_WAIT_S}s) for node 1 to create the mesh CA in $SHARED_CA"
    deadline=$((SECONDS + CA_WAIT_S))
    until [ -f "$SHARED_CA/ca.crt" ] && [ -f "$SHARED_CA/ca.key" ]; do
      [ "$SECONDS" -lt "$deadline" ] || die "no CA in $SHARED_CA after ${CA_WAIT_S}s: provision node1 first"
      sleep 5
    done
  fi
fi
install -d -m 0700 "$CA_DIR"
install -m 0600 "$SHARED_CA/ca.key" "$CA_DIR/ca.key"
install -m 0644 "$SHARED_CA/ca.crt" "$CA_DIR/ca.crt"
"$MA" ca init --dir "$CA_DIR" --trust-domain "$TRUST_DOMAIN" >/dev/null  # loads and checks it
log "mesh CA installed in $CA_DIR (root-only)"

# --- 5. CNI network configuration (what a runtime would read) -------------
mkdir -p "$(dirname "$CNI_CONFLIST")"
"$VENV/bin/python" - "$CNI_CONFLIST" "$(pod_cidr "$N")" "$CNI_IPAM_DIR" "$SOCKET" "$CNI_LOG" <<'PY'
import ipaddress, json, os, sys
path, cidr, ipam_dir, socket, log_file = sys.argv[1:6]
net = ipaddress.ip_network(cidr)
conf = {
    "cniVersion": "1.0.0",
    "name": "meshagent-demo",
    "plugins": [
        {"type": "ptp", "ipMasq": False,
         "ipam": {"type": "host-local",
                  "ranges": [[{"subnet": cidr, "rangeStart": str(net.network_address + 10),
                               "rangeEnd": str(net.network_address + 250),
                               "gateway": str(net.network_address + 1)}]],
                  "routes": [{"dst": "0.0.0.0/0"}], "dataDir": ipam_dir}},
        {"type": "meshagent-cni",
         "meshagent": {"agent_socket": socket, "enrolled_namespaces": ["default"],
                       "fail_open": False, "timeout_seconds": 20, "log_file": log_file}},
    ],
}
tmp = f"{path}.tmp"
with open(tmp, "w") as f:
    f.write(json.dumps(conf, indent=2) + "\n")
os.replace(tmp, path)
PY
log "wrote $CNI_CONFLIST (ptp + host-local $(pod_cidr "$N") + meshagent-cni)"

# --- 6. VM: routes to the other nodes' pods, and facts for vagrant-check.sh -
node_env="$(dirname "$CONFIG")/node.env"
if [ "$VM" = 1 ]; then
  my_ip="${NODE_IPS[$((N - 1))]}"
  private_if="$(ip -o -4 addr show | awk -v ip="$my_ip" 'index($4, ip "/") == 1 { print $2; exit }')"
  [ -n "$private_if" ] || die "no interface has $my_ip (the Vagrantfile's private network)"
  for m in $(seq 1 "$COUNT"); do
    [ "$m" -eq "$N" ] && continue
    ip route replace "$(pod_cidr "$m")" via "${NODE_IPS[$((m - 1))]}" dev "$private_if"
    log "route $(pod_cidr "$m") via ${NODE_IPS[$((m - 1))]} dev $private_if"
  done
else
  my_ip="" private_if=""
fi
cat > "$node_env" <<EOF
NODE_INDEX=$N
NODE_IP=$my_ip
PRIVATE_IF=$private_if
POD_CIDR=$(pod_cidr "$N")
PODS="$PODS"
MESHAGENT=$MA
EOF

# --- 7. agent and tunnel ------------------------------------------------------
agent_ready() {  # the agent answers and the tunnel's outbound listener is up
  # One probe may take a while: the CLI imports for 15 s and more under QEMU
  # without KVM (TCG); the loop around it is bounded by READY_WAIT_S.
  timeout 90 "$MA" status --json 2>/dev/null \
    | "$VENV/bin/python" -c 'import json, sys; sys.exit(0 if 15001 in json.load(sys.stdin)["listeners"] else 1)' \
    2>/dev/null
}

if [ "$VM" = 1 ]; then
  for unit in meshagent.service meshagent-tunnel.service; do
    sed -e "s|@VENV@|$VENV|g" -e "s|@CONFIG@|$CONFIG|g" "$ROOT/vagrant/systemd/$unit" \
      > "/etc/systemd/system/$unit"
  done
  systemctl daemon-reload
  systemctl enable meshagent.service meshagent-tunnel.service
  # restart, not start: re-provisioning picks up new code and config.
  systemctl restart meshagent.service
  systemctl restart meshagent-tunnel.service
  where="journalctl -u meshagent -u meshagent-tunnel"
else
  mkdir -p "$RUN_DIR"
  for proc in agent tunnel; do
    pidfile="$RUN_DIR/$proc.pid"
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      log "stopping the previous $proc (pid $(cat "$pidfile"))"
      kill "$(cat "$pidfile")"
      for _ in $(seq 100); do kill -0 "$(cat "$pidfile")" 2>/dev/null || break; sleep 0.1; done
    fi
    cmd=run; [ "$proc" = tunnel ] && cmd=tunnel
    # Own session (process group): whoever stops it can signal the group.
    MESHAGENT_LOG_JSON=1 PYTHONUNBUFFERED=1 setsid "$MA" "$cmd" \
      >>"$RUN_DIR/$proc.log" 2>&1 </dev/null &
    echo $! > "$pidfile"
    log "started $proc (pid $!, log $RUN_DIR/$proc.log)"
  done
  where="$RUN_DIR/agent.log and $RUN_DIR/tunnel.log"
fi
deadline=$((SECONDS + READY_WAIT_S))
until agent_ready; do
  [ "$SECONDS" -lt "$deadline" ] || die "agent/tunnel not ready within ${READY_WAIT_S}s; see $where"
  sleep 1
done
log "agent and tunnel ready (socket $SOCKET)"

# --- 8. demo pods, created like a runtime creates them --------------------
for pod in $PODS; do
  bash "$ROOT/vagrant/make-pod.sh" add "$pod" default
done
"$MA" pod list
log "done"
