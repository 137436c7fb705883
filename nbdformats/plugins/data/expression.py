"""The data plugin's expression language (nbdkit 1.32's DATA FORMAT): parser and optimizer.

    BYTE  le16:WORD ... be64:WORD  "STRING"  @OFFSET @+N @-N @^ALIGN  <FILE  <(SCRIPT)
    ( ... )  expr*N  expr[N:M]  expr -> \\NAME  \\NAME  $VAR  # comment

The parser follows nbdkit's character by character (numbers as C's strtol with base 0: 0x hex,
leading 0 octal), so the same strings are accepted and refused.  $VAR is substituted while
parsing, from the plugin's extra key=value parameters or else the environment.  The optimizer
makes the same simplifications as nbdkit's, which decide where the disk has holes (a fill of
zero bytes is a hole; a single zero byte written is allocated data).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Literal, Union

from ...api.errors import ConfigError

MAX_INT64 = (1 << 63) - 1
MAX_NESTING = 200  # parentheses and variables inside variables
SPACE = " \t\n\f\r\v"
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
WORDS: dict[str, tuple[Literal["little", "big"], int]] = {"le16:": ("little", 2), "le32:": ("little", 4), "le64:": ("little", 8),
         "be16:": ("big", 2), "be32:": ("big", 4), "be64:": ("big", 8)}
ESCAPES = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11}


@dataclass(frozen=True)
class Byte:
    value: int


@dataclass(frozen=True)
class String:
    data: bytes


@dataclass(frozen=True)
class Fill:
    byte: int
    count: int


@dataclass(frozen=True)
class AbsOffset:
    offset: int


@dataclass(frozen=True)
class RelOffset:
    delta: int


@dataclass(frozen=True)
class AlignOffset:
    alignment: int


@dataclass(frozen=True)
class File:
    path: str


@dataclass(frozen=True)
class Script:
    command: str


@dataclass(frozen=True)
class Name:
    name: str


@dataclass(frozen=True)
class Assign:
    name: str
    expr: "Expr"


@dataclass(frozen=True)
class Repeat:
    expr: "Expr"
    count: int


@dataclass(frozen=True)
class Slice:
    expr: "Expr"
    start: int
    end: int | None  # None: to the end


@dataclass(frozen=True)
class Group:
    """( ... ): a nested scope whose offsets start at 0."""
    items: tuple["Expr", ...]


Expr = Union[Byte, String, Fill, AbsOffset, RelOffset, AlignOffset, File, Script, Name, Assign, Repeat, Slice,
             Group, None]
OFFSETS = (AbsOffset, RelOffset, AlignOffset)


def error(message: str) -> ConfigError:
    return ConfigError(f"data: {message}")


def c_integer(text: str, pos: int) -> tuple[int, int] | None:
    """An unsigned integer as strtol with base 0 reads it at pos: (value, end), or None."""
    if text.startswith(("0x", "0X"), pos) and pos + 2 < len(text) and text[pos + 2] in "0123456789abcdefABCDEF":
        end = pos + 2
        while end < len(text) and text[end] in "0123456789abcdefABCDEF":
            end += 1
        return int(text[pos + 2:end], 16), end
    digits = "01234567" if text.startswith("0", pos) else "0123456789"
    end = pos
    while end < len(text) and text[end] in digits:
        end += 1
    if end == pos:
        return None
    return int(text[pos:end], 8 if digits == "01234567" else 10), end


def scan_integer(text: str, pos: int) -> tuple[int, int] | None:
    """scanf's %i: leading white space, an optional sign, then a C integer."""
    while pos < len(text) and text[pos] in SPACE:
        pos += 1
    sign = 1
    if pos < len(text) and text[pos] in "+-":
        sign = -1 if text[pos] == "-" else 1
        pos += 1
    found = c_integer(text, pos)
    if found is None:
        return None
    value, end = found
    if value > MAX_INT64:
        raise error(f"number {text[pos:end]} is too large (the limit is 2^63-1)")
    return sign * value, end


def parse_unsigned_word(text: str, bits: int) -> int:
    """nbdkit_parse_uintNN_t: the whole text is one unsigned C integer that fits in `bits`."""
    found = c_integer(text, 1 if text.startswith("+") else 0)
    if not text or found is None or found[1] != len(text):
        raise error(f"could not parse number: {text!r}")
    if found[0] >= 1 << bits:
        raise error(f"number {text!r} does not fit in {bits} bits")
    return found[0]


class Parser:
    """One data string (and the variables it uses) into a Group."""

    def __init__(self, variable: Callable[[str], str | None]) -> None:
        self.variable = variable
        self.expanding: list[str] = []  # variables being substituted (to refuse $a inside $a)

    def parse(self, text: str) -> Group:
        group, _ = self._list(text, 0, 0)
        return group

    def _list(self, text: str, pos: int, level: int) -> tuple[Group, int]:
        if level + len(self.expanding) > MAX_NESTING:
            raise error(f"expressions nested more than {MAX_NESTING} deep")
        items: list[Expr] = []
        while pos < len(text):
            c = text[pos]
            if c == "#":
                while pos < len(text) and text[pos] != "\n":
                    pos += 1
            elif c == "@":
                pos = self._offset(text, pos + 1, items)
            elif c == "(":
                group, pos = self._list(text, pos + 1, level + 1)
                items.append(group)
            elif c == ")":
                if level < 1:
                    raise error("unmatched ')' in data string")
                return Group(tuple(items)), pos + 1
            elif c == "*":
                target = self._postfix_target(items, "*N")
                found = scan_integer(text, pos + 1)
                if found is None:
                    raise error("*N not numeric")
                count, pos = found
                if count < 0:
                    raise error("*N must not be negative")
                items[-1] = Repeat(target, count)
            elif c == "[":
                target = self._postfix_target(items, "[N:M]")
                start, end, pos = self._slice(text, pos + 1)
                items[-1] = Slice(target, start, end)
            elif c == "<":
                pos = self._file_or_script(text, pos + 1, items)
            elif c == '"':
                data, pos = self._string(text, pos + 1)
                items.append(String(data))
            elif c == "\\":
                name, pos = self._name(text, pos)
                items.append(Name(name))
            elif c == "-":
                if not text.startswith(">", pos + 1):
                    raise self._parse_error(pos + 1)
                target = self._postfix_target(items, "->")
                name, pos = self._name(text, pos + 2)
                items[-1] = Assign(name, target)
            elif c == "$":
                items.append(self._variable(text, pos))
                pos = self._variable_end(text, pos)
            elif c.isdigit() and c.isascii():
                number = c_integer(text, pos)
                assert number is not None  # it starts with a digit
                value, pos = number
                if value > 255:
                    raise error("data parameter BYTE must be in the range 0..255")
                items.append(Byte(value))
            elif c in "lb":
                data, pos = self._word(text, pos)
                items.append(String(data))
            elif c in SPACE:
                pos += 1
            else:
                raise self._parse_error(pos)
        if level > 0:
            raise error("unmatched '(' in data string")
        return Group(tuple(items)), pos

    @staticmethod
    def _parse_error(pos: int) -> ConfigError:
        return error(f"data parameter: parsing error at offset {pos}")

    @staticmethod
    def _postfix_target(items: list[Expr], operator: str) -> Expr:
        if not items:
            raise error(f"{operator} must follow an expression")
        if isinstance(items[-1], OFFSETS):
            raise error(f"{operator} cannot be applied to this type of expression")
        return items[-1]

    def _offset(self, text: str, pos: int, items: list[Expr]) -> int:
        if pos >= len(text):
            raise self._parse_error(pos)
        kind = text[pos]
        if kind in "+-^":
            found = scan_integer(text, pos + 1) if pos + 1 < len(text) else None
            if found is None:
                raise self._parse_error(pos + 1)
            value, end = found
            if value < 0:
                raise error(f"data parameter after @{kind} must not be negative")
            if kind == "^":
                if value & (value - 1) or value == 0:
                    raise error(f"data parameter @^{value} must be a power of 2")
                items.append(AlignOffset(value))
            else:
                items.append(RelOffset(value if kind == "+" else -value))
            return end
        if kind.isdigit() and kind.isascii():
            found = scan_integer(text, pos)
            assert found is not None
            items.append(AbsOffset(found[0]))
            return found[1]
        raise self._parse_error(pos)

    @staticmethod
    def _slice(text: str, pos: int) -> tuple[int, int | None, int]:
        """[N:M], [:M], [N:] or [:] (pos is after the '['): start, end (None: to the end), pos after ']'."""
        first = scan_integer(text, pos)
        if first is not None and text.startswith(":", first[1]):
            second = scan_integer(text, first[1] + 1)
            if second is not None and text.startswith("]", second[1]):
                return first[0], second[0], second[1] + 1
            if text.startswith("]", first[1] + 1):
                return first[0], None, first[1] + 2
        if text.startswith(":", pos):
            second = scan_integer(text, pos + 1)
            if second is not None and text.startswith("]", second[1]):
                return 0, second[0], second[1] + 1
            if text.startswith(":]", pos):
                return 0, None, pos + 2
        raise error("enclosed pattern (...)[N:M] not numeric")

    def _file_or_script(self, text: str, pos: int, items: list[Expr]) -> int:
        if text.startswith("(", pos):  # <(SCRIPT): up to the matching parenthesis
            depth, end = 0, pos + 1
            while end < len(text) and (text[end] != ")" or depth):
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
            if end >= len(text) or end == pos + 1:
                raise self._parse_error(pos + 1)
            items.append(Script(text[pos + 1:end]))
            return end + 1
        end = pos
        while end < len(text) and text[end] not in "*[) \t\n":
            end += 1
        if end == pos:
            raise error("data parameter <FILE not a filename")
        items.append(File(os.path.abspath(text[pos:end])))  # the server may change directory later
        return end

    @staticmethod
    def _string(text: str, pos: int) -> tuple[bytes, int]:
        """A C-like "string" (pos is after the opening quote): its bytes, and pos after the closing quote."""
        out = bytearray()
        while pos < len(text):
            c = text[pos]
            if c == '"':
                return bytes(out), pos + 1
            if c == "\\":
                pos += 1
                if pos >= len(text):
                    break
                c = text[pos]
                if c == "x":
                    digits = text[pos + 1:pos + 3]
                    if len(digits) < 2:
                        break
                    if any(d not in "0123456789abcdefABCDEF" for d in digits):
                        raise error("\\xNN must be followed by exactly two hexadecimal characters")
                    out.append(int(digits, 16))
                    pos += 3
                    continue
                if c.isdigit() or c == "u":
                    raise error("string numeric and unicode sequences are not yet implemented")
                if c in ESCAPES:
                    out.append(ESCAPES[c])
                    pos += 1
                    continue
            out += os.fsencode(c)  # the command line's own bytes, whatever their encoding
            pos += 1
        raise error("data parameter: unterminated string")

    @staticmethod
    def _word(text: str, pos: int) -> tuple[bytes, int]:
        end = pos
        while end < len(text) and text[end] not in SPACE:
            end += 1
        token = text[pos:end]
        for prefix, (order, size) in WORDS.items():
            if token.startswith(prefix):
                value = parse_unsigned_word(token[len(prefix):], 8 * size)
                return value.to_bytes(size, order), end
        raise error(f'data parameter: expected "le16/32/64:" or "be16/32/64:" at offset {end}')

    @staticmethod
    def _name(text: str, pos: int) -> tuple[str, int]:
        """\\NAME after optional white space: the name without the backslash, and pos after it."""
        while pos < len(text) and text[pos] in SPACE:
            pos += 1
        if not text.startswith("\\", pos):
            raise Parser._parse_error(pos)
        end = pos + 1
        while end < len(text) and text[end] in NAME_CHARS:
            end += 1
        if end == pos + 1:
            raise Parser._parse_error(pos)
        return text[pos + 1:end], end

    @staticmethod
    def _variable_end(text: str, pos: int) -> int:
        end = pos + 1
        while end < len(text) and (text[end].isascii() and (text[end].isalnum() or text[end] == "_")):
            end += 1
        return end

    def _variable(self, text: str, pos: int) -> Group:
        end = self._variable_end(text, pos)
        name = text[pos + 1:end]
        if not name or name[0].isdigit():
            raise self._parse_error(pos)
        content = self.variable(name)
        if content is None:
            raise error(f"${name}: variable not found")
        if name in self.expanding:
            raise error(f"${name}: the variable refers to itself")
        self.expanding.append(name)
        try:
            group, _ = self._list(content, 0, 0)
        finally:
            self.expanding.pop()
        return group


# The optimizer: the same simplifications as nbdkit's optimize_ast.

def optimize(expr: Expr) -> Expr:
    if isinstance(expr, Group):
        return _optimize_group(expr)
    if isinstance(expr, Assign):
        return Assign(expr.name, optimize(expr.expr))
    if isinstance(expr, Repeat):
        return _optimize_repeat(expr)
    if isinstance(expr, Slice):
        return _optimize_slice(expr)
    if isinstance(expr, String):
        if not expr.data:
            return None
        if len(expr.data) > 1 and expr.data.count(expr.data[0]) == len(expr.data):
            return Fill(expr.data[0], len(expr.data))
        return expr
    if isinstance(expr, Fill) and expr.count == 0:
        return None
    return expr


def _scoped(expr: Expr) -> bool:
    """Assignments, names and offsets belong to their group: such a group cannot be flattened."""
    return isinstance(expr, (Assign, Name, *OFFSETS))


def _optimize_group(group: Group) -> Expr:
    items: list[Expr] = []
    for item in group.items:
        item = optimize(item)
        if item is None:
            continue
        if isinstance(item, Group) and not any(_scoped(i) for i in item.items):
            items.extend(item.items)
        else:
            items.append(item)
    index = 1
    while index < len(items):
        combined = _combine(items[index - 1], items[index])
        if combined is None:
            index += 1
        else:
            items[index - 1:index + 1] = [combined]
    if not items:
        return None
    if len(items) == 1 and not _scoped(items[0]):
        return items[0]
    return Group(tuple(items))


def _combine(first: Expr, second: Expr) -> Expr:
    """Two adjacent constants as one, as nbdkit: equal bytes and fills into a fill, bytes and strings
    into a string; anything else stays apart."""
    if isinstance(first, (Byte, Fill)) and isinstance(second, (Byte, Fill)):
        (byte, count), (other, more) = _as_fill(first), _as_fill(second)
        if byte == other:
            return Fill(byte, count + more)
        return String(bytes([byte, other])) if isinstance(first, Byte) and isinstance(second, Byte) else None
    if isinstance(first, (Byte, String)) and isinstance(second, (Byte, String)):
        return String(_bytes_of(first) + _bytes_of(second))
    return None


def _as_fill(e: Byte | Fill) -> tuple[int, int]:
    return (e.value, 1) if isinstance(e, Byte) else (e.byte, e.count)


def _bytes_of(e: Byte | String) -> bytes:
    return bytes([e.value]) if isinstance(e, Byte) else e.data


def _single_byte(e: Expr) -> int | None:
    if isinstance(e, Byte):
        return e.value
    if isinstance(e, Group) and len(e.items) == 1:
        return _single_byte(e.items[0])
    if isinstance(e, String) and len(e.data) == 1:
        return e.data[0]
    if isinstance(e, Fill) and e.count == 1:
        return e.byte
    if isinstance(e, Repeat) and e.count == 1:
        return _single_byte(e.expr)
    return None


def _optimize_repeat(repeat: Repeat) -> Expr:
    if repeat.count == 0:
        return None
    inner = optimize(repeat.expr)
    if repeat.count == 1 or inner is None:
        return inner
    if isinstance(inner, Repeat):
        return Repeat(inner.expr, _product(inner.count, repeat.count))
    if isinstance(inner, Fill):
        return Fill(inner.byte, _product(inner.count, repeat.count))
    if isinstance(inner, String) and repeat.count <= 4 and len(inner.data) <= 512:
        return String(inner.data * repeat.count)
    byte = _single_byte(inner)
    if byte is not None:
        return Fill(byte, repeat.count)
    return Repeat(inner, repeat.count)


def _product(a: int, b: int) -> int:
    if a * b > MAX_INT64:
        raise error(f"repeating {a} times {b} is more than 2^63-1 bytes")
    return a * b


def _optimize_slice(piece: Slice) -> Expr:
    start, end = piece.start, piece.end
    if end is not None and start == end:
        return None  # an empty slice, whatever it is a slice of
    inner = optimize(piece.expr)
    # Slices of constants that are certainly valid become shorter constants; others are checked later.
    if inner is None and (end == 0 or (start == 0 and end is None)):
        return None
    if isinstance(inner, Byte) and (end == 1 or (start == 0 and end is None)):
        return inner
    if isinstance(inner, (String, Fill)):
        length = len(inner.data) if isinstance(inner, String) else inner.count
        stop = length if end is None else end
        if 0 <= start <= stop <= length:
            if stop - start == 1:
                return Byte(inner.data[start] if isinstance(inner, String) else inner.byte)
            return String(inner.data[start:stop]) if isinstance(inner, String) else Fill(inner.byte, stop - start)
    return Slice(inner, start, end)


def describe(expr: Expr, level: int = 0) -> list[str]:
    """The tree one node a line, in nbdkit's notation (-D data.AST=1; nbdkit's tests read it)."""
    pad = "    " * min(level, 10)
    if isinstance(expr, Group):
        return [f"{pad}(", *(line for item in expr.items for line in describe(item, level + 1)), f"{pad})"]
    if isinstance(expr, (Assign, Repeat, Slice)):
        if isinstance(expr, Assign):
            suffix = f" -> \\{expr.name}"
        elif isinstance(expr, Repeat):
            suffix = f" *{expr.count}"
        else:
            suffix = f"[{expr.start}:{-1 if expr.end is None else expr.end}]"
        return [f"{pad}(", *describe(expr.expr, level + 1), f"{pad}){suffix}"]
    return [pad + _leaf(expr)]


def _leaf(expr: Expr) -> str:
    if expr is None:
        return "null"
    if isinstance(expr, Byte):
        return str(expr.value)
    if isinstance(expr, AbsOffset):
        return f"@{expr.offset}"
    if isinstance(expr, RelOffset):
        return f"@{expr.delta}"
    if isinstance(expr, AlignOffset):
        return f"@^{expr.alignment}"
    if isinstance(expr, File):
        return f"<{expr.path}"
    if isinstance(expr, Script):
        return f"<({expr.command})"
    if isinstance(expr, String):
        return '"' + "".join(chr(b) if 0x20 <= b < 0x7F else f"\\x{b:02x}" for b in expr.data) + '"'
    if isinstance(expr, Fill):
        return f"fill({expr.byte}*{expr.count})"
    assert isinstance(expr, Name)
    return f"\\{expr.name}"
