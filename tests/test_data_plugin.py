"""The data plugin against nbdkit 1.32's: the same bytes, holes and errors for the same expressions,
served to real clients; and the limits nbdkit does not have (memory, endless scripts, deep nesting)."""

from __future__ import annotations

import json
import os

import pytest

from conftest import NBDFORMATS, nbdinfo_json, nbdsh, run, serve, serve_nbdkit, served_sha
from nbdformats.api.errors import ConfigError
from nbdformats.plugins.data.expression import Parser, describe, optimize
from nbdformats.plugins.data.image import evaluate

READ_ALL = "import hashlib; s = h.get_size(); print(s, hashlib.sha256(h.pread(s, 0) if s else b'').hexdigest())"


def disk_map(uri: str) -> list:
    return json.loads(run(["nbdinfo", "--map", "--json", uri]).stdout)


def content(expression: str, variables: dict[str, str] | None = None) -> bytes:
    """In process: the bytes an expression makes (no server)."""
    tree = optimize(Parser(lambda name: (variables or {}).get(name)).parse(expression))
    image = evaluate(tree)
    return image.rendered if image.size else b""


EXPRESSIONS = [
    ("0 1 2 3 @0x1fe 0x55 0xaa",),
    ("0 1 2 3 @^0x200 @-2 le16:0xaa55",),
    (" ( 0x55 0xAA )*2048 ",),
    (' ( "Hello" )*2000 ', "size=8192"),
    ("@0x1be 0 0 2 0 0x83 0x20 0x20 0 le32:1 le32:0x7ff @0x1fe 0x55 0xaa", "size=1M"),
    ("@32768 1 @65536 1 @131072 0 @163840 0", "size=1M"),
    ("( 0x55 0xAA ) -> \\boot-signature ( @0x1fe \\boot-signature ) -> \\sector \\sector \\sector",),
    ("data=<( i=0; while :; do printf '%04d' $i; i=$((i+1)); done )[:32768]",),
    ("$pattern*16", "pattern=0x55 0xAA"),
    ("( @4 ( 0x21 )*4 )*4 ( \"Hello\" @^8 )*2 1 (@2 2) (@3 3)",),
    ("@32766 1*5 @65534 2*5 @32768 0*32768",),
    ("1*1000 @100 0*100", "allocator=zstd"),
    ("\"\\x00foo\\x00\" le64:0xffffffffffffffff be32:1 \"\\\"\\\\\\t\"", "allocator=malloc"),
    ("( 1 2 3 @32767 )*100 ( 0*40000 )*3 ( @65536 )*2 9", "size=2M"),
    ("\"Hello\"[3:] \"Hello\"[:4] ( 1 2 3 4 5 )[1:3] (@100 7)[99:]",),
    ("", "size=1M"),
    ("",),
]


@pytest.mark.parametrize("args", EXPRESSIONS, ids=lambda a: " ".join(a)[:60])
def test_same_bytes_and_holes_as_nbdkit(tmp, args):
    # ("data=..." where the expression holds "=": nbdkit reads KEY=VALUE only when KEY is a valid key)
    with serve_nbdkit("data", *args) as ref, serve("data", *args) as ours:
        assert nbdsh(ours.uri, READ_ALL).stdout == nbdsh(ref.uri, READ_ALL).stdout
        if nbdinfo_json(ref.uri)["exports"][0]["export-size"]:
            assert disk_map(ours.uri) == disk_map(ref.uri)


def test_named_expression_over_32_bits_repeated_like_nbdkit():
    args = ("data", "( 0x55 0xAA @0x200000000 @-2 0x55 0xAA ) -> \\1 \\1 * 4")
    script = "print(h.get_size(), [h.pread(4, o) for o in (0, 0x1fffffffe, 0x5fffffffe, 0x7fffffffc)])"
    with serve_nbdkit(*args) as ref, serve(*args) as ours:
        assert nbdsh(ours.uri, script).stdout == nbdsh(ref.uri, script).stdout
        assert disk_map(ours.uri) == disk_map(ref.uri)


def test_files_and_base64_and_raw_match_nbdkit(tmp):
    (tmp / "one").write_bytes(b"1")
    (tmp / "two").write_bytes(b"2" + bytes(1023))
    (tmp / "three").write_bytes(os.urandom(70000))
    cases = [(f"<{tmp}/one @^512 <{tmp}/two @^512 <{tmp}/three[100:40000] @^512 <{tmp}/three[:3]",),
             (f"( <{tmp}/three )*3 <{tmp}/one[5:9]",),
             ("base64=aGVsbG8gbmJka2l0IHVzZXI=", "size=1M"),
             ("raw=Hello, world!",)]
    for args in cases:
        with serve_nbdkit("data", *args) as ref, serve("data", *args) as ours:
            assert served_sha(ours.uri, tmp, "ours") == served_sha(ref.uri, tmp, "ref")
            assert disk_map(ours.uri) == disk_map(ref.uri)


def test_writes_trims_and_flags_like_a_memory_disk():
    with serve_nbdkit("data", "1 2 3", "size=1M") as ref, serve("data", "1 2 3", "size=1M") as ours:
        facts = [{k: v for k, v in nbdinfo_json(s.uri)["exports"][0].items() if k in (
            "is_read_only", "can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_multi_conn",
            "can_cache", "export-size")} for s in (ref, ours)]
        assert facts[0] == facts[1]
        script = """
h.pwrite(b"abc", 100000, nbd.CMD_FLAG_FUA)
h.zero(2, 0, nbd.CMD_FLAG_FAST_ZERO)
h.trim(65536, 65536)
h.flush()
print(h.pread(4, 0), h.pread(3, 100000))
"""
        assert nbdsh(ours.uri, script).stdout == nbdsh(ref.uri, script).stdout


@pytest.mark.parametrize("expression", [
    "-1", "256", "0400", "0x100", "le16:0x10000", "be32:abc", "le64:-1", "le3", "a", "@", "@+", "@-2",
    "@1 @^2 @-3", "(", ")", "( ( )", '"', '"\\x"', '"\\1"', "*1", "0*-1", "0**", "0[2:]", "[:]", '"123"[1:0]',
    "\\a", "( 0 -> \\a ) \\a", "(0 -> \\a) -> \\b \\b \\a", "$unknownvar_xyz", "@^3", "</nonexistent/file",
    "<(exit 3)", "<(echo oops >&2; exit 1)", "1 -> 2",
])
def test_bad_expressions_fail_like_nbdkit_with_a_clear_message(expression):
    reference = run(["nbdkit", "-U", "-", "data", f"data={expression}", "--run", "true"], check=False, timeout=60)
    assert reference.returncode != 0
    result = run([*NBDFORMATS, "-U", "-", "data", f"data={expression}", "--run", "true"], check=False, timeout=60)
    err = result.stderr.decode()
    assert result.returncode == 1 and "data: " in err and "Traceback" not in err, err


@pytest.mark.parametrize("args, message", [
    (("data", "1", "raw=2"), "exactly one of"),
    (("data", "size=1M"), "exactly one of"),
    (("data", "raw=x", "a=1"), "only for $VARIABLES"),
    (("data", "base64=!!!"), "base64"),
    (("data", "( 1 )*99999999999999999"), "more than this machine's"),
    (("data", "( 1 @0x100000 )*9999999"), "more than this machine's"),
    (("data", "( 1 )*9999999999999999999"), "too large"),
    (("data", "( @0x4000000000000000 1 )*2"), "2^63-1"),
    (("data", "<(yes)"), "more than"),
    (("data", "</dev/zero"), "endless"),
    (("data", "$a", "a=$b", "b=$a"), "refers to itself"),
    (("data", "(" * 500 + ")" * 500), "nested more than"),
    (("data", "1", "allocator=bogus"), "allocator=bogus"),
])
def test_limits_and_misuse_are_clear_errors(args, message):
    result = run([*NBDFORMATS, "-U", "-", *args, "--run", "true"], check=False, timeout=120)
    err = result.stderr.decode()
    assert result.returncode == 1 and message in err and "Traceback" not in err, err


def test_huge_sparse_disks_cost_nothing():
    with serve("data", "( 1 @0x40000000 )*1000 ( \"x\" @0x4000000000000000 )*1 9", "allocator=zstd") as srv:
        nbdsh(srv.uri, """
assert h.get_size() == 1000 * (1 << 30) + (1 << 62) + 1
assert h.pread(1, 999 * (1 << 30)) == b"\\x01"
assert h.pread(1, 1000 * (1 << 30)) == b"x"
assert h.pread(1, h.get_size() - 1) == b"\\x09"
""")


def test_endless_script_cut_by_a_slice_and_scripts_run_where_the_server_started(tmp):
    (tmp / "here").write_bytes(b"local file")
    command = " ".join([*NBDFORMATS, "-U", "-", "data", "'<(yes)[:5] <(cat here)'", "--run", "'nbdcopy \"$uri\" - | od -c'"])
    result = run(["bash", "-c", f"cd {tmp} && {command}"], timeout=60)
    assert b"y  \\n   y  \\n   y   l   o   c   a   l" in result.stdout


def test_variables_from_parameters_come_before_the_environment():
    assert content("$a $b", {"a": "1 2", "b": "$c*2", "c": "3"}) == b"\x01\x02\x03\x03"


def test_names_see_the_scope_of_their_assignment():
    expression = r"1 -> \1 ( \1 ) -> \test \test ( 2 -> \1 ) \test ( 3 -> \1 \test ) 4 -> \1 \test ( \1 ) -> \test \test"
    assert content(expression) == b"\1\1\1\1\4"


def test_ast_debug_output_is_nbdkit_notation():
    tree = optimize(Parser(lambda name: None).parse('(((2 2 2) 2)) (1 1 1 (1 3)) "123456"[1:2] "\\x00a"'))
    assert " ".join(" ".join(describe(tree)).split()) == '( fill(2*4) fill(1*3) "\\x01\\x032\\x00a" )'


def test_parser_refuses_what_nbdkit_refuses():
    for bad in ("0x", "le16:", "@^0", "*x", "[1:2", "->", "\\"):
        with pytest.raises(ConfigError):
            content(bad)
