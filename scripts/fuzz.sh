#!/usr/bin/env bash
# Runs reapvm's cargo-fuzz targets (docs/fuzzing.md) with AddressSanitizer (or, with
# --sanitizer none, coverage alone: several times faster), each from its seeds
# (fuzz/seeds/TARGET) and the corpus earlier runs grew (fuzz/corpus/TARGET).
#
#   scripts/fuzz.sh --time SECONDS [TARGET...]   each target for a fixed time (CI's smoke run)
#   scripts/fuzz.sh --runs N [TARGET...]          each target for N executions (the long runs)
#
# Prints one line per target: executions, seconds, executions per second, edges covered. A
# crash, a leak (with AddressSanitizer), a hang (one input running over 10 s) or an out-of-memory stops the run and
# fails it; the report is printed, the whole log kept in fuzz/artifacts/TARGET/, and
# libFuzzer leaves the input there to reproduce with
# `cargo +nightly fuzz run TARGET fuzz/artifacts/TARGET/FILE`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
all=(vmstate ws touch_log replay_trace api_request mmio_block mmds)
usage() { echo "usage: scripts/fuzz.sh [--sanitizer address|none] --time SECONDS | --runs N [TARGET...] (targets: ${all[*]})" >&2; exit 2; }
sanitizer=address
if [ "${1:-}" = --sanitizer ]; then
  case "${2:-}" in address|none) sanitizer="$2" ;; *) usage ;; esac
  shift 2
fi
[ $# -ge 2 ] || usage
case "$1" in
  --time) limit=(-max_total_time="$2") ;;
  --runs) limit=(-runs="$2") ;;
  *) usage ;;
esac
shift 2
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")

# cargo-fuzz needs a nightly toolchain for -Zsanitizer=address; reapvm itself builds with
# the pinned stable one (rust-toolchain.toml). Either is installed when missing; a machine
# that cannot get them cannot run this (the full test tier fails here, it does not skip).
if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "[fuzz] installing a nightly Rust toolchain" >&2
  rustup toolchain install nightly --profile minimal >&2 || {
    echo "fuzz.sh: no nightly Rust toolchain, and none can be installed here" >&2
    exit 1
  }
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "[fuzz] installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked --version 0.13.2 >&2
fi
# Instrumented dependencies are kept between checkouts (cargo rebuilds what changed).
# Each sanitizer setting has its own objects (the flags differ).
target_dir="${REAPVM_CACHE:-$HOME/.cache/reapvm}/fuzz-target"
[ "$sanitizer" = address ] || target_dir="$target_dir-$sanitizer"
echo "[fuzz] building ${targets[*]} (sanitizer: $sanitizer; objects in $target_dir)" >&2
cargo +nightly fuzz build -s "$sanitizer" --target-dir "$target_dir" >&2
status=0
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  log="$(mktemp)"
  start=$(date +%s.%N)
  set +e
  cargo +nightly fuzz run -s "$sanitizer" --target-dir "$target_dir" "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
    "${limit[@]}" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1
  rc=$?
  set -e
  secs=$(echo "$(date +%s.%N) - $start" | bc)
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1 || true)
  # A run that died before its first status line has none.
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 | cut -d' ' -f2 || true)
  if [ "$rc" -ne 0 ]; then
    status=1
    kept="fuzz/artifacts/$t/run-$(date +%Y%m%d-%H%M%S).log"
    cp "$log" "$kept"
    echo "[fuzz] $t FAILED (exit $rc); whole log in $kept; the report:" >&2
    # The sanitizer's or the panic's own report, then libFuzzer's summary.
    grep -m 1 -A 40 -E '==[0-9]+==ERROR|panicked at|deadly signal|ERROR: libFuzzer' "$log" >&2 || true
    tail -n 25 "$log" >&2
  fi
  printf '%-13s %12s executions in %6.0f s (%s/s), %s edges covered%s\n' "$t" "${runs:-?}" \
    "$secs" "$(echo "${runs:-0} / $secs" | bc)" "${cov:-?}" \
    "$([ "$rc" -eq 0 ] && echo "" || echo "  FAILED")"
  rm -f "$log"
done
exit "$status"
