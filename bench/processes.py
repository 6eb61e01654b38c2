"""The servers a benchmark run starts, and the guarantee that every one of them is stopped.

Each server is started in its own session (so its own process group) with its output in a log file;
`Fleet.stop_all` terminates each group it started, by its id, and kills what is left after a grace
period. Use a Fleet as a context manager: the groups are stopped on success, failure and Ctrl-C alike.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass

import psutil

STOP_GRACE = 5.0          # seconds a server gets to exit after SIGTERM before SIGKILL
READY_TIMEOUT = 20.0      # seconds a server gets to listen on its ports


class StartError(RuntimeError):
    """A server exited or never listened; the message names it and ends with its log's tail."""


@dataclass
class Server:
    """One started server: its process (the group leader) and where its output goes."""

    name: str
    popen: subprocess.Popen
    log_path: str

    @property
    def pid(self) -> int:
        return self.popen.pid

    def processes(self) -> list[psutil.Process]:
        """The server's process and all its descendants (nginx's or pyproxy's workers)."""
        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, errors="replace") as log:
                return "".join(log.readlines()[-lines:])
        except OSError:
            return ""


class Fleet:
    """Servers started for one run; a context manager that stops them all on exit."""

    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        self.servers: dict[str, Server] = {}

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop_all()

    def start(self, name: str, argv: list[str], cwd: str | None = None) -> Server:
        """Start `argv` in a new process group, output to `<log_dir>/<name>.log`."""
        log_path = os.path.join(self.log_dir, f"{name}.log")
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     cwd=cwd, start_new_session=True)
        server = Server(name, popen, log_path)
        self.servers[name] = server
        return server

    def wait_ready(self, name: str, ports: Iterable[int], processes: int = 1,
                   timeout: float = READY_TIMEOUT) -> None:
        """Wait until server `name` listens on every port and has `processes` processes (master and
        workers). Listening sockets are read from the kernel: no probe connection reaches an upstream."""
        server = self.servers[name]
        wanted = set(ports)
        deadline = time.monotonic() + timeout
        while True:
            if server.popen.poll() is not None:
                raise StartError(f"{name} exited with status {server.popen.returncode}:\n{server.log_tail()}")
            missing = wanted - listening_ports()
            if not missing and len(server.processes()) >= processes:
                return
            if time.monotonic() > deadline:
                raise StartError(f"{name} is not ready after {timeout:.0f}s (not listening on "
                                 f"{sorted(missing) or '-'}):\n{server.log_tail()}")
            time.sleep(0.1)

    def check_alive(self) -> list[str]:
        """The names of the servers that have exited."""
        return [name for name, server in self.servers.items() if server.popen.poll() is not None]

    def stop(self, name: str) -> None:
        """Terminate one server's process group."""
        self._stop([self.servers.pop(name)])

    def stop_all(self) -> None:
        """Terminate every process group this fleet started (TERM, then KILL after STOP_GRACE)."""
        servers, self.servers = list(self.servers.values()), {}
        self._stop(servers)

    @staticmethod
    def _stop(servers: list[Server]) -> None:
        for server in servers:
            _signal_group(server, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for server in servers:
            try:
                server.popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            # The leader may be gone while its workers are not: the group id stays valid until the last.
            _signal_group(server, signal.SIGKILL)
            try:
                server.popen.wait(1.0)
            except subprocess.TimeoutExpired:
                pass


def _signal_group(server: Server, signum: int) -> None:
    """Signal the process group led by `server` (its id is the leader's pid: start_new_session)."""
    try:
        os.killpg(server.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def listening_ports() -> set[int]:
    """TCP ports with a socket in the LISTEN state on this machine."""
    ports = set()
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as table:
                next(table)
                for line in table:
                    fields = line.split()
                    if fields[3] == "0A":            # TCP_LISTEN
                        ports.add(int(fields[1].rsplit(":", 1)[1], 16))
        except OSError:
            continue
    return ports


def total_pss(processes: Iterable[psutil.Process]) -> int:
    """The sum of the proportional set sizes (bytes) of `processes`: shared pages counted once overall."""
    return sum(process.memory_full_info().pss for process in processes)


def total_cpu_seconds(processes: Iterable[psutil.Process]) -> float:
    """User plus system CPU seconds consumed so far by `processes` (all their threads)."""
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return total
