"""pyproxy.proxy_protocol on headers captured from HAProxy, the spec's examples, and crafted bad input.

The captured headers live in tests/data/proxy_protocol (see capture.py there); the helpers below
frame and build headers on their own, without pyproxy's parser or builder, so that the tests do
not check the module against itself.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyproxy.proxy_protocol import (
    DEFAULT_MAX_SIZE,
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_CRC32C,
    PP2_TYPE_NOOP,
    PP2_TYPE_SSL,
    PP2_TYPE_UNIQUE_ID,
    V2_HEADER_LENGTH,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    build_v1,
    build_v2,
    crc32c,
    parse_proxy_header,
    parse_ssl_tlv,
    proxy_header_need,
)

DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "proxy_protocol"
FAMILIES = {None: None, "AF_INET": socket.AF_INET, "AF_INET6": socket.AF_INET6}

# --- captured headers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Captured:
    """One captured header (plus the payload behind it) and what the manifest says is in it."""

    name: str
    wire: bytes
    expected: dict

    @property
    def header(self) -> bytes:
        return self.wire[: self.expected["length"]]

    def __repr__(self) -> str:  # short ids in pytest/hypothesis output
        return self.name


def load_captured() -> list[Captured]:
    manifest = json.loads((DATA_DIR / "manifest.json").read_text())
    return [
        Captured(entry["file"].removesuffix(".bin"), (DATA_DIR / entry["file"]).read_bytes(),
                 entry["expected"])
        for entry in manifest["headers"]
    ]


CAPTURED = load_captured()
CAPTURED_BY_NAME = {c.name: c for c in CAPTURED}

# --- independent builders for crafted headers ----------------------------------------------------


def tlv(tlv_type: int, value: bytes) -> bytes:
    return bytes([tlv_type]) + len(value).to_bytes(2, "big") + value


def v2(ver_cmd: int = 0x21, fam: int = 0x11, block: bytes | None = None, length: int | None = None) -> bytes:
    """A v2 header from its parts; ``block`` defaults to 192.0.2.1:1234 -> 198.51.100.2:443."""
    if block is None:
        block = bytes([192, 0, 2, 1, 198, 51, 100, 2]) + (1234).to_bytes(2, "big") + (443).to_bytes(2, "big")
    length = len(block) if length is None else length
    return V2_SIGNATURE + bytes([ver_cmd, fam]) + length.to_bytes(2, "big") + block


def with_crc(header: bytes, field: int) -> bytes:
    """``header`` with the CRC32C field at ``field`` filled in (computed here, not by the module)."""
    crc = 0xFFFFFFFF
    for byte in header:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return header[:field] + (crc ^ 0xFFFFFFFF).to_bytes(4, "big") + header[field + 4 :]


def first_error_at(data: bytes, **kwargs) -> int:
    """The length of the shortest prefix of ``data`` that the parser rejects."""
    for n in range(1, len(data) + 1):
        try:
            parse_proxy_header(data[:n], **kwargs)
        except ProxyProtocolError:
            return n
    raise AssertionError("never rejected")


def error_message(data: bytes, **kwargs) -> str:
    with pytest.raises(ProxyProtocolError) as info:
        parse_proxy_header(data, **kwargs)
    return str(info.value)


def assert_matches(header: ProxyHeader, expected: dict) -> None:
    assert header.version == expected["version"]
    assert header.command == expected["command"]
    assert header.family == FAMILIES[expected["family"]]
    assert header.source == (tuple(expected["source"]) if expected["source"] else None)
    assert header.destination == (tuple(expected["destination"]) if expected["destination"] else None)
    assert header.length == expected["length"]
    if header.version == 1:
        assert header.tlvs == ()
        return
    assert [t for t, _ in header.tlvs] == expected["tlv_types"]
    for tlv_type, value in expected["tlv_values"].items():
        assert header.tlv(int(tlv_type, 16)) == value.encode()
    if "ssl" in expected:
        ssl = parse_ssl_tlv(header.tlv(PP2_TYPE_SSL))
        assert ssl.client == expected["ssl"]["client"]
        assert ssl.verify == expected["ssl"]["verify"]
        assert ssl.tlvs == tuple((t, v.encode()) for t, v in expected["ssl"]["tlvs"])


# --- captured headers ------------------------------------------------------------------------------


def test_the_capture_covers_every_kind_of_header():
    kinds = {(c.expected["version"], c.expected["command"], c.expected["family"]) for c in CAPTURED}
    assert kinds == {
        (1, "PROXY", "AF_INET"), (1, "PROXY", "AF_INET6"), (1, "PROXY", None),
        (2, "PROXY", "AF_INET"), (2, "PROXY", "AF_INET6"), (2, "LOCAL", None),
    }
    assert sum(PP2_TYPE_CRC32C in c.expected.get("tlv_types", ()) for c in CAPTURED) == 3


@pytest.mark.parametrize("captured", CAPTURED, ids=repr)
def test_captured_header_parses_to_the_manifest(captured):
    header = parse_proxy_header(captured.wire)
    assert_matches(header, captured.expected)
    assert captured.wire[header.length :] == captured.expected["payload"].encode()


@pytest.mark.parametrize("captured", CAPTURED, ids=repr)
def test_every_strict_prefix_needs_more(captured):
    assert all(parse_proxy_header(captured.header[:n]) is None for n in range(len(captured.header)))


@pytest.mark.parametrize("captured", CAPTURED, ids=repr)
@pytest.mark.parametrize("container", [bytes, bytearray, memoryview])
def test_fed_one_byte_at_a_time(captured, container):
    buffer = bytearray()
    for n, byte in enumerate(captured.wire, 1):
        buffer.append(byte)
        result = parse_proxy_header(container(buffer))
        if n < captured.expected["length"]:
            assert result is None
        else:
            assert_matches(result, captured.expected)


@pytest.mark.parametrize("captured", CAPTURED, ids=repr)
def test_looks_that_follow_need_find_the_header_in_few_steps(captured):
    """A reader that parses again only once proxy_header_need bytes are there never skips the
    header's end and looks at most ~110 times (v1) or twice past the fixed part (v2), however
    long the TLVs: a header sent a byte at a time is not parsed once per byte."""
    header, looks, have = captured.header, 0, 1
    while True:
        looks += 1
        result = parse_proxy_header(header[:have])
        if result is not None:
            break
        need = proxy_header_need(header[:have])
        assert have < need <= len(header)
        have = need
    assert result.length == len(header)
    assert looks <= (V2_HEADER_LENGTH + 1 if header.startswith(V2_SIGNATURE) else 108)


def test_a_long_v2_header_is_parsed_twice_not_once_per_byte():
    header = build_v2(("10.0.0.1", 1000), ("10.0.0.2", 2000), [(PP2_TYPE_NOOP, bytes(4000))])
    assert len(header) > 4000
    assert proxy_header_need(header[:V2_HEADER_LENGTH]) == len(header)


@pytest.mark.parametrize("captured", CAPTURED, ids=repr)
def test_whatever_follows_the_header_is_ignored(captured):
    tls_hello_start = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
    for tail in (b"", b"\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", V2_SIGNATURE, tls_hello_start,
                 bytes(300)):
        assert_matches(parse_proxy_header(captured.header + tail), captured.expected)


def _endpoint(value):
    """A manifest endpoint as a builder argument; IPv4-mapped addresses given as plain IPv4, to show
    that the builder maps a mixed pair the way HAProxy did."""
    if value is None:
        return None
    ip, port = value
    return (ip.removeprefix("::ffff:"), port)


@pytest.mark.parametrize("captured", CAPTURED, ids=repr)
def test_builders_reproduce_haproxy_byte_for_byte(captured):
    expected = captured.expected
    source, destination = _endpoint(expected["source"]), _endpoint(expected["destination"])
    if expected["version"] == 1:
        assert build_v1(source, destination) == captured.header
        return
    tlvs = []
    for tlv_type in expected["tlv_types"]:
        if tlv_type == PP2_TYPE_SSL:
            ssl = expected["ssl"]
            subtlvs = b"".join(tlv(t, v.encode()) for t, v in ssl["tlvs"])
            tlvs.append((tlv_type, bytes([ssl["client"]]) + ssl["verify"].to_bytes(4, "big") + subtlvs))
        elif tlv_type != PP2_TYPE_CRC32C:
            tlvs.append((tlv_type, expected["tlv_values"][f"0x{tlv_type:02x}"].encode()))
    checksum = PP2_TYPE_CRC32C in expected["tlv_types"]
    assert build_v2(source, destination, tlvs, checksum=checksum) == captured.header


CHECKSUMMED = [c for c in CAPTURED if PP2_TYPE_CRC32C in c.expected.get("tlv_types", ())]


@pytest.mark.parametrize("captured", CHECKSUMMED, ids=repr)
def test_a_damaged_byte_under_haproxys_crc32c_is_caught(captured):
    header = captured.header
    tlvs_start = 16 + {None: 0, "AF_INET": 12, "AF_INET6": 36}[captured.expected["family"]]
    crc_field = tlvs_start + 3  # HAProxy puts the CRC32C TLV first
    # Every address byte and every byte of the CRC field itself: nothing structural, so only the
    # checksum can tell (bytes inside the other TLVs' values are covered by the fuzz tests).
    for position in [*range(16, tlvs_start), *range(crc_field, crc_field + 4)]:
        damaged = bytearray(header)
        damaged[position] ^= 0x01
        assert "CRC32C mismatch" in error_message(bytes(damaged)), position


# --- the spec's examples -----------------------------------------------------------------------


def test_spec_v1_tcp4_example_before_an_http_request():
    wire = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n"
    assert parse_proxy_header(wire) == ProxyHeader(
        version=1, command="PROXY", family=socket.AF_INET,
        source=("192.168.0.1", 56324), destination=("192.168.0.11", 443), length=47,
    )
    assert wire[47:].startswith(b"GET / HTTP/1.1")


def test_spec_v1_longest_tcp4_line():
    line = b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n"
    assert len(line) == 56
    header = parse_proxy_header(line)
    assert header.source == ("255.255.255.255", 65535) and header.length == 56


def test_spec_v1_longest_tcp6_line():
    ffff = ":".join(["ffff"] * 8)
    line = f"PROXY TCP6 {ffff} {ffff} 65535 65535\r\n".encode()
    assert len(line) == 104
    header = parse_proxy_header(line)
    assert header.family == socket.AF_INET6
    assert header.source == (ffff, 65535) and header.destination == (ffff, 65535)
    assert header.length == 104


def test_spec_v1_unknown_short_form():
    assert parse_proxy_header(b"PROXY UNKNOWN\r\n") == ProxyHeader(
        version=1, command="PROXY", family=None, source=None, destination=None, length=15
    )


def test_spec_v1_unknown_worst_case_is_107_bytes_and_its_fields_are_ignored():
    ffff = ":".join(["ffff"] * 8)
    line = f"PROXY UNKNOWN {ffff} {ffff} 65535 65535\r\n".encode()
    assert len(line) == 107
    header = parse_proxy_header(line + b"payload")
    assert (header.family, header.source, header.destination, header.length) == (None, None, None, 107)
    # "the receiver must ignore anything presented before the CRLF"
    assert parse_proxy_header(b"PROXY UNKNOWN whatever \x00 was here\r\n").length == 35


def test_v1_line_longer_than_107_bytes_is_refused_at_byte_107():
    line = b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n"
    assert len(line) == 108
    assert first_error_at(line) == 107
    assert "no CRLF in its first 107 bytes" in error_message(line)
    assert parse_proxy_header(line[:105] + b"\r\n").length == 107


def test_v1_tcp6_accepts_what_inet_pton_accepts_and_returns_canonical_text():
    header = parse_proxy_header(b"PROXY TCP6 2001:DB8:0:0:0:0:0:1 ::FFFF:192.0.2.1 0 65535\r\n")
    assert header.source == ("2001:db8::1", 0)
    assert header.destination == ("::ffff:192.0.2.1", 65535)


@pytest.mark.parametrize(
    ("fam", "family", "block_length"),
    [(0x11, socket.AF_INET, 12), (0x12, socket.AF_INET, 12),
     (0x21, socket.AF_INET6, 36), (0x22, socket.AF_INET6, 36)],
)
def test_spec_v2_ip_families_tcp_and_udp(fam, family, block_length):
    size = block_length // 2 - 2
    src = bytes(range(1, size + 1))
    dst = bytes(range(101, 101 + size))
    wire = v2(fam=fam, block=src + dst + (1234).to_bytes(2, "big") + (80).to_bytes(2, "big"))
    header = parse_proxy_header(wire + b"payload")
    assert header.family == family
    assert header.source == (socket.inet_ntop(family, src), 1234)
    assert header.destination == (socket.inet_ntop(family, dst), 80)
    assert header.length == 16 + block_length


def test_spec_v2_unix_family_is_reported_without_endpoints():
    block = b"/run/lb.sock".ljust(108, b"\0") + b"/run/app.sock".ljust(108, b"\0")
    for fam in (0x31, 0x32):
        header = parse_proxy_header(v2(fam=fam, block=block + tlv(PP2_TYPE_NOOP, b"")))
        assert (header.family, header.source, header.destination) == (socket.AF_UNIX, None, None)
        assert header.length == 16 + 216 + 3 and header.tlvs == ((PP2_TYPE_NOOP, b""),)


def test_spec_v2_unspec_proxy_is_accepted_without_endpoints():
    header = parse_proxy_header(v2(fam=0x00, block=tlv(PP2_TYPE_AUTHORITY, b"example.com")))
    assert (header.command, header.family, header.source, header.destination) == ("PROXY", None, None, None)
    assert header.tlvs == ((PP2_TYPE_AUTHORITY, b"example.com"),)


def test_spec_v2_local_must_not_be_assumed_empty():
    # "Receivers MUST always consider this field to skip the appropriate number of bytes and must
    # not assume zero is presented for LOCAL connections."
    wire = v2(ver_cmd=0x20, fam=0x11)  # a LOCAL that still carries an IPv4 address block
    header = parse_proxy_header(wire + b"data")
    assert (header.command, header.family, header.source, header.destination) == ("LOCAL", None, None, None)
    assert header.length == 28


def test_v2_tlvs_are_returned_as_sent_in_order():
    tlvs = [(PP2_TYPE_NOOP, b"\0" * 5), (PP2_TYPE_ALPN, b"h2"), (0xE0, b"custom"), (PP2_TYPE_NOOP, b""),
            (0xE0, b"again")]
    header = parse_proxy_header(v2(block=v2()[16:] + b"".join(tlv(t, v) for t, v in tlvs)))
    assert header.tlvs == tuple(tlvs)
    assert header.tlv(0xE0) == b"custom" and header.tlv(PP2_TYPE_AUTHORITY) is None


def test_v2_crc32c_anywhere_among_the_tlvs_is_verified():
    body = (v2()[16:] + tlv(PP2_TYPE_ALPN, b"h2") + tlv(PP2_TYPE_CRC32C, bytes(4))
            + tlv(PP2_TYPE_NOOP, b"\x03\x00\x04"))
    header = v2(block=body)
    field = 16 + 12 + 5 + 3
    good = with_crc(header, field)
    assert parse_proxy_header(good).tlv(PP2_TYPE_CRC32C) == good[field : field + 4]
    assert "CRC32C mismatch" in error_message(good[:field] + bytes(4) + good[field + 4 :])


def test_crc32c_matches_the_reference_vectors():
    assert crc32c(b"123456789") == 0xE3069283
    # RFC 3720 (iSCSI) appendix B.4
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    assert crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C
    assert crc32c(b"") == 0


# --- errors at the first byte that proves them ------------------------------------------------------

V1 = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"


@pytest.mark.parametrize(
    ("data", "at", "message"),
    [
        (b"GET / HTTP/1.1\r\n", 1,
         "first byte 0x47 ('G') is neither 'P' (v1) nor '\\r' (v2) (plain text, HTTP?)"),
        (b"\x16\x03\x01\x00\xa5\x01", 1, "TLS handshake record"),
        (b"\x00\x00", 1, "first byte 0x00"),
        (b"PROXX TCP4", 5, "byte 5 is 0x58 ('X'), the signature has 0x59 ('Y')"),
        (b"PROXY\r\n", 6, "byte 6 is 0x0d"),
        (b"PROXY TCP5 1.2.3.4", 10, "protocol b'TCP5' is not TCP4, TCP6 or UNKNOWN"),
        (b"PROXY tcp4 1.2.3.4", 7, "protocol b't' is not"),
        (b"PROXY  TCP4 1.2.3.4", 7, "is not TCP4, TCP6 or UNKNOWN"),
        (b"PROXY TCP4\r\n", 11, "is not TCP4, TCP6 or UNKNOWN"),
        (b"PROXY UNKNOWNX\r\n", 14, "'UNKNOWN' is followed by b'X'"),
        (b"PROXY UNKNOWN\n", 14, "'UNKNOWN' is followed by b'\\n', not a space or CRLF"),
        (b"PROXY UNKNOWN\rX", 15, "CR at byte 14 not followed by LF"),
        (b"PROXY UNKNOWN 1.2.3.4\n5.6.7.8\r\n", 22, "bare LF"),
        (b"PROXY TCP4 192.168.0.256 1.2.3.4 1 2\r\n", 24,
         "source address '192.168.0.256' is not a dotted-decimal IPv4"),
        (b"PROXY TCP4 192.168.01.1 1.2.3.4 1 2\r\n", 21, "source address '192.168.01'"),
        (b"PROXY TCP4 1.2.3.4.5 1.2.3.4 1 2\r\n", 19, "source address '1.2.3.4.'"),
        (b"PROXY TCP4 1.2.3 1.2.3.4 1 2\r\n", 17, "source address '1.2.3' is not"),
        (b"PROXY TCP4 ::1 1.2.3.4 1 2\r\n", 12, "source address ':'"),
        (b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n", 20, "destination address ':'"),
        (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", 20, "destination address is empty (two spaces in a row?)"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", 29,
         "source port '01' is not a decimal 0-65535 without leading zeros"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", 34, "destination port '65536'"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 -2\r\n", 30, "destination port '-'"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", 31, "more than 4 fields"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", 29, "ends after 3 of the 4 fields"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", 31, "destination port '2\\n'"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX", 32, "CR at byte 31 not followed by LF"),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", 19, "source address '1.2.3.4' is not an IPv6 address"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", 19, "source address 'fe80::1%'"),
        (b"PROXY TCP6 1:::2 ::1 1 2\r\n", 15, "source address '1:::'"),
        (b"PROXY TCP6 1::2::3 ::1 1 2\r\n", 17, "source address '1::2::'"),
        (b"PROXY TCP6 12345:: ::1 1 2\r\n", 16, "source address '12345'"),
        (b"PROXY TCP6 ::1 1:2:3:4:5:6:7:8:9 1 2\r\n", 31,
         "destination address '1:2:3:4:5:6:7:8:' is not an IPv6"),
        (b"PROXY TCP6 1:2:3:4:5:6:7::8 ::1 1 2\r\n", 27, "source address '1:2:3:4:5:6:7::8' is not"),
        (b"PROXY TCP6 1:2:3:4:5:6:7:1.2.3.4 ::1 1 2\r\n", 27, "source address '1:2:3:4:5:6:7:1.'"),
        (b"PROXY TCP6 1:2:3:4:5:6:7:8 ::1 1 2\r\n", None, None),
        (b"PROXY TCP6 1::3:4:5:6:7:8 ::1 1 2\r\n", None, None),
        (b"PROXY TCP6 1:2:3:4:5:6:1.2.3.4 ::1 1 2\r\n", None, None),
        (b"PROXY TCP6 ::2:3:4:5:6:1.2.3.4 ::1 1 2\r\n", None, None),
    ],
)
def test_v1_errors_at_the_first_proving_byte(data, at, message):
    if at is None:  # a valid line among the invalid ones, to show where the limit is
        assert parse_proxy_header(data).length == len(data)
        return
    assert first_error_at(data) == at
    assert message in error_message(data[:at])


SIG = V2_SIGNATURE


@pytest.mark.parametrize(
    ("data", "at", "message"),
    [
        (b"\r\n\r\n\x01", 5, "not a PROXY v2 header: byte 5 is 0x01, the signature has 0x00"),
        (b"\r\n\r\n\x00\r\nquit\n", 8, "byte 8 is 0x71 ('q')"),
        (b"\r\nGET", 3, "byte 3 is 0x47 ('G')"),
        (SIG + b"\x11\x11\x00\x0c", 13, "PROXY v2 version is 1, not 2 (byte 13 is 0x11)"),
        (SIG + b"\x31\x11\x00\x0c", 13, "version is 3"),
        (SIG + b"\x22\x11\x00\x0c", 13, "command is 0x2, neither LOCAL (0) nor PROXY (1)"),
        (SIG + b"\x2f\x11\x00\x0c", 13, "command is 0xf"),
        (SIG + b"\x21\x13\x00\x0c", 14, "family/transport 0x13 (AF_INET transport 0x3) is not supported"),
        (SIG + b"\x21\x41\x00\x0c", 14, "family/transport 0x41 (family 0x4 STREAM)"),
        (SIG + b"\x21\x10\x00\x0c", 14, "0x10 (AF_INET UNSPEC)"),
        (SIG + b"\x21\x01\x00\x00", 14, "0x01 (UNSPEC STREAM)"),
        (SIG + b"\x21\x11\x00\x0b", 16,
         "length 11 is too short for the 12-byte AF_INET STREAM address block"),
        (SIG + b"\x21\x21\x00\x0c", 16,
         "length 12 is too short for the 36-byte AF_INET6 STREAM address block"),
        (SIG + b"\x21\x31\x00\xd7", 16, "length 215 is too short for the 216-byte AF_UNIX STREAM"),
        (SIG + b"\x20\x21\x00\x00", 16, "length 0 is too short for the 36-byte"),
        (SIG + b"\x21\x11\x10\x01", 16, "PROXY v2 header of 16+4097 bytes exceeds the 4112-byte limit"),
        (SIG + b"\x21\x11\xff\xff", 16, "16+65535 bytes exceeds"),
    ],
)
def test_v2_header_errors_at_the_first_proving_byte(data, at, message):
    assert first_error_at(data + bytes(64)) == at
    assert message in error_message(data[:at])


ADDRESSES = v2()[16:]


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (ADDRESSES + b"\x04", "TLV header truncated: 1 byte(s) left at offset 28"),
        (ADDRESSES + b"\x04\x00", "TLV header truncated: 2 byte(s) left"),
        (ADDRESSES + b"\x04\x00\x02\x00", "TLV 0x04 length 2 overruns the header (1 bytes left)"),
        (ADDRESSES + tlv(PP2_TYPE_ALPN, b"h2") + b"\x02\xff\xff", "TLV 0x02 length 65535 overruns"),
        (ADDRESSES + tlv(PP2_TYPE_CRC32C, bytes(3)), "CRC32C TLV is 3 bytes, not 4"),
        (ADDRESSES + tlv(PP2_TYPE_CRC32C, bytes(8)), "CRC32C TLV is 8 bytes, not 4"),
        (ADDRESSES + tlv(PP2_TYPE_CRC32C, bytes(4)), "CRC32C mismatch: header says 0x00000000"),
        (ADDRESSES + tlv(PP2_TYPE_CRC32C, bytes(4)) * 2, "more than one CRC32C TLV"),
        (ADDRESSES + tlv(PP2_TYPE_UNIQUE_ID, b"u" * 129), "UNIQUE_ID TLV is 129 bytes, over 128"),
        (ADDRESSES + tlv(PP2_TYPE_SSL, b"\x01\x00\x00\x00"),
         "PP2_TYPE_SSL TLV is 4 bytes, shorter than its 5-byte fixed part"),
        (ADDRESSES + tlv(PP2_TYPE_SSL, b"\x01\0\0\0\0\x21\x00\x09TLSv1.3"),
         "PP2_TYPE_SSL sub-TLV 0x21 length 9 overruns"),
        (ADDRESSES + tlv(PP2_TYPE_SSL, b"\x01\x00\x00\x00\x00\x21"), "PP2_TYPE_SSL sub-TLV header truncated"),
    ],
)
def test_v2_malformed_tlvs_are_refused_once_the_header_is_complete(block, message):
    wire = v2(block=block)
    assert first_error_at(wire) == len(wire)
    assert message in error_message(wire + b"payload")


def test_v2_tlv_limits_are_inclusive():
    block = ADDRESSES + tlv(PP2_TYPE_UNIQUE_ID, b"u" * 128) + tlv(PP2_TYPE_SSL, bytes(5))
    header = parse_proxy_header(v2(block=block))
    assert header.tlv(PP2_TYPE_UNIQUE_ID) == b"u" * 128
    assert parse_ssl_tlv(header.tlv(PP2_TYPE_SSL)).tlvs == ()


def test_max_size_bounds_the_header():
    padding = tlv(PP2_TYPE_NOOP, bytes(100))
    wire = v2(block=ADDRESSES + padding)  # 131 bytes
    assert parse_proxy_header(wire, max_size=131).length == 131
    assert first_error_at(wire, max_size=130) == 16
    assert "exceeds the 130-byte limit" in error_message(wire, max_size=130)
    largest = v2(block=ADDRESSES + tlv(PP2_TYPE_NOOP, bytes(DEFAULT_MAX_SIZE - 31)))
    assert parse_proxy_header(largest) is not None
    largest = v2(block=ADDRESSES + tlv(PP2_TYPE_NOOP, bytes(65535 - 15)))
    assert parse_proxy_header(largest, max_size=16 + 65535).length == 16 + 65535
    # v1 lines are bounded by max_size too when it is below 107
    assert first_error_at(V1, max_size=20) == 20
    assert parse_proxy_header(V1, max_size=len(V1)).length == len(V1)


def test_errors_are_value_errors():
    assert issubclass(ProxyProtocolError, ValueError)


def test_empty_input_needs_more():
    assert parse_proxy_header(b"") is None
    assert parse_proxy_header(memoryview(b"")) is None


# --- builders ---------------------------------------------------------------------------------------


def test_build_v1_spec_example():
    assert build_v1(("192.168.0.1", 56324), ("192.168.0.11", 443)) == (b"PROXY TCP4 192.168.0.1 "
                                                                       b"192.168.0.11 56324 443\r\n")


def test_build_v1_writes_canonical_ipv6():
    assert build_v1(("2001:DB8:0:0::1", 1), ("::FFFF:192.0.2.1", 2)) == (b"PROXY TCP6 2001:db8::1 "
                                                                         b"::ffff:192.0.2.1 1 2\r\n")


def test_mixed_families_are_sent_as_ipv4_mapped_ipv6():
    assert build_v1(("192.0.2.1", 1), ("2001:db8::2", 2)) == (b"PROXY TCP6 ::ffff:192.0.2.1 2001:db8::2 1 "
                                                              b"2\r\n")
    assert build_v1(("2001:db8::1", 1), ("192.0.2.2", 2)) == (b"PROXY TCP6 2001:db8::1 ::ffff:192.0.2.2 1 "
                                                              b"2\r\n")
    header = parse_proxy_header(build_v2(("192.0.2.1", 1), ("2001:db8::2", 2)))
    assert header.family == socket.AF_INET6
    assert (header.source, header.destination) == (("::ffff:192.0.2.1", 1), ("2001:db8::2", 2))


def test_without_addresses_the_builders_send_unknown_and_local():
    assert build_v1(None, None) == b"PROXY UNKNOWN\r\n"
    assert build_v1(("192.0.2.1", 1), None) == b"PROXY UNKNOWN\r\n"
    assert build_v2(None, None) == SIG + b"\x20\x00\x00\x00"
    header = parse_proxy_header(build_v2(None, None, [(PP2_TYPE_UNIQUE_ID, b"id")], checksum=True))
    assert header.command == "LOCAL" and [t for t, _ in header.tlvs] == [PP2_TYPE_CRC32C, PP2_TYPE_UNIQUE_ID]


def test_build_v2_layout():
    wire = build_v2(("192.0.2.1", 1234), ("198.51.100.2", 443), [(PP2_TYPE_ALPN, b"h2")])
    assert wire == v2(block=ADDRESSES + tlv(PP2_TYPE_ALPN, b"h2"))
    wire = build_v2(("192.0.2.1", 1234), ("198.51.100.2", 443), checksum=True)
    assert wire == with_crc(v2(block=ADDRESSES + tlv(PP2_TYPE_CRC32C, bytes(4))), 31)


@pytest.mark.parametrize(
    ("source", "destination"),
    [
        (("192.0.2.1", 0), ("198.51.100.2", 65535)),
        (("2001:db8::1", 40000), ("2001:db8::2", 443)),
        (("::", 1), ("::1", 2)),
        (("0.0.0.0", 1), ("255.255.255.255", 2)),
        (("::ffff:192.0.2.1", 1), ("2001:db8::2", 2)),
    ],
)
def test_build_then_parse_round_trips(source, destination):
    tlvs = [(PP2_TYPE_AUTHORITY, b"example.com"), (PP2_TYPE_UNIQUE_ID, b"\x00\xff"), (0xEF, b"")]
    for checksum in (False, True):
        wire = build_v2(source, destination, tlvs, checksum=checksum)
        header = parse_proxy_header(wire + b"stream")
        assert (header.version, header.command, header.length) == (2, "PROXY", len(wire))
        assert (header.source, header.destination) == (source, destination)
        assert [t for t in header.tlvs if t[0] != PP2_TYPE_CRC32C] == tlvs
    wire = build_v1(source, destination)
    header = parse_proxy_header(wire + b"stream")
    assert (header.version, header.source, header.destination, header.length) == (1, source, destination,
                                                                                   len(wire))


@pytest.mark.parametrize(
    ("source", "destination", "tlvs", "message"),
    [
        (("192.0.2.1", -1), ("192.0.2.2", 2), (), "source port -1"),
        (("192.0.2.1", 1), ("192.0.2.2", 65536), (), "destination port 65536"),
        (("192.0.2.1", True), ("192.0.2.2", 2), (), "source port True"),
        (("192.0.2.1", "80"), ("192.0.2.2", 2), (), "source port '80'"),
        (("192.0.2", 1), ("192.0.2.2", 2), (), "does not appear to be an IPv4 or IPv6 address"),
        ((3221225985, 1), ("192.0.2.2", 2), (), "is not a string"),
        (("fe80::1%eth0", 1), ("fe80::2", 2), (), "has a scope id"),
        (("192.0.2.1", 1), ("192.0.2.2", 2), [(PP2_TYPE_CRC32C, bytes(4))], "pass checksum=True"),
        (("192.0.2.1", 1), ("192.0.2.2", 2), [(256, b"")], "TLV type 256 is not 0-255"),
        (("192.0.2.1", 1), ("192.0.2.2", 2), [(PP2_TYPE_UNIQUE_ID, bytes(129))], "over 128"),
        (("192.0.2.1", 1), ("192.0.2.2", 2), [(PP2_TYPE_SSL, b"\x01")], "shorter than its 5-byte fixed part"),
        (("192.0.2.1", 1), ("192.0.2.2", 2), [(PP2_TYPE_NOOP, bytes(65536))], "over 65535"),
        (("192.0.2.1", 1), ("192.0.2.2", 2), [(PP2_TYPE_NOOP, bytes(65521))], "over 16+65535"),
    ],
)
def test_builders_refuse_what_they_cannot_send(source, destination, tlvs, message):
    with pytest.raises(ValueError) as info:
        if tlvs:
            build_v2(source, destination, tlvs)
        else:
            build_v1(source, destination)
    assert message in str(info.value)
    if not tlvs:
        with pytest.raises(ValueError):
            build_v2(source, destination)
