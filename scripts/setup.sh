#!/usr/bin/env bash
# Idempotent node setup for meshagent: system packages, kernel headers for bcc,
# bpffs, and a .venv with the project installed and Debian's bcc importable in it.
# Safe to run again and again; each step checks before it changes anything.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MESHAGENT_VENV:-$ROOT/.venv}"
PYTHON="${MESHAGENT_PYTHON:-python3}"
export DEBIAN_FRONTEND=noninteractive

log() { printf '[setup] %s\n' "$*" >&2; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (sudo $0): bcc, tc and network namespaces need it"
command -v apt-get >/dev/null || die "apt-get not found: meshagent's setup supports Debian 12 and Ubuntu 22.04+"

APT_PACKAGES=(
  python3-bpfcc libbpfcc iproute2 iputils-ping curl iperf3 tcpdump socat
  containernetworking-plugins iptables nftables ipset wrk hey nghttp2-client
  nodejs shellcheck ca-certificates procps psmisc kmod systemd
  # Native anchors for the HBONE benchmark (issue 14): a C TLS relay and a latency tool.
  stunnel4 sockperf
  # nghttpx: an independent HTTP/2 CONNECT proxy, the remote peer in tests/interop.
  nghttp2-proxy
  # openssl: an independent TLS peer and CA tool for the identity tests.
  openssl
  # The Vagrant lab's Vagrantfile is validated in the test suite (no VM boots).
  vagrant vagrant-libvirt
  # The DNS proxy's interop tests: dnsmasq as the upstream resolver, dig as a client.
  dnsmasq-base
  bind9-dnsutils
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# nodejs may come from another source (nodesource); accept any working node binary.
if command -v node >/dev/null; then
  filtered=(); for p in "${missing[@]}"; do [ "$p" = nodejs ] || filtered+=("$p"); done
  missing=("${filtered[@]+"${filtered[@]}"}")
fi
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing apt packages: ${missing[*]}"
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  log "apt packages present"
fi

# kubectl for the Kubernetes tests (the lab API server is held to it). The image
# ships a recent one; elsewhere Debian's kubernetes-client (older: kubectl apply
# there validates against OpenAPI v2, which the lab server does not serve).
if ! command -v kubectl >/dev/null; then
  log "installing kubectl (Debian kubernetes-client)"
  apt-get update -q
  apt-get install -y -q --no-install-recommends kubernetes-client
fi

# --- kernel headers for bcc ------------------------------------------------
KREL="$(uname -r)"
MODDIR="/lib/modules/$KREL"
if [ -e "$MODDIR/build/include/linux/kconfig.h" ] || [ -e "$MODDIR/build/include/generated/autoconf.h" ]; then
  log "kernel headers present for $KREL"
else
  if apt-cache show "linux-headers-$KREL" >/dev/null 2>&1; then
    log "installing linux-headers-$KREL"
    apt-get install -y -q "linux-headers-$KREL"
  else
    # A kernel without packaged headers (custom or cloud build): use the newest
    # Debian headers for this architecture. bcc needs the uapi and helper
    # definitions from them, which are stable across versions for our programs.
    arch="$(dpkg --print-architecture)"
    dpkg-query -W -f='${Status}' "linux-headers-$arch" 2>/dev/null | grep -q "install ok installed" \
      || { apt-get update -q; apt-get install -y -q "linux-headers-$arch"; }
    hdr="$(dpkg-query -W -f='${Depends}' "linux-headers-$arch" | grep -o "linux-headers-[^ ,]*-$arch" | head -n1)"
    if [ -z "$hdr" ] || [ ! -d "/usr/src/$hdr" ]; then
      die "could not find the headers that linux-headers-$arch installs"
    fi
    common="/usr/src/${hdr%-"$arch"}-common"
    [ -d "$common" ] || die "missing $common"
    mkdir -p "$MODDIR"
    ln -sfn "/usr/src/$hdr" "$MODDIR/build"
    ln -sfn "$common" "$MODDIR/source"
    log "linked $MODDIR/build -> /usr/src/$hdr (kernel $KREL has no packaged headers)"
  fi
fi

# --- bpffs -------------------------------------------------------------------
if ! mountpoint -q /sys/fs/bpf; then
  log "mounting bpffs on /sys/fs/bpf"
  mkdir -p /sys/fs/bpf
  mount -t bpf bpf /sys/fs/bpf
fi

# --- native datapath (agent/tunnel/native, Rust) -----------------------------
# Built in the release profile with the committed Cargo.lock (--locked), and only when
# its sources changed: the stamp holds a digest over Cargo.toml, Cargo.lock and src/
# (agent/tunnel/native/driver.py computes the same digest and refuses a stale build).
NATIVE="$ROOT/agent/tunnel/native"
native_digest() {
  (cd "$NATIVE" && find src Cargo.toml Cargo.lock -type f \( -name '*.rs' -o -name Cargo.toml -o -name Cargo.lock \) \
    | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1)
}
CARGO="${CARGO:-$(command -v cargo || echo "$HOME/.cargo/bin/cargo")}"
native_stamp="$NATIVE/target/.meshagent-source-digest"
want="$(native_digest)"
if [ -x "$NATIVE/target/release/meshagent-datapath" ] && [ -f "$native_stamp" ] && [ "$(cat "$native_stamp")" = "$want" ]; then
  log "native datapath up to date"
else
  [ -x "$CARGO" ] || die "cargo not found: the native datapath needs a current Rust toolchain (rustup's stable, with cargo) to build agent/tunnel/native"
  log "building the native datapath (cargo build --release --locked; a few minutes the first time)"
  rm -f "$native_stamp"
  if ! (cd "$NATIVE" && CARGO_TARGET_DIR="$NATIVE/target" "$CARGO" build --release --locked -q); then
    die "building agent/tunnel/native failed (see cargo's errors above); there is no fallback datapath: fix the build, then run scripts/setup.sh again"
  fi
  echo "$want" > "$native_stamp"
  log "native datapath built: $NATIVE/target/release/meshagent-datapath"
fi

# --- python environment ----------------------------------------------------
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 10), sys.version' \
  || die "$PYTHON is older than 3.10"
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.meshagent-installed"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
  log "installing meshagent into $VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -e "${ROOT}[test,bench]"
  touch "$stamp"
else
  log "python environment up to date"
fi

# Debian ships bcc as a pure-Python package in its own dist-packages. Expose only
# that package to the venv: a folder holding one link, named by a .pth file, so
# the rest of Debian's dist-packages does not leak in. Never pip-install "bcc":
# that PyPI name is an unrelated project.
BCC_SRC=""
for d in /usr/lib/python3/dist-packages/bcc /usr/lib/python3*/site-packages/bcc; do
  [ -d "$d" ] && { BCC_SRC="$d"; break; }
done
[ -n "$BCC_SRC" ] || die "python3-bpfcc is installed but its bcc package was not found"
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
LINKDIR="$VENV/debian-bcc"
mkdir -p "$LINKDIR"
ln -sfn "$BCC_SRC" "$LINKDIR/bcc"
echo "$LINKDIR" > "$SITE/meshagent-debian-bcc.pth"
"$VENV/bin/python" -c 'import bcc' || die "bcc is not importable from $VENV"
log "ready: $VENV (bcc from $BCC_SRC)"

# --- h2spec (HTTP/2 conformance suite for tests/interop/test_h2spec.py) ------
# A Go module, built from the Go module proxy into a project-local bin. The module
# proxy serves no h2spec tag newer than this one (later tags lack a go.mod).
H2SPEC_VERSION="v2.2.1+incompatible"
TOOLS="$ROOT/.tools"
if [ "$(cat "$TOOLS/bin/h2spec.version" 2>/dev/null)" = "$H2SPEC_VERSION" ] && [ -x "$TOOLS/bin/h2spec" ]; then
  log "h2spec $H2SPEC_VERSION present"
else
  GO="$(command -v go || true)"
  [ -n "$GO" ] || [ ! -x /usr/local/go/bin/go ] || GO=/usr/local/go/bin/go
  if [ -z "$GO" ]; then
    log "installing golang-go (to build h2spec)"
    apt-get install -y -q --no-install-recommends golang-go
    GO="$(command -v go)"
  fi
  log "building h2spec $H2SPEC_VERSION into $TOOLS/bin"
  mkdir -p "$TOOLS/bin" "$TOOLS/go"
  GOPATH="$TOOLS/go" GOBIN="$TOOLS/bin" GOFLAGS=-modcacherw \
    "$GO" install "github.com/summerwind/h2spec/cmd/h2spec@$H2SPEC_VERSION"
  echo "$H2SPEC_VERSION" > "$TOOLS/bin/h2spec.version"
fi
