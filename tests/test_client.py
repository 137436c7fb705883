"""The NBD client's sans-IO parts, in memory: its handshake against the server's ServerHandshake, its
requests through the server's RequestDecoder/Transmission and back through ReplyDecoder, URIs, and
replies that break the protocol.  Then the threaded client against real servers (ours, nbdkit, qemu-nbd)."""

from __future__ import annotations

import errno
import os
import signal
import socket
import struct
import threading
import time

import pytest

from conftest import random_file, serve, serve_nbdkit, serve_qemu_nbd
from fixtures.nbd_servers import kill, unix_uri
from nbdformats.protocol import wire as P
from nbdformats.api.chain import Chain
from nbdformats.client import Address, Command, HandshakeError, NBDClient, parse_uri
from nbdformats.client.negotiate import Negotiated, Recv, Send, negotiate
from nbdformats.client.replies import ReplyDecoder, encode_request
from nbdformats.api.errors import NBDError
from nbdformats.protocol.errors import ProtocolError
from nbdformats.protocol.handshake import (Abort, ExportRequest, ListExports, NeedData, Ready, ServerHandshake,
                                           StartTLS)
from nbdformats.protocol.transmission import RequestDecoder
from nbdformats.server.transmission import Transmission, export_info
from nbdformats.registry import load_plugin


# -- Handshake against our server's state machine ----------------------------------------------
def memory_layer(size: int = 1 << 20):
    chain = Chain([], load_plugin("memory")())
    chain.configure({0: [("size", str(size))]})
    chain.get_ready()
    return chain.open(readonly=False, export_name="")


def handshake_in_memory(steps, server: ServerHandshake, layer=None, exports=(("", ""),)) -> Negotiated:
    """Run the client generator against ServerHandshake, answering export requests with `layer`."""
    pending = bytearray(server.data_to_send())

    def pump() -> None:
        while True:
            event = server.next_event()
            pending.extend(server.data_to_send())
            if isinstance(event, (NeedData, Abort, Ready)):
                return
            if isinstance(event, ListExports):
                server.reply_list(list(exports))
            elif isinstance(event, ExportRequest):
                ready = server.reply_export(export_info(event.name, layer, server.structured_replies))
                pending.extend(server.data_to_send())
                if ready is not None:
                    return
            elif isinstance(event, StartTLS):
                raise AssertionError("no TLS in memory")

    answer = None
    while True:
        try:
            step = steps.send(answer)
        except StopIteration as stop:
            return stop.value
        answer = None
        if isinstance(step, Send):
            server.receive_data(step.data)
            pump()
        else:
            assert isinstance(step, Recv)
            assert len(pending) >= step.size, "the client waits for bytes the server never sent"
            answer = bytes(pending[:step.size])
            del pending[:step.size]


@pytest.mark.parametrize("structured,extended", [(True, True), (True, False), (False, False)])
def test_handshake_agrees_with_our_server(structured, extended):
    layer = memory_layer()
    server = ServerHandshake()
    info = handshake_in_memory(negotiate("", structured=structured, extended=extended), server, layer)
    assert server.done and info.size == 1 << 20
    assert info.structured == structured and server.structured_replies == structured
    assert info.extended == extended and server.extended_headers == extended
    assert info.flags == server.export.flags and info.flags & P.TF_SEND_FLUSH
    assert (info.minimum, info.preferred, info.maximum) == (1, 4096, 64 << 20)
    if structured:
        assert info.meta_contexts == {P.BASE_ALLOCATION: server.meta_context_id}
    else:
        assert info.meta_contexts == {} and server.meta_context_id is None


def test_handshake_lists_exports_then_aborts():
    server = ServerHandshake()
    info = handshake_in_memory(negotiate(list_exports=True), server, exports=[("a", "first"), ("b", "")])
    assert info.exports == [("a", "first"), ("b", "")]
    assert isinstance(server.next_event(), Abort)


def test_handshake_tls_policy():
    # The server offers no TLS: "on" carries on in plain text, "require" refuses with the reason.
    info = handshake_in_memory(negotiate(tls="on"), ServerHandshake(tls="off"), memory_layer())
    assert info.tls is False and info.size == 1 << 20
    with pytest.raises(HandshakeError, match="refused TLS.*policy"):
        handshake_in_memory(negotiate(tls="require"), ServerHandshake(tls="off"))
    # The server requires TLS and the client does not use it: the refusal says so.
    with pytest.raises(HandshakeError, match="TLS is required"):
        handshake_in_memory(negotiate(tls="off"), ServerHandshake(tls="require"))


def test_handshake_refuses_non_nbd_peers():
    steps = negotiate()
    assert steps.send(None) == Recv(16)
    with pytest.raises(HandshakeError, match="not an NBD server"):
        steps.send(b"HTTP/1.1 200 OK\r\n"[:16])


def test_handshake_oldstyle_and_export_name_fallback():
    steps = negotiate()
    steps.send(None)
    with pytest.raises(StopIteration) as stop:
        steps.send(struct.pack(">QQ", P.NBDMAGIC, P.OLDSTYLE_MAGIC))
        steps.send(struct.pack(">QI", 12345, P.TF_HAS_FLAGS | P.TF_READ_ONLY) + bytes(124))
    assert stop.value.value.style == "oldstyle" and stop.value.value.size == 12345
    # A fixed-newstyle server without NBD_OPT_GO (ERR_UNSUP): the client falls back to EXPORT_NAME.
    steps = negotiate("disk", structured=False, extended=False)
    steps.send(None)
    steps.send(struct.pack(">QQ", P.NBDMAGIC, P.IHAVEOPT))
    send = steps.send(P.U16.pack(P.FLAG_FIXED_NEWSTYLE))  # no NO_ZEROES: 124 zero bytes follow the reply
    assert send == Send(P.CLIENT_FLAGS.pack(P.CLIENT_FLAG_FIXED_NEWSTYLE))
    go = steps.send(None)
    assert P.OPTION_HEADER.unpack_from(go.data)[1] == P.OPT_GO
    assert steps.send(None) == Recv(P.OPTION_REPLY.size)
    export_name = steps.send(P.OPTION_REPLY.pack(P.OPTION_REPLY_MAGIC, P.OPT_GO, P.REP_ERR_UNSUP, 0))
    assert export_name.data == P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_EXPORT_NAME, 4) + b"disk"
    assert steps.send(None) == Recv(10 + 124)
    with pytest.raises(StopIteration) as stop:
        steps.send(P.EXPORT_NAME_REPLY.pack(4096, P.TF_HAS_FLAGS) + bytes(124))
    assert (stop.value.value.size, stop.value.value.export_name) == (4096, "disk")


# -- Transmission: client requests through the server's decoder and replies back ----------------
class Loop:
    """Client encoder/decoder wired to the server's RequestDecoder and Transmission, in memory."""

    def __init__(self, structured: bool, extended: bool, size: int = 4 << 20) -> None:
        layer = memory_layer(size)
        meta = 1 if structured or extended else None
        info = export_info("", layer, structured or extended)
        self.transmission = Transmission(layer, info, structured=structured, extended=extended, meta_context_id=meta)
        self.requests = RequestDecoder(extended=extended)
        self.commands: dict[int, Command] = {}
        self.replies = ReplyDecoder(self.commands, structured=structured, extended=extended)
        self.extended = extended
        self.cookie = 0

    def run(self, command: Command) -> Command:
        self.cookie += 1
        command.cookie = self.cookie
        self.commands[command.cookie] = command
        wire = encode_request(command, self.extended) + bytes(command.payload or b"")
        out = bytearray()
        for request in self.requests.receive(wire):
            problem = self.transmission.check(request)
            if problem:
                out += self.transmission.replies.error(request.cookie, request.offset, *problem)
            else:
                for buf in self.transmission.process(request):
                    out += buf
        # One byte at a time: every boundary inside headers and payloads is exercised.
        finished = []
        for i in range(len(out)):
            finished += self.replies.receive(out[i:i + 1])
        assert finished == [command] and command.done
        del self.commands[command.cookie]
        return command


MODES = [(False, False), (True, False), (True, True)]


@pytest.mark.parametrize("structured,extended", MODES)
def test_requests_round_trip_in_memory(structured, extended):
    loop = Loop(structured, extended)
    data = os.urandom(100_000)
    assert loop.run(Command(P.CMD_WRITE, P.CMD_FLAG_FUA, 70_000, len(data), payload=data)).error == 0
    buf = bytearray(300_000)
    read = loop.run(Command(P.CMD_READ, 0, 0, len(buf), buf=memoryview(buf)))
    assert read.error == 0 and buf == bytes(70_000) + data + bytes(130_000)
    if structured:
        # A sparse read: the server answers the unwritten parts with hole chunks.
        assert P.REPLY_TYPE_OFFSET_HOLE in read.chunk_types
        status = loop.run(Command(P.CMD_BLOCK_STATUS, 0, 0, 4 << 20)).status[1]
        assert sum(length for length, _ in status) == 4 << 20
        assert status[0] == (65536, P.STATE_HOLE | P.STATE_ZERO)
        assert status[1][1] == 0  # data
    # A failed request carries the server's errno (and its message with structured replies).
    beyond = loop.run(Command(P.CMD_WRITE, 0, 4 << 20, 10, payload=b"x" * 10))
    assert beyond.error == errno.EINVAL
    assert ("beyond the end" in beyond.message) == structured
    assert loop.run(Command(P.CMD_FLUSH, 0, 0, 0)).error == 0
    assert loop.run(Command(P.CMD_WRITE_ZEROES, 0, 70_000, 100_000)).error == 0
    buf = bytearray(10)
    assert loop.run(Command(P.CMD_READ, 0, 80_000, 10, buf=memoryview(buf))).error == 0 and buf == bytes(10)


def decoder(structured=True, extended=False, *commands: Command) -> ReplyDecoder:
    table = {}
    for cookie, command in enumerate(commands, 1):
        command.cookie = cookie
        table[cookie] = command
    return ReplyDecoder(table, structured=structured, extended=extended)


def chunk(flags, type, cookie, payload=b""):
    return P.STRUCTURED_REPLY.pack(P.STRUCTURED_REPLY_MAGIC, flags, type, cookie, len(payload)) + payload


def test_decoder_assembles_data_and_holes_and_checks_coverage():
    buf = bytearray(b"?" * 12)
    read = Command(P.CMD_READ, 0, 100, 12, buf=memoryview(buf))
    dec = decoder(True, False, read)
    stream = (chunk(0, P.REPLY_TYPE_OFFSET_DATA, 1, P.U64.pack(104) + b"abcd")
              + chunk(0, P.REPLY_TYPE_OFFSET_HOLE, 1, P.HOLE_PAYLOAD.pack(100, 4))
              + chunk(P.REPLY_FLAG_DONE, P.REPLY_TYPE_OFFSET_DATA, 1, P.U64.pack(108) + b"efgh"))
    assert dec.receive(stream) == [read]
    assert read.error == 0 and buf == b"\0\0\0\0abcdefgh"
    # Done with bytes missing: the read fails rather than returning stale buffer contents.
    short = Command(P.CMD_READ, 0, 0, 8, buf=memoryview(bytearray(8)))
    decoder(True, False, short).receive(chunk(P.REPLY_FLAG_DONE, P.REPLY_TYPE_OFFSET_DATA, 1,
                                              P.U64.pack(0) + b"abcd"))
    assert short.error == errno.EIO and "4 of 8" in short.message


def test_decoder_error_chunks_and_block_status():
    command = Command(P.CMD_BLOCK_STATUS, 0, 0, 1 << 20)
    dec = decoder(True, True, command)
    body = P.BLOCK_STATUS_EXT_HEADER.pack(7, 2) + P.BLOCK_DESCRIPTOR_EXT.pack(4096, 0) + \
        P.BLOCK_DESCRIPTOR_EXT.pack(1 << 40, 3)
    header = P.EXTENDED_REPLY.pack(P.EXTENDED_REPLY_MAGIC, P.REPLY_FLAG_DONE, P.REPLY_TYPE_BLOCK_STATUS_EXT, 1, 0,
                                   len(body))
    assert dec.receive(header + body) == [command]
    assert command.status == {7: [(4096, 0), (1 << 40, 3)]}
    failed = Command(P.CMD_WRITE, 0, 0, 1)
    message = "no space left".encode()
    decoder(True, False, failed).receive(chunk(P.REPLY_FLAG_DONE, P.REPLY_TYPE_ERROR, 1,
                                               P.ERROR_PAYLOAD.pack(P.NBD_ENOSPC, len(message)) + message))
    assert (failed.error, failed.message) == (errno.ENOSPC, "no space left")
    with pytest.raises(NBDError, match="no space left") as raised:
        failed.result()
    assert raised.value.errno == errno.ENOSPC


@pytest.mark.parametrize("name,stream", [
    ("unknown cookie", chunk(P.REPLY_FLAG_DONE, P.REPLY_TYPE_NONE, 99)),
    ("bad magic", b"\x12\x34\x56\x78" + bytes(16)),
    ("data outside the request", chunk(P.REPLY_FLAG_DONE, P.REPLY_TYPE_OFFSET_DATA, 1, P.U64.pack(0) + b"zz")),
    ("hole outside the request", chunk(P.REPLY_FLAG_DONE, P.REPLY_TYPE_OFFSET_HOLE, 1, P.HOLE_PAYLOAD.pack(8, 9))),
    ("NONE with payload", chunk(P.REPLY_FLAG_DONE, P.REPLY_TYPE_NONE, 1, b"x")),
    ("unknown chunk type", chunk(P.REPLY_FLAG_DONE, 77, 1)),
    ("huge chunk", chunk(0, P.REPLY_TYPE_BLOCK_STATUS, 1)[:-4] + P.U32.pack(1 << 31)),
])
def test_decoder_rejects_protocol_violations(name, stream):
    read = Command(P.CMD_READ, 0, 8, 8, buf=memoryview(bytearray(8)))
    with pytest.raises(ProtocolError):
        decoder(True, False, read).receive(stream)


def test_structured_chunk_refused_when_not_negotiated():
    command = Command(P.CMD_FLUSH, 0, 0, 0)
    with pytest.raises(ProtocolError):
        decoder(False, False, command).receive(chunk(P.REPLY_FLAG_DONE, P.REPLY_TYPE_NONE, 1))


# -- URIs --------------------------------------------------------------------------------------
def test_parse_uri():
    assert parse_uri("nbd://example.com/disk") == Address(host="example.com", export="disk")
    assert parse_uri("nbd://[::1]:10810") == Address(host="::1", port=10810)
    assert parse_uri("nbds://h/a%20b") == Address(host="h", export="a b", tls="require")
    assert parse_uri("nbd+unix:///x?socket=/tmp/s") == Address(unix="/tmp/s", export="x")
    tls = parse_uri("nbds+unix:///?socket=/s&tls-certificates=/c&tls-verify-peer=false")
    assert (tls.tls, tls.tls_certificates, tls.tls_verify) == ("require", "/c", False)
    psk = parse_uri("nbds+unix://alice@/?socket=/s&tls-psk-file=/k")
    assert (psk.unix, psk.tls_psk_file, psk.tls_username) == ("/s", "/k", "alice")
    for bad in ("http://x/", "nbd+unix:///", "nbd+unix://host/?socket=/s", "nbd:///x", "nbd://h/?socket=/s",
                "nbd+vsock:///2", "nbd://h/?bogus=1"):
        with pytest.raises(ValueError):
            parse_uri(bad)


# -- The threaded client against real servers --------------------------------------------------
@pytest.mark.parametrize("server", ["nbdformats", "nbdkit", "qemu-nbd"])
def test_client_against_servers(tmp_path, server):
    image = tmp_path / "disk.img"
    random_file(image, 6 << 20, seed=3)
    expected = image.read_bytes()
    starters = {"nbdformats": lambda: serve("file", str(image)), "nbdkit": lambda: serve_nbdkit("file", str(image)),
                "qemu-nbd": lambda: serve_qemu_nbd(str(image))}
    with starters[server]() as srv, NBDClient.connect(unix_uri(srv)) as nbd:
        assert nbd.size == 6 << 20 and nbd.info.structured
        assert nbd.info.extended == (server == "nbdformats")  # nbdkit 1.32 and qemu 7.2 predate them
        assert nbd.pread(nbd.size, 0) == expected
        # Eight threads on one connection, each in its own 512 KiB region: requests overlap in flight
        # and every reply reaches the request it answers.
        errors = []

        def worker(region: int) -> None:
            base = (region + 1) << 19
            try:
                for i in range(20):
                    data = os.urandom(1 + (region * 977 + i * 7919) % (1 << 18))
                    offset = base + (i * 4099) % ((1 << 19) - len(data))
                    nbd.pwrite(data, offset)
                    if nbd.pread(len(data), offset) != data:
                        raise AssertionError(f"region {region} write {i} read back wrong")
            except Exception as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(r,)) for r in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        nbd.zero(1 << 20, 1 << 20)
        nbd.flush()
        assert nbd.pread(1 << 20, 1 << 20) == bytes(1 << 20)
        status = nbd.block_status(nbd.size, 0)
        assert status and all(state in (0, 1, 2, 3) for _, state in status)


def test_client_splits_requests_at_the_servers_maximum(tmp_path):
    image = random_file(tmp_path / "disk.img", 1 << 20, seed=4)
    # nbdkit advertises a 64 KiB maximum and refuses anything larger.
    with serve_nbdkit("--filter=blocksize-policy", "file", str(image), "blocksize-maximum=64K",
                      "blocksize-error-policy=error") as srv, NBDClient.connect(unix_uri(srv)) as nbd:
        assert nbd.info.maximum == 65536
        assert nbd.send_request(P.CMD_READ, 0, 1 << 17).error == errno.EINVAL  # one oversized request
        assert nbd.pread(1 << 20, 0) == image.read_bytes()  # 16 pipelined pieces
        data = os.urandom(300_000)
        nbd.pwrite(data, 12_345)
        assert nbd.pread(len(data), 12_345) == data


@pytest.mark.parametrize("start", [serve, serve_nbdkit])
def test_client_speaks_oldstyle(start):
    with start("memory", "1M", options=("--oldstyle",)) as srv, NBDClient.connect(unix_uri(srv)) as nbd:
        assert nbd.info.style == "oldstyle" and not nbd.info.structured and nbd.size == 1 << 20
        nbd.pwrite(b"old", 100)
        assert nbd.pread(3, 100) == b"old"
        with pytest.raises(NBDError, match="did not agree to base:allocation"):
            nbd.block_status(4096, 0)


def test_client_reports_a_lost_server():
    with serve("memory", "1M") as srv:
        nbd = NBDClient.connect(unix_uri(srv))
        assert nbd.pread(10, 0) == bytes(10)
        kill(srv)
        with pytest.raises(NBDError, match="connection to the NBD server lost") as raised:
            for _ in range(100):  # the reader notices the closed socket at once; give it a moment
                nbd.pread(10, 0)
                time.sleep(0.02)
        assert raised.value.errno == errno.EIO and nbd.failure
        nbd.close()


def test_connect_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError):
        NBDClient.connect(f"nbd+unix:///?socket={tmp_path}/missing")
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))
    with serve_qemu_nbd(str(image), "-x", "disk") as srv:
        with pytest.raises(HandshakeError, match="refused export 'nope': unknown export"):
            NBDClient.connect(Address(unix=srv.socket, export="nope"))
        with NBDClient.connect(Address(unix=srv.socket, export="disk")) as nbd:
            assert nbd.size == 4096


def test_connect_and_requests_are_bounded_in_time(tmp_path):
    # A listener that never answers: the handshake gives up after the timeout.
    mute = socket.socket(socket.AF_UNIX)
    mute.bind(str(tmp_path / "mute.sock"))
    mute.listen(1)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish the handshake within 0.5 s") as raised:
        NBDClient.connect(f"nbd+unix:///?socket={tmp_path}/mute.sock", timeout=0.5)
    assert raised.value.errno == errno.ETIMEDOUT and time.monotonic() - start < 5
    mute.close()
    # A server that stops answering: the request fails with ETIMEDOUT, and so does the connection.
    with serve_nbdkit("memory", "1M") as srv, NBDClient.connect(unix_uri(srv), request_timeout=0.5) as nbd:
        nbd.pwrite(b"x", 0)
        os.killpg(srv.proc.pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            with pytest.raises(NBDError, match="READ got no reply in 0.5 s") as raised:
                nbd.pread(1, 0)
            assert raised.value.errno == errno.ETIMEDOUT and time.monotonic() - start < 5
            assert "got no reply" in (nbd.failure or "")
            with pytest.raises(NBDError) as later:
                nbd.pread(1, 0)
            assert later.value.errno == errno.EIO
        finally:
            os.killpg(srv.proc.pid, signal.SIGCONT)
