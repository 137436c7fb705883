"""nbdkit's filters nofilter, cacheextents, extentlist, ddrescue and tls-fallback, through real
clients, against nbdkit 1.32 running the same command lines where that is cheap."""

from __future__ import annotations

import json

import pytest

from conftest import NBDFORMATS, nbdinfo_json, nbdsh, run, serve, serve_nbdkit, served_sha


def disk_map(uri: str) -> list:
    return json.loads(run(["nbdinfo", "--map", "--json", uri]).stdout)


def start(*args: str):
    """Run the server with ARGS until it is ready, then stop it (`--run true`): its exit status and messages."""
    return run([*NBDFORMATS, *args, "--run", "true"], check=False, timeout=60)


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


# -- cacheextents ------------------------------------------------------------------------------

COUNTING_PLUGIN = r"""#!/bin/bash
# Extents of 1 MiB blocks of alternating types; every extents call is counted in $LOG.
case "$1" in
  get_size) echo 4M ;;
  can_extents|can_write|can_trim|can_zero) ;;
  extents)
    echo x >> "$LOG"
    for i in $(seq $(($4 / 1048576)) 3); do echo $((i * 1048576)) 1048576 $((i % 2 * 3)); done ;;
  pread) head -c "$3" /dev/zero ;;
  pwrite) cat > /dev/null ;;
  trim|zero) ;;
  *) exit 2 ;;
esac
"""


def test_cacheextents_answers_from_the_last_answer_until_a_write(tmp, monkeypatch):
    script = tmp / "plugin.sh"
    script.write_text(COUNTING_PLUGIN)
    script.chmod(0o755)
    log = tmp / "calls"

    def calls() -> int:
        return len(log.read_text().split()) if log.exists() else 0

    monkeypatch.setenv("LOG", str(log))
    with serve("--filter=cacheextents", "sh", str(script)) as srv, serve("sh", str(script)) as plain:
        expected = disk_map(plain.uri)
        log.unlink()
        assert disk_map(srv.uri) == expected
        assert calls() == 1
        # One extent at a time (REQ_ONE), from another connection: still from the cache.
        script_one = ("for off in range(0, 4 << 20, 1 << 20):\n"
                      "    h.block_status(1 << 20, off, lambda *a: 0, nbd.CMD_FLAG_REQ_ONE)\n")
        nbdsh(srv.uri, script_one)
        assert calls() == 1
        nbdsh(srv.uri, "h.pread(512, 0)")  # reads keep it
        nbdsh(srv.uri, script_one)
        assert calls() == 1
        for change in ("h.pwrite(b'x', 0)", "h.trim(512, 0)", "h.zero(512, 0)"):
            log.unlink()
            nbdsh(srv.uri, change + "\n" + script_one)
            assert calls() == 1, change
        assert disk_map(srv.uri) == expected


def test_cacheextents_map_matches_nbdkit(tmp):
    args = ("--filter=cacheextents", "data", "@5 1 2 3 @0x100000 4 5 6 7 @0x300000 ( 9 8 )*4096", "size=4M")
    with serve(*args) as ours, serve_nbdkit(*args) as ref:
        for _ in range(2):
            assert disk_map(ours.uri) == disk_map(ref.uri)


# -- extentlist --------------------------------------------------------------------------------

@pytest.mark.parametrize("size", ["0", "1M", "3M", "7M", "10000000"])
def test_extentlist_map_matches_nbdkit(tmp, size):
    (tmp / "list").write_text("2M 1M 3\n0 1M\n4M 512K hole\n4608K 512K 2\n1536K 1K zero,hole\n6M 0\n"
                              "6M 4096 1\n")
    args = ("-r", "--filter=extentlist", "null", f"size={size}", f"extentlist={tmp / 'list'}")
    with serve(*args) as ours, serve_nbdkit(*args) as ref:
        assert disk_map(ours.uri) == disk_map(ref.uri)
        script = """
entries = []
for offset in (0, 1 << 20, 1536 * 1024 + 512, 4 << 20, 6 << 20):
    if offset < h.get_size():
        h.block_status(min(1 << 20, h.get_size() - offset), offset,
                       lambda ctx, off, e, err: entries.append((off, list(e))), nbd.CMD_FLAG_REQ_ONE)
print(entries)
"""
        assert nbdsh(ours.uri, script).stdout == nbdsh(ref.uri, script).stdout


def test_extentlist_passes_data_through(tmp):
    (tmp / "list").write_text("0 4096\n")
    with serve("--filter=extentlist", "memory", "1M", f"extentlist={tmp / 'list'}") as srv:
        nbdsh(srv.uri, "h.pwrite(b'abc', 8192)")
        assert nbdsh(srv.uri, "print(h.pread(3, 8192))").stdout == b"bytearray(b'abc')\n"
        assert disk_map(srv.uri)[1]["type"] == 3  # the list is static: the write does not change it


@pytest.mark.parametrize("text, message", [
    ("0 1M\n512K 1M\n", "list:2: extents in the extent list are overlapping"),
    ("0\n", "list:1: cannot parse"),
    ("x 1M\n", "list:1: could not parse size"),
    ("0 1M 3x\n", "list:1: cannot parse type"),
    ("0 1M 4294967296\n", "does not fit in 32 bits"),
    ("0 8E\n", "list:1: size '8E' is too large"),
    ("4E 4E\n", "ends beyond 2^63-1"),
])
def test_extentlist_bad_lists_are_clear_errors(tmp, text, message):
    (tmp / "list").write_text(text)
    proc = start("--filter=extentlist", "null", "1M", f"extentlist={tmp / 'list'}")
    assert proc.returncode == 1 and message in proc.stderr.decode(), proc.stderr


def test_extentlist_is_required():
    proc = start("--filter=extentlist", "null", "1M")
    assert proc.returncode == 1 and "extentlist" in proc.stderr.decode()


# -- ddrescue ----------------------------------------------------------------------------------

MAPFILE = """# Mapfile. Created by GNU ddrescue version 1.27
# current_pos  current_status  current_pass
0x00000400     +               1
#      pos        size  status
0x00000000  0x00000200  +
0x00000200  0x00000200  -
0x00000400  0x00000400  +
0x00000800  0x00000200  ?
0x00000A00  0x00000200  *
0x00000C00  0x00000200  /
0x00000E00  0x000FF200  +
"""

READS = [(512, 0), (512, 512), (1, 511), (2, 511), (1024, 1024), (512, 1536), (513, 1536), (4096, 2048),
         (4096, 0xE00), (1 << 16, 0xF0000)]


def read_results(uri: str) -> list[str]:
    script = f"""
for count, offset in {READS!r}:
    try:
        print(hashlib.sha256(h.pread(count, offset)).hexdigest()[:16])
    except nbd.Error as e:
        print(e.errno)
"""
    return nbdsh(uri, "import hashlib\n" + script).stdout.decode().split()


def test_ddrescue_fails_reads_of_unrescued_blocks_like_nbdkit(tmp):
    (tmp / "map").write_text(MAPFILE)
    args = ("--filter=ddrescue", "pattern", "1M", f"ddrescue-mapfile={tmp / 'map'}")
    with serve(*args) as ours, serve_nbdkit(*args) as ref:
        results = read_results(ours.uri)
        assert results == read_results(ref.uri)
        assert results.count("EIO") == 4
        facts = [nbdinfo_json(s.uri)["exports"][0] for s in (ours, ref)]
        for key in ("is_read_only", "can_cache", "can_write"):
            assert facts[0].get(key) == facts[1].get(key), key
        assert facts[0]["is_read_only"]


def test_ddrescue_reads_across_adjacent_rescued_blocks(tmp):
    # ddrescue merges neighbours of the same status, but a mapfile edited by hand may not: a read
    # across two rescued blocks succeeds here (nbdkit fails it).
    (tmp / "map").write_text("0 + 1\n0 512 +\n512 512 +\n1024 512 -\n")
    with serve("--filter=ddrescue", "pattern", "1M", f"ddrescue-mapfile={tmp / 'map'}") as srv:
        assert errno_of(srv.uri, "h.pread(1024, 0)") == "ok"
        assert errno_of(srv.uri, "h.pread(1025, 0)") == "EIO"
        assert errno_of(srv.uri, "h.pwrite(b'x', 0)") == "EPERM"


def test_ddrescue_without_a_mapfile_fails_every_read():
    with serve("--filter=ddrescue", "pattern", "1M") as srv:
        assert errno_of(srv.uri, "h.pread(512, 0)") == "EIO"


@pytest.mark.parametrize("text, message", [
    ("0 + 1\n0x0 0x200\n", "map:2: cannot parse"),
    ("0 + 1\n0x0 0x200 x\n", "map:2: cannot parse"),
    ("0 + 1\n0xZ 0x200 +\n", "map:2: '0xZ' is not a number"),
    ("0 + 1\n-0x200 0x200 +\n", "map:2: block offset must not be negative"),
    ("0 + 1\n0 -1 +\n", "map:2: block length must not be negative"),
    ("0 + 1\n0x7fffffffffffff00 0x200 +\n", "ends beyond 2^63-1"),
    ("0 + 1\n0 0x400 +\n0x200 0x200 -\n", "map:3: the block at 0x200 overlaps"),
])
def test_ddrescue_bad_mapfiles_are_clear_errors(tmp, text, message):
    (tmp / "map").write_text(text)
    proc = start("--filter=ddrescue", "null", "1M", f"ddrescue-mapfile={tmp / 'map'}")
    assert proc.returncode == 1 and message in proc.stderr.decode(), proc.stderr


# -- tls-fallback ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def psk(tmp_path_factory):
    path = tmp_path_factory.mktemp("psk") / "keys.psk"
    run(["psktool", "-u", "qemu", "-p", path], timeout=60)
    return path


def probe(srv, export: str, psk_file=None) -> dict:
    """What a client sees: the export list, the size, flags and first bytes of `export`."""
    tls = "" if psk_file is None else (f"h.set_tls(nbd.TLS_REQUIRE)\nh.set_tls_psk_file({str(psk_file)!r})\n"
                                       "h.set_tls_username('qemu')\n")
    script = f"""
import json
h = nbd.NBD()
h.set_opt_mode(True)
h.set_full_info(True)
{tls}h.connect_unix({srv.socket!r})
names = []
h.opt_list(lambda name, description: names.append((name, description)))
h.set_export_name({export!r})
try:
    h.opt_info()
    description = h.get_export_description()
except nbd.Error:
    description = None
h.opt_go()
print(json.dumps(dict(names=names, description=description, size=h.get_size(), ro=h.is_read_only(),
                      trim=h.can_trim(), flush=h.can_flush(), multi=h.can_multi_conn(), cache=h.can_cache(),
                      data=h.pread(min(512, h.get_size()), 0).hex())))
"""
    return json.loads(run(["/usr/bin/python3", "-c", "import nbd\n" + script]).stdout)


def test_tls_fallback_matches_nbdkit(psk):
    args = ("--filter=tls-fallback", "--filter=exportname", "memory", "1M", "exportname=disk",
            "exportname=other", "exportdesc=fixed:the real one", "tlsreadme=go away\n")
    options = ("--tls=on", f"--tls-psk={psk}")
    with serve(*args, options=options) as ours, serve_nbdkit(*args, options=options) as ref:
        for export in ("", "disk"):
            plain = probe(ours, export)
            assert plain == probe(ref, export)
            assert plain["names"] == [["", ""]] and plain["size"] == 512 and plain["ro"]
            assert bytes.fromhex(plain["data"]) == b"go away\n" + bytes(504)
            secure = probe(ours, export, psk)
            assert secure == probe(ref, export, psk)
            assert secure["size"] == 1 << 20 and not secure["ro"] and secure["description"] == "the real one"


def test_tls_fallback_never_opens_the_plugin_for_plaintext_clients(tmp, psk, monkeypatch):
    script = tmp / "plugin.sh"
    script.write_text('#!/bin/bash\necho "$1" >> "$LOG"\ncase "$1" in\n  get_size) echo 1M ;;\n'
                      '  pread) head -c "$3" /dev/zero ;;\n  *) exit 2 ;;\nesac\n')
    script.chmod(0o755)
    monkeypatch.setenv("LOG", str(tmp / "calls"))
    with serve("--filter=tls-fallback", "sh", str(script), options=("--tls=on", f"--tls-psk={psk}")) as srv:
        plain = probe(srv, "anything")
        assert bytes.fromhex(plain["data"]).startswith(b"This NBD server requires TLS authentication")
        calls = (tmp / "calls").read_text().split()
        assert "open" not in calls and "get_size" not in calls and "list_exports" not in calls
        assert probe(srv, "", psk)["size"] == 1 << 20
        assert "open" in (tmp / "calls").read_text().split()


def test_tls_fallback_message_is_cut_to_512_bytes(psk):
    with serve("--filter=tls-fallback", "memory", "1M", "tlsreadme=" + "x" * 600,
               options=("--tls=on", f"--tls-psk={psk}")) as srv:
        assert bytes.fromhex(probe(srv, "")["data"]) == b"x" * 512


def test_tls_fallback_refuses_serialized_connections():
    proc = start("--filter=tls-fallback", "--filter=noparallel", "memory", "1M", "serialize=connections")
    assert proc.returncode == 1 and "requires parallel connection support" in proc.stderr.decode(), proc.stderr
