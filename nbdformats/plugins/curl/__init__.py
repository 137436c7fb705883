"""The curl plugin (see plugin.py); HTTP message parsing (messages.py), the ranged-GET client
(client.py) and the read-ahead (readahead.py) are separate modules tested on their own."""

from .plugin import CurlPlugin

PLUGIN = CurlPlugin
