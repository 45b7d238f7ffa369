#!/usr/bin/env bash
# The orchestrator part of the demo (run directly, or inside the KVM lab by demo.sh): reapd
# with its state in a fresh folder deploys helloworld (boot, warm-up, snapshot), then
# reapctl invokes it: a cold start that records the working set, a warm one, scale to zero,
# a cold start that prefetches it; then shows the function and stops reapd with SIGTERM.
# Every instance runs in a network namespace of its own that reapd makes and removes.
# Usage: demo-reapd.sh BIN_DIR KERNEL ROOTFS   (BIN_DIR holds reapvm, reapd and reapctl)
set -euo pipefail
bin="$1"
kernel="$2"
rootfs="$3"
# Somewhere writable here and in the lab (whose view of the host is read-only).
state="$(mktemp -d /tmp/reapd-demo.XXXXXX)"
sock="$state/reapd.sock"
reapd_pid=""
cleanup() {
  local rc=$?
  if [ -n "$reapd_pid" ]; then kill -TERM "$reapd_pid" 2>/dev/null || true; wait "$reapd_pid" 2>/dev/null || true; fi
  if [ "$rc" != 0 ] && [ -f "$state/reapd.log" ]; then
    echo "[demo] the orchestrator demo failed; reapd's log ends:" >&2
    tail -n 40 "$state/reapd.log" >&2
  fi
  rm -rf "$state"
}
trap cleanup EXIT

echo "[demo] reapd: state in $state/state, API on $sock (its log: $state/reapd.log)"
"$bin/reapd" --socket "$sock" --state-dir "$state/state" --reapvm "$bin/reapvm" \
  --kernel "$kernel" --rootfs "$rootfs" 2> "$state/reapd.log" &
reapd_pid=$!
for _ in $(seq 300); do
  [ -S "$sock" ] && break
  kill -0 "$reapd_pid" 2>/dev/null || { echo "[demo] reapd exited" >&2; exit 1; }
  sleep 0.1
done
[ -S "$sock" ] || { echo "[demo] reapd made no socket $sock in 30 s" >&2; exit 1; }
ctl() { "$bin/reapctl" --socket "$sock" "$@"; }
step() { # LABEL ARGS...
  local label="$1"; shift
  echo "[demo] $label: reapctl $*"
  ctl "$@"
}
step "deploy" deploy hello --function helloworld --keep-alive 600
invoke() { # LABEL DATA
  local answer
  if ! answer="$(ctl invoke hello "$2" 2> "$state/served")"; then
    echo "[demo] $1: reapctl invoke hello '$2' failed: $(cat "$state/served")" >&2
    exit 1
  fi
  echo "[demo] $1: reapctl invoke hello '$2' -> '$answer'; $(cat "$state/served")"
}
invoke "first invocation (cold start, records the working set)" Ada
invoke "second invocation" Grace
step "scale to zero" scale-to-zero hello
invoke "after scale to zero (cold start, prefetches the working set)" Barbara
step "the function" show hello
echo "[demo] reapd's metrics (Prometheus), invocations:"
curl -s --unix-socket "$sock" http://localhost/metrics | grep '^reapd_invocations_total' || echo "[demo] (no invocation counters in GET /metrics)"
kill -TERM "$reapd_pid"
rc=0
wait "$reapd_pid" || rc=$?
reapd_pid=""
echo "[demo] reapd stopped its instances and exited with code $rc on SIGTERM"
exit "$rc"
