"""nozero filter: advertised flags and what the plugin receives, in-process and through real clients."""

from __future__ import annotations

import errno

import pytest

from conftest import nbdinfo_json, nbdsh, serve, serve_nbdkit
from fixtures.filterchain import RECORDER, open_chain
from fixtures.nbdkitlog import nbdkit_calls, recorder_calls
from nbdformats.api.chain import FLAG_FAST_ZERO, FLAG_FUA, FLAG_MAY_TRIM, NONE
from nbdformats.api.errors import NBDError

MIB = 1 << 20


def nozero(*params: str, plugin: tuple[str, ...] = ()):
    pairs = [tuple(p.split("=", 1)) for p in params]
    chain, top = open_chain([("nozero", pairs)], plugin_params=[("size", "4M"),
                                                               *[tuple(p.split("=", 1)) for p in plugin]])
    return chain.plugin, top


def test_none_hides_zero():
    plugin, top = nozero()
    assert top.can_zero() == NONE and not top.can_fast_zero()
    with pytest.raises(NBDError) as e:
        top.zero(4096, 0, 0)
    assert e.value.errno == errno.EOPNOTSUPP
    assert plugin.calls == []


def test_emulate_writes_zeroes_in_bounded_chunks():
    plugin, top = nozero("zeromode=emulate")
    top.pwrite(memoryview(b"\xff" * (3 * MIB)), 0, 0)
    plugin.calls.clear()
    top.zero(3 * MIB - 512, 256, FLAG_MAY_TRIM)
    assert [c[0] for c in plugin.calls] == ["pwrite"] * 3
    assert all(count <= MIB for _, _, count, _ in plugin.calls)
    assert sum(count for _, _, count, _ in plugin.calls) == 3 * MIB - 512
    assert plugin.data[:256] == b"\xff" * 256 and plugin.data[3 * MIB - 256:3 * MIB] == b"\xff" * 256
    assert plugin.data[256:3 * MIB - 256] == bytes(3 * MIB - 512)


def test_emulate_fast_zero_fails_by_default_and_writes_with_ignore():
    plugin, top = nozero("zeromode=emulate")
    assert top.can_fast_zero()
    with pytest.raises(NBDError) as e:
        top.zero(4096, 0, FLAG_FAST_ZERO)
    assert e.value.errno == errno.ENOTSUP and plugin.calls == []

    plugin, top = nozero("zeromode=emulate", "fastzeromode=ignore")
    top.zero(4096, 0, FLAG_FAST_ZERO)
    assert plugin.calls == [("pwrite", 0, 4096, 0)]


@pytest.mark.parametrize("plugin_fua, expected", [
    ("native", [("pwrite", 0, MIB, FLAG_FUA), ("pwrite", MIB, MIB, FLAG_FUA)]),
    # Emulated FUA below: one flush after the last chunk covers both.
    ("emulate", [("pwrite", 0, MIB, 0), ("pwrite", MIB, MIB, 0), ("flush", 0, 0, 0)]),
])
def test_emulate_fua(plugin_fua, expected):
    plugin, top = nozero("zeromode=emulate", plugin=(f"fua={plugin_fua}",))
    top.zero(2 * MIB, 0, FLAG_FUA)
    assert plugin.calls == expected


def test_notrim_drops_may_trim_and_plugin_passes_it():
    plugin, top = nozero("zeromode=notrim")
    top.zero(8192, 4096, FLAG_MAY_TRIM | FLAG_FUA)
    assert plugin.calls == [("zero", 4096, 8192, FLAG_FUA)]
    plugin, top = nozero("zeromode=plugin")
    top.zero(8192, 4096, FLAG_MAY_TRIM)
    assert plugin.calls == [("zero", 4096, 8192, FLAG_MAY_TRIM)]


@pytest.mark.parametrize("zeromode, fastzeromode, plugin_fast, advertised", [
    ("plugin", "default", "true", True),
    ("plugin", "default", "false", False),
    ("notrim", "none", "true", False),
    ("plugin", "slow", "false", True),
    ("emulate", "none", "true", False),
])
def test_fast_zero_advertised(zeromode, fastzeromode, plugin_fast, advertised):
    _, top = nozero(f"zeromode={zeromode}", f"fastzeromode={fastzeromode}", plugin=(f"fast-zero={plugin_fast}",))
    assert top.can_fast_zero() is advertised


def test_slow_refuses_fast_zero_without_calling_plugin():
    plugin, top = nozero("zeromode=plugin", "fastzeromode=slow")
    with pytest.raises(NBDError) as e:
        top.zero(4096, 0, FLAG_FAST_ZERO)
    assert e.value.errno == errno.ENOTSUP and plugin.calls == []
    top.zero(4096, 0, 0)
    assert plugin.calls == [("zero", 0, 4096, 0)]


def test_plugin_mode_needs_plugin_zero():
    with pytest.raises(NBDError, match="requires the plugin to support zeroing"):
        nozero("zeromode=notrim", plugin=("zero=none",))
    # Read-only connections do not zero, so the check does not apply.
    open_chain([("nozero", [("zeromode", "plugin")])], RECORDER, [("zero", "none")], readonly=True)


# Interop: the same client against nbdkit (memory + log filter below nozero) and against us.
MODES = [
    ("zeromode=none",),
    ("zeromode=emulate",),
    ("zeromode=notrim",),
    ("zeromode=plugin",),
    ("zeromode=plugin", "fastzeromode=none"),
    ("zeromode=plugin", "fastzeromode=slow"),
    ("zeromode=emulate", "fastzeromode=ignore"),
    ("zeromode=notrim", "fastzeromode=ignore"),
]

CLIENT = """
print(h.can_zero(), h.can_fast_zero())
if h.can_zero():
    h.zero(8192, 4096)
    h.zero(4096, 65536, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
    if h.can_fast_zero():
        try:
            h.zero(4096, 131072, nbd.CMD_FLAG_FAST_ZERO)
            print("fast zero done")
        except nbd.Error as e:
            print("fast zero failed", e.errnum == errno.ENOTSUP)
h.shutdown()
"""


@pytest.mark.parametrize("mode", MODES, ids=["-".join(m) for m in MODES])
def test_flags_and_plugin_calls_match_nbdkit(tmp, mode):
    reference, ours = tmp / "nbdkit.log", tmp / "ours.log"
    with serve_nbdkit("--filter=nozero", "--filter=log", "memory", "1M", f"logfile={reference}", *mode) as ref:
        ref_info = nbdinfo_json(ref.uri)["exports"][0]
        ref_out = nbdsh(ref.uri, CLIENT).stdout
    with serve("--filter=nozero", RECORDER, "size=1M", f"log={ours}", *mode) as srv:
        info = nbdinfo_json(srv.uri)["exports"][0]
        out = nbdsh(srv.uri, CLIENT).stdout
        # Read now: stopping the server flushes the connections of clients still connected.
        calls = recorder_calls(ours)
    assert (info["can_zero"], info["can_fast_zero"]) == (ref_info["can_zero"], ref_info["can_fast_zero"])
    ref_calls = nbdkit_calls(reference)
    if mode == ("zeromode=emulate", "fastzeromode=ignore"):
        # nbdkit 1.32 fails the fast zero with ENOTSUP although its manual says "ignore" makes
        # fast zero requests "behave as if the fast zero flag had not been included": we
        # follow the manual and write the zeroes.
        assert ref_out.endswith(b"fast zero failed True\n") and out.endswith(b"fast zero done\n")
        assert calls == ref_calls + [("pwrite", 131072, 4096, "-")]
        return
    assert out == ref_out
    assert calls == ref_calls
