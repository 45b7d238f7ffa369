#!/usr/bin/env bash
# The part of the demo that needs KVM (run directly, or inside the KVM lab by demo.sh):
# boots the function VM in its own network namespace, invokes helloworld, pauses and
# snapshots it through the API, restores it in fresh reapvm processes with the File,
# OnDemand (userfaultfd) and Reap memory backends (REAP records on its first restore and
# prefetches on its second), invokes it after each restore, shuts it down.
# Usage: demo-run.sh REAPVM_BINARY CONFIG_DIR
set -euo pipefail
reapvm="$1"
dir="$2"
ns="reapvm-demo-$$"
# Snapshot files: somewhere writable here and in the lab (whose view of the host is read-only).
snap="$(mktemp -d /tmp/reapvm-demo.XXXXXX)"
cleanup() {
  [ -n "${vmm_pid:-}" ] && kill "$vmm_pid" 2>/dev/null || true
  ip netns del "$ns" 2>/dev/null || true
  rm -rf "$snap"
}
trap cleanup EXIT
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

echo "[demo] network namespace $ns with tap0 172.16.0.1/24 (the guest is 172.16.0.2)"
ip netns add "$ns"
ip netns exec "$ns" ip link set lo up
ip netns exec "$ns" ip tuntap add dev tap0 mode tap
ip netns exec "$ns" ip addr add 172.16.0.1/24 dev tap0
ip netns exec "$ns" ip link set tap0 up

api="$snap/api.sock"
echo "[demo] starting reapvm (console below)"
start=$(now_ms)
ip netns exec "$ns" "$reapvm" --api-sock "$api" --boot-timer --config-file "$dir/vm.json" < /dev/null &
vmm_pid=$!
in_ns() { ip netns exec "$ns" "$@"; }
wait_ready() {
  for _ in $(seq 1200); do
    if in_ns curl -s -m 2 -o /dev/null -w '%{http_code}' http://172.16.0.2:8080/ready 2>/dev/null | grep -q 200; then return 0; fi
    kill -0 "$vmm_pid" 2>/dev/null || { echo "[demo] reapvm exited before the guest was ready" >&2; exit 1; }
    sleep 0.25
  done
  echo "[demo] the guest never became ready" >&2; exit 1
}
# Firecracker's API over the Unix socket; fails the demo on anything but 204.
api_call() { # METHOD PATH BODY
  local code
  code="$(curl -s -o "$snap/answer" -w '%{http_code}' --unix-socket "$api" -X "$1" -H 'Content-Type: application/json' -d "$3" "http://localhost$2")"
  [ "$code" = 204 ] || { echo "[demo] $1 $2 answered $code: $(cat "$snap/answer")" >&2; exit 1; }
}
# Until reapvm's API socket takes connections (its file appears a moment before it listens).
wait_api() {
  for _ in $(seq 100); do
    curl -s -o /dev/null --unix-socket "$api" http://localhost/ 2>/dev/null && return 0
    sleep 0.1
  done
  echo "[demo] reapvm's API socket $api takes no connections" >&2; exit 1
}
# The agent signals each answered invocation through the console just after the answer:
# wait until reapvm has seen them all, so that none is left in the snapshot to come out
# after a restore and end its REAP recording at once.
wait_signals() { # COUNT
  local seen=0
  api_call PUT /metrics "{\"metrics_path\": \"$snap/boot-metrics.json\"}"
  for _ in $(seq 300); do
    api_call PUT /actions '{"action_type": "FlushMetrics"}'
    seen="$(tail -n 1 "$snap/boot-metrics.json" | sed -n 's/.*"invocations_signalled":\([0-9]*\).*/\1/p')"
    [ "${seen:-0}" -ge "$1" ] && return 0
    sleep 0.1
  done
  echo "[demo] reapvm saw ${seen:-0} of $1 invocation signals from the agent" >&2; exit 1
}
invoke() { # LABEL BODY
  local t0 answer
  t0=$(now_ms)
  answer="$(in_ns curl -s -m 60 -X POST --data-binary "$2" http://172.16.0.2:8080/invoke)"
  echo "[demo] $1: POST /invoke '$2' -> '$answer' ($(( $(now_ms) - t0 )) ms, curl included)"
}
wait_ready
ready=$(now_ms)
echo "[demo] agent ready $(( ready - start )) ms after reapvm started"
for who in reapvm REAP world; do invoke "booted VM" "$who"; done
wait_signals 3

t0=$(now_ms)
api_call PATCH /vm '{"state": "Paused"}'
api_call PUT /snapshot/create "{\"snapshot_type\": \"Full\", \"snapshot_path\": \"$snap/vmstate\", \"mem_file_path\": \"$snap/memory\"}"
echo "[demo] paused and snapshotted in $(( $(now_ms) - t0 )) ms: $(du -h --apparent-size "$snap/memory" | cut -f1) memory file, $(stat -c %s "$snap/vmstate") bytes of vmstate"
kill "$vmm_pid"; wait "$vmm_pid" 2>/dev/null || true

# File and OnDemand: the baselines. Reap twice: the first restore records the working set of
# the first invocation, the second installs it before the guest runs.
runs=(File OnDemand Reap Reap)
for i in "${!runs[@]}"; do
  backend="${runs[$i]}"
  rm -f "$api"
  metrics="$snap/metrics-$i.json"
  ip netns exec "$ns" "$reapvm" --api-sock "$api" --metrics-path "$metrics" < /dev/null > /dev/null &
  vmm_pid=$!
  wait_api
  t0=$(now_ms)
  api_call PUT /snapshot/load "{\"snapshot_path\": \"$snap/vmstate\", \"mem_backend\": {\"backend_type\": \"$backend\", \"backend_path\": \"$snap/memory\"}, \"resume_vm\": true}"
  echo "[demo] $backend restore: a fresh reapvm loaded and resumed the snapshot in $(( $(now_ms) - t0 )) ms"
  invoke "$backend restore, first" "cold start"
  invoke "$backend restore, second" "warm"
  api_call PUT /actions '{"action_type": "FlushMetrics"}'
  echo "[demo] $backend restore metrics: $(tail -n 1 "$metrics" | sed 's/.*"memory_restore":\({[^}]*}\).*/\1/')"
  if [ "$i" = $(( ${#runs[@]} - 1 )) ]; then
    in_ns curl -s -m 10 -X POST http://172.16.0.2:8080/shutdown > /dev/null
    rc=0
    wait "$vmm_pid" || rc=$?
    vmm_pid=""
    echo "[demo] the guest shut down; reapvm exited with code $rc"
    exit "$rc"
  fi
  kill "$vmm_pid"; wait "$vmm_pid" 2>/dev/null || true
done
