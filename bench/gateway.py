"""What the Gateway API source costs: translating many objects, and a manifest change reaching traffic.

    python -m bench.gateway                      # 1,000 TLSRoutes with 1,000 Secrets; about a minute
    python -m bench.gateway --routes 100 --switches 5

1. **Translation**: N TLSRoutes, each attached by `sectionName` to its own Terminate listener
   (hostname `rN.bench.example`, Gateways of 63 listeners, the CRD allows 64), each listener with its
   own Secret (its own certificate), one Service with an EndpointSlice. Timed (best of `--repeats`):
   `translate_paths` alone (read the files, parse, check each Secret's key pair, attach, status), from
   cold; `load_config` of a file whose `gateway` key names them, as the loader child runs it
   (translation, PEM files written, validation) at a start (cold: nothing parsed or checked yet) and
   at a reload after a route file changed (the other files' documents come from the parse cache,
   the key pairs checked at the start are not checked again).
   The issue's target: under 2 s for 1,000 routes with 1,000 Secrets.
2. **Change to serving**: a real pyproxy (2 workers) serving those manifests plus a Gateway with a TCP
   listener whose TCPRoute sends sessions to Service `one`. The route's file is replaced (an atomic
   rename, as `kubectl`/ConfigMap mounts do) by one naming Service `two`, and a client opens a new
   session every 5 ms until one reaches `two` (each backend says its name first). The figure is the
   time from the rename to that session, for `--switches` switches back and forth: median and max.
   The issue's target: under 1 s.

Only loopback, ports from `--base-port` (below 32768); every process started is stopped by pid.
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import yaml

from bench.processes import Fleet

LISTENERS_PER_GATEWAY = 63
TLS_PORT_OFFSET = 0          # the Terminate listeners' port: base
TCP_PORT_OFFSET = 1          # the switched TCP listener: base + 1
BACKEND_OFFSETS = (2, 3)     # the two tagging backends `one` and `two`
STATUS_OFFSET = 4
SESSION_EVERY = 0.005        # seconds between two probe sessions while waiting for the switch
SWITCH_TIMEOUT = 10.0
REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def certificates(names: list[str], folder: str) -> dict[str, tuple[bytes, bytes]]:
    """A self-signed certificate per name (one EC P-256 key shared: generating 1,000 keys would time
    OpenSSL, not pyproxy), made by the openssl command, several at once."""
    key_path = os.path.join(folder, "key.pem")
    subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key_path],
                   check=True, capture_output=True)

    def one(name: str) -> tuple[str, bytes]:
        out = os.path.join(folder, f"{name}.crt")
        subprocess.run(["openssl", "req", "-x509", "-new", "-key", key_path, "-days", "30", "-subj",
                        f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}", "-out", out],
                       check=True, capture_output=True)
        with open(out, "rb") as file:
            return name, file.read()

    with open(key_path, "rb") as file:
        key = file.read()
    with ThreadPoolExecutor(max_workers=4) as pool:
        return {name: (certificate, key) for name, certificate in pool.map(one, names)}


def manifests(routes: int, port: int, folder: str) -> None:
    """The N-route manifests (module docstring, 1.) as three files in `folder`; their backend is
    Service `one` (services())."""
    names = [f"r{index}.bench.example" for index in range(routes)]
    pairs = certificates(names, tempfile.mkdtemp(dir=folder, prefix="certs-"))
    documents: list[dict] = [{"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
                              "metadata": {"name": "pyproxy"},
                              "spec": {"controllerName": "gateway.pyproxy.dev/controller"}}]
    for first in range(0, routes, LISTENERS_PER_GATEWAY):
        documents.append({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": f"gw{first // LISTENERS_PER_GATEWAY}", "namespace": "bench"},
            "spec": {"gatewayClassName": "pyproxy", "listeners": [
                {"name": f"l{index}", "port": port, "protocol": "TLS", "hostname": names[index],
                 "tls": {"mode": "Terminate", "certificateRefs": [{"name": f"s{index}"}]}}
                for index in range(first, min(first + LISTENERS_PER_GATEWAY, routes))]}})
    secrets = [{"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                "metadata": {"name": f"s{index}", "namespace": "bench"},
                "data": {"tls.crt": base64.b64encode(pairs[name][0]).decode(),
                         "tls.key": base64.b64encode(pairs[name][1]).decode()}}
               for index, name in enumerate(names)]
    tls_routes = [{"apiVersion": "gateway.networking.k8s.io/v1alpha2", "kind": "TLSRoute",
                   "metadata": {"name": f"route{index}", "namespace": "bench"},
                   "spec": {"parentRefs": [{"name": f"gw{index // LISTENERS_PER_GATEWAY}",
                                            "sectionName": f"l{index}"}],
                            "hostnames": [name],
                            "rules": [{"backendRefs": [{"name": "one", "port": 1025}]}]}}
                  for index, name in enumerate(names)]
    write(os.path.join(folder, "gateways.yaml"), documents)
    write(os.path.join(folder, "secrets.yaml"), secrets)
    write(os.path.join(folder, "routes.yaml"), tls_routes)


def services(one: int, two: int) -> list[dict]:
    """Services `one` and `two` (port 1025) pointing at loopback ports by a hand-written EndpointSlice."""
    documents: list[dict] = []
    for name, port in (("one", one), ("two", two)):
        documents.append({"apiVersion": "v1", "kind": "Service",
                          "metadata": {"name": name, "namespace": "bench"},
                          "spec": {"ports": [{"name": "tcp", "port": 1025, "protocol": "TCP"}]}})
        documents.append({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                          "metadata": {"name": f"{name}-loopback", "namespace": "bench",
                                       "labels": {"kubernetes.io/service-name": name}},
                          "addressType": "IPv4", "ports": [{"name": "tcp", "port": port, "protocol": "TCP"}],
                          "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}]})
    return documents


def switched(port: int, backend: str) -> list[dict]:
    """A Gateway with one TCP listener and the TCPRoute that sends it to `backend`."""
    return [{"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
             "metadata": {"name": "switch", "namespace": "bench"},
             "spec": {"gatewayClassName": "pyproxy",
                      "listeners": [{"name": "tcp", "port": port, "protocol": "TCP"}]}},
            {"apiVersion": "gateway.networking.k8s.io/v1alpha2", "kind": "TCPRoute",
             "metadata": {"name": "switched", "namespace": "bench"},
             "spec": {"parentRefs": [{"name": "switch", "sectionName": "tcp"}],
                      "rules": [{"backendRefs": [{"name": backend, "port": 1025}]}]}}]


def write(path: str, documents: list[dict]) -> None:
    """Write atomically: a reader sees the old file or the new one, never half of it."""
    temporary = f"{path}.tmp"
    with open(temporary, "w") as file:
        yaml.safe_dump_all(documents, file, sort_keys=False)
    os.replace(temporary, path)


def best_of(repeats: int, run) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def reached(port: int) -> bytes:
    """The name of the backend a new session on `port` reaches (b"" when none answers)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as client:
            return client.recv(64).strip()
    except OSError:
        return b""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--routes", type=int, default=1000, help="TLSRoutes (and Secrets); default 1000")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of the translation; best kept")
    parser.add_argument("--switches", type=int, default=7, help="route changes timed; default 7")
    parser.add_argument("--base-port", type=int, default=21400, help="first of the 5 ports used")
    args = parser.parse_args()

    from pyproxy.config import load_config
    from pyproxy.config.tlsfiles import _USABLE_PAIRS
    from pyproxy.gateway import translate_paths
    from pyproxy.gateway.source import PARSED
    from pyproxy.gateway.translate import Options

    base = args.base_port
    folder = tempfile.mkdtemp(prefix="pyproxy-bench-gateway-")
    try:
        manifest_dir = os.path.join(folder, "manifests")
        os.mkdir(manifest_dir)
        print(f"making {args.routes} certificates and manifests...", flush=True)
        one_port, two_port = (base + offset for offset in BACKEND_OFFSETS)
        manifests(args.routes, base + TLS_PORT_OFFSET, manifest_dir)
        write(os.path.join(manifest_dir, "services.yaml"), services(one_port, two_port))
        route_file = os.path.join(manifest_dir, "switched.yaml")
        write(route_file, switched(base + TCP_PORT_OFFSET, "one"))
        conf = os.path.join(folder, "pyproxy.conf")
        with open(conf, "w") as file:
            file.write(f"worker_processes: 2\npid: {folder}/pyproxy.pid\nerror_log: {folder}/error.log\n"
                       f"access_log: off\nlog_level: notice\n"
                       f"status_listen: 127.0.0.1:{base + STATUS_OFFSET}\n"
                       f"gateway:\n  paths: [{manifest_dir}]\n  address: 127.0.0.1\n"
                       f"  runtime_dir: {folder}/run\n")

        options = Options(addresses=("127.0.0.1",), runtime_dir=os.path.join(folder, "run-translate"))
        parsed = os.path.join(folder, "run", PARSED)

        def cold() -> None:
            """As at a start: no key pair checked yet, no manifest file parsed yet."""
            _USABLE_PAIRS.clear()
            if os.path.exists(parsed):
                os.unlink(parsed)

        def cold_translation() -> None:
            cold()
            translate_paths([manifest_dir], options)

        def cold_load() -> None:
            cold()
            load_config(conf)

        translate = best_of(args.repeats, cold_translation)
        started = best_of(args.repeats, cold_load)
        load_config(conf)
        route_changed = best_of(args.repeats, lambda: (os.utime(route_file), load_config(conf)))
        print(f"translate_paths, {args.routes} TLSRoutes + {args.routes} Secrets: {translate * 1000:.0f} ms")
        print(f"load_config at a start:                               {started * 1000:.0f} ms")
        print(f"load_config at a reload after a route changed:        {route_changed * 1000:.0f} ms")

        with Fleet(folder) as fleet:
            # Each backend says its name to every session and closes it (bench.tlsload's tag server).
            for name, port in (("one", one_port), ("two", two_port)):
                fleet.start(f"tag-{name}", [sys.executable, "-m", "bench.tlsload", "tag", str(port), name],
                            cwd=REPO_DIR)
                fleet.wait_ready(f"tag-{name}", [port])
            fleet.start("pyproxy", [sys.executable, "-m", "pyproxy", "-c", conf])
            fleet.wait_ready("pyproxy", [base + TCP_PORT_OFFSET, base + TLS_PORT_OFFSET], processes=3,
                             timeout=60)
            if reached(base + TCP_PORT_OFFSET) != b"one":
                raise SystemExit("the switched listener does not reach backend one")
            delays = []
            for number in range(args.switches):
                target = "two" if number % 2 == 0 else "one"
                time.sleep(0.6)           # past the coalescing window of the last reload
                write(route_file, switched(base + TCP_PORT_OFFSET, target))
                changed_at = time.perf_counter()
                while reached(base + TCP_PORT_OFFSET) != target.encode():
                    if time.perf_counter() - changed_at > SWITCH_TIMEOUT:
                        raise SystemExit(f"no session reached {target} within {SWITCH_TIMEOUT:.0f} s")
                    time.sleep(SESSION_EVERY)
                delays.append(time.perf_counter() - changed_at)
        print(f"manifest change to serving ({args.switches} switches, {args.routes} TLSRoutes also served): "
              f"median {statistics.median(delays) * 1000:.0f} ms, max {max(delays) * 1000:.0f} ms")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
