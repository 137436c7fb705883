"""Every shell example in README.md and docs/ runs as written (issue 25).

Each code block whose first command is a program (or a `$ ` transcript) is one test.  It runs in
a sandbox of its own (private mount, network and pid namespaces): the files the examples name
(disk.img, disk.tar.gz, disk.luks and its pass.txt, /srv/images, /etc/pki/nbd ...; see
fixtures/doc_fixtures.sh) are in place, /tmp, /srv and /run are private, and port 10809 is free.

A server started in the foreground (`nbdformats -f ...`) is what a reader leaves running in one
terminal: it is started, and the next lines (the reader's other terminal) run once it listens.
A server that detaches runs as written (it returns once it listens).  A server that no later line
uses is checked by connecting to it and reading its first export, then stopped before the next.

An example that cannot run on a test machine (it boots a VM, reaches other hosts, prompts on a
terminal) is marked in the Markdown source with `<!-- doc-test: skip REASON -->` just before it.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT, run
from test_tutorial import tutorial_files
from nbdformats.cli import parse_argv

sys.path.insert(0, str(ROOT / "tests" / "nbdkit_suite"))
import harness  # noqa: E402  (its cache directory and lock)

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SKIP = re.compile(r"<!--\s*doc-test:\s*skip\s+(.*?)\s*-->", re.S)
SHELL_LANGUAGES = {"", "sh", "bash", "shell", "console"}
BUILTINS = {"cd", "echo", "printf", "rm", "mkdir", "cp", "touch", "sleep", "truncate", "cat", "export", "for"}
SERVERS = {"nbdformats", "nbdkit"}
NOT_SERVING = {"--run", "--help", "-h", "--version", "-V", "--dump-plugin", "--dump-config", "--list",
               "--long-options", "--short-options", "-s", "--single"}
# Unix sockets examples expect another NBD server at (the nbd, mirror and stripe plugins' sources).
REMOTE_SOCKETS = ["/run/remote.sock", "/run/qemu-nbd.sock", "/tmp/plain.sock", "/tmp/a.sock", "/tmp/b.sock"]


@dataclass
class Example:
    page: Path
    line: int
    text: str
    transcript: bool  # `$ ` lines are commands, the others their output
    skip: str | None

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[tuple[int, str, str]]:
    """(line, preceding text, code) of each fenced shell block and each indented block."""
    text = page.read_text()
    found = []
    fence = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
    for match in fence.finditer(text):
        if match.group(1).strip() in SHELL_LANGUAGES:
            found.append((text.count("\n", 0, match.start()) + 1, text[:match.start()], match.group(2)))
    unfenced = fence.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for match in re.finditer(r"(?:(?<=\n\n)|\A)((?:(?:    |\t).*\n|[ \t]*\n)+)", unfenced):
        code = "\n".join(line[4:] for line in match.group(1).splitlines())
        if code.strip():
            found.append((unfenced.count("\n", 0, match.start()) + 1, text[:match.start()], code + "\n"))
    return found


def first_command(code: str, transcript: bool) -> str | None:
    for line in code.splitlines():
        line = line.strip()
        if transcript:
            if not line.startswith("$ "):
                continue
            line = line[2:]
        if not line or line.startswith("#"):
            continue
        words = [w for w in line.split() if not re.match(r"^[A-Za-z_]\w*=", w)]
        return words[0] if words else None
    return None


def is_command(word: str | None) -> bool:
    # nbdformats always counts: were it missing from PATH its examples must fail, not vanish.
    return bool(word) and (word in BUILTINS or word in ("nbdformats", "nbdformats-stats")
                           or word.startswith(("./", "scripts/", ".venv/"))
                           or (shutil.which(word) is not None and not word.endswith(":")))


def examples() -> list[Example]:
    found = []
    for page in PAGES:
        for line, before, code in blocks(page):
            transcript = any(l.startswith("$ ") for l in code.splitlines())
            if not is_command(first_command(code, transcript)):
                continue  # output, a configuration file, a tree
            tail = before.rstrip()
            skip = SKIP.search(tail[tail.rfind("\n\n") + 1:] if "\n\n" in tail else tail)
            found.append(Example(page, line, code, transcript, skip.group(1) if skip else None))
    return found


def transcript_outputs(code: str) -> dict[str, list[str]]:
    """In a `$ ` transcript: each command's output lines as shown."""
    outputs: dict[str, list[str]] = {}
    command = None
    continued = False
    for line in code.splitlines():
        if line.startswith("$ ") or continued:
            command = f"{command}\n{line}" if continued else line[2:]
            continued = line.endswith("\\")
            if not continued:
                outputs[command] = []
        elif command is not None and line.strip():
            outputs[command].append(line.strip())
    return outputs


def logical_lines(code: str, transcript: bool) -> list[str]:
    """Commands, joined over backslash continuations, multi-line quotes and here-documents."""
    lines = list(transcript_outputs(code)) if transcript else code.splitlines()
    result: list[str] = []
    pending = ""
    heredoc: str | None = None
    for line in lines:
        if heredoc is not None:
            pending += "\n" + line
            if line.strip() == heredoc:
                result.append(pending)
                pending, heredoc = "", None
            continue
        pending = f"{pending}\n{line}" if pending else line
        if pending.endswith("\\"):
            continue
        marker = re.search(r"<<-?\s*'?\"?(\w+)", pending)
        if marker:
            heredoc = marker.group(1)
            continue
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # a quote goes on over the next line
            continue
        result.append(pending)
        pending = ""
    if pending:
        result.append(pending)
    return result


def server_address(words: list[str]) -> tuple[str, str] | None:
    """Where the nbdformats (or nbdkit) command `words` listens, or None if it does not serve."""
    if not words or words[0] not in SERVERS or any(w in NOT_SERVING or w.startswith("--run=") for w in words):
        return None
    opts = parse_argv(words[1:])
    if opts.get("unix"):
        return "unix", str(opts.get("unix"))
    return "tcp", str(opts.get("port") or 10809)


def command_words(command: str) -> list[str]:
    """The words of a command, without leading VAR=value assignments ([] if it cannot be split);
    a command substitution counts as one word."""
    try:
        words = shlex.split(re.sub(r"\$\(\(?[^()]*\)?\)", "SUBSTITUTED", command), comments=True)
    except ValueError:
        return []
    while words and re.match(r"^[A-Za-z_]\w*=", words[0]):
        words.pop(0)
    return words


def script(example: Example) -> str:
    """The example as a bash script, with servers started (foreground ones aside) and checked."""
    commands = logical_lines(example.text, example.transcript)
    outputs = transcript_outputs(example.text) if example.transcript else {}
    words = [command_words(c) for c in commands]
    addresses = [None if c.rstrip().endswith("&") or outputs.get(c) else server_address(w)
                 for c, w in zip(commands, words)]
    runnable = [i for i, c in enumerate(commands) if c.strip() and not c.strip().startswith("#")]
    out = []
    for index, command in enumerate(commands):
        address = addresses[index]
        if outputs.get(command):  # a transcript: the output shown must be what it prints
            out.append(f"doc_expect {shlex.quote(command)} {shlex.quote(chr(10).join(outputs[command]))}")
            continue
        if address is None:
            out.append(command)
            continue
        options = parse_argv(words[index][1:])
        foreground = options.flag("foreground") or options.flag("exit-with-parent")
        out.append(f"doc_server {int(foreground)} {address[0]} {shlex.quote(address[1])} {shlex.quote(command)}")
        later = [i for i in runnable if i > index]
        if not later or addresses[later[0]] is not None:  # nothing uses it: connect, read, stop
            out.append(f"doc_check {address[0]} {shlex.quote(address[1])} {shlex.quote(command)}")
            out.append("doc_stop")
    return "\n".join(out) + "\n"


PRELUDE = r'''
set -euo pipefail
script=$(cat)
fixtures=$1 docs_files=$2
ip link set lo up
mount -t tmpfs tmpfs /mnt && cp -a "$docs_files/." /mnt/  # before /tmp, where they are, is replaced
for dir in /tmp /run /srv; do mount -t tmpfs tmpfs "$dir"; done
mkdir -p /run/.doc/upper-etc /run/.doc/work-etc /run/.doc/upper-root /run/.doc/work-root
mount -t overlay overlay -o lowerdir=/etc,upperdir=/run/.doc/upper-etc,workdir=/run/.doc/work-etc /etc
mount -t overlay overlay -o lowerdir=/root,upperdir=/run/.doc/upper-root,workdir=/run/.doc/work-root /root
cp -a --sparse=always "$fixtures/root/srv/." /srv/ && cp -a "$fixtures/root/run/." /run/
cp -a "$fixtures/root/etc/." /etc/ && cp -a "$fixtures/root/root/." /root/
mkdir /tmp/work && cp -a --sparse=always "$fixtures/work/." /mnt/. /tmp/work/ && cd /tmp/work
: > /run/.doc/servers

doc_wait() {  # kind address status-file foreground: until it listens (or the command failed)
  local i
  for i in $(seq 600); do
    if [ -s "$3" ] && { [ "$4" = 1 ] || [ "$(cat "$3")" != 0 ]; }; then
      echo "doc-test: the server exited ($(cat "$3")) instead of serving" >&2; return 1
    fi
    if [ "$1" = unix ] && [ -S "$2" ]; then return 0; fi
    if [ "$1" = tcp ] && [ -n "$(ss -Hltn "sport = :$2")" ]; then return 0; fi
    sleep 0.1
  done
  echo "doc-test: nothing listens on $1 $2 after 60 s" >&2; return 1
}
doc_server() {  # foreground kind address command: in a pid namespace of its own, stopped by doc_stop
  local status
  if grep -q " $2 $3\$" /run/.doc/servers; then doc_stop; fi  # a new server where one runs: the reader stopped it
  status=$(mktemp /run/.doc/status.XXXXXX)
  unshare --pid --fork --kill-child bash -c "$4"'
echo $? > '"$status"'; exec sleep infinity' &
  echo "$! $2 $3" >> /run/.doc/servers
  doc_wait "$2" "$3" "$status" "$1"
}
doc_check() {  # kind address command: connect, list, open the first export, read from it
  local uri
  if [ "$1" = unix ]; then uri="nbd+unix:///?socket=$2"; else uri="nbd://localhost:$2/"; fi
  case " $3 " in *" --tls=require "*|*" --tls=on "*)
    uri="nbds${uri#nbd}"; uri="$uri$([ "$1" = unix ] && echo '&' || echo '?')tls-certificates=/etc/pki/nbd";;
  esac
  /usr/bin/python3 -c '
import nbd, sys
h = nbd.NBD()
h.set_opt_mode(True)
h.set_uri_allow_local_file(True)
h.connect_uri(sys.argv[1])
names = []
try:
    h.opt_list(lambda name, description: names.append(name))
except nbd.Error:
    pass
h.set_export_name(names[0] if names else "")
h.opt_go()
h.pread(min(max(512, h.get_block_size(nbd.SIZE_MINIMUM)), h.get_size()), 0)
' "$uri"
}
doc_expect() {  # command expected-lines: each line shown appears in what it prints (an error: exit 1)
  local output status=0 line
  output=$(eval "$1" 2>&1) || status=$?
  printf '%s\n' "$output"
  while IFS= read -r line; do
    if ! grep -qF -- "$(echo "$line" | sed 's/^[[:space:]]*//')" <<< "$output"; then
      echo "doc-test: '$1' did not print: $line" >&2; return 1
    fi
  done <<< "$2"
  case "$2" in *error*) [ "$status" != 0 ] || { echo "doc-test: '$1' succeeded, the docs show an error" >&2; return 1; };;
    *) [ "$status" = 0 ] || return "$status";; esac
}
doc_stop() {  # the last server started, with everything it started; until its address is free
  local pid kind address i
  read -r pid kind address < <(tail -n 1 /run/.doc/servers)
  sed -i '$d' /run/.doc/servers
  kill -KILL "$pid" 2>/dev/null || true  # unshare ignores SIGTERM; --kill-child takes its namespace along
  wait "$pid" 2>/dev/null || true
  for i in $(seq 100); do
    if [ "$kind" = tcp ]; then [ -z "$(ss -Hltn "sport = :$address")" ] && return 0
    else rm -f "$address"; return 0; fi
    sleep 0.1
  done
}
# Other NBD servers the examples read from.
for socket in SOCKETS; do
  case "$script" in *"$socket"*) nbdformats -U "$socket" memory 64M;; esac
done
set +u
eval "$script"
'''


def fixtures() -> Path:
    """The examples' files, made once (doc_fixtures.sh) into the cache; rebuilt when it changes."""
    builder = ROOT / "tests" / "fixtures" / "doc_fixtures.sh"
    key = harness.sha256(builder)[:16]
    directory = harness.cache_root().parent / "doc-fixtures" / key
    with harness.locked(directory.parent / ".lock"):
        if not (directory / ".complete").exists():
            shutil.rmtree(directory, ignore_errors=True)
            run([builder, directory, sys.executable], timeout=600)
    return directory


ALL = examples()


def test_examples_are_found():
    pages = {e.page.name for e in ALL}
    assert {"README.md", "server.md", "cow.md", "luks.md", "linuxdisk.md"} <= pages and len(ALL) > 60


@pytest.mark.parametrize("example", ALL, ids=[e.id for e in ALL])
def test_example_runs_as_written(example: Example, tmp_path: Path) -> None:
    if example.skip:
        pytest.skip(f"marked in {example.page.name}: {example.skip}")
    for name, text in tutorial_files().items():  # the files the tutorial has its reader write
        (tmp_path / name).write_text(text)
    prelude = PRELUDE.replace("SOCKETS", " ".join(REMOTE_SOCKETS))
    env_path = f"{ROOT / '.venv' / 'bin'}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    sandbox = ["unshare", "--mount", "--net", "--pid", "--fork", "--kill-child", "--mount-proc", "--propagation",
               "private", "env", "-u", "TMPDIR", f"PATH={env_path}"]  # TMPDIR: the examples' default
    for _ in range(3):
        proc = subprocess.run([*sandbox, "bash", "-c", prelude, "doc-test", str(fixtures()), str(tmp_path)],
                              input=script(example), capture_output=True, text=True, timeout=300)
        # qemu-img times its PBKDF2 before making a LUKS image and gives up on a busy machine,
        # before any server runs: that is not the example failing (as in tests/nbdkit_suite).
        if "Unable to get accurate CPU usage" not in proc.stderr:
            break
    assert proc.returncode == 0, (f"{example.id} failed ({proc.returncode}):\n{example.text}\n--- script:\n"
                                  f"{script(example)}--- output:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
