"""Where pyproxy's workers spend their time under one benchmark load: py-spy, strace and perf.

    python -m bench.profile                       # kept-alive small requests (wrk, 50 connections)
    python -m bench.profile --scenario tls-handshake --seconds 8
    python -m bench.profile --scenario tls-handshake --proxy nginx    # nginx's syscalls, to compare
    python -m bench.profile --scenario tls-handshake --pin --proxy nginx   # then the same for pyproxy

It starts the HTTP upstream and one proxy alone (the same configurations as `bench.run`), then:
  1. a plain wrk run: the request rate and the proxy's CPU time per request, no tracer attached;
  2. (pyproxy only) a wrk run with `py-spy record` on each worker: a flame graph (SVG) of worker #0
     and the collapsed stacks of worker #1, from which the top functions (own and inclusive time)
     are computed;
  3. a wrk run with `strace -c -f` on all the proxy's processes: system calls per request;
  4. (where `perf` runs) a wrk run with `perf record` on the workers: their CPU time per request by
     library (libcrypto, the kernel, libpython, nginx itself...), which shows what is the same work
     in two proxies and what is not.
`--pin` gives the proxy's processes the last CPU and everything else (wrk, the upstream) the
others, so that the proxy's CPU per request is not mixed with cache and scheduling effects of
sharing cores with the load generator (both proxies then run on one core: compare them pinned).
The summary is printed and written, with the SVG and the raw files, to bench/results/profile-*/.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import configs
from bench.configs import PROXIES, Layout
from bench.processes import Fleet, listening_ports, total_cpu_seconds
from bench.run import (
    DEFAULT_BASE_PORT,
    REPO_DIR,
    RESULTS_DIR,
    UPSTREAM_WORKERS,
    WORKERS,
    Bench,
    Settings,
    start_proxy,
)
from bench.scenarios import SCENARIOS
from bench.tools import WrkResult, run_wrk

SAMPLING_RATE = 250        # py-spy samples per second (its default is 100): more detail in a short run
PERF_RATE = 2000           # perf samples per second and CPU
TRACER_START = 1.0         # seconds for py-spy / strace to attach before the load starts
TOP = 20                   # functions listed in each table
WRK_SCENARIOS = [scenario.name for scenario in SCENARIOS if scenario.tool == "wrk"]
FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def pyspy_binary() -> str:
    found = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or shutil.which("py-spy")
    if not found:
        sys.exit("profile: py-spy is missing: `bash bench/install.sh` installs the bench extra")
    return found


def start_proxy_alone(fleet: Fleet, layout: Layout, run_dir: str, proxy: str = "pyproxy") -> list[int]:
    """Start the HTTP upstream and `proxy`; return the pids of the proxy's workers (HAProxy: its one
    process, whose threads `strace -f` follows)."""
    files = configs.write_configs(run_dir, layout, WORKERS, "ec", UPSTREAM_WORKERS)
    up = layout.upstream
    fleet.start("upstream-http", ["nginx", "-p", run_dir, "-c", files.upstream_nginx,
                                  "-e", os.path.join(run_dir, "upstream-http.error.log")])
    fleet.wait_ready("upstream-http", [up.http, up.https], processes=1 + UPSTREAM_WORKERS)
    start_proxy(fleet, proxy, proxy, files, layout, run_dir)
    processes = fleet.servers[proxy].processes()
    return [process.pid for process in (processes[1:] or processes)]


def frame_key(frame: str) -> str:
    """`function (file:line)` → `function (file)`: a function's samples are counted together."""
    match = FRAME.match(frame)
    if not match:
        return frame
    path = match["file"]
    short = path.split("site-packages/")[-1].split("/lib/python3")[-1]
    if "/pyproxy/" in path:
        short = "pyproxy/" + path.split("/pyproxy/", 1)[1]
    return f"{match['function']} ({short})"


def top_functions(collapsed: str) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    """From py-spy's raw (collapsed) stacks: total samples, the functions by own samples (the leaf of
    a stack) and by inclusive samples (anywhere in a stack, once per stack)."""
    own: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        frames = [frame_key(frame) for frame in stack.split(";")]
        frames = [frame for frame in frames if not frame.startswith("process ")]   # py-spy's thread label
        if not frames:
            continue
        total += samples
        own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    return total, own.most_common(TOP), inclusive.most_common(TOP)


def parse_strace_summary(text: str) -> list[tuple[str, int, int]]:
    """`strace -c` output → [(syscall, calls, errors)], most calls first."""
    rows = []
    for line in text.splitlines():
        fields = line.split()
        # % time, seconds, usecs/call, calls, [errors], syscall
        if len(fields) >= 5 and fields[0].replace(".", "").isdigit() and fields[3].isdigit():
            errors = int(fields[4]) if len(fields) == 6 and fields[4].isdigit() else 0
            rows.append((fields[-1], int(fields[3]), errors))
    return sorted(rows, key=lambda row: -row[1])


def wrk_in_thread(bench: Bench, scenario, duration: int) -> tuple[threading.Thread, list]:
    """Run wrk for `duration` seconds in a thread; the result lands in the returned list."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(bench_wrk(bench, scenario, duration, "pyproxy")))
    thread.start()
    return thread, result


def bench_wrk(bench: Bench, scenario, duration: int, proxy: str = "pyproxy") -> WrkResult:
    """One wrk run of `scenario` against `proxy`."""
    return run_wrk(bench.url(proxy, scenario.tls),
                   connections=scenario.connections or bench.settings.connections,
                   threads=scenario.threads or bench.settings.threads, duration=duration,
                   headers=["Connection: close"] if scenario.close else [])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=WRK_SCENARIOS, default="keepalive")
    parser.add_argument("--seconds", type=int, default=8, help="length of each of the three wrk runs")
    parser.add_argument("--proxy", choices=PROXIES, default="pyproxy",
                        help="the proxy to trace (py-spy only applies to pyproxy)")
    parser.add_argument("--base-port", type=int, default=DEFAULT_BASE_PORT)
    parser.add_argument("--pin", action="store_true",
                        help="the proxy on the last CPU, wrk and the upstream on the others")
    args = parser.parse_args(argv)
    scenario = next(s for s in SCENARIOS if s.name == args.scenario)
    proxy = args.proxy
    pyspy = pyspy_binary() if proxy == "pyproxy" else None
    perf = perf_works()
    if shutil.which("strace") is None:
        sys.exit("profile: strace is missing: `bash bench/install.sh` installs it")
    layout = Layout(args.base_port)
    if set(layout.all_ports()) & listening_ports():
        sys.exit("profile: the benchmark's ports are in use (is `make bench` running?)")
    run_dir = os.path.join(RESULTS_DIR, "profile-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    os.makedirs(run_dir)
    settings = Settings(rounds=1, duration=args.seconds, connections=50, threads=2, idle_connections=0,
                        settle=0.5, warmup=False)
    lines = [f"# {proxy} profile: {scenario.title}", "",
             f"{args.seconds} s per wrk run, {settings.connections} connections; {WORKERS} workers.", ""]

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    with Fleet(run_dir) as fleet:
        workers = start_proxy_alone(fleet, layout, run_dir, proxy)
        if args.pin:
            say(pin_proxy(fleet, proxy) + "\n")
        bench = Bench(fleet, layout, settings, None)
        bench_wrk(bench, scenario, 1, proxy)                            # warm-up

        cpu_before = total_cpu_seconds(fleet.servers[proxy].processes())
        plain = bench_wrk(bench, scenario, args.seconds, proxy)
        cpu = total_cpu_seconds(fleet.servers[proxy].processes()) - cpu_before
        say(f"without tracers: {plain.rate:,.0f} req/s, p50 {plain.latency_ms['p50']:.3f} ms, "
            f"p99 {plain.latency_ms['p99']:.3f} ms; {proxy} CPU {cpu / max(plain.requests, 1) * 1e6:.1f} µs "
            f"per request")
        if proxy == "pyproxy":
            profile_python(bench, scenario, workers, pyspy, args.seconds, run_dir, say)
        count_syscalls(bench, scenario, workers, proxy, args.seconds, run_dir, say)
        if perf:
            cpu_by_library(bench, scenario, workers, proxy, args.seconds, run_dir, say)
        else:
            say("\n(perf is missing or cannot sample here: no CPU time by library)")

    with open(os.path.join(run_dir, "profile.md"), "w") as out:
        out.write("\n".join(lines) + "\n")
    print(f"\nprofile: {os.path.relpath(run_dir, REPO_DIR)}/ (profile.md, strace.txt"
          f"{', profile.svg, stacks.txt' if proxy == 'pyproxy' else ''}{', perf.data' if perf else ''})")
    return 0


def profile_python(bench: Bench, scenario, workers: list[int], pyspy: str, seconds: int, run_dir: str,
                   say) -> None:
    """py-spy during one wrk run: a flame graph of worker #0, the top functions of worker #1."""
    svg, raw = os.path.join(run_dir, "profile.svg"), os.path.join(run_dir, "stacks.txt")
    recorders = [subprocess.Popen([pyspy, "record", "--pid", str(pid), "--duration", str(seconds),
                                   "--rate", str(SAMPLING_RATE), "--nonblocking", "--format", form,
                                   "-o", path], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for pid, form, path in ((workers[0], "flamegraph", svg), (workers[-1], "raw", raw))]
    time.sleep(TRACER_START)
    thread, result = wrk_in_thread(bench, scenario, seconds)
    thread.join()
    for recorder in recorders:
        _, errors = recorder.communicate(timeout=seconds + 30)
        if recorder.returncode:
            say(f"py-spy failed: {errors.decode(errors='replace')[-500:]}")
    if result:
        say(f"with py-spy ({SAMPLING_RATE} Hz, non-blocking): {result[0].rate:,.0f} req/s")

    if os.path.exists(raw):
        with open(raw) as stacks:
            total, own, inclusive = top_functions(stacks.read())
        say(f"\n## Worker pid {workers[-1]}: {total} samples while busy (idle waits excluded)\n")
        for title, table in (("own time (the function itself)", own),
                             ("inclusive time (the function and what it calls)", inclusive)):
            say(f"### Top {TOP} by {title}\n")
            say("| % | samples | function |\n|---:|---:|---|")
            for name, samples in table:
                say(f"| {100 * samples / max(total, 1):.1f} | {samples} | `{name}` |")
            say()


def count_syscalls(bench: Bench, scenario, workers: list[int], proxy: str, seconds: int, run_dir: str,
                   say) -> None:
    """`strace -c -f` on the proxy's workers for exactly one wrk run: system calls per request."""
    summary = os.path.join(run_dir, "strace.txt")
    tracer = subprocess.Popen(["strace", "-c", "-f", "-q", "-o", summary,
                               *(arg for pid in workers for arg in ("-p", str(pid)))],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(TRACER_START)
    traced = bench_wrk(bench, scenario, seconds, proxy)
    tracer.send_signal(signal.SIGINT)          # detach: strace writes its summary
    tracer.wait(timeout=30)
    with open(summary) as text:
        calls = parse_strace_summary(text.read())
    requests = max(traced.requests, 1)
    say(f"## System calls per request (strace -c -f on {proxy}'s workers; {traced.requests:,} requests, "
        f"{traced.rate:,.0f} req/s while traced)\n")
    say("| syscall | calls | per request | errors |\n|---|---:|---:|---:|")
    for name, count, errors in calls:
        if name == "total":
            continue
        say(f"| {name} | {count:,} | {count / requests:.2f} | {errors:,} |")
    total_calls = sum(count for name, count, _ in calls if name != "total")
    say(f"| **all** | {total_calls:,} | {total_calls / requests:.2f} | |")


def pin_proxy(fleet: Fleet, proxy: str) -> str:
    """--pin: the proxy's processes on the last CPU; this process (so wrk, which it starts) and the
    upstream on the others. Every thread of each (HAProxy's workers are threads). Returns the line
    that says so."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return "--pin: only one CPU is usable here, nothing pinned"
    mine, rest = {cpus[-1]}, set(cpus[:-1])
    for server, where in ((proxy, mine), ("upstream-http", rest)):
        for process in fleet.servers[server].processes():
            for thread in process.threads():
                os.sched_setaffinity(thread.id, where)
    os.sched_setaffinity(0, rest)
    return (f"pinned: {proxy} on CPU {cpus[-1]}; wrk and the upstream on CPU "
            f"{', '.join(map(str, sorted(rest)))}")


def perf_works() -> bool:
    """Whether `perf record` can sample a process here (the tool exists and the kernel lets it)."""
    if shutil.which("perf") is None:
        return False
    probe = subprocess.run(["perf", "record", "-e", "cpu-clock", "-o", "/dev/null", "--", "true"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return probe.returncode == 0


def parse_perf_dsos(text: str) -> list[tuple[str, int]]:
    """`perf report --sort dso -n --stdio` output → [(library, samples)], most samples first."""
    rows = []
    for line in text.splitlines():
        fields = line.split()
        # overhead %, samples, library
        if len(fields) >= 3 and fields[0].endswith("%") and fields[1].isdigit():
            rows.append((" ".join(fields[2:]), int(fields[1])))
    return sorted(rows, key=lambda row: -row[1])


def cpu_by_library(bench: Bench, scenario, workers: list[int], proxy: str, seconds: int, run_dir: str,
                   say) -> None:
    """`perf record` (a CPU clock sample PERF_RATE times a second while a worker runs) on the
    proxy's workers for one wrk run: CPU microseconds per request in each library."""
    data = os.path.join(run_dir, "perf.data")
    recorder = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", str(PERF_RATE), "-o", data,
                                 "-p", ",".join(map(str, workers)),
                                 "--", "sleep", str(seconds + TRACER_START)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(TRACER_START / 2)
    sampled = bench_wrk(bench, scenario, seconds, proxy)
    recorder.wait(timeout=seconds + 30)
    report = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "dso", "--stdio",
                             "-g", "none", "-n"], capture_output=True, text=True)
    rows = parse_perf_dsos(report.stdout)
    requests = max(sampled.requests, 1)
    total = sum(samples for _, samples in rows)
    say(f"\n## CPU time per request by library (perf record on {proxy}'s workers; "
        f"{sampled.requests:,} requests, {sampled.rate:,.0f} req/s while sampled)\n")
    say("| library | µs per request | % |\n|---|---:|---:|")
    for library, samples in rows:
        if samples * 1000 < total:          # under 0.1 %
            continue
        say(f"| {library} | {samples / PERF_RATE / requests * 1e6:.1f} | {100 * samples / total:.1f} |")
    say(f"| **all** | {total / PERF_RATE / requests * 1e6:.1f} | |")


if __name__ == "__main__":
    sys.exit(main())
