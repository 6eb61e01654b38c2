"""Python work per session, counted: what a change to the hot path adds or saves, without timing.

    python -m bench.calls                    # plain TCP and terminated TLS, 300 sessions each
    python -m bench.calls --mode tls -n 1000 --functions
    python -m bench.calls --bytecodes        # bytecodes executed instead of calls (slower)
    python -m bench.calls --mode tls --bytecodes --functions --no-access-log   # by function, as make bench

A real Worker runs in this process (its init_process, its loop, its signal handling) in front of an
echo upstream; a client thread opens sessions one after another (each sends 1000 bytes, reads them
back and closes), and only the loop's thread is counted, with sys.setprofile (calls) or sys.settrace
(bytecodes), over the sessions after a warm-up. Counts are per session. The loop's own per-tick calls
(one run_once, after_tick, the access log's flush...) depend on how many ticks a session takes,
which timing decides: they are shown apart, and the line to compare between two versions is
"session code" (session.py and the modules of its parts, context.py, worker.py), which timing does
not move. `--tree DIR` counts the pyproxy package in DIR instead (another version, say
`git archive <commit> pyproxy | tar -x -C DIR`), with this tool.
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import socket
import socketserver
import ssl
import sys
import tempfile
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING, Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.configs import LOOPBACK, make_certificate

if TYPE_CHECKING:
    from pyproxy.worker import Worker

WARM_UP = 20                 # sessions before counting starts
PAYLOAD_SIZE = 1000
SESSION_FILES = {"session.py", "phases.py", "preread.py", "connector.py", "forwarder.py", "context.py",
                 "worker.py"}
# Called once per loop tick, not per session: how many a session costs depends on timing.
PER_TICK = {("loop.py", "run_once"), ("loop.py", "_poll_timeout"), ("loop.py", "_run_timers"),
            ("worker.py", "after_tick"), ("accesslog.py", "flush"), ("worker.py", "heartbeat"),
            ("shared.py", "beat"), ("worker.py", "_trim_when_idle")}
TIMEOUT = 10.0


class _EchoServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        conn = self.request
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass


def free_port(first: int = 27000) -> int:
    """A loopback port below 32768 that is free now, the first from `first` on."""
    for port in range(first, 32000):
        with socket.socket() as probe:
            try:
                probe.bind((LOOPBACK, port))
            except OSError:
                continue
            return port
    raise SystemExit(f"calls: no free port between {first} and 32000")


def write_config(folder: str, mode: str, listen_port: int, upstream_port: int,
                 access_log: bool = True) -> str:
    cert = make_certificate(folder)
    path = os.path.join(folder, "pyproxy.conf")
    ssl_flag, protocols = (" ssl", "tls") if mode == "tls" else ("", "tcp")
    with open(path, "w") as out:
        out.write(f"""error_log: {folder}/error.log
access_log: {f"{folder}/access.log" if access_log else "off"}
log_level: notice
worker_processes: 1
stream_listen:
  - {LOOPBACK}:{listen_port}{ssl_flag}
ssl:
  default_certificate: {{cert: {cert.cert}, key: {cert.key}}}
services:
  - name: echo
    host: {LOOPBACK}
    port: {upstream_port}
    routes:
      - name: echo
        protocols: [{protocols}]
        destinations: [{{port: {listen_port}}}]
""")
    return path


class Counter:
    """What the loop's thread runs while `on` is set, by (file, function) or by file."""

    def __init__(self) -> None:
        self.on = False
        self.calls: collections.Counter[tuple[str, str]] = collections.Counter()
        self.c_calls = 0
        self.bytecodes: collections.Counter[tuple[str, str]] = collections.Counter()

    def profile(self, frame: FrameType, event: str, arg: Any) -> None:
        if not self.on:
            return
        if event == "call":
            code = frame.f_code
            self.calls[(os.path.basename(code.co_filename), code.co_name)] += 1
        elif event == "c_call":
            self.c_calls += 1

    def trace(self, frame: FrameType, event: str, arg: Any) -> Any:
        if not self.on:
            return None
        frame.f_trace_opcodes = True
        name = (os.path.basename(frame.f_code.co_filename), frame.f_code.co_name)
        bytecodes = self.bytecodes

        def local(frame: FrameType, event: str, arg: Any) -> Any:
            if event == "opcode" and self.on:
                bytecodes[name] += 1
            return local
        return local


def client(mode: str, port: int, sessions: int, worker: Worker, counter: Counter) -> None:
    """Open sessions one at a time; count from the first after the warm-up; then stop the worker."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    payload = os.urandom(PAYLOAD_SIZE)

    def one() -> None:
        sock = socket.create_connection((LOOPBACK, port), timeout=TIMEOUT)
        if mode == "tls":
            sock = context.wrap_socket(sock, server_hostname="localhost")
        with sock:
            sock.sendall(payload)
            got = b""
            while len(got) < len(payload):
                chunk = sock.recv(65536)
                if not chunk:
                    raise SystemExit("calls: the session ended before the echo came back")
                got += chunk
        deadline = time.monotonic() + TIMEOUT
        while worker.sessions and time.monotonic() < deadline:    # the worker saw the close
            time.sleep(0.0005)

    try:
        for _ in range(WARM_UP):
            one()
        counter.on = True
        for _ in range(sessions):
            one()
        counter.on = False
    finally:
        os.kill(os.getpid(), signal.SIGTERM)        # the worker's stop: its loop returns


def count(mode: str, sessions: int, bytecodes: bool, access_log: bool = True) -> Counter:
    """Run a worker in this process for `sessions` counted sessions of `mode` ("tcp" or "tls")."""
    # Imported here: main() may have put another version's tree first on sys.path (--tree).
    from pyproxy.config import load_config
    from pyproxy.listeners import open_listener
    from pyproxy.log import ErrorLog
    from pyproxy.shared import SharedState
    from pyproxy.tls.contexts import TLSContexts
    from pyproxy.worker import Worker

    with tempfile.TemporaryDirectory(prefix="pyproxy-calls-") as folder:
        upstream = _EchoServer((LOOPBACK, 0), _EchoHandler)
        threading.Thread(target=upstream.serve_forever, daemon=True).start()
        listen_port = free_port()
        config = load_config(write_config(folder, mode, listen_port, upstream.server_address[1], access_log))
        shared = SharedState()
        log = ErrorLog(config.error_log, config.log_level)
        worker = Worker(0, 1, config, [open_listener(listen, 0) for listen in config.stream_listen], log,
                        shared, shared.take_row(), TLSContexts(config))
        worker.master_pid = os.getppid()        # its heartbeat checks that its master lives on
        ready_r, ready_w = os.pipe()
        counter = Counter()
        try:
            worker.take_signals()
            worker.init_process(ready_w)
            threading.Thread(target=client, args=(mode, listen_port, sessions, worker, counter),
                             daemon=True).start()
            if bytecodes:
                sys.settrace(counter.trace)
            else:
                sys.setprofile(counter.profile)
            try:
                worker.loop.run()
            finally:
                sys.setprofile(None)
                sys.settrace(None)
        finally:
            upstream.shutdown()
            upstream.server_close()
            os.close(ready_r)
            os.close(ready_w)
    return counter


def report(mode: str, sessions: int, counter: Counter, functions: bool) -> None:
    if counter.bytecodes:
        total = sum(counter.bytecodes.values())
        ours = sum(n for key, n in counter.bytecodes.items() if key[0] in SESSION_FILES)
        print(f"{mode}: bytecodes per session: {ours / sessions:.1f} in session code, "
              f"{total / sessions:.1f} in all")
        if functions:
            by_count = sorted(counter.bytecodes.items(), key=lambda item: (-item[1], item[0]))
            for (name, function), n in by_count:
                tick = "  (per tick)" if (name, function) in PER_TICK else ""
                print(f"  {n / sessions:8.1f}  {name}:{function}{tick}")
        return
    calls = counter.calls
    total = sum(calls.values())
    ticks = sum(n for key, n in calls.items() if key in PER_TICK)
    ours = sum(n for key, n in calls.items() if key[0] in SESSION_FILES and key not in PER_TICK)
    print(f"{mode}: Python calls per session: {ours / sessions:.2f} in session code, "
          f"{(total - ticks) / sessions:.2f} in all but the per-tick calls, {total / sessions:.2f} in all "
          f"({counter.c_calls / sessions:.1f} calls of C functions)")
    if functions:
        for (name, function), n in sorted(calls.items(), key=lambda item: (-item[1], item[0])):
            tick = "  (per tick)" if (name, function) in PER_TICK else ""
            print(f"  {n / sessions:8.2f}  {name}:{function}{tick}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.calls", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("tcp", "tls"), action="append",
                        help="plain TCP, or TLS terminated by pyproxy (default: both)")
    parser.add_argument("-n", "--sessions", type=int, default=300, help="sessions counted (default 300)")
    parser.add_argument("--no-access-log", action="store_true", help="access_log: off, as make bench runs")
    parser.add_argument("--bytecodes", action="store_true", help="count bytecodes executed, by file")
    parser.add_argument("--functions", action="store_true", help="list the calls by function")
    parser.add_argument("--tree", metavar="DIR", help="count the pyproxy package in DIR (another version)")
    args = parser.parse_args(argv)
    if args.tree:
        # bench.configs imported this checkout's pyproxy: forget it, so count() imports DIR's.
        sys.path.insert(0, os.path.abspath(args.tree))
        for name in [name for name in sys.modules if name == "pyproxy" or name.startswith("pyproxy.")]:
            del sys.modules[name]
    for mode in args.mode or ["tcp", "tls"]:
        # Each mode in a child: a worker takes over its process (signals, gc, privileges).
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                counter = count(mode, args.sessions, args.bytecodes, not args.no_access_log)
                report(mode, args.sessions, counter, args.functions)
                code = 0
            finally:
                sys.stdout.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"calls: the {mode} run failed")


if __name__ == "__main__":
    main()
