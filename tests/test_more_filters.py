"""nbdkit's filters nofilter, cacheextents, extentlist, ddrescue and tls-fallback, through real
clients, against nbdkit 1.32 running the same command lines where that is cheap."""

from __future__ import annotations

import json

import pytest

from conftest import nbdinfo_json, nbdsh, run, serve, serve_nbdkit, served_sha


def disk_map(uri: str) -> list:
    return json.loads(run(["nbdinfo", "--map", "--json", uri]).stdout)


def errno_of(uri: str, call: str) -> str:
    return nbdsh(uri, f"try:\n    {call}\n    print('ok')\nexcept nbd.Error as e:\n    print(e.errno)").stdout \
        .decode().strip()


# -- nofilter ----------------------------------------------------------------------------------

def test_nofilter_serves_what_the_plugin_serves(tmp):
    args = ("data", "@5 1 2 3 @0x100000 4 5 6 7 @0x300000 ( 9 8 )*4096", "size=4M")
    with serve(*args) as plain, serve("--filter=nofilter", *args) as filtered, \
            serve_nbdkit("--filter=nofilter", *args) as ref:
        assert served_sha(filtered.uri, tmp, "a") == served_sha(plain.uri, tmp, "b") == served_sha(ref.uri, tmp, "c")
        assert disk_map(filtered.uri) == disk_map(plain.uri) == disk_map(ref.uri)
        ours, theirs = (nbdinfo_json(s.uri)["exports"][0] for s in (filtered, ref))
        for key in ("export-size", "is_read_only", "can_flush", "can_trim", "can_zero", "can_multi_conn"):
            assert ours[key] == theirs[key], key


def test_nofilter_passes_writes_through():
    with serve("--filter=nofilter", "--filter=nofilter", "memory", "1M") as srv:
        nbdsh(srv.uri, "h.pwrite(b'hello', 1000); h.zero(512, 0); h.trim(4096, 8192); h.flush()")
        assert nbdsh(srv.uri, "print(h.pread(5, 1000))").stdout == b"bytearray(b'hello')\n"
