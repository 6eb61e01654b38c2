"""Hypothesis fuzzing of pyproxy.proxy_protocol, after test_clienthello_fuzz.py.

Whatever the input, the parser answers with a ProxyHeader, None or ProxyProtocolError — never an
IndexError, UnicodeDecodeError or anything else a worker would have to guard for — and its answers
for the successive prefixes of a stream are consistent: None, None, ... then either the same
header for every longer prefix or an error for every longer prefix (an error is only raised once
the bytes prove it, so more bytes cannot make it go away).
"""

from __future__ import annotations

import ipaddress
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from pyproxy.proxy_protocol import (
    PP2_TYPE_CRC32C,
    PP2_TYPE_SSL,
    PP2_TYPE_UNIQUE_ID,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    build_v1,
    build_v2,
    parse_proxy_header,
)

from .test_proxy_protocol import ADDRESSES, CAPTURED, tlv, v2, with_crc

fuzz = settings(max_examples=300, deadline=None)

# The captured headers plus a few built here (UNIX, UDP, every TLV checked by the parser).
EXTRA = [
    v2(fam=0x12),
    v2(fam=0x31, block=b"/a".ljust(108, b"\0") + b"/b".ljust(108, b"\0") + tlv(0xE0, b"x")),
    v2(ver_cmd=0x20, fam=0x00, block=tlv(PP2_TYPE_UNIQUE_ID, b"id")),
    with_crc(v2(block=ADDRESSES + tlv(PP2_TYPE_CRC32C, bytes(4))
                + tlv(PP2_TYPE_SSL, b"\x01\0\0\0\0" + tlv(0x21, b"TLS"))), 31),
    b"PROXY TCP6 ::ffff:192.0.2.1 2001:db8::1 0 65535\r\n",
    b"PROXY UNKNOWN ignored\r\n",
]
HEADERS = [c.header for c in CAPTURED] + EXTRA
headers = st.sampled_from(HEADERS)
checksummed = [h for h in HEADERS
               if h.startswith(V2_SIGNATURE) and parse_proxy_header(h).tlv(PP2_TYPE_CRC32C)]

V1_ALPHABET = b"0123456789abcdefABCDEF:. \r\n%x"


def outcome(data, **kwargs) -> ProxyHeader | str | None:
    """The parser's answer, with ProxyProtocolError folded into a string; anything else raises."""
    try:
        return parse_proxy_header(data, **kwargs)
    except ProxyProtocolError as e:
        assert str(e)
        return "error"


def assert_consistent_prefixes(data: bytes) -> ProxyHeader | str | None:
    """Check the None* (header* | error*) shape of the answers for every prefix of ``data``."""
    final = None
    for n in range(len(data) + 1):
        result = outcome(data[:n])
        if final is None:
            final = result
            if isinstance(result, ProxyHeader):
                assert result.length == n  # complete exactly when its last byte arrives
        else:
            assert result == final, (n, final, result)
    return final


def tlv_offsets(header: bytes) -> list[int]:
    """Offsets of the TLV headers of a v2 header, found by walking them here."""
    pos = 16 + {0x0: 0, 0x1: 12, 0x2: 36, 0x3: 216}[header[13] >> 4]
    out = []
    while pos + 3 <= len(header):
        out.append(pos)
        pos += 3 + int.from_bytes(header[pos + 1 : pos + 3], "big")
    return out


@fuzz
@given(headers, st.data())
def test_truncations_need_more(header, data):
    cut = data.draw(st.integers(0, len(header) - 1))
    assert parse_proxy_header(header[:cut]) is None


@fuzz
@given(headers, st.binary(min_size=1, max_size=200))
def test_tail_after_the_header_is_ignored(header, tail):
    assert parse_proxy_header(header + tail) == parse_proxy_header(header)


@fuzz
@given(headers, st.lists(st.integers(1, 40), min_size=1, max_size=20), st.binary(max_size=50))
def test_streamed_in_random_chunks(header, chunks, tail):
    wire = header + tail
    buffer, pos, i, result = bytearray(), 0, 0, None
    while result is None:
        buffer += wire[pos : pos + chunks[i % len(chunks)]]
        pos += chunks[i % len(chunks)]
        i += 1
        result = parse_proxy_header(memoryview(buffer))
        assert result is None or len(buffer) >= len(header)
    assert result == parse_proxy_header(header)


@fuzz
@given(headers, st.data(), st.binary(max_size=40))
def test_truncated_then_random_tail(header, data, tail):
    cut = data.draw(st.integers(0, len(header) - 1))
    result = assert_consistent_prefixes(header[:cut] + tail)
    if isinstance(result, ProxyHeader):
        assert result.length <= cut + len(tail)


@fuzz
@given(headers, st.lists(st.tuples(st.integers(0, 300), st.integers(0, 255)), min_size=1, max_size=6))
def test_random_byte_flips(header, flips):
    wire = bytearray(header)
    for position, value in flips:
        wire[position % len(wire)] = value
    assert_consistent_prefixes(bytes(wire) + b"tail")


@fuzz
@given(st.sampled_from([h for h in HEADERS if h.startswith(V2_SIGNATURE)]), st.data())
def test_mutated_length_fields(header, data):
    wire = bytearray(header)
    fields = [14] + [offset + 1 for offset in tlv_offsets(header)]
    for _ in range(data.draw(st.integers(1, 3))):
        offset = data.draw(st.sampled_from(fields))
        old = int.from_bytes(wire[offset : offset + 2], "big")
        near = st.integers(-4, 4).map(lambda d, old=old: (old + d) % 0x10000)
        new = data.draw(st.one_of(st.integers(0, 0xFFFF), near))
        wire[offset : offset + 2] = new.to_bytes(2, "big")
    result = outcome(bytes(wire) + bytes(64), max_size=2**17)
    if isinstance(result, ProxyHeader):
        assert result.length == 16 + int.from_bytes(wire[14:16], "big")


@fuzz
@given(st.sampled_from(checksummed), st.data())
def test_a_changed_byte_under_a_crc32c_never_parses(header, data):
    # Address and TLV value bytes are not structural: only the checksum can catch the change.
    # (The length field and TLV headers are: shortening the header past the CRC32C TLV, or
    # retyping that TLV to NOOP, yields a valid header the checksum cannot speak for.)
    values = [
        i
        for start in tlv_offsets(header)
        for i in range(start + 3, start + 3 + int.from_bytes(header[start + 1 : start + 3], "big"))
    ]
    position = data.draw(st.sampled_from(list(range(16, tlv_offsets(header)[0])) + values))
    wire = bytearray(header)
    wire[position] ^= data.draw(st.integers(1, 255))
    assert outcome(bytes(wire)) == "error"


@fuzz
@given(st.binary(max_size=300))
def test_random_bytes(data):
    assert_consistent_prefixes(data)


@fuzz
@given(st.sampled_from([b"PROXY ", V2_SIGNATURE, V2_SIGNATURE + b"\x21", V2_SIGNATURE + b"\x20\x00"]),
       st.binary(max_size=120))
def test_random_bytes_after_a_valid_start(start, rest):
    assert_consistent_prefixes(start + rest)


@fuzz
@given(st.sampled_from([0x20, 0x21]), st.sampled_from([0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32]),
       st.binary(max_size=300))
def test_random_block_behind_valid_fixed_header(ver_cmd, fam, block):
    # Get past the fixed part so that the address and TLV parsing see random input.
    result = outcome(v2(ver_cmd, fam, block))
    assert result is not None


@fuzz
@given(
    st.sampled_from([b"TCP4", b"TCP6", b"UNKNOWN"]),
    st.binary(max_size=110).map(lambda b: bytes(V1_ALPHABET[x % len(V1_ALPHABET)] for x in b)),
)
def test_random_v1_lines(protocol, rest):
    assert_consistent_prefixes(b"PROXY " + protocol + b" " + rest)


# --- a reference for v1 lines, independent of the module: one regex plus the ipaddress module -----

_V1_LINE = re.compile(rb"PROXY (TCP4|TCP6) ([^ \r\n]+) ([^ \r\n]+) "
                      rb"(0|[1-9][0-9]{0,4}) (0|[1-9][0-9]{0,4})\r\n")


def reference_v1(line: bytes):
    m = _V1_LINE.fullmatch(line)
    if not m or int(m[4]) > 65535 or int(m[5]) > 65535:
        return None
    make = ipaddress.IPv4Address if m[1] == b"TCP4" else ipaddress.IPv6Address
    try:
        source, destination = make(m[2].decode("ascii")), make(m[3].decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        return None
    if getattr(source, "scope_id", None) or getattr(destination, "scope_id", None):
        return None
    return source, int(m[4]), destination, int(m[5])


def v1_address(version: int):
    ips = st.ip_addresses(v=version)
    text = ips.map(str)
    if version == 6:
        text = st.one_of(text, ips.map(lambda a: a.exploded), ips.map(lambda a: str(a).upper()),
                         st.ip_addresses(v=4).map(lambda a: f"::ffff:{a}"))
    junk = st.text(alphabet="0123456789abcdefABCDEF:.", min_size=1, max_size=20)
    return st.one_of(text, text, junk).map(str.encode)


ports = st.one_of(st.integers(0, 70000).map(str),
                  st.text(alphabet="0123456789", min_size=1, max_size=6)).map(str.encode)
v1_lines = st.one_of(
    *(
        st.tuples(v1_address(version), v1_address(version), ports, ports).map(
            lambda fields, version=version: b"PROXY TCP%d %s\r\n" % (version, b" ".join(fields))
        )
        for version in (4, 6)
    )
)


@fuzz
@given(v1_lines, st.integers(0, 200))
def test_v1_lines_agree_with_a_reference(line, cut):
    expected = reference_v1(line)
    result = outcome(line + b"GET")
    truncated = outcome(line[: cut % len(line)])
    if expected is None:
        assert result == "error" and truncated in (None, "error")
        return
    assert truncated is None
    source, source_port, destination, destination_port = expected
    assert ipaddress.ip_address(result.source[0]) == source and result.source[1] == source_port
    assert ipaddress.ip_address(result.destination[0]) == destination
    assert result.destination[1] == destination_port
    assert result.length == len(line)


# --- build, then parse ---------------------------------------------------------------------------

ssl_values = st.builds(
    lambda client, verify, subs: (bytes([client]) + verify.to_bytes(4, "big")
                                  + b"".join(tlv(t, v) for t, v in subs)),
    st.integers(0, 255),
    st.integers(0, 2**32 - 1),
    st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=24)), max_size=4),
)
tlv_lists = st.lists(
    st.one_of(
        st.tuples(st.integers(0, 255).filter(lambda t: t not in (PP2_TYPE_CRC32C, PP2_TYPE_SSL)),
                  st.binary(max_size=64)),
        st.tuples(st.just(PP2_TYPE_SSL), ssl_values),
    ),
    max_size=6,
)
endpoints = st.tuples(st.ip_addresses(), st.integers(0, 65535))


def announced(address: ipaddress.IPv4Address | ipaddress.IPv6Address, other) -> ipaddress.IPv6Address:
    """What a receiver must read for ``address`` when the other endpoint is ``other``: the address
    itself, or its IPv4-mapped form when the families differ."""
    if address.version == other.version:
        return address
    return ipaddress.IPv6Address(f"::ffff:{address}") if address.version == 4 else address


@fuzz
@given(endpoints, endpoints, tlv_lists, st.booleans(), st.binary(max_size=20))
def test_build_v2_then_parse(source, destination, tlvs, checksum, stream):
    (src, src_port), (dst, dst_port) = source, destination
    wire = build_v2((str(src), src_port), (str(dst), dst_port), tlvs, checksum=checksum)
    header = parse_proxy_header(wire + stream, max_size=len(wire))
    assert (header.version, header.command, header.length) == (2, "PROXY", len(wire))
    assert ipaddress.ip_address(header.source[0]) == announced(src, dst) and header.source[1] == src_port
    assert ipaddress.ip_address(header.destination[0]) == announced(dst, src)
    assert header.destination[1] == dst_port
    assert [t for t in header.tlvs if t[0] != PP2_TYPE_CRC32C] == tlvs
    assert (header.tlv(PP2_TYPE_CRC32C) is not None) == checksum


@fuzz
@given(endpoints, endpoints, st.binary(max_size=20))
def test_build_v1_then_parse(source, destination, stream):
    (src, src_port), (dst, dst_port) = source, destination
    wire = build_v1((str(src), src_port), (str(dst), dst_port))
    assert len(wire) <= 104
    header = parse_proxy_header(wire + stream)
    assert (header.version, header.command, header.length) == (1, "PROXY", len(wire))
    assert ipaddress.ip_address(header.source[0]) == announced(src, dst) and header.source[1] == src_port
    assert ipaddress.ip_address(header.destination[0]) == announced(dst, src)
    assert header.destination[1] == dst_port
    assert build_v1(header.source, header.destination) == wire  # what comes out is canonical
