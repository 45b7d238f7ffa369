#!/usr/bin/env bash
# Builds the reapvm guest kernel (vmlinux + bzImage) from Debian's linux-source-6.1,
# using allnoconfig plus resources/kernel/guest-6.1.fragment. The result is cached in
# $REAPVM_CACHE/kernel-<hash>/ keyed by the fragment, this script and the source
# package version, so a rebuild happens only when the recipe changes.
# Prints the cache directory on the last line of stdout.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${REAPVM_CACHE:-$HOME/.cache/reapvm}"
fragment="$here/guest-6.1.fragment"
log() { echo "[kernel] $*" >&2; }

need=(linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev)
missing=()
for p in "${need[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
fi

src_version="$(dpkg-query -W -f='${Version}' linux-source-6.1)"
key="$( (cat "$fragment" "$0"; echo "$src_version") | sha256sum | cut -c1-16)"
out="$cache/kernel-$key"
if [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ]; then
  log "cached: $out"
  echo "$out"
  exit 0
fi

mkdir -p "$cache"
# One build at a time: two (a test run and a demo, say) in one build tree corrupt it.
exec 9>"$cache/kernel-build.lock"
if ! flock -n 9; then
  log "another kernel build is running; waiting for it"
  flock 9
fi
if [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ]; then
  log "cached: $out (built meanwhile)"
  echo "$out"
  exit 0
fi
# One build tree per source version: a config change rebuilds incrementally.
work="$cache/kernel-build-${src_version}"
if [ ! -f "$work/Makefile" ]; then
  log "unpacking linux-source $src_version"
  rm -rf "$work" && mkdir -p "$work"
  tar -xaf /usr/src/linux-source-6.1.tar.xz -C "$work" --strip-components=1
fi
cd "$work"
log "configuring (allnoconfig + $(basename "$fragment"))"
make -s KCONFIG_ALLCONFIG="$fragment" allnoconfig >&2
# Every option the fragment asks for must have survived Kconfig's dependency rules.
bad=0
while IFS= read -r line; do
  case "$line" in
    CONFIG_*=*) grep -qxF "$line" .config || { log "config lost: $line"; bad=1; } ;;
    "# CONFIG_"*" is not set") opt="${line#\# }"; opt="${opt%% *}"
      if grep -q "^$opt=" .config; then log "config forced on: $opt"; bad=1; fi ;;
  esac
done < "$fragment"
[ "$bad" -eq 0 ] || { log "the fragment does not apply cleanly"; exit 1; }

jobs="$(nproc)"
log "building vmlinux and bzImage with $jobs jobs (about 7 minutes on 2 cores)"
start=$(date +%s)
make -j"$jobs" vmlinux bzImage 2>&1 | awk -v s="$start" '/^  (CC|LD|AR|AS)/ { n++; if (n % 200 == 0) { printf "[kernel] %d objects, %ds\n", n, systime() - s > "/dev/stderr" } } /error|Error/ { print > "/dev/stderr" }'
[ "${PIPESTATUS[0]}" -eq 0 ] || { log "kernel build failed"; exit 1; }
tmp="$out.tmp"
rm -rf "$tmp" && mkdir -p "$tmp"
cp vmlinux arch/x86/boot/bzImage .config "$tmp/"
cp "$fragment" "$tmp/recipe.fragment"
mv "$tmp" "$out"
log "built in $(( $(date +%s) - start ))s: $out"
echo "$out"
