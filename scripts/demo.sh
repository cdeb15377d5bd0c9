#!/usr/bin/env bash
# One command from a fresh node to pods talking through the mesh:
#   sudo scripts/demo.sh [--keep] [--mode hbone|plain] [--pods cni|veth] [--kube]
# Sets the node up, builds a two-node lab in network namespaces, starts an
# agent and a tunnel per node, creates the pods through the CNI path (the
# reference ptp + host-local plugins with meshagent-cni chained after them,
# invoked as a container runtime does), sends real traffic (curl, iperf3)
# between them and shows that it went through the tunnels. Tears the lab down
# at the end unless --keep is given. --kube: the Kubernetes demo instead (the lab's
# API server; kubectl label enrolls a namespace, then opts one pod out).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KEEP=0
KUBE=0
MODE="${MESHAGENT_LAB_MODE:-hbone}"
PODS="${MESHAGENT_LAB_PODS:-cni}"
PREFIX="${MESHAGENT_DEMO_PREFIX:-demo}"
while [ $# -gt 0 ]; do
  case "$1" in
    --keep) KEEP=1 ;;
    --kube) KUBE=1 ;;
    --mode) MODE="$2"; shift ;;
    --mode=*) MODE="${1#--mode=}" ;;
    --pods) PODS="$2"; shift ;;
    --pods=*) PODS="${1#--pods=}" ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

bash "$ROOT/scripts/setup.sh"
MA="$ROOT/.venv/bin/meshagent"
export MESHAGENT_LAB_MODE="$MODE"
RUN="/run/meshagent-lab/$PREFIX"

cleanup() {
  if [ "$KEEP" -eq 0 ]; then
    echo; echo "== tearing the lab down"
    "$MA" lab down --prefix "$PREFIX" || true
  else
    echo; echo "== lab kept: '$MA lab list --prefix $PREFIX'; remove with '$MA lab down --prefix $PREFIX'"
  fi
}
"$MA" lab down --prefix "$PREFIX" >/dev/null 2>&1 || true
trap cleanup EXIT

# --- Kubernetes (issue 15): enrollment by Istio's labels, the model from the API -----
kube_demo() {
  echo "== lab up --kube (tunnel mode: $MODE, pods via: $PODS): the lab API server on node1"
  "$MA" lab up --prefix "$PREFIX" --pods "$PODS" --kube
  local kubectl=(nsenter "--net=/run/netns/$PREFIX-node1" -- kubectl --kubeconfig "$RUN/kubeconfig")
  local n1=(env MESHAGENT_AGENT_SOCKET="$RUN/node1/agent.sock" MESHAGENT_CONFIG="$RUN/config.toml" COLUMNS=120)
  local n2=(env MESHAGENT_AGENT_SOCKET="$RUN/node2/agent.sock" MESHAGENT_CONFIG="$RUN/config.toml" COLUMNS=120)
  echo; echo "== kubectl get pods -A (registered by lab up; nothing enrolled yet)"
  "${kubectl[@]}" get pods -A -o wide
  wait_pods() {  # wait_pods NODE N: until NODE's agent has N enrolled pods (<= 10 s)
    for _ in $(seq 100); do
      [ "$(env MESHAGENT_AGENT_SOCKET="$RUN/$1/agent.sock" "$MA" pod list --json | \
           python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')" = "$2" ] && return 0
      sleep 0.1
    done
    echo "  (node $1 did not reach $2 enrolled pods within 10 s)"
  }
  echo; echo "== kubectl label namespace default istio.io/dataplane-mode=ambient"
  "${kubectl[@]}" label namespace default istio.io/dataplane-mode=ambient
  wait_pods node1 1; wait_pods node2 1
  echo; echo "== node1: meshagent status (its kubernetes block: every pod on the node, Istio's verdict)"
  "${n1[@]}" "$MA" status
  echo; echo "== ambient.istio.io/redirection, as the agents annotated the pods"
  "${kubectl[@]}" get pods -A -o 'custom-columns=POD:.metadata.name,NODE:.spec.nodeName,REDIRECTION:.metadata.annotations.ambient\.istio\.io/redirection'
  local n2a; n2a=$("${kubectl[@]}" get pod n2-a -o jsonpath='{.status.podIP}')
  bg_in_pod n2-a python3 -m http.server 8080 --bind ::
  for _ in $(seq 50); do inpod n2-a sh -c 'ss -ltn | grep -q ":8080 "' && break; sleep 0.1; done
  echo; echo "== curl n1-a -> n2-a ($n2a), both enrolled by the label"
  show "n1-a -> n2-a" "$(inpod n1-a curl -s -m 5 -o /dev/null -w 'HTTP %{http_code}' "http://$n2a:8080/")"
  tunnel_lines
  echo; echo "== kubectl label pod n2-a istio.io/dataplane-mode=none (opt out)"
  "${kubectl[@]}" label pod n2-a istio.io/dataplane-mode=none
  wait_pods node2 0
  "${n2[@]}" "$MA" status | sed -n '/kubernetes:/,$p'
  show "n1-a -> n2-a (n2-a opted out)" "$(inpod n1-a curl -s -m 5 -o /dev/null -w 'HTTP %{http_code}' "http://$n2a:8080/")"
  tunnel_lines
}
tunnel_lines() {  # the tunnels' access log: connections to port 8080
  python3 - "$RUN" <<'PY'
import json, pathlib, sys
run = pathlib.Path(sys.argv[1])
for node in sorted(p.name for p in run.iterdir() if p.is_dir()):
    log = run / node / "tunnel.log"
    for line in (log.read_text().splitlines() if log.exists() else []):
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("event") == "connection closed" and e.get("dst", "").endswith(":8080"):
            print(f"  {node}: {e['direction']:8} {e['path']:11} {e['src']:>22} -> {e['dst']:<20} "
                  f"{e.get('src_identity', '')} {e['result']}")
PY
}
inpod() { local pod="$1"; shift; "$MA" lab exec --prefix "$PREFIX" "$pod" -- "$@"; }
bg_in_pod() { local pod="$1"; shift; nsenter --net="/run/netns/$PREFIX-$pod" -- "$@" >/dev/null 2>&1 & }
show() { printf '  %-44s %s\n' "$1" "$2"; }
if [ "$KUBE" -eq 1 ]; then
  kube_demo
  exit 0
fi

echo "== lab up (tunnel mode: $MODE, pods via: $PODS)"
"$MA" lab up --prefix "$PREFIX" --pods "$PODS"
"$MA" lab list --prefix "$PREFIX"

# Pod addresses come from IPAM: read them back from the lab.
addr() {  # addr POD v4|v6
  "$MA" lab list --prefix "$PREFIX" --json | python3 -c '
import json, sys
pod, family = sys.argv[1], sys.argv[2]
for node in json.load(sys.stdin)["nodes"]:
    for p in node["pods"]:
        if p["name"] == pod:
            print(p["ipv4"] if family == "v4" else p["ipv6"])' "$1" "$2"
}
N2A=$(addr n2-a v4); N2A6=$(addr n2-a v6); N1B=$(addr n1-b v4)

echo; echo "== servers: HTTP on :8080 and iperf3 in n2-a and n1-b"
bg_in_pod n2-a python3 -m http.server 8080 --bind ::
bg_in_pod n1-b python3 -m http.server 8080 --bind ::
bg_in_pod n2-b python3 -m http.server 8080 --bind ::
bg_in_pod n2-a iperf3 -s -1
for _ in $(seq 50); do
  inpod n2-a sh -c 'ss -ltn | grep -q ":5201 "' && inpod n2-a sh -c 'ss -ltn | grep -q ":8080 "' && break
  sleep 0.1
done

echo; echo "== curl between pods"
show "n1-a -> n2-a (cross-node, IPv4)" "$(inpod n1-a curl -s -m 5 -o /dev/null -w 'HTTP %{http_code}' "http://$N2A:8080/")"
show "n1-a -> n2-a (cross-node, IPv6)" "$(inpod n1-a curl -s -m 5 -o /dev/null -w 'HTTP %{http_code}' "http://[$N2A6]:8080/")"
show "n1-a -> n1-b (same node)" "$(inpod n1-a curl -s -m 5 -o /dev/null -w 'HTTP %{http_code}' "http://$N1B:8080/")"
show "n1-plain (not enrolled) -> n2-a" "$(inpod n1-plain curl -s -m 5 -o /dev/null -w 'HTTP %{http_code}' "http://$N2A:8080/")"

echo; echo "== a Service: web.default.svc.cluster.local (VIPs 10.96.0.10, fd00:96::10 :80 -> n1-b, n2-b :8080), by name"
# The cluster's resolver: dnsmasq on node2's underlay address. It knows nothing of
# the lab's services. Enrolled pods' DNS is captured by the datapath (datapath.
# dns_capture, on by default) and answered by their node's tunnel from its model.
RESOLVER=$("$MA" lab list --prefix "$PREFIX" --json | python3 -c '
import json, sys
print(next(n["underlay_ipv4"] for n in json.load(sys.stdin)["nodes"] if n["name"] == "node2"))')
nsenter --net="/run/netns/$PREFIX-node2" -- dnsmasq --keep-in-foreground --conf-file=/dev/null \
  --no-resolv --no-hosts --bind-interfaces --listen-address="$RESOLVER" --port=53 --pid-file= \
  --cache-size=0 --user=root --local=/cluster.local/ >"$RUN/dnsmasq.log" 2>&1 &
# Each pod's resolv.conf as the kubelet writes it (ClusterFirst, namespace default),
# in the lab's run directory (lab down removes it); bind-mounted over /etc/resolv.conf
# in a private mount namespace for one command, so nothing on the host changes.
for pod in n1-a n1-plain; do
  printf 'nameserver %s\nsearch default.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n' \
    "$RESOLVER" > "$RUN/resolv-$pod.conf"
done
inpod_dns() {  # inpod_dns POD COMMAND...: COMMAND in POD with its own resolv.conf
  local pod="$1"; shift
  # shellcheck disable=SC2016  # $0 and $@ are the inner shell's
  nsenter --net="/run/netns/$PREFIX-$pod" -- unshare --mount -- \
    sh -c 'mount --bind "$0" /etc/resolv.conf && exec "$@"' "$RUN/resolv-$pod.conf" "$@"
}
for _ in $(seq 50); do
  nsenter --net="/run/netns/$PREFIX-node2" -- ss -Hltn "sport = :53" | grep -q . && break
  sleep 0.1
done
show "n1-a: resolve web (answered by its tunnel)" \
  "$(inpod_dns n1-a getent ahosts web.default.svc.cluster.local | awk '{print $1}' | sort -u | xargs)"
show "n1-plain (not enrolled): resolve web" \
  "$(inpod_dns n1-plain getent hosts web.default.svc.cluster.local || echo 'not found (dnsmasq does not know it)')"
for i in 1 2 3 4 5 6; do
  show "n1-a: curl http://web.default.svc.cluster.local/" \
    "$(inpod_dns n1-a curl -s -m 5 -o /dev/null -w "HTTP %{http_code} (#$i)" http://web.default.svc.cluster.local/)"
done

echo; echo "== iperf3 n1-a -> n2-a, 3 s"
inpod n1-a iperf3 -c "$N2A" -t 3 -J > "$RUN/iperf3.json"
python3 - "$RUN/iperf3.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["end"]["sum_received"]
print(f"  received {r['bytes'] / 1e6:.1f} MB at {r['bits_per_second'] / 1e9:.2f} Gbit/s")
PY

echo; echo "== what the tunnels saw (access log, one line per connection)"
python3 - "$RUN" <<'PY'
import json, pathlib, sys
run = pathlib.Path(sys.argv[1])
for node in sorted(p.name for p in run.iterdir() if p.is_dir()):
    log = run / node / "tunnel.log"
    if not log.exists():
        continue
    for line in log.read_text().splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("event") != "connection closed":
            continue
        service = f" service={e['service']}" if "service" in e else ""
        print(f"  {node}: {e['direction']:8} {e['path']:11} {e['src']:>26} -> {e['dst']:<26} "
              f"sent={e['bytes_sent']} received={e['bytes_received']} {e['result']}{service}")
PY

echo; echo "== node1: agent status (datapath counters, tunnel, certificates)"
MESHAGENT_AGENT_SOCKET="$RUN/node1/agent.sock" MESHAGENT_CONFIG="$RUN/config.toml" COLUMNS=120 "$MA" status

echo; echo "== node2: Istio TCP metrics from the tunnel (reporter=destination)"
nsenter --net="/run/netns/$PREFIX-node2" curl -s http://127.0.0.1:15020/metrics | python3 -c '
import re, sys
for line in sys.stdin:
    m = re.match(r"(istio_tcp_\w+)\{(.*)\} (\S+)", line)
    if not m or m.group(1) not in ("istio_tcp_connections_opened_total",
                                   "istio_tcp_received_bytes_total"):
        continue
    labels = dict(re.findall(r"(\w+)=\"([^\"]*)\"", m.group(2)))
    src, dst = labels["source_workload"], labels["destination_workload"]
    security = labels["connection_security_policy"]
    print(f"  {m.group(1):38} {src:>8} -> {dst:<6} {security:10} {float(m.group(3)):.0f}")'

# == Waypoints (issue 16): a lab of its own, three pods per node, three waypoint pods
# (agent/lab/waypoints.py): an L7 policy (GET only, from namespace default) at the
# namespace waypoint of team-b, an L4-only service (istio.io/use-waypoint: none) that
# skips it, a per-service waypoint, a shared one, and a missing one (fail closed).
waypoint_demo() {
  WAYPOINT_PREFIX="${MESHAGENT_DEMO_WAYPOINT_PREFIX:-demowp}"
  local wp="$WAYPOINT_PREFIX" run="/run/meshagent-lab/$WAYPOINT_PREFIX"
  if [ "$MODE" != "hbone" ]; then
    echo; echo "== waypoints: skipped (they need --mode hbone)"; return 0
  fi
  waypoint_cleanup() {
    if [ "$KEEP" -eq 0 ]; then "$MA" lab down --prefix "$WAYPOINT_PREFIX" >/dev/null || true
    else echo "== waypoint lab kept: '$MA lab down --prefix $WAYPOINT_PREFIX' removes it"; fi
  }
  trap 'waypoint_cleanup; cleanup' EXIT
  "$MA" lab down --prefix "$wp" >/dev/null 2>&1 || true
  echo; echo "== waypoints: lab '$wp' (veth pods, 3 per node: -a default, -b team-b, -c team-c)"
  "$MA" lab up --prefix "$wp" --pods veth --pods-per-node 3
  "$MA" lab waypoints --prefix "$wp"
  local pod
  for pod in n1-b n2-b n1-c n2-c; do
    nsenter --net="/run/netns/$wp-$pod" -- python3 "$ROOT/tests/integration/programs/datapath_server.py" \
      "$pod" 8080 8081 8082 16 >/dev/null 2>&1 &
  done
  for _ in $(seq 50); do
    nsenter --net="/run/netns/$wp-n2-c" -- sh -c 'ss -ltn | grep -q ":8080 "' && break
    sleep 0.1
  done
  sleep 2  # the tunnels poll the model every 0.2 s
  wcurl() {  # wcurl POD METHOD URL: the status, the body's first line, or the curl error
    nsenter --net="/run/netns/$wp-$1" -- curl -sS -m 5 -X "$2" -o - -w ' [HTTP %{http_code}]' "$3" 2>&1 \
      | tr '\n' ' ' | cut -c1-70
  }
  echo
  show "n1-a (default) GET  echo.team-b" "$(wcurl n1-a GET http://10.96.1.10/)"
  show "n2-a (default) GET  echo.team-b" "$(wcurl n2-a GET http://10.96.1.10/)"
  show "n1-a (default) POST echo.team-b" "$(wcurl n1-a POST http://10.96.1.10/)"
  show "n1-c (team-c)  GET  echo.team-b" "$(wcurl n1-c GET http://10.96.1.10/)"
  show "n1-a POST db.team-b (use-waypoint: none)" "$(wcurl n1-a POST http://10.96.1.11/)"
  show "n1-a GET  hot.team-b (per-service waypoint)" "$(wcurl n1-a GET http://10.96.1.12/)"
  show "n1-a POST echo.team-c (shared infra/shared)" "$(wcurl n1-a POST http://10.96.1.20/)"
  show "n1-a GET  ghost.team-b (waypoint 'gone')" "$(wcurl n1-a GET http://10.96.1.13/)"
  echo "   (peer= is the address the server saw: a waypoint pod's 10.244.N.20x, or the client's)"
  echo; echo "== what node1's tunnel logged for them"
  python3 - "$run/node1/tunnel.log" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    try:
        e = json.loads(line)
    except ValueError:
        continue
    if e.get("event") != "connection closed" or e.get("direction") != "outbound":
        continue
    via = e.get("waypoint") or "-"
    print(f"  {e['path']:9} {e.get('original_dst', e['dst']):>16} -> {e['dst']:<20} "
          f"{e['result']:12} waypoint={via} {e.get('reason', '')[:60]}")
PY
}
waypoint_demo
