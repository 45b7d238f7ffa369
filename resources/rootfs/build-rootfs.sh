#!/usr/bin/env bash
# Builds the guest's ext4 root filesystem: Debian bookworm (mmdebstrap, Essential:yes set
# plus resources/rootfs/packages.txt, no Recommends, no docs/man/locales), the agent as
# /sbin/init, and optionally function code copied into /functions.
#
#   build-rootfs.sh [--flavor core|suite] AGENT_BINARY [FUNCTIONS_DIR]
#
# Two flavors (default core):
#   core    packages.txt only; the functions of FUNCTIONS_DIR except those named in its
#           suite-only.txt. Small (a few hundred MB): the tests and the demo use it, and
#           tests that need a writable root copy it.
#   suite   packages.txt plus packages-suite.txt (the vSwarm suite's libraries: numpy,
#           torch, OpenCV, ...; ~3 GB) and every function: the function suite uses it.
# Two caches per flavor in ${REAPVM_CACHE:-$HOME/.cache/reapvm}:
#   rootfs-base-FLAVOR-<key>.tar   the mmdebstrap tree (the slow, networked part);
#                           key = sha256(flavor, this script, the flavor's package lists)
#   rootfs-FLAVOR-<key2>.ext4      the final image; key2 = sha256(key, sha256 of the agent,
#                           sha256 of a normalised tar of the functions it holds)
# (16 hex chars each). An existing image is reused as is. Progress goes to stderr as
# "[rootfs] ..."; the image path is the last line of stdout.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
self="$here/$(basename "${BASH_SOURCE[0]}")"
packages_file="$here/packages.txt"
cache="${REAPVM_CACHE:-$HOME/.cache/reapvm}"
log() { echo "[rootfs] $*" >&2; }
die() { log "error: $*"; exit 1; }

flavor=core
if [ "${1:-}" = --flavor ]; then
  flavor="${2:-}"
  shift 2 || die "--flavor needs a value (core or suite)"
fi
case "$flavor" in
  core) package_files=("$packages_file") ;;
  suite) package_files=("$packages_file" "$here/packages-suite.txt") ;;
  *) die "unknown flavor '$flavor' (core or suite)" ;;
esac
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  die "usage: $(basename "$0") [--flavor core|suite] AGENT_BINARY [FUNCTIONS_DIR]"
fi
agent="$1"
functions="${2:-}"
[ -f "$agent" ] || die "agent binary not found (or not a regular file): $agent"
[ "$(head -c4 "$agent" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ] ||
  die "agent is not an ELF binary: $agent"
# As PID 1 the agent runs before anything could fix up a missing loader or libraries.
if command -v readelf >/dev/null && readelf -lW "$agent" 2>/dev/null | grep -q 'program interpreter'; then
  die "agent is dynamically linked, it must be static: $agent"
fi
if [ -n "$functions" ]; then
  [ -d "$functions" ] || die "functions directory not found: $functions"
fi
for f in "${package_files[@]}"; do
  [ -f "$f" ] || die "package list not found: $f"
done
# The core image leaves out the functions that need the suite's libraries.
excludes=()
if [ -n "$functions" ] && [ "$flavor" = core ] && [ -f "$functions/suite-only.txt" ]; then
  while read -r name; do
    [ -d "$functions/$name" ] || die "$functions/suite-only.txt names $name, which is not a function folder"
    excludes+=("--exclude=./$name")
  done < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$functions/suite-only.txt" | grep -v '^$')
fi

# A fixed epoch makes mmdebstrap's tarball and mke2fs's timestamps independent of the build time.
export SOURCE_DATE_EPOCH=1700000000

key="$({ echo "flavor $flavor"; cat "$self" "${package_files[@]}"; } | sha256sum | cut -c1-16)"
base="$cache/rootfs-base-$flavor-$key.tar"
agent_sum="$(sha256sum < "$agent" | cut -d' ' -f1)"
# Names, modes and contents only: mtimes and owners of the caller's checkout must not
# change the key, and the copy into the image is made from the same normalised stream.
functions_tar() {
  tar -c --sort=name --mtime=@"$SOURCE_DATE_EPOCH" --owner=0 --group=0 --numeric-owner \
    --exclude=./suite-only.txt "${excludes[@]}" -C "$functions" .
}
if [ -n "$functions" ]; then
  functions_sum="$(functions_tar | sha256sum | cut -d' ' -f1)"
else
  functions_sum=none
fi
key2="$(printf '%s\n' "$key" "$agent_sum" "$functions_sum" | sha256sum | cut -c1-16)"
image="$cache/rootfs-$flavor-$key2.ext4"

if [ -f "$image" ]; then
  log "cached: $image"
  echo "$image"
  exit 0
fi

missing=()
command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" -eq 0 ] || die "need root to install ${missing[*]}"
  log "installing ${missing[*]}"
  apt-get update -qq >&2 || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2 ||
    die "apt-get install ${missing[*]} failed"
fi

mkdir -p "$cache"
tmp_files=()
cleanup() { [ ${#tmp_files[@]} -eq 0 ] || rm -rf "${tmp_files[@]}"; }
trap cleanup EXIT
# Turn signals into an exit so the EXIT trap also removes temporaries on Ctrl-C.
trap 'exit 130' INT TERM HUP

if [ -f "$base" ]; then
  log "base tree cached: $base"
else
  # Comments and blank lines out; mmdebstrap takes a comma-separated list.
  include="$(cat "${package_files[@]}" | sed -e 's/#.*//' -e 's/[[:space:]]//g' | grep -v '^$' | paste -sd, -)" || true
  [ -n "$include" ] || die "no packages in ${package_files[*]}"
  log "building the $flavor base tree (bookworm, essential + $include); progress from mmdebstrap follows"
  start=$(date +%s)
  base_tmp="$base.tmp.$$"
  tmp_files+=("$base_tmp")
  # essential rather than minbase: the image never runs apt, so apt and its keyring are
  # dead weight; packages change by editing packages.txt and rebuilding.
  # merged-usr hook: bookworm's init-system-helpers wants usrmerge | usr-is-merged, and
  # usrmerge would drag in perl; the hook sets up the symlinks and takes usr-is-merged.
  # force-unsafe-io: nothing is worth fsyncing in a throwaway build tree.
  # The hooks replace host-specific files mmdebstrap copies in (hostname, resolv.conf);
  # their "$1" is the tree, expanded by mmdebstrap, not here.
  # shellcheck disable=SC2016
  mmdebstrap \
    --variant=essential \
    --include="$include" \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --aptopt='Apt::Install-Recommends "false"' \
    --aptopt='Acquire::Languages "none"' \
    --dpkgopt='force-unsafe-io' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/lintian/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --customize-hook='echo reapvm > "$1/etc/hostname"' \
    --customize-hook='printf "127.0.0.1\tlocalhost\n" > "$1/etc/hosts"' \
    --customize-hook=': > "$1/etc/resolv.conf"' \
    --customize-hook='mkdir -p "$1/functions" "$1/proc" "$1/sys" "$1/dev" "$1/run" "$1/tmp" && chmod 1777 "$1/tmp"' \
    --customize-hook='rm -rf "$1"/var/cache/debconf/*-old "$1"/var/lib/dpkg/*-old' \
    --format=tar \
    bookworm "$base_tmp" >&2 || die "mmdebstrap failed (see its messages above)"
  mv "$base_tmp" "$base"
  # A recipe change makes a new tree: keep this flavor's two newest.
  ls -t "$cache"/rootfs-base-"$flavor"-*.tar 2>/dev/null | tail -n +3 | xargs -r rm -f
  log "base tree built in $(( $(date +%s) - start ))s: $base ($(du -h "$base" | cut -f1))"
fi

start=$(date +%s)
root="$(mktemp -d "$cache/rootfs-tree.XXXXXX")"
tmp_files+=("$root")
# Numeric owners: the host's user database must not remap the guest's uids.
tar -x --numeric-owner --xattrs --xattrs-include='*' -f "$base" -C "$root" ||
  die "cannot unpack $base (delete it to rebuild)"
install -m 0755 "$agent" "$root/sbin/init"
touch -h -d "@$SOURCE_DATE_EPOCH" "$root/sbin/init"
mkdir -p "$root/functions"
if [ -n "$functions" ]; then
  functions_tar | tar -x --numeric-owner -C "$root/functions"
  log "copied $(find "$root/functions" -mindepth 1 | wc -l) entries from $functions into /functions"
  # A function's prepare.py makes its deterministic inputs and models at build time, with the
  # image's own Python and libraries (so a pickled model matches the guest's library
  # versions), in a private mount namespace with /proc and /dev for the libraries that read them.
  for script in "$root"/functions/*/prepare.py; do
    [ -f "$script" ] || continue
    name="$(basename "$(dirname "$script")")"
    log "preparing function $name (prepare.py in the image's Python)"
    pstart=$(date +%s)
    unshare --mount --fork -- sh -c '
      set -e
      mount -t proc proc "$1/proc"
      mount --rbind /dev "$1/dev"
      exec chroot "$1" /usr/bin/env -i HOME=/root LANG=C.UTF-8 PATH=/usr/bin:/bin \
        PYTHONHASHSEED=0 OMP_NUM_THREADS=1 PYTHONDONTWRITEBYTECODE=1 \
        sh -c "cd /functions/$2 && exec python3 prepare.py"' sh "$root" "$name" >&2 ||
      die "prepare.py of function $name failed (see its messages above)"
    log "prepared $name in $(( $(date +%s) - pstart ))s"
  done
  # The root filesystem is read-only in the guest: compile the handlers now.
  chroot "$root" /usr/bin/python3 -m compileall -q /functions >&2 ||
    die "compiling the functions' Python failed"
fi

# Sizing: the tree plus 30% or 256 MiB free, whichever is larger, plus room for ext4's own
# metadata (journal, inode tables) so the free space is really free.
tree_kib="$(du -sk "$root" | cut -f1)"
files="$(find "$root" -xdev | wc -l)"
margin_kib=$(( tree_kib * 3 / 10 ))
[ "$margin_kib" -ge $(( 256 * 1024 )) ] || margin_kib=$(( 256 * 1024 ))
size_mib=$(( (tree_kib + margin_kib + 1023) / 1024 ))
size_mib=$(( size_mib + 64 + size_mib / 50 ))
# One inode per 16 KiB (mke2fs's usual ratio), but never fewer than twice the files present.
inodes=$(( size_mib * 64 ))
[ "$inodes" -ge $(( files * 2 )) ] || inodes=$(( files * 2 ))

# The UUID and directory hash seed derive from key2, so the same inputs give the same
# superblock; mke2fs would otherwise pick random ones.
uuid="$(echo "uuid $key2" | sha256sum | cut -c1-32 | sed -E 's/(.{8})(.{4})(.{4})(.{4})(.{12})/\1-\2-\3-\4-\5/')"
image_tmp="$image.tmp.$$"
tmp_files+=("$image_tmp")
rm -f "$image_tmp"
truncate -s "${size_mib}M" "$image_tmp"
log "making ext4 image: tree $(( tree_kib / 1024 )) MiB, $files files, image $size_mib MiB, $inodes inodes"
# -T default: images under 512 MiB would otherwise get the "small" profile (1 KiB blocks).
# -m 0: everything in the guest runs as root, a root reserve is only wasted space.
# The file is fresh and sparse, hence zeroed: assume_storage_prezeroed marks the inode
# tables initialised, so neither mke2fs writes them nor the guest kernel's ext4lazyinit
# thread touches the disk after boot; lazy_*_init=0 for the same reason.
E2FSPROGS_FAKE_TIME="$SOURCE_DATE_EPOCH" mkfs.ext4 -q \
  -T default -b 4096 -N "$inodes" -m 0 -L rootfs -U "$uuid" \
  -E "lazy_itable_init=0,lazy_journal_init=0,assume_storage_prezeroed=1,hash_seed=$uuid,root_owner=0:0" \
  -d "$root" "$image_tmp" >&2 || die "mkfs.ext4 failed on $image_tmp"
mv "$image_tmp" "$image"
# Every agent or function change makes a new image: keep this flavor's three newest.
ls -t "$cache"/rootfs-"$flavor"-*.ext4 2>/dev/null | tail -n +4 | xargs -r rm -f
log "$flavor image built in $(( $(date +%s) - start ))s: $image ($size_mib MiB, $(du -h "$image" | cut -f1) allocated)"
echo "$image"
