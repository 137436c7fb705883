"""Reads that answer holes (pread_sparse) come through the chain: every filter that cares about
reads sees them, and holes still go out as NBD_REPLY_TYPE_OFFSET_HOLE where nothing stands between
the client and a plugin that knows its holes.  Observed with libnbd's structured reads."""

from __future__ import annotations

import time

import pytest

from conftest import nbdsh, serve, serve_nbdkit

MIB = 1 << 20

# Reads 4 MiB at offset 0 of a disk whose first MiB was written; prints the chunk kinds libnbd saw
# (1 = data, 2 = hole), each with its offset and length, and the data's first bytes.
READ_CHUNKS = """
h.pwrite(b"\\x5a" * (1 << 20), 0)
kinds = []
def chunk(buf, offset, status, err):
    kinds.append((status, offset, len(buf)))
    return 0
buf = h.pread_structured(4 << 20, 0, chunk)
assert buf[:1 << 20] == b"\\x5a" * (1 << 20) and buf[1 << 20:] == bytes(3 << 20)
print(sorted(kinds))
"""


@pytest.mark.parametrize("filter,parameter", [(None, None), ("delay", "rdelay=0"), ("offset", "offset=0"),
                                              ("truncate", "truncate=8M"), ("stats", "statsfile=/dev/null"),
                                              ("nozero", "zeromode=none")])
def test_holes_pass_through_filters_that_say_how(filter, parameter):
    """memory and file know their holes; filters that pass reads on (or say how) keep them holes."""
    args = ("memory", "8M") if filter is None else (f"--filter={filter}", "memory", "8M", parameter)
    with serve(*args) as srv:
        out = nbdsh(srv.uri, READ_CHUNKS).stdout.decode()
    assert out.strip() == str([(1, 0, MIB), (2, MIB, 3 * MIB)])


def test_a_filter_that_reads_sees_every_read(tmp):
    """The cache filter overrides pread only: it gets the whole read (and caches it), so the
    client gets data, not holes."""
    with serve("--filter=cache", "memory", "8M") as srv:
        out = nbdsh(srv.uri, READ_CHUNKS).stdout.decode()
    assert out.strip() == str([(1, 0, 4 * MIB)])


def test_reads_of_unwritten_space_reach_the_error_filter():
    """nbdkit runs a filter's pread for every read: so must we, even where the plugin has holes."""
    with serve("--filter=error", "memory", "1G", "error-pread=EIO", "error-pread-rate=1") as srv:
        out = nbdsh(srv.uri, "try:\n    h.pread(1 << 20, 0)\n    print('read')\n"
                             "except nbd.Error as e:\n    print('failed', e.errno)\n").stdout.decode()
    assert out.strip() == "failed EIO"


@pytest.mark.parametrize("server", [serve, serve_nbdkit])
def test_delay_applies_to_reads_of_holes(server):
    """--filter=delay rdelay=... delays reads of unwritten space as nbdkit does (test-delay-*.sh)."""
    with server("--filter=delay", "memory", "1G", "rdelay=300ms") as srv:
        start = time.monotonic()
        nbdsh(srv.uri, "for i in range(3):\n    h.pread(1 << 20, i << 20)\n")
        elapsed = time.monotonic() - start
    assert elapsed >= 0.9


def test_file_holes_are_sent_as_holes(tmp):
    disk = tmp / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(8 * MIB)
    with serve("file", str(disk)) as srv:
        out = nbdsh(srv.uri, READ_CHUNKS).stdout.decode()
    assert out.strip() == str([(1, 0, MIB), (2, MIB, 3 * MIB)])
