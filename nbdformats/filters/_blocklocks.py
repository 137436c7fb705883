"""Per-block locks for filters that keep blocks of their own (cache, cow): LOCK_STRIPES locks,
block b guarded by lock b % LOCK_STRIPES.  A range takes its locks in ascending stripe order,
so two requests over overlapping ranges cannot deadlock."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

LOCK_STRIPES = 256


class BlockLocks:
    def __init__(self) -> None:
        self.stripes = [threading.Lock() for _ in range(LOCK_STRIPES)]

    def stripe(self, block: int) -> threading.Lock:
        return self.stripes[block % LOCK_STRIPES]

    @contextmanager
    def locked(self, first: int, last: int) -> Iterator[None]:
        """Hold the locks of blocks first..last (inclusive)."""
        if last - first + 1 >= LOCK_STRIPES:
            indexes: range | list[int] = range(LOCK_STRIPES)
        else:
            indexes = sorted({block % LOCK_STRIPES for block in range(first, last + 1)})
        taken: list[threading.Lock] = []
        try:
            for index in indexes:
                lock = self.stripes[index]
                lock.acquire()
                taken.append(lock)
            yield
        finally:
            for lock in reversed(taken):
                lock.release()

    @contextmanager
    def all(self) -> Iterator[None]:
        """Hold every lock: no request is between its blocks' state and I/O (resize)."""
        with self.locked(0, LOCK_STRIPES - 1):
            yield
