#!/usr/bin/env bash
# Install the Debian packages that are missing, quietly; used by `make test` and `make bench`.
# Usage: scripts/ensure-debian-packages.sh NEED:PACKAGE ...
#   NEED is a command name (looked up on PATH) or an absolute path (a file that must exist).
# Packages whose NEED is already there are skipped, so a machine that has everything runs no apt.
set -euo pipefail

missing=()
for pair in "$@"; do
    need=${pair%%:*}
    package=${pair#*:}
    if [[ $need == /* ]]; then
        [ -e "$need" ] || missing+=("$package")
    else
        command -v "$need" >/dev/null 2>&1 || missing+=("$package")
    fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "installing ${missing[*]} (apt-get)"
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO=(sudo); else
        echo "need root (or sudo) to install ${missing[*]}" >&2; exit 1
    fi
else
    SUDO=()
fi
log=$(mktemp)
# The tests and benchmarks start their own servers on their own ports; if a package's service
# starts too (or is refused by policy-rc.d in a container), nothing here uses it.
if ! { "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq -o DPkg::Lock::Timeout=300 &&
       "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
           -o DPkg::Lock::Timeout=300 "${missing[@]}"; } >"$log" 2>&1; then
    cat "$log" >&2; rm -f "$log"; exit 1
fi
rm -f "$log"
