#!/usr/bin/env bash
# Prepares the KVM lab: Debian's generic 6.1 kernel (unpacked from its package, never
# installed) and a busybox initramfs whose init loads KVM (kvm_amd), virtio and 9p
# modules, mounts the host's root read-only and runs one command in it.
# Cached in $REAPVM_CACHE/lab-<hash>/ keyed by this script, lab-init.sh and the kernel
# package version. Prints the cache directory on the last line of stdout.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${REAPVM_CACHE:-$HOME/.cache/reapvm}"
log() { echo "[lab] $*" >&2; }

need=(busybox-static kmod cpio iproute2 e2fsprogs)
missing=()
for p in "${need[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
fi

# QEMU 7.2 (bookworm) livelocks now and then with nested SVM under multi-threaded TCG (the
# lab freezes with soft lockups a few boots in); QEMU 10 from bookworm-backports ran 140
# guest boots in a row without one. See docs/kvm-lab.md.
qemu_major() { qemu-system-x86_64 --version 2>/dev/null | awk 'NR==1 {split($4, v, "."); print v[1]; exit}'; }
if [ "$(qemu_major || echo 0)" -lt 10 ] 2>/dev/null || ! command -v qemu-system-x86_64 >/dev/null; then
  if . /etc/os-release && [ "${VERSION_CODENAME:-}" = bookworm ]; then
    src=/etc/apt/sources.list.d/reapvm-bookworm-backports.sources
    if [ ! -f "$src" ]; then
      log "adding bookworm-backports (for QEMU 10) as $src"
      printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' > "$src"
    fi
    log "installing qemu-system-x86 from bookworm-backports"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports qemu-system-x86 >&2
  else
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-x86 >&2
  fi
fi
[ "$(qemu_major || echo 0)" -ge 10 ] || log "warning: QEMU $(qemu_major) is older than 10; the lab may freeze (soft lockups)"

# linux-image-amd64 names the current ABI; its -unsigned twin has the same files.
abi_pkg="$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-6/ {print $2; exit}')"
if [ -z "$abi_pkg" ]; then
  apt-get update -qq >&2
  abi_pkg="$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-6/ {print $2; exit}')"
fi
[ -n "$abi_pkg" ] || { log "cannot find the linux-image-amd64 package"; exit 1; }
pkg="${abi_pkg}-unsigned"
kver="${abi_pkg#linux-image-}"
pkg_version="$(apt-cache policy "$pkg" | awk '/Candidate:/ {print $2}')"
key="$( (cat "$0" "$here/lab-init.sh"; echo "$pkg $pkg_version") | sha256sum | cut -c1-16)"
out="$cache/lab-$key"
if [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.cpio.gz" ]; then
  log "cached: $out"
  echo "$out"
  exit 0
fi

tmp="$(mktemp -d "$cache/lab-build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
log "downloading $pkg $pkg_version"
(cd "$tmp" && apt-get download "$pkg" >/dev/null 2>&1) || { log "apt-get download $pkg failed"; exit 1; }
dpkg -x "$tmp"/*.deb "$tmp/k"
depmod -b "$tmp/k" "$kver"

root="$tmp/initrd"
mkdir -p "$root"/{bin,dev,proc,sys,host,tmp,modules}
cp /bin/busybox "$root/bin/busybox"
cp "$here/lab-init.sh" "$root/init"
chmod +x "$root/init"
# Modules in load order (dependencies first); lab-init insmods them one by one.
: > "$root/modules/order"
for m in kvm_amd virtio_pci virtio_blk virtio_console 9p 9pnet_virtio ext4 tun veth loop; do
  modprobe --show-depends -d "$tmp/k" -S "$kver" "$m" | awk '$1 == "insmod" {print $2}'
done | awk '!seen[$0]++' | while read -r ko; do
  cp "$ko" "$root/modules/"
  basename "$ko" >> "$root/modules/order"
done
log "$(wc -l < "$root/modules/order") modules for kernel $kver"

mkdir -p "$out.tmp"
cp "$tmp/k/boot/vmlinuz-$kver" "$out.tmp/vmlinuz"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$out.tmp/initrd.cpio.gz"
echo "$kver" > "$out.tmp/kernel-version"
rm -rf "$out" && mv "$out.tmp" "$out"
log "ready: $out"
echo "$out"
