#!/usr/bin/env bash
# Set up the node (idempotent) and run every test: lint, types, unit, BPF,
# netns integration, interop. Extra arguments go to pytest, e.g.
#   sudo scripts/test.sh tests/unit -x
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
echo "[test] ruff check"
.venv/bin/ruff check .
echo "[test] mypy (config: [tool.mypy] in pyproject.toml)"
.venv/bin/mypy
echo "[test] cargo test (native datapath: unit tests and the bounded fuzz targets)"
(cd agent/tunnel/native && CARGO_TARGET_DIR="$PWD/target" "${CARGO:-$(command -v cargo || echo "$HOME/.cargo/bin/cargo")}" test --release --locked -q)
echo "[test] pytest"
exec .venv/bin/pytest "$@"
