"""pyproxy.tls.clienthello on real captured hellos, their fragmentations, and crafted bad input."""

from __future__ import annotations

import dataclasses
import random

import pytest

import pyproxy.tls.clienthello as clienthello
from pyproxy.tls.clienthello import (
    MAX_RECORD_LENGTH,
    ClientHello,
    ClientHelloError,
    ClientHelloReader,
    is_grease,
    parse_client_hello,
)

from . import (
    CAPTURED,
    CAPTURED_BY_NAME,
    EXT_PADDING,
    EXT_PRE_SHARED_KEY,
    alpn_ext,
    build_body,
    build_hello,
    build_message,
    ext,
    frame,
    handshake_message,
    one_byte_records,
    records,
    sni_ext,
    u16,
    vec16,
    versions_ext,
)

HTTP_REQUEST = b"GET / HTTP/1.1\r\nHost: tls9443.kong.example\r\n\r\n"
# An SSLv2-format CLIENT-HELLO (RFC 6101 appendix E.2) as very old clients sent it.
SSLV2_HELLO = bytes.fromhex("802e0103010015000000100100800700c0030080000039000038000035") + bytes(16)


def hexes(values) -> tuple[int, ...]:
    return tuple(int(v, 16) for v in values)


def assert_matches(hello: ClientHello, expected: dict, length: int | None = None) -> None:
    assert hello.sni == expected["sni"]
    assert hello.alpn == tuple(expected["alpn"])
    assert hello.versions == hexes(expected["versions"])
    assert hello.legacy_version == int(expected["legacy_version"], 16)
    assert hello.record_version == int(expected["record_version"], 16)
    assert hello.length == (expected["length"] if length is None else length)
    if "cipher_suites" in expected:
        assert hello.cipher_suites == hexes(expected["cipher_suites"])
    if "extensions" in expected:
        assert hello.extensions == hexes(expected["extensions"])
    assert hello.offers_tls13 == (0x0304 in hello.versions)


def first_error_at(data: bytes) -> int:
    """The length of the shortest prefix of ``data`` that the parser rejects."""
    for n in range(1, len(data) + 1):
        try:
            parse_client_hello(data[:n])
        except ClientHelloError:
            return n
    raise AssertionError("never rejected")


# --- captured hellos ----------------------------------------------------------------------------


@pytest.mark.parametrize("captured", CAPTURED, ids=repr)
def test_captured_hello_parses_to_the_manifest(captured):
    assert_matches(parse_client_hello(captured.wire), captured.expected)
    assert len(records(captured.wire)) == captured.expected["records"]


@pytest.mark.parametrize("captured", CAPTURED, ids=repr)
def test_every_strict_prefix_needs_more(captured):
    wire = captured.wire
    assert all(parse_client_hello(wire[:n]) is None for n in range(len(wire)))


@pytest.mark.parametrize("captured", CAPTURED, ids=repr)
@pytest.mark.parametrize("container", [bytearray, memoryview], ids=["bytearray", "memoryview"])
def test_fed_one_byte_at_a_time(captured, container):
    buffer = bytearray()
    for n, byte in enumerate(captured.wire, 1):
        buffer.append(byte)
        result = parse_client_hello(container(buffer) if container is memoryview else buffer)
        if n < len(captured.wire):
            assert result is None
    assert_matches(result, captured.expected)


@pytest.mark.parametrize("captured", CAPTURED, ids=repr)
def test_bytes_after_the_hello_are_ignored(captured):
    change_cipher_spec = b"\x14\x03\x03\x00\x01\x01"
    early_data = b"\x17\x03\x03\x00\x05hello"
    hello = parse_client_hello(captured.wire + change_cipher_spec + early_data + HTTP_REQUEST)
    assert_matches(hello, captured.expected)


@pytest.mark.parametrize("captured", CAPTURED, ids=repr)
def test_reframed_into_records_of_random_sizes(captured):
    message = handshake_message(captured.wire)
    rng = random.Random(captured.name)
    for largest in (1, 2, 3, 7, 64, 700, 2**14):
        sizes = [rng.randint(1, largest) for _ in range(50)]
        wire = frame(message, sizes)
        limit = max(len(wire), 65536)  # the padded hello in tiny records outgrows the default
        assert_matches(parse_client_hello(wire, limit), captured.expected, length=len(wire))
        assert all(parse_client_hello(wire[:n], limit) is None for n in range(len(wire) - 40, len(wire)))


def test_padded_hello_spans_two_records_and_exceeds_16k():
    padded = CAPTURED_BY_NAME["padded_pq_2records"]
    first, _second = records(padded.wire)
    assert int.from_bytes(first[0][3:5], "big") == 2**14
    assert len(handshake_message(padded.wire)) > 2**14
    hello = parse_client_hello(padded.wire)
    assert hello.sni == "tls9443.kong.example"
    assert hello.extensions[-1] == EXT_PADDING
    assert parse_client_hello(padded.wire[: 5 + 2**14]) is None  # the first record alone


def test_record_versions_other_than_0301_are_accepted():
    message = handshake_message(CAPTURED_BY_NAME["openssl_sni"].wire)
    for version in (b"\x03\x00", b"\x03\x03", b"\x03\x04", b"\x03\x7f"):
        hello = parse_client_hello(frame(message, version=version))
        assert hello.record_version == int.from_bytes(version, "big")


# --- rejected at the first byte that proves it ---------------------------------------------------


@pytest.mark.parametrize(
    "data, at, message",
    [
        (HTTP_REQUEST, 1, r"first byte 0x47 \('G'\)"),
        (SSLV2_HELLO, 1, "SSLv2"),
        (b"\x17\x03\x03\x00\x10" + bytes(16), 1, "application_data"),
        (b"\x15\x03\x01\x00\x02\x02\x28", 1, "alert"),
        (b"\x00\x00\x00\x00", 1, "first byte 0x00"),
        (b"SSH-2.0-OpenSSH_9.6\r\n", 1, "0x53"),
        (b"\x16\x09\x01", 2, "version major byte is 0x09"),
        (b"\x16\x02\x00", 2, "major"),
        (b"\x16\x03\x01\x00\x00", 5, "zero-length"),
        (b"\x16\x03\x01\x4e\x20", 5, r"record #1 length 20000 exceeds 16384\+256"),
        (b"\x16\x03\x01\xff\xff", 5, "65535"),
        (b"\x16\x03\x01\x00\x30\x02", 6, "message type is 2"),
        (b"\x16\x03\x01\x00\x30\x14", 6, "message type is 20"),
        (b"\x16\x03\x01\x02\x00\x01\x00\xff\xf8", 9,
         r"65528 \(\+9 header bytes\) exceeds the 65536-byte limit"),
        (b"\x16\x03\x01\x02\x00\x01\xff\xff\xff", 9, "16777215"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x00\x28", 9, "below the minimum of 41"),
    ],
)
def test_rejected_at_the_first_proving_byte(data, at, message):
    assert first_error_at(data) == at
    with pytest.raises(ClientHelloError, match=message):
        parse_client_hello(data[:at])


def test_incomplete_headers_need_more():
    for data in (b"", b"\x16", b"\x16\x03", b"\x16\x03\x01", b"\x16\x03\x01\x00", b"\x16\x03\x01\x00\x30",
                 b"\x16\x03\x01\x00\x30\x01\x00"):
        assert parse_client_hello(data) is None


def test_record_length_limit_is_16k_plus_256():
    header = b"\x16\x03\x01" + MAX_RECORD_LENGTH.to_bytes(2, "big") + b"\x01\x00\x40\x00"
    assert MAX_RECORD_LENGTH == 16384 + 256
    assert parse_client_hello(header) is None
    with pytest.raises(ClientHelloError, match="16641"):
        parse_client_hello(b"\x16\x03\x01" + (MAX_RECORD_LENGTH + 1).to_bytes(2, "big"))


def test_max_size_bounds_the_bytes_the_hello_occupies():
    padded = CAPTURED_BY_NAME["padded_pq_2records"].wire  # 16996-byte message, 17010 on the wire
    assert parse_client_hello(padded[:8], max_size=16390) is None
    with pytest.raises(ClientHelloError, match=r"16996 \(\+9 header bytes\) exceeds the 16390-byte limit"):
        parse_client_hello(padded[:9], max_size=16390)
    # The first record's header says the message needs a second one: 17010 bytes at the least.
    assert parse_client_hello(padded[:9], max_size=17010) is None
    with pytest.raises(ClientHelloError,
                       match="does not fit in 17009 bytes: the rest of it cannot end before byte 17010"):
        parse_client_hello(padded[:9], max_size=17009)
    with pytest.raises(ClientHelloError, match="does not fit in 17009 bytes: record #2 ends at 17010"):
        parse_client_hello(padded, max_size=17009)
    assert parse_client_hello(padded, max_size=17010).length == 17010
    with pytest.raises(ClientHelloError, match="record #1 ends at 326"):
        parse_client_hello(CAPTURED_BY_NAME["openssl_sni"].wire[:5], max_size=200)


def test_max_size_counts_record_headers_so_tiny_records_cannot_blow_it_up():
    # 1-byte records cost six bytes of input per byte of hello: a 17 KB hello framed that way
    # needs 102 KB, over the default limit, and is refused as soon as that is certain: once the
    # bytes still to come, even in a single record, would end past it.
    message = handshake_message(CAPTURED_BY_NAME["padded_pq_2records"].wire)  # 17000 bytes
    wire = frame(message, [1])
    # After k records (6k bytes, k handshake bytes), the rest ends at 6k + 5 + 17000 - k at the least.
    k = (65536 - 17005) // 5 + 1
    assert parse_client_hello(wire[: 6 * (k - 1)]) is None
    with pytest.raises(ClientHelloError, match="does not fit in 65536 bytes: the rest of it cannot end "
                                               f"before byte {5 * k + 17005}"):
        parse_client_hello(wire[: 6 * k])
    assert parse_client_hello(wire, max_size=len(wire)).length == len(wire)


def test_handshake_header_split_over_one_byte_records_is_checked_as_it_arrives():
    message = handshake_message(CAPTURED_BY_NAME["python_sni"].wire)
    wire = frame(message, [1])
    assert parse_client_hello(wire[:6 * 4]) is None  # four 1-byte records: the handshake header
    bad_type = frame(b"\x02" + message[1:], [1])
    assert first_error_at(bad_type) == 6
    too_long = frame(message[:1] + b"\x01\x00\x01" + message[4:], [1])
    assert first_error_at(too_long) == 6 * 4
    with pytest.raises(ClientHelloError, match="65537"):
        parse_client_hello(too_long[: 6 * 4])


@pytest.mark.parametrize(
    "second_header, at, message",
    [
        (b"\x17\x03\x01\x01\x00", 1, "record #2 has content type application_data"),
        (b"\x15\x03\x01\x00\x02", 1, "record #2 has content type alert"),
        (b"GET /", 1, "record #2 has content type 0x47"),
        (b"\x16\x01\x01\x00\x10", 2, "record #2 version major byte is 0x01"),
        (b"\x16\x03\x01\x00\x00", 5, "record #2 is empty"),
        (b"\x16\x03\x01\x50\x00", 5, "record #2 length 20480 exceeds"),
    ],
)
def test_bad_continuation_record(second_header, at, message):
    hello = handshake_message(CAPTURED_BY_NAME["openssl_sni"].wire)
    first = frame(hello[:100])
    data = first + second_header + b"\x00" * 16
    with pytest.raises(ClientHelloError, match=message):
        parse_client_hello(data)
    assert parse_client_hello(first) is None
    assert first_error_at(data) == len(first) + at


def test_truncated_then_garbage():
    wire = CAPTURED_BY_NAME["openssl_sni"].wire
    cut = len(wire) - 60  # inside the extensions
    garbage = b"\xff" * 60
    with pytest.raises(ClientHelloError, match="overruns"):
        parse_client_hello(wire[:cut] + garbage)
    # a hello cut short at a record boundary, then something that is not a record
    message = handshake_message(wire)
    two = frame(message, [150])
    with pytest.raises(ClientHelloError, match="record #2"):
        parse_client_hello(two[:155] + HTTP_REQUEST)


def test_error_is_a_value_error():
    assert issubclass(ClientHelloError, ValueError)
    with pytest.raises(ValueError):
        parse_client_hello(b"GET")


# --- the ClientHello body -------------------------------------------------------------------------


def parse_body(**kwargs) -> ClientHello:
    return parse_client_hello(build_hello(**kwargs))


def test_minimal_hello_without_an_extensions_block():
    hello = parse_body(legacy_version=0x0301, session_id=b"", cipher_suites=b"\x00\x2f", extensions=None)
    assert (hello.sni, hello.alpn, hello.versions, hello.extensions) == (None, (), (0x0301,), ())
    assert hello.cipher_suites == (0x002F,)
    assert hello.protocol == "TLSv1"
    assert not hello.offers_tls13


def test_empty_extensions_block():
    assert parse_body(extensions=[]).extensions == ()


def test_fields_of_a_built_hello():
    wire = build_hello(
        extensions=[
            ext(0x0A0A, b""),  # GREASE extension, kept as sent
            sni_ext("Example.COM"),
            alpn_ext("h2", "http/1.1", b"\xe9"),
            versions_ext(0x3A3A, 0x0304, 0x0303),
            ext(0xFAFA, b"\x00"),
        ]
    )
    hello = parse_client_hello(wire)
    assert hello.sni == "example.com"
    assert hello.alpn == ("h2", "http/1.1", "\xe9")
    assert hello.versions == (0x0304, 0x0303)
    assert hello.extensions == (0x0A0A, 0, 16, 43, 0xFAFA)
    assert hello.cipher_suites == (0x1301, 0x1302, 0xC02F)
    assert hello.offers_tls13 and hello.protocol == "TLSv1.3"
    assert hello.length == len(wire)


def test_ip_literal_and_trailing_dot_names_are_returned_as_given():
    assert parse_body(extensions=[sni_ext("192.0.2.1")]).sni == "192.0.2.1"
    assert parse_body(extensions=[sni_ext("Example.com.")]).sni == "example.com."


def test_supported_versions_of_only_grease():
    assert parse_body(extensions=[versions_ext(0x1A1A)]).versions == ()


def test_a_second_handshake_message_in_the_same_record_is_ignored():
    message = build_message(build_body(extensions=[sni_ext("a.example")]))
    wire = frame(message + build_message(b"\x00" * 10, msg_type=2))
    hello = parse_client_hello(wire)
    assert hello.sni == "a.example" and hello.length == len(wire)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"legacy_version": 0x0200}, "legacy_version 0x0200"),
        ({"legacy_version": 0xFEFD}, "legacy_version 0xfefd"),  # DTLS 1.2
        ({"session_id": bytes(33)}, "session_id length 33 exceeds 32"),
        ({"cipher_suites": b""}, "cipher_suites length 0"),
        ({"cipher_suites": b"\x13\x01\x13"}, "cipher_suites length 3"),
        ({"compression_methods": b""}, "compression_methods is empty"),
        ({"raw_extensions": b"\x00"}, "extensions length truncated"),
        ({"raw_extensions": u16(10) + bytes(4)}, "extensions length 10 does not match the 4 bytes"),
        ({"raw_extensions": u16(2) + bytes(4)}, "extensions length 2 does not match the 4 bytes"),
        ({"raw_extensions": vec16(b"\x00\x17\x00")}, "extension header truncated"),
        ({"raw_extensions": vec16(b"\x00\x17\x00\x05\x00")}, "extension 0x0017 length 5 overruns"),
        ({"extensions": [ext(23, b""), ext(23, b"")]}, "duplicate extension 0x0017"),
        ({"extensions": [sni_ext("a.example"), sni_ext("b.example")]}, "duplicate extension 0x0000"),
        ({"extensions": [ext(EXT_PRE_SHARED_KEY, b"\x00"), ext(23, b"")]}, "pre_shared_key is not the last"),
        # server_name (RFC 6066 §3)
        ({"extensions": [ext(0, b"")]}, "server_name list length truncated"),
        ({"extensions": [ext(0, u16(0))]}, "server_name list is empty"),
        ({"extensions": [ext(0, u16(9) + b"\x00\x00\x03abc")]}, "server_name list length 9 does not match"),
        ({"extensions": [ext(0, vec16(b"\x00\x00"))]}, "server_name entry truncated"),
        ({"extensions": [sni_ext("a.example", name_type=1)]}, "server_name type 1 is not host_name"),
        ({"extensions": [sni_ext("")]}, "host_name is empty"),
        ({"extensions": [ext(0, vec16(b"\x00\x00\x09abc"))]}, "host_name length 9 overruns"),
        ({"extensions": [sni_ext("a.example", "b.example")]}, "more than one host_name"),
        ({"extensions": [sni_ext("a" * 256)]}, "256 bytes, over 255"),
        ({"extensions": [sni_ext(b"a\x00b")]}, "contains byte 0x00"),
        ({"extensions": [sni_ext(b"evil\r\nlog")]}, "contains byte 0x0d"),
        ({"extensions": [sni_ext(b"a b")]}, "contains byte 0x20"),
        ({"extensions": [sni_ext("b\u00fccher.example".encode())]}, "contains byte 0xc3"),
        # application_layer_protocol_negotiation (RFC 7301 §3.1)
        ({"extensions": [ext(16, b"\x00")]}, "ALPN list length truncated"),
        ({"extensions": [ext(16, u16(0))]}, "ALPN list is empty"),
        ({"extensions": [ext(16, u16(5) + b"\x02h2")]}, "ALPN list length 5 does not match"),
        ({"extensions": [alpn_ext("h2", "")]}, "ALPN protocol name is empty"),
        ({"extensions": [ext(16, vec16(b"\x05h2"))]}, "ALPN protocol name length 5 overruns"),
        # supported_versions (RFC 8446 §4.2.1)
        ({"extensions": [ext(43, b"")]}, "supported_versions extension is empty"),
        ({"extensions": [ext(43, b"\x00")]}, "supported_versions list length 0"),
        ({"extensions": [ext(43, b"\x03\x03\x04\x03")]}, "supported_versions list length 3 is not"),
        ({"extensions": [ext(43, b"\x04\x03\x04")]}, "supported_versions list length 4 does not match"),
    ],
)
def test_malformed_body(kwargs, message):
    with pytest.raises(ClientHelloError, match=message):
        parse_body(**kwargs)


def test_body_shorter_than_its_fields():
    # A handshake length that hides the end of the fixed fields: the session_id runs past it.
    body = build_body(session_id=bytes(32), extensions=None)
    with pytest.raises(ClientHelloError, match="overruns the ClientHello"):
        parse_client_hello(frame(build_message(body[:41])))


# --- the result type --------------------------------------------------------------------------------


def test_client_hello_is_frozen_and_slotted():
    hello = parse_client_hello(CAPTURED_BY_NAME["python_alpn"].wire)
    with pytest.raises(dataclasses.FrozenInstanceError):
        hello.sni = "other.example"  # type: ignore[misc]
    assert not hasattr(hello, "__dict__")


def test_protocol_names_the_highest_offered_version():
    assert parse_client_hello(CAPTURED_BY_NAME["openssl_tls12"].wire).protocol == "TLSv1.2"
    assert parse_body(extensions=[versions_ext(0x0303, 0x0304)]).protocol == "TLSv1.3"
    assert parse_body(extensions=[versions_ext(0x7F1C)]).protocol == ""


def test_is_grease():
    grease = {0x0A0A + 0x1010 * i for i in range(16)}
    assert all(is_grease(v) for v in grease)
    assert not any(is_grease(v) for v in range(0x10000) if v not in grease)


# -- ClientHelloReader: the preread of a hello that arrives a little at a time --------------------
def test_reader_walks_each_record_once_however_often_it_is_asked(monkeypatch):
    # The hello as 10,900 one-byte records (65 KB), looked at after every record as a session
    # would if each arrived alone: every record header is checked about once, not once per look.
    wire = one_byte_records(10_900)
    assert len(wire) <= 65536
    checked = 0
    check = clienthello._check_record_header

    def counting(*args):
        nonlocal checked
        checked += 1
        return check(*args)

    monkeypatch.setattr(clienthello, "_check_record_header", counting)
    reader = ClientHelloReader()
    hello = None
    for end in range(6, len(wire) + 6, 6):
        hello = reader.parse(wire[:end])
        if hello is not None:
            break
    assert hello == parse_client_hello(wire)       # (which walks them all once more)
    assert hello.sni == "a.example" and hello.length == len(wire)
    assert checked < 3 * 10_900, checked


def test_reader_need_spares_a_caller_all_but_a_few_looks():
    # A caller that looks again only once `need` bytes are there (the session peeks only then)
    # makes a few dozen looks at a hello of 10,900 records, and never one too late.
    wire = one_byte_records(10_900)
    reader, looks, seen = ClientHelloReader(), 0, 0
    hello = None
    for end in range(6, len(wire) + 6, 6):
        end = min(end, len(wire))
        if end < reader.need:
            continue
        looks += 1
        hello = reader.parse(wire[:end])
        if hello is not None:
            break
        seen = end
    assert hello is not None and hello.length == len(wire)
    assert looks <= 64, looks
    assert parse_client_hello(wire[:seen]) is None


def test_reader_refuses_a_hello_that_can_no_longer_fit_as_soon_as_that_is_certain():
    # 2,000 one-byte records and ~100 bytes more: 12 KB. After k records the rest ends at
    # 6k + 5 + (message length - k) at the least, over 10,000 from about k = 1,600 on.
    wire = one_byte_records(2_000)
    reader = ClientHelloReader()
    assert reader.parse(wire[:600], max_size=10_000) is None
    assert reader.need <= 10_000
    with pytest.raises(ClientHelloError,
                       match="does not fit in 10000 bytes: the rest of it cannot end before byte"):
        reader.parse(wire[: 6 * 1620], max_size=10_000)     # before any record crosses 10,000
    assert parse_client_hello(wire, max_size=len(wire)).length == len(wire)


def test_reader_of_a_hello_in_two_segments_takes_the_one_record_path():
    wire = CAPTURED_BY_NAME["openssl_sni"].wire
    reader = ClientHelloReader()
    assert reader.parse(wire[:100]) is None
    assert reader.need == len(wire)               # the end of its one record
    assert reader.parse(wire) == parse_client_hello(wire)
