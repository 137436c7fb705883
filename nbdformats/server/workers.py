"""Worker threads for blocking chains, with a cheap hand-off back to the event loop.

`run_in_executor` costs a concurrent.futures.Future, an asyncio.Future and one loop wake-up per
request.  Here a worker puts (callback, result, error) on a deque and wakes the loop only when
no drain is already scheduled, so a burst of completions costs one wake-up.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
from typing import Any, Callable

Callback = Callable[[Any, BaseException | None], None]


class WorkerPool:
    def __init__(self, loop: asyncio.AbstractEventLoop, threads: int, name: str = "nbdformats") -> None:
        self.loop = loop
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._drain_scheduled = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, func: Callable[..., Any], args: tuple, callback: Callback) -> None:
        """Run func(*args) in a worker; callback(result, error) runs later on the event loop."""
        self._jobs.put((func, args, callback))

    async def run(self, func: Callable[..., Any], *args: Any) -> Any:
        """Await func(*args) run in a worker (for the handshake and other rare calls)."""
        future = self.loop.create_future()

        def settle(result: Any, error: BaseException | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        self.submit(func, args, settle)
        return await future

    def shutdown(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)

    def _work(self) -> None:
        jobs, done = self._jobs, self._done
        while True:
            job = jobs.get()
            if job is None:
                return
            func, args, callback = job
            try:
                outcome = (callback, func(*args), None)
            except BaseException as e:  # handed to the callback on the loop
                outcome = (callback, None, e)
            done.append(outcome)
            with self._lock:
                wake = not self._drain_scheduled
                self._drain_scheduled = True
            if wake:
                try:
                    self.loop.call_soon_threadsafe(self._drain)
                except RuntimeError:  # the loop is closed: the server is gone
                    return

    def _drain(self) -> None:
        with self._lock:
            self._drain_scheduled = False
        done = self._done
        while done:
            callback, result, error = done.popleft()
            callback(result, error)
