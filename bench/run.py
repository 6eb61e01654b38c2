"""`make bench`: pyproxy against nginx stream and HAProxy (mode tcp), with the same workers, in one run.

    python -m bench.run                     # the full comparison (about 16 minutes)
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
import glob
import json
import os
import platform
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

if __package__ in (None, ""):              # `python bench/run.py`: make `bench` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import configs, report, udp
from bench.configs import LOOPBACK, PROXIES, TARGETS, Layout
from bench.idle import IdleUpstreamProcess, measure_idle_memory
from bench.processes import Fleet, StartError, listening_ports, total_cpu_seconds, total_pss
from bench.report import Run
from bench.scenarios import SCENARIO_NAMES, SCENARIOS, Scenario
from bench.tools import TOOL_GRACE, ToolError, run_iperf3, run_pgbench, run_redis_benchmark, run_wrk

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
REDIS_REQUESTS = 2_000_000       # per redis-benchmark test (SET, GET): a few seconds each through a proxy
QUICK_REDIS_REQUESTS = 100_000
QUICK_IDLE_PER_WORKER = 1000     # --quick: idle-memory-9k holds this many a worker
PG_USER = "bench"                # the PostgreSQL role initdb makes (trust authentication, loopback only)
PG_DATABASE = "postgres"
PG_SCALE = 10                    # pgbench -i -s: 1,000,000 accounts, 13 MiB in shared buffers
UNPRIVILEGED = ("nobody", "nogroup")   # PostgreSQL refuses to run as root
SNI_CLIENT_PROCESSES = 4         # bench.tlsload handshakes: concurrent blocking clients
RELOAD_TIMEOUT = 30.0            # seconds for a reloaded proxy to answer from its new configuration
RELOAD_SETTLE = 0.5              # seconds between two reloads: more than pyproxy's reload_coalesce


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
    redis_requests: int = REDIS_REQUESTS
    idle_per_worker: int | None = None    # None: each scenario's own (idle-memory-9k: 9,000)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        if args.quick:
            base = cls(rounds=1, duration=1, connections=10, threads=2, idle_connections=200, settle=0.2,
                       warmup=False, iperf_bytes=QUICK_IPERF_BYTES, redis_requests=QUICK_REDIS_REQUESTS,
                       idle_per_worker=QUICK_IDLE_PER_WORKER)
        else:
            base = cls(rounds=3, duration=5, connections=50, threads=2, idle_connections=4000, settle=0.5,
                       warmup=True)
        return cls(rounds=args.rounds or base.rounds, duration=args.duration or base.duration,
                   connections=base.connections, threads=base.threads,
                   idle_connections=args.idle_connections or base.idle_connections,
                   settle=base.settle, warmup=base.warmup,
                   iperf_bytes=0 if args.duration else base.iperf_bytes,
                   redis_requests=base.redis_requests, idle_per_worker=base.idle_per_worker)


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

def postgres_bin() -> str | None:
    """Debian's PostgreSQL server programs (the newest version installed), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda path: int(path.split("/")[4]) if path.split("/")[4].isdigit() else 0)
    return os.path.dirname(found[-1]) if found else None


def check_tools(scenarios: list[Scenario]) -> None:
    tools = list(REQUIRED_TOOLS)
    tools += ["redis-server", "redis-benchmark"] if any(s.tool == "redis" for s in scenarios) else []
    tools += ["pgbench"] if any(s.tool == "pgbench" for s in scenarios) else []
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if not os.path.exists(configs.NGINX_STREAM_MODULE):
        missing.append("libnginx-mod-stream")
    if any(s.tool == "pgbench" for s in scenarios) and postgres_bin() is None:
        missing.append("postgresql")
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

def launch_proxy(fleet: Fleet, name: str, kind: str, config: str, folder: str, ports: list[int]) -> None:
    """Start proxy `kind` ("nginx", "haproxy" or "pyproxy") from the file `config` as server `name`;
    return when it listens on `ports` with all its workers."""
    if kind == "nginx":
        fleet.start(name, ["nginx", "-p", folder, "-c", config,
                           "-e", os.path.join(folder, f"{name}.error.log")])
    elif kind == "haproxy":
        fleet.start(name, ["haproxy", "-db", "-f", config])
    else:
        fleet.start(name, [sys.executable, "-m", "pyproxy", "-c", config], cwd=REPO_DIR)
    processes = 1 if kind == "haproxy" else 1 + WORKERS      # HAProxy: one process, WORKERS threads
    fleet.wait_ready(name, ports, processes=processes)


def start_proxy(fleet: Fleet, name: str, kind: str, files: configs.ConfigFiles, layout: Layout,
                folder: str) -> None:
    """Start proxy `kind` from `files` as server `name`, listening on all the ports of the layout's
    long-running proxies."""
    config = {"nginx": files.nginx, "haproxy": files.haproxy, "pyproxy": files.pyproxy}[kind]
    launch_proxy(fleet, name, kind, config, folder, layout.front(kind).main())


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

def start_redis(fleet: Fleet, port: int, folder: str) -> None:
    """redis-server on 127.0.0.1:`port`, nothing persisted."""
    fleet.start("redis-server", ["redis-server", "--bind", LOOPBACK, "--port", str(port), "--save", "",
                                 "--appendonly", "no", "--protected-mode", "no", "--dir", folder])
    fleet.wait_ready("redis-server", [port])


def start_postgres(fleet: Fleet, port: int) -> str:
    """A PostgreSQL cluster of its own in a temporary folder (returned: remove it after the run), run
    as an unprivileged user when this is root, loaded with `pgbench -i`."""
    bindir = postgres_bin()
    assert bindir is not None, "check_tools makes sure PostgreSQL is installed"
    data = tempfile.mkdtemp(prefix="pyproxy-bench-pg-")
    as_user: list[str] = []
    if os.geteuid() == 0:
        import grp
        import pwd
        uid, gid = pwd.getpwnam(UNPRIVILEGED[0]).pw_uid, grp.getgrnam(UNPRIVILEGED[1]).gr_gid
        os.chown(data, uid, gid)
        as_user = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
    try:
        subprocess.run([*as_user, os.path.join(bindir, "initdb"), "-D", data, "-U", PG_USER, "--auth=trust",
                        "-E", "UTF8", "--no-sync"], check=True, capture_output=True, timeout=120, cwd=data)
    except subprocess.CalledProcessError as failed:
        raise StartError(f"initdb failed: {failed.stderr.decode(errors='replace')[-1000:]}") from None
    fleet.start("postgres", [*as_user, os.path.join(bindir, "postgres"), "-D", data, "-p", str(port),
                             "-k", data, "-c", f"listen_addresses={LOOPBACK}", "-c", "fsync=off",
                             "-c", "synchronous_commit=off", "-c", "max_connections=100"], cwd=data)
    fleet.wait_ready("postgres", [port])
    done = subprocess.run(["pgbench", "-i", "-q", "-s", str(PG_SCALE), "-h", LOOPBACK, "-p", str(port),
                           "-U", PG_USER, PG_DATABASE], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise StartError(f"pgbench -i failed: {done.stderr[-1000:]}")
    return data


@dataclass(frozen=True)
class FreshProxies:
    """The idle-memory scenarios start a fresh proxy for each measurement: a second port layout
    with its own configurations (`large`: nginx with worker_connections for 9,000 sessions a
    worker), and the idle upstream its proxies forward to."""

    layout: Layout
    files: configs.ConfigFiles
    large: configs.ConfigFiles
    folder: str
    upstream: IdleUpstreamProcess


@dataclass
class Extras:
    """What some scenarios need beyond the long-running proxies, started when first needed."""

    folder: str
    cert: configs.Certificate
    started: set[str] = field(default_factory=set)          # upstreams started: "redis", "postgres"...
    temporary: list[str] = field(default_factory=list)      # folders to remove at the end
    sni: dict[str, str] = field(default_factory=dict)        # bench.configs.write_sni_configs's paths
    reload_state: dict[str, tuple[int, str]] = field(default_factory=dict)   # proxy → (routes, letter)


class Bench:
    """Runs measurements against the started servers."""

    def __init__(self, fleet: Fleet, layout: Layout, settings: Settings, fresh: FreshProxies | None,
                 extras: Extras | None = None):
        self.fleet = fleet
        self.layout = layout
        self.settings = settings
        self.fresh = fresh
        self.extras = extras
        self.host = tls_host()

    # -- what a scenario needs started, and stopped after it ------------------------------------------

    def prepare(self, scenario: Scenario) -> None:
        """Start what `scenario` needs that is not running yet."""
        up, extras = self.layout.upstream, self.extras
        assert extras is not None, "main() gives the Bench its Extras (bench.profile runs wrk scenarios only)"
        if scenario.tool == "redis" and "redis" not in extras.started:
            start_redis(self.fleet, up.redis, extras.folder)
            extras.started.add("redis")
        elif scenario.tool == "pgbench" and "postgres" not in extras.started:
            extras.started.add("postgres")
            extras.temporary.append(start_postgres(self.fleet, up.postgres))
        elif scenario.tool == "tlsbulk" and "sink" not in extras.started:
            self.fleet.start("sink", [sys.executable, "-m", "bench.tlsload", "sink", str(up.tls_bulk)],
                             cwd=REPO_DIR)
            self.fleet.wait_ready("sink", [up.tls_bulk])
            extras.started.add("sink")
        elif scenario.tool == "tlssni":
            if not extras.sni:
                extras.sni = configs.write_sni_configs(os.path.join(extras.folder, "sni"), self.layout,
                                                       extras.cert, WORKERS)
            for kind in PROXIES:
                launch_proxy(self.fleet, f"{kind}-sni", kind, extras.sni[kind],
                             os.path.dirname(extras.sni[kind]), [self.layout.front(kind).sni])
        elif scenario.tool == "reload":
            for letter, port in (("A", up.sni), ("B", up.reload)):
                if f"tag-{letter}" not in self.fleet.servers:
                    self.fleet.start(f"tag-{letter}", [sys.executable, "-m", "bench.tlsload", "tag",
                                                       str(port), letter], cwd=REPO_DIR)
                    self.fleet.wait_ready(f"tag-{letter}", [port])
            for kind in scenario.targets or PROXIES:
                path = self.write_reload_config(kind, configs.SNI_ROUTES, "A")
                front = self.layout.front(kind)
                launch_proxy(self.fleet, f"{kind}-reload", kind, path, os.path.dirname(path),
                             [front.reload, front.reload_tls])

    def finish(self, scenario: Scenario) -> None:
        """Stop the proxies started for `scenario` alone."""
        suffix = {"tlssni": "-sni", "reload": "-reload"}.get(scenario.tool)
        if suffix:
            for name in [name for name in self.fleet.servers if name.endswith(suffix)]:
                self.fleet.stop(name)

    def server_name(self, scenario: Scenario, target: str) -> str | None:
        """The fleet's name for the server that `scenario` measures as `target` (None: direct)."""
        if target == "direct":
            return None
        return target + {"tlssni": "-sni", "reload": "-reload"}.get(scenario.tool, "")

    def url(self, target: str, tls: bool) -> str:
        front = self.layout.front(target)
        return f"https://{self.host}:{front.https}/" if tls else f"http://{LOOPBACK}:{front.http}/"

    def measure(self, scenario: Scenario, target: str) -> dict[str, float]:
        """One run of `scenario` against `target`: its measures (see bench.scenarios.METRICS)."""
        if scenario.tool == "wrk":
            return self.wrk(scenario, target)
        if scenario.tool == "iperf3":
            return self.iperf3(scenario, target)
        if scenario.tool == "tlsbulk":
            return self.tls_bulk(scenario, target)
        if scenario.tool in ("redis", "pgbench"):
            return self.database(scenario, target)
        if scenario.tool == "tlssni":
            return self.tls_sni(scenario, target)
        if scenario.tool == "reload":
            return self.reload(target)
        return self.idle(scenario, target)

    def database(self, scenario: Scenario, target: str) -> dict[str, float]:
        """redis-benchmark or pgbench through `target`, and the proxy's CPU per operation."""
        server = self.fleet.servers.get(target)             # None for direct
        cpu_before = total_cpu_seconds(server.processes()) if server else 0.0
        if scenario.tool == "redis":
            rates = run_redis_benchmark(LOOPBACK, self.layout.front(target).redis,
                                        requests=self.settings.redis_requests)
            measures = {"set": rates["set"], "get": rates["get"]}
            operations = 2 * self.settings.redis_requests
        else:
            measures = run_pgbench(LOOPBACK, self.layout.front(target).postgres, user=PG_USER,
                                   database=PG_DATABASE, seconds=self.duration(scenario))
            operations = int(measures["transactions"])
        if server:
            cpu = total_cpu_seconds(server.processes()) - cpu_before
            measures["cpu_us_per_op"] = cpu / operations * 1e6
        return measures

    def tlsload(self, *args: str, timeout: float) -> dict[str, float]:
        """Run `python -m bench.tlsload ARGS` and return the JSON it prints."""
        try:
            done = subprocess.run([sys.executable, "-m", "bench.tlsload", *args], capture_output=True,
                                  text=True, timeout=timeout, cwd=REPO_DIR)
        except subprocess.TimeoutExpired:
            raise ToolError(f"bench.tlsload {args[0]} did not finish within {timeout:.0f}s") from None
        if done.returncode != 0:
            raise ToolError(f"bench.tlsload {args[0]} exited with {done.returncode}:\n{done.stderr[-1500:]}")
        result: dict[str, float] = json.loads(done.stdout)
        return result

    def tls_bulk(self, scenario: Scenario, target: str) -> dict[str, float]:
        server = self.fleet.servers[target]
        cpu_before = total_cpu_seconds(server.processes())
        seconds = self.duration(scenario)
        result = self.tlsload("bulk", str(self.layout.front(target).tls_bulk), "--seconds", str(seconds),
                              timeout=seconds + TOOL_GRACE)
        cpu = total_cpu_seconds(server.processes()) - cpu_before
        return {"gbit_s": result["gbit_s"], "bytes": result["bytes"], "cpu_s": cpu,
                "cpu_s_per_gb": cpu / (result["bytes"] / BYTES_PER_GB)}

    def tls_sni(self, scenario: Scenario, target: str) -> dict[str, float]:
        server = self.fleet.servers[f"{target}-sni"]
        cpu_before = total_cpu_seconds(server.processes())
        seconds = self.duration(scenario)
        result = self.tlsload("handshakes", str(self.layout.front(target).sni), "--names",
                              self.extras.sni["names"], "--seconds", str(seconds),
                              "--processes", str(SNI_CLIENT_PROCESSES), timeout=seconds + TOOL_GRACE)
        if not result["connections"]:
            raise ToolError(f"no TLS connection completed ({result['errors']:.0f} errors)")
        cpu = total_cpu_seconds(server.processes()) - cpu_before
        return {"rate": result["rate"], "connections": result["connections"], "errors": result["errors"],
                "cpu_us_per_request": cpu / result["connections"] * 1e6}

    def write_reload_config(self, kind: str, routes: int, letter: str) -> str:
        """Write `kind`'s configuration for the reload scenario (`routes` SNI routes, the probe port
        forwarding to tag server `letter`) and return its path."""
        folder = os.path.join(self.extras.folder, "reload")
        os.makedirs(folder, exist_ok=True)
        tag_port = self.layout.upstream.sni if letter == "A" else self.layout.upstream.reload
        if kind == "nginx":
            path = os.path.join(folder, "nginx-reload.conf")
            text = configs.reload_nginx_conf(folder, self.layout, WORKERS, routes, tag_port)
        else:
            path = os.path.join(folder, "pyproxy-reload.conf")
            text = configs.reload_pyproxy_conf(folder, self.layout, self.extras.cert, WORKERS, routes,
                                               tag_port)
        with open(path + ".new", "w") as out:
            out.write(text)
        os.replace(path + ".new", path)          # a reader sees the old file or the new one, whole
        self.extras.reload_state[kind] = (routes, letter)
        return path

    @staticmethod
    def probe(port: int) -> bytes:
        """The letter of the tag server that a new connection to `port` reaches (b"" if none)."""
        try:
            with socket.create_connection((LOOPBACK, port), timeout=2) as conn:
                return conn.recv(1)
        except OSError:
            return b""

    def reload(self, target: str) -> dict[str, float]:
        """HUP `target`'s reload proxy twice: into the demo-sized configuration, then into the one
        with 10,000 routes; each time the probe route moves to the other tag server, and the figure
        is the time from the signal to the first connection that reaches the new one."""
        server = self.fleet.servers[f"{target}-reload"]
        port = self.layout.front(target).reload
        measures = {}
        for key, routes in (("demo_ms", 1), ("routes_ms", configs.SNI_ROUTES)):
            letter = "B" if self.extras.reload_state[target][1] == "A" else "A"
            self.write_reload_config(target, routes, letter)
            started = time.perf_counter()
            os.kill(server.pid, signal.SIGHUP)
            while self.probe(port) != letter.encode():
                if time.perf_counter() - started > RELOAD_TIMEOUT:
                    raise ToolError(f"{target} did not serve its new configuration in {RELOAD_TIMEOUT:.0f}s")
                time.sleep(0.001)
            measures[key] = (time.perf_counter() - started) * 1000
            time.sleep(max(self.settings.settle, RELOAD_SETTLE))
        return measures

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

    def idle(self, scenario: Scenario, target: str) -> dict[str, float]:
        """Weigh a freshly started `target` without and with N idle sessions. Fresh, because a process
        that has held that many sessions before keeps the freed memory and reuses it unseen."""
        fresh, name = self.fresh, f"{target}-fresh"
        assert fresh is not None, "main() makes the fresh proxies' configurations for the idle scenarios"
        if scenario.idle_per_worker:
            count = WORKERS * (self.settings.idle_per_worker or scenario.idle_per_worker)
            files, folder = fresh.large, os.path.dirname(fresh.large.nginx)
        else:
            count, files, folder = self.settings.idle_connections, fresh.files, fresh.folder
        start_proxy(self.fleet, name, target, files, fresh.layout, folder)
        try:
            memory = measure_idle_memory(self.fleet.servers[name].processes, fresh.upstream, LOOPBACK,
                                         fresh.layout.front(target).idle, count,
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
    if scenario.tool in ("iperf3", "tlsbulk"):
        cpu = f"  {measures['cpu_s_per_gb']:.3f} CPU s/GB" if "cpu_s_per_gb" in measures else ""
        return f"{measures['gbit_s']:>10.2f} Gbit/s{cpu}"
    if scenario.tool == "redis":
        return f"{measures['set']:>10,.0f} SET/s  {measures['get']:,.0f} GET/s"
    if scenario.tool == "pgbench":
        return f"{measures['tps']:>10,.0f} tps"
    if scenario.tool == "tlssni":
        errors = f", {measures['errors']:.0f} errors" if measures["errors"] else ""
        return f"{measures['rate']:>10,.0f} conn/s  {measures['cpu_us_per_request']:.0f} µs CPU{errors}"
    if scenario.tool == "reload":
        return (f"{measures['demo_ms']:>10.0f} ms demo-sized, "
                f"{measures['routes_ms']:.0f} ms with 10,000 routes")
    return (f"{measures['kib_per_connection']:>10.2f} KiB/connection  (PSS "
            f"{measures['pss_before_mib']:.1f} → "
            f"{measures['pss_after_mib']:.1f} MiB)")


def run_scenarios(bench: Bench, scenarios: list[Scenario], fleet: Fleet) -> list[Run]:
    """Every scenario, round after round, each round over every target in a rotated order."""
    runs: list[Run] = []
    plan = [(scenario, round_, target)
            for scenario in scenarios for round_ in range(bench.settings.rounds)
            for target in rotated(TARGETS, round_)
            if (target != "direct" or scenario.direct)
            and (target == "direct" or not scenario.targets or target in scenario.targets)]
    unprepared: dict[str, str] = {}          # scenario → why what it needs did not start
    for number, (scenario, round_, target) in enumerate(plan, 1):
        label = f"[{number:>3}/{len(plan)}] {scenario.name:<14} round {round_ + 1}  {target:<8}"
        if number == 1 or plan[number - 2][0] is not scenario:
            try:
                bench.prepare(scenario)
            except (StartError, ToolError, OSError, subprocess.SubprocessError) as problem:
                unprepared[scenario.name] = f"could not start what {scenario.name} needs: {problem}"
        dead = fleet.check_alive()
        upstreams_dead = [name for name in dead if name.split("-")[0] not in PROXIES]
        if upstreams_dead:
            raise StartError(f"stopped: {', '.join(upstreams_dead)} exited during the run "
                             f"(see {', '.join(fleet.servers[name].log_path for name in upstreams_dead)})")
        server = bench.server_name(scenario, target)
        try:
            if scenario.name in unprepared:
                raise ToolError(unprepared[scenario.name])
            if server in dead:
                raise ToolError(f"{server} has exited (see {fleet.servers[server].log_path})")
            measures = bench.measure(scenario, target)
        except (ToolError, TimeoutError, ConnectionError, OSError) as problem:
            text = str(problem).strip()
            first_line = text.splitlines()[0] if text else type(problem).__name__
            print(f"{label} FAILED: {first_line}", flush=True)
            runs.append(Run(scenario.name, round_, target, error=str(problem)))
        else:
            print(f"{label} {describe(scenario, measures)}", flush=True)
            runs.append(Run(scenario.name, round_, target, measures))
        if number == len(plan) or plan[number][0] is not scenario:
            bench.finish(scenario)
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
    check_tools(scenarios)
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
    extras = Extras(run_dir, files.cert)
    try:
        with Fleet(run_dir) as fleet:
            start_servers(fleet, files, layout, run_dir)
            if any(scenario.tool == "idle" for scenario in scenarios):
                fresh_dir = os.path.join(run_dir, "fresh")
                idle_upstream = IdleUpstreamProcess(LOOPBACK, fresh_layout.upstream.idle,
                                                    backlog=configs.LISTEN_BACKLOG)
                fresh_files = configs.write_configs(fresh_dir, fresh_layout, WORKERS, args.cert)
                large = configs.write_configs(os.path.join(fresh_dir, "large"), fresh_layout, WORKERS,
                                              args.cert, nginx_connections=configs.NGINX_CONNECTIONS_MOST)
                fresh = FreshProxies(fresh_layout, fresh_files, large, fresh_dir, idle_upstream)
            bench = Bench(fleet, layout, settings, fresh, extras)
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
        for folder in extras.temporary:
            shutil.rmtree(folder, ignore_errors=True)

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
        "tls-sni-10k: proxies of their own with 10,000 SNI routes and 1,000 certificates; nginx 1.22 (no "
        "`server_name` in its stream module) takes `ssl_certificate` from a map of $ssl_server_name and "
        "reads the files on every handshake; HAProxy a crt-list; pyproxy `certificates`. The rate is "
        "bounded by the 4 client processes: compare the CPU per connection.",
        "reload-10k and idle-memory-9k: nginx and pyproxy only (HAProxy is one process: 18,000 sessions "
        "need more descriptors than `ulimit -n` gives it, and it reloads on SIGHUP only in master-worker "
        "mode).",
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
