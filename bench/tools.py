"""The load tools: wrk for requests (kept-alive, new connection each, TLS) and iperf3 for bulk bytes.

`run_wrk` and `run_iperf3` run one measurement and return its figures; the parsers are pure functions
on the tools' output (wrk's line from `wrk_report.lua`, iperf3's `-J` JSON), so they can be tested alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

WRK_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wrk_report.lua")
WRK_MARKER = "WRK_REPORT "
TOOL_GRACE = 30.0          # seconds a tool may run past its own duration before it is killed
IPERF_BUSY_RETRIES = 5     # iperf3's server serves one test at a time: retry while it finishes the last
IPERF_BUSY_WAIT = 0.5      # seconds between those retries


class ToolError(RuntimeError):
    """A load tool failed; the message carries its output."""


@dataclass(frozen=True)
class WrkResult:
    """What one wrk run measured."""

    requests: int
    duration_s: float
    errors: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)   # mean, p50, p90, p99, max

    @property
    def rate(self) -> float:
        """Completed requests per second."""
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


@dataclass(frozen=True)
class IperfResult:
    """What one iperf3 run measured, at the receiving end."""

    bytes: int
    seconds: float
    bits_per_second: float

    @property
    def gbit_per_second(self) -> float:
        return self.bits_per_second / 1e9


def parse_wrk_report(output: str) -> WrkResult:
    """The figures of a wrk run whose script was `wrk_report.lua` (its `WRK_REPORT {json}` line)."""
    for line in output.splitlines():
        if line.startswith(WRK_MARKER):
            report = json.loads(line[len(WRK_MARKER):])
            return WrkResult(requests=report["requests"], duration_s=report["duration_us"] / 1e6,
                             errors=report["errors"],
                             latency_ms={name: value / 1000 for name, value in report["latency_us"].items()})
    raise ToolError(f"wrk printed no report:\n{output[-2000:]}")


def run_tool(argv: list[str], timeout: float) -> str:
    """Run a load tool; its standard output, or ToolError naming it when it fails or overruns."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ToolError(f"{argv[0]} did not finish within {timeout:.0f}s") from None
    if done.returncode != 0:
        raise ToolError(f"{argv[0]} exited with {done.returncode}:\n"
                        f"{done.stdout[-1000:]}{done.stderr[-1000:]}")
    return done.stdout


def run_wrk(url: str, *, connections: int, threads: int, duration: int,
            headers: Sequence[str] = ()) -> WrkResult:
    """Run wrk against `url` for `duration` seconds and return what it measured."""
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency", "-s", WRK_SCRIPT]
    for header in headers:
        argv += ["-H", header]
    argv.append(url)
    return parse_wrk_report(run_tool(argv, duration + TOOL_GRACE))


def parse_iperf3_json(text: str) -> IperfResult:
    """The received-side totals of an `iperf3 -J` client run."""
    try:
        report = json.loads(text)
    except json.JSONDecodeError:
        raise ToolError(f"iperf3 printed no JSON:\n{text[-2000:]}") from None
    if "error" in report:
        raise ToolError(f"iperf3: {report['error']}")
    received = report["end"]["sum_received"]
    return IperfResult(bytes=int(received["bytes"]), seconds=float(received["seconds"]),
                       bits_per_second=float(received["bits_per_second"]))


def run_iperf3(host: str, port: int, *, streams: int, duration: int, total_bytes: int = 0) -> IperfResult:
    """Send from an iperf3 client to the iperf3 server behind `host:port` for `duration` seconds, or
    until `total_bytes` are sent when that is given (a quick run: no need to wait a whole second)."""
    amount = ["-n", str(total_bytes)] if total_bytes else ["-t", str(duration)]
    argv = ["iperf3", "-c", host, "-p", str(port), "-P", str(streams), *amount, "-J"]
    for attempt in range(IPERF_BUSY_RETRIES):
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + TOOL_GRACE)
        except subprocess.TimeoutExpired:
            raise ToolError(f"iperf3 did not finish within {duration + TOOL_GRACE:.0f}s") from None
        try:
            return parse_iperf3_json(done.stdout)
        except ToolError as problem:
            if "busy" not in str(problem) or attempt == IPERF_BUSY_RETRIES - 1:
                raise
            time.sleep(IPERF_BUSY_WAIT)
    raise AssertionError("unreachable")


def parse_redis_benchmark_csv(text: str) -> dict[str, float]:
    """{test name in lower case: requests per second} from `redis-benchmark --csv`."""
    rates = {}
    for line in text.splitlines():
        fields = [field.strip('"') for field in line.split(",")]
        if len(fields) >= 2 and fields[0] != "test":
            try:
                rates[fields[0].lower()] = float(fields[1])
            except ValueError:
                continue
    if not rates:
        raise ToolError(f"redis-benchmark printed no result:\n{text[-2000:]}")
    return rates


def run_redis_benchmark(host: str, port: int, *, requests: int, pipeline: int = 16,
                        clients: int = 50, timeout: float = 120.0) -> dict[str, float]:
    """`redis-benchmark -P pipeline -t set,get -n requests` against host:port: {"set": ops/s, "get": …}."""
    argv = ["redis-benchmark", "-h", host, "-p", str(port), "-P", str(pipeline), "-c", str(clients),
            "-t", "set,get", "-n", str(requests), "--csv"]
    return parse_redis_benchmark_csv(run_tool(argv, timeout))


def parse_pgbench(text: str) -> dict[str, float]:
    """The transactions per second pgbench reports (without the initial connection time) and the
    number of transactions."""
    figures = {}
    for line in text.splitlines():
        if line.startswith("tps = "):
            figures["tps"] = float(line.split()[2])
        elif line.startswith("number of transactions actually processed: "):
            figures["transactions"] = float(line.split(": ")[1].split("/")[0])
    if len(figures) < 2:
        raise ToolError(f"pgbench printed no tps:\n{text[-2000:]}")
    return figures


def run_pgbench(host: str, port: int, *, user: str, database: str, seconds: int, clients: int = 8,
                threads: int = 2) -> dict[str, float]:
    """Select-only pgbench (`-S`) for `seconds`: {"tps": …, "transactions": …}."""
    argv = ["pgbench", "-h", host, "-p", str(port), "-U", user, "-c", str(clients), "-j", str(threads),
            "-T", str(seconds), "-S", "-n", database]
    return parse_pgbench(run_tool(argv, seconds + TOOL_GRACE))
