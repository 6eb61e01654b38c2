"""The Admin API flooded while the proxy serves: the kept-alive rate with and without (issue 18).

    python -m bench.admin_flood [--duration 5] [--rounds 3] [--clients 8] [--base 23000]

An nginx upstream answering "ok" (bench.configs), pyproxy (2 workers) in front of it with
`admin_listen`, and wrk over kept-alive connections through it. Each round measures wrk alone, then
wrk while CLIENTS threads send the Admin API requests back to back, in two floods: `GET /services`
(answered 200 from the state) and malformed JSON bodies (Kong's 400; nothing written, no reload).
Prints each round's rates and the admin requests answered per second; the medians go in
docs/kong.md. Not part of `make test` or `make bench`.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import threading
import time

from bench.configs import LOOPBACK, Layout, make_certificate, nginx_upstream_conf
from bench.processes import Fleet
from bench.tools import run_wrk

FLOODS = {
    "GET": b"GET /services HTTP/1.1\r\nHost: admin\r\n\r\n",
    "bad JSON": b"POST /services HTTP/1.1\r\nHost: admin\r\nContent-Type: application/json\r\n"
                b"Content-Length: 9\r\n\r\n{not json",
}


def flood(port: int, request: bytes, stop: threading.Event, answered: list[int]) -> None:
    """One client: a request per connection (the Admin API closes each), as fast as answered. Niced
    (this thread only, on Linux): a flooding client is elsewhere, its CPU is not the proxy's."""
    os.nice(19)
    count = 0
    while not stop.is_set():
        try:
            with socket.create_connection((LOOPBACK, port), timeout=5) as sock:
                sock.sendall(request)
                while sock.recv(65536):
                    pass
            count += 1
        except OSError:
            time.sleep(0.01)
    answered.append(count)


def measure(url: str, admin: int, request: bytes | None, clients: int, duration: int) -> tuple[float, float]:
    """(wrk's kept-alive requests/s, admin requests answered/s) with `clients` flooding `request`."""
    stop, answered = threading.Event(), []
    threads = [threading.Thread(target=flood, args=(admin, request, stop, answered))
               for _ in range(clients if request is not None else 0)]
    for thread in threads:
        thread.start()
    try:
        result = run_wrk(url, connections=50, threads=2, duration=duration)
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    return result.requests / result.duration_s, sum(answered) / duration


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds of wrk per measure")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8, help="admin clients flooding at once")
    parser.add_argument("--base", type=int, default=23000, help="first port of bench.configs' layout")
    args = parser.parse_args()
    layout = Layout(args.base)
    front, admin = layout.front("pyproxy").http, layout.front("pyproxy").idle
    with tempfile.TemporaryDirectory(prefix="pyproxy-admin-flood-") as folder, Fleet(folder) as fleet:
        cert = make_certificate(folder)
        upstream = os.path.join(folder, "upstream.conf")
        with open(upstream, "w") as out:
            out.write(nginx_upstream_conf(folder, layout, cert, 1))
        conf = os.path.join(folder, "pyproxy.conf")
        with open(conf, "w") as out:
            out.write(f"worker_processes: 2\nerror_log: {folder}/pyproxy.error.log\naccess_log: off\n"
                      f"pid: {folder}/pyproxy.pid\nstream_listen: [{LOOPBACK}:{front}]\n"
                      f"admin_listen: {LOOPBACK}:{admin}\nservices:\n- name: http\n  host: {LOOPBACK}\n"
                      f"  port: {layout.upstream.http}\n"
                      f"  routes: [{{name: http, destinations: [{{port: {front}}}]}}]\n")
        fleet.start("upstream", ["nginx", "-p", folder, "-c", upstream, "-e", f"{folder}/upstream.error.log"])
        fleet.start("pyproxy", [sys.executable, "-m", "pyproxy", "-c", conf])
        fleet.wait_ready("upstream", [layout.upstream.http])
        fleet.wait_ready("pyproxy", [front, admin], processes=4)
        url = f"http://{LOOPBACK}:{front}/"
        rates: dict[str, list[float]] = {"alone": [], **{name: [] for name in FLOODS}}
        for round_number in range(1, args.rounds + 1):
            for name, request in [("alone", None), *FLOODS.items()]:
                rate, admin_rate = measure(url, admin, request, args.clients, args.duration)
                rates[name].append(rate)
                print(f"round {round_number}: {name:9} {rate:9.0f} req/s kept-alive"
                      + (f", admin answered {admin_rate:6.0f}/s" if request is not None else ""), flush=True)
        base = statistics.median(rates["alone"])
        for name, values in rates.items():
            median = statistics.median(values)
            print(f"median {name:9} {median:9.0f} req/s ({median / base:.2f}x alone; rounds: "
                  f"{', '.join(f'{v:.0f}' for v in values)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
