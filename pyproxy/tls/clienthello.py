"""Parser for the TLS ClientHello (the ``ssl`` listener's preread), pure or incremental.

A worker reading an ``ssl`` listener has to know the SNI (and ALPN, and offered versions) before it
can pick a route, and it has to know it without a TLS library: for ``tls_passthrough`` routes the
bytes go upstream untouched. :func:`parse_client_hello` takes everything read so far; the answer is
a :class:`ClientHello` once the whole message is there, ``None`` while more bytes are needed, or
:class:`ClientHelloError` as soon as the bytes prove the peer is not sending one (HTTP on a TLS
port, a scanner, a truncated-then-garbage stream). A caller that looks again each time more bytes
arrive keeps a :class:`ClientHelloReader`, which gives the same answers but walks only what is new.

What is on the wire (the first flight of a TLS 1.0–1.3 client)::

    TLSPlaintext (RFC 8446 §5.1), repeated until the handshake message is complete:
        uint8   type = 22 (handshake)
        uint16  legacy_record_version          0x0301 from TLS 1.3 clients, 0x0300-0x0303 otherwise
        uint16  length                         1 .. 2^14 (we tolerate 2^14 + 256, see below)
        opaque  fragment[length]

    Handshake (RFC 8446 §4), carried in the concatenated fragments:
        uint8   msg_type = 1 (client_hello)
        uint24  length

    ClientHello body (RFC 8446 §4.1.2; RFC 5246 §7.4.1.2 for TLS <= 1.2):
        uint16  legacy_version                 0x0303 in TLS 1.3; the real version in TLS <= 1.2
        opaque  random[32]
        opaque  legacy_session_id<0..32>
        uint16  cipher_suites<2..2^16-2>
        uint8   legacy_compression_methods<1..2^8-1>
        Extension extensions<0..2^16-1>        absent entirely in some pre-TLS-1.2 hellos
            uint16 extension_type; opaque extension_data<0..2^16-1>

    server_name (type 0, RFC 6066 §3):
        ServerName server_name_list<1..2^16-1>
            uint8 name_type = 0 (host_name); opaque HostName<1..2^16-1>   (ASCII, no trailing dot)
    application_layer_protocol_negotiation (type 16, RFC 7301 §3.1):
        ProtocolName protocol_name_list<2..2^16-1>
            opaque ProtocolName<1..2^8-1>
    supported_versions (type 43, RFC 8446 §4.2.1):
        ProtocolVersion versions<2..254>

The record layer is walked the way nginx's ``ngx_stream_ssl_preread_module`` walks it: every
record header is checked the moment its bytes arrive, and a record is used only once it is
complete. ``parse_client_hello`` is a pure function of the bytes, like mitmproxy's: each call
walks the records from the first. The body is parsed once, when the message is complete, so
structural errors *inside* it are reported then; everything in the headers (content type, versions,
record and message lengths) is rejected at the first byte that proves it wrong.

The hello may be split over any number of records (RFC 8446 §5.1 allows handshake messages to be
fragmented arbitrarily, and clients with big post-quantum key shares do cross the 16 KiB record
limit) and over any number of TCP segments. Looking at the whole buffer again after every segment
would make a hello sent as thousands of 1-byte records cost quadratic work, so a caller that looks
again keeps a :class:`ClientHelloReader`, as nginx keeps its state in the session: it remembers
where the last complete record ended and the handshake bytes gathered so far, walks only the
records completed since, and says (``need``) how long the buffer must grow before the hello can be
complete (the rest of it in one record), so the caller need not look in between. The work per byte
of input is then constant. ``max_size`` counts record headers too, and a hello that can no longer
fit in it is refused as soon as that is certain.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "DEFAULT_MAX_SIZE",
    "MAX_RECORD_LENGTH",
    "ClientHello",
    "ClientHelloError",
    "StartTLSRequest",
    "is_grease",
    "parse_client_hello",
]

# What the parsers read: a peek's bytes, or a buffer the caller keeps.
Data = bytes | bytearray | memoryview

CONTENT_TYPE_HANDSHAKE = 0x16
HANDSHAKE_CLIENT_HELLO = 0x01
RECORD_HEADER_LENGTH = 5
HANDSHAKE_HEADER_LENGTH = 4

# RFC 8446 §5.1 caps a plaintext record at 2^14 bytes and every mainstream stack (OpenSSL, Go,
# BoringSSL) answers a bigger one with record_overflow — but only after reading it: their header
# check allows the ciphertext size. We allow 2^14 + 256 (TLS 1.3's TLSCiphertext limit): a length
# beyond that cannot be a ClientHello record for anyone, while a record a few bytes over 2^14 is
# the backend's call to refuse, not ours (in passthrough we would be blamed for the failure).
MAX_RECORD_LENGTH = 2**14 + 256

# Default bound on the bytes a hello may occupy, record headers included. Real hellos are 200 B to
# ~2 KiB; hybrid post-quantum key shares add 1-2 KiB each; 64 KiB leaves room for the largest
# legitimate ones while bounding what a client can make a worker buffer.
DEFAULT_MAX_SIZE = 65536

# legacy_version(2) + random(32) + session_id length(1) + cipher_suites length(2) + one suite(2)
# + compression_methods length(1) + one method(1): nothing shorter can be a ClientHello.
MIN_CLIENT_HELLO_LENGTH = 2 + 32 + 1 + 2 + 2 + 1 + 1

MAX_SESSION_ID_LENGTH = 32
# A DNS name is at most 253 characters (255 octets on the wire); OpenSSL refuses a longer
# host_name (TLSEXT_MAXLEN_host_name) with unrecognized_name.
MAX_HOST_NAME_LENGTH = 255

EXT_SERVER_NAME = 0
EXT_ALPN = 16
EXT_SUPPORTED_VERSIONS = 43
EXT_PRE_SHARED_KEY = 41
_HOST_NAME_BYTES = bytes(range(0x21, 0x7F))     # printable ASCII, no space
_GREASE = frozenset(0x0A0A + 0x1010 * i for i in range(16))
_PARSED_EXTENSIONS = frozenset((EXT_SERVER_NAME, EXT_ALPN, EXT_SUPPORTED_VERSIONS))
_EXTENSION_HEADER = struct.Struct(">HH").unpack_from
NAME_TYPE_HOST_NAME = 0

TLS1_3 = 0x0304

_VERSION_NAMES = {
    0x0300: "SSLv3",
    0x0301: "TLSv1",
    0x0302: "TLSv1.1",
    0x0303: "TLSv1.2",
    0x0304: "TLSv1.3",
}

# `ClientHello.protocol` by version list: clients send few distinct lists (GREASE is removed), and a
# terminating listener asks on every handshake. Bounded, so a client making up lists cannot grow it.
_PROTOCOL_OF: dict[tuple[int, ...], str] = {}
_PROTOCOL_OF_MAX = 256

_CONTENT_TYPE_NAMES = {
    0x14: "change_cipher_spec",
    0x15: "alert",
    0x16: "handshake",
    0x17: "application_data",
}


class ClientHelloError(ValueError):
    """The bytes are not (the beginning of) a valid TLS ClientHello."""


class StartTLSRequest(ClientHelloError):
    """The stream starts with a 0x00 byte: not a ClientHello, but it may be a request to start TLS
    that a protocol sends before its ClientHello (PostgreSQL's SSLRequest, which begins with its
    uint32 length, 8). The caller that knows such requests looks at the bytes; to any other this is
    the ClientHelloError it always was."""


def is_grease(value: int) -> bool:
    """Whether a 16-bit codepoint is a GREASE value (RFC 8701: 0x0A0A, 0x1A1A, ... 0xFAFA)."""
    return (value & 0x0F0F) == 0x0A0A and (value >> 8) == (value & 0xFF)


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What routing, logging and passthrough need from a client's first flight.

    ``versions`` are the ones the client offers, in its order of preference: the
    supported_versions extension (GREASE removed) when present, else ``(legacy_version,)``.
    ``cipher_suites`` and ``extensions`` are exactly as sent, GREASE included (fingerprinting
    wants them raw). ``length`` is how many bytes of the parsed buffer the hello occupies, record
    headers included, up to the end of the record that completes it.
    """

    sni: str | None
    alpn: tuple[str, ...]
    versions: tuple[int, ...]
    legacy_version: int
    record_version: int
    cipher_suites: tuple[int, ...]
    extensions: tuple[int, ...]
    length: int

    @property
    def offers_tls13(self) -> bool:
        """Whether the client offers TLS 1.3."""
        return TLS1_3 in self.versions

    @property
    def protocol(self) -> str:
        """The highest version offered, named like OpenSSL/nginx do (``TLSv1.3``), as nginx's
        ``$ssl_preread_protocol``; ``""`` when no known version is offered."""
        versions = self.versions
        name = _PROTOCOL_OF.get(versions)
        if name is None:
            known = [v for v in versions if v in _VERSION_NAMES]
            name = _VERSION_NAMES[max(known)] if known else ""
            if len(_PROTOCOL_OF) < _PROTOCOL_OF_MAX:
                _PROTOCOL_OF[versions] = name
        return name


def parse_client_hello(data: Data,
                       max_size: int = DEFAULT_MAX_SIZE) -> ClientHello | None:
    """Parse the ClientHello at the start of ``data`` (everything read from the client so far).

    Returns the :class:`ClientHello` once the whole handshake message (and the record that
    completes it) is in ``data``; ``None`` while more bytes are needed. Raises
    :class:`ClientHelloError` as soon as the bytes prove this is not a valid ClientHello, or that
    it cannot fit in ``max_size`` bytes of ``data`` (record headers included), so a returned
    ``length`` never exceeds ``max_size`` and a caller may size its preread buffer with it. Bytes
    after the hello are ignored.
    """
    if type(data) is bytes:
        hello = _parse_common_case(data, max_size)
        if hello is not None:
            return hello
    return _parse_any(data, max_size)


def _parse_common_case(data: bytes, max_size: int) -> ClientHello | None:
    """The hello every client sends: one record, well formed. Parsed in place with fewer checks
    per extension (a TLS termination pays for this parse on every handshake), it gives exactly what
    `_parse_any` gives; anything else (more records, more bytes needed, any error) is None and
    left to `_parse_any`, which says precisely what is wrong."""
    try:
        if data[0] != CONTENT_TYPE_HANDSHAKE or data[1] != 3 or data[5] != HANDSHAKE_CLIENT_HELLO:
            return None
        stop = RECORD_HEADER_LENGTH + (data[3] << 8 | data[4])
        end = 9 + (data[6] << 16 | data[7] << 8 | data[8])       # the message ends here
        if (end > stop or stop > len(data) or stop > max_size or stop - 5 > MAX_RECORD_LENGTH
                or end - 9 < MIN_CLIENT_HELLO_LENGTH or data[9] != 3):
            return None
        legacy_version = data[9] << 8 | data[10]
        session_id_length = data[43]               # after the versions and the random
        pos = 44 + session_id_length
        if session_id_length > MAX_SESSION_ID_LENGTH or pos + 2 > end:
            return None
        suites_length = data[pos] << 8 | data[pos + 1]
        pos += 2
        if not suites_length or suites_length & 1 or pos + suites_length >= end:
            return None
        cipher_suites = struct.unpack_from(f">{suites_length // 2}H", data, pos)
        pos += suites_length
        methods_length = data[pos]
        pos += 1 + methods_length
        # (A hello without extensions, which ends here, is left to the general parser.)
        if not methods_length or pos + 2 > end or pos + 2 + (data[pos] << 8 | data[pos + 1]) != end:
            return None
        pos += 2
        sni: str | None = None
        alpn: tuple[str, ...] = ()
        versions: tuple[int, ...] = (legacy_version,)
        types: list[int] = []
        append = types.append                      # (some 17 extensions: the loop is the parse's cost)
        while pos < end:
            ext_type, ext_length = _EXTENSION_HEADER(data, pos)
            ext_end = pos + 4 + ext_length
            if ext_end > end:                      # (a header past the end fails here too)
                return None
            append(ext_type)
            if ext_type in _PARSED_EXTENSIONS:
                if ext_type == EXT_SERVER_NAME:
                    sni = _parse_server_name(data, pos + 4, ext_end)
                elif ext_type == EXT_ALPN:
                    alpn = _parse_alpn(data, pos + 4, ext_end)
                else:
                    versions = _parse_supported_versions(data, pos + 4, ext_end)
            pos = ext_end
        if len(set(types)) != len(types) or (EXT_PRE_SHARED_KEY in types and types[-1] != EXT_PRE_SHARED_KEY):
            return None
    except (IndexError, struct.error, ClientHelloError):
        return None
    return ClientHello(sni=sni, alpn=alpn, versions=versions, legacy_version=legacy_version,
                       record_version=data[1] << 8 | data[2], cipher_suites=cipher_suites,
                       extensions=tuple(types), length=stop)


def _parse_any(data: Data, max_size: int = DEFAULT_MAX_SIZE) -> ClientHello | None:
    """parse_client_hello for every input: any number of records and segments, and every error."""
    return ClientHelloReader()._walk(data, max_size)


class ClientHelloReader:
    """``parse_client_hello`` for a buffer that grows between calls (a socket's queue, peeked again
    as more arrives): the same answers, but a call walks only the records completed since the last
    one, and after a ``None``, ``need`` says how long the buffer must be before the hello can be
    complete, so that looking earlier is pointless.

    Every call must see the same stream from its first byte, only longer (or as long): the reader
    keeps offsets into it and the handshake bytes of the records it walked. Only complete records
    are remembered, like nginx's ``ctx->pos``; a partial one is checked again at each call.
    """

    __slots__ = ("pos", "records", "message", "needed", "need")

    def __init__(self) -> None:
        self.pos = 0                    # where the next record header starts (the last complete one's end)
        self.records = 0                # complete records walked
        self.message = bytearray()      # their fragments: the handshake bytes so far
        self.needed = 0                 # the message's length, 4-byte header included, once known
        self.need = 1                   # after a None: the buffer length the hello needs at the least

    def parse(self, data: Data,
              max_size: int = DEFAULT_MAX_SIZE) -> ClientHello | None:
        """``parse_client_hello(data, max_size)``, resumed where the previous call stopped."""
        if not self.records and type(data) is bytes:
            # Nothing complete was walked yet: a hello that arrived in two segments is one record
            # (the common case's fast path applies).
            hello = _parse_common_case(data, max_size)
            if hello is not None:
                return hello
        return self._walk(data, max_size)

    def _walk(self, data: Data, max_size: int) -> ClientHello | None:
        available = len(data)
        pos = self.pos
        message = self.message
        while pos < available:
            number = self.records + 1
            fragment_length = _check_record_header(data, pos, available, number)
            if fragment_length is None:
                break
            start = pos + RECORD_HEADER_LENGTH
            stop = start + fragment_length
            if stop > max_size:
                raise ClientHelloError(f"ClientHello does not fit in {max_size} bytes: "
                                       f"record #{number} ends at {stop}")
            present = min(stop, available)
            if number == 1 and present > start and data[start] != HANDSHAKE_CLIENT_HELLO:
                raise ClientHelloError(f"not a ClientHello: handshake message type is {data[start]}, not 1")
            have = len(message)
            if not self.needed and have + present - start >= HANDSHAKE_HEADER_LENGTH:
                # (from a partial record too: its bytes are the stream's, whenever they are seen)
                header = bytes(message) + bytes(data[start : start + HANDSHAKE_HEADER_LENGTH - have])
                self.needed = HANDSHAKE_HEADER_LENGTH + _check_handshake_length(header, max_size)
            if present < stop:
                # Like nginx, never use a record before it is complete: the rest of the handshake
                # may well be in it, and a partial fragment proves nothing about the body.
                break
            message += data[start:stop]
            self.records = number
            self.pos = pos = stop
            if self.needed and len(message) >= self.needed:
                return _parse_body(bytes(message[: self.needed]), data, stop)
        self.need = self._need(data, available, max_size)
        return None

    def _need(self, data: Data, available: int, max_size: int) -> int:
        """The least buffer length at which the hello can be complete: the rest of it in the
        record being received, or else in one more record. Raises when that is beyond max_size."""
        end = self.pos
        gathered = len(self.message)
        if available >= end + RECORD_HEADER_LENGTH:        # the partial record's end is known
            fragment_length = data[end + 3] << 8 | data[end + 4]
            end += RECORD_HEADER_LENGTH + fragment_length
            gathered += fragment_length
        left = (self.needed or HANDSHAKE_HEADER_LENGTH) - gathered
        if left > 0:
            end += RECORD_HEADER_LENGTH + left
        if end > max_size:
            raise ClientHelloError(f"ClientHello does not fit in {max_size} bytes: the rest of it cannot end "
                                   f"before byte {end}")
        return end


def _check_record_header(data: Data, offset: int, available: int, number: int) -> int | None:
    """Validate the (possibly partial) record header at ``offset``; its fragment length, or
    ``None`` when the header is not all there yet."""
    content_type = data[offset]
    if content_type != CONTENT_TYPE_HANDSHAKE:
        if number == 1:
            error = StartTLSRequest if content_type == 0 else ClientHelloError
            raise error(_describe_first_byte(content_type))
        raise ClientHelloError(
            f"record #{number} has content type {_content_type_name(content_type)},"
            " but the ClientHello is not complete"
        )
    if offset + 1 < available and data[offset + 1] != 3:
        # Every SSL 3.0 / TLS record version is 3.x. Like nginx, check only this byte: the minor
        # is legacy_record_version, which RFC 8446 §5.1 says "MUST be ignored for all purposes".
        raise ClientHelloError(f"not TLS: record #{number} version major byte is "
                               f"0x{data[offset + 1]:02x}, not 0x03")
    if offset + RECORD_HEADER_LENGTH > available:
        return None
    length = data[offset + 3] << 8 | data[offset + 4]
    if length == 0:
        # RFC 8446 §5.1: zero-length handshake fragments MUST NOT be sent. Refusing them also
        # bounds the work per byte of input.
        raise ClientHelloError(f"record #{number} is empty (zero-length handshake record)")
    if length > MAX_RECORD_LENGTH:
        raise ClientHelloError(f"record #{number} length {length} exceeds 16384+256")
    return length


def _check_handshake_length(header: bytes, max_size: int) -> int:
    """Read the uint24 handshake length from the message's first four bytes and bound it."""
    length = header[1] << 16 | header[2] << 8 | header[3]
    if RECORD_HEADER_LENGTH + HANDSHAKE_HEADER_LENGTH + length > max_size:
        raise ClientHelloError(f"ClientHello length {length} (+9 header bytes) exceeds "
                               f"the {max_size}-byte limit")
    if length < MIN_CLIENT_HELLO_LENGTH:
        raise ClientHelloError(f"ClientHello length {length} is below the minimum of "
                               f"{MIN_CLIENT_HELLO_LENGTH}")
    return length


def _parse_body(message: bytes, data: Data, length: int) -> ClientHello:
    """Decode a complete ClientHello message (handshake header included)."""
    end = len(message)
    pos = HANDSHAKE_HEADER_LENGTH  # the minimum length checked earlier covers the fixed part

    legacy_version = message[pos] << 8 | message[pos + 1]
    if message[pos] != 3:
        raise ClientHelloError(f"ClientHello legacy_version 0x{legacy_version:04x} is not SSL 3.0/TLS")
    pos += 2 + 32  # version, random

    session_id_length = message[pos]
    if session_id_length > MAX_SESSION_ID_LENGTH:
        raise ClientHelloError(f"session_id length {session_id_length} exceeds {MAX_SESSION_ID_LENGTH}")
    pos = _skip(pos + 1, session_id_length, end, "session_id")

    suites_length = _read_u16(message, pos, end, "cipher_suites length")
    if suites_length == 0 or suites_length % 2:
        raise ClientHelloError(f"cipher_suites length {suites_length} is not a positive even number")
    pos += 2
    suites_end = _skip(pos, suites_length, end, "cipher_suites")
    cipher_suites = struct.unpack_from(f">{suites_length // 2}H", message, pos)
    pos = suites_end

    if pos >= end:
        raise ClientHelloError("compression_methods missing")
    methods_length = message[pos]
    if methods_length == 0:
        raise ClientHelloError("compression_methods is empty (the null method is mandatory)")
    pos = _skip(pos + 1, methods_length, end, "compression_methods")

    sni: str | None = None
    alpn: tuple[str, ...] = ()
    versions: tuple[int, ...] = (legacy_version,)
    types: list[int] = []
    if pos < end:  # RFC 5246 §7.4.1.2: a hello without an extensions block at all is valid
        block_length = _read_u16(message, pos, end, "extensions length")
        pos += 2
        if pos + block_length != end:
            raise ClientHelloError(
                f"extensions length {block_length} does not match the {end - pos} "
                "bytes left in the ClientHello"
            )
        seen = set()
        while pos < end:
            if end - pos < 4:
                raise ClientHelloError(f"extension header truncated ({end - pos} bytes left)")
            ext_type = message[pos] << 8 | message[pos + 1]
            ext_length = message[pos + 2] << 8 | message[pos + 3]
            pos += 4
            if pos + ext_length > end:
                raise ClientHelloError(
                    f"extension 0x{ext_type:04x} length {ext_length} overruns the extensions "
                    f"block ({end - pos} bytes left)"
                )
            if ext_type in seen:
                # RFC 8446 §4.2: a duplicate is fatal for the server, and two server_names would
                # let us route on one while the backend reads the other.
                raise ClientHelloError(f"duplicate extension 0x{ext_type:04x}")
            seen.add(ext_type)
            if EXT_PRE_SHARED_KEY in seen and ext_type != EXT_PRE_SHARED_KEY:
                raise ClientHelloError("pre_shared_key is not the last extension (RFC 8446 §4.2.11)")
            types.append(ext_type)
            if ext_type == EXT_SERVER_NAME:
                sni = _parse_server_name(message, pos, pos + ext_length)
            elif ext_type == EXT_ALPN:
                alpn = _parse_alpn(message, pos, pos + ext_length)
            elif ext_type == EXT_SUPPORTED_VERSIONS:
                versions = _parse_supported_versions(message, pos, pos + ext_length)
            pos += ext_length

    return ClientHello(
        sni=sni,
        alpn=alpn,
        versions=versions,
        legacy_version=legacy_version,
        record_version=data[1] << 8 | data[2],
        cipher_suites=cipher_suites,
        extensions=tuple(types),
        length=length,
    )


def _parse_server_name(message: bytes, pos: int, end: int) -> str:
    """RFC 6066 §3 server_name: exactly one host_name entry, returned lower-cased."""
    pos = _list_start(message, pos, end, "server_name")
    host = None
    while pos < end:
        if end - pos < 3:
            raise ClientHelloError("server_name entry truncated")
        name_type = message[pos]
        name_length = message[pos + 1] << 8 | message[pos + 2]
        pos += 3
        # Only host_name(0) was ever defined; OpenSSL and nginx refuse any other type, and
        # RFC 6066 allows one name per type, so a second entry is an error either way.
        if name_type != NAME_TYPE_HOST_NAME:
            raise ClientHelloError(f"server_name type {name_type} is not host_name (0)")
        if host is not None:
            raise ClientHelloError("server_name holds more than one host_name")
        if name_length == 0:
            raise ClientHelloError("server_name host_name is empty")
        if pos + name_length > end:
            raise ClientHelloError(
                f"server_name host_name length {name_length} overruns the list ({end - pos} bytes left)"
            )
        if name_length > MAX_HOST_NAME_LENGTH:
            raise ClientHelloError(f"server_name host_name is {name_length} bytes, "
                                   f"over {MAX_HOST_NAME_LENGTH}")
        raw = message[pos : pos + name_length]
        # RFC 6066 says ASCII; we also refuse spaces and control bytes, which no DNS name has
        # and which would otherwise reach routing and the access log verbatim.
        bad = raw.translate(None, _HOST_NAME_BYTES)       # what is left are the bad bytes, in order
        if bad:
            raise ClientHelloError(f"server_name host_name contains byte 0x{bad[0]:02x}")
        host = raw.decode("ascii").lower()
        pos += name_length
    return host  # type: ignore[return-value]  # the list is non-empty, so host is set


def _parse_alpn(message: bytes, pos: int, end: int) -> tuple[str, ...]:
    """RFC 7301 §3.1 protocol_name_list: non-empty list of non-empty names."""
    pos = _list_start(message, pos, end, "ALPN")
    names = []
    while pos < end:
        name_length = message[pos]
        pos += 1
        if name_length == 0:
            raise ClientHelloError("ALPN protocol name is empty")
        if pos + name_length > end:
            raise ClientHelloError(f"ALPN protocol name length {name_length} overruns the "
                                   f"list ({end - pos} bytes left)")
        # Protocol IDs are opaque bytes (registered ones are ASCII); latin-1 maps each byte to one
        # character, so nothing is lost and nothing can fail to decode.
        names.append(message[pos : pos + name_length].decode("latin-1"))
        pos += name_length
    return tuple(names)


def _parse_supported_versions(message: bytes, pos: int, end: int) -> tuple[int, ...]:
    """RFC 8446 §4.2.1 supported_versions (ClientHello form), GREASE removed."""
    if pos >= end:
        raise ClientHelloError("supported_versions extension is empty")
    list_length = message[pos]
    pos += 1
    if pos + list_length != end:
        raise ClientHelloError(
            f"supported_versions list length {list_length} does not match the extension ({end - pos} bytes)"
        )
    if list_length < 2 or list_length % 2:
        raise ClientHelloError(f"supported_versions list length {list_length} is not a positive even number")
    values = struct.unpack_from(f">{list_length // 2}H", message, pos)
    return tuple([v for v in values if v not in _GREASE])


def _list_start(message: bytes, pos: int, end: int, what: str) -> int:
    """Where the entries of an extension's list begin: a uint16 length, which must cover the rest of
    the extension exactly, and at least one entry (server_name and ALPN alike)."""
    if pos + 2 > end:
        raise ClientHelloError(f"{what} list length truncated ({end - pos} bytes left)")
    list_length = message[pos] << 8 | message[pos + 1]
    pos += 2
    if pos + list_length != end:
        raise ClientHelloError(f"{what} list length {list_length} does not match the "
                               f"extension ({end - pos} bytes)")
    if list_length == 0:
        raise ClientHelloError(f"{what} list is empty")
    return pos


def _read_u16(message: bytes, pos: int, end: int, what: str) -> int:
    if pos + 2 > end:
        raise ClientHelloError(f"{what} truncated ({end - pos} bytes left)")
    return message[pos] << 8 | message[pos + 1]


def _skip(pos: int, length: int, end: int, what: str) -> int:
    if pos + length > end:
        raise ClientHelloError(f"{what} length {length} overruns the ClientHello ({end - pos} bytes left)")
    return pos + length


def _content_type_name(content_type: int) -> str:
    name = _CONTENT_TYPE_NAMES.get(content_type)
    return f"{name} (0x{content_type:02x})" if name else f"0x{content_type:02x}"


def _describe_first_byte(byte: int) -> str:
    """Say, from the very first byte, why the stream is not a TLS handshake."""
    if byte in _CONTENT_TYPE_NAMES:
        return f"not a ClientHello: first record is {_content_type_name(byte)}, not handshake (0x16)"
    if byte & 0x80:
        # SSLv2 (and SSLv3/TLS clients in SSLv2-compatible mode) start with a 2-byte length whose
        # top bit is set. Nothing current sends it, and it has no room for SNI; nginx passes it
        # through unrouted, we refuse it.
        return (f"not TLS: first byte 0x{byte:02x} is not a handshake record (an "
                "SSLv2-format hello is not supported)")
    if 0x20 <= byte < 0x7F:
        return (f"not TLS: first byte 0x{byte:02x} ({chr(byte)!r}) is not a handshake "
                "record (plain text, HTTP?)")
    return f"not TLS: first byte 0x{byte:02x} is not a handshake record"
