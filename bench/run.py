"""`make bench`: pyproxy against nginx stream and HAProxy (mode tcp), with the same workers, in one run.

    python -m bench.run                     # the full comparison (about 9 minutes)
    python -m bench.run --quick             # one short round of everything (`make bench-smoke`)
    python -m bench.run --only keepalive --rounds 5
    python -m bench.run --only udp           # the UDP row alone (bench.udp)

It starts the upstreams (an nginx answering "ok" over HTTP and HTTPS, an iperf3 server, an idle holder)
and the three proxies in front of them, then runs each scenario in rounds, each round visiting every
target (direct, nginx, haproxy, pyproxy) in a rotated order, and keeps the median of each figure. The
table goes to the terminal; JSON, Markdown and a PNG chart go to the run's folder under
bench/results/, and a full run also copies them to bench/results/latest.*.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass

if __package__ in (None, ""):              # `python bench/run.py`: make `bench` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import configs, report, udp
from bench.configs import LOOPBACK, PROXIES, TARGETS, Layout
from bench.idle import IdleUpstream, measure_idle_memory
from bench.processes import Fleet, StartError, listening_ports, total_cpu_seconds, total_pss
from bench.report import Run
from bench.scenarios import SCENARIO_NAMES, SCENARIOS, Scenario
from bench.tools import ToolError, run_iperf3, run_wrk

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
WORKERS = 2                  # issue 4: the same worker count for every proxy, on this 2-core machine
UPSTREAM_WORKERS = 1         # nginx's `return 200` does ~100k req/s on one core: never the bottleneck
DEFAULT_BASE_PORT = 24000    # see bench.configs for the layout (base … base+33)
FRESH_LAYOUT_OFFSET = 100   # the fresh proxies of the idle-memory scenario listen from base+100 on
IDLE_SETTLE_MIN = 0.2       # seconds: even in --quick, let the proxy finish its accepts before weighing
KEEP_RUN_DIRS = 5            # older bench/results/run-* folders are removed
REQUIRED_TOOLS = ("nginx", "haproxy", "wrk", "iperf3", "openssl")
BYTES_PER_GB = 1e9
QUICK_IPERF_BYTES = 256 * 2**20   # --quick: a fraction of a second of bulk transfer is enough to prove it


@dataclass(frozen=True)
class Settings:
    """How long and how hard each measurement is."""

    rounds: int
    duration: int            # seconds per wrk or iperf3 run
    connections: int         # wrk connections (the issue: 50)
    threads: int             # wrk threads
    idle_connections: int    # sessions held open for the memory figure
    settle: float            # seconds of quiet between two measurements
    warmup: bool             # one short load on every target before measuring
    iperf_bytes: int = 0     # iperf3 sends this many bytes instead of running `duration` (0: use duration)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        if args.quick:
            base = cls(rounds=1, duration=1, connections=10, threads=2, idle_connections=200, settle=0.2,
                       warmup=False, iperf_bytes=QUICK_IPERF_BYTES)
        else:
            base = cls(rounds=3, duration=5, connections=50, threads=2, idle_connections=4000, settle=0.5,
                       warmup=True)
        return cls(rounds=args.rounds or base.rounds, duration=args.duration or base.duration,
                   connections=base.connections, threads=base.threads,
                   idle_connections=args.idle_connections or base.idle_connections,
                   settle=base.settle, warmup=base.warmup,
                   iperf_bytes=0 if args.duration else base.iperf_bytes)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke mode: one round, 1 s runs, few connections")
    parser.add_argument("--only", action="append", choices=(*SCENARIO_NAMES, "udp"), metavar="SCENARIO",
                        help=f"run only this scenario (repeatable): {', '.join(SCENARIO_NAMES)}, udp")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per scenario (default 3, quick 1)")
    parser.add_argument("--duration", type=int, help="seconds per wrk/iperf3 run (default 5, quick 1)")
    parser.add_argument("--idle-connections", type=int,
                        help="idle sessions for the memory figure (default 4000)")
    parser.add_argument("--base-port", type=int, default=DEFAULT_BASE_PORT, help="first port of the layout")
    parser.add_argument("--cert", choices=("ec", "rsa"), default="ec",
                        help="certificate key type for the TLS scenarios (default: ECDSA P-256)")
    return parser.parse_args(argv)


# --- the environment --------------------------------------------------------------------------------

def check_tools() -> None:
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if not os.path.exists(configs.NGINX_STREAM_MODULE):
        missing.append("libnginx-mod-stream")
    if missing:
        sys.exit(f"bench: missing {', '.join(missing)}: run `make bench` (bench/install.sh installs them)")


def tls_host() -> str:
    """The host for https URLs: `localhost` (so wrk sends an SNI) when it resolves to 127.0.0.1 first
    (wrk connects to the first address only), else the address itself."""
    try:
        first = socket.getaddrinfo("localhost", None, type=socket.SOCK_STREAM)[0][4][0]
    except OSError:
        return LOOPBACK
    return "localhost" if first == LOOPBACK else LOOPBACK


def _version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr) else "?"


def _host_congestion() -> str:
    try:
        with open("/proc/sys/net/ipv4/tcp_congestion_control") as current:
            return current.read().strip()
    except OSError:
        return "unknown"


def machine_info() -> dict:
    """What the figures depend on: the CPU, the kernel, and each program's version."""
    model = "?"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo
                          if line.startswith("model name")), "?")
    except OSError:
        pass
    os_name = "?"
    try:
        with open("/etc/os-release") as release:
            os_name = next((line.split("=", 1)[1].strip().strip('"') for line in release
                            if line.startswith("PRETTY_NAME=")), "?")
    except OSError:
        pass
    import pyproxy
    commit = _version(["git", "-C", REPO_DIR, "rev-parse", "--short", "HEAD"])
    changed = _version(["git", "-C", REPO_DIR, "status", "--porcelain", "--untracked-files=no", "pyproxy"])
    modified = ", pyproxy/ modified since" if changed != "?" else ""    # "?" = no output: clean
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory": f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
        "kernel": platform.release(),
        "os": os_name,
        "nginx": _version(["nginx", "-v"]),
        "haproxy": _version(["haproxy", "-v"]),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "pyproxy": f"{pyproxy.__version__} (commit {commit}{modified})",
        "openssl": _version(["openssl", "version"]),
        "wrk": _version(["wrk", "-v"]),
        "iperf3": _version(["iperf3", "--version"]),
        "load average at start": " ".join(f"{load:.2f}" for load in os.getloadavg()),
    }


def new_run_dir() -> str:
    """A fresh bench/results/run-YYYYmmdd-HHMMSS folder; the oldest beyond KEEP_RUN_DIRS are removed."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    previous = sorted(name for name in os.listdir(RESULTS_DIR) if name.startswith("run-"))
    for name in previous[:max(0, len(previous) - KEEP_RUN_DIRS + 1)]:
        shutil.rmtree(os.path.join(RESULTS_DIR, name), ignore_errors=True)
    folder = os.path.join(RESULTS_DIR, "run-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    os.makedirs(folder)
    return folder


# --- servers -----------------------------------------------------------------------------------------

def start_proxy(fleet: Fleet, name: str, kind: str, files: configs.ConfigFiles, layout: Layout,
                folder: str) -> None:
    """Start proxy `kind` ("nginx", "haproxy" or "pyproxy") from `files` as server `name`; return when
    it listens on all its ports with all its workers."""
    if kind == "nginx":
        fleet.start(name, ["nginx", "-p", folder, "-c", files.nginx,
                           "-e", os.path.join(folder, "nginx.error.log")])
    elif kind == "haproxy":
        fleet.start(name, ["haproxy", "-db", "-f", files.haproxy])
    else:
        fleet.start(name, [sys.executable, "-m", "pyproxy", "-c", files.pyproxy], cwd=REPO_DIR)
    front = layout.front(kind)
    processes = 1 if kind == "haproxy" else 1 + WORKERS      # HAProxy: one process, WORKERS threads
    fleet.wait_ready(name, [front.http, front.https, front.iperf, front.idle], processes=processes)


def start_servers(fleet: Fleet, files: configs.ConfigFiles, layout: Layout, run_dir: str) -> None:
    """Start the upstreams and the three proxies; return when all of them listen."""
    up = layout.upstream
    fleet.start("upstream-http", ["nginx", "-p", run_dir, "-c", files.upstream_nginx,
                                  "-e", os.path.join(run_dir, "upstream-http.error.log")])
    fleet.start("iperf3-server", ["iperf3", "-s", "-B", LOOPBACK, "-p", str(up.iperf)])
    fleet.wait_ready("upstream-http", [up.http, up.https], processes=1 + UPSTREAM_WORKERS)
    fleet.wait_ready("iperf3-server", [up.iperf])
    for name in PROXIES:
        start_proxy(fleet, name, name, files, layout, run_dir)


# --- one measurement ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class FreshProxies:
    """Where the idle-memory scenario starts a fresh proxy for each measurement: a second port layout
    with its own configurations, and the idle upstream its proxies forward to."""

    layout: Layout
    files: configs.ConfigFiles
    folder: str
    upstream: IdleUpstream


class Bench:
    """Runs measurements against the started servers."""

    def __init__(self, fleet: Fleet, layout: Layout, settings: Settings, fresh: FreshProxies | None):
        self.fleet = fleet
        self.layout = layout
        self.settings = settings
        self.fresh = fresh
        self.host = tls_host()

    def url(self, target: str, tls: bool) -> str:
        front = self.layout.front(target)
        return f"https://{self.host}:{front.https}/" if tls else f"http://{LOOPBACK}:{front.http}/"

    def measure(self, scenario: Scenario, target: str) -> dict[str, float]:
        """One run of `scenario` against `target`: its measures (see bench.scenarios.METRICS)."""
        if scenario.tool == "wrk":
            return self.wrk(scenario, target)
        if scenario.tool == "iperf3":
            return self.iperf3(scenario, target)
        return self.idle(target)

    def duration(self, scenario: Scenario) -> int:
        return max(1, round(self.settings.duration * scenario.duration_scale))

    def wrk(self, scenario: Scenario, target: str) -> dict[str, float]:
        server = self.fleet.servers.get(target)             # None for direct
        cpu_before = total_cpu_seconds(server.processes()) if server else 0.0
        result = run_wrk(self.url(target, scenario.tls),
                         connections=scenario.connections or self.settings.connections,
                         threads=scenario.threads or self.settings.threads,
                         duration=self.duration(scenario),
                         headers=["Connection: close"] if scenario.close else [])
        if result.requests == 0:
            raise ToolError(f"no request completed ({result.errors})")
        measures = {"rate": result.rate, "requests": result.requests, "errors": result.error_count,
                    "p50_ms": result.latency_ms["p50"], "p99_ms": result.latency_ms["p99"],
                    "mean_ms": result.latency_ms["mean"]}
        if server:
            # The proxy's own CPU per request: what it costs, whatever the other processes get.
            cpu = total_cpu_seconds(server.processes()) - cpu_before
            measures["cpu_us_per_request"] = cpu / result.requests * 1e6
        return measures

    def iperf3(self, scenario: Scenario, target: str) -> dict[str, float]:
        server = self.fleet.servers.get(target)
        cpu_before = total_cpu_seconds(server.processes()) if server else None
        result = run_iperf3(LOOPBACK, self.layout.front(target).iperf, streams=scenario.streams,
                            duration=self.duration(scenario), total_bytes=self.settings.iperf_bytes)
        measures = {"gbit_s": result.gbit_per_second, "bytes": result.bytes}
        if server:
            cpu = total_cpu_seconds(server.processes()) - cpu_before
            measures["cpu_s"] = cpu
            measures["cpu_s_per_gb"] = cpu / (result.bytes / BYTES_PER_GB)
        return measures

    def idle(self, target: str) -> dict[str, float]:
        """Weigh a freshly started `target` without and with N idle sessions. Fresh, because a process
        that has held that many sessions before keeps the freed memory and reuses it unseen."""
        fresh, name = self.fresh, f"{target}-fresh"
        start_proxy(self.fleet, name, target, fresh.files, fresh.layout, fresh.folder)
        try:
            memory = measure_idle_memory(self.fleet.servers[name].processes, fresh.upstream, LOOPBACK,
                                         fresh.layout.front(target).idle, self.settings.idle_connections,
                                         settle=max(self.settings.settle, IDLE_SETTLE_MIN))
        finally:
            self.fleet.stop(name)
        return {"kib_per_connection": memory.bytes_per_connection / 1024,
                "pss_before_mib": memory.pss_before / 2**20, "pss_after_mib": memory.pss_after / 2**20,
                "connections": memory.connections}

    def footprint(self, target: str) -> dict[str, float]:
        """The memory of the long-running `target` now, after the load scenarios."""
        return {"pss_mib": total_pss(self.fleet.servers[target].processes()) / 2**20}

    def tls_versions(self) -> str:
        """The TLS version each target negotiates with a default OpenSSL client (as wrk's): the
        handshake rows compare like with like only when it is the same everywhere."""
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.check_hostname = False
        client.verify_mode = ssl.CERT_NONE
        found = []
        for target in TARGETS:
            try:
                with (socket.create_connection((LOOPBACK, self.layout.front(target).https), timeout=5) as raw,
                      client.wrap_socket(raw, server_hostname=self.host) as tls):
                    found.append(f"{target} {tls.version()}")
            except (OSError, ssl.SSLError) as problem:
                found.append(f"{target} failed ({problem})")
        return ", ".join(found)

    def warm_up(self) -> None:
        """One second of kept-alive load, plain and TLS, on every target: first-use costs (imports,
        caches, page faults) land here rather than in the first measured round."""
        for target in TARGETS:
            for tls in (False, True):
                try:
                    run_wrk(self.url(target, tls), connections=self.settings.connections,
                            threads=self.settings.threads, duration=1)
                except ToolError as problem:
                    print(f"  warm-up {target} {'https' if tls else 'http'}: {problem}", flush=True)


def rotated(items: tuple[str, ...], shift: int) -> list[str]:
    """`items` starting at position `shift`: each round visits the targets in a different order, so
    that none is always measured first (or always right after the heaviest one)."""
    shift %= len(items)
    return list(items[shift:] + items[:shift])


def describe(scenario: Scenario, measures: dict[str, float]) -> str:
    if scenario.tool == "wrk":
        errors = f", {measures['errors']:.0f} errors" if measures["errors"] else ""
        return (f"{measures['rate']:>10,.0f}/s  p50 {measures['p50_ms']:.3f} ms  "
                f"p99 {measures['p99_ms']:.3f} ms{errors}")
    if scenario.tool == "iperf3":
        cpu = f"  {measures['cpu_s_per_gb']:.3f} CPU s/GB" if "cpu_s_per_gb" in measures else ""
        return f"{measures['gbit_s']:>10.2f} Gbit/s{cpu}"
    return (f"{measures['kib_per_connection']:>10.2f} KiB/connection  (PSS "
            f"{measures['pss_before_mib']:.1f} → "
            f"{measures['pss_after_mib']:.1f} MiB)")


def run_scenarios(bench: Bench, scenarios: list[Scenario], fleet: Fleet) -> list[Run]:
    """Every scenario, round after round, each round over every target in a rotated order."""
    runs: list[Run] = []
    plan = [(scenario, round_, target)
            for scenario in scenarios for round_ in range(bench.settings.rounds)
            for target in rotated(TARGETS, round_) if scenario.direct or target != "direct"]
    for number, (scenario, round_, target) in enumerate(plan, 1):
        label = f"[{number:>3}/{len(plan)}] {scenario.name:<13} round {round_ + 1}  {target:<8}"
        dead = fleet.check_alive()
        upstreams_dead = [name for name in dead if name not in PROXIES]
        if upstreams_dead:
            raise StartError(f"stopped: {', '.join(upstreams_dead)} exited during the run "
                             f"(see {', '.join(fleet.servers[name].log_path for name in upstreams_dead)})")
        try:
            if target in dead:
                raise ToolError(f"{target} has exited (see {fleet.servers[target].log_path})")
            measures = bench.measure(scenario, target)
        except (ToolError, TimeoutError, ConnectionError, OSError) as problem:
            text = str(problem).strip()
            first_line = text.splitlines()[0] if text else type(problem).__name__
            print(f"{label} FAILED: {first_line}", flush=True)
            runs.append(Run(scenario.name, round_, target, error=str(problem)))
        else:
            print(f"{label} {describe(scenario, measures)}", flush=True)
            runs.append(Run(scenario.name, round_, target, measures))
        time.sleep(bench.settings.settle)
    if any(scenario.tool != "idle" for scenario in scenarios):
        for target in PROXIES:
            if target not in fleet.check_alive():
                runs.append(Run("footprint", 0, target, bench.footprint(target)))
    return runs


# --- main --------------------------------------------------------------------------------------------

def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = Settings.from_args(args)
    scenarios = [scenario for scenario in SCENARIOS if not args.only or scenario.name in args.only]
    if args.only and not scenarios:          # --only udp
        return run_udp(args, settings, new_run_dir())
    check_tools()
    layout, fresh_layout = Layout(args.base_port), Layout(args.base_port + FRESH_LAYOUT_OFFSET)
    busy = sorted(set(layout.all_ports() + fresh_layout.all_ports()) & listening_ports())
    if busy:
        sys.exit(f"bench: ports {busy} are in use; pick another --base-port")
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)

    run_dir = new_run_dir()
    machine = machine_info()
    started = datetime.datetime.now().isoformat(timespec="seconds")
    print(f"bench: {len(scenarios)} scenario(s) × {settings.rounds} round(s) × {len(TARGETS)} targets, "
          f"{settings.duration} s each; servers and logs in {os.path.relpath(run_dir, REPO_DIR)}", flush=True)
    files = configs.write_configs(run_dir, layout, WORKERS, args.cert, UPSTREAM_WORKERS)
    began = time.monotonic()
    idle_upstream = fresh = None
    try:
        with Fleet(run_dir) as fleet:
            start_servers(fleet, files, layout, run_dir)
            if any(scenario.tool == "idle" for scenario in scenarios):
                fresh_dir = os.path.join(run_dir, "fresh")
                idle_upstream = IdleUpstream(LOOPBACK, fresh_layout.upstream.idle,
                                             backlog=configs.LISTEN_BACKLOG)
                fresh_files = configs.write_configs(fresh_dir, fresh_layout, WORKERS, args.cert)
                fresh = FreshProxies(fresh_layout, fresh_files, fresh_dir, idle_upstream)
            bench = Bench(fleet, layout, settings, fresh)
            tls_versions = bench.tls_versions()
            if settings.warmup:
                bench.warm_up()
            runs = run_scenarios(bench, scenarios, fleet)
    except StartError as problem:
        print(f"bench: {problem}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; every server it started has been stopped", file=sys.stderr)
        return 130
    finally:
        if idle_upstream is not None:
            idle_upstream.close()

    machine["load average at end"] = " ".join(f"{load:.2f}" for load in os.getloadavg())
    settings_info = {"started": started, "rounds": settings.rounds, "seconds per run": settings.duration,
                     "wrk": f"{settings.connections} connections, {settings.threads} threads",
                     "idle connections": settings.idle_connections, "workers per proxy": WORKERS,
                     "HTTP upstream workers": UPSTREAM_WORKERS, "certificate": args.cert,
                     "TLS negotiated": tls_versions,
                     "TCP congestion control": f"host default {_host_congestion()}; pyproxy's bulk service "
                                               f"{configs.BULK_CONGESTION or 'the host default'}",
                     "scenarios": ", ".join(scenario.name for scenario in scenarios),
                     "wall time": f"{time.monotonic() - began:.0f} s"}
    notes = [
        "direct = the client talks to the upstream itself (for TLS: the upstream nginx terminates TLS).",
        "nginx: stream module, `worker_processes 2`, `reuseport`; HAProxy: `mode tcp`, `nbthread 2`, "
        "`option splice-auto`; pyproxy: `worker_processes: 2`. All on 127.0.0.1 with the same upstreams.",
        "Bulk: pyproxy's iperf3 service sets `tcp_congestion: cubic` on its upstream connections (nginx "
        "and HAProxy have no such setting and use the host's default; see README, Performance).",
        "TLS: every endpoint offers TLS 1.2 and 1.3 (nginx 1.22 is told `ssl_protocols TLSv1.2 TLSv1.3`; "
        "by default it offers TLS 1.2 only, and its handshakes would be TLS 1.2 session resumptions, "
        "with no key exchange, against everyone else's TLS 1.3 ones). wrk resumes sessions, so the "
        "handshake row is TLS 1.3 resumption with a fresh X25519 exchange on every target.",
        "Load generators share the machine's 2 cores with the proxy and the upstream: the figures compare "
        "proxies with each other on this machine, not with what a proxy does on its own hardware.",
        "Proxy CPU rows: user+system seconds of all the proxy's processes during the run, per request; "
        "loopback TCP work done in the proxy's system calls is included, as it is for every proxy.",
        "Latency with one connection (its p99 above all) moves with anything else running on the machine; "
        "each round's figure is in the JSON (results[].runs).",
    ]
    failed = [run for run in runs if run.error]
    if failed:
        notes.append(f"{len(failed)} measurement(s) failed: "
                     + "; ".join(f"{run.scenario}/{run.target}: {run.error.splitlines()[0]}"
                                 for run in failed[:5]))
    rows = report.build_rows(runs)
    print()
    print(report.text_table(rows))
    verdicts = [row for row in rows if row.verdict]
    print(f"\ntargets met: {sum(row.verdict == 'PASS' for row in verdicts)} of {len(verdicts)}")

    outputs = {"json": "results.json", "md": "results.md", "png": "results.png"}
    paths = {kind: os.path.join(run_dir, name) for kind, name in outputs.items()}
    report.write_json(paths["json"], rows, runs, machine, settings_info, notes)
    with open(paths["md"], "w") as out:
        out.write(report.markdown_report(rows, machine, settings_info, notes))
    report.chart(rows, paths["png"], report.chart_subtitle(machine, settings_info))
    if not args.quick and not args.only:
        for kind, path in paths.items():
            shutil.copyfile(path, os.path.join(RESULTS_DIR, f"latest.{kind}"))
        print(f"results: bench/results/latest.{{json,md,png}} (and {os.path.relpath(run_dir, REPO_DIR)})")
    else:
        print(f"results: {os.path.relpath(run_dir, REPO_DIR)}/results.{{json,md,png}}")
    if not args.only or "udp" in args.only:
        return 1 if run_udp(args, settings, run_dir) or failed else 0
    return 1 if failed else 0


def run_udp(args: argparse.Namespace, settings: Settings, run_dir: str) -> int:
    """The UDP row, with its own servers and table (bench/udp.py); its JSON beside the run's."""
    return udp.main(["--rounds", str(settings.rounds), "--duration", str(settings.duration),
                     "--base-port", str(args.base_port + udp.BASE_OFFSET),
                     "--out", os.path.join(run_dir, "udp.json")])


if __name__ == "__main__":
    sys.exit(main())
