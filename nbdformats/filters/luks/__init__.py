"""The luks filter (see filter.py); header parsing, key derivation and sector ciphers are
separate, sans-IO modules tested on their own."""

from .filter import LuksFilter

FILTER = LuksFilter
