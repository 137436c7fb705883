"""The socket-level fuzzer (tests/fuzz/socket_fuzz.py), bounded for CI: hostile clients against
a live server while a libnbd client checks its answers and the server's RSS is sampled.

A long run: .venv/bin/python tests/fuzz/socket_fuzz.py --duration 3600 --plugin file
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fuzz"))
import socket_fuzz  # noqa: E402


# Bounded for CI's time; the long runs are the standalone ones (see above).
@pytest.mark.parametrize("plugin,duration,rss_bound", [
    ("memory", 20, 200),  # the 16 MiB disk, and replies held for clients that do not read them
    ("file", 15, 600),    # up to 64 MiB of reads in flight per hostile connection (server/budget.py)
])
def test_server_survives_hostile_clients(plugin, duration, rss_bound):
    stats = socket_fuzz.run(duration, plugin, seed=11, workers=4, rss_bound_mib=rss_bound)
    assert not stats.failures, "\n".join(stats.failures)
    assert stats.connections > 100 and stats.good_checks > 100, stats
