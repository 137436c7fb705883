"""sh plugin: a plugin written as a script or any executable (nbdkit-sh-plugin compatible).

nbdkit runs `SCRIPT METHOD ARGS...` for each method (the protocol is in _scripted.py).  The
first parameter is the script (`-` reads an inline script from standard input); the others go to
the script's `config` method, in order, and bare words after the script to the key its
`magic_config_key` method names.
"""

from __future__ import annotations

import os
import stat
import sys
from typing import Iterable

from ..api.chain import stdio_safe
from ..api.errors import ConfigError
from ..api.params import Param, String, apply_params
from ._scripted import ScriptedPlugin, Status, as_text, chomp


class ShPlugin(ScriptedPlugin):
    """A plugin written as a shell script or any executable, called once per method."""

    name = "sh"
    accepts_any_key = True  # the script's own parameters
    script = Param(String(), magic=True, help="The script (an executable), or - to read one from standard input; "
                                              "it must be the first parameter")

    def configure(self, pairs: Iterable[tuple[str, str]]) -> None:
        # As nbdkit: the script comes first and is loaded at once; the other parameters then go
        # to it in command-line order (bare words to its magic_config_key).
        pairs = list(pairs)
        if not pairs or pairs[0][0] != "script":
            raise ConfigError("sh: the first parameter must be script=/path/to/script")
        apply_params(self, pairs[:1], self.name)
        self.load()
        for key, value in pairs[1:]:
            self.config(key, value)
        self.config_complete()

    def load(self) -> None:
        """The script's path, its load method, and its magic_config_key."""
        if self.script == "-":
            self.path = self.inline_script()
        else:
            self.path = os.path.realpath(self.script)
            if not os.path.isfile(self.path):
                raise ConfigError(f"sh: {self.script}: no such file")
        self.config_call("load")
        status, out = self.config_call("magic_config_key")
        self.magic_key = chomp(as_text(out)) if status == Status.OK else None

    def inline_script(self) -> str:
        """Standard input copied into $tmpdir, executable."""
        if not stdio_safe() or stat.S_ISSOCK(os.fstat(0).st_mode):
            raise ConfigError("sh: an inline script (-) cannot be read from standard input when it is the "
                              "NBD connection (-s)")
        path = os.path.join(self.tmpdir, "inline-script.sh")
        with open(path, "wb") as f:
            f.write(sys.stdin.buffer.read())
        os.chmod(path, 0o500)
        return path

    def script_for(self, method: str) -> str | None:
        if not hasattr(self, "path"):  # --dump-plugin parses parameters without configure()
            if self.script is None:
                return None
            self.load()
        return self.path

    def config(self, key: str, value: str) -> None:
        if not hasattr(self, "path"):
            raise ConfigError("sh: the first parameter must be script=/path/to/script")
        if key == "script":  # a bare word after the script
            if self.magic_key is None:
                raise ConfigError(f"sh: {self.path}: expecting key=value on the command line but got: {value}")
            key = self.magic_key
        status, _ = self.config_call("config", key, value)
        if status == Status.MISSING:
            raise ConfigError(f"sh: {self.path}: this plugin does not need command line configuration")

    def config_complete(self) -> None:
        self.config_call("config_complete")
        self.settle_thread_model()

    def dump_plugin(self) -> None:
        if self.script is not None:
            self.settle_thread_model()  # --dump-plugin shows the script's
        super().dump_plugin()


PLUGIN = ShPlugin
