"""eval plugin: a plugin written as shell snippets on the command line (nbdkit-eval-plugin compatible).

Each `METHOD=SCRIPT` parameter is the /bin/sh script of one method of the sh plugin's protocol
(_scripted.py), saved in $tmpdir.  A method without a script runs `missing=` (default `exit 2`,
"not implemented").  As nbdkit, a defined pwrite, flush, trim, zero or extents makes the
matching can_* true unless given, and a defined cache makes can_cache "native".  Other key=value
parameters go to the `config` method.
"""

from __future__ import annotations

import os

from ..api.errors import ConfigError
from ..api.params import Param, String
from ._scripted import ScriptedPlugin, Status

METHODS = ("after_fork", "block_size", "cache", "can_cache", "can_extents", "can_fast_zero", "can_flush", "can_fua",
           "can_multi_conn", "can_trim", "can_write", "can_zero", "close", "config", "config_complete",
           "default_export", "dump_plugin", "export_description", "extents", "flush", "get_ready", "get_size",
           "is_rotational", "list_exports", "open", "pread", "preconnect", "pwrite", "thread_model", "trim",
           "unload", "zero")
# can_* methods implied by the method they ask about, and their script (as nbdkit's eval).
IMPLIED = {"can_write": ("pwrite", "exit 0"), "can_flush": ("flush", "exit 0"), "can_trim": ("trim", "exit 0"),
           "can_zero": ("zero", "exit 0"), "can_extents": ("extents", "exit 0"), "can_cache": ("cache", "echo native")}


class EvalPlugin(ScriptedPlugin):
    """A plugin written as shell snippets on the command line: METHOD='SCRIPT' ..."""

    name = "eval"
    accepts_any_key = True  # parameters for the config method
    missing = Param(String(), default="exit 2", help="The script of every method not given (default: exit 2, "
                                                     "not implemented)")

    def __init__(self) -> None:
        self.scripts: dict[str, str] = {}
        self.user_parameters: list[tuple[str, str]] = []

    def given(self, method: str) -> str | None:
        return getattr(self, f"{method}_script")

    def script_for(self, method: str) -> str:
        if method not in self.scripts:
            text = self.given(method) if method in METHODS else None
            if text is None and method in IMPLIED and self.given(IMPLIED[method][0]) is not None:
                text = IMPLIED[method][1]
            if text is None:
                return self.script_for("missing") if method != "missing" else self._save("missing", self.missing)
            self.scripts[method] = self._save(method, text)
        return self.scripts[method]

    def _save(self, method: str, text: str) -> str:
        path = os.path.join(self.tmpdir, method)
        with open(path, "w") as f:
            f.write(text if text.endswith("\n") or not text else text + "\n")
        os.chmod(path, 0o500)
        self.scripts[method] = path
        return path

    def config(self, key: str, value: str) -> None:
        if "." in key or "/" in key:
            raise ConfigError(f"eval: method name {key} is invalid")
        self.user_parameters.append((key, value))

    def config_complete(self) -> None:
        # Method scripts are known only now (parameters are parsed together): the config
        # method then gets the other parameters in command-line order.
        for key, value in self.user_parameters:
            status, _ = self.config_call("config", key, value)
            if status == Status.MISSING:
                raise ConfigError(f"eval: callback '{key}' is unknown, and there is no 'config' callback to handle it")
        self.config_call("config_complete")
        self.settle_thread_model()

    def dump_plugin(self) -> None:
        self.settle_thread_model()  # --dump-plugin shows the script's
        super().dump_plugin()


for _method in METHODS:
    _param = Param(String(), key=_method, help=f"The /bin/sh script of the {_method} method")
    _param.__set_name__(EvalPlugin, f"{_method}_script")
    setattr(EvalPlugin, f"{_method}_script", _param)

PLUGIN = EvalPlugin
