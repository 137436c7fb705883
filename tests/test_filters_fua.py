"""fua filter: advertised flags and what the plugin receives, in-process and through real clients."""

from __future__ import annotations

import pytest

from conftest import nbdinfo_json, nbdsh, serve, serve_nbdkit
from fixtures.filterchain import RECORDER, open_chain
from fixtures.nbdkitlog import nbdkit_calls, recorder_calls
from nbdformats.api.chain import EMULATE, FLAG_FUA, NATIVE, NONE
from nbdformats.api.errors import ConfigError, NBDError


def fua(mode: str, *plugin: str):
    chain, top = open_chain([("fua", [("fuamode", mode)])],
                            plugin_params=[("size", "1M"), *[tuple(p.split("=", 1)) for p in plugin]])
    return chain.plugin, top


def write_trim_zero_flush(top) -> None:
    top.pwrite(memoryview(b"x" * 512), 0, FLAG_FUA)
    top.pwrite(memoryview(b"y" * 512), 512, 0)
    top.trim(512, 1024, FLAG_FUA)
    top.zero(512, 2048, FLAG_FUA)
    top.flush(0)


# What the plugin (native FUA) receives for write+FUA, write, trim+FUA, zero+FUA, flush.
CALLS = {
    "pass": [("pwrite", 0, 512, FLAG_FUA), ("pwrite", 512, 512, 0), ("trim", 1024, 512, FLAG_FUA),
             ("zero", 2048, 512, FLAG_FUA), ("flush", 0, 0, 0)],
    "native": [("pwrite", 0, 512, FLAG_FUA), ("pwrite", 512, 512, 0), ("trim", 1024, 512, FLAG_FUA),
               ("zero", 2048, 512, FLAG_FUA), ("flush", 0, 0, 0)],
    "emulate": [("pwrite", 0, 512, 0), ("flush", 0, 0, 0), ("pwrite", 512, 512, 0), ("trim", 1024, 512, 0),
                ("flush", 0, 0, 0), ("zero", 2048, 512, 0), ("flush", 0, 0, 0), ("flush", 0, 0, 0)],
    "force": [("pwrite", 0, 512, FLAG_FUA), ("pwrite", 512, 512, FLAG_FUA), ("trim", 1024, 512, FLAG_FUA),
              ("zero", 2048, 512, FLAG_FUA)],
    "discard": [("pwrite", 0, 512, 0), ("pwrite", 512, 512, 0), ("trim", 1024, 512, 0), ("zero", 2048, 512, 0)],
}


@pytest.mark.parametrize("mode", sorted(CALLS))
def test_calls_reaching_plugin(mode):
    plugin, top = fua(mode)
    write_trim_zero_flush(top)
    assert plugin.calls == CALLS[mode]
    assert plugin.data[:1024] == b"x" * 512 + b"y" * 512


@pytest.mark.parametrize("mode, plugin_fua, plugin_flush, can_fua, can_flush", [
    ("none", "native", "true", NONE, True),
    ("emulate", "native", "true", EMULATE, True),
    ("native", "emulate", "true", NATIVE, True),
    ("force", "native", "false", NATIVE, True),
    ("discard", "none", "false", NATIVE, True),
    ("pass", "emulate", "true", EMULATE, True),
    ("pass", "none", "false", NONE, False),
])
def test_advertised(mode, plugin_fua, plugin_flush, can_fua, can_flush):
    _, top = fua(mode, f"fua={plugin_fua}", f"flush={plugin_flush}")
    assert top.can_fua() == can_fua and top.can_flush() is can_flush


def test_none_mode_is_accepted_and_default():
    # nbdkit 1.32 rejects fuamode=none although it documents it as the default.
    _, top = fua("none")
    assert top.can_fua() == NONE
    chain, top = open_chain([("fua", [])], plugin_params=[("size", "1M")])
    assert chain.filters[0].fuamode == "none" and top.can_fua() == NONE


def test_emulate_refuses_to_start_without_flush():
    with pytest.raises(ConfigError, match="fuamode=emulate requires the plugin to support flush"):
        fua("emulate", "flush=false", "fua=none")
    with pytest.raises(ConfigError, match="fuamode=force requires"):
        fua("force", "flush=false", "fua=none")


def test_connection_refused_when_plugin_lacks_what_the_mode_needs():
    # fuamode=pass skips the start-up check; switch the mode afterwards to reach the check
    # every read-write connection makes (for plugins that cannot be opened at start-up).
    chain, _ = open_chain([("fua", [("fuamode", "pass")])], plugin_params=[("flush", "false"), ("fua", "none")])
    chain.filters[0].fuamode = "emulate"
    with pytest.raises(NBDError, match="requires the plugin to support flush"):
        chain.open(readonly=False, export_name="")
    assert chain.open(readonly=True, export_name="").can_fua() == NONE


# Plugin shapes, as nbdkit's eval plugin and as our recorder.
SHAPES = {
    "no-flush": ("can_flush=exit 3", "can_fua=echo none"),
    "flush-only": ("can_flush=exit 0", "can_fua=echo emulate"),
    "native": ("can_flush=exit 0", "can_fua=echo native"),
}
RECORDER_SHAPES = {"no-flush": ("flush=false", "fua=none"), "flush-only": ("flush=true", "fua=emulate"),
                   "native": ("flush=true", "fua=native")}
FLAGS = ("can_fua", "can_flush", "is_read_only")


def flags_of(uri: str) -> dict:
    info = nbdinfo_json(uri)["exports"][0]
    return {k: info[k] for k in FLAGS}


def refused(start, *args) -> bool:
    """Whether the server refuses to start or to open the export."""
    try:
        with start(*args) as srv:
            result = nbdsh(srv.uri, "print(h.get_size())", timeout=30, check=False)
            return result.returncode != 0
    except AssertionError:  # the server exited at start-up
        return True


@pytest.mark.parametrize("mode", ["emulate", "native", "force", "pass", "discard"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_flags_and_refusals_match_nbdkit(mode, shape):
    nbdkit_args = ("--filter=fua", "eval", "get_size=echo 1M", "pread=exit 1", "pwrite=exit 1", *SHAPES[shape],
                   f"fuamode={mode}")
    ours = ("--filter=fua", RECORDER, *RECORDER_SHAPES[shape], f"fuamode={mode}")
    nbdkit_refuses = refused(serve_nbdkit, *nbdkit_args)
    assert refused(serve, *ours) == nbdkit_refuses
    if not nbdkit_refuses:
        with serve_nbdkit(*nbdkit_args) as ref, serve(*ours) as srv:
            assert flags_of(srv.uri) == flags_of(ref.uri)


def test_none_mode_flags(tmp):
    with serve("--filter=fua", RECORDER, "fuamode=none") as srv:
        assert flags_of(srv.uri) == {"can_fua": False, "can_flush": True, "is_read_only": False}


CLIENT = """
fua = nbd.CMD_FLAG_FUA if h.can_fua() else 0
h.pwrite(b"x" * 512, 0, fua)
h.pwrite(b"y" * 512, 512)
h.trim(512, 1024, fua)
h.zero(512, 2048, fua | nbd.CMD_FLAG_NO_HOLE)
h.zero(4096, 8192)
if h.can_flush():
    h.flush()
assert h.pread(1024, 0) == b"x" * 512 + b"y" * 512
h.shutdown()
"""


@pytest.mark.parametrize("mode", ["emulate", "native", "force", "pass", "discard"])
def test_plugin_receives_what_nbdkit_plugin_receives(tmp, mode):
    reference, ours = tmp / "nbdkit.log", tmp / "ours.log"
    with serve_nbdkit("--filter=fua", "--filter=log", "memory", "1M", f"logfile={reference}",
                      f"fuamode={mode}") as ref:
        nbdsh(ref.uri, CLIENT)
    with serve("--filter=fua", RECORDER, "size=1M", f"log={ours}", f"fuamode={mode}") as srv:
        nbdsh(srv.uri, CLIENT)
        # Read now: stopping the server flushes the connections of clients still connected.
        calls = [c for c in recorder_calls(ours) if c[0] != "pread"]
    expected = [c for c in nbdkit_calls(reference) if c[0] != "pread"]
    assert expected  # the client's writes were seen
    assert calls == expected
