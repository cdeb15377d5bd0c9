#!/usr/bin/env bash
# Check the Vagrant VM lab from the host, after `vagrant up` in vagrant/:
#   scripts/vagrant-check.sh [FROM_VM [TO_VM]]      (default node1 node2)
# Everything runs inside the VMs through `vagrant ssh -c`:
#   1. an HTTP server and an iperf3 server in TO_VM's first demo pod;
#   2. on FROM_VM, tcpdump on the private interface (pod CIDRs only) while its
#      first demo pod curls the server and runs iperf3 against it;
#   3. the capture must hold only TCP port 15008 and TLS records: no pod
#      traffic in the clear between the VMs (no plaintext HTTP request in it);
#   4. Istio TCP metrics scraped from both tunnels (127.0.0.1:15020/metrics).
# Exits non-zero if any check fails. Nothing is left running (servers and the
# capture are bounded by `timeout`).
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

echo "== servers in $TO/$DST_POD (stop by themselves within 120 s)"
vssh "$TO" "$(rquote sudo setsid -f timeout 120 ip netns exec "$DST_POD" python3 -m http.server "$HTTP_PORT") >/dev/null 2>&1 </dev/null"
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

echo
if [ "$FAILED" -eq 0 ]; then echo "all checks passed"; else echo "some checks FAILED"; fi
exit "$FAILED"
