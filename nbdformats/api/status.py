"""Background work a plugin or filter reports in the server's `--stats-json` lines.

    report_status("mirror", lambda: {"rebuilding": ...} if busy else None)
    ...
    withdraw_status("mirror")

Every interval line of `--stats-json` carries `"status": {NAME: DICT}` with what each source returns
at that moment (sources returning None are left out), and an interval with a status to show writes
a line even without requests.  Sources are called from the server's statistics timer: they must be
quick, thread-safe and return JSON-serialisable values.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

log = logging.getLogger(__name__)

StatusSource = Callable[[], "dict[str, Any] | None"]

_sources: dict[str, StatusSource] = {}
_lock = threading.Lock()


def report_status(name: str, source: StatusSource) -> None:
    """Show what `source()` returns under `name` in every `--stats-json` interval line."""
    with _lock:
        _sources[name] = source


def withdraw_status(name: str) -> None:
    with _lock:
        _sources.pop(name, None)


def current_status() -> dict[str, dict[str, Any]]:
    """What every source reports now (a failing source is logged and left out)."""
    with _lock:
        sources = list(_sources.items())
    status = {}
    for name, source in sources:
        try:
            value = source()
        except Exception as e:  # a component's bug must not stop the statistics
            log.warning("status of %s: %s", name, e)
            continue
        if value is not None:
            status[name] = value
    return status
