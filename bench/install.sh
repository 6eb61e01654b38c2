#!/usr/bin/env bash
# Install what `make bench` needs, only what is missing, quietly:
#   Debian packages: nginx with its stream module, haproxy, wrk, iperf3, openssl (and strace for
#   bench/profile.py), redis-server and redis-tools (redis-benchmark), postgresql (the server, and
#   pgbench), and the `bench` extra (matplotlib, py-spy, cryptography) into the virtualenv.
# Usage: bench/install.sh [PYTHON]   (PYTHON: the virtualenv's interpreter, default .venv/bin/python)
set -euo pipefail

PY="${1:-.venv/bin/python}"
STREAM_MODULE=/usr/lib/nginx/modules/ngx_stream_module.so
# Debian's PostgreSQL server programs are under a versioned folder, not on PATH.
PG_INITDB=$(ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | tail -1 || true)

bash "$(dirname "$0")/../scripts/ensure-debian-packages.sh" \
    nginx:nginx "$STREAM_MODULE":libnginx-mod-stream haproxy:haproxy wrk:wrk iperf3:iperf3 \
    openssl:openssl strace:strace redis-server:redis-server redis-benchmark:redis-tools \
    pgbench:postgresql "${PG_INITDB:-/usr/lib/postgresql/bin/initdb}":postgresql

if ! "$PY" -c 'import matplotlib, cryptography, shutil, sys; sys.exit(shutil.which("py-spy", path=sys.prefix + "/bin") is None)' \
        >/dev/null 2>&1; then
    echo "bench: installing the bench extra into $(dirname "$(dirname "$PY")")"
    log=$(mktemp)
    if ! "$PY" -m pip install --quiet -e '.[bench]' >"$log" 2>&1; then
        cat "$log" >&2; rm -f "$log"; exit 1
    fi
    rm -f "$log"
fi
