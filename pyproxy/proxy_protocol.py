"""Parser and builder for the PROXY protocol, versions 1 and 2 (HAProxy's ``proxy-protocol.txt``).

A listener flagged ``proxy_protocol`` sits behind a load balancer that starts every connection with
a header saying who the real client was; a service with ``proxy_protocol: v1|v2`` sends one to its
upstream. The worker calls :func:`parse_proxy_header` with everything read so far after every
``recv``, exactly like :func:`pyproxy.tls.clienthello.parse_client_hello`: the answer is a
:class:`ProxyHeader` once the whole header is there, ``None`` while more bytes are needed, or
:class:`ProxyProtocolError` as soon as the bytes prove this is not a valid header. The header's
``length`` says how many bytes to consume; everything after it is the client's stream.

Version 1 (spec §2.1), one line of US-ASCII, at most 107 bytes with its CRLF::

    "PROXY" SP ("TCP4" | "TCP6") SP src-ip SP dst-ip SP src-port SP dst-port CRLF
    "PROXY" SP "UNKNOWN" [SP <anything but CR and LF>] CRLF

    IPv4 as four decimal octets without leading zeros; IPv6 as inet_pton reads it (hex groups, one
    "::", optionally a dotted IPv4 tail); ports 0-65535 in decimal without leading zeros; exactly
    one space between fields. The line must end with CRLF: a lone CR or LF is an error.

Version 2 (spec §2.2), binary, network byte order::

    uint8   signature[12] = 0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A  ("\\r\\n\\r\\n\\0\\r\\nQUIT\\n")
    uint8   version << 4 | command           version 2; command 0 LOCAL or 1 PROXY
    uint8   family << 4 | transport         0x00 UNSPEC, 0x11/0x12 TCP/UDP over IPv4,
                                            0x21/0x22 over IPv6, 0x31/0x32 UNIX stream/dgram
    uint16  length                          bytes after these 16: addresses, then TLVs
    address block                           IPv4: src(4) dst(4) sport(2) dport(2) = 12
                                            IPv6: src(16) dst(16) sport(2) dport(2) = 36
                                            UNIX: src(108) dst(108) = 216; UNSPEC: none
    TLV*                                    uint8 type; uint16 length; opaque value[length]

Like ``parse_client_hello``, the parser is a pure function of the bytes: the caller keeps the
buffer. Everything in the fixed parts is rejected at the first byte that proves it wrong: the
signatures byte by byte, the v2 version/command byte, family byte and length field as each
arrives, each v1 field character by character (and whole once the space or CR ending it is in),
the 107-byte bound at byte 107. The v2 address block, TLVs and CRC32C (spec §2.2.3, RFC 4960
appendix B) are looked at once the header is complete, as the spec asks ("the receiver must not
start to parse an address before the whole address block is received") and as the checksum
needs anyway; the length field has bounded the wait by then. So a call that needs more bytes
copies at most 107 bytes (v1) or 16 (v2), does a few comparisons and returns.

Choices where the spec leaves room, after HAProxy's ``conn_recv_proxy`` and ``make_proxy_line``:

* Only the seven family/transport bytes the spec lists as valid are accepted (it says other
  values "must be rejected as invalid by receivers"; HAProxy is laxer and accepts any byte,
  ignoring the addresses). The length must cover the family's address block whatever the command.
* ``source`` and ``destination`` are set only for TCP4/TCP6 (v1) and PROXY over AF_INET/AF_INET6
  (v2, UDP included). LOCAL, UNKNOWN, UNSPEC and AF_UNIX leave them ``None``: the caller uses the
  connection's own addresses (spec: LOCAL "must use the real connection endpoints"; a receiver
  may fall back to UNSPEC for combinations it does not support, and an AF_UNIX path is no use to
  address-based routing). ``family`` is ``None`` for LOCAL, UNKNOWN and UNSPEC.
* IP addresses come out as ``inet_ntop`` writes them (RFC 5952: IPv6 compressed and lower case,
  IPv4-mapped ones dotted as in ``::ffff:192.0.2.1``, as HAProxy writes them), whatever form a v1
  line used. An IPv4-mapped address stays IPv6: unmapping it is the caller's decision.
* TLVs are returned as sent, in order, NOOP and CRC32C included. A CRC32C TLV must be 4 bytes and
  appear once, PP2_TYPE_UNIQUE_ID is at most 128 bytes (§2.2.5), and PP2_TYPE_SSL must hold its
  5-byte fixed part followed by well-formed sub-TLVs.
* The builders copy HAProxy: when one address is IPv4 and the other IPv6, the IPv4 one is sent
  as an IPv4-mapped IPv6 address (TCP6 / AF_INET6), which keeps both addresses instead of
  degrading to UNKNOWN; with no addresses at all they send ``PROXY UNKNOWN`` (v1) or a LOCAL
  command with family UNSPEC (v2).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT_MAX_SIZE",
    "PP2_TYPE_ALPN",
    "PP2_TYPE_AUTHORITY",
    "PP2_TYPE_CRC32C",
    "PP2_TYPE_NETNS",
    "PP2_TYPE_NOOP",
    "PP2_TYPE_SSL",
    "PP2_TYPE_UNIQUE_ID",
    "V1_MAX_LENGTH",
    "V2_SIGNATURE",
    "ProxyHeader",
    "ProxyProtocolError",
    "SslTlv",
    "build_v1",
    "build_v2",
    "crc32c",
    "parse_proxy_header",
    "parse_ssl_tlv",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
V1_PREFIX = b"PROXY "
# "PROXY UNKNOWN ffff:...:ffff ffff:...:ffff 65535 65535\r\n", the spec's worst case (§2.1).
V1_MAX_LENGTH = 107
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER_LENGTH = 16
V2_MAX_LENGTH = V2_HEADER_LENGTH + 0xFFFF
# Default bound on a header: HAProxy's own headers are under 300 bytes even with every SSL TLV;
# 4 KiB of TLVs leaves room for the largest a sane load balancer sends while bounding what a
# peer can make a worker buffer before the session starts.
DEFAULT_MAX_SIZE = 4096 + V2_HEADER_LENGTH

PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_SUBTYPE_SSL_SIG_ALG = 0x24
PP2_SUBTYPE_SSL_KEY_ALG = 0x25
PP2_TYPE_NETNS = 0x30
PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT_CONN = 0x02
PP2_CLIENT_CERT_SESS = 0x04

MAX_UNIQUE_ID_LENGTH = 128
TLV_HEADER_LENGTH = 3
SSL_TLV_FIXED_LENGTH = 5  # uint8 client; uint32 verify

COMMAND_LOCAL = 0x0
COMMAND_PROXY = 0x1
_COMMAND_NAMES = {COMMAND_LOCAL: "LOCAL", COMMAND_PROXY: "PROXY"}

# family/transport byte -> (address family, address block length), the spec's valid combinations.
_V2_FAMILIES: dict[int, tuple[socket.AddressFamily | None, int]] = {
    0x00: (None, 0),
    0x11: (socket.AF_INET, 12),
    0x12: (socket.AF_INET, 12),
    0x21: (socket.AF_INET6, 36),
    0x22: (socket.AF_INET6, 36),
    0x31: (socket.AF_UNIX, 216),
    0x32: (socket.AF_UNIX, 216),
}
_FAMILY_NAMES = {0x0: "UNSPEC", 0x1: "AF_INET", 0x2: "AF_INET6", 0x3: "AF_UNIX"}
_TRANSPORT_NAMES = {0x0: "UNSPEC", 0x1: "STREAM", 0x2: "DGRAM"}

_V1_PROTOCOLS = (b"TCP4 ", b"TCP6 ", b"UNKNOWN")
_V1_FIELDS = ("source address", "destination address", "source port", "destination port")
# A decimal octet without leading zeros. Every prefix of a valid octet is itself a valid octet
# (or empty), so "octets so far, then maybe a partial one" is exactly the set of prefixes of a
# valid address: the same patterns check a field complete and a field still arriving.
_OCTET = rb"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(rb"(?:%s\.){3}%s" % (_OCTET, _OCTET))
_IPV4_PREFIX = re.compile(rb"(?:%s\.){0,3}%s?" % (_OCTET, _OCTET))
_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")
_IPV6_CHARS = frozenset(b"0123456789abcdefABCDEF:.")
_IPV6_MAX_TEXT = len("ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255")


class ProxyProtocolError(ValueError):
    """The bytes are not (the beginning of) a valid PROXY protocol header."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed PROXY protocol header.

    ``command`` is ``"PROXY"`` or ``"LOCAL"`` (v2 only). ``source`` and ``destination`` are
    ``(ip, port)`` of the real client and of the address it connected to, or ``None`` when the
    header carries no IP endpoints (LOCAL, UNKNOWN, UNSPEC, AF_UNIX): then the connection's own
    addresses apply. ``length`` is how many bytes of the parsed buffer the header occupies; the
    bytes after it belong to the client's stream. ``tlvs`` are v2's ``(type, value)`` pairs.
    """

    version: int
    command: str
    family: socket.AddressFamily | None
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    length: int
    tlvs: tuple[tuple[int, bytes], ...] = ()

    def tlv(self, tlv_type: int) -> bytes | None:
        """The value of the first TLV of ``tlv_type``, or ``None``."""
        for found, value in self.tlvs:
            if found == tlv_type:
                return value
        return None


@dataclass(frozen=True, slots=True)
class SslTlv:
    """The value of a PP2_TYPE_SSL TLV (spec §2.2.6): ``client`` flags (PP2_CLIENT_*), ``verify``
    (0 when a client certificate was presented and verified) and the PP2_SUBTYPE_SSL_* sub-TLVs."""

    client: int
    verify: int
    tlvs: tuple[tuple[int, bytes], ...]


def parse_proxy_header(data: bytes | bytearray | memoryview,
                       max_size: int = DEFAULT_MAX_SIZE) -> ProxyHeader | None:
    """Parse the PROXY protocol header (v1 or v2) at the start of ``data``.

    ``data`` is everything received from the client so far. Returns the :class:`ProxyHeader` once
    the header is complete, ``None`` while more bytes are needed. Raises
    :class:`ProxyProtocolError` as soon as the bytes prove they are not a valid header, or that it
    cannot fit in ``max_size`` bytes, so a returned ``length`` never exceeds ``max_size`` (nor 107
    for v1). Bytes after the header are ignored.
    """
    if not data:
        return None
    first = data[0]
    if first == V1_PREFIX[0]:
        header = _parse_v1(data, max_size)
    elif first == V2_SIGNATURE[0]:
        header = _parse_v2(data, max_size)
    else:
        raise ProxyProtocolError(_describe_first_byte(first))
    if header is None and len(data) >= max_size:
        raise ProxyProtocolError(f"PROXY header does not fit in {max_size} bytes")
    return header


def proxy_header_need(data: bytes | bytearray | memoryview) -> int:
    """How many bytes must be there before ``parse_proxy_header`` can say more than it did about
    ``data`` (for which it returned None): a v2 header announces its length in its first 16 bytes,
    so it is worth parsing again only once all of it arrived; a v1 line ends at its CRLF, at most
    107 bytes in. A header sent a byte at a time so costs at most ~110 looks, not one per byte of
    a 4 KiB v2 header."""
    size = len(data)
    if size >= V2_HEADER_LENGTH and data[0] == V2_SIGNATURE[0]:
        return V2_HEADER_LENGTH + (data[14] << 8 | data[15])
    return size + 1


def parse_ssl_tlv(value: bytes) -> SslTlv:
    """Decode a PP2_TYPE_SSL value; :class:`ProxyProtocolError` if it is malformed."""
    if len(value) < SSL_TLV_FIXED_LENGTH:
        raise ProxyProtocolError(f"PP2_TYPE_SSL TLV is {len(value)} bytes, shorter than its 5-byte "
                                 "fixed part")
    subtlvs = _parse_tlvs(value, SSL_TLV_FIXED_LENGTH, len(value), "PP2_TYPE_SSL sub-TLV", False)
    return SslTlv(client=value[0], verify=int.from_bytes(value[1:5], "big"), tlvs=subtlvs)


# --- version 1 ----------------------------------------------------------------------------------


def _parse_v1(data: bytes | bytearray | memoryview, max_size: int) -> ProxyHeader | None:
    limit = min(V1_MAX_LENGTH, max_size)
    line = bytes(data[:limit])
    _check_signature(line, V1_PREFIX, "v1")
    if len(line) <= len(V1_PREFIX):
        return None

    rest = line[len(V1_PREFIX) :]
    matches = [p for p in _V1_PROTOCOLS if rest[: len(p)] == p[: len(rest)]]
    if not matches:
        token = rest.split(b" ", 1)[0].split(b"\r", 1)[0][:16]
        raise ProxyProtocolError(f"PROXY v1 protocol {token!r} is not TCP4, TCP6 or UNKNOWN")
    protocol = matches[0]
    start = len(V1_PREFIX) + len(protocol)
    if len(line) < start:
        return None

    if protocol == b"UNKNOWN":
        # §2.1: for UNKNOWN "the receiver must ignore anything presented before the CRLF".
        if len(line) > start and line[start] not in b" \r":
            raise ProxyProtocolError("PROXY v1 'UNKNOWN' is followed by "
                                     f"{line[start:start + 1]!r}, not a space or CRLF")
        end = _find_line_end(line, start, limit)
        if end is None:
            return None
        return ProxyHeader(version=1, command="PROXY", family=None, source=None, destination=None, length=end)

    cr = line.find(b"\r", start)
    fields = (line[start:] if cr < 0 else line[start:cr]).split(b" ")
    if len(fields) > len(_V1_FIELDS):
        raise ProxyProtocolError("PROXY v1 line has more than 4 fields after the protocol (a space too many)")
    complete = len(fields) if cr >= 0 else len(fields) - 1
    ipv6 = protocol == b"TCP6 "
    values = [_check_v1_field(i, field, i < complete, ipv6) for i, field in enumerate(fields)]
    if cr >= 0 and len(fields) < len(_V1_FIELDS):
        raise ProxyProtocolError(f"PROXY v1 line ends after {len(fields)} of the 4 fields after the protocol")
    end = _find_line_end(line, start, limit)
    if end is None:
        return None
    source_ip, destination_ip, source_port, destination_port = values
    return ProxyHeader(
        version=1,
        command="PROXY",
        family=socket.AF_INET6 if ipv6 else socket.AF_INET,
        source=(source_ip, source_port),
        destination=(destination_ip, destination_port),
        length=end,
    )


def _check_v1_field(index: int, field: bytes, complete: bool, ipv6: bool) -> Any:
    """Validate a v1 field, complete or still arriving; the decoded value of a complete one: the
    text of an address (fields 0 and 1), the number of a port (2 and 3); None while incomplete."""
    what = _V1_FIELDS[index]
    if index >= 2:
        if not (_PORT.fullmatch(field) and int(field) <= 0xFFFF) and (complete or field):
            raise ProxyProtocolError(f"PROXY v1 {what} {_show(field)} is not a decimal "
                                     "0-65535 without leading zeros")
        return int(field) if complete else None
    if complete and not field:
        raise ProxyProtocolError(f"PROXY v1 {what} is empty (two spaces in a row?)")
    if ipv6:
        if not _ipv6_prefix_viable(field):
            raise ProxyProtocolError(f"PROXY v1 {what} {_show(field)} is not an IPv6 address")
        if not complete:
            return None
        try:
            return _ipv6_text(ipaddress.IPv6Address(field.decode("ascii")).packed)
        except ValueError:
            raise ProxyProtocolError(f"PROXY v1 {what} {_show(field)} is not an IPv6 address") from None
    if not (_IPV4 if complete else _IPV4_PREFIX).fullmatch(field):
        raise ProxyProtocolError(f"PROXY v1 {what} {_show(field)} is not a dotted-decimal IPv4 address")
    return field.decode("ascii") if complete else None


def _ipv6_prefix_viable(text: bytes) -> bool:
    """Whether ``text`` can still be (the start of) an IPv6 address as inet_pton reads it.

    Necessary conditions only (the complete field then goes through :mod:`ipaddress`), but each
    one stays false once false, so a call that raises never sees a later call succeed.
    """
    if len(text) > _IPV6_MAX_TEXT or not _IPV6_CHARS.issuperset(text):
        return False
    if b":::" in text or text.count(b"::") > 1:
        return False
    if text[:1] == b":" and text[1:2] not in (b"", b":"):
        return False  # a leading colon is only valid as the start of "::"
    groups = text.split(b":")
    for group in groups[:-1]:
        if len(group) > 4 or b"." in group:
            return False
    last = groups[-1]
    ipv4_tail = b"." in last
    if ipv4_tail and not _IPV4_PREFIX.fullmatch(last):
        return False
    if not ipv4_tail and len(last) > 4:
        return False
    # 128 bits are eight 16-bit groups (a dotted IPv4 tail counts two); "::" stands for one or more.
    explicit = sum(1 for group in groups if group) + ipv4_tail
    if b"::" in text:
        return explicit <= 7
    return len(groups) <= 8 and explicit <= 8


def _find_line_end(line: bytes, start: int, limit: int) -> int | None:
    """The offset just after the CRLF ending the v1 line, ``None`` if it has not arrived yet."""
    cr = line.find(b"\r", start)
    lf = line.find(b"\n", start)
    if lf >= 0 and (cr < 0 or lf < cr):
        raise ProxyProtocolError(f"PROXY v1 line has a bare LF at byte {lf + 1} (it must end with CRLF)")
    if cr < 0 or cr + 1 == len(line):
        if len(line) >= limit:
            raise ProxyProtocolError(f"PROXY v1 line has no CRLF in its first {limit} bytes")
        return None
    if line[cr + 1] != 0x0A:
        raise ProxyProtocolError(f"PROXY v1 line has a CR at byte {cr + 1} not followed by LF")
    return cr + 2


# --- version 2 ----------------------------------------------------------------------------------


def _parse_v2(data: bytes | bytearray | memoryview, max_size: int) -> ProxyHeader | None:
    available = len(data)
    head = bytes(data[:V2_HEADER_LENGTH])
    _check_signature(head, V2_SIGNATURE, "v2")
    if available <= len(V2_SIGNATURE):
        return None

    version, command = head[12] >> 4, head[12] & 0x0F
    if version != 2:
        raise ProxyProtocolError(f"PROXY v2 version is {version}, not 2 (byte 13 is 0x{head[12]:02x})")
    if command not in _COMMAND_NAMES:
        raise ProxyProtocolError(f"PROXY v2 command is 0x{command:x}, neither LOCAL (0) nor PROXY (1)")
    if available < 14:
        return None

    family_byte = head[13]
    if family_byte not in _V2_FAMILIES:
        raise ProxyProtocolError(
            f"PROXY v2 family/transport 0x{family_byte:02x} "
            f"({_describe_family(family_byte)}) is not supported"
        )
    if available < V2_HEADER_LENGTH:
        return None

    block_length = head[14] << 8 | head[15]
    total = V2_HEADER_LENGTH + block_length
    if total > max_size:
        raise ProxyProtocolError(f"PROXY v2 header of 16+{block_length} bytes exceeds "
                                 f"the {max_size}-byte limit")
    family, address_length = _V2_FAMILIES[family_byte]
    if block_length < address_length:
        raise ProxyProtocolError(
            f"PROXY v2 length {block_length} is too short for the {address_length}-byte"
            f" {_describe_family(family_byte)} address block"
        )
    if available < total:
        return None

    header = bytes(data[:total])
    source = destination = None
    if command == COMMAND_LOCAL:
        family = None  # §2.2: for LOCAL the receiver discards "the protocol block including the family"
    elif family in (socket.AF_INET, socket.AF_INET6):
        size = 4 if family == socket.AF_INET else 16
        ports = V2_HEADER_LENGTH + 2 * size
        source = (socket.inet_ntop(family, header[16 : 16 + size]), header[ports] << 8 | header[ports + 1])
        destination = (socket.inet_ntop(family, header[16 + size : ports]),
                       header[ports + 2] << 8 | header[ports + 3])

    tlvs = _parse_tlvs(header, V2_HEADER_LENGTH + address_length, total, "TLV", True)
    _verify_crc32c(header, tlvs)
    return ProxyHeader(
        version=2,
        command=_COMMAND_NAMES[command],
        family=family,
        source=source,
        destination=destination,
        length=total,
        tlvs=tlvs,
    )


def _parse_tlvs(buffer: bytes, pos: int, end: int, what: str,
                check_types: bool) -> tuple[tuple[int, bytes], ...]:
    """The TLVs filling ``buffer[pos:end]`` exactly, with the per-type checks of the module doc."""
    tlvs = []
    while pos < end:
        if end - pos < TLV_HEADER_LENGTH:
            raise ProxyProtocolError(f"PROXY v2 {what} header truncated: {end - pos} "
                                     f"byte(s) left at offset {pos}")
        tlv_type = buffer[pos]
        length = buffer[pos + 1] << 8 | buffer[pos + 2]
        start = pos + TLV_HEADER_LENGTH
        if start + length > end:
            raise ProxyProtocolError(
                f"PROXY v2 {what} 0x{tlv_type:02x} length {length} overruns the header "
                f"({end - start} bytes left)"
            )
        value = buffer[start : start + length]
        if check_types:
            _check_tlv(tlv_type, value)
        tlvs.append((tlv_type, value))
        pos = start + length
    return tuple(tlvs)


def _check_tlv(tlv_type: int, value: bytes) -> None:
    if tlv_type == PP2_TYPE_CRC32C and len(value) != 4:
        raise ProxyProtocolError(f"PROXY v2 CRC32C TLV is {len(value)} bytes, not 4")
    if tlv_type == PP2_TYPE_UNIQUE_ID and len(value) > MAX_UNIQUE_ID_LENGTH:
        raise ProxyProtocolError(f"PROXY v2 UNIQUE_ID TLV is {len(value)} bytes, over {MAX_UNIQUE_ID_LENGTH}")
    if tlv_type == PP2_TYPE_SSL:
        parse_ssl_tlv(value)


def _verify_crc32c(header: bytes, tlvs: tuple[tuple[int, bytes], ...]) -> None:
    """§2.2.3: the CRC32C of the whole header with the checksum field zeroed."""
    checksums = [value for tlv_type, value in tlvs if tlv_type == PP2_TYPE_CRC32C]
    if not checksums:
        return
    if len(checksums) > 1:
        raise ProxyProtocolError("PROXY v2 header has more than one CRC32C TLV")
    # Find the field again by walking the TLVs (a value equal to the checksum could sit earlier).
    pos = V2_HEADER_LENGTH + _V2_FAMILIES[header[13]][1]
    while header[pos] != PP2_TYPE_CRC32C:
        pos += TLV_HEADER_LENGTH + (header[pos + 1] << 8 | header[pos + 2])
    field = pos + TLV_HEADER_LENGTH
    expected = int.from_bytes(header[field : field + 4], "big")
    actual = crc32c(header[:field] + bytes(4) + header[field + 4 :])
    if actual != expected:
        raise ProxyProtocolError(f"PROXY v2 CRC32C mismatch: header says 0x{expected:08x}, "
                                 f"bytes give 0x{actual:08x}")


# --- CRC32C (Castagnoli, reflected polynomial 0x82F63B78, RFC 4960 appendix B) -----------------


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """The CRC32C of ``data`` (``crc32c(b"123456789") == 0xE3069283``)."""
    table = _CRC32C_TABLE
    crc = 0xFFFFFFFF
    for byte in bytes(data):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# --- builders -----------------------------------------------------------------------------------


def build_v1(source: tuple[str, int] | None, destination: tuple[str, int] | None) -> bytes:
    """The v1 line announcing a TCP connection from ``source`` to ``destination`` (``(ip, port)``).

    Both IPv4: ``TCP4``; otherwise ``TCP6``, an IPv4 address being sent IPv4-mapped (as HAProxy
    does). Either one ``None``: ``PROXY UNKNOWN``. :class:`ValueError` for a bad address or port.
    """
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    (src, src_port), (dst, dst_port) = _endpoints(source, destination)
    protocol, family = ("TCP4", socket.AF_INET) if src.version == 4 else ("TCP6", socket.AF_INET6)
    src_text, dst_text = socket.inet_ntop(family, src.packed), socket.inet_ntop(family, dst.packed)
    return f"PROXY {protocol} {src_text} {dst_text} {src_port} {dst_port}\r\n".encode("ascii")


def build_v2(
    source: tuple[str, int] | None,
    destination: tuple[str, int] | None,
    tlvs: Iterable[tuple[int, bytes]] = (),
    *,
    checksum: bool = False,
) -> bytes:
    """The v2 header announcing a TCP connection from ``source`` to ``destination``.

    Command PROXY, transport STREAM, family AF_INET when both addresses are IPv4, else AF_INET6
    (IPv4 sent IPv4-mapped). Either one ``None``: command LOCAL, family UNSPEC, no addresses.
    ``tlvs`` are ``(type, value)`` pairs appended in order; ``checksum=True`` adds a CRC32C TLV
    first (where HAProxy puts it) and fills it in. :class:`ValueError` for a bad address, port or
    TLV, or a header longer than 16 + 65535 bytes.
    """
    if source is None or destination is None:
        command, family_byte, block = COMMAND_LOCAL, 0x00, b""
    else:
        (src, src_port), (dst, dst_port) = _endpoints(source, destination)
        command, family_byte = COMMAND_PROXY, 0x11 if src.version == 4 else 0x21
        block = src.packed + dst.packed + src_port.to_bytes(2, "big") + dst_port.to_bytes(2, "big")
    parts = [block]
    if checksum:
        parts.append(bytes((PP2_TYPE_CRC32C, 0, 4)) + bytes(4))
    for tlv_type, value in tlvs:
        if not isinstance(tlv_type, int) or not 0 <= tlv_type <= 0xFF:
            raise ValueError(f"TLV type {tlv_type!r} is not 0-255")
        value = bytes(value)
        if tlv_type == PP2_TYPE_CRC32C:
            raise ValueError("pass checksum=True rather than a CRC32C TLV: its value "
                             "depends on the whole header")
        _check_tlv(tlv_type, value)
        if len(value) > 0xFFFF:
            raise ValueError(f"TLV 0x{tlv_type:02x} value is {len(value)} bytes, over 65535")
        parts.append(bytes((tlv_type,)) + len(value).to_bytes(2, "big") + value)
    body = b"".join(parts)
    if len(body) > 0xFFFF:
        raise ValueError(f"PROXY v2 header would be 16+{len(body)} bytes, over 16+65535")
    header = bytearray(V2_SIGNATURE + bytes((0x20 | command, family_byte)) + len(body).to_bytes(2, "big")
                       + body)
    if checksum:
        field = V2_HEADER_LENGTH + len(block) + TLV_HEADER_LENGTH
        header[field : field + 4] = crc32c(header).to_bytes(4, "big")
    return bytes(header)


def _endpoints(source: tuple[str, int],
               destination: tuple[str, int]) -> tuple[tuple[IPAddress, int], tuple[IPAddress, int]]:
    """Both endpoints as (ip_address, port), in one family (IPv4 mapped into IPv6 if mixed)."""
    src, src_port = _endpoint(source, "source")
    dst, dst_port = _endpoint(destination, "destination")
    if src.version != dst.version:
        src, dst = _as_ipv6(src), _as_ipv6(dst)
    return (src, src_port), (dst, dst_port)


def _endpoint(endpoint: tuple[str, int], what: str) -> tuple[IPAddress, int]:
    ip, port = endpoint
    if not isinstance(ip, str):
        raise ValueError(f"{what} address {ip!r} is not a string")
    address = ipaddress.ip_address(ip)
    if address.version == 6 and address.scope_id:
        raise ValueError(f"{what} address {ip!r} has a scope id, which the PROXY protocol cannot carry")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise ValueError(f"{what} port {port!r} is not an integer 0-65535")
    return address, port


def _ipv6_text(packed: bytes) -> str:
    # inet_ntop, not str(IPv6Address): RFC 5952 text, with IPv4-mapped addresses in dotted form as
    # HAProxy writes them (Python < 3.13 prints ::ffff:7f00:1 for ::ffff:127.0.0.1).
    return socket.inet_ntop(socket.AF_INET6, packed)


def _as_ipv6(address: IPAddress) -> ipaddress.IPv6Address:
    if isinstance(address, ipaddress.IPv6Address):
        return address
    return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed)


# --- error messages -----------------------------------------------------------------------------


def _check_signature(head: bytes, signature: bytes, version: str) -> None:
    """Compare the bytes present with the signature; raise at the first one that differs."""
    n = min(len(head), len(signature))
    if head[:n] == signature[:n]:
        return
    at = next(i for i in range(n) if head[i] != signature[i])
    raise ProxyProtocolError(
        f"not a PROXY {version} header: byte {at + 1} is {_show_byte(head[at])}, the signature has "
        f"{_show_byte(signature[at])}"
    )


def _describe_first_byte(byte: int) -> str:
    """Say, from the very first byte, why the stream does not start with a PROXY header."""
    what = f"first byte {_show_byte(byte)} is neither 'P' (v1) nor '\\r' (v2)"
    if byte == 0x16:
        return f"not a PROXY header: {what} but a TLS handshake record (is the load balancer sending one?)"
    if 0x20 <= byte < 0x7F:
        return f"not a PROXY header: {what} (plain text, HTTP?)"
    return f"not a PROXY header: {what}"


def _describe_family(family_byte: int) -> str:
    family = _FAMILY_NAMES.get(family_byte >> 4, f"family 0x{family_byte >> 4:x}")
    transport = _TRANSPORT_NAMES.get(family_byte & 0x0F, f"transport 0x{family_byte & 0x0F:x}")
    return f"{family} {transport}"


def _show_byte(byte: int) -> str:
    return f"0x{byte:02x} ({chr(byte)!r})" if 0x20 <= byte < 0x7F else f"0x{byte:02x}"


def _show(field: bytes) -> str:
    return repr(field[:48].decode("latin-1"))
