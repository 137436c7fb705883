"""nbdformats: a Network Block Device server suite in Python (nbdkit-compatible command line)."""

__version__ = "0.1.0"
