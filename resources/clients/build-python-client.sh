#!/usr/bin/env bash
# Installs Firecracker's Python client from PyPI, unmodified, into a virtual environment
# cached outside the checkout (keyed by this script and requirements.txt), and records its
# interpreter in target/clients/clients.env for tests/clients.rs. Needs python3-venv
# (scripts/setup-host.sh) and PyPI the first time only.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cache="${REAPVM_CACHE:-${HOME:-/root}/.cache/reapvm}"
# Keyed by the interpreter too: a venv outlives no Python upgrade.
key="$( (cat "$here/build-python-client.sh" "$here/requirements.txt"; /usr/bin/python3 -VV) | sha256sum | cut -c1-16)"
venv="$cache/python-client-$key"
mkdir -p "$cache"
# One installer at a time (two checkouts testing at once share the cache).
exec 9>"$cache/python-client.lock"
flock 9
if [ ! -e "$venv/.complete" ] || ! "$venv/bin/python3" -c "import firecracker.api" >/dev/null 2>&1; then
  echo "[client] installing $(grep -v '^#' "$here/requirements.txt" | xargs) from PyPI into $venv" >&2
  rm -rf "$venv"
  # Debian's interpreter (python3-venv), not whatever python3 the PATH finds first.
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt" >&2
  touch "$venv/.complete"
else
  echo "[client] cached: $venv" >&2
fi
mkdir -p "$root/target/clients"
echo "REAPVM_PYTHON_CLIENT=$venv/bin/python3" > "$root/target/clients/clients.env"
