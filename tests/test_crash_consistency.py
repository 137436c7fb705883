"""Crash consistency: kill -9 the server during a stream of pipelined writes with periodic
flushes and FUA writes, then replay the log of acknowledged writes against the disk file.

Every write acknowledged before a flush that was acknowledged (or acknowledged with FUA) must
be on disk afterwards.  A block may hold a later write instead (acknowledged or in flight),
never an older one and never anything else.  This is a process crash: the kernel keeps what
the server wrote to files; power loss would need a block-layer fault injector.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import NBDFORMATS
from fixtures.hardening import Raw
from nbdformats.protocol import wire as P

BLOCK = 4096
BLOCKS = 1024
DEPTH = 8  # writes in flight at once (never two to the same block)


def block_data(seq: int, block: int) -> bytes:
    """A recognisable block: its write's sequence number and block, then filler derived from both."""
    head = struct.pack(">QQ", seq, block)
    return (head + hashlib.sha256(head).digest() * (BLOCK // 32))[:BLOCK]


def identify(data: bytes, block: int) -> int | None:
    """The sequence number of the write whose data this is (0: never written), None if corrupt."""
    if data == bytes(BLOCK):
        return 0
    seq, where = struct.unpack_from(">QQ", data)
    return seq if where == block and data == block_data(seq, block) else None


def write_until_killed(sock: str, proc: subprocess.Popen, seed: int, kill_after: float):
    """Pipelined writes (some FUA), a flush every ~50; returns (log, durable seqs per block)."""
    rng = random.Random(seed)
    client = Raw(sock)
    client.go()
    sent: dict[int, tuple[int, int, bool]] = {}  # cookie(seq) -> (block, seq, fua)
    writes_to: dict[int, list[int]] = {}  # block -> seqs in the order sent
    durable: dict[int, int] = {}  # block -> newest seq known durable
    acked_since_flush: list[tuple[int, int]] = []
    killer = threading.Timer(kill_after, lambda: os.kill(proc.pid, signal.SIGKILL))
    killer.start()
    seq = 0
    try:
        while True:
            busy = {block for block, _, _ in sent.values()}
            while len(sent) < DEPTH:
                block = rng.randrange(BLOCKS)
                if block in busy:
                    continue
                seq += 1
                fua = rng.random() < 0.1
                sent[seq] = (block, seq, fua)
                busy.add(block)
                writes_to.setdefault(block, []).append(seq)
                client.request(P.CMD_WRITE, seq, block * BLOCK, BLOCK, P.CMD_FLAG_FUA if fua else 0)
                client.send(block_data(seq, block))
            cookie, error = client.simple_reply()
            assert error == 0
            block, wseq, fua = sent.pop(cookie)
            if fua:
                durable[block] = max(durable.get(block, 0), wseq)
            else:
                acked_since_flush.append((block, wseq))
            if len(acked_since_flush) >= 50:
                while sent:  # a flush covers the writes completed before it is sent
                    cookie, error = client.simple_reply()
                    assert error == 0
                    block, wseq, fua = sent.pop(cookie)
                    (durable.__setitem__(block, max(durable.get(block, 0), wseq)) if fua
                     else acked_since_flush.append((block, wseq)))
                client.request(P.CMD_FLUSH, 0, 0, 0)
                covered = list(acked_since_flush)
                acked_since_flush.clear()
                assert client.simple_reply() == (0, 0)
                for block, wseq in covered:
                    durable[block] = max(durable.get(block, 0), wseq)
    except (EOFError, ConnectionResetError, BrokenPipeError):
        pass  # killed
    finally:
        killer.cancel()
        client.close()
    proc.wait(10)
    return writes_to, durable, seq


def check_disk(disk: Path, writes_to: dict[int, list[int]], durable: dict[int, int]) -> int:
    data = disk.read_bytes()
    lost = []
    for block in range(BLOCKS):
        found = identify(data[block * BLOCK:(block + 1) * BLOCK], block)
        assert found is not None, f"block {block} holds data no write put there"
        assert found == 0 or found in writes_to.get(block, []), f"block {block} holds seq {found}"
        if found < durable.get(block, 0):
            lost.append((block, durable[block], found))
    return len(lost)


def crash_run(tmp_path: Path, extra: list[str], seed: int) -> tuple[int, int, int]:
    """Serve a file (with `extra` filters/parameters), write until killed; (writes, durable, lost)."""
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(BLOCK * BLOCKS)
    sock = str(tmp_path / "sock")
    proc = subprocess.Popen([*NBDFORMATS, "-f", "-U", sock, *[a for a in extra if a.startswith("--")], "file",
                             str(disk), *[a for a in extra if not a.startswith("--")]],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(500):
            if os.path.exists(sock):
                break
            time.sleep(0.02)
        writes_to, durable, count = write_until_killed(sock, proc, seed, kill_after=random.Random(seed).uniform(1, 2))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    return count, len(durable), check_disk(disk, writes_to, durable)


@pytest.mark.parametrize("extra", [[], ["--filter=cache", "cache=writeback"], ["--filter=cache", "cache=writethrough"]],
                         ids=["file", "cache-writeback", "cache-writethrough"])
def test_acknowledged_flushed_writes_survive_kill_9(tmp_path, extra):
    writes, durable_blocks, lost = crash_run(tmp_path, extra, seed=len(extra))
    assert writes > 500 and durable_blocks > 100, (writes, durable_blocks)
    assert lost == 0, f"{lost} blocks lost writes that were flushed or written with FUA"


def test_the_check_detects_lost_writes(tmp_path):
    """Control: cache=unsafe ignores flushes, so flushed writes die with the process."""
    writes, durable_blocks, lost = crash_run(tmp_path, ["--filter=cache", "cache=unsafe"], seed=5)
    assert writes > 500 and lost > 0
