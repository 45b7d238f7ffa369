#!/usr/bin/env bash
# Builds everything a guest needs: the kernel (cached by recipe hash), the static agent, an
# initramfs with the agent as /init, and the Debian ext4 root filesystem with the agent as
# /sbin/init and the functions of resources/functions (cached by recipe hash).
# Writes target/guest/guest.env with the paths
# (REAPVM_KERNEL_DIR, REAPVM_INITRAMFS, REAPVM_ROOTFS) for the tests and the demo.
# With --suite it also builds the function suite's image (its libraries: ~3 GB) and adds
# REAPVM_SUITE_ROOTFS; without it that line is left out, so nothing uses a stale suite image.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { echo "[guest] $*" >&2; }
suite=no
case "${1:-}" in
  --suite) suite=yes ;;
  "") ;;
  *) echo "usage: build-guest.sh [--suite]" >&2; exit 2 ;;
esac

kernel_dir="$("$root/resources/kernel/build-kernel.sh" | tail -n 1)"

log "building the agent (static)"
target=x86_64-unknown-linux-gnu
(cd "$root" && RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build -q -p guest --release --target "$target")
agent="$root/target/$target/release/reapvm-agent"

out="$root/target/guest"
staging="$out/initramfs"
rm -rf "$staging" && mkdir -p "$staging"/{dev,proc,sys,run,tmp}
cp "$agent" "$staging/init"
(cd "$staging" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -9) > "$out/initramfs.cpio.gz.tmp"
mv "$out/initramfs.cpio.gz.tmp" "$out/initramfs.cpio.gz"
rm -rf "$staging"
log "building the Debian root filesystem with the agent and resources/functions"
rootfs="$("$root/resources/rootfs/build-rootfs.sh" --flavor core "$agent" "$root/resources/functions" | tail -n 1)"
suite_rootfs=""
if [ "$suite" = yes ]; then
  log "building the function suite's root filesystem (its libraries are large: minutes the first time)"
  suite_rootfs="$("$root/resources/rootfs/build-rootfs.sh" --flavor suite "$agent" "$root/resources/functions" | tail -n 1)"
fi
{
  echo "REAPVM_KERNEL_DIR=$kernel_dir"
  echo "REAPVM_INITRAMFS=$out/initramfs.cpio.gz"
  echo "REAPVM_ROOTFS=$rootfs"
  [ -z "$suite_rootfs" ] || echo "REAPVM_SUITE_ROOTFS=$suite_rootfs"
} > "$out/guest.env"
log "kernel: $kernel_dir; initramfs: $out/initramfs.cpio.gz; rootfs: $rootfs${suite_rootfs:+; suite rootfs: $suite_rootfs}"
