"""Hypothesis fuzzing of pyproxy.tls.clienthello, after mitmproxy's test_tls_fuzz.py.

Whatever the input, the parser answers with a ClientHello, None or ClientHelloError — never an
IndexError, struct.error, UnicodeDecodeError or anything else a worker would have to guard for.
A ClientHelloReader fed the same stream a piece at a time answers exactly what the pure parser
answers for each prefix, and its `need` never skips past the point where the hello completes.
"""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from pyproxy.tls.clienthello import (
    MAX_RECORD_LENGTH,
    ClientHello,
    ClientHelloError,
    ClientHelloReader,
    _parse_any,
    parse_client_hello,
)

from . import CAPTURED, frame, handshake_message, length_field_offsets, records

fuzz = settings(max_examples=300, deadline=None)

# The padded hello is 17 KB: keep it out of the strategies that mutate or re-frame byte by byte.
SMALL = [c for c in CAPTURED if len(c.wire) < 2**14]
hellos = st.sampled_from(CAPTURED)
small_hellos = st.sampled_from(SMALL)


def answer(parse, data) -> ClientHello | str | None:
    try:
        return parse(data)
    except ClientHelloError as e:
        return f"error: {e}"


def outcome(data) -> ClientHello | str | None:
    """The parser's answer, with ClientHelloError folded into a string; anything else raises.
    The answer is also the general parser's, error message included: the common-case fast path
    may only ever agree with it."""
    answers = []
    for parse in (parse_client_hello, _parse_any):
        try:
            answers.append(parse(data))
        except ClientHelloError as e:
            assert str(e)
            answers.append(f"error: {e}")
    assert answers[0] == answers[1]
    return "error" if isinstance(answers[0], str) else answers[0]


@fuzz
@given(hellos, st.data())
def test_truncations_need_more(captured, data):
    cut = data.draw(st.integers(0, len(captured.wire) - 1))
    assert parse_client_hello(captured.wire[:cut]) is None


@fuzz
@given(hellos, st.binary(min_size=1, max_size=200))
def test_tail_after_the_hello_is_ignored(captured, tail):
    expected = parse_client_hello(captured.wire)
    assert parse_client_hello(captured.wire + tail) == expected


@fuzz
@given(small_hellos, st.binary(min_size=1, max_size=200))
def test_tail_inside_the_last_record_is_ignored(captured, tail):
    # The bytes after the ClientHello in its own record (another handshake message, or junk).
    message = handshake_message(captured.wire)
    wire = frame(message + tail)
    hello = parse_client_hello(wire)
    assert hello.sni == captured.expected["sni"]
    assert hello.length == len(wire)


@fuzz
@given(small_hellos, st.data(), st.binary(min_size=1, max_size=64))
def test_truncated_then_random_tail(captured, data, tail):
    cut = data.draw(st.integers(0, len(captured.wire) - 1))
    result = outcome(captured.wire[:cut] + tail)
    if isinstance(result, ClientHello):
        assert result.length <= cut + len(tail)


@fuzz
@given(small_hellos, st.data())
def test_mutated_length_fields(captured, data):
    wire = bytearray(captured.wire)
    fields = length_field_offsets(captured.wire)
    for _ in range(data.draw(st.integers(1, 3))):
        offset, width = data.draw(st.sampled_from(fields))
        value = data.draw(
            st.one_of(
                st.integers(0, 2 ** (8 * width) - 1),
                st.integers(-3, 3).map(
                    lambda d, o=offset, w=width: (int.from_bytes(wire[o : o + w], "big") + d) % 2 ** (8 * w)),
            )
        )
        wire[offset : offset + width] = value.to_bytes(width, "big")
    outcome(bytes(wire))


@fuzz
@given(small_hellos, st.lists(st.tuples(st.integers(0, 2**14), st.integers(0, 255)), min_size=1, max_size=8))
def test_random_byte_flips(captured, flips):
    wire = bytearray(captured.wire)
    for position, value in flips:
        wire[position % len(wire)] = value
    result = outcome(bytes(wire))
    if not any(position % len(wire) < 9 for position, _ in flips):
        assert result is not None  # record and message lengths intact: all of it is there


@fuzz
@given(st.binary(max_size=600))
def test_random_bytes(data):
    outcome(data)


@fuzz
@given(st.integers(0x00, 0xFF), st.binary(min_size=41, max_size=600))
def test_random_body_behind_valid_headers(record_minor, body):
    # Get past the header checks so that the body parser sees random input too.
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    result = outcome(frame(message, version=bytes([3, record_minor])))
    assert result is not None


@fuzz
@given(hellos, st.lists(st.integers(1, MAX_RECORD_LENGTH), min_size=1, max_size=20))
def test_any_record_framing_parses_the_same(captured, sizes):
    message = handshake_message(captured.wire)
    if len(message) // min(sizes) > 3000:
        sizes = [max(s, len(message) // 3000) for s in sizes]  # keep the test fast
    sizes = [min(s, 2**14) for s in sizes]
    wire = frame(message, sizes)
    reference = parse_client_hello(captured.wire)
    assert parse_client_hello(wire, max_size=2**20) == dataclasses.replace(reference, length=len(wire))


@fuzz
@given(small_hellos, st.lists(st.integers(1, 300), min_size=1, max_size=50))
def test_streamed_in_random_chunks(captured, chunks):
    buffer = bytearray()
    pos, i = 0, 0
    result = None
    while pos < len(captured.wire):
        assert result is None
        size = chunks[i % len(chunks)]
        buffer += captured.wire[pos : pos + size]
        pos += size
        i += 1
        result = parse_client_hello(buffer)
    assert result == parse_client_hello(captured.wire)


@fuzz
@given(small_hellos, st.data())
def test_reframed_and_mutated_record_headers(captured, data):
    # Damage a header of a multi-record framing: the continuation checks see random input.
    wire = bytearray(frame(handshake_message(captured.wire), [data.draw(st.integers(1, 120))]))
    starts, pos = [], 0
    for header, fragment in records(bytes(wire)):
        starts.append(pos)
        pos += len(header) + len(fragment)
    start = data.draw(st.sampled_from(starts))
    index = data.draw(st.integers(0, 4))
    wire[start + index] = data.draw(st.integers(0, 255))
    outcome(bytes(wire))



def stream_through_reader(wire: bytes, cuts: list[int]) -> None:
    """Feed `wire` to one reader, growing to each of `cuts` (increasing) and then to its end: at
    every step the reader says what a fresh parse of that prefix says, error message included;
    after a None, `need` lies beyond the bytes seen, and no prefix shorter than it holds a hello."""
    reader = ClientHelloReader()
    for cut in [*sorted({min(c, len(wire)) for c in cuts}), len(wire)]:
        prefix = wire[:cut]
        got = answer(reader.parse, prefix)
        assert got == answer(parse_client_hello, prefix)
        if got is not None:
            return
        assert reader.need > cut
        if reader.need - 1 < len(wire):
            assert not isinstance(answer(parse_client_hello, wire[: reader.need - 1]), ClientHello)


@fuzz
@given(hellos, st.lists(st.integers(1, 400), min_size=1, max_size=20), st.data())
def test_reader_fed_piece_by_piece_answers_as_a_fresh_parse(captured, sizes, data):
    message = handshake_message(captured.wire)
    if len(message) // min(sizes) > 2000:
        sizes = [max(s, len(message) // 2000) for s in sizes]  # keep the test fast
    wire = frame(message, sizes) + data.draw(st.binary(max_size=20))
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=30))
    stream_through_reader(wire, cuts)


@fuzz
@given(small_hellos, st.data())
def test_reader_fed_piece_by_piece_answers_as_a_fresh_parse_on_damaged_streams(captured, data):
    wire = bytearray(frame(handshake_message(captured.wire), [data.draw(st.integers(1, 120))]))
    for _ in range(data.draw(st.integers(1, 3))):
        wire[data.draw(st.integers(0, len(wire) - 1))] = data.draw(st.integers(0, 255))
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=30))
    stream_through_reader(bytes(wire), cuts)


@fuzz
@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=10))
def test_reader_on_random_bytes(wire, cuts):
    stream_through_reader(b"\x16\x03\x01" + wire, cuts)
