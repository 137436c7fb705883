"""Property-based fuzzing of the sans-IO protocol code (hypothesis): the handshake state
machine, the request decoder and the transmission phase over a memory disk.

Bounded for CI (a few hundred examples per target).  A long run:

    NBDFORMATS_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest -q tests/test_fuzz_protocol.py
"""

from __future__ import annotations

import errno
import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdformats.protocol import wire as P
from nbdformats.api.chain import Chain
from nbdformats.protocol.errors import ProtocolError
from nbdformats.protocol.handshake import (Abort, ExportInfo, ExportRequest, ListExports, NeedData, Ready,
                                           ServerHandshake, StartTLS)
from nbdformats.protocol.transmission import Request, RequestDecoder
from nbdformats.server.transmission import Transmission, export_info
from nbdformats.registry import load_plugin

EXAMPLES = int(os.environ.get("NBDFORMATS_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

INFO = ExportInfo(name="disk", size=1 << 20, flags=P.TF_HAS_FLAGS | P.TF_SEND_FLUSH)
OPTION_CODES = st.sampled_from([*range(0, 13), 0x7FFFFFFF, 0xFFFFFFFF])


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` split at the given (arbitrary) positions."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, start = [], 0
    for p in points:
        pieces.append(data[start:p])
        start = p
    pieces.append(data[start:])
    return pieces


def option(code: int, payload: bytes) -> bytes:
    return P.OPTION_HEADER.pack(P.IHAVEOPT, code, len(payload)) + payload


def info_payload(name: bytes, requests: list[int]) -> bytes:
    return struct.pack(">I", len(name)) + name + struct.pack(">H", len(requests)) + \
        b"".join(struct.pack(">H", r) for r in requests)


def meta_payload(name: bytes, queries: list[bytes]) -> bytes:
    return struct.pack(">II", len(name), len(queries)) + name + b"".join(
        struct.pack(">I", len(q)) + q for q in queries)


names = st.binary(max_size=40) | st.sampled_from([b"", b"disk", "\u00e9".encode(), b"\xff\xfe"])
payloads = st.one_of(
    st.binary(max_size=64),
    st.builds(info_payload, names, st.lists(st.integers(0, 0xFFFF), max_size=5)),
    st.builds(meta_payload, names, st.lists(st.sampled_from([b"base:allocation", b"base:", b"x:y", b""]),
                                            max_size=4)),
)
options = st.builds(option, OPTION_CODES, payloads)


def mutate(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    raw = bytearray(data)
    for position, value in flips:
        if raw:
            raw[position % len(raw)] = value
    return bytes(raw)


handshake_streams = st.one_of(
    # client flags, then a run of options, maybe mutated, maybe with an oversized length field
    st.builds(lambda flags, opts, flips: mutate(struct.pack(">I", flags) + b"".join(opts), flips),
              st.sampled_from([1, 3, 0, 2, 7, 0xFFFFFFFF]), st.lists(options, max_size=12),
              st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=3)),
    st.binary(max_size=300),
)


def drive_handshake(hs: ServerHandshake, pieces: list[bytes], *, tls_done: bool = False) -> tuple[bytes, list]:
    """Feed pieces, answer every event as a server would; returns (all output, events)."""
    out = bytearray(hs.data_to_send())
    events: list = []
    for piece in pieces:
        hs.receive_data(piece)
        for _ in range(10_000):  # each step consumes input or ends: never spins
            try:
                event = hs.next_event()
            except ProtocolError:
                return bytes(out + hs.data_to_send()), events + ["protocol-error"]
            events.append(event)
            if isinstance(event, NeedData):
                break
            if isinstance(event, (Abort, Ready)):
                return bytes(out + hs.data_to_send()), events
            if isinstance(event, ListExports):
                hs.reply_list([("disk", "a disk"), ("other", "")])
            elif isinstance(event, ExportRequest):
                if event.name == "missing":
                    hs.reply_error(P.REP_ERR_UNKNOWN, "no such export")
                else:
                    ready = hs.reply_export(INFO)
                    if ready is not None:
                        events.append(ready)
                        return bytes(out + hs.data_to_send()), events
            elif isinstance(event, StartTLS):
                hs.tls_established()
            out += hs.data_to_send()
        else:
            raise AssertionError("the handshake made no progress")
        out += hs.data_to_send()
    return bytes(out), events


def parse_option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    replies = []
    view = memoryview(data)
    while len(view) >= P.OPTION_REPLY.size:
        magic, opt, rtype, length = P.OPTION_REPLY.unpack_from(view)
        if magic != P.OPTION_REPLY_MAGIC:
            break  # an EXPORT_NAME reply ends the option replies
        assert len(view) >= P.OPTION_REPLY.size + length, "truncated option reply"
        replies.append((opt, rtype, bytes(view[P.OPTION_REPLY.size:P.OPTION_REPLY.size + length])))
        view = view[P.OPTION_REPLY.size + length:]
    return replies


@FUZZ
@given(handshake_streams, st.lists(st.integers(0, 400), max_size=6), st.sampled_from(["off", "on", "require"]))
def test_handshake_never_crashes_and_replies_are_well_formed(stream, cuts, tls):
    hs = ServerHandshake(tls=tls)
    out, events = drive_handshake(hs, chunked(stream, cuts))
    assert out[:16] == struct.pack(">QQ", P.NBDMAGIC, P.IHAVEOPT)
    for opt, rtype, payload in parse_option_replies(out[18:]):
        if rtype & (1 << 31):  # error replies carry a short UTF-8 message
            assert len(payload) <= P.MAX_STRING
            payload.decode("utf-8")
        else:
            assert rtype in (P.REP_ACK, P.REP_SERVER, P.REP_INFO, P.REP_META_CONTEXT), rtype
    # The same bytes in one piece give the same answers: chunking does not matter.
    whole, _ = drive_handshake(ServerHandshake(tls=tls), [stream])
    assert whole == out


@FUZZ
@given(handshake_streams, st.lists(st.integers(0, 400), max_size=6))
def test_tls_require_leaks_nothing_before_starttls(stream, cuts):
    """With --tls=require no export name, list or size goes out before STARTTLS."""
    hs = ServerHandshake(tls="require")
    hs.data_to_send()
    out = bytearray()
    for piece in chunked(stream, cuts):
        hs.receive_data(piece)
        while True:
            try:
                event = hs.next_event()
            except ProtocolError:
                return
            out += hs.data_to_send()
            if isinstance(event, StartTLS):  # from here on the stream would be encrypted
                assert all(rtype in (P.REP_ACK,) or rtype & (1 << 31)
                           for _, rtype, _ in parse_option_replies(bytes(out)))
                return
            assert not isinstance(event, (ExportRequest, ListExports, Ready)), event
            if isinstance(event, (NeedData, Abort)):
                break
        if isinstance(event, Abort):
            break
    for _, rtype, _ in parse_option_replies(bytes(out)):
        assert rtype == P.REP_ACK or rtype & (1 << 31), rtype  # errors and ABORT's ack only


# -- Requests ------------------------------------------------------------------------------------
COMMANDS = st.sampled_from([P.CMD_READ, P.CMD_WRITE, P.CMD_FLUSH, P.CMD_TRIM, P.CMD_CACHE,
                            P.CMD_WRITE_ZEROES, P.CMD_BLOCK_STATUS, P.CMD_RESIZE, 9, 0xFFFF])
SIZE = 64 * 1024
MAX_PAYLOAD = 8 * 1024  # a small decoder limit, so oversized writes are cheap to generate
offsets = st.one_of(st.integers(0, SIZE + 10), st.sampled_from([SIZE - 1, SIZE, 1 << 63, (1 << 64) - 1]))
lengths = st.one_of(st.integers(0, 9000), st.sampled_from([0xFFFFFFFF, 1 << 31, MAX_PAYLOAD, MAX_PAYLOAD + 1]))


@st.composite
def requests(draw, extended: bool):
    type = draw(COMMANDS)
    flags = draw(st.integers(0, 0x3F) | st.just(0))
    offset = draw(offsets)
    length = draw(lengths)
    has_payload = type == P.CMD_WRITE or (extended and flags & P.CMD_FLAG_PAYLOAD_LEN)
    if has_payload and length > MAX_PAYLOAD + 64:
        length = draw(st.integers(0, MAX_PAYLOAD + 64))  # keep examples small, still over the limit
    payload = draw(st.binary(min_size=length, max_size=length)) if has_payload and length <= 64 else \
        bytes([draw(st.integers(0, 255))]) * (length if has_payload else 0)
    cookie = draw(st.integers(0, (1 << 64) - 1))
    header = (P.EXTENDED_REQUEST if extended else P.REQUEST).pack(
        P.EXTENDED_REQUEST_MAGIC if extended else P.REQUEST_MAGIC, flags, type, cookie, offset,
        length if extended or length < 1 << 32 else 0xFFFFFFFF)
    return header + payload


def decode_all(pieces: list[bytes], extended: bool) -> tuple[list[tuple], bool]:
    decoder = RequestDecoder(extended=extended, max_payload=MAX_PAYLOAD)
    got = []
    try:
        for piece in pieces:
            for r in decoder.receive(piece):
                got.append((r.type, r.flags, r.cookie, r.offset, r.length, r.error,
                            bytes(r.payload) if r.payload is not None else None))
    except ProtocolError:
        return got, True
    return got, False


@FUZZ
@given(st.booleans().flatmap(lambda ext: st.tuples(st.just(ext), st.lists(requests(ext), max_size=8))),
       st.lists(st.integers(0, 1 << 20), max_size=8))
def test_decoder_round_trip_in_any_chunking(case, cuts):
    extended, encoded = case
    stream = b"".join(encoded)
    got, failed = decode_all(chunked(stream, cuts), extended)
    assert not failed
    assert len(got) == len(encoded)  # oversized payloads are drained: the stream stays in step
    header = P.EXTENDED_REQUEST if extended else P.REQUEST
    for raw, (type, flags, cookie, offset, length, error, payload) in zip(encoded, got):
        _, want_flags, want_type, want_cookie, want_offset, want_length = header.unpack_from(raw)
        assert (type, flags, cookie, offset, length) == (want_type, want_flags, want_cookie, want_offset,
                                                         want_length)
        if payload is not None:
            assert payload == raw[header.size:] and not error
        elif len(raw) > header.size:
            assert error == errno.EINVAL  # refused payload, drained


@FUZZ
@given(st.booleans(), st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=8))
def test_decoder_on_garbage_fails_cleanly_and_independent_of_chunking(extended, stream, cuts):
    one = decode_all([stream], extended)
    many = decode_all(chunked(stream, cuts), extended)
    assert one == many


# -- Transmission over a memory disk, against a model ---------------------------------------------
def memory_layer():
    chain = Chain([], load_plugin("memory")())
    chain.configure({0: [("size", str(SIZE))]})
    chain.get_ready()
    return chain.open(False, "")


def parse_reply_stream(data: bytes, structured: bool, extended: bool, cookie: int,
                       read_length: int | None) -> tuple[int, dict[int, bytes]]:
    """Walk the reply chunks of one request: (error, {offset: data}); asserts the framing."""
    view = memoryview(data)
    error, pieces = 0, {}
    if not structured:
        magic, err, got = P.SIMPLE_REPLY.unpack_from(view)
        assert magic == P.SIMPLE_REPLY_MAGIC and got == cookie
        rest = view[P.SIMPLE_REPLY.size:]
        if not err and read_length is not None:
            assert len(rest) == read_length
            pieces[-1] = bytes(rest)
        else:
            assert len(rest) == 0
        return err, pieces
    header = P.EXTENDED_REPLY if extended else P.STRUCTURED_REPLY
    done = False
    while view:
        assert not done, "data after the final chunk"
        fields = header.unpack_from(view)
        magic, flags, type, got = fields[:4]
        length = fields[-1]
        assert magic == (P.EXTENDED_REPLY_MAGIC if extended else P.STRUCTURED_REPLY_MAGIC) and got == cookie
        body = bytes(view[header.size:header.size + length])
        assert len(body) == length
        view = view[header.size + length:]
        done = bool(flags & P.REPLY_FLAG_DONE)
        if type == P.REPLY_TYPE_OFFSET_DATA:
            pieces[struct.unpack_from(">Q", body)[0]] = body[8:]
        elif type == P.REPLY_TYPE_OFFSET_HOLE:
            at, size = P.HOLE_PAYLOAD.unpack(body)
            pieces[at] = bytes(size)
        elif type in (P.REPLY_TYPE_ERROR, P.REPLY_TYPE_ERROR_OFFSET):
            error, message_length = P.ERROR_PAYLOAD.unpack_from(body)
            assert error and P.ERROR_PAYLOAD.size + message_length <= len(body)
        else:
            assert type in (P.REPLY_TYPE_NONE, P.REPLY_TYPE_BLOCK_STATUS, P.REPLY_TYPE_BLOCK_STATUS_EXT), type
    assert done, "no final chunk"
    return error, pieces


@FUZZ
@given(st.sampled_from([(False, False), (True, False), (True, True)]),
       st.lists(st.tuples(COMMANDS, st.integers(0, 0x3F) | st.just(0), offsets, lengths, st.integers(0, 255)),
                max_size=25))
def test_transmission_answers_every_request_and_matches_a_model(mode, ops):
    structured, extended = mode
    layer = memory_layer()
    info = export_info("", layer, structured)
    tx = Transmission(layer, info, structured=structured, extended=extended,
                      meta_context_id=1 if structured else None)
    model = bytearray(SIZE)
    for cookie, (type, flags, offset, length, fill) in enumerate(ops):
        if type == P.CMD_RESIZE:
            continue  # would change the model's size; resize has its own tests
        payload = None
        if type == P.CMD_WRITE:
            length = min(length, 9000)
            payload = memoryview(bytearray([fill]) * length)
        req = Request(flags, type, cookie, offset, length, payload)
        problem = tx.check(req)
        if problem is not None:
            err, _ = problem
            assert err in (errno.EINVAL, errno.EOVERFLOW, errno.EPERM, errno.ENOTSUP)
            continue
        assert offset <= SIZE or type == P.CMD_FLUSH  # flush ignores its (reserved) offset
        data = b"".join(bytes(b) for b in tx.process(req))
        is_read = type == P.CMD_READ
        error, pieces = parse_reply_stream(data, tx.structured, extended, cookie,
                                           min(length, SIZE - offset) if is_read else None)
        end = min(offset + length, SIZE)
        if type == P.CMD_WRITE and not error:
            model[offset:end] = bytes([fill]) * (end - offset)
        elif type in (P.CMD_TRIM, P.CMD_WRITE_ZEROES) and not error:
            model[offset:end] = bytes(end - offset)
        elif is_read and pieces:
            if -1 in pieces:
                assert pieces[-1] == model[offset:end]
            else:
                for at, chunk in pieces.items():
                    assert offset <= at and at + len(chunk) <= end
                    assert chunk == model[at:at + len(chunk)]
                assert sum(len(c) for c in pieces.values()) == end - offset
