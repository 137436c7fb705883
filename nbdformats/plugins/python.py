"""python plugin: run an nbdkit Python plugin script unchanged (API_VERSION 1 and 2).

`nbdformats python SCRIPT.py [key=value ...]` loads the script as nbdkit's python plugin
does (nbdkit-python-plugin(3)): the script runs once as `__main__`, `import nbdkit` gives it
nbdformats.nbdkit_compat, every other key=value goes to its `config(key, value)`, and its
module-level functions (`open`, `get_size`, `pread`, `pwrite`, `zero`, `extents`, `can_*`...)
become the callbacks of one Handle per connection.  Where nbdkit's C core fills in for a
missing callback (can_write from pwrite, FUA by flush, zero by pwrite after EOPNOTSUPP) we do
the same, so a script behaves as under `nbdkit python`.

The script's code runs in this process: no embedded interpreter, no GIL hand-over and no
buffer conversion per request, which is where nbdkit's ~50 us per request go.
"""

from __future__ import annotations

import builtins
import errno
import logging
import operator
import os
import platform
import socket
import sys
import traceback
import types
from typing import Any, Callable

from .. import nbdkit_compat
from ..api.chain import (EMULATE, FLAG_FAST_ZERO, FLAG_FUA, FLAG_MAY_TRIM, NATIVE, NONE, Export, Extents,
                         Plugin, PluginHandle, ThreadModel, current_client, current_tls)
from ..api.errors import ConfigError, NBDError
from ..api.params import Param, Path
from ..api.zeroes import write_zeroes

logger = logging.getLogger("nbdformats.python")

MAX_API_VERSION = 2
# A script's sys.exit() fails its callback, as under nbdkit, instead of stopping the server.
CAUGHT = (Exception, SystemExit)

# Module-level functions of a script that nbdkit calls (nbdkit-python-plugin(3)).
CALLBACKS = (
    "dump_plugin", "config", "config_complete", "thread_model", "get_ready", "after_fork", "cleanup",
    "list_exports", "default_export", "preconnect", "open", "close", "export_description",
    "get_size", "block_size", "is_rotational", "can_multi_conn", "can_write", "can_flush",
    "can_trim", "can_zero", "can_fast_zero", "can_fua", "can_cache", "can_extents",
    "pread", "pwrite", "flush", "trim", "zero", "cache", "extents",
)
REQUIRED = ("open", "get_size", "pread")


def where(exc: BaseException, script: str) -> str:
    """`file:line: ` of the innermost frame of the script in a traceback, to point at the bug."""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if frame.filename == script:
            return f"{os.path.basename(script)}:{frame.lineno}: "
    return ""


def describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def load_script(path: str) -> types.ModuleType:
    """Run the script as nbdkit does (as `__main__`, with `nbdkit` importable); return its module."""
    sys.modules["nbdkit"] = nbdkit_compat
    try:
        with open(path, "rb") as f:
            source = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot open file: {e.strerror}") from None
    module = types.ModuleType("__main__")
    module.__file__ = path
    module.__builtins__ = builtins  # type: ignore[attr-defined]
    # Sibling modules of the script are importable (after everything else, so they cannot
    # shadow modules the server itself imports later).
    directory = os.path.dirname(path)
    if directory not in sys.path:
        sys.path.append(directory)
    try:
        exec(compile(source, path, "exec"), module.__dict__)
    except SyntaxError as e:
        raise ConfigError(f"{path}: error running this script: {describe(e)}") from None
    except CAUGHT as e:
        logger.debug("%s: error running this script:\n%s", path, "".join(traceback.format_exception(e)))
        raise ConfigError(f"{path}: error running this script: {where(e, path)}{describe(e)}") from None
    return module


def api_version_of(module: types.ModuleType, path: str) -> int:
    value = getattr(module, "API_VERSION", 1)  # scripts without it use the first API
    if not isinstance(value, int) or not 1 <= value <= MAX_API_VERSION:
        raise ConfigError(f"{path}: API_VERSION requested unknown version: {value!r}.  "
                          f"This plugin supports API versions between 1 and {MAX_API_VERSION}.")
    return value


def not_implemented(name: str) -> Callable[..., Any]:
    def missing(*args: Any) -> None:
        raise RuntimeError(f"{name} not implemented")
    return missing


class PythonPlugin(Plugin):
    """Runs an nbdkit Python plugin script unchanged (nbdkit python SCRIPT.py key=value ...)."""

    name = "python"
    accepts_any_key = True
    # nbdkit's default for scripts; a script's thread_model() may change it.
    thread_model = ThreadModel.SERIALIZE_ALL_REQUESTS
    has_thread_model = True

    script = Param(Path("file"), required=True, magic=True,
                   help="The nbdkit Python plugin script (API_VERSION 1 or 2); every other "
                        "key=value is passed to its config(key, value)")

    module: types.ModuleType  # the loaded script

    def __init__(self) -> None:
        super().__init__()
        self.script_pairs: list[tuple[str, str]] = []
        self.callbacks: dict[str, Callable[..., Any]] = {}
        self.script_name = "python"
        self.api_version = MAX_API_VERSION

    def config(self, key: str, value: str) -> None:
        # The script is loaded once all parameters are parsed; its config() gets these then.
        self.script_pairs.append((key, value))

    def config_complete(self) -> None:
        self.load(check_required=True)
        self.call_at_start("config_complete")
        self.set_thread_model()

    def load(self, check_required: bool) -> None:
        """Run the script and hand it the key=value pairs (its config callback)."""
        self.script_name = os.path.basename(self.script)
        self.module = load_script(self.script)
        self.api_version = api_version_of(self.module, self.script)
        self.find_callbacks()
        missing = [name for name in REQUIRED if name not in self.callbacks]
        if missing and check_required:
            raise ConfigError(f"{self.script}: one of the required callbacks 'open', 'get_size' or 'pread' "
                              f"is not defined by this Python script (missing: {', '.join(missing)})")
        for key, value in self.script_pairs:
            if "config" not in self.callbacks:
                raise ConfigError(f"{self.script}: this plugin does not need command line configuration "
                                  f"(got {key}=)")
            self.call_at_start("config", key, value)

    def set_thread_model(self) -> None:
        """The script's thread_model() if it has one, and whether its callbacks run in threads."""
        model = self.call_at_start("thread_model")
        if model is not None:
            try:
                self.thread_model = ThreadModel(model)  # type: ignore[misc]
            except (ValueError, TypeError):
                raise ConfigError(f"{self.script}: thread_model returned {model!r}, "
                                  "not one of nbdkit.THREAD_MODEL_*") from None

    def find_callbacks(self) -> None:
        namespace = vars(self.module)
        self.callbacks = {name: namespace[name] for name in CALLBACKS if callable(namespace.get(name))}

    def call_at_start(self, name: str, *args: Any) -> Any:
        """Call a start-up callback if the script defines it; its failure stops the server."""
        function = self.callbacks.get(name)
        if function is None:
            return None
        state = nbdkit_compat.call_state
        state.connection, state.error = None, 0  # no connection: export_name() fails, as nbdkit's
        try:
            return function(*args)
        except CAUGHT as e:
            logger.debug("%s: %s failed:\n%s", self.script, name, "".join(traceback.format_exception(e)))
            raise ConfigError(f"{self.script_name}: {name}: {where(e, self.script)}{describe(e)}") from None

    def get_ready(self) -> None:
        self.call_at_start("get_ready")
        # We do not fork into the background, so the process is final now.
        self.call_at_start("after_fork")
        # Scripts may (re)define functions while configuring; what exists now is what we call.
        self.find_callbacks()

    def cleanup(self) -> None:
        function = self.callbacks.get("cleanup")
        if function is None:
            return
        try:
            function()
        except CAUGHT as e:
            logger.error("%s: cleanup: %s%s", self.script_name, where(e, self.script), describe(e))

    def dump_plugin(self) -> None:
        """Print what nbdkit's `--dump-plugin` prints for this plugin, then run the script's dump_plugin.

        With a script given, it is loaded and gets its config(key, value) calls first, but
        not config_complete, as under nbdkit; its thread_model() sets ours.
        """
        if vars(self).get("script") and not self.callbacks:  # parsed from the command line
            self.load(check_required=False)
            self.set_thread_model()
        print(f"python_version={platform.python_version()}")
        print("python_pep_384_abi_version=3")
        print(f"nbdkit_python_maximum_api_version={MAX_API_VERSION}", flush=True)
        if "dump_plugin" in self.callbacks:
            self.call_at_start("dump_plugin")

    def call_export_callback(self, name: str, *args: Any) -> Any:
        state = nbdkit_compat.call_state
        state.connection, state.error = None, 0  # no connection: export_name() fails, as nbdkit's
        try:
            return self.callbacks[name](*args)
        except CAUGHT as e:
            message = f"{self.script_name}: {name}: {where(e, self.script)}{describe(e)}"
            raise NBDError(nbdkit_compat.take_error(), message) from None

    def list_exports(self, readonly: bool, is_tls: bool) -> list[Export]:
        if "list_exports" not in self.callbacks:
            return super().list_exports(readonly, is_tls)
        result = self.call_export_callback("list_exports", readonly, is_tls)
        exports = []
        try:
            for item in result:
                if isinstance(item, (str, bytes)):
                    exports.append(Export(text_of(item)))
                elif isinstance(item, tuple) and len(item) == 2:
                    exports.append(Export(text_of(item[0]), text_of(item[1])))
                else:
                    raise TypeError("list_exports method did not return an iterable of names "
                                    "or (name, description) string 2-tuples")
        except CAUGHT as e:
            raise NBDError(errno.EIO, f"{self.script_name}: list_exports: {describe(e)}") from None
        return exports

    def default_export(self, readonly: bool, is_tls: bool) -> str:
        if "default_export" not in self.callbacks:
            return ""
        name = self.call_export_callback("default_export", readonly, is_tls)
        if not isinstance(name, (str, bytes)):
            raise NBDError(errno.EIO, f"{self.script_name}: default_export method did not return a string")
        return text_of(name)

    def open(self, readonly: bool, export_name: str) -> PluginHandle:
        handle_class = Handle if self.api_version >= 2 else HandleV1
        return handle_class(self, readonly, export_name)


def text_of(value: str | bytes) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if isinstance(value, str):
        return value
    raise TypeError(f"expected a string, got {type(value).__name__}")


class Handle(PluginHandle):
    """One connection: the script's handle `h` (what its open() returned) and its callbacks.

    Data callbacks set the per-thread call state (for nbdkit.export_name, set_error...) and
    turn the script's exceptions into NBDError with the errno of set_error, else EIO.
    """

    def __init__(self, plugin: PythonPlugin, readonly: bool, export_name: str) -> None:
        self.script = plugin.script
        self.script_name = plugin.script_name
        self.export_name = export_name
        self.callbacks = callbacks = plugin.callbacks
        # The client's socket and TLS state, for nbdkit.peer_*() and is_tls(); None when the
        # handle is opened outside a server connection (then those functions raise).
        self.sock: socket.socket | None = current_client()
        self.tls: bool | None = current_tls()
        self._pread = callbacks["pread"]
        self._pwrite = callbacks.get("pwrite") or not_implemented("pwrite")
        self._flush = callbacks.get("flush") or not_implemented("flush")
        self._trim = callbacks.get("trim") or not_implemented("trim")
        self._zero = callbacks.get("zero")
        self._cache = callbacks.get("cache") or not_implemented("cache")
        self._extents = callbacks.get("extents")
        self.can_zero_answer: bool | None = None
        if "preconnect" in callbacks:
            self.call("preconnect", readonly)
        self.h = self.call("open", readonly)

    # -- calling the script

    def failed(self, name: str, exc: BaseException) -> NBDError:
        """The NBDError for a callback that raised: errno from set_error, else the NBDError's, else EIO."""
        default = exc.errno if isinstance(exc, NBDError) else errno.EIO
        message = f"{self.script_name}: {name}: {where(exc, self.script)}{describe(exc)}"
        # Like nbdkit, report the script's failures; the traceback with -v.
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s failed:\n%s", name, "".join(traceback.format_exception(exc)))
        logger.warning("%s", message)
        return NBDError(nbdkit_compat.take_error(default), message)

    def call(self, name: str, *args: Any) -> Any:
        state = nbdkit_compat.call_state
        state.connection = self
        state.error = 0
        try:
            return self.callbacks[name](*args)
        except CAUGHT as e:
            raise self.failed(name, e) from None

    def answer(self, name: str, fallback: bool) -> bool:
        """A boolean can_* / is_* answer: the script's if it has the callback, else `fallback`."""
        if name in self.callbacks:
            return bool(self.call(name, self.h))
        return fallback

    def tri_state(self, name: str, fallback: int) -> int:
        if name not in self.callbacks:
            return fallback
        value = self.call(name, self.h)
        if value not in (NONE, EMULATE, NATIVE):
            raise NBDError(errno.EINVAL, f"{self.script_name}: {name} returned {value!r}, "
                                         "not NONE, EMULATE or NATIVE")
        return int(value)

    # -- what nbdkit_compat asks of a connection

    def request_disconnect(self, force: bool) -> None:
        # As nbdkit's graceful disconnect: the request running now completes, later ones fail
        # with ESHUTDOWN.  (Dropping the connection at once, force=True, needs the server.)
        def disconnected(*args: Any) -> None:
            raise NBDError(errno.ESHUTDOWN, "the plugin disconnected this client")
        for attr in ("_pread", "_pwrite", "_flush", "_trim", "_zero", "_cache", "_extents"):
            setattr(self, attr, disconnected)

    def peer_socket(self) -> socket.socket | None:
        return self.sock

    def is_tls(self) -> bool:
        if self.tls is None:
            raise RuntimeError("nbdkit.is_tls: the TLS state of this connection is not known")
        return self.tls

    # -- sizes and capabilities, asked once per connection

    def export_description(self) -> str | None:
        if "export_description" not in self.callbacks:
            return None
        description = self.call("export_description", self.h)
        if not isinstance(description, str):
            raise NBDError(errno.EIO, f"{self.script_name}: export_description returned "
                                      f"{type(description).__name__}, not a string")
        return description

    def get_size(self) -> int:
        size = self.call("get_size", self.h)
        try:
            size = operator.index(size)
        except TypeError:
            raise NBDError(errno.EIO, f"{self.script_name}: get_size returned {type(size).__name__}, "
                                      "not an integer") from None
        if size < 0:
            raise NBDError(errno.EIO, f"{self.script_name}: get_size returned a negative size {size}")
        return size

    def block_size(self) -> tuple[int, int, int] | None:
        if "block_size" not in self.callbacks:
            return None
        value = self.call("block_size", self.h)
        try:
            minimum, preferred, maximum = (operator.index(v) for v in value)
        except (TypeError, ValueError):
            raise NBDError(errno.EINVAL, f"{self.script_name}: block_size must return three integers "
                                         "(minimum, preferred, maximum)") from None
        if minimum == preferred == maximum == 0:
            return None  # nbdkit's "no constraints"
        problem = block_size_problem(minimum, preferred, maximum)
        if problem:
            raise NBDError(errno.EINVAL, f"{self.script_name}: block_size {value!r}: {problem}")
        return minimum, preferred, maximum

    def can_write(self) -> bool:
        return self.answer("can_write", "pwrite" in self.callbacks)

    def can_flush(self) -> bool:
        return self.answer("can_flush", "flush" in self.callbacks)

    def is_rotational(self) -> bool:
        return self.answer("is_rotational", False)

    def can_trim(self) -> bool:
        return self.answer("can_trim", "trim" in self.callbacks)

    def can_zero(self) -> int:
        # A script answers whether to call its zero(); otherwise the core writes zeroes.
        if self.can_zero_answer is None:
            self.can_zero_answer = self.answer("can_zero", "zero" in self.callbacks)
        return NATIVE if self.can_zero_answer else EMULATE

    def can_fast_zero(self) -> bool:
        # Without the callback: fast only when zeroing is emulated (it then fails at once).
        if "can_fast_zero" in self.callbacks:
            return self.answer("can_fast_zero", False)
        return self.can_zero() != NATIVE

    def can_fua(self) -> int:
        return self.tri_state("can_fua", EMULATE if "flush" in self.callbacks else NONE)

    def can_multi_conn(self) -> bool:
        return self.answer("can_multi_conn", False)

    def can_extents(self) -> bool:
        return self.answer("can_extents", "extents" in self.callbacks)

    def can_cache(self) -> int:
        return self.tri_state("can_cache", NATIVE if "cache" in self.callbacks else NONE)

    # -- data callbacks (API_VERSION 2: the script fills/reads our buffer, flags passed on)

    def _call(self, name: str, function: Any, *args: Any) -> None:
        """Call a script callback for this connection; its failure fails the request (set_error's errno)."""
        state = nbdkit_compat.call_state
        state.connection = self
        state.error = 0
        try:
            function(self.h, *args)
        except CAUGHT as e:
            raise self.failed(name, e) from None

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        self._call("pread", self._pread, buf, offset, flags)

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        self._call("pwrite", self._pwrite, buf.toreadonly(), offset, flags)

    def flush(self, flags: int) -> None:
        self._call("flush", self._flush, flags)

    def trim(self, count: int, offset: int, flags: int) -> None:
        self._call("trim", self._trim, count, offset, flags)

    def call_zero(self, count: int, offset: int, flags: int) -> None:
        self._zero(self.h, count, offset, flags)  # type: ignore[misc]

    def zero(self, count: int, offset: int, flags: int) -> None:
        # nbdkit: a zero() that sets EOPNOTSUPP/ENOTSUP (raising or not) falls back to pwrite
        # of zeroes, unless the client asked for a fast zero.
        if self._zero is not None:
            state = nbdkit_compat.call_state
            state.connection = self
            state.error = 0
            try:
                self.call_zero(count, offset, flags)
            except CAUGHT as e:
                if state.error not in (errno.EOPNOTSUPP, errno.ENOTSUP):
                    raise self.failed("zero", e) from None
            else:
                if state.error not in (errno.EOPNOTSUPP, errno.ENOTSUP):
                    return
            state.error = 0
        if flags & FLAG_FAST_ZERO:
            raise NBDError(errno.ENOTSUP, "fast zero is not possible: the plugin would write zeroes")
        write_zeroes(self.pwrite, count, offset, flags & FLAG_FUA)

    def cache(self, count: int, offset: int, flags: int) -> None:
        self._call("cache", self._cache, count, offset, flags)

    def extents(self, count: int, offset: int, flags: int, extents: Extents) -> None:
        if self._extents is None:  # can_extents said yes without an extents(): all data, as nbdkit
            extents.add(offset, count, 0)
            return
        state = nbdkit_compat.call_state
        state.connection = self
        state.error = 0
        try:
            added = 0
            for item in self._extents(self.h, count, offset, flags):
                if not (isinstance(item, tuple) and len(item) == 3):
                    raise TypeError("extents method did not return an iterable of 3-tuples")
                extents.add(*item)
                added += 1
            if not added:
                raise ValueError("extents method cannot return an empty list")
        except CAUGHT as e:
            raise self.failed("extents", e) from None

    def close(self) -> None:
        state = nbdkit_compat.call_state
        try:
            if "close" in self.callbacks:
                state.connection = self
                try:
                    self.callbacks["close"](self.h)
                except CAUGHT as e:
                    logger.error("%s: close: %s%s", self.script_name, where(e, self.script), describe(e))
        finally:
            state.connection = None
            self.h = None


class HandleV1(Handle):
    """API_VERSION 1 (scripts without API_VERSION): pread returns the data, no flags arguments."""

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        state = nbdkit_compat.call_state
        state.connection = self
        state.error = 0
        count = len(buf)
        try:
            data = memoryview(self._pread(self.h, count, offset)).cast("B")
            if len(data) < count:
                raise ValueError(f"buffer returned from pread is too small ({len(data)} < {count} bytes)")
            buf[:] = data[:count]
        except CAUGHT as e:
            raise self.failed("pread", e) from None

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        self._call("pwrite", self._pwrite, buf.toreadonly(), offset)

    def flush(self, flags: int) -> None:
        self._call("flush", self._flush)

    def trim(self, count: int, offset: int, flags: int) -> None:
        self._call("trim", self._trim, count, offset)

    def call_zero(self, count: int, offset: int, flags: int) -> None:
        self._zero(self.h, count, offset, bool(flags & FLAG_MAY_TRIM))  # type: ignore[misc]


def block_size_problem(minimum: int, preferred: int, maximum: int) -> str:
    """Why (minimum, preferred, maximum) breaks nbdkit's block size rules, or ""."""
    def power_of_two(n: int) -> bool:
        return n > 0 and n & (n - 1) == 0
    if not (power_of_two(minimum) and minimum <= 65536):
        return "minimum must be a power of 2 between 1 and 64K"
    if not (power_of_two(preferred) and 512 <= preferred <= 32 * 1024 * 1024):
        return "preferred must be a power of 2 between 512 and 32M"
    if preferred < minimum:
        return "preferred must be at least minimum"
    if maximum != 0xFFFFFFFF and (maximum < preferred or maximum % minimum):
        return "maximum must be 0xffffffff or a multiple of minimum, at least preferred"
    return ""


PLUGIN = PythonPlugin
