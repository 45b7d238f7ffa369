#!/usr/bin/env bash
# Real-speed cold starts on this machine's own KVM: replays the working sets the suite
# benchmark recorded (~/.cache/reapvm/suite) in the no-Linux replay guest, restored with each
# memory backend (docs/replay.md). Arguments go to tests/benches/replay.rs:
#   --functions a,b  --modes File,Uffd,Uffd-fa,REAP,REAP+,REAP-stream,REAP-stream-fa,File-tmpfs (default: File,Uffd,REAP,REAP+)  --runs N (default 10)
# The compute between touches is each function's handler timed here in a chroot of the suite
# rootfs, so the suite rootfs is built (cached) first.
#   --out DIR (default target/replay-bench: replay-results.md, replay-runs.csv, replay-cold-latency.svg)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export REAPVM_CALLER_DIR="$PWD"
cd "$root"
scripts/setup-host.sh
scripts/build-guest.sh --suite >/dev/null
scripts/build-replay-guest.sh >/dev/null
exec cargo bench -q -p vmm --bench replay -- "$@"
