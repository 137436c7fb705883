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


class SharedLock:
    """Held by many at once on its shared side, or by one alone on its exclusive side; a waiting
    exclusive holder goes before new shared ones (it cannot starve)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting_exclusive = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._changed:
            while self._exclusive or self._waiting_exclusive:
                self._changed.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._changed:
                self._shared -= 1
                if not self._shared:
                    self._changed.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._changed:
            self._waiting_exclusive += 1
            while self._exclusive or self._shared:
                self._changed.wait()
            self._waiting_exclusive -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._changed:
                self._exclusive = False
                self._changed.notify_all()
