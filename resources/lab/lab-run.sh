#!/usr/bin/env bash
# Runs one command inside the KVM lab (a QEMU TCG machine with an emulated AMD EPYC CPU,
# SVM and nested paging, so KVM inside it is real) and exits with the command's exit code.
# The host's root is visible read-only at the same paths; the current directory must exist
# on the host (one under /tmp or /run is shared into the lab by itself). Usage: lab-run.sh [--timeout SECS] [--mem MIB] [--cpus N] -- CMD [ARGS...]
# Environment variables named REAPVM_*, RUST_* and CARGO_* are passed to the command.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${REAPVM_CACHE:-$HOME/.cache/reapvm}"
timeout_s=1800 mem=3072 cpus=2
while [ $# -gt 0 ]; do
  case "$1" in
    --timeout) timeout_s="$2"; shift 2 ;;
    --mem) mem="$2"; shift 2 ;;
    --cpus) cpus="$2"; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || { echo "usage: lab-run.sh [--timeout SECS] [--mem MIB] [--cpus N] -- CMD [ARGS...]" >&2; exit 2; }
command -v qemu-system-x86_64 >/dev/null || { echo "lab: qemu-system-x86_64 is not installed (run resources/lab/build-lab.sh)" >&2; exit 125; }
lab="$("$here/build-lab.sh" | tail -n 1)"

mkdir -p "$cache/lab-runs"
# Consoles kept from faulty labs: the ten newest are enough to compare.
find "$cache/lab-runs" -maxdepth 1 -name '*.log' -printf '%T@ %p\n' 2>/dev/null | sort -rn |
  tail -n +11 | cut -d' ' -f2- | xargs -r rm -f
run="$(mktemp -d "$cache/lab-runs/run.XXXXXX")"
qpid=""
# REAPVM_LAB_OUT_DIR (a host folder): the command gets a writable folder (REAPVM_LAB_OUT in
# the lab, where the host's root is read-only) whose contents land there when the lab ends.
out_dir="${REAPVM_LAB_OUT_DIR:-}"
# Moves everything in $1 into $2, merging folders that are in both (a run tried again in a
# fresh lab lands beside what the earlier attempt left); a file in both is replaced.
merge_into() {
  local src="$1" dst="$2" entry name
  mkdir -p "$dst" || return 1
  for entry in "$src"/* "$src"/.[!.]*; do
    [ -e "$entry" ] || continue
    name="$(basename "$entry")"
    if [ -d "$entry" ] && [ -d "$dst/$name" ]; then
      merge_into "$entry" "$dst/$name" || return 1
    else
      rm -rf "${dst:?}/$name" && mv "$entry" "$dst/$name" || return 1
    fi
  done
}
cleanup() {
  [ -n "$qpid" ] && kill "$qpid" 2>/dev/null || true
  [ -n "${tailpid:-}" ] && kill "$tailpid" 2>/dev/null || true
  if [ -n "$out_dir" ] && [ -d "$run/out" ]; then
    merge_into "$run/out" "$out_dir" ||
      echo "lab: cannot move the run's output to $out_dir" >&2
  fi
  rm -rf "$run"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A scratch disk for runs that need disk-backed files (page cache effects): formatted ext4 in
# the lab and mounted at /mnt; QEMU reads it with O_DIRECT, so a cold read is a real read.
disk_args=() disk_kernel_arg=""
if [ -n "${REAPVM_LAB_DISK_MIB:-}" ]; then
  truncate -s "${REAPVM_LAB_DISK_MIB}M" "$run/disk.img"
  disk_args=(-drive "file=$run/disk.img,if=virtio,format=raw,cache=none,aio=threads")
  disk_kernel_arg="reapvm_lab.disk=/mnt"
fi

# The lab mounts its own tmpfs over /tmp and /run (and its own /dev, /proc, /sys): a
# command started from a folder under /tmp or /run (a checkout in /tmp, say) gets the top
# folder it lies in (/tmp/CHECKOUT for /tmp/CHECKOUT/vmm: cargo runs a test from its
# crate's folder, and the test binary is in the checkout's target/), one under /dev, /proc
# or /sys that folder itself, shared into the lab read-only at the same path over the
# lab's own.
workdir_args=() workdir_kernel_arg=""
case "$PWD/" in
  /tmp/*|/run/*|/dev/*|/proc/*|/sys/*)
    share="$PWD"
    case "$PWD/" in /tmp/*|/run/*) share="$(printf '%s\n' "$PWD" | cut -d/ -f1-3)" ;; esac
    case "$share" in
      */*/?*) ;;
      *) echo "lab: cannot share $PWD into the lab: run from a folder below it, not from it" >&2; exit 125 ;;
    esac
    case "$share" in
      *[[:space:]]*) echo "lab: cannot share $share into the lab: its path has white space (the lab's kernel command line carries it); move the checkout" >&2; exit 125 ;;
    esac
    workdir_args=(-virtfs "local,path=$share,mount_tag=workdir,security_model=none,readonly=on,multidevs=remap")
    workdir_kernel_arg="reapvm_lab.workdir=$share"
    ;;
esac

{
  echo "cd $(printf '%q' "$PWD") || exit 126"
  env | grep -E '^(REAPVM|RUST|CARGO)[A-Z0-9_]*=' | while IFS='=' read -r k v; do
    printf 'export %s=%q\n' "$k" "$v"
  done
  if [ -n "$disk_kernel_arg" ]; then echo "export REAPVM_LAB_DISK=/mnt"; fi
  if [ -n "$out_dir" ]; then echo "export REAPVM_LAB_OUT=$(printf '%q' "$run/out")"; fi
  echo "export REAPVM_IN_LAB=1 HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
  printf 'exec'; printf ' %q' "$@"; echo
} > "$run/cmd.sh"
: > "$run/output.log"
[ -z "$out_dir" ] || mkdir -p "$run/out"

qemu-system-x86_64 -machine q35 -accel "tcg,thread=${REAPVM_LAB_TCG_THREAD:-multi}" -cpu EPYC -m "$mem" -smp "$cpus" \
  -kernel "$lab/vmlinuz" -initrd "$lab/initrd.cpio.gz" \
  -append "console=ttyS0 quiet panic=-1 reapvm_lab.run=$run $disk_kernel_arg $workdir_kernel_arg ${REAPVM_LAB_KERNEL_ARGS:-}" \
  "${disk_args[@]}" "${workdir_args[@]}" \
  -display none -monitor none -nic none -no-reboot \
  -serial "file:$run/console.log" \
  -virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap" \
  -virtfs "local,path=$run,mount_tag=labrun,security_model=none" \
  -device virtio-serial-pci -chardev "file,id=out,path=$run/output.log" \
  -device virtconsole,chardev=out < /dev/null > "$run/qemu.log" 2>&1 &
qpid=$!
tail -n +1 -f --pid="$qpid" "$run/output.log" | grep --line-buffered -v '^REAPVM_LAB_EXIT=' &
tailpid=$!

# The lab's own kernel sometimes stops taking timer interrupts on one of its CPUs (QEMU TCG
# with nested SVM; docs/kvm-lab.md), and everything that sleeps on that CPU, guests' timers
# included, waits forever. lab-init's watchers say so on the console, and so does RCU when
# its own thread sleeps there. The lab is beyond repair then: stop it at once with a
# distinct exit code rather than at the time limit.
timer_lost_sign="timer wakeup didn't happen|reapvm-lab: cpu [0-9]+'s timer is lost"
deadline=$(( $(date +%s) + timeout_s ))
polls=0
while kill -0 "$qpid" 2>/dev/null; do
  polls=$((polls + 1))
  if [ $((polls % 10)) -eq 0 ] && grep -qE "$timer_lost_sign" "$run/console.log" 2>/dev/null; then
    kept="$cache/lab-runs/timer-lost-$(date +%Y%m%d-%H%M%S)-$$.log"
    cp "$run/console.log" "$kept" 2>/dev/null || true
    echo "lab: the lab's kernel lost a CPU's timer (its console: \"$(grep -m1 -E "$timer_lost_sign" "$run/console.log")\"); stopping this lab, console kept in $kept" >&2
    kill "$qpid" 2>/dev/null || true
    wait "$qpid" 2>/dev/null || true
    qpid=""
    wait "$tailpid" 2>/dev/null || true
    exit 123
  fi
  if [ "$(date +%s)" -ge "$deadline" ]; then
    echo "lab: time limit of ${timeout_s}s reached, stopping the lab" >&2
    kill "$qpid" 2>/dev/null || true
    wait "$qpid" 2>/dev/null || true
    qpid=""
    wait "$tailpid" 2>/dev/null || true
    exit 124
  fi
  sleep 0.2
done
wait "$qpid" 2>/dev/null || true
qpid=""
wait "$tailpid" 2>/dev/null || true
rc="$(sed -n 's/^REAPVM_LAB_EXIT=\([0-9]*\).*/\1/p' "$run/output.log" | tail -n 1)"
if [ -z "$rc" ]; then
  # The lab itself died (its kernel panicked or QEMU stopped): keep the whole console for
  # diagnosis, since the run directory goes away, and say so with a distinct exit code.
  kept="$cache/lab-runs/crashed-$(date +%Y%m%d-%H%M%S)-$$.log"
  cat "$run/console.log" "$run/qemu.log" > "$kept" 2>/dev/null || true
  echo "lab: the lab stopped without reporting an exit code (console kept in $kept); its last lines:" >&2
  tail -n 30 "$run/console.log" "$run/qemu.log" >&2 || true
  exit 122
fi
exit "$rc"
