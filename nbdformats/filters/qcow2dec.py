"""qcow2dec filter: the qcow2 filter under the name nbdkit 1.36 gave its qcow2 decoder.

nbdkit's qcow2dec takes no parameters and does not read backing files: here too the default
is backing=none (what a backing file would give reads as zeroes); every parameter of the
qcow2 filter is accepted.
"""

from __future__ import annotations

from ..api.params import Param, String
from .qcow2 import Qcow2Filter


class Qcow2DecFilter(Qcow2Filter):
    """Decode a qcow2 image read-only (nbdkit's name; backing files are not read by default)."""

    name = "qcow2dec"
    backing = Param(String(), default="none",
                    help="none (the default, as nbdkit's qcow2dec): read as zeroes what the backing file would "
                         "give; auto: the backing file next to the image; PATH or URI: the top image's backing file")


FILTER = Qcow2DecFilter
