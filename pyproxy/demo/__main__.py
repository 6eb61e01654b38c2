"""`make run`: start the echo upstream on 127.0.0.1:1025, then pyproxy in the foreground.

Ctrl-C stops both. The seed's check then works from another terminal:

    telnet 127.0.0.1 9000          (or: nc 127.0.0.1 9000)
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys

from pyproxy.demo.echo import EchoServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyproxy.demo")
    parser.add_argument("-c", "--conf", default="conf/pyproxy.conf")
    parser.add_argument("--echo", default="127.0.0.1:1025", help="where the echo upstream listens")
    args = parser.parse_args(argv)

    host, _, port = args.echo.rpartition(":")
    try:
        echo = EchoServer(host, int(port), name="echo-1025").start()
    except OSError as exc:
        print(f"demo: cannot start the echo upstream on {args.echo}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"demo: echo upstream on {args.echo}; starting pyproxy -c {args.conf}", file=sys.stderr)
    print("demo: try `telnet 127.0.0.1 9000` (or `nc 127.0.0.1 9000`); Ctrl-C stops", file=sys.stderr)
    proxy = subprocess.Popen([sys.executable, "-m", "pyproxy", "-c", args.conf])
    signal.signal(signal.SIGTERM, _interrupt)       # stopped by a supervisor: stop pyproxy too
    try:
        proxy.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if proxy.poll() is None:
            proxy.send_signal(signal.SIGINT)        # fast shutdown, like Ctrl-C in nginx's foreground
            proxy.wait()
        echo.stop()
    return 0 if proxy.returncode in (0, -signal.SIGINT) else proxy.returncode


def _interrupt(signum, frame):
    raise KeyboardInterrupt

if __name__ == "__main__":
    raise SystemExit(main())
