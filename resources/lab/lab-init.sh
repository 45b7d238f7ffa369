#!/bin/busybox sh
# PID 1 of the KVM lab: load KVM and virtio modules, mount the host's root (9p, read-only)
# with the run folder writable at its own path, run the command, report its exit code.
if [ "${1:-}" = --watch-timer ]; then
  export PATH=/bin
  # One CPU's timer watcher (started below, pinned to that CPU): reports, once, any CPU
  # whose next timer event is overdue by over 10 s.
  while sleep 5; do
    late="$(awk '
      $1 == "now" && $2 == "at" { now = $3 }
      $1 == "Per" && $2 == "CPU" { cpu = $4 }
      $1 == "next_event:" {
        if (cpu != "" && $2 + 10000000000 < now) { print cpu, int((now - $2) / 1000000000); exit }
        cpu = ""
      }' /proc/timer_list)"
    if [ -n "$late" ]; then
      set -- $late
      echo "<3>reapvm-lab: cpu $1's timer is lost: its next event is $2 s overdue" > /dev/kmsg
      exit 0
    fi
  done
fi
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
# Module parameters come from the kernel command line as MODULE.PARAM=VALUE (as modprobe
# takes them; insmod does not look), e.g. REAPVM_LAB_KERNEL_ARGS="kvm_amd.npt=0".
for m in $(cat /modules/order); do
  name="$(basename "$m" .ko | tr - _)"
  params="$(tr ' ' '\n' < /proc/cmdline | sed -n "s/^$name\.//p")"
  insmod "/modules/$m" $params 2>/dev/null || echo "lab: insmod $m $params failed"
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
# KVM's counters and exit tracing, read by the tests when a guest stalls.
mount -t debugfs debugfs /host/sys/kernel/debug 2>/dev/null
mount -t tracefs tracefs /host/sys/kernel/tracing 2>/dev/null
mount -t tmpfs tmp /host/tmp
mount -t tmpfs run /host/run
mount -t 9p -o trans=virtio,version=9p2000.L,cache=none,msize=512000 labrun "/host$run" \
  || fail "cannot mount the run folder $run"
workdir="$(sed -n 's/.*reapvm_lab.workdir=\([^ ]*\).*/\1/p' /proc/cmdline)"
if [ -n "$workdir" ]; then
  mkdir -p "/host$workdir"
  mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 workdir "/host$workdir" \
    || fail "cannot mount the working folder $workdir"
fi
disk="$(sed -n 's/.*reapvm_lab.disk=\([^ ]*\).*/\1/p' /proc/cmdline)"
if [ -n "$disk" ]; then
  for i in $(seq 50); do [ -b /dev/vda ] && break; sleep 0.1; done
  chroot /host /usr/sbin/mkfs.ext4 -q -F /dev/vda > /dev/null 2>&1 || fail "cannot format the scratch disk"
  mount -t ext4 /dev/vda "/host$disk" || fail "cannot mount the scratch disk at $disk"
fi
[ -c /dev/kvm ] || fail "no /dev/kvm in the lab (kvm_amd did not load: is SVM emulated?)"
ip link set lo up 2>/dev/null
# Under QEMU's TCG with nested SVM a lab CPU now and then stops taking its timer interrupt
# (docs/kvm-lab.md); whatever sleeps on it, a nested guest included, then sleeps forever. A
# watcher pinned to each CPU (the one on the broken CPU sleeps forever itself) says so on
# the console, where lab-run.sh looks for it.
c=0
while [ "$c" -lt "$(nproc)" ]; do
  taskset -c "$c" /init --watch-timer &
  c=$((c + 1))
done
echo "lab: kernel $(uname -r), $(grep -c ^processor /proc/cpuinfo) cpus, /dev/kvm ready" > "$out"
chroot /host /bin/sh "$run/cmd.sh" > "$out" 2>&1 < /dev/null
echo "REAPVM_LAB_EXIT=$?" > "$out"
sync
poweroff -f
