"""The errors of the qcow2 code (filters turn them into ConfigError or NBDError)."""

from __future__ import annotations

from ..errors import FormatError


class Qcow2Error(FormatError):
    """A corrupt, truncated or hostile qcow2 image: the message names the field and its value."""


class Qcow2UnsupportedError(Qcow2Error):
    """A valid image using what this decoder refuses: an external data file, AES encryption,
    an unknown incompatible feature."""
