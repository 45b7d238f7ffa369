#!/usr/bin/env bash
# The test command: installs what is missing, builds the guest (kernel cached by recipe),
# prepares the KVM lab when this host cannot boot Linux guests on KVM itself, checks
# formatting and lints, then runs every test. KVM suites move into the lab by themselves.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
start=$(date +%s)
step() { echo "==> [$(( $(date +%s) - start ))s] $*"; }

step "host packages"
scripts/setup-host.sh
step "guest kernel and agent initramfs"
scripts/build-guest.sh
place="$(scripts/kvm-place.sh)"
if [ "$place" = lab ]; then
  step "KVM lab (this host's KVM cannot boot Linux guests)"
  resources/lab/build-lab.sh >/dev/null
else
  step "hardware KVM found: KVM tests run directly"
fi
step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy"
cargo clippy -q --workspace --all-targets -- -D warnings
step "cargo test (KVM suites run: $place)"
cargo test --workspace
step "all tests passed"
