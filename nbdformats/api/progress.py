"""Progress bars for start-up work (building an image, indexing, verifying), for people at a terminal.

    with progress(total_bytes, "xva: verifying checksums") as bar:
        for chunk in chunks:
            ...
            bar.update(len(chunk))

The bar is drawn with tqdm on stderr, only when stderr is a terminal and only once the work
has lasted a second: quick start-ups, daemons, systemd services and tests see nothing.  It
is removed when the work ends, so the log lines that follow stay readable.
"""

from __future__ import annotations

import sys
from typing import Any

SHOW_AFTER = 1.0  # seconds of work before a bar appears


class Progress:
    """A bar (or nothing) for `total` units of work; `update(n)` adds, `set(done)` sets."""

    def __init__(self, total: int | None, description: str, unit: str = "B") -> None:
        self.done = 0
        self._bar: Any = None
        stream = sys.stderr  # looked up now: tests and daemons replace it
        if stream is not None and stream.isatty():
            from tqdm import tqdm

            byte_units = unit == "B"
            self._bar = tqdm(total=total, desc=description, unit=unit, unit_scale=byte_units,
                             unit_divisor=1024 if byte_units else 1000, delay=SHOW_AFTER, leave=False,
                             file=stream, dynamic_ncols=True, miniters=1)  # redraw by time, not count

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)

    def set(self, done: int) -> None:
        """Say how much is done in all (for work measured from outside, e.g. a file's size)."""
        self.update(done - self.done)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(total: int | None, description: str, unit: str = "B") -> Progress:
    """A progress bar for `total` units (bytes by default; None when unknown), shown only on a
    terminal and only for work that lasts longer than a second."""
    return Progress(total, description, unit)
