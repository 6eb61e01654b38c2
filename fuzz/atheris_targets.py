"""Coverage-guided fuzzing of pyproxy's parsers with atheris (libFuzzer), for longer runs than the
Hypothesis properties in the normal test suite.

    .venv/bin/pip install atheris
    .venv/bin/python fuzz/atheris_targets.py clienthello -max_total_time=600
    .venv/bin/python fuzz/atheris_targets.py proxy_protocol -max_total_time=600
    .venv/bin/python fuzz/atheris_targets.py config -max_total_time=600 -max_len=4096

The seeds are the real captures in tests/data (hellos from Python's ssl and openssl s_client,
PROXY headers from HAProxy) and the demo configuration. Any exception other than the parser's
own error type is a finding; libFuzzer then writes the input to crash-<sha1>.
"""

from __future__ import annotations

import os
import sys
import tempfile

import atheris

with atheris.instrument_imports():
    from pyproxy.config import ConfigError, load_config
    from pyproxy.proxy_protocol import ProxyProtocolError, parse_proxy_header
    from pyproxy.tls.clienthello import ClientHelloError, parse_client_hello

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "tests", "data")


def clienthello(data: bytes) -> None:
    try:
        parse_client_hello(data)
    except ClientHelloError:
        pass


def proxy_protocol(data: bytes) -> None:
    try:
        parse_proxy_header(data)
    except ProxyProtocolError:
        pass


_CONFIG_DIR = tempfile.mkdtemp(prefix="pyproxy-fuzz-")
_CONFIG = os.path.join(_CONFIG_DIR, "pyproxy.conf")


def config(data: bytes) -> None:
    with open(_CONFIG, "wb") as fh:
        fh.write(data)
    try:
        load_config(_CONFIG)
    except ConfigError as exc:
        assert exc.errors, "a ConfigError must name at least one place"


TARGETS = {"clienthello": (clienthello, "hellos"), "proxy_protocol": (proxy_protocol, "proxy_protocol"),
           "config": (config, None)}


def seeds(folder: str | None) -> list[str]:
    """A corpus directory filled with the real captures (libFuzzer also writes what it finds there)."""
    corpus = tempfile.mkdtemp(prefix="pyproxy-corpus-")
    sources = []
    if folder:
        path = os.path.join(DATA, folder)
        sources = [os.path.join(path, f) for f in os.listdir(path) if f.endswith(".bin")]
    else:
        sources = [os.path.join(HERE, "..", "conf", "pyproxy.conf")]
    for i, source in enumerate(sources):
        with open(source, "rb") as src, open(os.path.join(corpus, f"seed{i}"), "wb") as dst:
            dst.write(src.read())
    return [corpus]


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{'|'.join(TARGETS)}}} [libFuzzer options]")
    target, folder = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:], *seeds(folder)], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
