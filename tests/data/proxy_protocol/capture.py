#!/usr/bin/env python3
"""Regenerate the captured PROXY protocol headers in this folder:
``python tests/data/proxy_protocol/capture.py``.

Each ``NAME.bin`` holds the first bytes a real HAProxy (``haproxy`` from the distribution, run here in
the foreground with a generated ``mode tcp`` configuration) sent to a backend server configured with
``send-proxy`` or ``send-proxy-v2``: the PROXY header, then the payload the client sent through it
(nothing after the header for a health check). ``manifest.json`` says which HAProxy line produced
each file and what a parser must find in it. The expectations do not come from pyproxy's parser
(that would test it against itself):

* addresses and ports: what the client socket saw (``getsockname``/``getpeername``), or the
  constants the configuration told HAProxy to announce (``tcp-request connection set-src`` etc.);
* TLVs: the constants configured (``unique-id-format``), what the TLS client negotiated (version,
  cipher, ALPN, SNI) and the client certificate's CN; the CRC32C's value is the one thing only
  HAProxy knows, and the manifest just says it is there;
* ``length``: the framing (first CRLF for v1, 16 + the length field for v2), checked against the
  payload that must follow it byte for byte.

The script starts and stops HAProxy itself and gives up after ``DEADLINE`` seconds. Traffic stays
on 127.0.0.1 (the IPv6 addresses in some headers are announced, never connected to) and on UNIX
sockets in a temporary folder; every listening port is picked in 20000-30000, never an ephemeral one.
"""

from __future__ import annotations

import json
import random
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PORT_RANGE = (20000, 30000)
DEADLINE = 30.0  # seconds, for the whole run
IO_TIMEOUT = 5.0

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
PP2_TYPE_ALPN, PP2_TYPE_AUTHORITY, PP2_TYPE_CRC32C = 0x01, 0x02, 0x03
PP2_TYPE_UNIQUE_ID, PP2_TYPE_SSL = 0x05, 0x20
PP2_SUBTYPE_SSL_VERSION, PP2_SUBTYPE_SSL_CN, PP2_SUBTYPE_SSL_CIPHER = 0x21, 0x22, 0x23

SET_V6 = [
    "tcp-request connection set-src ipv6(2001:db8::1)",
    "tcp-request connection set-src-port int(40001)",
    "tcp-request connection set-dst ipv6(2001:db8::2)",
    "tcp-request connection set-dst-port int(443)",
]
SET_V6_SOURCE_ONLY = ["tcp-request connection set-src ipv6(2001:db8::1)"]
UNIQUE_ID = "pyproxy-capture-unique-id-0001"
SNI = "pp.example"
CLIENT_CN = "client.pp.example"


# --- framing, independent of pyproxy's parser -------------------------------------------------


def header_length(wire: bytes) -> int | None:
    """The header's length by its framing alone, or ``None`` if it is not all in ``wire``."""
    if wire.startswith(V2_SIGNATURE):
        if len(wire) < 16:
            return None
        total = 16 + int.from_bytes(wire[14:16], "big")
        return total if len(wire) >= total else None
    end = wire.find(b"\r\n")
    return end + 2 if end >= 0 else None


def split_tlvs(block: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    while pos < len(block):
        length = int.from_bytes(block[pos + 1 : pos + 3], "big")
        out.append((block[pos], block[pos + 3 : pos + 3 + length]))
        pos += 3 + length
    assert pos == len(block), "TLVs do not fill the block"
    return out


# --- ports and sinks --------------------------------------------------------------------------


_taken: set[int] = set()


def pick_port(listen: bool) -> tuple[int, socket.socket | None]:
    """A free loopback port in PORT_RANGE; with ``listen``, the socket listening on it."""
    ports = [p for p in range(*PORT_RANGE) if p not in _taken]
    random.shuffle(ports)
    for port in ports:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            sock.close()
            continue
        _taken.add(port)
        if listen:
            sock.listen(4)
            return port, sock
        sock.close()
        return port, None
    raise RuntimeError(f"no free port in {PORT_RANGE}")


class Sink(threading.Thread):
    """The backend server: accepts one connection and keeps what it receives until ``expect``
    follows a complete header (or the peer closes)."""

    def __init__(self, expect: bytes):
        super().__init__(daemon=True)
        self.port, self.listener = pick_port(listen=True)
        self.expect = expect
        self.data = b""
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            self.listener.settimeout(IO_TIMEOUT * 2)
            # A health check may reset its connection before the header is out: wait for the next.
            for _ in range(10):
                conn, _ = self.listener.accept()
                with conn:
                    self.data = self._receive(conn)
                if header_length(self.data) is not None:
                    break
        except Exception as e:  # reported by the main thread
            self.error = e
        finally:
            self.listener.close()

    def _receive(self, conn: socket.socket) -> bytes:
        conn.settimeout(IO_TIMEOUT)
        data = b""
        while True:
            length = header_length(data)
            if length is not None and self.expect and data[length:] == self.expect:
                return data
            try:
                chunk = conn.recv(65536)
            except ConnectionResetError:
                return data  # HAProxy closes its health checks with a reset
            if not chunk:
                return data
            data += chunk


# --- HAProxy ----------------------------------------------------------------------------------


def listening_ports() -> set[int]:
    """Loopback TCP ports in LISTEN state, from /proc/net/tcp (no probing connection needed)."""
    ports = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[1].startswith("0100007F:"):
            ports.add(int(fields[1].split(":")[1], 16))
    return ports


def haproxy_version() -> str:
    out = subprocess.run(["haproxy", "-v"], capture_output=True, text=True, check=True, timeout=10).stdout
    return out.splitlines()[0]


def make_certificates(folder: Path) -> None:
    """A server certificate for the TLS frontend and a self-signed client certificate (its own CA)."""
    for name, cn in (("server", SNI), ("client", CLIENT_CN)):
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-subj", f"/CN={cn}", "-days", "2", "-keyout", str(folder / f"{name}.key"),
             "-out", str(folder / f"{name}.crt")],
            check=True, capture_output=True, timeout=20,
        )
    server_pem = (folder / "server.crt").read_bytes() + (folder / "server.key").read_bytes()
    (folder / "server.pem").write_bytes(server_pem)


# --- the cases --------------------------------------------------------------------------------


class Case:
    """One HAProxy ``listen`` section, the client that goes through it and what must come out."""

    def __init__(self, name, description, server_options, *, rules=(), bind="tcp", health_check=False):
        self.name = name
        self.description = description
        self.server_options = server_options
        self.rules = list(rules)
        self.bind = bind  # "tcp", "unix" or "tls"
        self.health_check = health_check
        self.payload = b"" if health_check else f"hello from the {name} client\r\n".encode()
        self.sink = Sink(self.payload)
        self.port = None if bind == "unix" else pick_port(listen=False)[0]
        self.unix_path: Path | None = None
        self.client_info: dict = {}

    def section(self, folder: Path) -> str:
        lines = [f"listen {self.name}"]
        if self.bind == "unix":
            self.unix_path = folder / f"{self.name}.sock"
            lines.append(f"    bind unix@{self.unix_path}")
        elif self.bind == "tls":
            lines.append(
                f"    bind 127.0.0.1:{self.port} ssl crt {folder / 'server.pem'} "
                f"ca-file {folder / 'client.crt'}"
                " verify optional alpn h2,http/1.1"
            )
        else:
            lines.append(f"    bind 127.0.0.1:{self.port}")
        if "unique-id" in self.server_options:
            lines.append(f"    unique-id-format {UNIQUE_ID}")
        lines += [f"    {rule}" for rule in self.rules]
        check = " check check-send-proxy inter 300ms" if self.health_check else ""
        lines.append(f"    server s 127.0.0.1:{self.sink.port} {self.server_options}{check}")
        return "\n".join(lines)

    def server_line(self) -> str:
        line = f"server s 127.0.0.1:PORT {self.server_options}"
        return line + (" check check-send-proxy inter 300ms" if self.health_check else "")

    def run_client(self, folder: Path) -> None:
        if self.health_check:
            return  # HAProxy's own check connects
        if self.bind == "unix":
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(IO_TIMEOUT)
                sock.connect(str(self.unix_path))
                sock.sendall(self.payload)
                self.sink.join(IO_TIMEOUT * 2)
            return
        with socket.create_connection(("127.0.0.1", self.port), timeout=IO_TIMEOUT) as sock:
            self.client_info["source"] = list(sock.getsockname())
            self.client_info["destination"] = list(sock.getpeername())
            if self.bind == "tls":
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                ctx.set_alpn_protocols(["h2"])
                ctx.load_cert_chain(folder / "client.crt", folder / "client.key")
                with ctx.wrap_socket(sock, server_hostname=SNI) as tls:
                    tls.sendall(self.payload)
                    self.client_info.update(version=tls.version(), cipher=tls.cipher()[0],
                                            alpn=tls.selected_alpn_protocol())
                    self.sink.join(IO_TIMEOUT * 2)
                return
            sock.sendall(self.payload)
            self.sink.join(IO_TIMEOUT * 2)


def expectations(case: Case, wire: bytes) -> dict:
    length = header_length(wire)
    assert length is not None, f"{case.name}: incomplete header {wire!r}"
    assert wire[length:] == case.payload, (f"{case.name}: {wire[length:]!r} follows "
                                           "the header, not the payload")
    v2 = wire.startswith(V2_SIGNATURE)
    info = case.client_info
    source = destination = None
    family = None
    if case.rules == SET_V6:
        family, source, destination = "AF_INET6", ["2001:db8::1", 40001], ["2001:db8::2", 443]
    elif case.rules == SET_V6_SOURCE_ONLY:
        # HAProxy sends IPv4-mapped IPv6 for the IPv4 side when the families differ.
        family, source = "AF_INET6", ["2001:db8::1", info["source"][1]]
        destination = ["::ffff:" + info["destination"][0], info["destination"][1]]
    elif case.bind != "unix" and not case.health_check:
        family, source, destination = "AF_INET", info["source"], info["destination"]
    expected: dict = {
        "version": 2 if v2 else 1,
        "command": "LOCAL" if v2 and family is None else "PROXY",
        "family": family,
        "source": source,
        "destination": destination,
        "length": length,
        "payload": case.payload.decode(),
    }
    if v2:
        address_length = {None: 0, "AF_INET": 12, "AF_INET6": 36}[family]
        tlvs = split_tlvs(wire[16 + address_length : length])
        expected["tlv_types"] = [t for t, _ in tlvs]
        known = {}
        if "unique-id" in case.server_options:
            known[PP2_TYPE_UNIQUE_ID] = UNIQUE_ID.encode()
        if case.bind == "tls":
            known[PP2_TYPE_ALPN] = info["alpn"].encode()
            known[PP2_TYPE_AUTHORITY] = SNI.encode()
            expected["ssl"] = {
                "client": 0x07,  # PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS
                "verify": 0,  # the client certificate was presented and verified
                "tlvs": [
                    [PP2_SUBTYPE_SSL_VERSION, info["version"]],
                    [PP2_SUBTYPE_SSL_CN, CLIENT_CN],
                    [PP2_SUBTYPE_SSL_CIPHER, info["cipher"]],
                ],
            }
        expected["tlv_values"] = {f"0x{t:02x}": v.decode() for t, v in known.items()}
    return expected


def main() -> None:
    started = time.monotonic()
    cases = [
        Case("v1_tcp4", "send-proxy, client on 127.0.0.1", "send-proxy"),
        Case("v1_tcp6", "send-proxy, IPv6 addresses announced with set-src/set-dst", "send-proxy",
             rules=SET_V6),
        Case("v1_mixed", "send-proxy, IPv6 source and IPv4 destination (sent as TCP6, IPv4-mapped)",
             "send-proxy", rules=SET_V6_SOURCE_ONLY),
        Case("v1_unknown_unix", "send-proxy, client on a UNIX socket (sent as UNKNOWN)", "send-proxy",
             bind="unix"),
        Case("v2_tcp4", "send-proxy-v2, client on 127.0.0.1", "send-proxy-v2"),
        Case("v2_tcp6", "send-proxy-v2, IPv6 addresses announced with set-src/set-dst", "send-proxy-v2",
             rules=SET_V6),
        Case("v2_mixed", "send-proxy-v2, IPv6 source and IPv4 destination (sent as AF_INET6, IPv4-mapped)",
             "send-proxy-v2", rules=SET_V6_SOURCE_ONLY),
        Case("v2_crc32c_unique_id", "send-proxy-v2 with a CRC32C and a UNIQUE_ID TLV",
             "send-proxy-v2 proxy-v2-options crc32c,unique-id"),
        Case("v2_local_unix_crc32c", "send-proxy-v2, client on a UNIX socket (sent as LOCAL), CRC32C TLV",
             "send-proxy-v2 proxy-v2-options crc32c", bind="unix"),
        Case("v2_healthcheck_local", "send-proxy-v2 on a health check (LOCAL, no client)",
             "send-proxy-v2", health_check=True),
        Case("v2_ssl",
             "send-proxy-v2-ssl-cn behind a TLS frontend: SSL TLV with version, CN and cipher, plus ALPN,"
             " AUTHORITY (the SNI) and CRC32C",
             "send-proxy-v2-ssl-cn proxy-v2-options ssl,cert-cn,ssl-cipher,authority,crc32c",
             bind="tls"),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_certificates(folder)
        config = "\n".join([
            "global",
            "    nbthread 1",
            "defaults",
            "    mode tcp",
            "    timeout connect 2s",
            "    timeout client 5s",
            "    timeout server 5s",
            "",
            *(case.section(folder) + "\n" for case in cases),
        ])
        (folder / "haproxy.cfg").write_text(config)
        for case in cases:
            case.sink.start()
        log = open(folder / "haproxy.log", "w+")     # noqa: SIM115 (haproxy writes it for the whole run)
        haproxy = subprocess.Popen(["haproxy", "-db", "-f", str(folder / "haproxy.cfg")],
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            ports = {c.port for c in cases if c.port}
            unix_paths = [c.unix_path for c in cases if c.bind == "unix"]
            while not ports <= listening_ports() or not all(path.exists() for path in unix_paths):
                if haproxy.poll() is not None or time.monotonic() - started > DEADLINE:
                    raise RuntimeError("haproxy did not start")
                time.sleep(0.05)
            for case in cases:
                case.run_client(folder)
            for case in cases:
                case.sink.join(max(0.1, DEADLINE - (time.monotonic() - started)))
                if case.sink.is_alive() or case.sink.error:
                    raise RuntimeError(f"{case.name}: nothing captured ({case.sink.error or 'timeout'})")
        except BaseException:
            log.seek(0)
            print(log.read())
            raise
        finally:
            if haproxy.poll() is None:
                haproxy.send_signal(signal.SIGTERM)
                try:
                    haproxy.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    haproxy.kill()
                    haproxy.wait()
            log.close()

    version = haproxy_version()
    entries = []
    for case in cases:
        wire = case.sink.data
        (HERE / f"{case.name}.bin").write_bytes(wire)
        entries.append({
            "file": f"{case.name}.bin",
            "description": case.description,
            "source": f"{version}: {case.server_line()}" + "".join(f"; {r}" for r in case.rules),
            "expected": expectations(case, wire),
        })
    manifest = {
        "about": "Real PROXY protocol headers sent by HAProxy, each followed by the client's payload;"
                 " regenerate with capture.py (see its docstring).",
        "headers": entries,
    }
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for e in entries:
        x = e["expected"]
        print(f"{e['file']:28} v{x['version']} {x['command']:5} {x['family']!s:8} {x['length']:4} bytes"
              f" {x['source']} -> {x['destination']} tlvs={x.get('tlv_types')}")


if __name__ == "__main__":
    main()
