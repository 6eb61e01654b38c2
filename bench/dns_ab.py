"""A session to a host name that follows DNS costs what a session to an IP address costs (issue 20).

    python -m bench.dns_ab               # 300 counted sessions of each
    python -m bench.dns_ab -n 1000

The same worker and sessions as bench.calls (plain TCP, 1000 bytes echoed), twice: the service's
host written as an IP address, then as a host name (resolved from a hosts file of its own, as the
master would, and followed through the shared DNS table, which the balancer checks at every pick).
Counted, not timed: Python calls and bytecodes per session, in all and in upstream.py (the balancer),
where the only difference lives.
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import calls
from bench.configs import LOOPBACK

NAME = "echo.bench"
_ip_config = calls.write_config


def _name_config(folder: str, mode: str, listen_port: int, upstream_port: int) -> str:
    """bench.calls' configuration with the service's host written as a name."""
    path = _ip_config(folder, mode, listen_port, upstream_port)
    hosts = os.path.join(folder, "hosts")
    with open(hosts, "w") as out:
        out.write(f"{LOOPBACK} {NAME}\n")
    with open(path) as fh:
        text = fh.read()
    with open(path, "w") as out:
        out.write(f"dns_hostsfile: {hosts}\n" + text.replace(f"host: {LOOPBACK}", f"host: {NAME}"))
    return path


def measure(variant: str, sessions: int) -> tuple[float, float, float, float]:
    """(calls, calls in upstream.py, bytecodes, bytecodes in upstream.py) per session, in a child."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            calls.write_config = _name_config if variant == "name" else _ip_config
            counted = calls.count("tcp", sessions, bytecodes=False)
            traced = calls.count("tcp", sessions, bytecodes=True)
            numbers = (sum(counted.calls.values()),
                       sum(n for (name, _), n in counted.calls.items() if name == "upstream.py"),
                       sum(traced.bytecodes.values()), traced.bytecodes["upstream.py"])
            os.write(write, " ".join(str(n / sessions) for n in numbers).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    data = os.read(read, 4096)
    os.close(read)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0 or not data:
        raise SystemExit(f"dns_ab: the {variant} run failed")
    first, second, third, fourth = (float(word) for word in data.split())
    return first, second, third, fourth


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.dns_ab", description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--sessions", type=int, default=300, help="sessions counted (default 300)")
    args = parser.parse_args(argv)
    print("target       calls/session  in upstream.py  bytecodes/session  in upstream.py")
    for variant, label in (("ip", f"{LOOPBACK}"), ("name", NAME)):
        all_calls, balancer_calls, bytecodes, balancer_bytecodes = measure(variant, args.sessions)
        print(f"{label:<12} {all_calls:13.2f}  {balancer_calls:14.2f}  {bytecodes:17.1f}  "
              f"{balancer_bytecodes:14.1f}")


if __name__ == "__main__":
    main()
