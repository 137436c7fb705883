"""Errors of the format code (nbdformats.formats) as the errors a request gets."""

from __future__ import annotations

import errno

from ..api.errors import NBDError
from ..formats.errors import FormatError, OutputLimitError


def nbd_error(error: FormatError | MemoryError, prefix: str = "") -> NBDError:
    """EFBIG for output beyond a limit (a decompression bomb), ENOMEM, else EIO: the input is bad."""
    code = (errno.EFBIG if isinstance(error, OutputLimitError) else
            errno.ENOMEM if isinstance(error, MemoryError) else errno.EIO)
    return NBDError(code, f"{prefix}{error}")
