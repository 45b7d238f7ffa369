#!/bin/busybox sh
# PID 1 of the KVM lab: load KVM and virtio modules, mount the host's root (9p, read-only)
# with the run folder writable at its own path, run the command, report its exit code.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do
  insmod "/modules/$m" 2>/dev/null || echo "lab: insmod $m failed"
done
run="$(sed -n 's/.*reapvm_lab.run=\([^ ]*\).*/\1/p' /proc/cmdline)"
for i in $(seq 50); do [ -c /dev/hvc0 ] && break; sleep 0.1; done
out=/dev/hvc0
[ -c "$out" ] || out=/dev/console

fail() { echo "lab: $*" > "$out"; echo "REAPVM_LAB_EXIT=125" > "$out"; sync; poweroff -f; }
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 hostroot /host \
  || fail "cannot mount the host root over 9p"
mount -t proc proc /host/proc
mount -t sysfs sys /host/sys
mount -t devtmpfs dev /host/dev
mkdir -p /host/dev/pts /host/dev/shm
mount -t devpts devpts /host/dev/pts
mount -t tmpfs shm /host/dev/shm
mount -t tmpfs tmp /host/tmp
mount -t tmpfs run /host/run
mount -t 9p -o trans=virtio,version=9p2000.L,cache=none,msize=512000 labrun "/host$run" \
  || fail "cannot mount the run folder $run"
disk="$(sed -n 's/.*reapvm_lab.disk=\([^ ]*\).*/\1/p' /proc/cmdline)"
if [ -n "$disk" ]; then
  for i in $(seq 50); do [ -b /dev/vda ] && break; sleep 0.1; done
  chroot /host /usr/sbin/mkfs.ext4 -q -F /dev/vda > /dev/null 2>&1 || fail "cannot format the scratch disk"
  mount -t ext4 /dev/vda "/host$disk" || fail "cannot mount the scratch disk at $disk"
fi
[ -c /dev/kvm ] || fail "no /dev/kvm in the lab (kvm_amd did not load: is SVM emulated?)"
ip link set lo up 2>/dev/null
echo "lab: kernel $(uname -r), $(grep -c ^processor /proc/cpuinfo) cpus, /dev/kvm ready" > "$out"
chroot /host /bin/sh "$run/cmd.sh" > "$out" 2>&1 < /dev/null
echo "REAPVM_LAB_EXIT=$?" > "$out"
sync
poweroff -f
