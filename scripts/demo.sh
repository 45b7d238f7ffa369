#!/usr/bin/env bash
# The main job, end to end: builds the guest and reapvm, boots the guest on KVM (directly
# on hardware virtualization, in the KVM lab otherwise) and prints its console and boot time.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup-host.sh
scripts/build-guest.sh
echo "[demo] building reapvm (release)" >&2
cargo build -q --release -p vmm
. target/guest/guest.env
demo="$root/target/demo"
mkdir -p "$demo"
cat > "$demo/vm.json" <<JSON
{
  "boot-source": {
    "kernel_image_path": "$REAPVM_KERNEL_DIR/vmlinux",
    "initrd_path": "$REAPVM_INITRAMFS",
    "boot_args": "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd reapvm.exit=reboot"
  },
  "machine-config": { "vcpu_count": 2, "mem_size_mib": 256, "smt": false }
}
JSON
cmd=("$root/target/release/reapvm" --no-api --boot-timer --config-file "$demo/vm.json")
place="$(scripts/kvm-place.sh)"
rc=0
if [ "$place" = direct ]; then
  echo "[demo] booting on this host's hardware KVM" >&2
  "${cmd[@]}" < /dev/null || rc=$?
else
  echo "[demo] this host's KVM cannot boot Linux: booting inside the KVM lab (timings are lab timings, ~25x slower than hardware)" >&2
  resources/lab/build-lab.sh >/dev/null
  resources/lab/lab-run.sh --timeout 600 -- "${cmd[@]}" || rc=$?
fi
echo "[demo] reapvm exited with code $rc (0: the guest rebooted and the VMM stopped cleanly)" >&2
exit "$rc"
