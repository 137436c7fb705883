"""Our NBD client: talks to any NBD server (ours, nbdkit, qemu-nbd) without libnbd.

Used by the nbd, stripe and mirror plugins and by the tests.  Top to bottom:

- address.py: `parse_uri()` turns nbd://, nbds://, nbd+unix:// and nbds+unix:// URIs into an `Address`.
- negotiate.py: the handshake as a sans-IO generator, `negotiate()`.
- replies.py: `Command` (one request and its replies) and `ReplyDecoder` (the reply stream, sans-IO).
- connection.py: `NBDClient`, the blocking layer: a socket, a send lock and one reader thread.

    with NBDClient.connect("nbd+unix:///disk?socket=/tmp/sock") as nbd:
        data = nbd.pread(4096, 0)
"""

from .address import DEFAULT_PORT, Address, HandshakeError, parse_uri
from .connection import NBDClient
from .replies import Command, wait_all

__all__ = ["DEFAULT_PORT", "Address", "Command", "HandshakeError", "NBDClient", "parse_uri", "wait_all"]
