"""tls-fallback filter: plaintext clients get a 512-byte notice instead of the plugin
(nbdkit-tls-fallback-filter compatible).

For a server started with `--tls=on` (TLS allowed, not required): a client that negotiated TLS
reaches the plugin as usual; any other sees one read-only export named "" whose 512 bytes are
the message of `tlsreadme=` (NUL-padded), whatever export name it asks for.  The layers below are
not even opened for it, and no answer about them (size, flags, export list, descriptions) leaks:
a gentler failure than `--tls=require` for clients that forgot TLS.
"""

from __future__ import annotations

import errno
import os
from typing import Callable

from ..api.chain import NONE, Export, Filter, FilterHandle, Layer, OpenNext, ThreadModel, current_tls
from ..api.errors import ConfigError, NBDError
from ..api.params import Param, String

SIZE = 512
DEFAULT_MESSAGE = "This NBD server requires TLS authentication before it will serve useful data.\n"


class TlsFallbackFilter(Filter):
    """Plaintext clients get a read-only 512-byte notice (tlsreadme=) instead of the plugin."""

    name = "tls-fallback"
    tlsreadme = Param(String(), default=None,
                      help="The contents of the dummy export plaintext clients see (cut or NUL-padded to 512 bytes; "
                           "default: \"This NBD server requires TLS authentication before it will serve useful "
                           "data.\" and a newline)")

    def config_complete(self) -> None:
        text = DEFAULT_MESSAGE if self.tlsreadme is None else self.tlsreadme
        message = os.fsencode(text)[:SIZE]  # nbdkit's strncpy: the bytes as given
        self.message = message + bytes(SIZE - len(message))

    def get_ready(self) -> None:
        if self.final_thread_model == ThreadModel.SERIALIZE_CONNECTIONS:
            # A plaintext client holding its connection open would starve every TLS client.
            raise ConfigError("the tls-fallback filter requires parallel connection support")

    def list_exports(self, next_list: Callable[[bool, bool], list[Export]], readonly: bool,
                     is_tls: bool) -> list[Export]:
        if not is_tls:
            return [Export("")]
        return next_list(readonly, is_tls)

    def default_export(self, next_default: Callable[[bool, bool], str], readonly: bool, is_tls: bool) -> str:
        if not is_tls:
            return ""
        return next_default(readonly, is_tls)

    def open(self, next_open: OpenNext, readonly: bool, export_name: str) -> FilterHandle:
        if current_tls():
            return super().open(next_open, readonly, export_name)
        # Plaintext: the layers below are never opened (how long that takes, what it costs, is
        # theirs: nbdkit's CVE-2019-14850), so this handle answers everything itself.
        return TlsFallbackFilter.Plaintext(self)

    class Plaintext(FilterHandle):
        """The dummy export: 512 bytes of message, read-only, nothing advertised."""

        filter: "TlsFallbackFilter"
        next: Layer | None  # type: ignore[assignment]

        def __init__(self, filter: "TlsFallbackFilter") -> None:
            self.filter = filter
            self.next = None

        def get_size(self) -> int:
            return SIZE

        def block_size(self) -> tuple[int, int, int] | None:
            return None

        def export_description(self) -> str | None:
            return None

        def can_write(self) -> bool:
            return False

        def can_flush(self) -> bool:
            return False

        def is_rotational(self) -> bool:
            return False

        def can_trim(self) -> bool:
            return False

        def can_zero(self) -> int:
            return NONE

        def can_fast_zero(self) -> bool:
            return False

        def can_fua(self) -> int:
            return NONE

        def can_multi_conn(self) -> bool:
            return False

        def can_extents(self) -> bool:
            return False

        def can_cache(self) -> int:
            return NONE

        def can_resize(self) -> bool:
            return False

        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            buf[:] = self.filter.message[offset:offset + len(buf)]

        def _refused(self, *args: object) -> None:
            raise NBDError(errno.EPERM, "tls-fallback: this server needs TLS")

        pwrite = trim = zero = flush = cache = extents = resize = _refused  # type: ignore[assignment]


FILTER = TlsFallbackFilter
