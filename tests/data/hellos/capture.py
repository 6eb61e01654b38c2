#!/usr/bin/env python3
"""Regenerate the captured ClientHellos in this folder: ``python tests/data/hellos/capture.py``.

Each ``NAME.bin`` holds the bytes a real client sent, from the first byte of the connection through
the end of the TLS record that completes its ClientHello. ``manifest.json`` says where each came
from and what a parser must find in it. The expectations do not come from pyproxy's parser (that
would test it against itself):

* Python ``ssl`` hellos (MemoryBIO, no socket): from what the context was asked to offer.
* ``openssl s_client`` hellos (a real TCP connection to a listener on 127.0.0.1): from the
  client's own ``-trace`` decoding of the record it sent, kept next to it as ``NAME.trace.txt``.
* ``padded_pq_2records.bin``: a captured hello enlarged past 16 KiB the way hybrid post-quantum
  key shares enlarge real ones, re-framed into two records; expectations from the edit.

Traffic goes to 127.0.0.1 only, on a port picked in 20000-30000 (never an ephemeral one).
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SNI = "tls9443.kong.example"
# A hex dump line under server_name in `openssl s_client -trace`: "0000 - 00 17 00 00 14 74 6c 73 ..."
SNI_HEX_LINE = r"[0-9a-f]{4} - ((?:[0-9a-f]{2}[ -])*[0-9a-f]{2})"
PORT_RANGE = (20000, 30000)

TLS12, TLS13 = 0x0303, 0x0304
RECORD_LIMIT = 2**14
EXT_SUPPORTED_GROUPS, EXT_PADDING, EXT_KEY_SHARE = 10, 21, 51
X25519_MLKEM768, MLKEM768_SHARE_LENGTH = 0x11EC, 1216  # draft-kwiatkowski-tls-ecdhe-mlkem
PADDED_MESSAGE_LENGTH = 17000  # > 2^14: the handshake message needs two records


# --- framing, independent of pyproxy's parser -------------------------------------------------


def read_hello(recv) -> bytes:
    """Read whole records with ``recv(n)`` until the handshake message in them is complete."""
    wire = bytearray()
    handshake = bytearray()

    def exactly(n: int) -> bytes:
        chunk = bytearray()
        while len(chunk) < n:
            more = recv(n - len(chunk))
            if not more:
                raise EOFError(f"client closed after {len(wire) + len(chunk)} bytes")
            chunk += more
        return bytes(chunk)

    while len(handshake) < 4 or len(handshake) < 4 + int.from_bytes(handshake[1:4], "big"):
        header = exactly(5)
        if header[0] != 0x16:
            raise ValueError(f"unexpected record type {header[0]}")
        fragment = exactly(int.from_bytes(header[3:5], "big"))
        wire += header + fragment
        handshake += fragment
    return bytes(wire)


def split_records(wire: bytes) -> list[tuple[bytes, bytes]]:
    """[(header, fragment)] of the records in ``wire``."""
    records, pos = [], 0
    while pos < len(wire):
        length = int.from_bytes(wire[pos + 3 : pos + 5], "big")
        records.append((wire[pos : pos + 5], wire[pos + 5 : pos + 5 + length]))
        pos += 5 + length
    return records


# --- Python's ssl module ----------------------------------------------------------------------


def capture_python(server_hostname, alpn=None, minimum=ssl.TLSVersion.TLSv1_2,
                   maximum=ssl.TLSVersion.TLSv1_3):
    """The first flight of an ``SSLObject`` over MemoryBIOs: no socket involved."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if server_hostname is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version, ctx.maximum_version = minimum, maximum
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass  # it sent its ClientHello and now waits for the server
    wire = outgoing.read()
    return read_hello(_reader(wire))


def _reader(wire: bytes):
    pos = 0

    def recv(n: int) -> bytes:
        nonlocal pos
        chunk = wire[pos : pos + n]
        pos += len(chunk)
        return chunk

    return recv


# --- the openssl s_client command -------------------------------------------------------------


def listen_below_ephemeral() -> socket.socket:
    """A loopback listener on a free port in PORT_RANGE (well below the ephemeral range)."""
    ports = list(range(*PORT_RANGE))
    random.shuffle(ports)
    for port in ports:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            sock.close()
            continue
        sock.listen(1)
        return sock
    raise RuntimeError(f"no free port in {PORT_RANGE}")


def capture_openssl(args: list[str]) -> tuple[bytes, str, str]:
    """Run ``openssl s_client`` against a listener that reads its ClientHello, then hangs up.

    Returns (bytes, s_client's -trace output, the command line with the port shown as PORT).
    """
    listener = listen_below_ephemeral()
    port = listener.getsockname()[1]
    with listener, tempfile.TemporaryDirectory() as tmp:
        trace_path = os.path.join(tmp, "trace.txt")
        command = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *args]
        client = subprocess.Popen(
            [*command, "-trace", "-msgfile", trace_path],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            listener.settimeout(10)
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(10)
                wire = read_hello(conn.recv)
            client.wait(timeout=10)  # it gets EOF instead of a ServerHello and gives up
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
        trace = Path(trace_path).read_text()
    shown = " ".join(command).replace(f":{port}", ":PORT")
    return wire, trace, shown


def decode_trace(trace: str) -> dict:
    """What ``s_client -trace`` says about the first ClientHello it sent."""
    lines = trace.splitlines()
    start = next(i for i, line in enumerate(lines) if "ClientHello, Length=" in line)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("Sent Record")), len(lines))
    block = lines[start:end]
    record_versions = re.findall(r"Version = .*\((0x[0-9a-f]+)\)", "\n".join(lines[:start]))
    out: dict = {
        "record_version": int(record_versions[-1], 16),
        "legacy_version": int(re.search(r"client_version=(0x[0-9a-f]+)", "\n".join(block)).group(1), 16),
        "cipher_suites": [],
        "extensions": [],
        "versions": None,
        "alpn": [],
        "sni": None,
    }
    section = None
    sni_hex: list[str] = []
    for line in block:
        text = line.strip()
        if m := re.match(r"\{0x([0-9A-Fa-f]{2}), 0x([0-9A-Fa-f]{2})\}", text):
            out["cipher_suites"].append(int(m.group(1) + m.group(2), 16))
            continue
        if m := re.match(r"extension_type=([a-z_]+|unknown)\((\d+)\)", text):
            section = m.group(1)
            out["extensions"].append(int(m.group(2)))
            if section == "supported_versions":
                out["versions"] = []
            continue
        if section == "supported_versions" and (m := re.match(r".*\((\d+)\)$", text)):
            out["versions"].append(int(m.group(1)))
        elif section == "application_layer_protocol_negotiation" and text:
            out["alpn"].append(text)
        elif section == "server_name" and (m := re.match(SNI_HEX_LINE, text)):
            sni_hex += re.findall(r"[0-9a-f]{2}", m.group(1))
    if sni_hex:
        raw = bytes.fromhex("".join(sni_hex))
        out["sni"] = raw[5 : 5 + int.from_bytes(raw[3:5], "big")].decode("ascii")
    if out["versions"] is None:
        out["versions"] = [out["legacy_version"]]
    return out


# --- a hello past 16 KiB ----------------------------------------------------------------------


def enlarge(wire: bytes) -> tuple[bytes, list[int]]:
    """Add an X25519MLKEM768-sized key share (and its group) plus RFC 7685 padding, so that the
    handshake message is PADDED_MESSAGE_LENGTH bytes, and frame it into 2^14-byte records.

    Returns the new bytes and the new extension type list.
    """
    records = split_records(wire)
    record_header = records[0][0]
    message = b"".join(fragment for _, fragment in records)
    message = message[: 4 + int.from_bytes(message[1:4], "big")]
    body = message[4:]
    pos = 2 + 32
    pos += 1 + body[pos]  # session_id
    pos += 2 + int.from_bytes(body[pos : pos + 2], "big")  # cipher_suites
    pos += 1 + body[pos]  # compression_methods
    fixed, ext_block = body[:pos], body[pos + 2 :]

    extensions = []
    i = 0
    while i < len(ext_block):
        ext_type = int.from_bytes(ext_block[i : i + 2], "big")
        length = int.from_bytes(ext_block[i + 2 : i + 4], "big")
        data = ext_block[i + 4 : i + 4 + length]
        if ext_type == EXT_SUPPORTED_GROUPS:  # offer the hybrid group first, as browsers do
            groups = X25519_MLKEM768.to_bytes(2, "big") + data[2:]
            data = len(groups).to_bytes(2, "big") + groups
        elif ext_type == EXT_KEY_SHARE:
            share = X25519_MLKEM768.to_bytes(2, "big") + MLKEM768_SHARE_LENGTH.to_bytes(2, "big")
            shares = share + random.randbytes(MLKEM768_SHARE_LENGTH) + data[2:]
            data = len(shares).to_bytes(2, "big") + shares
        extensions.append((ext_type, data))
        i += 4 + length

    def assemble(pad: int | None) -> bytes:
        exts = list(extensions) + ([(EXT_PADDING, bytes(pad))] if pad is not None else [])
        block = b"".join(t.to_bytes(2, "big") + len(d).to_bytes(2, "big") + d for t, d in exts)
        new_body = fixed + len(block).to_bytes(2, "big") + block
        return b"\x01" + len(new_body).to_bytes(3, "big") + new_body

    padding = PADDED_MESSAGE_LENGTH - len(assemble(0))
    assert 0 <= padding < 2**16, padding
    message = assemble(padding)
    assert len(message) == PADDED_MESSAGE_LENGTH
    out = bytearray()
    for start in range(0, len(message), RECORD_LIMIT):
        fragment = message[start : start + RECORD_LIMIT]
        out += record_header[:3] + len(fragment).to_bytes(2, "big") + fragment
    return bytes(out), [t for t, _ in extensions] + [EXT_PADDING]


# --- main ---------------------------------------------------------------------------------------


def _hex(values) -> list[str]:
    return [f"0x{v:04x}" for v in values]


def entry(name, wire, description, source, *, sni, alpn, versions, legacy_version, record_version,
          extra=None):
    (HERE / f"{name}.bin").write_bytes(wire)
    expected = {
        "sni": sni,
        "alpn": list(alpn),
        "versions": _hex(versions),
        "legacy_version": f"0x{legacy_version:04x}",
        "record_version": f"0x{record_version:04x}",
        "records": len(split_records(wire)),
        "length": len(wire),
    }
    expected.update(extra or {})
    return {"file": f"{name}.bin", "description": description, "source": source, "expected": expected}


def main() -> None:
    entries = []
    py = f"Python {sys.version.split()[0]} ssl ({ssl.OPENSSL_VERSION})"
    v12, v13 = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3

    def python_case(name, description, hostname, alpn=None, minimum=v12, maximum=v13):
        wire = capture_python(hostname, alpn, minimum, maximum)
        versions = [v for v in (TLS13, TLS12) if minimum <= _py_version(v) <= maximum]
        # OpenSSL sends supported_versions only when it offers TLS 1.3; without it the
        # legacy_version is the offer.
        entries.append(
            entry(
                name, wire, description,
                f"{py}: SSLContext(PROTOCOL_TLS_CLIENT).wrap_bio(server_hostname={hostname!r}),"
                f" ALPN {alpn}, {minimum.name}..{maximum.name}",
                sni=hostname.lower() if hostname else None,
                alpn=alpn or [],
                versions=versions,
                legacy_version=TLS12,
                record_version=0x0301,
            )
        )

    python_case("python_sni", "Python ssl client, SNI, TLS 1.2-1.3", SNI)
    python_case("python_no_sni", "Python ssl client, no server_name extension", None)
    python_case("python_alpn", "Python ssl client, SNI, ALPN h2 + http/1.1", SNI, ["h2", "http/1.1"])
    python_case("python_tls12_only", "Python ssl client, TLS 1.2 only (no supported_versions)", SNI,
                maximum=v12)
    python_case("python_tls13_only", "Python ssl client, TLS 1.3 only", SNI, minimum=v13)

    openssl_cases = [
        ("openssl_sni", "openssl s_client defaults with -servername", ["-servername", SNI]),
        ("openssl_alpn_h2", "openssl s_client with ALPN h2", ["-servername", SNI, "-alpn", "h2"]),
        ("openssl_tls12", "openssl s_client TLS 1.2 only", ["-servername", SNI, "-tls1_2"]),
        ("openssl_noservername", "openssl s_client without SNI", ["-noservername"]),
        ("openssl_sni_mixed_case", "SNI sent in mixed case (must come out lower-cased)",
         ["-servername", "TLS9443.Kong.Example"]),
        ("openssl_sni_ip", "an IP literal sent as SNI (returned as given)", ["-servername", "127.0.0.1"]),
    ]
    base = None
    for name, description, args in openssl_cases:
        wire, trace, command = capture_openssl(args)
        (HERE / f"{name}.trace.txt").write_text(trace)
        t = decode_trace(trace)
        extra = {"cipher_suites": _hex(t["cipher_suites"]), "extensions": _hex(t["extensions"])}
        entries.append(
            entry(
                name, wire, f"{description} ({command.split()[0]} {_openssl_version()})", command,
                sni=t["sni"].lower() if t["sni"] else None,
                alpn=t["alpn"],
                versions=t["versions"],
                legacy_version=t["legacy_version"],
                record_version=t["record_version"],
                extra=extra,
            )
        )
        if name == "openssl_sni":
            base, base_trace = wire, t

    padded, extension_types = enlarge(base)
    entries.append(
        entry(
            "padded_pq_2records", padded,
            f"openssl_sni plus an X25519MLKEM768-sized key share and padding (type 21), making a"
            f" {PADDED_MESSAGE_LENGTH}-byte handshake message framed as 2^14 + rest records",
            "capture.py enlarge(openssl_sni)",
            sni=base_trace["sni"],
            alpn=base_trace["alpn"],
            versions=base_trace["versions"],
            legacy_version=base_trace["legacy_version"],
            record_version=base_trace["record_version"],
            extra={"cipher_suites": _hex(base_trace["cipher_suites"]), "extensions": _hex(extension_types)},
        )
    )

    manifest = {
        "about": "Real ClientHellos for tests/unit/tls; regenerate with capture.py (see its docstring).",
        "hellos": entries,
    }
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for e in entries:
        x = e["expected"]
        print(f"{e['file']:28} {x['length']:6} bytes {x['records']} record(s)  sni={x['sni']} "
              f"alpn={x['alpn']} versions={x['versions']}")


def _py_version(version: int) -> ssl.TLSVersion:
    return {TLS12: ssl.TLSVersion.TLSv1_2, TLS13: ssl.TLSVersion.TLSv1_3}[version]


def _openssl_version() -> str:
    version = subprocess.run(["openssl", "version"], capture_output=True, text=True, check=True)
    return version.stdout.split()[1]


if __name__ == "__main__":
    main()
