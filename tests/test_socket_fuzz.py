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


@pytest.mark.parametrize("plugin,duration,rss_bound", [
    ("memory", 40, 200),  # inline: one reply being built and the write buffer per connection
    ("file", 30, 600),    # worker threads: 64 MiB of reads in flight per hostile connection
])
def test_server_survives_hostile_clients(plugin, duration, rss_bound):
    stats = socket_fuzz.run(duration, plugin, seed=11, workers=4, rss_bound_mib=rss_bound)
    assert not stats.failures, "\n".join(stats.failures)
    assert stats.connections > 100 and stats.good_checks > 100, stats
