"""The one error of the LUKS parsing and unlocking code (the filter turns it into ConfigError or NBDError)."""

from __future__ import annotations

from ..errors import FormatError


class LuksError(FormatError):
    """A bad or unsupported LUKS image, or no keyslot matching the passphrase."""
