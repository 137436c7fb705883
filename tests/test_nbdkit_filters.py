"""nbdkit's filters swab, checkwrite, retry, retry-request, scan and exportname, against nbdkit 1.32
running the same command lines, through real clients."""

from __future__ import annotations

import json
import time

import pytest

from conftest import NBDFORMATS, nbdinfo_json, nbdsh, run, serve, serve_nbdkit, served_sha


def disk_map(uri: str) -> list:
    return json.loads(run(["nbdinfo", "--map", "--json", uri]).stdout)


def errno_of(uri: str, call: str) -> str:
    return nbdsh(uri, f"try:\n    {call}\n    print('ok')\nexcept nbd.Error as e:\n    print(e.errno)").stdout \
        .decode().strip()


@pytest.mark.parametrize("bits", ["8", "16", "32", "64"])
def test_swab_bytes_size_and_block_size_match_nbdkit(tmp, bits):
    args = ("--filter=swab", "pattern", "size=1000003", f"swab-bits={bits}")
    with serve_nbdkit(*args) as ref, serve(*args) as ours:
        assert served_sha(ours.uri, tmp, "ours") == served_sha(ref.uri, tmp, "ref")
        facts = [nbdinfo_json(s.uri)["exports"][0] for s in (ours, ref)]
        assert facts[0]["export-size"] == facts[1]["export-size"]
        assert facts[0]["block_size_minimum"] == facts[1]["block_size_minimum"]


def test_swab_sparse_reads_match_nbdkit(tmp):
    args = ("--filter=swab", "data", "@5 1 2 3 @0x100000 4 5 6 7 @0x300000 ( 9 8 )*4096", "size=4M", "swab-bits=32")
    with serve_nbdkit(*args) as ref, serve(*args) as ours:
        assert served_sha(ours.uri, tmp, "ours") == served_sha(ref.uri, tmp, "ref")


def test_swab_writes_are_swapped_and_unaligned_requests_refused():
    with serve("--filter=swab", "memory", "1M", "swab-bits=32") as srv:
        nbdsh(srv.uri, "h.pwrite(b'abcdefgh', 8)")
        assert nbdsh(srv.uri, "print(h.pread(8, 8))").stdout == b"bytearray(b'abcdefgh')\n"
    with serve("--filter=swab", "--filter=offset", "memory", "1M", "swab-bits=32", "offset=0") as srv:
        assert errno_of(srv.uri, "h.pread(3, 4)") == "EINVAL"
        assert errno_of(srv.uri, "h.pwrite(b'x' * 4, 2)") == "EINVAL"
        assert errno_of(srv.uri, "h.zero(4, 1)") == "EINVAL"


def test_swab_extents_are_aligned_like_nbdkit():
    # Holes and data that change inside 8-byte words.
    args = ("--filter=swab", "data", "@5 1 @32768 2 @65541 3 @131072 0", "size=1M", "swab-bits=64")
    with serve_nbdkit(*args) as ref, serve(*args) as ours:
        assert disk_map(ours.uri) == disk_map(ref.uri)
        script = """
entries = []
def f(context, offset, e, err):
    entries.append((e[0] >= 8, e[1]))  # (nbdkit may describe more than was asked for: the type counts)
for offset in (0, 8, 32768, 65536, 131072):
    h.block_status(8, offset, f)
print(entries)
"""
        assert nbdsh(ours.uri, script).stdout == nbdsh(ref.uri, script).stdout


@pytest.mark.parametrize("plugin", [("data", "@32768 1 @0x100000 2", "size=2M"), ("pattern", "1M"), ("sparse-random", "16M",
                                                                                                "seed=1")])
def test_checkwrite_copies_onto_itself(plugin):
    with serve("--filter=checkwrite", *plugin) as srv:
        run(["nbdcopy", srv.uri, srv.uri])
        run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", srv.uri, srv.uri])


def test_checkwrite_refuses_changes_like_nbdkit():
    args = ("--filter=checkwrite", "data", "@32768 1 2 3 @65536 0", "size=1M")
    calls = ["h.pwrite(b'\\x01\\x02\\x03', 32768)", "h.pwrite(b'\\x01\\x02\\x04', 32768)", "h.zero(4096, 0)",
             "h.zero(4096, 32768)", "h.zero(4096, 32768, nbd.CMD_FLAG_FAST_ZERO)", "h.trim(4096, 65536)",
             "h.trim(4096, 32768)", "h.flush()", "h.pwrite(b'x', 4096, nbd.CMD_FLAG_FUA)"]
    with serve_nbdkit(*args) as ref, serve(*args) as ours:
        for call in calls:
            assert errno_of(ours.uri, call) == errno_of(ref.uri, call), call
        facts = [{k: v for k, v in nbdinfo_json(s.uri)["exports"][0].items() if k.startswith(("can_", "is_"))}
                 for s in (ours, ref)]
        assert facts[0] == facts[1]


def test_checkwrite_never_writes_the_plugin(tmp):
    disk = tmp / "disk"
    disk.write_bytes(b"\x07" * 65536)
    with serve("-r", "--filter=checkwrite", "file", str(disk)) as srv:
        assert nbdinfo_json(srv.uri)["exports"][0]["is_read_only"]
    with serve("--filter=checkwrite", "file", str(disk)) as srv:
        assert errno_of(srv.uri, "h.pwrite(b'\\x08', 0)") == "EIO"
    assert disk.read_bytes() == b"\x07" * 65536


# Reads fail $FAILS times (counted in the plugin's $tmpdir), then work; opens are counted in $OPENS.
FLAKY_READS = ["get_size=echo 64K", "open=echo open >> ${OPENS:-/dev/null}; echo h",
               "pread=n=$(cat $tmpdir/failures 2>/dev/null || echo 0); echo $((n+1)) > $tmpdir/failures; "
               "if [ $n -lt $FAILS ]; then echo 'EIO flaky' >&2; exit 1; fi; "
               "dd if=/dev/zero count=$3 iflag=count_bytes status=none",
               "pwrite=cat > /dev/null", "can_write=exit 0"]


@pytest.mark.parametrize("fails, retries, works", [(0, 5, True), (2, 5, True), (3, 2, False), (1, 0, False)])
def test_retry_reopens_and_backs_off(tmp, monkeypatch, fails, retries, works):
    monkeypatch.setenv("FAILS", str(fails))
    monkeypatch.setenv("OPENS", str(tmp / "opens"))
    with serve("--filter=retry", "eval", *FLAKY_READS, f"retries={retries}", "retry-delay=1") as srv:
        start = time.monotonic()
        assert (errno_of(srv.uri, "h.pread(512, 0)") == "ok") == works
        retried = min(fails, retries)
        assert time.monotonic() - start >= 2 ** retried - 1 - 0.1  # 1 + 2 + 4 ... seconds
    assert len((tmp / "opens").read_text().split()) == 1 + retried  # a reopen for each retry


def test_retry_readonly_refuses_writes_after_a_failure(monkeypatch):
    monkeypatch.setenv("FAILS", "1")
    args = ("--filter=retry", "eval", *FLAKY_READS, "retry-delay=1", "retry-readonly=yes")
    with serve_nbdkit(*args) as ref, serve(*args) as ours:
        script = "print(h.pread(512, 0) == bytes(512))\ntry:\n    h.pwrite(b'x', 0)\nexcept nbd.Error as e:\n" \
                 "    print(e.errno)"
        assert nbdsh(ours.uri, script).stdout == nbdsh(ref.uri, script).stdout == b"True\nEPERM\n"  # EROFS goes over NBD as EPERM


@pytest.mark.parametrize("fails, works", [(0, True), (2, True), (3, False)])
def test_retry_request_retries_without_reopening(monkeypatch, fails, works):
    monkeypatch.setenv("FAILS", str(fails))
    args = ("--filter=retry-request", "eval", *FLAKY_READS, "retry-request-delay=1")
    with serve_nbdkit(*args) as ref, serve(*args) as ours:
        assert errno_of(ours.uri, "h.pread(512, 0)") == errno_of(ref.uri, "h.pread(512, 0)")
        assert (errno_of(ours.uri, "h.pread(512, 0)") == "ok") == (works or fails == 3)


def test_retry_request_retries_opens(tmp):
    args = ["--filter=retry-request", "eval", "get_size=echo 1M", "pread=exit 1",
            f"open=n=$(cat {tmp}/n 2>/dev/null || echo 0); echo $((n+1)) > {tmp}/n; [ $n -ge 2 ]",
            "retry-request-delay=1"]
    with serve(*args) as srv:
        assert nbdsh(srv.uri, "print(h.get_size())").stdout == b"1048576\n"
    (tmp / "n").unlink()
    with serve(*args, "retry-request-open=false") as srv:
        assert nbdsh(srv.uri, "print(h.get_size())", check=False).returncode != 0


@pytest.mark.parametrize("args, message", [
    (("--filter=retry", "null", "retry-delay=0"), "retry-delay=0"),
    (("--filter=retry", "null", "retries=-1"), "retries=-1"),
    (("--filter=retry-request", "null", "retry-request-retries=1001"), "retry-request-retries=1001"),
    (("--filter=swab", "null", "swab-bits=12"), "swab-bits=12"),
    (("--filter=scan", "null", "scan-size=1000"), "scan-size=1000"),
    (("--filter=scan", "null", "scan-size=64M"), "scan-size=64M"),
    (("--filter=exportname", "null", "exportdesc=sometimes"), "exportdesc"),
    (("--filter=exportname", "null", "exportname-list=all"), "exportname-list=all"),
])
def test_bad_filter_parameters_are_clear_errors(args, message):
    result = run([*NBDFORMATS, "-U", "-", *args, "--run", "true"], check=False)
    err = result.stderr.decode()
    assert result.returncode == 1 and message in err and "Traceback" not in err, err


def test_scan_prefetches_the_whole_disk_in_the_background(tmp):
    log = tmp / "cache.log"
    args = ("--filter=scan", "eval", "thread_model=echo parallel", "get_size=echo 10M", "can_cache=echo native",
            f"cache=echo $4 >> {log}", "pread=dd if=/dev/zero count=$3 iflag=count_bytes status=none",
            "scan-size=1M")
    with serve(*args) as srv:
        nbdsh(srv.uri, "import time; time.sleep(3)")
    offsets = sorted(int(line) for line in log.read_text().split())
    assert offsets == [i << 20 for i in range(10)]


def test_scan_warns_and_stays_out_of_the_way_when_it_cannot_scan():
    with serve("--filter=scan", "memory", "1M", export="") as srv:
        nbdsh(srv.uri, "h.pwrite(b'x', 0); print(h.pread(1, 0))")
    with serve("--filter=scan", "--filter=noparallel", "memory", "1M") as srv:
        nbdsh(srv.uri, "print(h.get_size())")
        assert "not scanning" in srv.stderr()


# (A sh script, not eval: nbdkit's exportname filter also takes default_export= for its own.)
EXPORTS_SCRIPT = """case "$1" in
  list_exports) printf 'INTERLEAVED\\na\\nx\\nb\\ny\\nc\\nz\\n' ;;
  default_export) echo a ;;
  open) echo "$3" ;;
  export_description) echo "described $2" ;;
  get_size) case "$2" in a) echo 1 ;; b) echo 2 ;; c) echo 3 ;; *) exit 1 ;; esac ;;
  *) exit 2 ;;
esac
"""


@pytest.fixture
def exports(tmp) -> str:
    script = tmp / "exports.sh"
    script.write_text(EXPORTS_SCRIPT)
    script.chmod(0o755)
    return str(script)


def listing(uri: str) -> list:
    exports = json.loads(run(["nbdinfo", "--json", "--list", uri]).stdout)["exports"]
    return sorted([e["export-name"], e.get("description"), e["export-size"]] for e in exports)


@pytest.mark.parametrize("options", [(), ("exportname-list=keep",), ("exportname-list=empty",),
                                     ("exportname-list=defaultonly",),
                                     ("exportname-list=explicit", "exportname=b", "exportname=a"),
                                     ("exportname-list=defaultonly", "default-export=b"),
                                     ("exportdesc=none",), ("exportdesc=fixed:hi",),
                                     ("exportdesc=script:echo $name$name",)])
def test_exportname_lists_match_nbdkit(exports, options):
    args = ("--filter=exportname", "sh", exports, *options)
    with serve_nbdkit(*args) as ref, serve(*args) as ours:
        assert listing(ours.uri) == listing(ref.uri)


def test_exportname_error_policy_and_strict_names(exports):
    with serve("--filter=exportname", "sh", exports, "exportname-list=error") as srv:
        assert run(["nbdinfo", "--list", srv.uri], check=False).returncode != 0
    args = ("--filter=exportname", "sh", exports, "exportname-strict=true", "exportname=a", "exportname=b")
    with serve_nbdkit(*args) as ref, serve(*args) as ours:
        for export in ("a", "b", "c", ""):
            results = [nbdsh(s.uri_for(export), "print(h.get_size())", check=False).returncode == 0
                       for s in (ours, ref)]
            assert results[0] == results[1], export
    with serve("--filter=exportname", "sh", exports, "default-export=c") as srv:
        assert nbdsh(srv.uri, "print(h.get_size())").stdout == b"3\n"


@pytest.mark.parametrize("options", [(), ("exportdesc=none",), ("exportdesc=fixed:hi",),
                                     ("exportdesc=script:echo $name$name",), ("default-export=b",)])
def test_exportname_description_of_the_open_export_matches_nbdkit(exports, options):
    args = ("--filter=exportname", "sh", exports, *options)
    with serve_nbdkit(*args, options=("-e", "c")) as ref, serve(*args, options=("-e", "c")) as ours:
        for export in ("c", ""):
            infos = [nbdinfo_json(s.uri_for(export), "--no-content")["exports"][0] for s in (ours, ref)]
            assert [i.get("description") for i in infos] == [infos[1].get("description")] * 2, export
