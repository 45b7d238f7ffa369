#!/usr/bin/env bash
# The test command: installs what is missing, builds the guest (kernel cached by recipe),
# prepares the KVM lab when this host cannot boot Linux guests on KVM itself, checks
# formatting and lints, then runs every test. KVM suites move into the lab by themselves.
#
# --fast: the edit loop's tier: fmt, clippy, unit tests and the tests that need only this
# host's own KVM (the replay guest runs in guest user mode, which kvm-pvm hosts run
# natively): no guest kernel, no root filesystem, no lab. Minutes, not the full run's hour.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
tier=full
case "${1:-}" in
  --fast) tier=fast ;;
  "") ;;
  *) echo "usage: scripts/test.sh [--fast]" >&2; exit 2 ;;
esac
start=$(date +%s)
step() { echo "==> [$(( $(date +%s) - start ))s] $*"; }

step "host packages"
scripts/setup-host.sh
if [ "$tier" = full ]; then
  step "guest kernel and agent initramfs"
  scripts/build-guest.sh --suite
  step "Firecracker's Python client from PyPI (tests/clients.rs)"
  resources/clients/build-python-client.sh
fi
step "replay guest (no_std; runs on this host's own KVM)"
scripts/build-replay-guest.sh
if [ "$tier" = fast ]; then
  place="this host's own KVM only"
  [ -e /dev/kvm ] || { echo "test.sh --fast: no /dev/kvm here; the replay tests need this host's own KVM" >&2; exit 1; }
  tests=(--lib --bins --test replay --test rate_limits --test hostile --test seccomp --test jail --test fuzz_seeds --test process --test reapd_api)
else
  place="$(scripts/kvm-place.sh)"
  if [ "$place" = lab ]; then
    step "KVM lab (this host's KVM cannot boot Linux guests)"
    resources/lab/build-lab.sh >/dev/null
  else
    step "hardware KVM found: KVM tests run directly"
  fi
  tests=(--lib --bins --tests)
fi
step "cargo fmt --check"
cargo fmt --all -- --check
(cd guest/replay && cargo fmt -- --check)
step "cargo clippy"
cargo clippy -q --workspace --all-targets -- -D warnings
(cd guest/replay && CARGO_TARGET_DIR="$root/target/replay" cargo clippy -q --release -- -D warnings)
if [ "$tier" = full ]; then
  # Each fuzz target for a short, fixed time from its seeds (the long runs: docs/fuzzing.md).
  step "fuzz targets, 10 s each (AddressSanitizer)"
  scripts/fuzz.sh --time 10
fi
step "cargo test, $tier tier (KVM suites run: $place)"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
# No doctests in this workspace; every suite's own closing line is summed below.
set +e
# The fuzz targets are run by cargo fuzz above, not by the test harness.
cargo test --workspace --exclude reapvm-fuzz --no-fail-fast "${tests[@]}" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
# libtest lines look like "test result: ok. 17 passed; 0 failed; ..." (some with colours).
read -r passed failed < <(sed 's/\x1b\[[0-9;]*m//g' "$log" |
  awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } } END { print p+0, f+0 }')
# A suite binary that died before its closing line (e.g. its lab run failed) is a failed target.
targets_failed="$(sed -n 's/^error: \([0-9]*\) targets\{0,1\} failed.*/\1/p' "$log" | tail -n 1)"
step "cargo test finished with exit code $rc"
echo "summary: $passed passed, $failed failed, ${targets_failed:-0} test targets failed (lab suites: a failure retried in a fresh lab counts here too, and tests/lab_runner.rs fails twice on purpose; the exit code is the verdict)"
exit "$rc"
