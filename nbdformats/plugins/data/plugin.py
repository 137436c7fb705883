"""data plugin: a disk whose content is given on the command line (nbdkit-data-plugin compatible).

`data=` is nbdkit's expression language (expression.py), `raw=` the bytes of the argument,
`base64=` base64.  The content is evaluated once at start-up into the memory plugin's store
(allocator=sparse|malloc|zstd), which then serves reads and writes like a memory disk.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os

from ...api.errors import ConfigError
from ...api.params import Param, Size, String
from ..memory import MemoryPlugin
from .expression import Expr, Parser, describe, optimize
from .image import Image, Literal, check_fits, evaluate, store_image

log = logging.getLogger(__name__)


def physical_memory() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class DataPlugin(MemoryPlugin):
    """A disk made from the command line: bytes, strings, files, script output, repeats, slices."""

    name = "data"
    accepts_any_key = True  # other key=value pairs are variables for $NAME in data=
    debug_flag_help = {"AST": "log the expression tree after optimization"}
    data = Param(String(), magic=True, help="The content in nbdkit's data format, e.g. '0 1 2 @0x1fe 0x55 0xaa'")
    raw = Param(String(), help="The content: the bytes of this argument")
    base64 = Param(String(), help="The content, base64-encoded")
    size = Param(Size(), help="Truncate or extend (with zeroes) the disk to this size (default: the content's size)")

    def __init__(self) -> None:
        self.variables: dict[str, str] = {}

    def config(self, key: str, value: str) -> None:
        self.variables.setdefault(key, value)  # as nbdkit, the first of repeated keys counts

    def config_complete(self) -> None:
        given = [key for key in ("data", "raw", "base64") if getattr(self, key) is not None]
        if len(given) != 1:
            raise ConfigError("data: exactly one of data=, raw= or base64= must be given"
                              + (f" (got {', '.join(given)})" if given else ""))
        if self.variables and self.data is None:
            raise ConfigError(f"data: extra parameters ({', '.join(self.variables)}) are only for $VARIABLES in "
                              "data=")
        if self.data is not None:
            parser = Parser(lambda name: self.variables.get(name, os.environ.get(name)))
            self.expression: Expr = optimize(parser.parse(self.data))
            if self.debug_flags.get("AST"):
                log.debug("BEGIN AST (-D data.AST=1)")
                for line in describe(self.expression):
                    log.debug("%s", line)
                log.debug("END AST")

    def dump_plugin(self) -> None:
        super().dump_plugin()
        print("data_base64=yes")
        print("zstd=yes")

    def content(self) -> Image:
        if self.data is not None:
            return evaluate(self.expression)
        if self.raw is not None:
            data = os.fsencode(self.raw)  # the argument's own bytes
        else:
            try:
                data = base64.b64decode(self.base64, validate=True)
            except (binascii.Error, ValueError) as e:
                raise ConfigError(f"data: base64: {e}") from None
        image = Image(size=len(data))
        image.put(0, len(data), Literal(data))
        return image

    def get_ready(self) -> None:
        image = self.content()
        check_fits(image, physical_memory())
        log.debug("implicit data size: %d", image.size)
        if self.size is None:
            self.size = image.size
        super().get_ready()  # the store, of the final size
        store_image(image, self.size, self.store)

    class Handle(MemoryPlugin.Handle):
        def can_fast_zero(self) -> bool:
            return True  # zeroing frees or clears memory: never slower than writing


PLUGIN = DataPlugin
