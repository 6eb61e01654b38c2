"""What is measured: the scenarios (one load each), the figures read from them, and issue 4's targets.

A *scenario* is one kind of load, run against every target (direct, nginx, haproxy, pyproxy). A
*metric* is one figure a scenario yields (requests/s, p99 latency, CPU seconds per GB…), a row of the
results table. A target compares pyproxy with nginx in the same run (and, for bulk, with direct).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scenario:
    """One load, run against every target. `tool` is "wrk", "iperf3" or "idle"."""

    name: str                      # what `--only` takes
    title: str
    tool: str
    tls: bool = False              # wrk: https to the TLS-terminating port
    close: bool = False            # wrk: `Connection: close`, so one connection per request
    connections: int | None = None   # wrk: None = the run's default (50, or fewer in --quick)
    threads: int | None = None       # wrk: None = the run's default (2)
    streams: int = 1               # iperf3: parallel streams
    duration_scale: float = 1.0    # a fraction of the run's duration (the latency probe needs less)
    direct: bool = True            # run against the upstream alone too
    targets: tuple[str, ...] | None = None   # only these proxies (None: every one)
    idle_per_worker: int = 0       # idle: sessions per worker (0: the run's --idle-connections in all)


SCENARIOS = (
    Scenario("bulk-1", "Bulk throughput, 1 stream (iperf3)", "iperf3", streams=1),
    Scenario("bulk-4", "Bulk throughput, 4 streams (iperf3)", "iperf3", streams=4),
    Scenario("keepalive", "Small requests, kept-alive connections (wrk)", "wrk"),
    Scenario("close", "New connection per request (wrk, Connection: close)", "wrk", close=True),
    Scenario("tls-keepalive", "TLS terminated, kept-alive (wrk https)", "wrk", tls=True),
    Scenario("tls-handshake", "TLS handshake per request (wrk https, Connection: close)", "wrk",
             tls=True, close=True),
    Scenario("latency", "Latency of one connection at a time (wrk -c1)", "wrk", connections=1, threads=1,
             duration_scale=0.6),
    Scenario("idle-memory", "Memory per idle proxied connection", "idle", direct=False),
    # Issue 21's rows. HAProxy is one process: 9,000 sessions a worker (18,000, 36,000 descriptors)
    # do not fit its 20,000; it has no reload on SIGHUP without its master-worker mode.
    Scenario("tls-bulk", "TLS terminated, one stream pushing bytes (bench.tlsload bulk → sink)", "tlsbulk",
             direct=False),
    Scenario("redis", "redis-benchmark -P 16 -t set,get through the proxy to redis-server", "redis"),
    Scenario("pgbench", "pgbench -S -c 8 -j 2 through the proxy to PostgreSQL", "pgbench"),
    Scenario("tls-sni-10k", "New TLS connections, 10,000 SNI routes and 1,000 certificates, random SNI",
             "tlssni", direct=False),
    Scenario("reload-10k", "Reload: HUP to the new configuration serving, demo-sized and 10,000 routes",
             "reload", direct=False, targets=("nginx", "pyproxy")),
    Scenario("idle-memory-9k", "Memory per idle proxied connection, 9,000 per worker", "idle",
             direct=False, targets=("nginx", "pyproxy"), idle_per_worker=9000),
)
SCENARIO_NAMES = tuple(scenario.name for scenario in SCENARIOS)


@dataclass(frozen=True)
class Target:
    """Issue 4's goal for a metric: pyproxy / nginx at least `ratio_min` or at most `ratio_max`, and
    pyproxy / direct at least `direct_min`."""

    ratio_min: float | None = None
    ratio_max: float | None = None
    direct_min: float | None = None
    value_max: float | None = None     # pyproxy's own figure at most this (reload times)

    def describe(self) -> str:
        parts = []
        if self.ratio_min is not None:
            parts.append(f"≥ {self.ratio_min:g}× nginx")
        if self.ratio_max is not None:
            parts.append(f"≤ {self.ratio_max:g}× nginx")
        if self.direct_min is not None:
            parts.append(f"≥ {self.direct_min:g}× direct")
        if self.value_max is not None:
            parts.append(f"< {self.value_max:g}")
        return ", ".join(parts)

    def met(self, ratio: float | None, ratio_direct: float | None, value: float | None = None) -> bool | None:
        """Whether the ratios (and pyproxy's `value`) meet the target; None when a figure it needs
        is missing."""
        checks = []
        if self.value_max is not None:
            if value is None:
                return None
            checks.append(value < self.value_max)
        if self.ratio_min is not None or self.ratio_max is not None:
            if ratio is None:
                return None
            checks.append(self.ratio_min is None or ratio >= self.ratio_min)
            checks.append(self.ratio_max is None or ratio <= self.ratio_max)
        if self.direct_min is not None:
            if ratio_direct is None:
                return None
            checks.append(ratio_direct >= self.direct_min)
        return all(checks)


@dataclass(frozen=True)
class Metric:
    """One row of the results: `measure` of scenario `scenario` (the median over rounds)."""

    key: str
    scenario: str
    measure: str                   # a key of the measures dict a run of that scenario returns
    title: str
    unit: str
    higher_is_better: bool
    target: Target | None = None
    overhead_row: bool = False     # also show "value − direct" (latency added by the proxy)


METRICS = (
    Metric("bulk-1", "bulk-1", "gbit_s", "Bulk throughput, 1 stream", "Gbit/s", True,
           Target(ratio_min=1.0, direct_min=0.85)),
    Metric("bulk-4", "bulk-4", "gbit_s", "Bulk throughput, 4 streams", "Gbit/s", True),
    Metric("cpu-per-gb-1", "bulk-1", "cpu_s_per_gb", "CPU per GB moved, 1 stream", "CPU s/GB", False),
    Metric("cpu-per-gb-4", "bulk-4", "cpu_s_per_gb", "CPU per GB moved, 4 streams", "CPU s/GB", False),
    Metric("keepalive", "keepalive", "rate", "Kept-alive small requests", "req/s", True,
           Target(ratio_min=0.6)),
    Metric("keepalive-cpu", "keepalive", "cpu_us_per_request", "Proxy CPU per kept-alive request", "µs",
           False),
    Metric("keepalive-p50", "keepalive", "p50_ms", "Kept-alive latency p50 (under load)", "ms", False,
           overhead_row=True),
    Metric("keepalive-p99", "keepalive", "p99_ms", "Kept-alive latency p99 (under load)", "ms", False,
           overhead_row=True),
    Metric("close", "close", "rate", "New connections", "conn/s", True, Target(ratio_min=0.6)),
    Metric("close-cpu", "close", "cpu_us_per_request", "Proxy CPU per new connection", "µs", False),
    Metric("tls-keepalive", "tls-keepalive", "rate", "TLS kept-alive requests", "req/s", True,
           Target(ratio_min=0.5)),
    Metric("tls-keepalive-cpu", "tls-keepalive", "cpu_us_per_request", "Proxy CPU per TLS request", "µs",
           False),
    Metric("tls-handshake", "tls-handshake", "rate", "TLS handshakes", "hs/s", True, Target(ratio_min=0.8)),
    Metric("tls-handshake-cpu", "tls-handshake", "cpu_us_per_request", "Proxy CPU per TLS handshake", "µs",
           False),
    Metric("latency-p50", "latency", "p50_ms", "Latency p50, 1 connection", "ms", False, overhead_row=True),
    Metric("latency-p99", "latency", "p99_ms", "Latency p99, 1 connection", "ms", False, overhead_row=True),
    Metric("idle-memory", "idle-memory", "kib_per_connection", "Memory per idle connection", "KiB", False,
           Target(ratio_max=1.0)),
    Metric("idle-memory-total", "idle-memory", "pss_after_mib", "Memory with the idle connections (PSS)",
           "MiB", False),
    Metric("tls-bulk", "tls-bulk", "gbit_s", "TLS bulk throughput, 1 stream, terminated", "Gbit/s", True,
           Target(ratio_min=1.0)),
    Metric("tls-bulk-cpu", "tls-bulk", "cpu_s_per_gb", "CPU per GB decrypted and forwarded", "CPU s/GB",
           False),
    Metric("redis-set", "redis", "set", "redis-benchmark SET, -P 16", "ops/s", True, Target(ratio_min=0.8)),
    Metric("redis-get", "redis", "get", "redis-benchmark GET, -P 16", "ops/s", True, Target(ratio_min=0.8)),
    Metric("redis-cpu", "redis", "cpu_us_per_op", "Proxy CPU per redis command (pipelined by 16)", "µs",
           False),
    Metric("pgbench", "pgbench", "tps", "pgbench -S, 8 clients", "tps", True, Target(ratio_min=0.8)),
    Metric("pgbench-cpu", "pgbench", "cpu_us_per_op", "Proxy CPU per pgbench transaction", "µs", False),
    Metric("tls-sni-10k", "tls-sni-10k", "rate", "New TLS connections, 10k SNI routes, 1k certificates",
           "conn/s", True),
    Metric("tls-sni-10k-cpu", "tls-sni-10k", "cpu_us_per_request",
           "Proxy CPU per new TLS connection (10k SNIs)", "µs", False),
    Metric("reload-demo", "reload-10k", "demo_ms", "Reload, HUP to serving, demo-sized configuration", "ms",
           False, Target(value_max=300)),
    Metric("reload-10k", "reload-10k", "routes_ms", "Reload, HUP to serving, 10,000 SNI routes", "ms", False,
           Target(value_max=1000)),
    Metric("idle-memory-9k", "idle-memory-9k", "kib_per_connection",
           "Memory per idle connection, 9k a worker", "KiB", False, Target(ratio_max=0.5)),
    Metric("idle-memory-9k-total", "idle-memory-9k", "pss_after_mib",
           "Memory with 9k idle connections a worker", "MiB", False),
    Metric("footprint", "footprint", "pss_mib", "Memory after the load scenarios (PSS)", "MiB", False),
)
