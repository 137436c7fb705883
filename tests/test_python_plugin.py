"""python plugin: nbdkit Python plugin scripts run unchanged.

Unit tests drive the plugin through the chain; interop tests run the same scripts under
`nbdkit python` and `nbdformats python` and compare what real clients (nbdinfo, nbdcopy,
libnbd) see.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import textwrap
import threading
from pathlib import Path

import pytest

from nbdformats import nbdkit_compat
from nbdformats.api.chain import (EMULATE, FLAG_FAST_ZERO, FLAG_FUA, FLAG_MAY_TRIM, NATIVE, Chain, Extents,
                                  ThreadModel)
from nbdformats.api.errors import ConfigError, NBDError
from nbdformats.registry import load_plugin

from conftest import (nbdinfo_json, nbdsh, random_file, run, serve, serve_nbdkit, sha256_file)

SCRIPTS = Path(__file__).parent / "fixtures" / "python_plugins"


def configure(script: Path | str, *pairs: tuple[str, str]) -> Chain:
    chain = Chain([], load_plugin("python")())
    chain.configure({0: [("script", str(script)), *pairs]})
    chain.get_ready()
    return chain


def open_script(script: Path | str, *pairs: tuple[str, str], readonly: bool = False, export: str = ""):
    chain = configure(script, *pairs)
    return chain.open(readonly=readonly, export_name=export)


def write_script(tmp: Path, *parts: str) -> Path:
    path = tmp / "plugin.py"
    path.write_text("\n".join(textwrap.dedent(part) for part in parts))
    return path


MINIMAL = """
    API_VERSION = 2
    def open(readonly): return {}
    def get_size(h): return 4096
    def pread(h, buf, offset, flags): buf[:] = bytes(len(buf))
"""


def read(layer, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    layer.pread(memoryview(buf), offset, 0)
    return bytes(buf)


# -- configuration ---------------------------------------------------------------------------

def test_parameters_reach_the_script_config_in_order(tmp):
    script = write_script(tmp, MINIMAL, """
    seen = []
    def config(key, value): seen.append((key, value))
    def config_complete(): seen.append("complete")
    def get_ready(): seen.append("ready")
    """)
    chain = configure(script, ("b", "2"), ("a", "1"), ("b", "3"))
    assert chain.plugin.module.seen == [("b", "2"), ("a", "1"), ("b", "3"), "complete", "ready"]


def test_script_config_errors_stop_the_server_with_the_script_line(tmp):
    expected = r"ramdisk.py: config: ramdisk.py:\d+: RuntimeError: unknown parameter: bogus"
    with pytest.raises(ConfigError, match=expected):
        configure(SCRIPTS / "ramdisk.py", ("bogus", "1"))
    with pytest.raises(ConfigError, match="config_complete: .*file parameter is required"):
        configure(SCRIPTS / "file.py")


def test_parameters_without_a_config_callback_are_refused(tmp):
    script = write_script(tmp, MINIMAL)
    with pytest.raises(ConfigError, match="does not need command line configuration"):
        configure(script, ("size", "1M"))


def test_missing_required_callback_and_bad_api_version(tmp):
    with pytest.raises(ConfigError, match=r"required callbacks.*missing: pread"):
        configure(write_script(tmp, "def open(r): return 1\ndef get_size(h): return 0\n"))
    with pytest.raises(ConfigError, match="API_VERSION requested unknown version: 3"):
        configure(write_script(tmp, MINIMAL, "API_VERSION = 3\n"))


def test_script_that_fails_to_load(tmp):
    with pytest.raises(ConfigError, match=r"error running this script: plugin.py:2: ZeroDivisionError"):
        configure(write_script(tmp, "x = 1\ny = 1 / 0\n"))
    with pytest.raises(ConfigError, match="error running this script: SyntaxError"):
        configure(write_script(tmp, "def open(:\n"))
    with pytest.raises(ConfigError, match="no such file"):
        configure(tmp / "missing.py")


def test_script_sees_itself_as_main_and_imports_sibling_modules(tmp):
    (tmp / "helper_for_nbdf_test.py").write_text("SIZE = 8192\n")
    script = write_script(tmp, MINIMAL, """
    import helper_for_nbdf_test
    NAME = __name__
    def get_size(h): return helper_for_nbdf_test.SIZE
    """)
    chain = configure(script)
    assert chain.plugin.module.NAME == "__main__"
    assert chain.open(False, "").get_size() == 8192


def test_thread_model_comes_from_the_script():
    ramdisk = configure(SCRIPTS / "ramdisk.py")
    assert ramdisk.thread_model == ThreadModel.SERIALIZE_ALL_REQUESTS  # nbdkit's default for scripts
    image = SCRIPTS / "file.py"  # any existing file will do
    parallel = configure(SCRIPTS / "file.py", ("file", str(image)))
    assert parallel.thread_model == ThreadModel.PARALLEL


def test_bad_thread_model(tmp):
    with pytest.raises(ConfigError, match="thread_model returned 7"):
        configure(write_script(tmp, MINIMAL, "def thread_model(): return 7\n"))


# -- data path -------------------------------------------------------------------------------

def test_ramdisk_reads_writes_trims_and_zeroes():
    layer = open_script(SCRIPTS / "ramdisk.py", ("size", "256K"))
    assert layer.get_size() == 256 * 1024
    assert (layer.can_write(), layer.can_flush(), layer.can_trim(), layer.can_multi_conn()) == (True,) * 4
    assert layer.can_zero() == NATIVE and layer.can_fua() == EMULATE and not layer.can_fast_zero()
    data = os.urandom(65536)
    layer.pwrite(memoryview(data), 4096, FLAG_FUA)
    assert read(layer, 4096, 65536) == data
    layer.trim(100, 4096, 0)
    assert read(layer, 4096, 200) == bytes(100) + data[100:200]
    # With MAY_TRIM the script zeroes; without it the script sets EOPNOTSUPP and the plugin
    # writes zeroes with pwrite, as nbdkit does.  A fast zero is refused instead.
    layer.zero(1000, 8192, FLAG_MAY_TRIM)
    layer.zero(1000, 16384, 0)
    expected = bytearray(data)
    expected[0:100] = bytes(100)
    expected[4096:5096] = bytes(1000)
    expected[12288:13288] = bytes(1000)
    with pytest.raises(NBDError) as info:
        layer.zero(1000, 32768, FLAG_FAST_ZERO)
    assert info.value.errno == errno.ENOTSUP
    assert read(layer, 4096, 65536) == bytes(expected)
    layer.flush(0)


def test_readonly_connection():
    layer = open_script(SCRIPTS / "ramdisk.py", readonly=True)
    assert not layer.can_write() and not layer.can_trim()


def test_api_version_1_script():
    layer = open_script(SCRIPTS / "api_v1.py", ("size", "128K"))
    module = layer.handle.callbacks["zero"].__globals__
    data = os.urandom(8192)
    layer.pwrite(memoryview(data), 1000, 0)
    assert read(layer, 1000, 8192) == data
    layer.zero(100, 1000, FLAG_MAY_TRIM)
    layer.zero(100, 2000, 0)
    assert module["zero_calls"] == [(100, 1000, True), (100, 2000, False)]
    assert read(layer, 1000, 1100) == bytes(100) + data[100:1000] + bytes(100)
    layer.trim(8192, 1000, 0)
    layer.flush(0)
    assert read(layer, 0, 16384) == bytes(16384)


def test_api_version_1_short_pread_is_an_error(tmp):
    script = write_script(tmp, """
    def open(readonly): return 1
    def get_size(h): return 4096
    def pread(h, count, offset): return b"short"
    """)
    with pytest.raises(NBDError, match="buffer returned from pread is too small") as info:
        read(open_script(script), 0, 512)
    assert info.value.errno == errno.EIO


def test_errors_carry_set_error_errno_else_eio(tmp):
    image = random_file(tmp / "disk.img", 65536)
    layer = open_script(SCRIPTS / "error.py", ("file", str(image)), ("errno", "ENOSPC"))
    outcomes = []
    for i in range(4):
        try:
            read(layer, i * 512, 512)
            outcomes.append("ok")
        except NBDError as e:
            outcomes.append(errno.errorcode[e.errno])
            assert "error.py: pread: error.py:" in str(e) and "RuntimeError: pread error offset=" in str(e)
    assert outcomes == ["ENOSPC", "ok", "ENOSPC", "ok"]
    with pytest.raises(NBDError):
        read(layer, 0, 512)
    assert read(layer, 512, 512) == image.read_bytes()[512:1024]  # even calls read the file
    plain = open_script(SCRIPTS / "error.py", ("file", str(image)))
    with pytest.raises(NBDError) as info:
        read(plain, 0, 512)
    assert info.value.errno == errno.EIO


def test_stale_set_error_does_not_leak_into_the_next_request(tmp):
    script = write_script(tmp, MINIMAL, """
    import errno, nbdkit
    calls = 0
    def pread(h, buf, offset, flags):
        global calls
        calls += 1
        if calls == 1:
            nbdkit.set_error(errno.ENOSPC)  # recorded, but the call succeeds
        else:
            raise RuntimeError("plain failure")
    """)
    layer = open_script(script)
    read(layer, 0, 512)
    with pytest.raises(NBDError) as info:
        read(layer, 0, 512)
    assert info.value.errno == errno.EIO


def test_sys_exit_in_a_callback_fails_only_that_request(tmp):
    script = write_script(tmp, MINIMAL, "import sys\ndef flush(h, flags): sys.exit(3)\n")
    layer = open_script(script)
    with pytest.raises(NBDError, match="SystemExit: 3"):
        layer.flush(0)


def test_extents_from_the_script(tmp):
    layer = open_script(SCRIPTS / "zero.py", ("size", "1M"))
    assert layer.can_extents()
    extents = Extents(4096, 1 << 20)
    layer.extents((1 << 20) - 4096, 4096, 0, extents)
    assert list(extents) == [(4096, (1 << 20) - 4096, 3)]
    bad = write_script(tmp, MINIMAL, """
    results = {0: [], 1: [[0, 10, 0]], 2: [(0, 100, 0), (200, 100, 0)]}
    def extents(h, count, offset, flags): return results[offset]
    """)
    layer = open_script(bad)
    problems = {0: "cannot return an empty list", 1: "iterable of 3-tuples", 2: "contiguous"}
    for offset, message in problems.items():
        with pytest.raises(NBDError, match=message):
            layer.extents(4096 - offset, offset, 0, Extents(offset, 4096))


def test_capabilities_from_can_callbacks(tmp):
    script = write_script(tmp, MINIMAL, """
    import nbdkit
    def pwrite(h, buf, offset, flags): pass
    def can_write(h): return True
    def can_flush(h): return False
    def can_trim(h): return True
    def trim(h, count, offset, flags): pass
    def can_zero(h): return False
    def can_fua(h): return nbdkit.FUA_NATIVE
    def can_cache(h): return nbdkit.CACHE_EMULATE
    def can_multi_conn(h): return True
    def is_rotational(h): return True
    def block_size(h): return (512, 4096, 1048576)
    """)
    layer = open_script(script)
    assert layer.can_write() and not layer.can_flush() and layer.can_trim()
    assert layer.can_zero() == EMULATE and layer.can_fast_zero()  # zeroes written by the core
    assert layer.can_fua() == NATIVE and layer.can_cache() == EMULATE
    assert layer.can_multi_conn() and layer.is_rotational()
    assert layer.block_size() == (512, 4096, 1048576)
    assert not layer.can_extents()


def test_bad_block_size_is_refused(tmp):
    script = write_script(tmp, MINIMAL, "def block_size(h): return (3, 4096, 65536)\n")
    with pytest.raises(NBDError, match="minimum must be a power of 2"):
        open_script(script)


def test_exports_and_export_name():
    chain = configure(SCRIPTS / "zero.py", ("size", "3M"))
    exports = chain.list_exports(readonly=True, is_tls=False)
    assert [(e.name, e.description) for e in exports] == [
        ("default", "size= bytes of zeroes"), ("1M", "one mebibyte"), ("64K", "")]
    assert chain.default_export(True, False) == "default"
    assert chain.open(True, "default").get_size() == 3 << 20
    assert chain.open(True, "64K").get_size() == 65536
    with pytest.raises(NBDError, match="open: .*Unable to parse string as size"):
        chain.open(True, "not-a-size")


def test_export_name_is_per_connection_across_worker_threads(tmp):
    script = write_script(tmp, MINIMAL, """
    import time, nbdkit
    def thread_model(): return nbdkit.THREAD_MODEL_PARALLEL
    def list_exports(readonly, is_tls):
        try:
            return [nbdkit.export_name()]
        except RuntimeError:
            return ["no connection here"]
    def pread(h, buf, offset, flags):
        time.sleep(0.0005)  # let the other thread start a call in between
        buf[:] = nbdkit.export_name().encode().ljust(len(buf), b".")
    """)
    chain = configure(script)
    layers = {name: chain.open(True, name) for name in ("alpha", "beta")}
    read(layers["alpha"], 0, 16)  # leaves this thread's state on a connection
    assert [e.name for e in chain.list_exports(True, False)] == ["no connection here"]
    seen: dict[str, set[bytes]] = {}

    def reader(name: str) -> None:
        seen[name] = {read(layers[name], 0, 16).rstrip(b".") for _ in range(100)}

    threads = [threading.Thread(target=reader, args=(name,)) for name in layers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert seen == {"alpha": {b"alpha"}, "beta": {b"beta"}}


def test_debug_messages_go_to_the_log(caplog):
    with caplog.at_level(logging.DEBUG, logger="nbdformats.python"):
        open_script(SCRIPTS / "ramdisk.py")
    assert "open: readonly=0" in caplog.text


def test_disconnect_fails_later_requests_with_eshutdown(tmp):
    script = write_script(tmp, MINIMAL, """
    import nbdkit
    def flush(h, flags): nbdkit.disconnect(False)
    """)
    layer = open_script(script)
    read(layer, 0, 512)
    layer.flush(0)  # the request that asked completes
    with pytest.raises(NBDError) as info:
        read(layer, 0, 512)
    assert info.value.errno == errno.ESHUTDOWN


def test_close_and_cleanup_are_called(tmp):
    script = write_script(tmp, MINIMAL, """
    events = []
    def close(h): events.append("close")
    def cleanup(): events.append("cleanup")
    """)
    chain = configure(script)
    chain.open(False, "").close()
    chain.cleanup()
    assert chain.plugin.module.events == ["close", "cleanup"]


# -- the nbdkit module -----------------------------------------------------------------------

def test_nbdkit_module_parsers():
    assert nbdkit_compat.parse_size("511") == 511
    assert nbdkit_compat.parse_size("7k") == 7 * 1024
    assert nbdkit_compat.parse_size("17M") == 17 << 20
    with pytest.raises(TypeError):
        nbdkit_compat.parse_size(17)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        nbdkit_compat.parse_size("foo")
    assert nbdkit_compat.parse_bool("Yes") is True and nbdkit_compat.parse_bool("off") is False
    with pytest.raises(ValueError):
        nbdkit_compat.parse_bool("maybe")
    for text in ("0.1", "1e-1", "10%", "1:10", "1/10"):
        assert nbdkit_compat.parse_probability("p", text) == pytest.approx(0.1)
    assert nbdkit_compat.parse_probability("p", "200%") == 2.0
    for text in ("-1", "1/0", "x", "inf"):
        with pytest.raises(ValueError, match="^p: "):
            nbdkit_compat.parse_probability("p", text)


def test_nbdkit_module_read_password(tmp):
    (tmp / "pw").write_text("s3cret\n")
    assert nbdkit_compat.read_password(f"+{tmp / 'pw'}") == "s3cret"
    assert nbdkit_compat.read_password("literal") == "literal"
    with pytest.raises(ValueError) as info:
        nbdkit_compat.read_password(f"+{tmp / 'missing'}")
    assert "missing" in str(info.value)


def test_nbdkit_module_outside_a_connection():
    nbdkit_compat.call_state.connection = None
    with pytest.raises(RuntimeError, match="export_name failed"):
        nbdkit_compat.export_name()


def test_nbdkit_module_constants_match_nbdkit():
    dump = run(["nbdkit", "python", SCRIPTS / "constants.py", "--dump-plugin"], timeout=30).stdout.decode()
    theirs = dict(line.removeprefix("constant ").split("=") for line in dump.splitlines()
                  if line.startswith("constant "))
    assert len(theirs) >= 16
    assert {name: str(getattr(nbdkit_compat, name)) for name in theirs} == theirs
    # Newer nbdkit also has ZERO_* (NBDKIT_ZERO_NONE/EMULATE/NATIVE).
    assert (nbdkit_compat.ZERO_NONE, nbdkit_compat.ZERO_EMULATE, nbdkit_compat.ZERO_NATIVE) == (0, 1, 2)


# -- interop: the same scripts under nbdkit and nbdformats -------------------------------------

SERVERS = {"nbdkit": serve_nbdkit, "nbdformats": serve}
CAPABILITIES = ("export-size", "is_rotational", "is_read_only", "can_cache", "can_fast_zero", "can_flush",
                "can_fua", "can_multi_conn", "can_trim", "can_zero")


def capabilities(uri: str) -> dict:
    export = nbdinfo_json(uri)["exports"][0]
    return {key: export.get(key) for key in CAPABILITIES}


@pytest.mark.parametrize("script", ["ramdisk.py", "api_v1.py"])
def test_ramdisk_scripts_under_both_servers(tmp, script):
    data = random_file(tmp / "data", 2 << 20, seed=12)
    results = {}
    for name, start in SERVERS.items():
        with start("python", str(SCRIPTS / script), "size=2M") as srv:
            caps = capabilities(srv.uri)
            run(["nbdcopy", data, srv.uri], timeout=60)
            run(["nbdcopy", srv.uri, tmp / f"{name}.out"], timeout=60)
            # NO_HOLE: ramdisk.py's zero() sets EOPNOTSUPP and the server writes zeroes instead.
            zeroed = nbdsh(srv.uri, "h.zero(65536, 4096)\nh.zero(4096, 200000, nbd.CMD_FLAG_NO_HOLE)\n"
                           "print(h.pread(65536, 4096) + h.pread(4096, 200000) == bytes(69632))",
                           timeout=30).stdout.decode().strip()
        results[name] = (caps, sha256_file(tmp / f"{name}.out"), zeroed)
    assert results["nbdformats"] == results["nbdkit"]
    assert results["nbdkit"][1] == sha256_file(data)
    assert results["nbdkit"][2] == "True"


def test_file_script_under_both_servers(tmp):
    """file.py asks for THREAD_MODEL_PARALLEL: nbdformats calls it from worker threads."""
    image = random_file(tmp / "disk.img", 3 << 20, seed=3)
    expected = sha256_file(image)
    patch = os.urandom(8192)
    for name, start in SERVERS.items():
        copy = tmp / f"{name}.img"
        copy.write_bytes(image.read_bytes())
        with start("python", str(SCRIPTS / "file.py"), f"file={copy}") as srv:
            assert capabilities(srv.uri)["can_fua"] is True
            run(["nbdcopy", "--connections=2", srv.uri, tmp / f"{name}.out"], timeout=60)
            assert sha256_file(tmp / f"{name}.out") == expected, name
            nbdsh(srv.uri, f"h.pwrite({patch!r}, 1 << 20, nbd.CMD_FLAG_FUA)\nh.flush()", timeout=30)
        assert copy.read_bytes()[1 << 20:(1 << 20) + 8192] == patch, name


def test_zero_script_exports_under_both_servers():
    results = {}
    for name, start in SERVERS.items():
        with start("python", str(SCRIPTS / "zero.py"), "size=3M") as srv:
            listing = json.loads(run(["nbdinfo", "--list", "--json", srv.uri], timeout=30).stdout)
            exports = sorted((e["export-name"], e.get("description", ""), e["export-size"])
                             for e in listing["exports"])
            default_size = nbdinfo_json(srv.uri_for(""))["exports"][0]["export-size"]
            content = nbdsh(srv.uri_for("64K"), "print(h.pread(65536, 0) == bytes(65536))",
                            timeout=30).stdout.decode().strip()
            holes = run(["nbdinfo", "--map", srv.uri_for("1M")], timeout=30).stdout.decode().split()
        results[name] = (exports, default_size, content, holes)
    assert results["nbdformats"] == results["nbdkit"]
    exports, default_size, content, holes = results["nbdkit"]
    assert exports == [("1M", "one mebibyte", 1 << 20), ("64K", "", 65536),
                       ("default", "size= bytes of zeroes", 3 << 20)]
    assert default_size == 3 << 20 and content == "True"
    assert holes[:3] == ["0", "1048576", "3"]  # one hole,zero extent


ERROR_SEQUENCE = """
outcomes = []
for i in range(6):
    try:
        h.pread(4096, i * 4096)
        outcomes.append("ok")
    except nbd.Error as e:
        outcomes.append(errno.errorcode.get(e.errno, str(e.errno)))
print(" ".join(outcomes))
"""


@pytest.mark.parametrize("extra", [(), ("errno=ENOSPC",)])
def test_error_script_under_both_servers(tmp, extra):
    image = random_file(tmp / "disk.img", 1 << 20)
    results = {}
    for name, start in SERVERS.items():
        with start("python", str(SCRIPTS / "error.py"), f"file={image}", *extra) as srv:
            results[name] = nbdsh(srv.uri, ERROR_SEQUENCE, timeout=30).stdout.decode().split()
    assert results["nbdformats"] == results["nbdkit"]
    err = "ENOSPC" if extra else "EIO"
    assert results["nbdkit"] == [err, "ok"] * 3


def test_shutdown_from_a_script_stops_both_servers():
    for name, start in SERVERS.items():
        with start("python", str(SCRIPTS / "shutdown.py")) as srv:
            # open() asks for the shutdown; the client has finished the handshake by then.
            out = nbdsh(srv.uri, "print(h.get_size())", timeout=30).stdout.decode()
            assert out.strip() == "1048576", name
            assert srv.proc.wait(timeout=20) == 0, (name, srv.stderr())


SLOW_PARALLEL_SCRIPT = '''
import threading, time
import nbdkit
API_VERSION = 2
lock = threading.Lock()
running = most = 0

def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL

def open(readonly):
    return 1

def get_size(h):
    return 1 << 20

def pread(h, buf, offset, flags):
    global running, most
    with lock:
        running += 1
        most = max(most, running)
    time.sleep(0.008)  # a round trip to a server on the LAN, say
    with lock:
        running -= 1
    buf[:4] = most.to_bytes(4, "little")  # the client learns how many ran at once
'''


def test_parallel_script_with_millisecond_waits_gets_more_threads(tmp):
    """A parallel script whose callbacks wait a few milliseconds (network) gets more threads
    while its client keeps requests queued: sixty-four 8 ms reads sent at once do not run
    one at a time."""
    from nbdformats.protocol import wire as P
    from nbdformats.client import NBDClient
    script = tmp / "slow.py"
    script.write_text(SLOW_PARALLEL_SCRIPT)
    with serve("python", str(script)) as srv:
        with NBDClient.connect(srv.uri) as client:
            reads = [client.submit(P.CMD_READ, i * 4096, 4096) for i in range(64)]
            most = max(int.from_bytes(read.result().buf[:4], "little") for read in reads)
    assert most >= 2, "the script's reads ran one at a time"
