"""Typed parameters: declared once per plugin or filter, parsed and validated by the core.

A component declares its `key=value` parameters as class attributes::

    class Memory(Plugin):
        size = Param(Size(), required=True, magic=True, help="Size of the disk")

The attribute name with `_` turned into `-` is the key (`cache_min_block_size` is
`cache-min-block-size=`); `key=` overrides it.  After configuration the attribute holds
the parsed value on the instance.  `--help` and `--dump-plugin` print the table.
"""

from __future__ import annotations

import getpass
import os
import re
import sys
from typing import Any, Callable, Generic, Iterable, Literal, TypeVar, overload

from .errors import ConfigError

T = TypeVar("T")


class ParamType(Generic[T]):
    """Converts the text of `key=value` into a typed value; raises ValueError with a reason."""

    metavar = "VALUE"

    def parse(self, text: str) -> T:
        raise NotImplementedError


class String(ParamType[str]):
    metavar = "STRING"

    def parse(self, text: str) -> str:
        return text


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([bBsSkKmMgGtTpPeE]?)(?:i?[bB])?\s*$")
_SIZE_SCALE = {"": 1, "b": 1, "s": 512, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30,
               "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}


def parse_size(text: str) -> int:
    """Parse a size as nbdkit does: `1024`, `4k`, `1M`, `1G`, `2T`, `1s` (512-byte sectors)."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"could not parse size {text!r} (examples: 512, 64K, 1M, 10G)")
    value = int(match.group(1)) * _SIZE_SCALE[match.group(2).lower()]
    if value >= 1 << 63:
        raise ValueError(f"size {text!r} is too large")
    return value


class Size(ParamType[int]):
    """A byte count with nbdkit's suffixes."""

    metavar = "SIZE"

    def __init__(self, minimum: int = 0, maximum: int | None = None, power_of_two: bool = False) -> None:
        self.minimum, self.maximum, self.power_of_two = minimum, maximum, power_of_two

    def parse(self, text: str) -> int:
        value = parse_size(text)
        if value < self.minimum:
            raise ValueError(f"must be at least {self.minimum}")
        if self.maximum is not None and value > self.maximum:
            raise ValueError(f"must be at most {self.maximum}")
        if self.power_of_two and value & (value - 1):
            raise ValueError("must be a power of two")
        return value


class RelativeSize(ParamType[tuple[bool, int]]):
    """A size, or `+SIZE` for "this much more than needed": parsed as (is_relative, bytes)."""

    metavar = "[+]SIZE"

    def __init__(self, minimum: int = 0, maximum: int | None = None) -> None:
        self.size = Size(minimum, maximum)

    def parse(self, text: str) -> tuple[bool, int]:
        relative = text.startswith("+")
        return relative, self.size.parse(text[1:] if relative else text)


class Int(ParamType[int]):
    metavar = "N"

    def __init__(self, minimum: int | None = None, maximum: int | None = None) -> None:
        self.minimum, self.maximum = minimum, maximum

    def parse(self, text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            raise ValueError(f"{text!r} is not an integer") from None
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"must be at least {self.minimum}")
        if self.maximum is not None and value > self.maximum:
            raise ValueError(f"must be at most {self.maximum}")
        return value


class Float(ParamType[float]):
    metavar = "NUMBER"

    def __init__(self, minimum: float | None = None) -> None:
        self.minimum = minimum

    def parse(self, text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"must be at least {self.minimum}")
        return value


_TRUE = {"1", "true", "t", "yes", "y", "on"}
_FALSE = {"0", "false", "f", "no", "n", "off"}


def parse_bool(text: str) -> bool:
    """nbdkit_parse_bool: 1/true/t/yes/y/on and 0/false/f/no/n/off, any case."""
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"{text!r} is not a boolean (use true or false)")


class Bool(ParamType[bool]):
    metavar = "true|false"

    def parse(self, text: str) -> bool:
        return parse_bool(text)


class Enum(ParamType[str]):
    def __init__(self, *choices: str) -> None:
        self.choices = choices
        self.metavar = "|".join(choices)

    def parse(self, text: str) -> str:
        if text not in self.choices:
            raise ValueError(f"{text!r} is not one of {', '.join(self.choices)}")
        return text


class Path(ParamType[str]):
    """A filesystem path made absolute (the server may chdir); `kind` checks it exists."""

    metavar = "PATH"

    def __init__(self, kind: str | None = "file") -> None:
        self.kind = kind  # "file" (anything but a directory), "dir", "any", or None (need not exist)

    def parse(self, text: str) -> str:
        if not text:
            raise ValueError("empty path")
        path = os.path.abspath(os.path.expanduser(text))
        if self.kind is None:
            return path
        if not os.path.exists(path):
            raise ValueError(f"{text}: no such file or directory")
        if self.kind == "dir" and not os.path.isdir(path):
            raise ValueError(f"{text}: not a directory")
        if self.kind == "file" and os.path.isdir(path):
            raise ValueError(f"{text}: is a directory")
        return path


class SecretValue:
    """A secret (passphrase, password); never shown by repr/str so it cannot leak into logs."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = value

    def reveal(self) -> bytes:
        return self._value

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__


def read_secret(text: str) -> SecretValue:
    """nbdkit_read_password: `SECRET` literal, `+FILE` (file contents), `-` (prompt), `-FD` (read fd)."""
    if text.startswith("+"):
        try:
            with open(text[1:], "rb") as f:
                data = f.read()
        except OSError as e:
            raise ValueError(f"cannot read secret file {text[1:]}: {e.strerror}") from None
        return SecretValue(data.rstrip(b"\n") if data.endswith(b"\n") else data)
    if text == "-":
        from .chain import stdio_safe
        if not stdio_safe():
            raise ValueError("'-' would prompt for the secret on standard input, which is the NBD connection (-s)")
        if not sys.stdin.isatty():
            raise ValueError("'-' prompts for the secret, but standard input is not a terminal")
        return SecretValue(getpass.getpass("password: ").encode())
    if text.startswith("-") and text[1:].isdigit():
        fd = int(text[1:])
        if fd <= 2:
            raise ValueError("cannot read the secret from stdin/stdout/stderr by number; use '-'")
        chunks = []
        try:
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
            os.close(fd)
        except OSError as e:
            raise ValueError(f"cannot read secret from fd {fd}: {e.strerror}") from None
        data = b"".join(chunks)
        return SecretValue(data.rstrip(b"\n") if data.endswith(b"\n") else data)
    return SecretValue(text.encode())


class Secret(ParamType[SecretValue]):
    metavar = "SECRET|+FILE|-|-FD"

    def parse(self, text: str) -> SecretValue:
        return read_secret(text)


class Param(Generic[T]):
    """One `key=value` parameter of a plugin or filter.

    Declared as a class attribute; on an instance the attribute holds the parsed value (a `T`, or a
    `list[T]` when `repeat=True`), which is what type checkers see through `__get__`.  A parameter
    that is neither required nor given a default is None when not given.
    """

    @overload
    def __init__(self: "Param[list[T]]", type: ParamType[T], *, repeat: Literal[True], default: Any = None,
                 help: str = "", required: bool = False, magic: bool = False, key: str = "",
                 check: Callable[[Any], None] | None = None) -> None: ...

    @overload
    def __init__(self: "Param[T]", type: ParamType[T], *, repeat: Literal[False] = False, default: Any = None,
                 help: str = "", required: bool = False, magic: bool = False, key: str = "",
                 check: Callable[[Any], None] | None = None) -> None: ...

    @overload
    def __init__(self: "Param[str]", *, repeat: Literal[False] = False, default: Any = None, help: str = "",
                 required: bool = False, magic: bool = False, key: str = "",
                 check: Callable[[Any], None] | None = None) -> None: ...

    def __init__(self, type: ParamType[Any] | None = None, *, repeat: bool = False, default: Any = None,
                 help: str = "", required: bool = False, magic: bool = False, key: str = "",
                 check: Callable[[Any], None] | None = None) -> None:
        self.type: ParamType[Any] = type if type is not None else String()
        self.default = default
        self.help = help
        self.required = required
        self.repeat = repeat  # may be given several times: the value is a list
        self.magic = magic  # a bare argument without `key=` goes here (nbdkit's magic_config_key)
        self.key = key
        self.attr = ""
        self.check = check  # extra validation; raise ValueError

    @overload
    def __get__(self, instance: None, owner: type) -> "Param[T]": ...

    @overload
    def __get__(self, instance: object, owner: type) -> T: ...

    def __get__(self, instance: object | None, owner: type) -> Any:
        # Reached only when the instance has no value of its own yet (apply_params sets them all).
        return self if instance is None else self.default

    def __set_name__(self, owner: type, name: str) -> None:
        self.attr = name
        if not self.key:
            self.key = name.replace("_", "-")

    def parse(self, text: str) -> Any:
        try:
            value = self.type.parse(text)
            if self.check is not None:
                self.check(value)
            return value
        except ValueError as e:
            shown = "<secret>" if isinstance(self.type, Secret) else text
            raise ConfigError(f"{self.key}={shown}: {e}") from None

    def describe(self) -> str:
        default = ""
        if not self.required and self.default not in (None, [], ()):
            default = f" (default {self.default})"
        req = " (required)" if self.required else ""
        rep = " (repeatable)" if self.repeat else ""
        return f"  {self.key}={self.type.metavar}{req}{rep}{default}\n      {self.help}"


def params_of(cls: type) -> list[Param[Any]]:
    """The declared parameters of a component class, base classes first."""
    found: dict[str, Param[Any]] = {}
    for klass in reversed(cls.__mro__):
        for value in vars(klass).values():
            if isinstance(value, Param):
                found[value.key] = value
    return list(found.values())


def magic_param(cls: type) -> Param[Any] | None:
    for param in params_of(cls):
        if param.magic:
            return param
    return None


def apply_params(instance: Any, pairs: Iterable[tuple[str, str]], component: str) -> None:
    """Parse `pairs` into attributes of `instance`; every declared key not given gets its default."""
    declared = {p.key: p for p in params_of(type(instance))}
    values: dict[str, Any] = {}
    for key, text in pairs:
        param = declared.get(key)
        if param is None and getattr(instance, "accepts_any_key", False):
            instance.config(key, text)
            continue
        if param is None:
            known = ", ".join(sorted(declared)) or "none"
            raise ConfigError(f"{component}: unknown parameter {key!r} (known: {known})")
        value = param.parse(text)
        if param.repeat:
            values.setdefault(key, []).append(value)
        else:  # as nbdkit's plugins: a key given again replaces the earlier value
            values[key] = value
    for key, param in declared.items():
        if key not in values:
            if param.required:
                raise ConfigError(f"{component}: missing required parameter {key}=")
            default = param.default
            values[key] = list(default or []) if param.repeat else default
        setattr(instance, param.attr, values[key])


def describe_params(cls: type) -> str:
    params = params_of(cls)
    if not params:
        return "  (no parameters)"
    return "\n".join(p.describe() for p in params)
