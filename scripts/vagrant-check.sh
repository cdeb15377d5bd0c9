#!/usr/bin/env bash
# Check the Vagrant VM lab from the host, after `vagrant up` in vagrant/:
#   scripts/vagrant-check.sh [FROM_VM [TO_VM]]      (default node1 node2)
# Everything runs inside the VMs through `vagrant ssh -c`:
#   1. an HTTP server and an iperf3 server in TO_VM's first demo pod;
#   2. on FROM_VM, tcpdump on the private interface (pod CIDRs only) while its
#      first demo pod curls the server and runs iperf3 against it;
#   3. the capture must hold only TCP port 15008 and TLS records: no pod
#      traffic in the clear between the VMs (no plaintext HTTP request in it);
#   4. Istio TCP metrics scraped from both tunnels (127.0.0.1:15020/metrics);
#   5. `systemctl restart` of meshagent.service, then meshagent-tunnel.service,
#      on each VM while FROM's pod sends requests to TO's pod: none may fail.
# Before any of it, each VM must be reachable, have its private address and
# reach the other VM over it, hold the mesh CA, and run both units; otherwise
# it stops with an error naming what to do (exit 3).
# Exits non-zero if any check fails. Nothing is left running (servers, load and
# the capture are bounded by `timeout`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export VAGRANT_CWD="$ROOT/vagrant"
FROM="${1:-node1}"
TO="${2:-node2}"
HTTP_PORT=8080
FAILED=0

command -v vagrant >/dev/null || { echo "vagrant not found (run this on the host)" >&2; exit 2; }
vssh() {  # vssh VM COMMAND: run COMMAND (a string) in VM, quietly
  vagrant ssh "$1" -c "$2" -- -q -o LogLevel=ERROR
}
rquote() {  # a command line that is safe to pass through `vagrant ssh -c`
  local out="" arg
  for arg in "$@"; do out+="$(printf '%q' "$arg") "; done
  printf '%s' "$out"
}
ok() { printf '  ok    %s\n' "$*"; }
bad() { printf '  FAIL  %s\n' "$*"; FAILED=1; }
expect() {  # expect PASS_MESSAGE FAIL_MESSAGE COMMAND...
  local pass="$1" fail="$2"; shift 2
  if "$@"; then ok "$pass"; else bad "$fail"; fi
}
# shellcheck disable=SC2317  # called indirectly, through expect
has() { grep -q -- "$1" <<<"$2"; }  # has PATTERN TEXT
node_fact() {  # node_fact VM KEY: a value from /etc/meshagent/node.env (written by provision.sh)
  vssh "$1" "sudo sh -c '. /etc/meshagent/node.env; echo \$$2'" | tr -d '\r'
}
pod_ip() {  # pod_ip VM POD
  vssh "$1" "$(rquote sudo ip -n "$2" -4 -o addr show eth0)" | awk '{ split($4, a, "/"); print a[1] }'
}

preflight_fail() { printf '  FAIL  %s\n' "$*"; PREFLIGHT_FAILED=1; }
PREFLIGHT_FAILED=0
echo "== preflight"
for vm in "$FROM" "$TO"; do
  if ! vssh "$vm" true >/dev/null 2>&1; then
    preflight_fail "$vm: not reachable with 'vagrant ssh': start it with 'vagrant up $vm' in vagrant/ (state: 'vagrant status')"
    continue
  fi
  if ! vssh "$vm" "test -r /etc/meshagent/node.env" >/dev/null 2>&1; then
    preflight_fail "$vm: no /etc/meshagent/node.env: provisioning did not finish; run 'vagrant provision $vm'"
    continue
  fi
  # One round trip for the rest: facts, CA, units, the private interface.
  # shellcheck disable=SC2016  # expanded by the remote shell
  facts="$(vssh "$vm" 'sudo sh -c ". /etc/meshagent/node.env
    echo ip=\$NODE_IP if=\$PRIVATE_IF
    if ip -o -4 addr show dev \"\$PRIVATE_IF\" up 2>/dev/null | grep -q \" \$NODE_IP/\"; then echo addr=yes; else echo addr=no; fi
    if [ -s /etc/meshagent/ca/ca.crt ] && [ -s /etc/meshagent/ca/ca.key ]; then echo ca=yes; else echo ca=no; fi
    for u in meshagent meshagent-tunnel; do echo unit_\$u=\$(systemctl is-active \$u.service); done"' 2>/dev/null | tr -d '\r')"
  fact() { sed -n "s/.*\b$1=\([^ ]*\).*/\1/p" <<<"$facts" | head -n1; }
  vm_if="$(fact if)"
  if [ "$(fact addr)" != yes ]; then
    preflight_fail "$vm: the private interface ${vm_if:-?} is down or lacks $(fact ip): the VM has no lab network; run 'vagrant reload $vm --provision' (and check 'virsh net-list' on the host)"
  fi
  if [ "$(fact ca)" != yes ]; then
    preflight_fail "$vm: no mesh CA in /etc/meshagent/ca: run 'vagrant provision $vm' (node1 creates it in /vagrant/.vagrant-ca, the others copy it; if that is gone too, provision node1 first)"
  fi
  for u in meshagent meshagent-tunnel; do
    state="$(fact "unit_$u")"
    if [ "$state" != active ]; then
      preflight_fail "$vm: $u.service is ${state:-unknown}, not active: start it with 'vagrant ssh $vm -c \"sudo systemctl start $u\"' (why it stopped: 'journalctl -u $u')"
    fi
  done
done
if [ "$PREFLIGHT_FAILED" = 0 ]; then
  to_ip="$(node_fact "$TO" NODE_IP)" from_ip="$(node_fact "$FROM" NODE_IP)"
  if ! vssh "$FROM" "$(rquote ping -c 2 -W 3 "$to_ip")" >/dev/null 2>&1; then
    preflight_fail "$FROM cannot reach $TO at $to_ip on the lab network: check both VMs' private interfaces ('ip -br addr' in each) and 'virsh net-list' on the host; 'vagrant reload $FROM $TO --provision' rebuilds them"
  elif ! vssh "$TO" "$(rquote ping -c 2 -W 3 "$from_ip")" >/dev/null 2>&1; then
    preflight_fail "$TO cannot reach $FROM at $from_ip on the lab network: 'vagrant reload $TO --provision'"
  else
    ok "both VMs up, provisioned, holding the CA, running both units, and reaching each other"
  fi
fi
if [ "$PREFLIGHT_FAILED" != 0 ]; then
  echo "preflight FAILED: fix the above, then run $0 again" >&2
  exit 3
fi

echo "== lab facts"
SRC_POD="$(node_fact "$FROM" PODS | awk '{print $1}')"
DST_POD="$(node_fact "$TO" PODS | awk '{print $1}')"
PRIVATE_IF="$(node_fact "$FROM" PRIVATE_IF)"
if [ -z "$SRC_POD" ] || [ -z "$DST_POD" ] || [ -z "$PRIVATE_IF" ]; then
  echo "could not read /etc/meshagent/node.env in the VMs: did provisioning finish?" >&2
  exit 1
fi
DST_IP="$(pod_ip "$TO" "$DST_POD")"
echo "  $FROM/$SRC_POD -> $TO/$DST_POD ($DST_IP); capture on $FROM:$PRIVATE_IF"

echo "== servers in $TO/$DST_POD (stopped at the end, or by themselves within 900 s)"
HTTP_PID=/run/meshagent-check-http.pid
# shellcheck disable=SC2016  # $$ is the remote shell's
vssh "$TO" "$(rquote sudo setsid -f sh -c 'echo $$ > "$1"; exec timeout 900 ip netns exec "$2" python3 -m http.server "$3"' http "$HTTP_PID" "$DST_POD" "$HTTP_PORT") >/dev/null 2>&1 </dev/null"
# shellcheck disable=SC2317  # called by the EXIT trap
stop_http() { vssh "$TO" "sudo sh -c 'kill \$(cat $HTTP_PID) 2>/dev/null; rm -f $HTTP_PID'" >/dev/null 2>&1 || true; }
trap stop_http EXIT
vssh "$TO" "$(rquote sudo setsid -f timeout 120 ip netns exec "$DST_POD" iperf3 -s -1) >/dev/null 2>&1 </dev/null"
vssh "$TO" "$(rquote sudo ip netns exec "$DST_POD" sh -c "for i in \$(seq 100); do ss -ltn | grep -q ':$HTTP_PORT ' && ss -ltn | grep -q ':5201 ' && exit 0; sleep 0.1; done; exit 1")" \
  || { echo "servers did not come up in $TO/$DST_POD" >&2; exit 1; }

# Runs on FROM as root: capture, traffic, then a verdict on the capture.
# Arguments: private interface, source pod, destination IP, HTTP port.
# shellcheck disable=SC2016  # expanded by the remote shell, not here
REMOTE_CHECK='
set -u
ifc="$1" pod="$2" dst="$3" port="$4"
pcap="$(mktemp /tmp/meshagent-check.XXXXXX)"
trap "rm -f \"$pcap\"" EXIT
timeout 90 tcpdump -i "$ifc" -nn -s 200 -U -w "$pcap" "net 10.244.0.0/16" 2>/dev/null &
cap=$!
sleep 2
echo "curl:   $(ip netns exec "$pod" curl -s -m 10 -o /dev/null -w "HTTP %{http_code}" "http://$dst:$port/")"
ip netns exec "$pod" iperf3 -c "$dst" -t 3 -f m | grep -E "sender|receiver" | sed "s/^/iperf3: /"
sleep 1
kill -INT "$cap" 2>/dev/null; wait "$cap" 2>/dev/null
count() { tcpdump -r "$pcap" -nn "$@" 2>/dev/null | wc -l; }
echo "total=$(count)"
echo "not15008=$(count "not tcp port 15008")"
echo "tls=$(count "tcp port 15008 and tcp[((tcp[12] & 0xf0) >> 2)] = 0x16")"
echo "plaintext=$(tcpdump -r "$pcap" -nn -A 2>/dev/null | grep -c "GET / HTTP")"
'
echo "== traffic from $FROM/$SRC_POD, captured on $FROM:$PRIVATE_IF"
out="$(vssh "$FROM" "$(rquote sudo bash -c "$REMOTE_CHECK" check "$PRIVATE_IF" "$SRC_POD" "$DST_IP" "$HTTP_PORT")" | tr -d '\r')"
grep -E '^(curl|iperf3):' <<<"$out" | sed 's/^/  /'
val() { sed -n "s/^$1=//p" <<<"$out"; }
expect "curl across VMs: HTTP 200" "curl across VMs did not get HTTP 200" has '^curl: *HTTP 200' "$out"
expect "iperf3 across VMs" "iperf3 across VMs failed" has 'receiver' "$out"
total="$(val total)" not15008="$(val not15008)" tls="$(val tls)" plaintext="$(val plaintext)"
echo "  capture: ${total:-?} packets between pod CIDRs, ${not15008:-?} not on port 15008, ${tls:-?} TLS handshake records, ${plaintext:-?} plaintext HTTP requests"
expect "pod traffic crossed $PRIVATE_IF" "nothing captured on $PRIVATE_IF" [ "${total:-0}" -gt 0 ]
expect "only port 15008 between the VMs' pods" "pod traffic outside port 15008" [ "${not15008:-1}" -eq 0 ]
expect "TLS handshakes on 15008" "no TLS handshake seen on 15008" [ "${tls:-0}" -gt 0 ]
expect "no plaintext HTTP on the wire" "plaintext HTTP seen on the wire" [ "${plaintext:-1}" -eq 0 ]

echo "== tunnel metrics (Istio TCP metrics, 127.0.0.1:15020 in each VM)"
for vm in "$FROM" "$TO"; do
  metrics="$(vssh "$vm" "curl -s -m 5 http://127.0.0.1:15020/metrics" | tr -d '\r' \
    | grep -E '^istio_tcp_(connections_opened_total|sent_bytes_total|received_bytes_total)\{' || true)"
  if [ -n "$metrics" ]; then
    ok "$vm: $(wc -l <<<"$metrics") istio_tcp series"
    head -n 8 <<<"$metrics" | sed "s/^/        /"
    expect "$vm: connections reported as mutual_tls" "$vm: no mutual_tls series" \
      has 'connection_security_policy="mutual_tls"' "$metrics"
  else
    bad "$vm: no istio_tcp metrics from the tunnel"
  fi
done

echo "== systemctl restart of each unit under load ($FROM/$SRC_POD -> $TO/$DST_POD)"
# A bounded loop of requests in FROM's pod; each may wait up to 60 s to connect
# (a SYN the tunnel's capture drops while no tunnel listens is retransmitted),
# none may fail. It writes one line per request: "<http code> <exit status>".
LOAD_LOG=/tmp/meshagent-check-load.log
vssh "$FROM" "$(rquote sudo setsid -f timeout 900 ip netns exec "$SRC_POD" sh -c \
  "rm -f $LOAD_LOG.stop; i=0; while [ ! -e $LOAD_LOG.stop ] && [ \$i -lt 2000 ]; do i=\$((i+1)); c=\$(curl -s -o /dev/null -m 90 --connect-timeout 60 -w '%{http_code}' http://$DST_IP:$HTTP_PORT/); echo \"\$c \$?\"; sleep 0.2; done" \
  ) >$LOAD_LOG 2>&1 </dev/null"
load_count() { vssh "$FROM" "wc -l < $LOAD_LOG" | tr -d '\r '; }
wait_more() {  # wait_more N: until N more requests completed (at most 300 s)
  local start target
  start="$(load_count)"; target=$((start + $1))
  for _ in $(seq 150); do [ "$(load_count)" -ge "$target" ] && return 0; sleep 2; done
  return 1
}
wait_more 5 || bad "the load did not get going (see $LOAD_LOG on $FROM)"
for vm in "$FROM" "$TO"; do
  for u in meshagent meshagent-tunnel; do
    if vssh "$vm" "sudo timeout 300 systemctl restart $u.service" >/dev/null 2>&1; then
      ok "$vm: systemctl restart $u"
    else
      bad "$vm: systemctl restart $u failed (journalctl -u $u)"
    fi
    # The tunnel listens again, then some requests go through the new process.
    for _ in $(seq 150); do
      vssh "$vm" "sudo ss -ltnH 'sport = :15008'" 2>/dev/null | grep -q LISTEN && break; sleep 2
    done
    wait_more 5 || bad "$vm: requests stopped completing after restarting $u"
  done
done
vssh "$FROM" "sudo touch $LOAD_LOG.stop" >/dev/null
sleep 3
load="$(vssh "$FROM" "sudo cat $LOAD_LOG; sudo rm -f $LOAD_LOG $LOAD_LOG.stop" | tr -d '\r')"
total_req="$(grep -c . <<<"$load" || true)"
failed_req="$(grep -vc '^200 0$' <<<"$load" || true)"
echo "  $total_req requests during the restarts, $failed_req failed"
# shellcheck disable=SC2317  # called through expect
none_failed() { [ "${failed_req:-1}" -eq 0 ] && [ "${total_req:-0}" -gt 0 ]; }
expect "no failed request while each unit restarted" \
  "$failed_req of $total_req requests failed during the restarts: $(grep -v '^200 0$' <<<"$load" | sort | uniq -c | tr '\n' ';')" \
  none_failed

echo
if [ "$FAILED" -eq 0 ]; then echo "all checks passed"; else echo "some checks FAILED"; fi
exit "$FAILED"
