"""The errors of the format code.  Each format subclasses FormatError (TarError, ZipError,
LuksError ...); filters and plugins translate them, never the other way round."""

from __future__ import annotations

MAX_SIZE = (1 << 63) - 1  # the largest size NBD (and off_t) can express


class FormatError(ValueError):
    """Input that is not valid in its format: corrupt, truncated, unsupported, or beyond a
    limit.  The message says what and where."""


class OutputLimitError(FormatError):
    """The data decodes to more than a limit allows (its declared size or max-size): a
    decompression bomb is refused rather than decoded."""


def check_size(value: int, field: str, limit: int = MAX_SIZE, error: type[FormatError] = FormatError,
               room: str = "") -> int:
    """`value` if 0 <= value <= limit, else `error` naming `field` (and `room`, what bounds it).

    Sizes read from untrusted headers go through this before anything uses them, so a hostile
    2^64 never reaches a struct.pack or an ftruncate."""
    if not 0 <= value <= limit:
        bound = room or ("2^63-1, the largest size a disk can have" if limit == MAX_SIZE else str(limit))
        raise error(f"{field} is {value}, more than {bound}" if value > limit else f"{field} is negative ({value})")
    return value


class PartitionError(FormatError):
    """No partition table, a corrupt one, no such partition, or a table that cannot be written."""
