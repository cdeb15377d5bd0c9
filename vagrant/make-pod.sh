#!/usr/bin/env bash
# Create or delete a demo pod through the CNI path, the way a container runtime
# does it:
#   make-pod.sh add NAME [NAMESPACE]    netns /run/netns/NAME, then CNI ADD
#   make-pod.sh del NAME [NAMESPACE]    CNI DEL, then delete the netns
#
# The plugins of the node's conflist (ptp + host-local, then meshagent-cni)
# run in the current network namespace (the node) with CNI_COMMAND,
# CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME, CNI_ARGS (K8S_POD_NAMESPACE,
# K8S_POD_NAME) and CNI_PATH set, each getting its conflist entry plus the
# previous plugin's result (prevResult) on stdin: agent/cni/runtime.py, the
# same code the netns lab (agent/lab/cnipods.py) drives. The ADD result is
# cached, as libcni does, for DEL.
#
# Environment (defaults are the VM's):
#   MESHAGENT_CNI_CONFLIST   /etc/cni/net.d/10-meshagent.conflist
#   MESHAGENT_CNI_CACHE_DIR  /var/lib/cni/meshagent-demo   (cached ADD results)
#   MESHAGENT_VENV           <repo>/.venv                   (python + meshagent-cni)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MESHAGENT_VENV:-$ROOT/.venv}"
CONFLIST="${MESHAGENT_CNI_CONFLIST:-/etc/cni/net.d/10-meshagent.conflist}"
CACHE="${MESHAGENT_CNI_CACHE_DIR:-/var/lib/cni/meshagent-demo}"

die() { printf '[make-pod] error: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,5p' "$0" >&2; exit 2; }

if [ $# -lt 2 ] || [ $# -gt 3 ]; then usage; fi
CMD="$1" NAME="$2" NAMESPACE="${3:-default}"
case "$CMD" in add|del) ;; *) usage ;; esac
[[ "$NAME" =~ ^[a-z0-9]([a-z0-9-]{0,40}[a-z0-9])?$ ]] || die "pod name '$NAME': use a DNS label (a-z, 0-9, -)"
[ "$(id -u)" -eq 0 ] || die "run as root: it creates network namespaces and runs CNI plugins"
[ -x "$VENV/bin/python" ] || die "no python in $VENV: run scripts/setup.sh first"
[ -f "$CONFLIST" ] || die "no conflist at $CONFLIST (vagrant/provision.sh writes it)"

NETNS="/run/netns/$NAME"
created=0
if [ "$CMD" = add ] && [ ! -e "$NETNS" ]; then
  ip netns add "$NAME"
  created=1
  ip -n "$NAME" link set lo up
fi

cni_path="/usr/lib/cni"
[ -d /opt/cni/bin ] && cni_path="$cni_path:/opt/cni/bin"
cni_path="$cni_path:$VENV/bin"

rc=0
"$VENV/bin/python" - "$CMD" "$NAME" "$NAMESPACE" "$NETNS" "$CONFLIST" "$CACHE" "$cni_path" <<'PY' || rc=$?
"""Run the conflist like a runtime (agent.cni.runtime), plugins in this netns."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from agent.cni import runtime

cmd, name, namespace, netns, conflist_path, cache, cni_path = sys.argv[1:8]
path = cni_path.split(":")
conflist = runtime.parse_conflist(Path(conflist_path).read_text())
rt = runtime.RuntimeConf(
    container_id=f"meshagent-demo-{name}", netns=netns, ifname="eth0",
    args=(("IgnoreUnknown", "1"), ("K8S_POD_NAMESPACE", namespace), ("K8S_POD_NAME", name)),
    cni_path=tuple(path))
cached = Path(cache) / f"{conflist.name}-{rt.container_id}-{rt.ifname}.json"


def execute(inv: runtime.Invocation) -> runtime.PluginOutput:
    binary = shutil.which(inv.plugin, path=os.pathsep.join(path))
    if binary is None:
        return runtime.PluginOutput(1, json.dumps(
            {"code": 5, "msg": f"plugin {inv.plugin!r} not found in {path}"}).encode())
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    try:
        proc = subprocess.run([binary], input=inv.stdin, env={**env, **inv.env},
                              capture_output=True, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        return runtime.PluginOutput(1, json.dumps(
            {"code": 11, "msg": f"{inv.plugin} did not finish within 60s"}).encode())
    return runtime.PluginOutput(proc.returncode, proc.stdout, proc.stderr)


def previous() -> dict | None:
    try:
        data = json.loads(cached.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


if cmd == "del":
    failures = runtime.delete(conflist, rt, previous(), execute)
    for failure in failures:
        print(f"[make-pod] {name}: {failure}", file=sys.stderr)
    if failures:
        sys.exit(1)
    cached.unlink(missing_ok=True)
    print(f"[make-pod] {namespace}/{name}: CNI DEL done")
    sys.exit(0)

if previous() is not None:
    # Re-provisioning: the pod exists already if its sandbox still does.
    try:
        runtime.check(conflist, rt, previous(), execute)
    except runtime.PluginFailed as exc:
        print(f"[make-pod] {name}: CHECK failed ({exc}); recreating", file=sys.stderr)
        runtime.delete(conflist, rt, previous(), execute)
        cached.unlink(missing_ok=True)
    else:
        print(f"[make-pod] {namespace}/{name}: already up (CNI CHECK passed)")
        sys.exit(0)
try:
    result = runtime.add(conflist, rt, execute)
except runtime.PluginFailed as exc:
    print(f"[make-pod] {name}: CNI ADD failed: {exc}", file=sys.stderr)
    runtime.delete(conflist, rt, None, execute)  # undo, as a runtime does
    sys.exit(1)
cached.parent.mkdir(parents=True, exist_ok=True)
tmp = cached.with_name(f".{cached.name}.tmp")
tmp.write_text(json.dumps(result, indent=2) + "\n")
os.replace(tmp, cached)
addresses = ", ".join(ip["address"] for ip in result.get("ips", []))
chain = " + ".join(str(p["type"]) for p in conflist.plugins)
print(f"[make-pod] {namespace}/{name}: {addresses} ({chain})")
PY

if [ "$CMD" = del ] && [ -e "$NETNS" ]; then
  ip netns del "$NAME"
elif [ "$CMD" = add ] && [ "$rc" -ne 0 ] && [ "$created" -eq 1 ]; then
  ip netns del "$NAME"  # ADD failed and was undone: leave no sandbox behind
fi
exit "$rc"
