#!/usr/bin/env bash
# The REAP paper's experiment on the vSwarm function suite, with one command: builds the
# guest (kernel and rootfs cached by recipe) and reapvm, then runs the suite benchmark
# (tests/benches/suite.rs). Arguments go to the benchmark:
#   --functions a,b   (default: all ten)     --modes File,Uffd,Uffd-fa,REAP,REAP+,REAP-stream,REAP-stream-fa (default: File,Uffd,REAP,REAP+)
#   --runs N          (default 10)           --hot (leave the page cache warm)
#   --out DIR         (default target/suite-bench: results.md, runs.csv, cold-latency.svg)
#   --merge           (keep OUT/runs.csv's rows of the functions not run now)
#   --report-only     (run nothing: write OUT's table and chart again from OUT/runs.csv)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# A relative --out is relative to where the command was run, not to cargo's package folder.
export REAPVM_CALLER_DIR="$PWD"
cd "$root"
scripts/setup-host.sh
scripts/build-guest.sh --suite
if [ "$(scripts/kvm-place.sh)" = lab ]; then
  resources/lab/build-lab.sh >/dev/null
fi
exec cargo bench -q -p vmm --bench suite -- "$@"
