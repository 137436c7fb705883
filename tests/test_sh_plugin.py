"""The sh and eval plugins (nbdkit's script protocol) against nbdkit 1.32 running the same scripts:
the same bytes, flags, errors, extents and export lists through real clients; and the bounds nbdkit
does not have (a script's output and its time)."""

from __future__ import annotations

import json
import subprocess
import stat
from pathlib import Path

import pytest

from conftest import NBDFORMATS, nbdinfo_json, nbdsh, run, serve, serve_nbdkit
from nbdformats.api.chain import Chain
from nbdformats.api.errors import ConfigError, NBDError
from nbdformats.plugins import _scripted
from nbdformats.registry import load_plugin

FLAGS = ("is_read_only", "is_rotational", "can_cache", "can_fast_zero", "can_flush", "can_fua", "can_multi_conn",
         "can_trim", "can_zero", "export-size")

# A small disk kept in $tmpdir/disk, with every method; CAN_* variables answer the can_* methods.
DISK_SCRIPT = r"""#!/bin/bash
disk=$tmpdir/disk
case "$1" in
  load) truncate -s 1M "$disk" ;;
  magic_config_key) echo fill ;;
  config) case "$2" in fill) printf %s "$3" | dd of="$disk" conv=notrunc status=none ;;
                       *) echo "EINVAL unknown key $2" >&2; exit 1 ;; esac ;;
  thread_model) echo parallel ;;
  open) echo "handle-$3" ;;
  get_size) stat -L -c %s "$disk" ;;
  block_size) echo 512 4K 1M ;;
  pread) dd if="$disk" skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none ;;
  pwrite) dd of="$disk" seek=$4 oflag=seek_bytes conv=notrunc status=none ;;
  can_write|can_flush|can_trim|can_zero|can_extents|can_multi_conn) exit ${CAN:-0} ;;
  can_fua) echo ${FUA:-native} ;;
  can_cache) echo ${CACHE:-native} ;;
  is_rotational) exit 3 ;;
  flush|cache) ;;
  trim|zero) fallocate -p -o $4 -l $3 "$disk" ;;
  extents) echo 0 64K; echo 64K 960K hole,zero ;;
  *) exit 2 ;;
esac
"""


@pytest.fixture
def disk_script(tmp) -> Path:
    path = tmp / "disk.sh"
    path.write_text(DISK_SCRIPT)
    path.chmod(0o755)
    return path


def facts(uri: str) -> dict:
    info = nbdinfo_json(uri)["exports"][0]
    return {k: info.get(k) for k in FLAGS}


@pytest.mark.parametrize("env", [{}, {"CAN": "3"}, {"FUA": "emulate", "CACHE": "emulate"}, {"FUA": "none"}])
def test_flags_bytes_and_map_match_nbdkit(disk_script, env, monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)  # the scripts of both servers see it
    args = ("sh", str(disk_script), "hello")  # each server has its own $tmpdir, so its own disk
    script = "h.pwrite(b'abc', 4096) if not h.is_read_only() else None; print(h.pread(8, 0), h.pread(3, 4096))"
    with serve_nbdkit(*args) as ref, serve(*args) as ours:
        assert facts(ours.uri) == facts(ref.uri)
        assert nbdsh(ours.uri, script).stdout == nbdsh(ref.uri, script).stdout
        maps = [json.loads(run(["nbdinfo", "--map", "--json", s.uri]).stdout) for s in (ours, ref)]
        assert maps[0] == maps[1]


ERRORS = {"ENOMEM": "ENOMEM", "eperm": "EPERM", "ENOSPC custom message": "ENOSPC", "ESHUTDOWN\nline two": "ESHUTDOWN",
          "EPIPE": "EIO", "EINVALID": "EIO", "": "EIO", "EROFS": "EPERM"}  # EROFS goes over NBD as EPERM


@pytest.mark.parametrize("message", sorted(ERRORS))
def test_errno_names_reach_the_client_as_nbdkit_sends_them(tmp, message):
    script = tmp / "fail.sh"
    script.write_text(f"""case "$1" in get_size) echo 64K ;; pread) printf '{message}\\n' >&2; exit 1 ;; *) exit 2 ;; esac\n""")
    script.chmod(0o755)
    read = "try:\n    h.pread(1, 0)\nexcept nbd.Error as e:\n    print(e.errno)"
    with serve_nbdkit("sh", str(script)) as ref, serve("sh", str(script)) as ours:
        answer = nbdsh(ours.uri, read).stdout
        assert answer == nbdsh(ref.uri, read).stdout
        assert answer.decode().strip() == ERRORS[message]


def test_zero_falls_back_to_pwrite_on_enotsup(tmp):
    script = tmp / "zero.sh"
    script.write_text("""case "$1" in
  get_size) echo 'EINVAL ignored' >&2; echo 1M ;;
  can_write|can_zero) exit 0 ;;
  pwrite) cat > /dev/null; echo "$3 $4" >> "$tmpdir/writes"; echo ENOSPC >&2; exit 1 ;;
  zero) echo ENOTSUP >&2; exit 1 ;;
  *) exit 2 ;;
esac
""")
    script.chmod(0o755)
    test = "try:\n    h.zero(512, 0)\nexcept nbd.Error as e:\n    print(e.errno)"
    with serve_nbdkit("sh", str(script)) as ref, serve("sh", str(script)) as ours:
        assert nbdsh(ours.uri, test).stdout == nbdsh(ref.uri, test).stdout == b"ENOSPC\n"


EXPORT_LISTS = ["", "\n", "name\n", "NAMES\na\nb\n", "INTERLEAVED\na\nx\nb\ny\n", "INTERLEAVED\na\nx\nb\n",
                "NAMES+DESCRIPTIONS\na\nb\nx\ny\n", "NAMES+DESCRIPTIONS\na\nb\nx\n", "NAMES\nno newline"]


@pytest.mark.parametrize("listing", EXPORT_LISTS)
def test_export_lists_parse_like_nbdkit(tmp, listing):
    (tmp / "list").write_text(listing)
    args = ("eval", f"list_exports=cat {tmp}/list", "get_size=echo 0")
    with serve_nbdkit(*args) as ref, serve(*args) as ours:
        lists = [json.loads(run(["nbdinfo", "--list", "--json", s.uri]).stdout)["exports"] for s in (ours, ref)]
        assert [[e["export-name"], e.get("description")] for e in lists[0]] == \
            [[e["export-name"], e.get("description")] for e in lists[1]]


def test_eval_implies_can_methods_and_missing_script(tmp):
    args = ("eval", "get_size=echo 1M", "pread=dd if=/dev/zero count=$3 iflag=count_bytes status=none",
            "pwrite=cat >/dev/null", "flush=:", "missing=exit 2")
    with serve_nbdkit(*args) as ref, serve(*args) as ours:
        assert facts(ours.uri) == facts(ref.uri)
        assert facts(ours.uri)["can_flush"] and not facts(ours.uri)["can_trim"]


def test_eval_config_gets_other_parameters_in_order(tmp):
    out = tmp / "seen"
    result = run([*NBDFORMATS, "-U", "-", "eval", "get_size=echo 0", f'config=echo "$2=$3" >> {out}', "b=2",
                  "a=1", "--run", "true"])
    assert result.returncode == 0 and out.read_text() == "b=2\na=1\n"
    result = run([*NBDFORMATS, "-U", "-", "eval", "get_size=echo 0", "unknown=1", "--run", "true"], check=False)
    assert result.returncode == 1 and b"no 'config' callback" in result.stderr


def test_magic_config_key_and_config_order(disk_script):
    with serve("sh", str(disk_script), "hello", "fill=XY") as srv:
        assert nbdsh(srv.uri, "print(h.pread(5, 0))").stdout == b"bytearray(b'XYllo')\n"


def test_inline_script_from_standard_input():
    result = run([*NBDFORMATS, "-U", "-", "sh", "-", "--run", "nbdinfo --size \"$uri\""],
                 input=b'case "$1" in get_size) echo 3M ;; *) exit 2 ;; esac\n')
    assert result.stdout == b"3145728\n"


def test_tmpdir_is_the_scripts_own_and_removed(tmp):
    marker = tmp / "where"
    script = tmp / "t.sh"
    script.write_text(f'case "$1" in get_size) echo "$tmpdir" > {marker}; echo 0 ;; *) exit 2 ;; esac\n')
    script.chmod(0o755)
    result = run([*NBDFORMATS, "-U", "-", "sh", str(script), "--run", 'test -z "$tmpdir" && nbdinfo "$uri" >/dev/null'])
    assert result.returncode == 0
    tmpdir = Path(marker.read_text().strip())
    assert tmpdir.name.startswith("nbdformats-sh-") and not tmpdir.exists()


@pytest.mark.parametrize("body, args, message", [
    ('case "$1" in load) echo "EINVAL no good" >&2; exit 1 ;; *) exit 2 ;; esac', (), "no good"),
    ('case "$1" in config) exit 2 ;; *) exit 2 ;; esac', ("key=value",), "does not need command line configuration"),
    ('case "$1" in magic_config_key) exit 3 ;; *) exit 2 ;; esac', (), "unexpected code (3/false)"),
    ('case "$1" in get_ready) kill -9 $$ ;; *) exit 2 ;; esac', (), "signal 9"),
])
def test_start_up_failures_are_clear_errors(tmp, body, args, message):
    script = tmp / "bad.sh"
    script.write_text(body + "\n")
    script.chmod(0o755)
    result = run([*NBDFORMATS, "-U", "-", "sh", str(script), *args, "--run", "true"], check=False)
    err = result.stderr.decode()
    assert result.returncode == 1 and message in err and "Traceback" not in err, err


def test_bare_word_without_magic_config_key_is_refused(tmp):
    script = tmp / "s.sh"
    script.write_text('case "$1" in *) exit 2 ;; esac\n')
    script.chmod(0o755)
    result = run([*NBDFORMATS, "-U", "-", "sh", str(script), "word", "--run", "true"], check=False)
    assert result.returncode == 1 and b"expecting key=value" in result.stderr


def open_script(tmp: Path, body: str, readonly: bool = True):
    script = tmp / "s.sh"
    script.write_text(body)
    script.chmod(stat.S_IRWXU)
    chain = Chain([], load_plugin("sh")())
    chain.configure({0: [("script", str(script))]})
    chain.get_ready()
    return chain.open(readonly=readonly, export_name="")


def test_pread_output_is_checked_and_bounded(tmp):
    disk = open_script(tmp, 'case "$1" in get_size) echo 1M ;; pread) yes ;; *) exit 2 ;; esac\n')
    with pytest.raises(NBDError, match="wrote more than 512 bytes"):
        disk.pread(memoryview(bytearray(512)), 0, 0)
    disk = open_script(tmp, 'case "$1" in get_size) echo 1M ;; pread) echo short ;; *) exit 2 ;; esac\n')
    with pytest.raises(NBDError, match="incorrect amount of data read"):
        disk.pread(memoryview(bytearray(512)), 0, 0)


def test_a_method_that_hangs_is_killed(tmp, monkeypatch):
    monkeypatch.setattr(_scripted, "CALL_TIMEOUT", 1)
    disk = open_script(tmp, 'case "$1" in get_size) echo 1M ;; pread) exec sleep 100 ;; *) exit 2 ;; esac\n')
    with pytest.raises(NBDError, match="still running after 1 seconds"):
        disk.pread(memoryview(bytearray(512)), 0, 0)


def test_unparseable_answers_fail_the_connection(tmp):
    with pytest.raises(NBDError, match="could not parse output from get_size"):
        open_script(tmp, 'case "$1" in get_size) echo lots ;; *) exit 2 ;; esac\n')
    with pytest.raises(NBDError, match="could not parse output from can_fua"):
        open_script(tmp, 'case "$1" in get_size) echo 1 ;; can_write) ;; can_fua) echo maybe ;; *) exit 2 ;; esac\n',
                    readonly=False)


def test_first_parameter_must_be_the_script():
    plugin = load_plugin("sh")()
    with pytest.raises(ConfigError, match="first parameter must be script"):
        plugin.configure([("key", "value")])


def test_dump_plugin_shows_the_scripts_thread_model_and_lines(tmp):
    script = tmp / "d.sh"
    script.write_text('case "$1" in thread_model) echo serialize_requests ;; dump_plugin) echo extra=1 ;; '
                      '*) exit 2 ;; esac\n')
    script.chmod(0o755)
    out = run([*NBDFORMATS, "--dump-plugin", "sh", str(script)]).stdout.decode().splitlines()
    assert "thread_model=serialize_requests" in out and "extra=1" in out and "max_known_status=3" in out
    out = run([*NBDFORMATS, "--dump-plugin", "eval"]).stdout.decode().splitlines()
    assert "thread_model=serialize_all_requests" in out


def test_export_description_reaches_the_client_like_nbdkit():
    args = ("eval", "get_size=echo 1", "open=echo $3", "export_description=echo the export $2")
    with serve_nbdkit(*args) as ref, serve(*args) as ours:
        infos = [nbdinfo_json(s.uri_for("xyz"), "--no-content")["exports"][0] for s in (ours, ref)]
        assert infos[0]["description"] == infos[1]["description"] == "the export xyz"


def test_inline_script_and_passphrase_prompt_refused_under_single(tmp_path):
    """Under -s standard input is the client's connection (nbdkit_stdio_safe()): `sh -` and a
    passphrase prompt are refused at start-up, and the script given on stdin never runs."""
    witness = tmp_path / "ran"
    script = f"echo ran >> {witness}\n"
    refused = subprocess.run([*NBDFORMATS, "-s", "sh", "-"], input=script, capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode != 0 and "-s" in refused.stderr and "Traceback" not in refused.stderr
    assert not witness.exists()
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    prompt = subprocess.run([*NBDFORMATS, "-s", "--filter=luks", "file", str(image), "passphrase=-"],
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert prompt.returncode != 0 and "NBD connection (-s)" in prompt.stderr, prompt.stderr
