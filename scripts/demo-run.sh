#!/usr/bin/env bash
# The part of the demo that needs KVM (run directly, or inside the KVM lab by demo.sh):
# boots the function VM in its own network namespace, invokes helloworld, shuts it down.
# Usage: demo-run.sh REAPVM_BINARY CONFIG_DIR
set -euo pipefail
reapvm="$1"
dir="$2"
ns="reapvm-demo-$$"
cleanup() {
  [ -n "${vmm_pid:-}" ] && kill "$vmm_pid" 2>/dev/null || true
  ip netns del "$ns" 2>/dev/null || true
}
trap cleanup EXIT
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

echo "[demo] network namespace $ns with tap0 172.16.0.1/24 (the guest is 172.16.0.2)"
ip netns add "$ns"
ip netns exec "$ns" ip link set lo up
ip netns exec "$ns" ip tuntap add dev tap0 mode tap
ip netns exec "$ns" ip addr add 172.16.0.1/24 dev tap0
ip netns exec "$ns" ip link set tap0 up

echo "[demo] starting reapvm (console below)"
start=$(now_ms)
ip netns exec "$ns" "$reapvm" --no-api --boot-timer --config-file "$dir/vm.json" < /dev/null &
vmm_pid=$!
in_ns() { ip netns exec "$ns" "$@"; }
for _ in $(seq 1200); do
  if in_ns curl -s -m 2 -o /dev/null -w '%{http_code}' http://172.16.0.2:8080/ready 2>/dev/null | grep -q 200; then break; fi
  kill -0 "$vmm_pid" 2>/dev/null || { echo "[demo] reapvm exited before the guest was ready" >&2; exit 1; }
  sleep 0.25
done
ready=$(now_ms)
echo "[demo] agent ready $(( ready - start )) ms after reapvm started"
for who in reapvm REAP world; do
  t0=$(now_ms)
  answer="$(in_ns curl -s -m 30 -X POST --data-binary "$who" http://172.16.0.2:8080/invoke)"
  echo "[demo] POST /invoke '$who' -> '$answer' ($(( $(now_ms) - t0 )) ms, curl included)"
done
in_ns curl -s -m 10 -X POST http://172.16.0.2:8080/shutdown > /dev/null
rc=0
wait "$vmm_pid" || rc=$?
vmm_pid=""
echo "[demo] the guest shut down; reapvm exited with code $rc"
exit "$rc"
