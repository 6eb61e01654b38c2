"""What `policy: redis` costs a session, against `policy: local` and no limit at all.

    python -m bench.fleet_limits                 # 3000 sessions per variant, 8 clients at once
    python -m bench.fleet_limits -n 10000 -c 16

One pyproxy (`worker_processes: 1`, started as `python -m pyproxy`) in front of an upstream that
greets and closes, with, in turn: no plugin; `limit-conn` and `rate-limit` with `policy: local`; the
same two with `policy: redis` against a redis-server this script starts on a loopback port. For
each variant: the worker's CPU time per session (user + system, from /proc, over all the sessions:
what the policy costs the proxy, whatever the load generator's own speed), Redis's CPU per session,
the sessions per second the clients got, and the latency of a lone client's session (connect to
greeting to close, p50 and p99 over 300 sessions one after another: one Redis round trip more).
Not a test and not part of `make bench`: the figures are for the README and the issue.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import socketserver
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import psutil

LIMITS = {"limit": 1_000_000, "rate": 1_000_000}


class Greeter(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024


class Greet(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.sendall(b"up\n")


def free_port() -> int:
    """A free loopback port below 32768 (the tests' range)."""
    for port in range(27000 + os.getpid() % 2000, 32000):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def plugins(policy: str | None, redis_port: int) -> str:
    if policy is None:
        return "plugins: []"
    redis = f", policy: redis, redis_host: 127.0.0.1, redis_port: {redis_port}" if policy == "redis" else ""
    return f"""plugins:
  - name: limit-conn
    config: {{limit: {LIMITS["limit"]}, per: ip{redis}}}
  - name: rate-limit
    config: {{rate: {LIMITS["rate"]}, per: ip{redis}}}"""


def session(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        while sock.recv(64):
            pass


def load(port: int, sessions: int, clients: int) -> float:
    """`sessions` sessions from `clients` threads; returns the seconds it took."""
    per_client = sessions // clients

    def client() -> None:
        for _ in range(per_client):
            session(port)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.monotonic() - started


def cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def measure(name: str, policy: str | None, redis: psutil.Process, redis_port: int, upstream_port: int,
            sessions: int, clients: int, folder: str) -> dict[str, float | str]:
    port = free_port()
    conf = os.path.join(folder, f"{name}.conf")
    with open(conf, "w") as fh:
        fh.write(f"""worker_processes: 1
log_level: warn
error_log: {folder}/{name}.error.log
access_log: off
pid: {folder}/{name}.pid
stream_listen: [127.0.0.1:{port}]
services:
  - name: svc
    host: 127.0.0.1
    port: {upstream_port}
    routes:
      - name: main
        destinations: [{{port: {port}}}]
{plugins(policy, redis_port)}
""")
    proxy = subprocess.Popen([sys.executable, "-m", "pyproxy", "-c", conf], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                session(port)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        (worker,) = [child for child in psutil.Process(proxy.pid).children()
                     if "worker" in " ".join(child.cmdline())]
        load(port, 500, clients)                         # warm-up
        before, redis_before = cpu(worker), cpu(redis)
        seconds = load(port, sessions, clients)
        worker_cpu, redis_cpu = cpu(worker) - before, cpu(redis) - redis_before
        latencies = []
        for _ in range(300):
            started = time.perf_counter()
            session(port)
            latencies.append(time.perf_counter() - started)
        latencies.sort()
        with open(f"{folder}/{name}.error.log") as fh:
            errors = fh.read()
        assert "unavailable" not in errors, errors
        done = sessions // clients * clients
        return {"variant": name, "worker_us": worker_cpu / done * 1e6, "redis_us": redis_cpu / done * 1e6,
                "per_s": done / seconds, "p50_ms": statistics.median(latencies) * 1e3,
                "p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3}
    finally:
        proxy.terminate()
        proxy.wait(15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--sessions", type=int, default=3000)
    parser.add_argument("-c", "--clients", type=int, default=8)
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        sys.exit("needs redis-server (Debian: apt-get install redis-server)")
    with tempfile.TemporaryDirectory() as folder:
        upstream = Greeter(("127.0.0.1", free_port()), Greet)
        threading.Thread(target=upstream.serve_forever, daemon=True).start()
        redis_port = free_port()
        redis_server = subprocess.Popen(
            ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--dir", folder], stdout=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            redis = psutil.Process(redis_server.pid)
            rows = [measure(name, policy, redis, redis_port, upstream.server_address[1], args.sessions,
                            args.clients, folder)
                    for name, policy in (("none", None), ("local", "local"), ("redis", "redis"))]
        finally:
            redis_server.kill()
            redis_server.wait()
            upstream.shutdown()
    print(f"{'variant':8} {'worker µs/session':>18} {'redis µs/session':>17} {'sessions/s':>11} "
          f"{'lone p50 ms':>12} {'lone p99 ms':>12}")
    for row in rows:
        print(f"{row['variant']:8} {row['worker_us']:18.1f} {row['redis_us']:17.1f} {row['per_s']:11.0f} "
              f"{row['p50_ms']:12.3f} {row['p99_ms']:12.3f}")


if __name__ == "__main__":
    main()
