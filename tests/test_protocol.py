"""The sans-IO protocol layer, driven directly with bytes (no sockets)."""

from __future__ import annotations

import errno
import struct

import pytest

from nbdformats.protocol import wire as P
from nbdformats.api.chain import Chain
from nbdformats.protocol.errors import ProtocolError
from nbdformats.protocol.handshake import (Abort, ExportInfo, ExportRequest, HandshakePolicy, ListExports,
                                           NeedData, Ready, ServerHandshake, StartTLS, oldstyle_greeting)
from nbdformats.protocol.transmission import MAX_PAYLOAD, ReplyEncoder, Request, RequestDecoder
from nbdformats.server.transmission import Transmission, export_info
from nbdformats.registry import load_plugin


def option(opt: int, data: bytes = b"") -> bytes:
    return P.OPTION_HEADER.pack(P.IHAVEOPT, opt, len(data)) + data


def parse_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    replies = []
    while data:
        magic, opt, rtype, length = P.OPTION_REPLY.unpack_from(data)
        assert magic == P.OPTION_REPLY_MAGIC
        replies.append((opt, rtype, data[P.OPTION_REPLY.size:P.OPTION_REPLY.size + length]))
        data = data[P.OPTION_REPLY.size + length:]
    return replies


def info_payload(name: str, requests: list[int] = ()) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(requests)) + \
        b"".join(struct.pack(">H", r) for r in requests)


def new_handshake(**kw) -> ServerHandshake:
    hs = ServerHandshake(**kw)
    greeting = hs.data_to_send()
    assert greeting == struct.pack(">QQH", P.NBDMAGIC, P.IHAVEOPT, P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES)
    hs.receive_data(struct.pack(">I", P.CLIENT_FLAG_FIXED_NEWSTYLE | P.CLIENT_FLAG_NO_ZEROES))
    return hs


INFO = ExportInfo(name="disk", size=1 << 20, flags=P.TF_HAS_FLAGS | P.TF_SEND_FLUSH)


class TestHandshake:
    def test_needs_client_flags(self):
        hs = ServerHandshake()
        hs.data_to_send()
        hs.receive_data(b"\0\0")
        assert isinstance(hs.next_event(), NeedData)

    def test_plain_newstyle_client_may_only_send_export_name(self):
        """As nbdkit: without fixed newstyle other options are answered ERR_INVALID, EXPORT_NAME works."""
        hs = ServerHandshake()
        hs.data_to_send()
        hs.receive_data(struct.pack(">I", 0) + option(P.OPT_LIST) + option(P.OPT_EXPORT_NAME, b"disk"))
        event = hs.next_event()
        assert isinstance(event, ExportRequest) and event.name == "disk"
        assert parse_replies(hs.data_to_send())[0][:2] == (P.OPT_LIST, P.REP_ERR_INVALID)

    def test_client_flag_not_offered_drops_the_client(self):
        hs = ServerHandshake(policy=HandshakePolicy(global_flags=P.FLAG_FIXED_NEWSTYLE))
        assert hs.data_to_send()[-2:] == struct.pack(">H", P.FLAG_FIXED_NEWSTYLE)
        hs.receive_data(struct.pack(">I", P.CLIENT_FLAG_FIXED_NEWSTYLE | P.CLIENT_FLAG_NO_ZEROES))
        assert isinstance(hs.next_event(), Abort)

    def test_masked_handshake_offers_no_flags(self):
        hs = ServerHandshake(policy=HandshakePolicy(global_flags=0))
        assert hs.data_to_send() == struct.pack(">QQH", P.NBDMAGIC, P.IHAVEOPT, 0)

    @pytest.mark.parametrize("opt", [P.OPT_STRUCTURED_REPLY, P.OPT_EXTENDED_HEADERS])
    def test_no_structured_replies(self, opt):
        hs = ServerHandshake(policy=HandshakePolicy(structured_replies=False))
        hs.data_to_send()
        hs.receive_data(struct.pack(">I", P.CLIENT_FLAG_FIXED_NEWSTYLE) + option(opt))
        assert isinstance(hs.next_event(), NeedData)
        assert parse_replies(hs.data_to_send())[0][:2] == (opt, P.REP_ERR_UNSUP)
        assert not hs.structured_replies and not hs.extended_headers

    def test_no_meta_contexts(self):
        hs = ServerHandshake(policy=HandshakePolicy(meta_contexts=False))
        hs.data_to_send()
        query = b"base:allocation"
        payload = struct.pack(">I", 0) + struct.pack(">II", 1, len(query)) + query
        hs.receive_data(struct.pack(">I", P.CLIENT_FLAG_FIXED_NEWSTYLE) + option(P.OPT_STRUCTURED_REPLY) +
                        option(P.OPT_SET_META_CONTEXT, payload))
        assert isinstance(hs.next_event(), NeedData)
        replies = parse_replies(hs.data_to_send())
        assert replies[1][:2] == (P.OPT_SET_META_CONTEXT, P.REP_ERR_UNSUP)
        assert hs.meta_context_id is None

    def test_unknown_option_gets_unsup_and_connection_survives(self):
        hs = new_handshake()
        hs.receive_data(option(9999, b"junk") + option(P.OPT_STRUCTURED_REPLY))
        assert isinstance(hs.next_event(), NeedData)
        replies = parse_replies(hs.data_to_send())
        assert replies[0][:2] == (9999, P.REP_ERR_UNSUP)
        assert replies[1][:2] == (P.OPT_STRUCTURED_REPLY, P.REP_ACK)
        assert hs.structured_replies

    @pytest.mark.parametrize("payload", [b"", b"\0\0\0\xff", info_payload("x")[:-1], info_payload("x") + b"\0"])
    def test_malformed_info_gets_invalid(self, payload):
        hs = new_handshake()
        hs.receive_data(option(P.OPT_GO, payload))
        assert isinstance(hs.next_event(), NeedData)
        assert parse_replies(hs.data_to_send())[0][1] == P.REP_ERR_INVALID

    def test_structured_reply_with_data_is_invalid(self):
        hs = new_handshake()
        hs.receive_data(option(P.OPT_STRUCTURED_REPLY, b"x"))
        hs.next_event()
        assert parse_replies(hs.data_to_send())[0][1] == P.REP_ERR_INVALID
        assert not hs.structured_replies

    def test_list(self):
        hs = new_handshake()
        hs.receive_data(option(P.OPT_LIST))
        assert isinstance(hs.next_event(), ListExports)
        hs.reply_list([("a", "first"), ("b", "")])
        replies = parse_replies(hs.data_to_send())
        assert [r[1] for r in replies] == [P.REP_SERVER, P.REP_SERVER, P.REP_ACK]
        assert replies[0][2] == struct.pack(">I", 1) + b"a" + b"first"

    def test_go_sends_info_and_finishes(self):
        hs = new_handshake()
        hs.receive_data(option(P.OPT_GO, info_payload("disk", [P.INFO_NAME, P.INFO_BLOCK_SIZE])) + b"REQ")
        event = hs.next_event()
        assert isinstance(event, ExportRequest) and event.name == "disk" and event.option == P.OPT_GO
        ready = hs.reply_export(INFO)
        assert isinstance(ready, Ready) and hs.done
        replies = parse_replies(hs.data_to_send())
        infos = [r[2] for r in replies if r[1] == P.REP_INFO]
        assert struct.pack(">HQH", P.INFO_EXPORT, 1 << 20, INFO.flags) in infos
        assert struct.pack(">H", P.INFO_NAME) + b"disk" in infos
        assert struct.pack(">HIII", P.INFO_BLOCK_SIZE, 1, 4096, 32 << 20) in infos
        assert replies[-1][1] == P.REP_ACK
        assert hs.leftover() == b"REQ"

    def test_info_does_not_finish(self):
        hs = new_handshake()
        hs.receive_data(option(P.OPT_INFO, info_payload("")))
        assert isinstance(hs.next_event(), ExportRequest)
        assert hs.reply_export(INFO) is None and not hs.done

    def test_unknown_export_error(self):
        hs = new_handshake()
        hs.receive_data(option(P.OPT_GO, info_payload("nope")))
        hs.next_event()
        hs.reply_error(P.REP_ERR_UNKNOWN, "no such export")
        assert parse_replies(hs.data_to_send())[0][1] == P.REP_ERR_UNKNOWN
        assert isinstance(hs.next_event(), NeedData)

    def test_export_name_with_zeroes(self):
        hs = ServerHandshake()
        hs.data_to_send()
        hs.receive_data(struct.pack(">I", P.CLIENT_FLAG_FIXED_NEWSTYLE) + option(P.OPT_EXPORT_NAME, b"disk"))
        event = hs.next_event()
        assert isinstance(event, ExportRequest) and event.option == P.OPT_EXPORT_NAME
        hs.reply_export(INFO)
        assert hs.data_to_send() == struct.pack(">QH", 1 << 20, INFO.flags) + bytes(124)

    def test_meta_context(self):
        hs = new_handshake()
        query = b"base:allocation"
        payload = struct.pack(">I", 4) + b"disk" + struct.pack(">II", 2, len(query)) + query + \
            struct.pack(">I", 9) + b"qemu:junk"
        hs.receive_data(option(P.OPT_SET_META_CONTEXT, payload))
        hs.next_event()
        assert parse_replies(hs.data_to_send())[0][1] == P.REP_ERR_INVALID  # needs structured replies first
        hs.receive_data(option(P.OPT_STRUCTURED_REPLY) + option(P.OPT_SET_META_CONTEXT, payload))
        hs.next_event()
        replies = parse_replies(hs.data_to_send())
        assert replies[1] == (P.OPT_SET_META_CONTEXT, P.REP_META_CONTEXT, struct.pack(">I", 1) + query)
        assert replies[2][1] == P.REP_ACK and hs.meta_context_id == 1

    def test_meta_context_malformed(self):
        hs = new_handshake()
        hs.receive_data(option(P.OPT_STRUCTURED_REPLY) + option(P.OPT_LIST_META_CONTEXT, b"\0\0\0\x09ab"))
        hs.next_event()
        assert parse_replies(hs.data_to_send())[1][1] == P.REP_ERR_INVALID

    def test_extended_headers_imply_structured(self):
        hs = new_handshake()
        hs.receive_data(option(P.OPT_EXTENDED_HEADERS))
        hs.next_event()
        assert hs.extended_headers and hs.structured_replies

    def test_tls_required(self):
        hs = new_handshake(tls="require")
        hs.receive_data(option(P.OPT_LIST) + option(P.OPT_GO, info_payload("")) + option(P.OPT_STARTTLS))
        assert isinstance(hs.next_event(), StartTLS)
        replies = parse_replies(hs.data_to_send())
        assert [r[1] for r in replies] == [P.REP_ERR_TLS_REQD, P.REP_ERR_TLS_REQD, P.REP_ACK]
        hs.tls_established()
        hs.receive_data(option(P.OPT_LIST))
        assert isinstance(hs.next_event(), ListExports)

    def test_starttls_refused_when_off(self):
        hs = new_handshake()
        hs.receive_data(option(P.OPT_STARTTLS))
        hs.next_event()
        assert parse_replies(hs.data_to_send())[0][1] == P.REP_ERR_POLICY

    def test_oversized_option_is_skipped(self):
        hs = new_handshake()
        big = 1 << 20
        hs.receive_data(P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_GO, big) + bytes(1000))
        assert isinstance(hs.next_event(), NeedData)
        hs.receive_data(bytes(big - 1000) + option(P.OPT_STRUCTURED_REPLY))
        hs.next_event()
        assert [r[1] for r in parse_replies(hs.data_to_send())] == [P.REP_ERR_TOO_BIG, P.REP_ACK]

    def test_bad_option_magic_drops(self):
        hs = new_handshake()
        hs.receive_data(b"\0" * 16)
        with pytest.raises(ProtocolError):
            hs.next_event()

    def test_abort(self):
        hs = new_handshake()
        hs.receive_data(option(P.OPT_ABORT))
        assert isinstance(hs.next_event(), Abort)
        assert parse_replies(hs.data_to_send())[0][1] == P.REP_ACK

    def test_oldstyle_greeting(self):
        data = oldstyle_greeting(INFO)
        assert len(data) == 152
        assert struct.unpack_from(">QQQI", data) == (P.NBDMAGIC, P.OLDSTYLE_MAGIC, 1 << 20, INFO.flags)


def request(type: int, offset: int = 0, length: int = 0, flags: int = 0, cookie: int = 7) -> bytes:
    return P.REQUEST.pack(P.REQUEST_MAGIC, flags, type, cookie, offset, length)


class TestDecoder:
    def test_pipelined_requests_and_split_payload(self):
        dec = RequestDecoder()
        data = request(P.CMD_READ, 0, 512) + request(P.CMD_WRITE, 4096, 5, cookie=8) + b"hello" + \
            request(P.CMD_FLUSH, cookie=9)
        got = []
        for i in range(0, len(data), 3):  # byte-by-byte arrival in small pieces
            got += dec.receive(data[i:i + 3])
        assert [(r.type, r.cookie) for r in got] == [(P.CMD_READ, 7), (P.CMD_WRITE, 8), (P.CMD_FLUSH, 9)]
        assert bytes(got[1].payload) == b"hello"

    def test_large_payload_goes_straight_into_its_buffer(self):
        dec = RequestDecoder()
        payload = bytes(range(256)) * 4096  # 1 MiB
        reqs = dec.receive(request(P.CMD_WRITE, 0, len(payload)) + payload[:1000])
        assert reqs == []
        buf = dec.get_buffer()
        assert len(buf) == len(payload) - 1000  # the rest of the payload, not scratch
        buf[:] = payload[1000:]
        (req,) = dec.buffer_updated(len(payload) - 1000)
        assert bytes(req.payload) == payload

    def test_oversized_write_is_drained_and_failed(self):
        dec = RequestDecoder(max_payload=1024)
        reqs = dec.receive(request(P.CMD_WRITE, 0, 5000) + bytes(5000) + request(P.CMD_READ, 0, 10, cookie=9))
        assert reqs[0].error == errno.EINVAL and reqs[1].type == P.CMD_READ and reqs[1].cookie == 9

    def test_bad_magic(self):
        with pytest.raises(ProtocolError):
            RequestDecoder().receive(b"\xff" * 28)

    def test_extended_request(self):
        dec = RequestDecoder(extended=True)
        hdr = P.EXTENDED_REQUEST.pack(P.EXTENDED_REQUEST_MAGIC, P.CMD_FLAG_PAYLOAD_LEN, P.CMD_WRITE, 1, 1 << 40, 3)
        (req,) = dec.receive(hdr + b"abc")
        assert req.offset == 1 << 40 and bytes(req.payload) == b"abc"
        hdr = P.EXTENDED_REQUEST.pack(P.EXTENDED_REQUEST_MAGIC, 0, P.CMD_BLOCK_STATUS, 2, 0, 1 << 33)
        (req,) = dec.receive(hdr)
        assert req.length == 1 << 33


def memory_transmission(size: str = "1M", structured: bool = True, extended: bool = False, readonly=False):
    chain = Chain([], load_plugin("memory")())
    chain.configure({0: [("size", size)]})
    chain.get_ready()
    layer = chain.open(readonly, "")
    info = export_info("", layer, structured)
    return Transmission(layer, info, structured=structured, extended=extended, meta_context_id=1)


def run(tx: Transmission, req: Request) -> bytes:
    problem = tx.check(req)
    if problem:
        return tx.replies.error(req.cookie, req.offset, *problem)
    return b"".join(bytes(b) for b in tx.process(req))


def chunks(data: bytes, extended: bool = False) -> list[tuple[int, int, bytes]]:
    out = []
    header = P.EXTENDED_REPLY if extended else P.STRUCTURED_REPLY
    while data:
        fields = header.unpack_from(data)
        flags, type, length = fields[1], fields[2], fields[-1]
        out.append((flags, type, data[header.size:header.size + length]))
        data = data[header.size + length:]
    return out


class TestTransmission:
    def test_write_then_read_simple(self):
        tx = memory_transmission(structured=False)
        assert run(tx, Request(0, P.CMD_WRITE, 1, 100, 5, memoryview(bytearray(b"abcde")))) == \
            P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, 0, 1)
        reply = run(tx, Request(0, P.CMD_READ, 2, 98, 9))
        assert reply == P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, 0, 2) + b"\0\0abcde\0\0"

    @pytest.mark.parametrize("cmd", [P.CMD_READ, P.CMD_WRITE, P.CMD_TRIM, P.CMD_WRITE_ZEROES])
    def test_zero_length_succeeds(self, cmd):
        tx = memory_transmission()
        payload = memoryview(bytearray()) if cmd == P.CMD_WRITE else None
        reply = chunks(run(tx, Request(0, cmd, 3, 4096, 0, payload)))
        assert reply == [(P.REPLY_FLAG_DONE, P.REPLY_TYPE_NONE, b"")]

    def test_zero_length_block_status_reports_one_extent(self):
        tx = memory_transmission()
        reply = chunks(run(tx, Request(0, P.CMD_BLOCK_STATUS, 3, 4096, 0)))
        # One descriptor, of the hole from there: the final extent may run past the request (spec).
        assert reply == [(P.REPLY_FLAG_DONE, P.REPLY_TYPE_BLOCK_STATUS, struct.pack(">III", 1, (1 << 20) - 4096, 3))]

    def test_read_past_end_structured_returns_valid_part_then_error_offset(self):
        tx = memory_transmission()
        run(tx, Request(0, P.CMD_WRITE, 1, (1 << 20) - 4, 4, memoryview(bytearray(b"tail"))))
        reply = chunks(run(tx, Request(0, P.CMD_READ, 2, (1 << 20) - 4, 10)))
        assert reply[0] == (0, P.REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", (1 << 20) - 4) + b"tail")
        flags, type, payload = reply[1]
        assert flags == P.REPLY_FLAG_DONE and type == P.REPLY_TYPE_ERROR_OFFSET
        code, msglen = struct.unpack_from(">IH", payload)
        assert code == P.NBD_EINVAL and struct.unpack_from(">Q", payload, 6 + msglen)[0] == 1 << 20

    def test_read_past_end_simple_is_einval(self):
        tx = memory_transmission(structured=False)
        assert run(tx, Request(0, P.CMD_READ, 2, (1 << 20) - 4, 10)) == \
            P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, P.NBD_EINVAL, 2)

    def test_write_to_readonly_is_eperm(self):
        tx = memory_transmission(readonly=True)
        reply = chunks(run(tx, Request(0, P.CMD_WRITE, 1, 0, 1, memoryview(bytearray(b"x")))))
        assert struct.unpack_from(">I", reply[0][2])[0] == P.NBD_EPERM

    def test_unknown_command_and_flags(self):
        tx = memory_transmission()
        for req in (Request(0, 99, 1, 0, 1), Request(1 << 9, P.CMD_READ, 1, 0, 1)):
            assert struct.unpack_from(">I", chunks(run(tx, req))[0][2])[0] == P.NBD_EINVAL

    def test_oversized_read(self):
        tx = memory_transmission(size="1G")
        reply = chunks(run(tx, Request(P.CMD_FLAG_DF, P.CMD_READ, 1, 0, MAX_PAYLOAD + 1)))
        assert struct.unpack_from(">I", reply[0][2])[0] == P.NBD_EOVERFLOW

    def test_sparse_read_sends_holes(self):
        tx = memory_transmission()
        run(tx, Request(0, P.CMD_WRITE, 1, 65536, 3, memoryview(bytearray(b"xyz"))))
        reply = chunks(run(tx, Request(0, P.CMD_READ, 2, 0, 256 * 1024)))
        types = [c[1] for c in reply]
        assert types == [P.REPLY_TYPE_OFFSET_HOLE, P.REPLY_TYPE_OFFSET_DATA, P.REPLY_TYPE_OFFSET_HOLE,
                         P.REPLY_TYPE_NONE]
        assert reply[0][2] == struct.pack(">QI", 0, 65536)
        assert reply[1][2][8:11] == b"xyz" and len(reply[1][2]) == 8 + 32768
        # with DF the same read is one data chunk
        reply = chunks(run(tx, Request(P.CMD_FLAG_DF, P.CMD_READ, 2, 0, 256 * 1024)))
        assert [c[1] for c in reply] == [P.REPLY_TYPE_OFFSET_DATA]

    def test_block_status(self):
        tx = memory_transmission()
        run(tx, Request(0, P.CMD_WRITE, 1, 32768, 1, memoryview(bytearray(b"x"))))
        (chunk,) = chunks(run(tx, Request(0, P.CMD_BLOCK_STATUS, 2, 0, 1 << 20)))
        assert chunk[1] == P.REPLY_TYPE_BLOCK_STATUS
        assert chunk[2] == struct.pack(">IIIIIII", 1, 32768, 3, 32768, 0, (1 << 20) - 65536, 3)
        (chunk,) = chunks(run(tx, Request(P.CMD_FLAG_REQ_ONE, P.CMD_BLOCK_STATUS, 2, 0, 1 << 20)))
        assert chunk[2] == struct.pack(">III", 1, 32768, 3)

    def test_block_status_past_end(self):
        tx = memory_transmission()
        reply = chunks(run(tx, Request(0, P.CMD_BLOCK_STATUS, 2, (1 << 20) - 512, 4096)))
        assert reply[0][1] == P.REPLY_TYPE_BLOCK_STATUS and reply[0][2] == struct.pack(">III", 1, 512, 3)
        assert reply[1][1] == P.REPLY_TYPE_ERROR_OFFSET

    def test_extended_replies(self):
        tx = memory_transmission(size="8G", extended=True)
        run(tx, Request(P.CMD_FLAG_PAYLOAD_LEN, P.CMD_WRITE, 1, 5 << 30, 2, memoryview(bytearray(b"hi"))))
        reply = chunks(run(tx, Request(0, P.CMD_READ, 2, 5 << 30, 2)), extended=True)
        assert reply == [(P.REPLY_FLAG_DONE, P.REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", 5 << 30) + b"hi")]
        (chunk,) = chunks(run(tx, Request(0, P.CMD_BLOCK_STATUS, 3, 0, 8 << 30)), extended=True)
        assert chunk[1] == P.REPLY_TYPE_BLOCK_STATUS_EXT
        context, count = struct.unpack_from(">II", chunk[2])
        descriptors = [struct.unpack_from(">QQ", chunk[2], 8 + 16 * i) for i in range(count)]
        assert context == 1 and sum(d[0] for d in descriptors) == 8 << 30
        assert (32768, 0) in descriptors

    def test_errors_map_to_protocol_values(self):
        assert P.errno_to_nbd(errno.EROFS) == P.NBD_EPERM
        assert P.errno_to_nbd(errno.EDQUOT) == P.NBD_ENOSPC
        assert P.errno_to_nbd(errno.ENOENT) == P.NBD_EIO
        enc = ReplyEncoder(structured=False, extended=False)
        assert enc.error(5, 0, errno.ENOSPC) == P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, P.NBD_ENOSPC, 5)


class TestResize:
    def test_grow_and_shrink_memory(self):
        tx = memory_transmission()
        assert tx.flags & P.TF_SEND_RESIZE
        run(tx, Request(0, P.CMD_WRITE, 1, 1000, 4, memoryview(bytearray(b"keep"))))
        run(tx, Request(0, P.CMD_WRITE, 1, 900 * 1024, 4, memoryview(bytearray(b"gone"))))
        assert chunks(run(tx, Request(0, P.CMD_RESIZE, 2, 4 << 20, 0)))[0][1] == P.REPLY_TYPE_NONE
        assert tx.size == 4 << 20
        assert chunks(run(tx, Request(0, P.CMD_READ, 3, (4 << 20) - 4, 4)))[0][2][8:] == bytes(4)
        run(tx, Request(0, P.CMD_RESIZE, 4, 4096, 0))
        reply = chunks(run(tx, Request(0, P.CMD_READ, 5, 4000, 200)))
        assert reply[-1][1] == P.REPLY_TYPE_ERROR_OFFSET  # past the new end
        assert chunks(run(tx, Request(0, P.CMD_READ, 6, 1000, 4)))[0][2][8:] == b"keep"
        run(tx, Request(0, P.CMD_RESIZE, 7, 1 << 20, 0))
        assert chunks(run(tx, Request(0, P.CMD_READ, 8, 900 * 1024, 4)))[0][2][8:] == bytes(4)

    def test_readonly_and_bad_resize(self):
        tx = memory_transmission(readonly=True)
        assert not tx.flags & P.TF_SEND_RESIZE
        code = struct.unpack_from(">I", chunks(run(tx, Request(0, P.CMD_RESIZE, 1, 1 << 21, 0)))[0][2])[0]
        assert code == P.NBD_EPERM
        tx = memory_transmission()
        code = struct.unpack_from(">I", chunks(run(tx, Request(0, P.CMD_RESIZE, 1, 1 << 21, 5)))[0][2])[0]
        assert code == P.NBD_EINVAL

    def test_filters_refuse_unless_they_pass_size_through(self):
        from nbdformats.api.chain import Filter

        class Shifting(Filter):
            name = "shifting"

        class Transparent(Filter):
            name = "transparent"
            resize_passthrough = True

        for cls, expected in ((Shifting, False), (Transparent, True)):
            chain = Chain([cls()], load_plugin("memory")())
            chain.configure({1: [("size", "1M")]})
            chain.get_ready()
            layer = chain.open(False, "")
            assert layer.can_resize() is expected
            if expected:
                layer.resize(2 << 20)
                assert layer.get_size() == 2 << 20


def test_size_preserving_filters_pass_resize_through():
    for name in ("rate", "fua", "nozero"):
        from nbdformats.registry import load_filter
        chain = Chain([load_filter(name)()], load_plugin("memory")())
        chain.configure({1: [("size", "1M")]})
        chain.get_ready()
        layer = chain.open(False, "")
        assert layer.can_resize(), name
        layer.resize(3 << 20)
        assert layer.get_size() == 3 << 20
