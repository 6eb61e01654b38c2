"""`make run`: start the echo upstream on 127.0.0.1:1025, then pyproxy in the foreground.

`make run-gateway` is the same demo with conf/pyproxy-gateway.conf, which reads the seed's Gateway API
manifests (examples/gateway/) and a Secret made from the demo certificate (`--gateway-secret FILE`).

On first run it makes the demo's self-signed certificate for tls9443.kong.example (conf/certs/), unless
`make install` already has (`--certificate-only`), so that `pyproxy -t -c conf/pyproxy.conf` passes.
Ctrl-C stops both. The seed's checks then work from another terminal:

    telnet 127.0.0.1 9000          (or: nc 127.0.0.1 9000)
    echo "hello" | openssl s_client -connect 127.0.0.1:9443 -servername tls9443.kong.example -quiet
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import subprocess
import sys
from types import FrameType
from typing import NoReturn

import yaml

from pyproxy.demo.echo import EchoServer

DEMO_NAME = "tls9443.kong.example"


def ensure_certificate(conf_dir: str) -> None:
    """Create certs/tls9443.kong.example.{crt,key} beside the config, once (openssl CLI)."""
    certs = os.path.join(conf_dir, "certs")
    crt = os.path.join(certs, f"{DEMO_NAME}.crt")
    key = os.path.join(certs, f"{DEMO_NAME}.key")
    if os.path.exists(crt) and os.path.exists(key):
        return
    os.makedirs(certs, exist_ok=True)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "365",
                    "-subj", f"/CN={DEMO_NAME}", "-addext", f"subjectAltName=DNS:{DEMO_NAME}",
                    "-keyout", key, "-out", crt], check=True, capture_output=True, timeout=60)
    os.chmod(key, 0o600)
    print(f"demo: made a self-signed certificate for {DEMO_NAME} in {certs}", file=sys.stderr)


def write_gateway_secret(conf_dir: str, path: str) -> None:
    """The demo certificate as the kubernetes.io/tls Secret tls9443.kong.example that the seed's
    Gateway names, as `kubectl create secret tls` writes it (mode 0600: it holds the key)."""
    certs = os.path.join(conf_dir, "certs")
    data = {}
    for field, suffix in (("tls.crt", "crt"), ("tls.key", "key")):
        with open(os.path.join(certs, f"{DEMO_NAME}.{suffix}"), "rb") as stream:
            data[field] = base64.b64encode(stream.read()).decode()
    secret = {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
              "metadata": {"name": DEMO_NAME, "namespace": "default"}, "data": data}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(descriptor, "w") as stream:
        stream.write("# Made by `make run-gateway` from certs/tls9443.kong.example.{crt,key}.\n")
        yaml.safe_dump(secret, stream, sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyproxy.demo")
    parser.add_argument("-c", "--conf", default="conf/pyproxy.conf")
    parser.add_argument("--echo", default="127.0.0.1:1025", help="where the echo upstream listens")
    parser.add_argument("--certificate-only", action="store_true",
                        help="make the demo certificate if it is missing, then exit (`make install`)")
    parser.add_argument("--gateway-secret", metavar="FILE",
                        help="write the demo certificate as a Kubernetes TLS Secret to FILE, then exit")
    args = parser.parse_args(argv)

    try:
        ensure_certificate(os.path.dirname(os.path.abspath(args.conf)))
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"demo: cannot make the demo certificate with openssl: {exc}", file=sys.stderr)
        return 1
    if args.gateway_secret:
        write_gateway_secret(os.path.dirname(os.path.abspath(args.conf)), args.gateway_secret)
        return 0
    if args.certificate_only:
        return 0
    host, _, port = args.echo.rpartition(":")
    try:
        echo = EchoServer(host, int(port), name="echo-1025").start()
    except OSError as exc:
        print(f"demo: cannot start the echo upstream on {args.echo}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"demo: echo upstream on {args.echo}; starting pyproxy -c {args.conf}", file=sys.stderr)
    print("demo: try `telnet 127.0.0.1 9000` (or `nc 127.0.0.1 9000`) and\n"
          f"demo:     echo hello | openssl s_client -connect 127.0.0.1:9443 -servername {DEMO_NAME} -quiet\n"
          "demo: Ctrl-C stops", file=sys.stderr)
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


def _interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt

if __name__ == "__main__":
    raise SystemExit(main())
