"""Tests for pyproxy.tls, and the helpers they share: the captured hellos in tests/data/hellos,
record (re)framing, and a small ClientHello builder for the malformed cases.

The helpers frame and build bytes on their own, without pyproxy's parser, so that the tests do
not check the parser against itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

HELLOS_DIR = Path(__file__).resolve().parents[2] / "data" / "hellos"

EXT_SERVER_NAME = 0
EXT_ALPN = 16
EXT_PADDING = 21
EXT_PRE_SHARED_KEY = 41
EXT_SUPPORTED_VERSIONS = 43


@dataclass(frozen=True)
class Captured:
    """One captured hello and what the manifest says a parser must find in it."""

    name: str
    wire: bytes
    expected: dict

    def __repr__(self) -> str:  # short ids in pytest/hypothesis output
        return self.name


def load_captured() -> list[Captured]:
    manifest = json.loads((HELLOS_DIR / "manifest.json").read_text())
    return [
        Captured(entry["file"].removesuffix(".bin"), (HELLOS_DIR / entry["file"]).read_bytes(),
                 entry["expected"])
        for entry in manifest["hellos"]
    ]


CAPTURED = load_captured()
CAPTURED_BY_NAME = {c.name: c for c in CAPTURED}


def records(wire: bytes) -> list[tuple[bytes, bytes]]:
    """[(5-byte header, fragment)] of the complete records in ``wire``."""
    out, pos = [], 0
    while pos + 5 <= len(wire):
        length = int.from_bytes(wire[pos + 3 : pos + 5], "big")
        out.append((wire[pos : pos + 5], wire[pos + 5 : pos + 5 + length]))
        pos += 5 + length
    return out


def handshake_message(wire: bytes) -> bytes:
    """The ClientHello handshake message (4-byte header included) carried by ``wire``'s records."""
    joined = b"".join(fragment for _, fragment in records(wire))
    return joined[: 4 + int.from_bytes(joined[1:4], "big")]


def frame(message: bytes, sizes=None, version: bytes = b"\x03\x01", content_type: int = 0x16) -> bytes:
    """Wrap ``message`` in handshake records; ``sizes`` (cycled) gives each fragment's length."""
    sizes = list(sizes or [2**14])
    out, pos, i = bytearray(), 0, 0
    while pos < len(message):
        size = sizes[i % len(sizes)]
        fragment = message[pos : pos + size]
        out += bytes([content_type]) + version + len(fragment).to_bytes(2, "big") + fragment
        pos += size
        i += 1
    return bytes(out)


def u8(n: int) -> bytes:
    return n.to_bytes(1, "big")


def u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def vec8(data: bytes) -> bytes:
    return u8(len(data)) + data


def vec16(data: bytes) -> bytes:
    return u16(len(data)) + data


def ext(ext_type: int, data: bytes) -> tuple[int, bytes]:
    return (ext_type, data)


def sni_ext(*names: bytes | str, name_type: int = 0) -> tuple[int, bytes]:
    entries = b"".join(u8(name_type) + vec16(n.encode() if isinstance(n, str) else n) for n in names)
    return (EXT_SERVER_NAME, vec16(entries))


def alpn_ext(*protocols: bytes | str) -> tuple[int, bytes]:
    names = b"".join(vec8(p.encode() if isinstance(p, str) else p) for p in protocols)
    return (EXT_ALPN, vec16(names))


def versions_ext(*versions: int) -> tuple[int, bytes]:
    return (EXT_SUPPORTED_VERSIONS, vec8(b"".join(u16(v) for v in versions)))


def build_body(
    *,
    legacy_version: int = 0x0303,
    session_id: bytes = bytes(32),
    cipher_suites: bytes = b"\x13\x01\x13\x02\xc0\x2f",
    compression_methods: bytes = b"\x00",
    extensions: list[tuple[int, bytes]] | None = (),
    raw_extensions: bytes | None = None,
) -> bytes:
    """A ClientHello body; ``extensions=None`` leaves the extensions block out entirely."""
    body = (u16(legacy_version) + bytes(range(32)) + vec8(session_id) + vec16(cipher_suites)
            + vec8(compression_methods))
    if raw_extensions is not None:
        return body + raw_extensions
    if extensions is None:
        return body
    return body + vec16(b"".join(u16(t) + vec16(d) for t, d in extensions))


def build_message(body: bytes, msg_type: int = 1) -> bytes:
    return u8(msg_type) + len(body).to_bytes(3, "big") + body


def build_hello(**kwargs) -> bytes:
    """A one-record ClientHello as a client would send it."""
    return frame(build_message(build_body(**kwargs)))


def one_byte_records(count: int, sni: str = "a.example") -> bytes:
    """A ClientHello for `sni` whose first `count` handshake bytes come one per record (the rest in
    one more): padded so that it has that many, 6 bytes on the wire for each."""
    message = build_message(build_body(extensions=[sni_ext(sni), (EXT_PADDING, bytes(count))]))
    return frame(message, [1] * count + [len(message)])


def length_field_offsets(wire: bytes) -> list[tuple[int, int]]:
    """(offset, width) of every length field of a one-record hello: record, handshake, session_id,
    cipher_suites, compression_methods, extensions block, each extension, and the inner lists of
    server_name, ALPN and supported_versions."""
    out = [(3, 2), (6, 3)]
    pos = 9 + 2 + 32
    out.append((pos, 1))
    pos += 1 + wire[pos]
    out.append((pos, 2))
    pos += 2 + int.from_bytes(wire[pos : pos + 2], "big")
    out.append((pos, 1))
    pos += 1 + wire[pos]
    if pos >= len(wire):
        return out
    out.append((pos, 2))
    end = pos + 2 + int.from_bytes(wire[pos : pos + 2], "big")
    pos += 2
    while pos < end:
        ext_type = int.from_bytes(wire[pos : pos + 2], "big")
        length = int.from_bytes(wire[pos + 2 : pos + 4], "big")
        out.append((pos + 2, 2))
        data = pos + 4
        if ext_type == EXT_SERVER_NAME:
            out += [(data, 2), (data + 3, 2)]
        elif ext_type == EXT_ALPN:
            out.append((data, 2))
            p = data + 2
            while p < data + length:
                out.append((p, 1))
                p += 1 + wire[p]
        elif ext_type == EXT_SUPPORTED_VERSIONS:
            out.append((data, 1))
        pos = data + length
    return out
