#!/usr/bin/env bash
# The main job, end to end: builds the guest (kernel, agent, Debian rootfs with the
# functions) and reapvm, boots a function VM on KVM (directly on hardware virtualization, in
# the KVM lab otherwise) with its root on virtio-block and its network on a tap inside a
# network namespace the demo creates, invokes helloworld, snapshots it, restores it in fresh
# reapvm processes (File, OnDemand, REAP record, REAP prefetch), invokes it again, and
# prints the timings and fault counts; then runs the orchestrator (reapd and reapctl): a
# deploy, a recording cold start, a warm start, scale to zero and a prefetching cold start.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup-host.sh
scripts/build-guest.sh
echo "[demo] building reapvm, reapd and reapctl (release)" >&2
cargo build -q --release -p vmm -p orchestrator
. target/guest/guest.env
demo="$root/target/demo"
mkdir -p "$demo"
cat > "$demo/vm.json" <<JSON
{
  "boot-source": {
    "kernel_image_path": "$REAPVM_KERNEL_DIR/vmlinux",
    "boot_args": "console=ttyS0 quiet reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd ip=172.16.0.2::172.16.0.1:255.255.255.0::eth0:off reapvm.function=helloworld"
  },
  "drives": [
    { "drive_id": "rootfs", "path_on_host": "$REAPVM_ROOTFS", "is_root_device": true, "is_read_only": true }
  ],
  "network-interfaces": [
    { "iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02" }
  ],
  "machine-config": { "vcpu_count": 1, "mem_size_mib": 256, "smt": false }
}
JSON
run=("$root/scripts/demo-run.sh" "$root/target/release/reapvm" "$demo")
orchestrate=("$root/scripts/demo-reapd.sh" "$root/target/release" "$REAPVM_KERNEL_DIR/vmlinux" "$REAPVM_ROOTFS")
if [ "$(scripts/kvm-place.sh)" = direct ]; then
  echo "[demo] running on this host's hardware KVM" >&2
  "${run[@]}"
  "${orchestrate[@]}"
else
  echo "[demo] this host's KVM cannot boot Linux: running inside the KVM lab (lab timings, ~25x slower than hardware)" >&2
  resources/lab/build-lab.sh >/dev/null
  resources/lab/lab-run.sh --timeout 900 -- "${run[@]}"
  resources/lab/lab-run.sh --timeout 900 -- "${orchestrate[@]}"
fi
