"""The one error of the LUKS parsing and unlocking code (the filter turns it into ConfigError or NBDError)."""


class LuksError(Exception):
    """A bad or unsupported LUKS image, or no keyslot matching the passphrase."""
