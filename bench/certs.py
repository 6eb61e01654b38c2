"""What certificates cost pyproxy: start, reload and memory with 1,000 and 10,000 of them.

    python -m bench.certs                          # 1,000 and 10,000 certificates (about 2 minutes)
    python -m bench.certs --certificates 1000

For each count it makes that many ECDSA P-256 certificates (one name each, `customerN.example.com`;
bench.configs.make_many_certificates), and a pyproxy configuration with 2 workers, one TLS listener,
one route (by port: routing is not what is measured) and the certificates under `certificates`.
Then, against a real pyproxy process:
  1. start: from exec to every worker listening; PSS of the master and of each worker, against the
     same configuration with no certificate (`per certificate` = the difference / the count);
  2. a reload that changes only the routes (one route added): the time from SIGHUP to the master's
     "reload complete", and how many TLS contexts it reused and built (its debug line);
  3. a reload after one certificate file was replaced by a new certificate: the same figures (one
     context built, the rest reused, is what `pyproxy/tls/contexts.py` promises);
  4. a handshake for a name of the last certificate, checking that it is served.
It also weighs one `ssl.SSLContext` with a certificate in this process (USS before and after making
the count's contexts), which is what each worker and the master hold per certificate.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time

import psutil

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.configs import LOOPBACK, Certificate, make_certificate, make_many_certificates
from bench.processes import Fleet

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COUNTS = [1_000, 10_000]
WORKERS = 2
PORT = 28900                 # the TLS listener (a port below the ephemeral range, unlikely to be taken)
UPSTREAM_PORT = 28901        # nothing listens there: no session is forwarded
TIMEOUT = 600.0              # seconds for a start or a reload with 10,000 certificates on a busy machine
SETTLE = 1.0                 # seconds before weighing: the workers finish their start-up
REUSED = re.compile(r"reused (\d+) TLS contexts, built (\d+)")


def config_text(folder: str, default: Certificate, certs: list[Certificate], names: list[tuple[str, ...]],
                extra_route: bool) -> str:
    certificates = "".join(f"  - {{cert: {c.cert}, key: {c.key}, snis: [{', '.join(n)}]}}\n"
                           for c, n in zip(certs, names, strict=True))
    extra = (f"      - {{name: extra, protocols: [tcp], destinations: [{{port: {PORT + 2}}}]}}\n"
             if extra_route else "")
    return f"""worker_processes: {WORKERS}
pid: {folder}/pyproxy.pid
error_log: {folder}/pyproxy.error.log
log_level: debug
access_log: off
stream_listen:
  - {LOOPBACK}:{PORT} ssl
  - {LOOPBACK}:{PORT + 2}
ssl:
  default_certificate: {{cert: {default.cert}, key: {default.key}}}
{"certificates:" if certs else ""}
{certificates}
services:
  - name: s
    host: {LOOPBACK}
    port: {UPSTREAM_PORT}
    routes:
      - {{name: tls, protocols: [tls], destinations: [{{port: {PORT}}}]}}
{extra}"""


def write(path: str, text: str) -> None:
    with open(path + ".new", "w") as out:
        out.write(text)
    os.replace(path + ".new", path)


def pss(processes: list[psutil.Process]) -> list[int]:
    return [process.memory_full_info().pss for process in processes]


def weigh(fleet: Fleet) -> tuple[int, int]:
    """(master PSS, the workers' PSS summed) of the running pyproxy, in bytes."""
    processes = fleet.servers["pyproxy"].processes()
    master, *workers = pss([processes[0]] + [p for p in processes[1:] if "worker" in " ".join(p.cmdline())])
    return master, sum(workers)


def start(fleet: Fleet, config: str) -> float:
    """Start pyproxy; seconds until every worker listens."""
    started = time.perf_counter()
    fleet.start("pyproxy", [sys.executable, "-m", "pyproxy", "-c", config], cwd=REPO_DIR)
    fleet.wait_ready("pyproxy", [PORT, PORT + 2], processes=1 + WORKERS, timeout=TIMEOUT)
    return time.perf_counter() - started


def reload(fleet: Fleet, log_path: str) -> tuple[float, int, int]:
    """SIGHUP; (seconds until "reload complete", contexts reused, contexts built)."""
    with open(log_path) as log:
        log.seek(0, os.SEEK_END)
        started = time.perf_counter()
        os.kill(fleet.servers["pyproxy"].pid, signal.SIGHUP)
        reused = built = -1
        text = ""
        while time.perf_counter() - started < TIMEOUT:
            text += log.read()
            found = REUSED.search(text)
            if found:
                reused, built = int(found.group(1)), int(found.group(2))
            if "reload complete" in text:
                return time.perf_counter() - started, reused, built
            if "reload failed" in text:
                raise RuntimeError(f"reload failed: {text[-2000:]}")
            time.sleep(0.005)
    raise TimeoutError(f"no reload complete within {TIMEOUT:.0f}s")


def check_served(name: str, cert: Certificate) -> None:
    """Make a handshake for `name`; raise unless the certificate served is `cert`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection((LOOPBACK, PORT), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=name) as tls:
        served = tls.getpeercert(binary_form=True)
    with open(cert.cert) as pem:
        if served != ssl.PEM_cert_to_DER_cert(pem.read()):
            raise RuntimeError(f"the certificate served for {name} is not {cert.cert}")


CONTEXT_COST = """
import ssl, sys, psutil
pairs = [line.split() for line in open(sys.argv[1])]
me = psutil.Process()
before = me.memory_full_info().uss
contexts = []
for cert, key in pairs:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    contexts.append(context)
print((me.memory_full_info().uss - before) / len(pairs))
"""


def context_cost(certs: list[Certificate], folder: str) -> float:
    """Bytes of USS one SSLContext with a certificate and its key adds to a fresh interpreter (this
    process's heap, with what it freed before, would hide part of it)."""
    listing = os.path.join(folder, "pairs.txt")
    with open(listing, "w") as out:
        out.writelines(f"{cert.cert} {cert.key}\n" for cert in certs)
    done = subprocess.run([sys.executable, "-c", CONTEXT_COST, listing], capture_output=True, text=True,
                          check=True)
    return float(done.stdout)


def measure(count: int, folder: str) -> dict[str, float]:
    made = time.perf_counter()
    many = make_many_certificates(os.path.join(folder, "certs"), count, 1)
    made = time.perf_counter() - made
    default = make_certificate(folder)
    certs, names = list(many.certs), list(many.names)
    config = os.path.join(folder, "pyproxy.conf")
    log_path = os.path.join(folder, "pyproxy.error.log")
    figures: dict[str, float] = {"certificates": count, "generate_s": made}
    with Fleet(folder) as fleet:
        write(config, config_text(folder, default, [], [], False))
        figures["start_none_s"] = start(fleet, config)
        time.sleep(SETTLE)
        figures["master_none"], figures["workers_none"] = weigh(fleet)
        fleet.stop("pyproxy")
        write(config, config_text(folder, default, certs, names, False))
        figures["start_s"] = start(fleet, config)
        time.sleep(SETTLE)
        figures["master"], figures["workers"] = weigh(fleet)
        check_served(names[-1][0], certs[-1])
        write(config, config_text(folder, default, certs, names, True))
        (figures["reload_routes_s"], figures["routes_reused"],
         figures["routes_built"]) = reload(fleet, log_path)
        time.sleep(SETTLE)
        replacement = make_many_certificates(os.path.join(folder, "new"), 1, 1)
        for kind in ("cert", "key"):
            shutil.copyfile(getattr(replacement.certs[0], kind), getattr(certs[0], kind))
        (figures["reload_cert_s"], figures["cert_reused"],
         figures["cert_built"]) = reload(fleet, log_path)
        time.sleep(SETTLE)
        figures["master_after"], figures["workers_after"] = weigh(fleet)
        check_served(names[0][0], certs[0])
    figures["context_bytes"] = context_cost(certs[:min(count, 1000)], folder)
    return figures


def report(figures: dict[str, float]) -> str:
    count = figures["certificates"]
    per = {side: (figures[side] - figures[f"{side}_none"]) / count for side in ("master", "workers")}
    kib, mib = 1024, 2**20
    return "\n".join([
        f"## {count:,.0f} certificates (made in {figures['generate_s']:.1f} s)",
        "",
        "| | without certificates | with them | per certificate |",
        "|---|---:|---:|---:|",
        f"| start, exec to every worker listening | {figures['start_none_s']:.2f} s "
        f"| {figures['start_s']:.2f} s "
        f"| {(figures['start_s'] - figures['start_none_s']) / count * 1e3:.2f} ms |",
        f"| master PSS | {figures['master_none'] / mib:.1f} MiB | {figures['master'] / mib:.1f} MiB "
        f"| {per['master'] / kib:.1f} KiB |",
        f"| {WORKERS} workers' PSS | {figures['workers_none'] / mib:.1f} MiB "
        f"| {figures['workers'] / mib:.1f} MiB "
        f"| {per['workers'] / kib:.1f} KiB ({per['workers'] / WORKERS / kib:.1f} a worker) |",
        "",
        f"- reload changing only the routes: {figures['reload_routes_s'] * 1e3:.0f} ms to "
        f"\"reload complete\", {figures['routes_reused']:.0f} TLS contexts reused, "
        f"{figures['routes_built']:.0f} built",
        f"- reload after one certificate changed: {figures['reload_cert_s'] * 1e3:.0f} ms, "
        f"{figures['cert_reused']:.0f} reused, {figures['cert_built']:.0f} built",
        f"- after the two reloads: master {figures['master_after'] / mib:.1f} MiB, workers "
        f"{figures['workers_after'] / mib:.1f} MiB",
        f"- one ssl.SSLContext with an ECDSA P-256 certificate and key, alone in a process: "
        f"{figures['context_bytes'] / kib:.1f} KiB (USS)",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.certs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--certificates", type=int, action="append", help=f"counts (default {COUNTS})")
    parser.add_argument("--keep", action="store_true", help="keep the certificates and logs (printed)")
    args = parser.parse_args(argv)
    for count in sorted(set(args.certificates or COUNTS)):
        folder = tempfile.mkdtemp(prefix=f"pyproxy-certs-{count}-")
        try:
            print(report(measure(count, folder)) + "\n", flush=True)
        finally:
            if args.keep:
                print(f"(files in {folder})")
            else:
                shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
