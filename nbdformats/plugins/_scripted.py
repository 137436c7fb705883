"""nbdkit's script plugin protocol, shared by the sh and eval plugins (see docs/plugins/sh.md).

Each method is a run of a script, `SCRIPT METHOD ARGS...`, with $tmpdir in its environment: a
directory of the plugin's own, removed when the server exits.  Exit status 0 is success (true),
2 "method missing", 3 false, and anything else an error whose errno name and message the script
prints on standard error (`ENOSPC Out of space`).  The subclasses say which script runs a method.
"""

from __future__ import annotations

import atexit
import errno
import logging
import os
import shutil
import tempfile
from enum import IntEnum
from typing import Callable

from ..api.chain import (EMULATE, EXTENT_HOLE, EXTENT_ZERO, FLAG_FAST_ZERO, FLAG_FUA, FLAG_MAY_TRIM, FLAG_REQ_ONE,
                         DEFAULT_EXPORT, NATIVE, NONE, Export, Extents, Plugin, PluginHandle, ThreadModel, current_tls)
from ..api.errors import ConfigError, NBDError
from ..api.params import parse_size
from ..api.zeroes import write_zeroes
from . import _subprocess

log = logging.getLogger(__name__)

CALL_TIMEOUT = 600  # seconds a method may run before it is killed (nbdkit waits for ever)
ANSWER_LIMIT = 16 << 20  # bytes of output of a method other than pread (sizes, lists, extents)

# The errno names a script may print (the ones NBD can carry, and those nbdkit maps specially);
# checked in this order, as prefixes of standard error, in any case.
ERRNO_NAMES = [("EPERM", errno.EPERM), ("EIO", errno.EIO), ("ENOMEM", errno.ENOMEM), ("EINVAL", errno.EINVAL),
               ("ENOSPC", errno.ENOSPC), ("EOVERFLOW", errno.EOVERFLOW), ("ESHUTDOWN", errno.ESHUTDOWN),
               ("ENOTSUP", errno.ENOTSUP), ("EOPNOTSUPP", errno.EOPNOTSUPP), ("EROFS", errno.EROFS),
               ("EDQUOT", errno.EDQUOT), ("EFBIG", errno.EFBIG)]
THREAD_MODELS = {"parallel": ThreadModel.PARALLEL, "serialize_requests": ThreadModel.SERIALIZE_REQUESTS,
                 "serialize_all_requests": ThreadModel.SERIALIZE_ALL_REQUESTS,
                 "serialize_connections": ThreadModel.SERIALIZE_CONNECTIONS}
CACHE_OR_FUA = {"none": NONE, "emulate": EMULATE, "native": NATIVE}


class Status(IntEnum):
    OK = 0
    ERROR = 1  # and every status but 0, 2 and 3
    MISSING = 2
    FALSE = 3


class ScriptError(NBDError):
    """A method failed: its errno and the first line of its message."""


def parse_error(stderr: bytes, script: str) -> ScriptError:
    """The errno a failed script names at the start of standard error (EIO if none), and its message."""
    text = stderr.decode(errors="replace")
    code, rest = errno.EIO, text
    for name, number in ERRNO_NAMES:
        if text[:len(name)].upper() == name:
            after = text[len(name):]
            if not after or after[0].isspace():
                code, rest = number, after.lstrip()
            break  # a longer word (EINVALID) is no errno name: EIO, whole text shown
    lines = rest.rstrip("\n").split("\n")
    if len(lines) > 1:
        log.debug("%s: %s", script, text.rstrip("\n"))
    message = lines[0] or text.strip() or "script exited with error, but did not print an error message on stderr"
    return ScriptError(code, f"{script}: {message}")


def flags_text(flags: int) -> str:
    names = [(FLAG_FUA, "fua"), (FLAG_MAY_TRIM, "may_trim"), (FLAG_REQ_ONE, "req_one"), (FLAG_FAST_ZERO, "fast")]
    return ",".join(name for flag, name in names if flags & flag)


def parse_exports(text: str) -> list[Export]:
    """list_exports output: a first line NAMES (the default), INTERLEAVED or NAMES+DESCRIPTIONS, then
    lines; as nbdkit, only lines ending in a newline count."""
    mode, _, body = text.partition("\n") if text.split("\n", 1)[0] in ("NAMES", "INTERLEAVED",
                                                                       "NAMES+DESCRIPTIONS") else ("NAMES", "", text)
    lines = body.split("\n")[:-1]  # the text after the last newline is not a line
    if mode == "NAMES":
        return [Export(name) for name in lines]
    if mode == "INTERLEAVED":
        return [Export(lines[i], lines[i + 1] if i + 1 < len(lines) else "") for i in range(0, len(lines), 2)]
    half = (len(lines) + 1) // 2
    names, descriptions = lines[:half], lines[half:]
    return [Export(name, descriptions[i] if i < len(descriptions) else "") for i, name in enumerate(names)]


def first_export(text: str) -> str:
    """default_export output: a name, or any list_exports form (its first name)."""
    for header in ("INTERLEAVED\n", "NAMES+DESCRIPTIONS\n", "NAMES\n"):
        if text.startswith(header):
            text = text[len(header):]
            break
    return text.split("\n", 1)[0]


def parse_extents(text: str, script: str, extents: Extents) -> None:
    for line in text.split("\n"):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 2:
            raise NBDError(errno.EIO, f"{script}: extents: cannot parse {line!r}")
        try:
            offset, length = parse_size(fields[0]), parse_size(fields[1])
        except ValueError as e:
            raise NBDError(errno.EIO, f"{script}: extents: {e}") from None
        kind = 0
        if len(fields) > 2:
            if fields[2].isdigit():
                kind = int(fields[2]) & 0xFFFFFFFF
            else:
                kind = (EXTENT_HOLE if "hole" in fields[2] else 0) | (EXTENT_ZERO if "zero" in fields[2] else 0)
        extents.add(offset, length, kind)


def as_text(data: bytes) -> str:
    return data.decode(errors="replace")


def chomp(text: str) -> str:
    return text[:-1] if text.endswith("\n") else text


class ScriptedPlugin(Plugin):
    """What the sh and eval plugins share: calling methods, and the handle."""

    has_thread_model = True

    _tmpdir: str | None = None

    @property
    def tmpdir(self) -> str:
        """$tmpdir, for the scripts' own use, made when first needed and removed when the server exits."""
        if self._tmpdir is None:
            self._tmpdir = tempfile.mkdtemp(prefix="nbdformats-sh-")
            atexit.register(shutil.rmtree, self._tmpdir, ignore_errors=True)
        return self._tmpdir

    def script_for(self, method: str) -> str | None:
        """The script that runs `method`, or None when there is none at all."""
        raise NotImplementedError

    def call(self, method: str, *args: str, input: bytes | memoryview = b"",
             limit: int = ANSWER_LIMIT) -> tuple[Status, bytes]:
        """Run a method: its status and standard output; a failure raises ScriptError."""
        script = self.script_for(method)
        if script is None:
            return Status.MISSING, b""
        try:
            result = _subprocess.run([script, method, *args], stdout_limit=limit, timeout=CALL_TIMEOUT, input=input,
                                     env=dict(os.environ, tmpdir=self.tmpdir))  # not the server's own (nor --run's)
        except _subprocess.ScriptFailed as e:
            raise ScriptError(errno.EIO, f"{method}: {e}") from None
        if result.status < 0:
            raise ScriptError(errno.EIO, f"{script}: {method}: script terminated by signal {-result.status}")
        if result.status not in (0, 2, 3):
            raise parse_error(result.stderr, script)  # its own error first, whatever it read
        if result.stdin_refused:
            raise ScriptError(errno.EIO, f"{script}: {method}: the script exited without reading all its input "
                                         "(a bug in the script)")
        return Status(result.status), result.stdout

    def expect(self, method: str, allowed: tuple[Status, ...], *args: str, **kw) -> tuple[Status, bytes]:
        """call(), with statuses the method may not return (3 where no boolean is asked) as errors."""
        status, out = self.call(method, *args, **kw)
        if status not in allowed:
            raise ScriptError(errno.EIO, f"{self.script_for(method)}: {method} method returned unexpected code "
                                         f"({int(status)}/{status.name.lower()})")
        return status, out

    def config_call(self, method: str, *args: str) -> tuple[Status, bytes]:
        """A method called at start-up: its errors stop the server."""
        try:
            return self.expect(method, (Status.OK, Status.MISSING), *args)
        except ScriptError as e:
            raise ConfigError(f"{self.name}: {e}") from None

    def settle_thread_model(self) -> None:
        """As nbdkit: a script without a thread_model method (or an answer not understood) is run
        serialize_all_requests."""
        self.thread_model = ThreadModel.SERIALIZE_ALL_REQUESTS  # the chain reads it after configure
        status, out = self.config_call("thread_model")
        if status == Status.OK:
            text = chomp(as_text(out)).lower().replace("-", "_")
            model = THREAD_MODELS.get(text)
            if model is None:
                log.debug("ignoring unrecognized thread model: %s", text)
            else:
                self.thread_model = model

    def dump_plugin(self) -> None:
        print(f"max_known_status={int(Status.FALSE)}")
        if self.script_for("dump_plugin") is None:
            return
        try:
            status, out = self.expect("dump_plugin", (Status.OK, Status.MISSING))
        except ScriptError as e:
            log.error("%s", e)
            return
        print(as_text(out), end="")

    def get_ready(self) -> None:
        self.config_call("get_ready")
        # nbdkit calls after_fork once the server has detached; here get_ready is the last call
        # before serving, so after_fork follows it at once.
        self.config_call("after_fork")

    def cleanup(self) -> None:
        try:
            self.call("unload")
        except ScriptError as e:
            log.debug("unload: %s", e)  # as nbdkit: errors of unload are ignored

    def preconnect(self, client: object, readonly: bool) -> None:
        self.expect("preconnect", (Status.OK, Status.MISSING), str(readonly).lower())

    def list_exports(self, readonly: bool, is_tls: bool) -> list[Export]:
        status, out = self.expect("list_exports", (Status.OK, Status.MISSING), str(readonly).lower(),
                                  str(is_tls).lower())
        if status == Status.OK:
            return parse_exports(as_text(out))
        return [DEFAULT_EXPORT]

    def default_export(self, readonly: bool, is_tls: bool) -> str:
        status, out = self.expect("default_export", (Status.OK, Status.MISSING), str(readonly).lower(),
                                  str(is_tls).lower())
        return first_export(as_text(out)) if status == Status.OK else ""

    class Handle(PluginHandle):
        def __init__(self, plugin: "ScriptedPlugin", readonly: bool, export_name: str) -> None:
            self.plugin = plugin
            status, out = plugin.expect("open", (Status.OK, Status.MISSING), str(readonly).lower(), export_name,
                                        str(bool(current_tls())).lower())
            self.id = chomp(as_text(out)) if status == Status.OK else ""
            self.answers: dict[str, bool] = {}  # boolean methods are asked once per connection

        def _call(self, method: str, *args: str, allowed: tuple[Status, ...] = (Status.OK, Status.MISSING),
                  **kw) -> tuple[Status, bytes]:
            return self.plugin.expect(method, allowed, self.id, *args, **kw)

        def _boolean(self, method: str) -> bool:
            """Exit status 0: true, 3: false; a missing method is false."""
            if method not in self.answers:
                status, _ = self._call(method, allowed=(Status.OK, Status.MISSING, Status.FALSE))
                self.answers[method] = status == Status.OK
            return self.answers[method]

        def _mode(self, method: str, missing: Callable[[], int]) -> int:
            status, out = self._call(method)
            if status == Status.MISSING:
                return missing()
            answer = chomp(as_text(out)).lower()
            if answer not in CACHE_OR_FUA:
                raise ScriptError(errno.EIO, f"{self.plugin.script_for(method)}: could not parse output from "
                                             f"{method} method: {answer}")
            return CACHE_OR_FUA[answer]

        def get_size(self) -> int:
            status, out = self._call("get_size")
            if status == Status.MISSING:
                raise ScriptError(errno.EIO, f"{self.plugin.script_for('get_size')}: the get_size method is required")
            try:
                return parse_size(chomp(as_text(out)))
            except ValueError:
                raise ScriptError(errno.EIO, f"{self.plugin.script_for('get_size')}: could not parse output from "
                                             f"get_size method: {chomp(as_text(out))}") from None

        def block_size(self) -> tuple[int, int, int] | None:
            status, out = self._call("block_size")
            if status == Status.MISSING:
                return None
            try:
                sizes = [parse_size(field) for field in as_text(out).split()[:3]]
            except ValueError:
                sizes = []
            if len(sizes) != 3 or max(sizes) > 0xFFFFFFFF:
                raise ScriptError(errno.EIO, f"{self.plugin.script_for('block_size')}: block_size method cannot "
                                             "be parsed")
            return sizes[0], sizes[1], sizes[2]

        def export_description(self) -> str | None:
            try:
                status, out = self._call("export_description")
            except ScriptError as e:  # as nbdkit: no description then
                log.error("%s", e)
                return None
            return chomp(as_text(out)) if status == Status.OK else None

        def can_write(self) -> bool:
            return self._boolean("can_write")

        def can_flush(self) -> bool:
            return self._boolean("can_flush")

        def is_rotational(self) -> bool:
            return self._boolean("is_rotational")

        def can_trim(self) -> bool:
            return self._boolean("can_trim")

        def can_zero(self) -> int:
            # A script that cannot zero still gets zeroes, written by pwrite, as in nbdkit.
            return NATIVE if self._boolean("can_zero") else EMULATE

        def can_fast_zero(self) -> bool:
            status, _ = self._call("can_fast_zero", allowed=(Status.OK, Status.MISSING, Status.FALSE))
            if status == Status.MISSING:  # as nbdkit: fast zero fails fast when zeroing is emulated
                return not self._boolean("can_zero")
            return status == Status.OK

        def can_extents(self) -> bool:
            return self._boolean("can_extents")

        def can_multi_conn(self) -> bool:
            return self._boolean("can_multi_conn")

        def can_fua(self) -> int:
            return self._mode("can_fua", lambda: EMULATE if self.can_flush() else NONE)

        def can_cache(self) -> int:
            return self._mode("can_cache", lambda: NONE)

        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            status, out = self._call("pread", str(len(buf)), str(offset), limit=len(buf))
            if status == Status.MISSING:
                raise ScriptError(errno.EIO, f"{self.plugin.script_for('pread')}: the pread method is required")
            if len(out) != len(buf):
                raise ScriptError(errno.EIO, f"{self.plugin.script_for('pread')}: incorrect amount of data read: "
                                             f"expecting {len(buf)} bytes but received {len(out)} bytes from the "
                                             "script")
            buf[:] = out

        def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
            status, _ = self._call("pwrite", str(len(buf)), str(offset), flags_text(flags), input=buf)
            if status == Status.MISSING:
                raise ScriptError(errno.EIO, "pwrite not implemented")

        def flush(self, flags: int) -> None:
            self._call("flush")

        def trim(self, count: int, offset: int, flags: int) -> None:
            self._call("trim", str(count), str(offset), flags_text(flags))

        def zero(self, count: int, offset: int, flags: int) -> None:
            try:
                status, _ = self._call("zero", str(count), str(offset), flags_text(flags))
            except ScriptError as e:
                if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
                status = Status.MISSING
            if status == Status.MISSING:  # as nbdkit: write the zeroes instead, unless asked to be fast
                if flags & FLAG_FAST_ZERO:
                    raise NBDError(errno.ENOTSUP, "zero: fast zero is not possible: zeroes would be written")
                log.debug("zero falling back to pwrite")
                write_zeroes(self.pwrite, count, offset, flags & FLAG_FUA)

        def extents(self, count: int, offset: int, flags: int, extents: Extents) -> None:
            status, out = self._call("extents", str(count), str(offset), flags_text(flags))
            script = self.plugin.script_for("extents") or "extents"
            if status == Status.MISSING:
                raise ScriptError(errno.EIO, f"{script}: can_extents returned true, but extents method is not "
                                             "defined")
            parse_extents(as_text(out), script, extents)

        def cache(self, count: int, offset: int, flags: int) -> None:
            self._call("cache", str(count), str(offset))

        def close(self) -> None:
            try:
                self.plugin.call("close", self.id)
            except ScriptError as e:
                log.debug("close: %s", e)  # as nbdkit: errors of close are ignored
