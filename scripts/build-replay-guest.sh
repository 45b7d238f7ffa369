#!/usr/bin/env bash
# Builds the replay guest (guest/replay: no_std, no Linux; see docs/replay.md) into
# target/replay/release/reapvm-replay. Its own cargo workspace and linker script: it is a
# bare-metal ELF kernel, not a host program.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root/guest/replay"
CARGO_TARGET_DIR="$root/target/replay" cargo build -q --release
echo "$root/target/replay/release/reapvm-replay"
