"""The in-flight byte budget (server/budget.py), without a server."""

from __future__ import annotations

import threading
import time

from nbdformats.server.budget import Budget

MIB = 1 << 20


def test_small_requests_are_not_charged_to_the_server():
    server = Budget(8 * MIB)
    connection = Budget(64 * MIB, server, allowance=MIB)
    connection.acquire(512 * 1024)
    assert server.used == 0
    connection.acquire(MIB)  # 1.5 MiB held: the half MiB beyond the allowance is the server's
    assert server.used == MIB // 2
    connection.release(MIB)
    assert server.used == 0 and connection.used == 512 * 1024


def test_a_full_server_blocks_large_requests_but_not_small_ones():
    server = Budget(8 * MIB)
    hog = Budget(64 * MIB, server, allowance=0)
    hog.acquire(8 * MIB)
    other = Budget(64 * MIB, server, allowance=MIB)
    assert other.try_acquire(4096)  # within its allowance
    assert not other.try_acquire(2 * MIB)  # would need the server's room

    granted = threading.Event()
    threading.Thread(target=lambda: (other.acquire(2 * MIB), granted.set()), daemon=True).start()
    time.sleep(0.1)
    assert not granted.is_set()
    hog.release(8 * MIB)
    assert granted.wait(5)
    assert server.used == 2 * MIB + 4096 - MIB


def test_one_request_always_fits_in_an_empty_budget():
    server = Budget(MIB)
    connection = Budget(MIB, server)
    connection.acquire(64 * MIB)  # larger than both limits: runs alone
    assert not connection.try_acquire(1)
    connection.release(64 * MIB)
    assert connection.used == server.used == 0
