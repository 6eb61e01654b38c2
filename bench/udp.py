"""The UDP row: DNS-sized request/response datagrams through pyproxy and through nginx's UDP proxy.

    python -m bench.udp                      # 3 rounds of 5 s per target and mode
    python -m bench.udp --rounds 1 --duration 2

An nginx (stream module, one worker) answers every datagram with a 100-byte one (`return`: a C
upstream that is never the bottleneck). In front of it, nginx (`listen … udp reuseport`) and pyproxy
(`ADDR:PORT udp`), two workers each, access logs off, each with two listeners. Load generator
processes keep a window of queries of 40 bytes in flight, two ways:

- query: every query from a new socket (a new source port), to the listener with `proxy_responses
  1`: a session per query, as stub resolvers ask;
- flow: each socket sends its next query when the reply came, to the listener without
  `proxy_responses`: one long session per socket (the hot path);

and one socket with one query at a time measures the latency on both listeners (its p50 minus
direct's is the latency the proxy adds). Figures: datagrams answered per second, pyproxy/nginx, and
p50/p99 round trips.
`make bench` runs this row after the others (bench.run); its JSON goes in the run's folder as udp.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import select
import shutil
import socket
import statistics
import sys
import tempfile
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.configs import LOOPBACK, NGINX_STREAM_MODULE
from bench.processes import Fleet, StartError

BASE_OFFSET = 300              # from bench.run's base port: clear of its layouts (base…+33, +100…+133)
# The upstream on base; nginx on base+1 (query) and base+3 (flow), pyproxy on base+2 and base+4.
DEFAULT_BASE_PORT = 24000 + BASE_OFFSET
WORKERS = 2
GENERATORS = 2                 # load generator processes
WINDOW = 32                    # queries in flight per generator process
QUERY = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03www\x07example\x04test\x00\x00\x01\x00\x01"
QUERY = QUERY + b"\0" * (40 - len(QUERY))          # 40 bytes, a DNS query's size
ANSWER = "a" * 100                                 # what the upstream returns: a DNS answer's size
LOSS_TIMEOUT = 0.5             # seconds before a query without reply is counted lost and sent again
MODES = ("query", "flow")
TARGETS = ("direct", "nginx", "pyproxy")


def write_configs(folder: str, base: int) -> tuple[str, str, str]:
    module = f"load_module {NGINX_STREAM_MODULE};\n" if os.path.exists(NGINX_STREAM_MODULE) else ""
    upstream = os.path.join(folder, "upstream.conf")
    with open(upstream, "w") as fh:
        fh.write(f"""{module}daemon off; worker_processes 1; pid {folder}/upstream.pid;
error_log {folder}/upstream-error.log;
events {{ worker_connections 65536; }}
stream {{ access_log off; server {{ listen {LOOPBACK}:{base} udp; return "{ANSWER}"; }} }}
""")
    nginx = os.path.join(folder, "nginx.conf")
    with open(nginx, "w") as fh:
        fh.write(f"""{module}daemon off; worker_processes {WORKERS}; pid {folder}/nginx.pid;
error_log {folder}/nginx-error.log;
events {{ worker_connections 65536; }}
stream {{
    access_log off;
    server {{
        listen {LOOPBACK}:{base + 1} udp reuseport;
        proxy_pass {LOOPBACK}:{base};
        proxy_responses 1;
        proxy_timeout 10s;
    }}
    server {{
        listen {LOOPBACK}:{base + 3} udp reuseport;
        proxy_pass {LOOPBACK}:{base};
        proxy_timeout 10s;
    }}
}}
""")
    pyproxy = os.path.join(folder, "pyproxy.yml")
    with open(pyproxy, "w") as fh:
        fh.write(f"""worker_processes: {WORKERS}
worker_connections: 65536
pid: off
access_log: off
error_log: {folder}/pyproxy-error.log
stream_listen: [{LOOPBACK}:{base + 2} udp, {LOOPBACK}:{base + 4} udp]
services:
  - name: query
    protocol: udp
    host: {LOOPBACK}
    port: {base}
    read_timeout: 10s
    proxy_responses: 1
    routes:
      - name: query
        protocols: [udp]
        destinations: [{{port: {base + 2}}}]
  - name: flow
    protocol: udp
    host: {LOOPBACK}
    port: {base}
    read_timeout: 10s
    routes:
      - name: flow
        protocols: [udp]
        destinations: [{{port: {base + 4}}}]
""")
    return upstream, nginx, pyproxy


def wait_answering(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(0.2)
            sock.sendto(QUERY, (LOOPBACK, port))
            try:
                sock.recv(2048)
                return
            except TimeoutError:
                continue
    raise StartError(f"nothing answers UDP on port {port}")


def _fresh(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    sock.connect((LOOPBACK, port))
    return sock


def generate(port: int, mode: str, window: int, seconds: float, results) -> None:
    """One generator process: `window` sockets, one query each in flight, for `seconds`."""
    epoll = select.epoll()
    socks: dict[int, tuple[socket.socket, float]] = {}

    def launch(now: float) -> None:
        sock = _fresh(port)
        sock.send(QUERY)
        socks[sock.fileno()] = (sock, now)
        epoll.register(sock.fileno(), select.EPOLLIN)

    now = time.perf_counter()
    for _ in range(window):
        launch(now)
    answered = lost = 0
    rtts: list[float] = []
    end = now + seconds
    buf = bytearray(2048)
    while now < end:
        events = epoll.poll(0.05)
        now = time.perf_counter()
        for fd, _ in events:
            sock, sent = socks[fd]
            try:
                sock.recv_into(buf)
            except OSError:
                continue
            answered += 1
            rtts.append(now - sent)
            if mode == "flow":
                sock.send(QUERY)
                socks[fd] = (sock, now)
            else:
                epoll.unregister(fd)
                del socks[fd]
                sock.close()
                launch(now)
        for fd, (sock, sent) in list(socks.items()):
            if now - sent > LOSS_TIMEOUT:
                lost += 1
                epoll.unregister(fd)
                del socks[fd]
                sock.close()
                launch(now)
    for sock, _ in socks.values():
        sock.close()
    results.put((answered, lost, rtts[::max(1, len(rtts) // 20000)]))


def measure(port: int, mode: str, seconds: float, generators: int = GENERATORS,
            window: int = WINDOW) -> dict[str, float]:
    results: multiprocessing.Queue = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=generate, args=(port, mode, window, seconds, results))
             for _ in range(generators)]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=seconds + 30) for _ in procs]
    for proc in procs:
        proc.join(10)
    answered = sum(o[0] for o in outcomes)
    lost = sum(o[1] for o in outcomes)
    rtts = sorted(rtt for o in outcomes for rtt in o[2])
    return {"rate": answered / seconds, "lost": lost,
            "p50_ms": 1000 * statistics.median(rtts) if rtts else float("nan"),
            "p99_ms": 1000 * rtts[int(len(rtts) * 0.99)] if rtts else float("nan")}


def run(rounds: int, duration: float, base: int, folder: str) -> dict:
    """Every target, mode and round; the medians, and pyproxy's ratios to nginx."""
    upstream, nginx, pyproxy = write_configs(folder, base)
    ports = {("query", "direct"): base, ("query", "nginx"): base + 1, ("query", "pyproxy"): base + 2,
             ("flow", "direct"): base, ("flow", "nginx"): base + 3, ("flow", "pyproxy"): base + 4}
    raw: dict[str, list[dict[str, float]]] = {}
    with Fleet(folder) as fleet:
        fleet.start("udp-upstream", ["nginx", "-c", upstream, "-e", f"{folder}/upstream-error.log"])
        fleet.start("udp-nginx", ["nginx", "-c", nginx, "-e", f"{folder}/nginx-error.log"])
        fleet.start("udp-pyproxy", [sys.executable, "-m", "pyproxy", "-c", pyproxy])
        for port in set(ports.values()):
            wait_answering(port)
        for round_ in range(rounds):
            for target in TARGETS[round_ % 3:] + TARGETS[:round_ % 3]:
                for mode in MODES:
                    figures = measure(ports[mode, target], mode, duration)
                    raw.setdefault(f"{mode} {target}", []).append(figures)
                    print(f"udp {mode:<5} round {round_ + 1} {target:<8} {figures['rate']:>9.0f} dgram/s  "
                          f"p50 {figures['p50_ms']:.3f} ms  p99 {figures['p99_ms']:.3f} ms  "
                          f"lost {figures['lost']:.0f}", flush=True)
                for mode in MODES:
                    probe = measure(ports[mode, target], mode, duration / 2, generators=1, window=1)
                    raw.setdefault(f"latency {mode} {target}", []).append(probe)
                    print(f"udp latency {mode:<5} round {round_ + 1} {target:<8} "
                          f"p50 {probe['p50_ms']:.3f} ms  p99 {probe['p99_ms']:.3f} ms", flush=True)
    medians = {key: {name: statistics.median(run[name] for run in runs) for name in runs[0]}
               for key, runs in raw.items()}
    summary = {"medians": medians, "rounds": raw}
    for mode in MODES:
        pyproxy, nginx = medians[f"{mode} pyproxy"]["rate"], medians[f"{mode} nginx"]["rate"]
        summary[f"{mode} pyproxy/nginx"] = pyproxy / nginx
    for mode in MODES:
        for target in ("nginx", "pyproxy"):
            summary[f"added p50 ms {mode} {target}"] = (medians[f"latency {mode} {target}"]["p50_ms"]
                                                        - medians[f"latency {mode} direct"]["p50_ms"])
    return summary


def report(summary: dict) -> str:
    medians = summary["medians"]
    lines = ["UDP, DNS-sized datagrams (40-byte query, 100-byte answer), medians:",
             f"{'':<30}{'direct':>12}{'nginx':>12}{'pyproxy':>12}{'pyproxy/nginx':>16}"]
    for mode in MODES:
        rates = [medians[f"{mode} {target}"]["rate"] for target in TARGETS]
        lines.append(f"{mode + ' (dgram/s)':<30}" + "".join(f"{rate:>12.0f}" for rate in rates)
                     + f"{summary[f'{mode} pyproxy/nginx']:>15.2f}x")
    for mode in MODES:
        p50s = [medians[f"latency {mode} {target}"]["p50_ms"] for target in TARGETS]
        lines.append(f"{mode + ' p50, 1 at a time (ms)':<30}" + "".join(f"{p50:>12.3f}" for p50 in p50s))
        lines.append(f"{mode + ' added p50 (ms)':<30}{'':>12}{summary[f'added p50 ms {mode} nginx']:>12.3f}"
                     f"{summary[f'added p50 ms {mode} pyproxy']:>12.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.udp", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--base-port", type=int, default=DEFAULT_BASE_PORT)
    parser.add_argument("--out", help="write the JSON here")
    args = parser.parse_args(argv)
    if shutil.which("nginx") is None:
        sys.exit("bench.udp: nginx is needed (apt-get install nginx libnginx-mod-stream)")
    folder = tempfile.mkdtemp(prefix="bench-udp-")
    try:
        summary = run(args.rounds, args.duration, args.base_port, folder)
    except StartError as problem:
        print(f"bench.udp: {problem}", file=sys.stderr)
        return 1
    print(report(summary))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(summary, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
