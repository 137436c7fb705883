"""The errors of the VMDK code (filters turn them into ConfigError or NBDError)."""

from __future__ import annotations

from ..errors import FormatError


class VmdkError(FormatError):
    """A corrupt, truncated, hostile or unsupported VMDK: the message names the field and its value."""
