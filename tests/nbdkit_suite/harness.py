"""Run nbdkit 1.32.5's own shell tests (tests/test-*.sh), unmodified, against nbdformats.

Each test runs in a copy of nbdkit's source tree whose top-level `nbdkit` is a two-line shell
script that execs the server under test, with functions.sh generated as nbdkit's `configure`
would write it and the check data (`disk`, `disk.tar.xz`, `file-data`, TLS keys...) built once
with the reference nbdkit, as nbdkit's tests/Makefile.am builds it.

The source comes from $NBDKIT_SRC (a source tree or a tarball) when set, else from
../shared/nbdkit-suite/nbdkit-1.32.5-src.tar.xz beside the project, else from Debian's source
package (nbdkit_1.32.5-1.dsc and the upstream tarball it names, both checked by SHA-256).
Extracted source and check data are cached under $XDG_CACHE_HOME/nbdformats/nbdkit-suite.

    scripts/nbdkit-suite [--server nbdkit] [--list FILE] [TEST.sh ...]

runs tests by name (default: tests/nbdkit_suite/expected-pass.txt) and prints one line per
test: NAME, PASS/FAIL/SKIP/TIMEOUT, seconds, and the log of a test that did not pass.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent.parent
VERSION = "1.32.5"
SHARED_TARBALL = PROJECT.parent / "shared" / "nbdkit-suite" / f"nbdkit-{VERSION}-src.tar.xz"
SHARED_TARBALL_SHA256 = "7a98124f119540176b2686c85a4e28be722a06832ba09834222e0c86a59bc4f3"
DEBIAN_POOL = "http://deb.debian.org/debian/pool/main/n/nbdkit/"
DEBIAN_DSC = f"nbdkit_{VERSION}-1.dsc"
DEBIAN_DSC_SHA256 = "426619f9d0b367fcb1e69a6eedfa59cb8ecf41a17e0cd4e459cf1a1c69d1b161"
REFERENCE_NBDKIT = "/usr/bin/nbdkit"
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin:/usr/local/sbin:/usr/local/bin"
DEFAULT_TIMEOUT = 150
# Files of tests/ that nbdkit's Makefile builds before `make check` (check_DATA).
CHECK_DATA = ["disk", "disk.tar", "disk.gz", "disk.tar.gz", "disk.xz", "disk.tar.xz", "file-data",
              "split1", "split2", "split3", "test-shell.img", "pki", "keys.psk"]


class SuiteError(Exception):
    """The harness cannot run (no source, a prerequisite missing, check data failed)."""


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nbdformats" / "nbdkit-suite"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, target: Path, expected_sha256: str) -> None:
    partial = target.with_suffix(target.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=120) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out)
    except OSError as e:
        partial.unlink(missing_ok=True)
        raise SuiteError(f"cannot download {url}: {e}") from None
    actual = sha256(partial)
    if actual != expected_sha256:
        partial.unlink()
        raise SuiteError(f"{url}: SHA-256 {actual}, expected {expected_sha256}")
    partial.rename(target)


def debian_source(cache: Path) -> Path:
    """nbdkit's upstream tarball from Debian's source package, each file checked by SHA-256:
    the .dsc against the hash pinned here, the tarball against the hash the .dsc lists."""
    dsc = cache / DEBIAN_DSC
    if not dsc.exists() or sha256(dsc) != DEBIAN_DSC_SHA256:
        download(DEBIAN_POOL + DEBIAN_DSC, dsc, DEBIAN_DSC_SHA256)
    listed = re.search(r"^Checksums-Sha256:\n((?: .*\n)+)", dsc.read_text(), re.M)
    orig = None
    for line in (listed.group(1).splitlines() if listed else []):
        digest, _size, name = line.split()
        if name.endswith(".orig.tar.gz"):
            orig = (name, digest)
    if orig is None:
        raise SuiteError(f"{dsc} lists no .orig.tar.gz")
    tarball = cache / orig[0]
    if not tarball.exists() or sha256(tarball) != orig[1]:
        download(DEBIAN_POOL + orig[0], tarball, orig[1])
    return tarball


def source_origin(cache: Path) -> Path:
    """Where nbdkit's source comes from: $NBDKIT_SRC, the shared tarball, or Debian."""
    given = os.environ.get("NBDKIT_SRC")
    if given:
        path = Path(given).resolve()
        if not (path.is_file() or (path / "tests" / "functions.sh.in").is_file()):
            raise SuiteError(f"NBDKIT_SRC={given}: neither an nbdkit source tree nor a tarball")
        return path
    if SHARED_TARBALL.is_file():
        if sha256(SHARED_TARBALL) != SHARED_TARBALL_SHA256:
            raise SuiteError(f"{SHARED_TARBALL}: unexpected SHA-256 (not nbdkit {VERSION}'s source as shipped)")
        return SHARED_TARBALL
    return debian_source(cache)


def extract(origin: Path, target: Path) -> None:
    """The source tree at `target` (a tarball's single top directory, whatever its name)."""
    if origin.is_dir():
        shutil.copytree(origin, target, symlinks=True)
        return
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix="extract."))
    try:
        subprocess.run(["tar", "-C", str(scratch), "-xf", str(origin)], check=True, timeout=300)
        (top,) = [p for p in scratch.iterdir() if p.is_dir()]
        top.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if not (target / "tests" / "functions.sh.in").is_file():
        raise SuiteError(f"{origin} holds no nbdkit tests/")


def run_logged(cmd: list[str] | str, log, cwd: Path, shell: bool = False, timeout: float = 600) -> None:
    log.write(f"+ {cmd}\n".encode())
    log.flush()
    subprocess.run(cmd, cwd=cwd, shell=shell, stdout=log, stderr=log, stdin=subprocess.DEVNULL, check=True,
                   timeout=timeout, env=dict(os.environ, PATH=SYSTEM_PATH))


def build_check_data(src: Path, data: Path, log) -> None:
    """tests/Makefile.am's check_DATA, made with the reference nbdkit."""
    data.mkdir()
    (data / "disk.tmp").mkdir()
    (data / "disk.tmp" / "hello.txt").write_text("hello,world")
    run_logged([REFERENCE_NBDKIT, "-fv", "-U", "-", "linuxdisk", "disk.tmp", "size=100M",
                "--run", "qemu-img convert $nbd disk-t"], log, data)
    shutil.rmtree(data / "disk.tmp")
    (data / "disk-t").rename(data / "disk")
    run_logged(["tar", "cf", "disk.tar", "disk"], log, data)
    for name in ("disk", "disk.tar"):
        run_logged(["gzip", "-9", "--keep", name], log, data)
        run_logged(["xz", "--best", "--block-size=32768", "--keep", name], log, data)
    run_logged(["bash", str(src / "tests" / "generate-file-data.sh"), "file-data"], log, data)
    file_data = (data / "file-data").read_bytes()
    for index, (start, end) in enumerate(((0, 100), (100, 200), (200, None)), 1):
        (data / f"split{index}").write_bytes(file_data[start:end])
    with open(data / "test-shell.img", "wb") as f:
        f.truncate(1048576)
    # TLS keys for the TLS tests (make-pki.sh.in as configure writes it).
    make_pki = (src / "tests" / "make-pki.sh.in").read_text()
    (data / "make-pki.sh").write_text(make_pki.replace("@CERTTOOL@", "certtool")
                                      .replace("@configure_input@", "generated by nbdformats' harness"))
    tests = shell_quote(str(src / "tests"))
    run_logged(f"SRCDIR={tests} bash make-pki.sh && SRCDIR={tests} bash {tests}/make-psk.sh", log, data, shell=True)
    (data / "make-pki.sh").unlink()
    (data / "pki" / ".stamp").touch()


# What the harness and the expected tests need: tool -> Debian package (scripts/setup installs them).
PREREQUISITES = {
    "nbdkit": "nbdkit", "qemu-img": "qemu-utils", "qemu-io": "qemu-utils", "nbdsh": "python3-libnbd",
    "nbdinfo": "libnbd-bin", "nbdcopy": "libnbd-bin", "socat": "socat", "jq": "jq", "hexdump": "bsdextrautils",
    "file": "file", "sfdisk": "fdisk", "mke2fs": "e2fsprogs", "xz": "xz-utils", "gzip": "gzip", "tar": "tar",
    "certtool": "gnutls-bin", "psktool": "gnutls-bin",
}


PYTHON_MODULES = {"nbd": "python3-libnbd", "packaging": "python3-packaging"}  # for the system python3


def check_prerequisites() -> None:
    missing = {package for tool, package in PREREQUISITES.items()
               if shutil.which(tool, path=SYSTEM_PATH) is None}
    missing |= {package for module, package in PYTHON_MODULES.items()
                if subprocess.run(["/usr/bin/python3", "-c", f"import {module}"], capture_output=True).returncode}
    if missing:
        raise SuiteError("missing Debian packages (scripts/setup installs them): " + " ".join(sorted(missing)))


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepared() -> tuple[Path, Path]:
    """The extracted source and the check data, built once per source and cached (several
    checkouts on one machine share them; a lock keeps concurrent runs from racing)."""
    check_prerequisites()
    root = cache_root()
    with locked(root / ".lock"):
        origin = source_origin(root)
        key = hashlib.sha256(str(origin).encode() + str(origin.stat().st_mtime_ns).encode()).hexdigest()[:16]
        base = root / key
        src, data = base / "src", base / "data"
        if not (base / ".complete").exists():
            shutil.rmtree(base, ignore_errors=True)
            base.mkdir(parents=True)
            extract(origin, src)
            # A build-tree file a test compares with the source (test-linuxdisk-copy-out.sh).
            shutil.copy(src / "plugins" / "linuxdisk" / "Makefile.am", src / "plugins" / "linuxdisk" / "Makefile")
            log_path = base / "build-data.log"
            with open(log_path, "wb") as log:
                try:
                    build_check_data(src, data, log)
                except (OSError, subprocess.SubprocessError) as e:
                    raise SuiteError(f"building the check data failed ({e}); see {log_path}") from None
            (base / ".complete").touch()
        return src, data


def make_tree(src: Path, data: Path, tree: Path, server: list[str]) -> None:
    """A tree for one run: tests/ copied (tests write their files there), the rest linked, and
    a top-level `nbdkit` that runs `server`."""
    tree.mkdir(parents=True)
    for entry in src.iterdir():
        if entry.name != "tests":
            (tree / entry.name).symlink_to(entry)
    shutil.copytree(src / "tests", tree / "tests", symlinks=True)
    wrapper = tree / "nbdkit"
    wrapper.write_text("#!/bin/sh\nexec " + " ".join(shell_quote(word) for word in server) + ' "$@"\n')
    wrapper.chmod(0o755)
    substitutions = {"@abs_top_srcdir@": str(tree), "@top_builddir@": str(tree), "@CXX@": "g++", "@OCAMLOPT@": "",
                     "@PYTHON@": "/usr/bin/python3", "@SOEXT@": "so", "@EXEEXT@": "", "@CUT@": "cut",
                     "@SED@": "sed", "@STAT@": "stat", "@TRUNCATE@": "truncate", "@plugins@": "",
                     "@configure_input@": "generated by nbdformats' harness"}
    functions = (src / "tests" / "functions.sh.in").read_text()
    for placeholder, value in substitutions.items():
        functions = functions.replace(placeholder, value)
    (tree / "tests" / "functions.sh").write_text(functions)
    for name in CHECK_DATA:
        if (data / name).is_dir():
            shutil.copytree(data / name, tree / "tests" / name)
        else:
            subprocess.run(["cp", "--sparse=always", str(data / name), str(tree / "tests" / name)], check=True)


def shell_quote(word: str) -> str:
    return "'" + word.replace("'", "'\\''") + "'"


@dataclass
class Result:
    name: str
    outcome: str  # PASS, FAIL, SKIP, TIMEOUT
    seconds: float
    log: Path

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def run_test(tree: Path, name: str, logs: Path, timeout: float = DEFAULT_TIMEOUT) -> Result:
    """Run tests/NAME as nbdkit's `make check` would, then end every process it left behind."""
    if not (tree / "tests" / name).is_file():
        raise SuiteError(f"no such test: {name}")
    marker = f"NBDFORMATS_SUITE_MARK={os.getpid()}.{time.monotonic_ns()}"
    env = {k: v for k, v in os.environ.items() if k not in ("LC_ALL", "NBDKIT_VALGRIND", "PYTHONPATH")}
    env.update(PATH=f"{tree}:{SYSTEM_PATH}", SRCDIR=".", srcdir=".", abs_top_srcdir=str(tree),
               abs_top_builddir=str(tree), top_builddir="..", LIBNBD_DEBUG="1", LANG="C.UTF-8")
    key, _, value = marker.partition("=")
    env[key] = value
    # A TMPDIR of the test's own, removed after it: some leave the server's files there on purpose
    # (test-captive kills it with SIGUSR1, whose default action gives it no chance to remove its -U -
    # directory).  Short, under /tmp: a Unix socket's path holds at most 107 bytes.
    tmpdir = tempfile.mkdtemp(prefix="nbdks-", dir="/tmp")
    env["TMPDIR"] = tmpdir
    log = logs / f"{name}.log"
    start = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", f"./{name}"], cwd=tree / "tests", env=env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out, start_new_session=True)
        try:
            code = proc.wait(timeout)
            outcome = {0: "PASS", 77: "SKIP"}.get(code, "FAIL")
        except subprocess.TimeoutExpired:
            outcome = "TIMEOUT"
        left = sweep(marker)
        if left:
            out.write(f"harness: ended processes the test left behind: {left}\n".encode())
    shutil.rmtree(tmpdir, ignore_errors=True)
    return Result(name, outcome, time.monotonic() - start, log)


# Failures of the machine, not of the server: qemu-img create -f luks benchmarks PBKDF2 first and gives
# up on a loaded machine, before any server runs (nbdkit's tests fail the same way with nbdkit).
MACHINE_FAILURES = ("Unable to get accurate CPU usage",)


def run_test_retrying(tree: Path, name: str, logs: Path, timeout: float = DEFAULT_TIMEOUT,
                      tries: int = 3) -> Result:
    """run_test, again (up to `tries` times) while it fails only because of the machine; the
    logs of the earlier tries are kept as NAME.tryN.log."""
    attempt = 1
    result = run_test(tree, name, logs, timeout)
    while attempt < tries and result.outcome == "FAIL" and \
            any(text in result.log.read_text(errors="replace") for text in MACHINE_FAILURES):
        result.log.rename(result.log.with_suffix(f".try{attempt}.log"))
        attempt += 1
        result = run_test(tree, name, logs, timeout)
    return result


def sweep(marker: str) -> list[str]:
    """End, by pid, the processes that carry `marker` in their environment (the test and
    everything it started, daemons included); returns their command lines."""
    def marked() -> dict[int, str]:
        found = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if marker.encode() not in f.read().split(b"\0"):
                        continue
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    found[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
        return found

    left = marked()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in marked():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while marked() and time.monotonic() < deadline:
            time.sleep(0.1)
    return [f"{pid} {cmd}" for pid, cmd in left.items()]


def read_list(path: Path) -> dict[str, str]:
    """A list file: one test a line, optionally followed by a reason; lines starting with # are comments."""
    entries: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, reason = line.strip().partition(" ")
            entries[name] = reason.strip()
    return entries


def nbdformats_command() -> list[str]:
    """`python -m nbdformats`, importing nbdformats from this checkout: the venv's editable install
    may point at another one (a worktree sharing the venv), and the tests' environment has no
    PYTHONPATH of ours (test-S3.sh sets its own)."""
    code = (f"import runpy, sys; sys.path.insert(0, {str(PROJECT)!r}); "
            "runpy.run_module('nbdformats', run_name='__main__', alter_sys=True)")
    return [sys.executable, "-c", code]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tests", nargs="*", metavar="TEST.sh")
    parser.add_argument("--list", type=Path, default=HERE / "expected-pass.txt",
                        help="run the tests this list file names (default: expected-pass.txt)")
    parser.add_argument("--server", choices=("nbdformats", "nbdkit"), default="nbdformats",
                        help="the server under test (nbdkit: the reference, /usr/bin/nbdkit)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds for one test")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (trees and logs)")
    args = parser.parse_args(argv)
    try:
        src, data = prepared()
    except SuiteError as e:
        print(f"nbdkit-suite: {e}", file=sys.stderr)
        return 2
    names = [os.path.basename(t) for t in args.tests] or list(read_list(args.list))
    work = Path(tempfile.mkdtemp(prefix="nbdkit-suite."))
    tree, logs = work / "tree", work / "logs"
    logs.mkdir()
    make_tree(src, data, tree, nbdformats_command() if args.server == "nbdformats" else [REFERENCE_NBDKIT])
    counts: dict[str, int] = {}
    started = time.monotonic()
    try:
        for name in names:
            try:
                result = run_test_retrying(tree, name, logs, args.timeout)
            except SuiteError as e:
                print(f"nbdkit-suite: {e}", file=sys.stderr)
                return 2
            counts[result.outcome] = counts.get(result.outcome, 0) + 1
            print(f"{name}\t{result.outcome}\t{result.seconds:.0f}" +
                  (f"\tlog={result.log}" if result.outcome in ("FAIL", "TIMEOUT") else ""), flush=True)
    finally:
        print(f"{args.server}: " + ", ".join(f"{n} {o.lower()}" for o, n in sorted(counts.items())) +
              f" in {time.monotonic() - started:.0f} s", flush=True)
        if args.keep or counts.get("FAIL") or counts.get("TIMEOUT"):
            print(f"nbdkit-suite: logs in {logs}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if counts.get("FAIL") or counts.get("TIMEOUT") else 0


if __name__ == "__main__":
    sys.exit(main())
