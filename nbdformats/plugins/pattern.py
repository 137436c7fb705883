"""pattern plugin: every 8-byte word holds its own offset, big-endian (nbdkit-pattern-plugin compatible)."""

from __future__ import annotations

import numpy as np

from ._synthetic import SyntheticPlugin

# Words are generated in pieces of this many, so a 64 MiB read needs no 64 MiB temporary array of offsets.
WORDS_PER_PIECE = 1 << 17


def fill_pattern(buf: memoryview, offset: int) -> None:
    """Write the pattern bytes of [offset, offset + len(buf)) into buf."""
    done = 0
    while done < len(buf):
        position = offset + done
        first_word = position - position % 8
        words = min(WORDS_PER_PIECE, (position + len(buf) - done - first_word + 7) // 8)
        data = (np.arange(words, dtype=np.uint64) * np.uint64(8) + np.uint64(first_word)).astype(">u8")
        piece = memoryview(data.tobytes())[position - first_word:]
        n = min(len(piece), len(buf) - done)
        buf[done:done + n] = piece[:n]
        done += n


class PatternPlugin(SyntheticPlugin):
    """A read-only disk whose every 8-byte word is its own offset (64-bit big-endian)."""

    name = "pattern"

    class Handle(SyntheticPlugin.Handle):
        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            fill_pattern(buf, offset)


PLUGIN = PatternPlugin
