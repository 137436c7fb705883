"""Debug flags, nbdkit's `-D NAME.FLAG=N`: integers that switch on extra diagnostics in one component.

A component declares the flags it reads in `debug_flag_help` (flag -> what it shows) and reads
their values from `self.debug_flags` (a mapping; flags not given are absent), which the server
fills before configure() runs, as nbdkit sets a plugin's debug variables when it loads it::

    class LuksFilter(Filter):
        debug_flag_help = {"keyslots": "log each keyslot tried at start-up and how long it took"}
        ...
        if self.debug_flags.get("keyslots"):
            log.info(...)

As in nbdkit, a flag the named component does not declare, or a name that is not in the
chain, is a warning, not an error.  `nbdkit.*` flags (nbdkit's own core, e.g.
`-D nbdkit.backend.datapath=0`) are accepted so that scripts written for nbdkit keep working,
with a warning that nbdformats has no such flag.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from ..api.chain import Component
from ..api.errors import ConfigError

CORE_NAMES = ("nbdkit", "nbdformats")
_FORMAT = re.compile(r"^([A-Za-z0-9_-]+)\.([A-Za-z0-9_.-]+)=(.+)$")


@dataclass(frozen=True)
class DebugFlag:
    component: str
    flag: str
    value: int

    def __str__(self) -> str:
        return f"{self.component}.{self.flag}"


def _same(a: str, b: str) -> bool:
    # nbdkit turns dashes into underscores for the variable name: both spellings work.
    return a.replace("-", "_") == b.replace("-", "_")


def parse_int(text: str) -> int:
    """An integer as nbdkit_parse_int reads it (strtol base 0): 42, -1, 0x2a, 052."""
    body = text.strip().lstrip("+-")
    negative = text.strip().startswith("-")
    try:
        if re.fullmatch(r"0[0-7]+", body):
            value = int(body, 8)
        else:
            value = int(body, 0)
    except ValueError:
        raise ValueError(f"{text!r} is not an integer") from None
    return -value if negative else value


def parse_debug_flag(text: str) -> DebugFlag:
    """`NAME.FLAG=N` -> DebugFlag; ConfigError in nbdkit's words for anything else."""
    match = _FORMAT.match(text)
    if not match:
        raise ConfigError(f"-D {text}: a debug flag must have the format NAME.FLAG=N")
    name, flag, value = match.groups()
    try:
        number = parse_int(value)
    except ValueError as e:
        raise ConfigError(f"-D {text}: {e}") from None
    return DebugFlag(name, flag, number)


def apply_debug_flags(components: Sequence[Component], flags: Iterable[DebugFlag]) -> list[str]:
    """Give each component the values of its flags (later -D options win); returns warnings."""
    warnings: list[str] = []
    for debug_flag in flags:
        if any(_same(debug_flag.component, core) for core in CORE_NAMES):
            warnings.append(f"-D {debug_flag}: a flag of nbdkit's own server; nbdformats has none, "
                            "so it changes nothing")
            continue
        targets = [c for c in components if _same(c.name, debug_flag.component)]
        if not targets:
            warnings.append(f"debug flag -D {debug_flag} was not used (no plugin or filter "
                            f"{debug_flag.component!r} in this server)")
            continue
        for component in targets:
            known = {name.replace("-", "_"): name for name in component.debug_flag_help}
            flag = known.get(debug_flag.flag.replace("-", "_"))
            if flag is None:
                offered = ", ".join(sorted(component.debug_flag_help)) or "none"
                warnings.append(f"-D {debug_flag}: {component.name} has no debug flag {debug_flag.flag!r} "
                                f"(its flags: {offered})")
                continue
            if "debug_flags" not in vars(component):  # the class default is shared and read-only
                component.debug_flags = {}
            component.debug_flags[flag] = debug_flag.value  # type: ignore[index]
    return warnings
