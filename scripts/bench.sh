#!/usr/bin/env bash
# meshagent benchmarks: builds labs in network namespaces, measures, writes
# bench-results/<timestamp>/{report.md,*.png,results.json}.
#   sudo scripts/bench.sh [--quick] [--out DIR] [scenario ...]
# Scenarios (default: all, in this order): hbone redirect scale enroll resources
# services waypoint k8s (waypoint is loopback only: Fortio through waypoints vs HAProxy;
# k8s: kubectl label -> 100 pods enrolled, and the model at 10,000 pods).
# --quick: 1 repetition and short runs, a smoke test (< 3 minutes); its numbers
# are marked "smoke only, not reported". The default run takes ~15 minutes.
# Every lab it creates is removed again, also on error or Ctrl-C.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
case "${1:-}" in -h|--help) sed -n '2,9p' "$0"; exit 0 ;; esac
[ "$(id -u)" -eq 0 ] || { echo "bench.sh: run as root (sudo $0)" >&2; exit 2; }
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m agent.bench "$@"
