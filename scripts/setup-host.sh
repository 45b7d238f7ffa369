#!/usr/bin/env bash
# Installs (idempotently) the Debian packages that building guests, the KVM lab and the
# tests need, and checks for the Rust toolchain.
set -euo pipefail
need=(
  linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev  # guest kernel
  qemu-system-x86 busybox-static kmod cpio                              # KVM lab
  e2fsprogs iproute2 util-linux procps curl mmdebstrap                  # images, netns, tests
  libclang-dev                                                          # userfaultfd-sys (bindgen)
  python3-venv                                                          # tests/clients.rs (PyPI client)
)
missing=()
for p in "${need[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] installing ${missing[*]}" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
fi
if ! command -v cargo >/dev/null; then
  echo "[setup] cargo is not installed: install the Rust toolchain (rustup) first" >&2
  exit 1
fi
