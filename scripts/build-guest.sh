#!/usr/bin/env bash
# Builds everything a guest needs: the kernel (cached by recipe hash), the static agent, an
# initramfs with the agent as /init, and the Debian ext4 root filesystem with the agent as
# /sbin/init and the functions of resources/functions (cached by recipe hash).
# Writes target/guest/guest.env with the paths
# (REAPVM_KERNEL_DIR, REAPVM_INITRAMFS, REAPVM_ROOTFS) for the tests and the demo.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { echo "[guest] $*" >&2; }

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
rootfs="$("$root/resources/rootfs/build-rootfs.sh" "$agent" "$root/resources/functions" | tail -n 1)"
cat > "$out/guest.env" <<ENV
REAPVM_KERNEL_DIR=$kernel_dir
REAPVM_INITRAMFS=$out/initramfs.cpio.gz
REAPVM_ROOTFS=$rootfs
ENV
log "kernel: $kernel_dir; initramfs: $out/initramfs.cpio.gz; rootfs: $rootfs"
