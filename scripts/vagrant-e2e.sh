#!/usr/bin/env bash
# The Vagrant lab booted for real, end to end, on a machine without a box
# download and (possibly) without usable KVM. Run by hand as root, never by CI:
#
#   scripts/vagrant-e2e.sh [--keep] [--rebuild-box]   build/up/check/teardown
#   scripts/vagrant-e2e.sh down                       tear down a --keep lab
#   scripts/vagrant-e2e.sh box [--rebuild-box]        only build and add the box
#   scripts/vagrant-e2e.sh packages                   print the box's package list
#
# Phases (each idempotent; a second run reuses what is already there):
#   1. host packages      qemu-system-x86, libvirt, mmdebstrap (apt, if missing)
#   2. box                a Debian bookworm image built offline-from-the-mirror
#                         with mmdebstrap: kernel + matching linux-headers (bcc
#                         compiles in the VM), systemd, openssh, ifupdown, the
#                         vagrant user with Vagrant's insecure public key, every
#                         apt package scripts/setup.sh installs, and the venv
#                         (/opt/meshagent/venv, the project installed editable
#                         from /vagrant) so provisioning in the VM stays short.
#                         Booted directly (no boot loader): the box's own
#                         Vagrantfile gives vagrant-libvirt its kernel, initrd
#                         and command line. Registered with `vagrant box add`.
#                         Rebuilt only when this script's build recipe, the
#                         package list or pyproject.toml changed.
#   3. daemons            virtlogd and libvirtd, started (niced) only if not
#                         running; qemu.conf set to run QEMU as root (the 9p
#                         synced folder must be writable: node1 writes the CA)
#   4. vagrant up         the project's Vagrantfile, provider libvirt, driver
#                         qemu (TCG), 1 vCPU / 1.5 GiB per VM, synced folder 9p
#   5. second provision   `vagrant provision` again must change nothing
#   6. check              scripts/vagrant-check.sh (traffic, wire, metrics,
#                         restart under load)
#   7. bad input          node2 with the agent stopped, without the CA, without
#                         its lab network: the check must stop with an error
#                         naming the fix; then the lab is repaired and checked
#   8. teardown           vagrant destroy, the daemons we started, qemu.conf
#                         restored; skipped with --keep (then run `down`)
#
# Timings of each phase are printed at the end (and recorded by hand in
# vagrant/README.md). Everything lives under $MESHAGENT_E2E_DIR
# (default /var/lib/meshagent-vagrant-e2e): the box build, VAGRANT_HOME, the
# machine state, the consoles' logs.
#
# Environment: MESHAGENT_E2E_DIR, MESHAGENT_E2E_MIRROR (default
# http://deb.debian.org/debian), MESHAGENT_E2E_UP_TIMEOUT_S (default 5400).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${MESHAGENT_E2E_DIR:-/var/lib/meshagent-vagrant-e2e}"
MIRROR="${MESHAGENT_E2E_MIRROR:-http://deb.debian.org/debian}"
UP_TIMEOUT_S="${MESHAGENT_E2E_UP_TIMEOUT_S:-5400}"
BOX_NAME="meshagent/bookworm-e2e"
BOX_DIR="$WORK/box"
STATE="$WORK/state"          # what this script started (pids, changed files)
QEMU_CONF=/etc/libvirt/qemu.conf
NICE=(nice -n 15)
export VAGRANT_HOME="$WORK/vagrant-home"
export VAGRANT_DOTFILE_PATH="$WORK/machines"
export VAGRANT_CWD="$ROOT/vagrant"
export VAGRANT_CHECKPOINT_DISABLE=1
export VAGRANT_DEFAULT_PROVIDER=libvirt
export MESHAGENT_BOX="$BOX_NAME"
export MESHAGENT_LIBVIRT_DRIVER=qemu
export MESHAGENT_SYNC_TYPE=9p
export MESHAGENT_VM_CPUS=1
export MESHAGENT_VM_MEMORY=1536
export MESHAGENT_VM_CONSOLE_DIR="$WORK/console"
# TCG is 10-50x slower than KVM: booting, bcc compiling the programs and the
# first Python imports all take minutes.
export MESHAGENT_BOOT_TIMEOUT_S="${MESHAGENT_BOOT_TIMEOUT_S:-1200}"
export MESHAGENT_READY_WAIT_S="${MESHAGENT_READY_WAIT_S:-900}"

KEEP=0 REBUILD=0 CMD=all
for arg in "$@"; do
  case "$arg" in
    --keep) KEEP=1 ;;
    --rebuild-box) REBUILD=1 ;;
    down) CMD=down ;;
    box) CMD=box ;;
    packages) CMD=packages ;;
    -h|--help) sed -n '2,40p' "$0"; exit 0 ;;
    *) echo "unknown argument '$arg' (see $0 --help)" >&2; exit 2 ;;
  esac
done

log() { printf '[vagrant-e2e %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { printf '[vagrant-e2e] error: %s\n' "$*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "run as root (it builds an image, runs libvirtd and VMs)"
mkdir -p "$WORK" "$STATE" "$MESHAGENT_VM_CONSOLE_DIR"
chmod 0755 "$WORK"

declare -a PHASES=()
phase() {  # phase NAME FUNCTION: run it and record how long it took
  local name="$1" t0=$SECONDS
  log "== $name"
  "$2"
  PHASES+=("$(printf '%-22s %5ds' "$name" $((SECONDS - t0)))")
}

# --- 1. host packages -----------------------------------------------------------
host_packages() {
  local want=(qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-daemon-driver-qemu
              libvirt-clients mmdebstrap dnsmasq-base e2fsprogs vagrant vagrant-libvirt) missing=() p
  for p in "${want[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
}

# --- 2. the box -----------------------------------------------------------------
setup_apt_packages() {  # the APT_PACKAGES array of scripts/setup.sh, one per line
  # shellcheck disable=SC1090  # the array definition only, read from setup.sh
  ( source <(sed -n '/^APT_PACKAGES=(/,/^)/p' "$ROOT/scripts/setup.sh")
    [ "${#APT_PACKAGES[@]}" -gt 0 ] || exit 1
    printf '%s\n' "${APT_PACKAGES[@]}" ) || die "could not read APT_PACKAGES from scripts/setup.sh"
}
box_packages() {
  # The system: kernel + its headers (bcc), init, ssh, networking as Vagrant's
  # Debian guest support configures it (ifupdown), 9p for the synced folder.
  printf '%s\n' linux-image-amd64 linux-headers-amd64 initramfs-tools systemd-sysv udev dbus \
    openssh-server sudo ifupdown isc-dhcp-client iproute2 python3 python3-venv \
    kubernetes-client less
  setup_apt_packages
}
box_digest() {  # what the box is built from: this recipe, the packages, the Python deps
  { sed -n '/^# --- 2. the box/,/^# --- 3./p' "$0"; box_packages; cat "$ROOT/pyproject.toml"; } \
    | sha256sum | cut -d' ' -f1
}
BOX_CMDLINE="root=/dev/vda rw console=ttyS0,115200 net.ifnames=0 biosdevname=0 mitigations=off"

in_chroot_env_up() {  # what pip in the chroot needs: /proc, /dev, DNS, the host's CA bundle
  mount -t proc proc "$1/proc"
  mount --bind /dev "$1/dev"
  cp --remove-destination /etc/resolv.conf "$1/etc/resolv.conf"
  cp /etc/ssl/certs/ca-certificates.crt "$1/tmp/host-ca.crt"
}
in_chroot_env_down() {
  umount "$1/dev" "$1/proc" 2>/dev/null || true
  rm -f "$1/tmp/host-ca.crt"
  : > "$1/etc/resolv.conf"   # the VM gets its own from DHCP
}
box_customize() {  # box_customize ROOTFS: on the host, after mmdebstrap installed the packages
  local fs="$1" key
  key="$(find /usr/share/rubygems-integration/all/gems -path "*/vagrant-*/keys/vagrant.pub" 2>/dev/null | head -n1)"
  [ -f "$key" ] || die "Vagrant's insecure public key (keys/vagrant.pub of the vagrant package) not found"
  echo "meshagent-box" > "$fs/etc/hostname"
  printf '/dev/vda / ext4 defaults,errors=remount-ro 0 1\n' > "$fs/etc/fstab"
  # eth0: Vagrant's management network (DHCP); Vagrant adds eth1 (private network) itself.
  printf 'source /etc/network/interfaces.d/*\nauto lo\niface lo inet loopback\n\nallow-hotplug eth0\niface eth0 inet dhcp\n' \
    > "$fs/etc/network/interfaces"
  : > "$fs/etc/machine-id"   # each VM generates its own at first boot
  rm -f "$fs/var/lib/dbus/machine-id"
  # Each VM gets its own SSH host keys at first boot.
  rm -f "$fs"/etc/ssh/ssh_host_*
  cat > "$fs/etc/systemd/system/ssh-hostkeys.service" <<'EOF'
[Unit]
Description=Generate SSH host keys (meshagent e2e box)
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
EOF
  chroot "$fs" systemctl enable ssh-hostkeys.service ssh.service >/dev/null
  printf 'UseDNS no\n' > "$fs/etc/ssh/sshd_config.d/vagrant.conf"
  chroot "$fs" id vagrant >/dev/null 2>&1 || chroot "$fs" useradd -m -s /bin/bash -U vagrant
  echo 'vagrant:vagrant' | chroot "$fs" chpasswd
  printf 'vagrant ALL=(ALL) NOPASSWD: ALL\nDefaults:vagrant !requiretty\n' > "$fs/etc/sudoers.d/vagrant"
  chmod 0440 "$fs/etc/sudoers.d/vagrant"
  install -d -m 0700 -o 1000 -g 1000 "$fs/home/vagrant/.ssh"
  install -m 0600 -o 1000 -g 1000 "$key" "$fs/home/vagrant/.ssh/authorized_keys"
  [ "$(chroot "$fs" id -u vagrant)" = 1000 ] || die "the vagrant user is not uid 1000 in the box"
  mkdir -p "$fs/vagrant"
  in_chroot_env_up "$fs"
  # The venv, as scripts/setup.sh would make it in the VM (same path the
  # Vagrantfile gives it), with the project installed editable from /vagrant.
  mount --bind "$ROOT" "$fs/vagrant"
  # pip in the chroot trusts what the host trusts (an egress proxy's CA, say);
  # the bundle is removed again, the box keeps Debian's.
  local rc=0 ca=/tmp/host-ca.crt
  env PIP_CERT="$ca" REQUESTS_CA_BUNDLE="$ca" SSL_CERT_FILE="$ca" PIP_FIND_LINKS= \
    chroot "$fs" sh -ec '
    python3 -m venv /opt/meshagent/venv
    /opt/meshagent/venv/bin/pip install -q --upgrade pip
    /opt/meshagent/venv/bin/pip install -q -e "/vagrant[test,bench]"
    touch /opt/meshagent/venv/.meshagent-installed' || rc=$?
  umount "$fs/vagrant"
  in_chroot_env_down "$fs"
  [ "$rc" -eq 0 ] || die "installing the venv in the box failed (pip needs the package index)"
  local kver
  kver="$(ls "$fs/lib/modules")"
  [ "$(wc -w <<<"$kver")" -eq 1 ] || die "expected one kernel in the box, found: $kver"
  [ -e "$fs/lib/modules/$kver/build/include/generated/autoconf.h" ] \
    || die "no linux-headers for the box kernel $kver (linux-image-amd64 and linux-headers-amd64 disagree on the mirror?)"
  cp "$fs/boot/vmlinuz-$kver" "$BOX_DIR/build/vmlinuz"
  cp "$fs/boot/initrd.img-$kver" "$BOX_DIR/build/initrd.img"
  echo "$kver" > "$BOX_DIR/build/kernel-version"
}

build_box() {
  local digest
  digest="$(box_digest)"
  if [ "$REBUILD" = 0 ] && [ "$(cat "$BOX_DIR/digest" 2>/dev/null)" = "$digest" ] \
     && vagrant box list 2>/dev/null | grep -q "^$BOX_NAME "; then
    log "box $BOX_NAME is up to date ($(cat "$BOX_DIR/build/kernel-version"))"
    return
  fi
  local fs="$BOX_DIR/rootfs" packages
  packages="$(box_packages | sort -u | paste -sd, -)"
  # The package install (the slow part) is kept apart, so a failure in the
  # steps after it does not download everything again.
  if [ "$(cat "$BOX_DIR/rootfs.digest" 2>/dev/null)" != "$digest" ] || [ ! -d "$fs/usr" ]; then
    rm -rf "$BOX_DIR"
    mkdir -p "$BOX_DIR"
    log "mmdebstrap bookworm from $MIRROR ($(tr ',' '\n' <<<"$packages" | wc -l) packages; takes a while)"
    "${NICE[@]}" mmdebstrap --mode=root --variant=important --include="$packages" \
      --components=main --aptopt='Acquire::Retries "3"' \
      bookworm "$fs" "deb $MIRROR bookworm main" "deb $MIRROR bookworm-updates main" \
      "deb ${MIRROR%/debian}/debian-security bookworm-security main"
    echo "$digest" > "$BOX_DIR/rootfs.digest"
  else
    log "reusing the installed root file system in $fs"
  fi
  rm -rf "$BOX_DIR/build"
  mkdir -p "$BOX_DIR/build"
  box_customize "$fs"
  log "ext4 image and qcow2"
  local size_g=12
  truncate -s "${size_g}G" "$BOX_DIR/build/root.raw"
  "${NICE[@]}" mkfs.ext4 -q -F -L root -d "$fs" "$BOX_DIR/build/root.raw"
  "${NICE[@]}" qemu-img convert -O qcow2 "$BOX_DIR/build/root.raw" "$BOX_DIR/build/box.img"
  rm -rf "$BOX_DIR/build/root.raw" "$fs"
  printf '{"provider": "libvirt", "format": "qcow2", "virtual_size": %d}\n' "$size_g" \
    > "$BOX_DIR/build/metadata.json"
  # The box's own Vagrantfile (Vagrant merges it under the project's): direct
  # kernel boot from the files shipped next to it in the box.
  cat > "$BOX_DIR/build/Vagrantfile" <<EOF
# Box built by meshagent scripts/vagrant-e2e.sh: direct kernel boot, no boot loader.
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |lv|
    lv.kernel = File.join(__dir__, "vmlinuz")
    lv.initrd = File.join(__dir__, "initrd.img")
    lv.cmd_line = "$BOX_CMDLINE"
  end
end
EOF
  (cd "$BOX_DIR/build" && tar -cf "$BOX_DIR/meshagent-bookworm.box" metadata.json Vagrantfile box.img vmlinuz initrd.img)
  vagrant box remove -f --all "$BOX_NAME" >/dev/null 2>&1 || true
  # vagrant-libvirt caches the box image in the storage pool under a name
  # without a digest: drop a stale one so the new box is uploaded.
  if libvirt_running; then
    virsh -q vol-list default 2>/dev/null | awk '/meshagent-VAGRANTSLASH-bookworm-e2e/ {print $1}' \
      | while read -r vol; do virsh -q vol-delete --pool default "$vol" >/dev/null; done
  fi
  vagrant box add --name "$BOX_NAME" "$BOX_DIR/meshagent-bookworm.box"
  rm -f "$BOX_DIR/meshagent-bookworm.box" "$BOX_DIR/build/box.img"
  echo "$digest" > "$BOX_DIR/digest"
  log "box $BOX_NAME added ($(cat "$BOX_DIR/build/kernel-version"))"
}

# --- 3. daemons -----------------------------------------------------------------
libvirt_running() { virsh -c qemu:///system -q version >/dev/null 2>&1; }
ours_running() { [ -f "$STATE/$1.pid" ] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }
start_daemons() {
  if ours_running libvirtd && libvirt_running; then
    log "libvirtd started by an earlier run is up (pid $(cat "$STATE/libvirtd.pid"))"
    return
  fi
  if libvirt_running; then
    log "libvirtd already running (not started here, left alone at teardown)"
    grep -Eq '^user *= *"root"' "$QEMU_CONF" \
      || die "the running libvirtd runs QEMU as libvirt-qemu, which cannot write the 9p synced folder: set user = \"root\" and group = \"root\" in $QEMU_CONF and restart libvirtd, or stop it and let this script start its own"
    return
  fi
  if ! grep -Eq '^user *= *"root"' "$QEMU_CONF"; then
    cp -p "$QEMU_CONF" "$STATE/qemu.conf.orig"
    printf '\n# meshagent scripts/vagrant-e2e.sh (restored at teardown)\nuser = "root"\ngroup = "root"\n' >> "$QEMU_CONF"
    log "qemu.conf: QEMU runs as root while the lab is up (original saved in $STATE)"
  fi
  if ! [ -S /run/libvirt/virtlogd-sock ] || ! pgrep -x virtlogd >/dev/null; then
    "${NICE[@]}" virtlogd -d -p "$STATE/virtlogd.pid"
    log "started virtlogd (pid $(cat "$STATE/virtlogd.pid"))"
  fi
  # libvirtd adds LIBVIRT_* iptables chains at start and leaves them; remove
  # them at teardown only if they were not there before.
  if ! iptables -S LIBVIRT_INP >/dev/null 2>&1; then touch "$STATE/libvirt-chains-ours"; fi
  "${NICE[@]}" libvirtd -d -p "$STATE/libvirtd.pid"
  for _ in $(seq 60); do libvirt_running && break; sleep 1; done
  libvirt_running || die "libvirtd did not answer within 60s (see journal or /var/log/libvirt)"
  log "started libvirtd (pid $(cat "$STATE/libvirtd.pid"))"
}
remove_libvirt_chains() {  # the empty LIBVIRT_* chains and the jumps to them
  local ipt table parent chain
  for ipt in iptables ip6tables; do
    for table in filter nat mangle; do
      for parent in INPUT OUTPUT FORWARD POSTROUTING; do
        for chain in LIBVIRT_INP LIBVIRT_OUT LIBVIRT_FWX LIBVIRT_FWI LIBVIRT_FWO LIBVIRT_PRT; do
          # Only empty chains: a rule in one means someone else uses it.
          [ "$("$ipt" -t "$table" -S "$chain" 2>/dev/null | wc -l)" = 1 ] || continue
          while "$ipt" -t "$table" -D "$parent" -j "$chain" 2>/dev/null; do :; done
        done
      done
      for chain in LIBVIRT_INP LIBVIRT_OUT LIBVIRT_FWX LIBVIRT_FWI LIBVIRT_FWO LIBVIRT_PRT; do
        [ "$("$ipt" -t "$table" -S "$chain" 2>/dev/null | wc -l)" = 1 ] && "$ipt" -t "$table" -X "$chain" 2>/dev/null
      done
    done
  done
  log "removed libvirtd's empty LIBVIRT_* iptables chains"
}
stop_daemons() {
  local d pid
  for d in libvirtd virtlogd; do
    [ -f "$STATE/$d.pid" ] || continue
    pid="$(cat "$STATE/$d.pid")"
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid"
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      log "stopped $d (pid $pid)"
    fi
    rm -f "$STATE/$d.pid"
  done
  if [ -f "$STATE/libvirt-chains-ours" ] && ! pgrep -x libvirtd >/dev/null; then
    remove_libvirt_chains
    rm -f "$STATE/libvirt-chains-ours"
  fi
  if [ -f "$STATE/qemu.conf.orig" ]; then
    cp -p "$STATE/qemu.conf.orig" "$QEMU_CONF"
    rm -f "$STATE/qemu.conf.orig"
    log "restored $QEMU_CONF"
  fi
}

# --- 4./5. the VMs ------------------------------------------------------------
renice_vms() {  # QEMU under nice even when libvirtd was not started by us
  local f
  for f in /run/libvirt/qemu/*.pid; do
    if [ -f "$f" ]; then renice -n 15 -p "$(cat "$f")" >/dev/null 2>&1 || true; fi
  done
}
vagrant_up() {
  ( while sleep 20; do renice_vms; done ) &
  local renicer=$! rc=0
  # VMs left running by an earlier (failed or --keep) run are provisioned again
  # (idempotent), not only the ones created now. Not `up --provision`:
  # vagrant-libvirt 0.11 then provisions a running VM twice.
  local running
  running="$(vagrant status --machine-readable 2>/dev/null | awk -F, '$3 == "state" && $4 == "running" {print $2}' | paste -sd' ' -)"
  timeout "$UP_TIMEOUT_S" vagrant up --provider=libvirt || rc=$?
  if [ "$rc" -eq 0 ] && [ -n "$running" ]; then
    log "provisioning again what was already running: $running"
    # shellcheck disable=SC2086  # machine names, one word each
    timeout "$UP_TIMEOUT_S" vagrant provision $running || rc=$?
  fi
  kill "$renicer" 2>/dev/null; wait "$renicer" 2>/dev/null || true
  [ "$rc" -eq 0 ] || die "vagrant up failed (rc $rc); consoles: $MESHAGENT_VM_CONSOLE_DIR, then: $0 down"
  vagrant status
}
second_provision() {
  # Bad input: a second up/provision on running VMs changes nothing. The
  # node facts, config, CA and the pods' addresses must be the same after it.
  local before after vm
  snapshot() {
    for vm in node1 node2; do
      # shellcheck disable=SC2016  # expanded in the VM
      vagrant ssh "$vm" -c 'sudo sh -c "cat /etc/meshagent/node.env /etc/meshagent/config.toml /etc/meshagent/ca/ca.crt; ip -br route; for p in \$(ls /run/netns); do echo \$p; ip -n \$p -br addr; done; /opt/meshagent/venv/bin/meshagent pod list"' \
        -- -q -o LogLevel=ERROR | tr -d '\r'
    done
  }
  before="$(snapshot)"
  timeout "$UP_TIMEOUT_S" vagrant provision >/dev/null || die "a second 'vagrant provision' failed"
  after="$(snapshot)"
  if [ "$before" != "$after" ]; then
    diff <(echo "$before") <(echo "$after") >&2 || true
    die "a second provision changed the nodes (diff above)"
  fi
  log "a second 'vagrant provision' changed nothing"
}
run_check() { "$ROOT/scripts/vagrant-check.sh"; }
in_vm() { vagrant ssh "$1" -c "$2" -- -q -o LogLevel=ERROR; }
expect_check_error() {  # expect_check_error WHAT PATTERN: the check refuses with a message naming the fix
  local out rc=0
  out="$("$ROOT/scripts/vagrant-check.sh" 2>&1)" || rc=$?
  if [ "$rc" -ne 3 ] || ! grep -q -- "$2" <<<"$out"; then
    printf '%s\n' "$out" >&2
    die "$1: expected vagrant-check.sh to stop in preflight (exit 3) with '$2', got exit $rc"
  fi
  log "$1: $(grep -m1 -- "$2" <<<"$out" | sed 's/^ *FAIL *//')"
}
bad_input() {
  # The agent stopped on node2.
  in_vm node2 "sudo systemctl stop meshagent.service"
  expect_check_error "agent stopped" "meshagent.service is inactive.*systemctl start meshagent"
  in_vm node2 "sudo systemctl start meshagent.service"
  # No CA on node2 (the key moved aside, then back).
  in_vm node2 "sudo mv /etc/meshagent/ca/ca.key /root/ca.key.e2e"
  expect_check_error "no CA" "no mesh CA in /etc/meshagent/ca: run 'vagrant provision node2'"
  in_vm node2 "sudo mv /root/ca.key.e2e /etc/meshagent/ca/ca.key"
  # No lab network on node2: its private interface down, then up again with
  # the routes to the other pods (a link going down drops them).
  # shellcheck disable=SC2016  # expanded in the VM
  in_vm node2 'sudo sh -c ". /etc/meshagent/node.env; ip link set \$PRIVATE_IF down"'
  expect_check_error "no network" "node2: the private interface .* is down"
  # shellcheck disable=SC2016  # expanded in the VM
  in_vm node2 'sudo sh -c ". /etc/meshagent/node.env; ip link set \$PRIVATE_IF up; ip route replace 10.244.1.0/24 via 192.168.56.11 dev \$PRIVATE_IF"'
  "$ROOT/scripts/vagrant-check.sh" >/dev/null || die "the lab did not recover after the bad-input checks"
  log "the lab is whole again after the bad-input checks"
}

teardown() {
  if [ -d "$VAGRANT_DOTFILE_PATH" ] && libvirt_running; then
    timeout 600 vagrant destroy -f || log "vagrant destroy failed: check 'virsh list --all' and 'virsh net-list --all'"
  fi
  rm -rf "$ROOT/.vagrant-ca"
  stop_daemons
}

case "$CMD" in
  packages) box_packages | sort -u; exit 0 ;;
  down) phase teardown teardown; exit 0 ;;
  box) phase "host packages" host_packages; phase box build_box; exit 0 ;;
esac

on_exit() {
  local rc=$?
  if [ "$KEEP" = 0 ]; then phase teardown teardown || true
  else log "--keep: VMs and daemons left up; '$0 down' removes them"; fi
  log "phases:"; printf '  %s\n' "${PHASES[@]}" >&2
  exit "$rc"
}
phase "host packages" host_packages
trap on_exit EXIT
phase "daemons" start_daemons
phase "box" build_box
phase "vagrant up" vagrant_up
phase "second provision" second_provision
phase "check" run_check
phase "bad input" bad_input
log "all phases passed"
