"""CPU instructions per terminated TLS session, counted by callgrind: what a change to the TLS path
saves, on a machine too busy for timings.

    python -m bench.tls_cost                     # 40 then 240 sessions; the difference per session
    python -m bench.tls_cost --tree DIR          # the pyproxy package in DIR (another version)
    python -m bench.tls_cost --python /root/.pyenv/versions/3.12.1/bin/python3   # another CPython
    python -m bench.tls_cost --serve N ...       # (internal) the worker, run under valgrind

One session is the `tls-handshake` row of `bench.run` (wrk, `Connection: close`): a TLS 1.3
handshake that resumes the client's last session (with a fresh X25519 exchange, as wrk's), one small
request, the upstream's short answer and its close, then the client's close. A real Worker runs in
a process under `valgrind --tool=callgrind`, with the benchmark's settings (access log off, one
`ssl` listener, a `tls` route to a plain upstream); the client and the upstream are separate
processes that valgrind does not trace. The worker runs twice, for a few sessions and for many, and
the difference divided by the sessions between them is the cost of one session, without the
worker's start-up and imports. Instructions are grouped by where they run: the interpreter and
CPython's C functions (libpython), OpenSSL (libssl, libcrypto), CPython's `_ssl` module, the C
library, the rest. The kernel's share (system calls) is not counted: `strace -c -f` counts those.
The counts move by a fraction of a percent between runs (how many loop ticks a session takes
depends on timing, which the client's pause after its handshake and the upstream's answer sent with
its FIN in one segment mostly fix; a run can still differ from another by some 0.5 %); compare two
versions with the same --python, and run nothing else under valgrind meanwhile.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.calls import free_port
from bench.configs import LOOPBACK, SSL_PROTOCOLS, make_certificate, nginx_stream_head

FEW, MANY = 40, 240
TIMEOUT = 10.0
# The client's pause between its handshake and its request: long enough for the traced worker to
# finish the handshake and connect, so that each step of a session is an event of its own and the
# loop's per-tick work is the same in every run (the request does not catch up with the Finished).
STEP_PAUSE = 0.1
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
REQUEST = b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
# Where an instruction runs, by the file name of its object.
GROUPS = (("libpython", "libpython"), ("python", "python3"), ("libssl", "libssl"), ("libcrypto", "libcrypto"),
          ("_ssl", "_ssl"), ("libc", "libc.so"), ("nginx", "nginx"), ("stream", "ngx_stream"))


def write_config(folder: str, listen_port: int, upstream_port: int) -> str:
    """The benchmark's pyproxy settings for its https port (bench.configs.pyproxy_conf), one worker."""
    cert = make_certificate(folder)
    path = os.path.join(folder, "pyproxy.conf")
    with open(path, "w") as out:
        out.write(f"""error_log: {folder}/error.log
log_level: notice
access_log: off
worker_processes: 1
stream_listen:
  - {LOOPBACK}:{listen_port} ssl
ssl:
  default_certificate: {{cert: {cert.cert}, key: {cert.key}}}
services:
  - name: http
    host: {LOOPBACK}
    port: {upstream_port}
    routes:
      - name: https
        protocols: [tls]
        sources: [{{ip: 127.0.0.0/8}}]
        destinations: [{{port: {listen_port}}}]
""")
    return path


# -- the processes valgrind does not trace ------------------------------------------------------
def upstream(port: int) -> None:
    """An HTTP server as the benchmark's nginx answers `Connection: close`: read the request,
    answer, close."""
    server = socket.create_server((LOOPBACK, port), backlog=128)
    print("ready", server.getsockname()[1], flush=True)
    while True:
        conn, _ = server.accept()
        with conn:
            data = b""
            while not data.endswith(b"\r\n\r\n"):
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            if data:
                # Corked: the answer and the FIN of the close leave in one segment, one event.
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
                conn.sendall(RESPONSE)


def client(port: int, sessions: int, worker_pid: int) -> None:
    """`sessions` sessions one after another, each resuming the last one's TLS session as wrk does,
    then the worker's stop."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    tls_session = None
    resumed = 0
    for _ in range(sessions):
        sock = socket.create_connection((LOOPBACK, port), timeout=TIMEOUT * 10)
        with context.wrap_socket(sock, server_hostname="localhost", session=tls_session) as tls:
            resumed += bool(tls.session_reused)
            time.sleep(STEP_PAUSE)
            tls.sendall(REQUEST)
            answer = b""
            while chunk := tls.recv(4096):
                answer += chunk
            if not answer.endswith(b"ok"):
                raise SystemExit(f"tls_cost: unexpected answer {answer!r}")
            tls_session = tls.session
    time.sleep(0.2)                 # the worker's close
    os.kill(worker_pid, signal.SIGTERM)
    print(f"resumed {resumed} of {sessions}", file=sys.stderr)


# -- the traced process ---------------------------------------------------------------------
def serve(config_path: str) -> None:
    """A Worker with `config_path`, in this process, until SIGTERM."""
    from pyproxy.config import load_config
    from pyproxy.listeners import open_listener
    from pyproxy.log import ErrorLog
    from pyproxy.shared import SharedState
    from pyproxy.tls.contexts import TLSContexts
    from pyproxy.worker import Worker

    config = load_config(config_path)
    shared = SharedState()
    contexts = TLSContexts(config)
    contexts.install()
    worker = Worker(0, 1, config, [open_listener(listen, 0) for listen in config.stream_listen],
                    ErrorLog(config.error_log, config.log_level), shared, shared.take_row(), contexts)
    worker.master_pid = os.getppid()
    ready_r, ready_w = os.pipe()
    worker.take_signals()
    worker.init_process(ready_w)
    print("ready", flush=True)
    worker.loop.run()
    os.close(ready_r)
    os.close(ready_w)


def wait_ready(proc: subprocess.Popen[str]) -> list[str]:
    """What a helper process printed after "ready" once it is."""
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    if line[:1] != ["ready"]:
        raise SystemExit(f"tls_cost: a helper process did not start ({line!r})")
    return line[1:]


def callgrind_costs(path: str) -> collections.Counter[str]:
    """Self cost (instructions) per object file in a callgrind output file."""
    costs: collections.Counter[str] = collections.Counter()
    current = ""
    skip_next = False
    ref = re.compile(r"\((\d+)\)(?: (.*))?")

    obj_names: dict[str, str] = {}
    with open(path) as data:
        for line in data:
            if line.startswith("ob="):
                match = ref.match(line[3:].strip())
                if match and match.group(2) is not None:
                    obj_names[match.group(1)] = match.group(2)
                current = obj_names.get(match.group(1), line[3:].strip()) if match else line[3:].strip()
            elif line.startswith("cob="):
                match = ref.match(line[4:].strip())
                if match and match.group(2) is not None:
                    obj_names[match.group(1)] = match.group(2)
            elif line.startswith("calls="):
                skip_next = True
            elif line[:1].isdigit() or line[:1] in "+-*":
                if skip_next:
                    skip_next = False
                    continue
                parts = line.split()
                if len(parts) >= 2:
                    costs[current] += int(parts[1])
    return costs


def grouped(costs: collections.Counter[str]) -> dict[str, int]:
    out: dict[str, int] = collections.defaultdict(int)
    for obj, n in costs.items():
        base = os.path.basename(obj)
        for group, needle in GROUPS:
            if needle in base:
                out[group] += n
                break
        else:
            out["other"] += n
    return out


def nginx_config(folder: str, listen_port: int, upstream_port: int) -> str:
    """The benchmark's nginx stream settings for its https port (bench.configs.nginx_stream_conf), in
    one process (no master): the process valgrind traces is the one that serves."""
    cert = make_certificate(folder)
    path = os.path.join(folder, "nginx.conf")
    with open(path, "w") as out:
        out.write(f"""{nginx_stream_head(folder, "nginx", 1)}master_process off;
stream {{
    server {{
        listen {LOOPBACK}:{listen_port} ssl;
        ssl_certificate {cert.cert};
        ssl_certificate_key {cert.key};
        ssl_protocols {SSL_PROTOCOLS};
        proxy_pass {LOOPBACK}:{upstream_port};
    }}
}}
""")
    return path


def wait_listening(port: int, proc: subprocess.Popen[str]) -> None:
    """Until something accepts on `port` (one connection, closed at once: the same in both runs)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("tls_cost: the traced server exited")
        try:
            socket.create_connection((LOOPBACK, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"tls_cost: nothing listens on {port}")


def measure(python: str, sessions: int, folder: str, tree: str | None,
            proxy: str = "pyproxy") -> dict[str, int]:
    """Instructions of a worker (of `proxy`: pyproxy or nginx) that served `sessions` sessions, by group."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # `tree` first: its pyproxy package is the one measured.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (tree, here))))
    up = subprocess.Popen([python, "-m", "bench.tls_cost", "--upstream", "0"],
                          cwd=here, env=env, stdout=subprocess.PIPE, text=True)
    out = os.path.join(folder, f"callgrind.{sessions}.out")
    try:
        port = free_port(random.randrange(20000, 31000))     # from anywhere: other benchmarks may run
        upstream_port = int(wait_ready(up)[0])
        if proxy == "nginx":
            command = ["nginx", "-p", folder, "-c", nginx_config(folder, port, upstream_port)]
        else:
            command = [python, "-m", "bench.tls_cost", "--serve", write_config(folder, port, upstream_port)]
        worker = subprocess.Popen(["valgrind", "--tool=callgrind", "--trace-children=no", "--dump-line=no",
                                   f"--callgrind-out-file={out}", *command], cwd=here, env=env,
                                  stdout=subprocess.PIPE, text=True, stderr=subprocess.DEVNULL)
        if proxy == "nginx":
            wait_listening(port, worker)
        else:
            wait_ready(worker)
        subprocess.run([python, "-m", "bench.tls_cost", "--client", str(port), str(sessions),
                        str(worker.pid)], cwd=here, env=env, check=True)
        if worker.wait(timeout=600) != 0:
            raise SystemExit("tls_cost: the worker failed")
    finally:
        up.kill()
        up.wait()
    return grouped(callgrind_costs(out))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tls_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable, help="the CPython that runs the worker")
    parser.add_argument("--few", type=int, default=FEW)
    parser.add_argument("--many", type=int, default=MANY)
    parser.add_argument("--tree", metavar="DIR", help="measure the pyproxy package in DIR (another version, "
                        "say `git archive <commit> pyproxy | tar -x -C DIR`)")
    parser.add_argument("--proxy", choices=("pyproxy", "nginx"), default="pyproxy",
                        help="trace pyproxy's worker or nginx's stream module (one process)")
    parser.add_argument("--keep", metavar="DIR", help="keep the callgrind files in DIR (callgrind_annotate)")
    parser.add_argument("--serve", metavar="CONFIG", help=argparse.SUPPRESS)
    parser.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--client", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return
    if args.upstream is not None:
        upstream(args.upstream)
        return
    if args.client:
        client(*args.client)
        return
    with tempfile.TemporaryDirectory(prefix="pyproxy-tlscost-") as folder:
        if args.keep:
            os.makedirs(args.keep, exist_ok=True)
        few = measure(args.python, args.few, args.keep or folder, args.tree, args.proxy)
        many = measure(args.python, args.many, args.keep or folder, args.tree, args.proxy)
    sessions = args.many - args.few
    total = sum(many.values()) - sum(few.values())
    who = "nginx" if args.proxy == "nginx" else args.python
    print(f"instructions per TLS session ({who}): {total / sessions:,.0f}")
    for group in sorted(set(few) | set(many), key=lambda g: -(many.get(g, 0) - few.get(g, 0))):
        n = (many.get(group, 0) - few.get(group, 0)) / sessions
        print(f"  {group:10} {n:12,.0f}  {100 * n * sessions / total:5.1f} %")


if __name__ == "__main__":
    main()
