"""mirror plugin: RAID-1 across NBD servers, surviving the loss of copies and rebuilding them online.

Writes (write, zero, trim) and flushes go to every copy in sync at once and are acknowledged when at
least write-quorum of them succeeded (writes go to a copy being rebuilt too, which does not count);
reads go to one copy in sync, each request to the next in turn.
A copy that fails while another carries on (its connection breaks, a request gets no reply within
request-timeout=, or it fails a request another copy carried out) becomes stale: it is no longer read
or written, and state=PATH records so before any write it missed is acknowledged.  A background thread
rebuilds each stale copy from a copy in sync once it can be reached (_resync.py), and it rejoins.  A
request that fails on every copy is the request's fault (no space, bad range): its error is returned
and no copy is blamed.

The mirror keeps one connection per copy, shared by every client connection: a flush covers every
client's writes, and the rebuild sees them all.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import threading
import time
from dataclasses import replace
from typing import Callable, TypeVar

from ..api.chain import EMULATE, NATIVE, NONE, Extents, Plugin, PluginHandle
from ..api.errors import ConfigError, NBDError
from ..api.params import Int, Param, Size, String
from ..api.status import report_status, withdraw_status
from ..client import Command, NBDClient
from ..protocol import wire as P
from . import _mirror_state
from ._legs import (Flush, Leg, Offer, Timeouts, close_all, connect_timeout_param, open_all, parse_servers,
                    error_text, request_timeout_param)
from ._resync import Rebuild, Stopped, WriteTracker
from .nbd import command_flags, zero_command_flags

log = logging.getLogger("nbdformats")
Result = TypeVar("Result")

SERVICE_INTERVAL = 1.0  # seconds between looks at the stale copies
REBUILD_RETRY_DELAY = 10.0  # seconds before a rebuild that failed is tried again


def describe(command: Command) -> str:
    """Why a server failed a request."""
    return command.message or os.strerror(command.error)


class Copy:
    """One server of the mirror: its connection, and whether it holds the current data."""

    def __init__(self, uri: str, leg: Leg, in_sync: bool) -> None:
        self.uri = uri  # as given with server=: the state file knows the copy by it
        self.leg = leg
        self.in_sync = in_sync
        self.last_problem = ""  # why it could not be rebuilt the last time (logged once)
        self.rebuild_at = 0.0  # time.monotonic() before which no rebuild is tried after a failed one

    def describe(self) -> str:
        return self.leg.describe()


class Mirror:
    """The copies and the requests that go to them, shared by every client connection."""

    def __init__(self, copies: list[Copy], size: int, offer: Offer, write_quorum: int, state_path: str | None,
                 resync_rate: int) -> None:
        self.copies = copies
        self.size = size
        self.offer = offer  # what the mirror told its clients (every copy must keep it)
        self.write_quorum = write_quorum
        self.state_path = state_path
        self.resync_rate = resync_rate
        self.writes = WriteTracker()
        self.rebuild: Rebuild | None = None  # the rebuild running, if any
        self._state_lock = threading.Lock()  # which copies are in sync, and the state file
        self._changes = self._saved = 0  # changes of which copies are in sync, made and recorded
        self._turn = itertools.count()
        self._stopping = threading.Event()
        self._service: threading.Thread | None = None

    # -- Which copies are in sync ----------------------------------------------------------------
    def _save(self) -> None:
        """Record which copies are in sync in the state file (with _state_lock held); EIO if it fails."""
        changes = self._changes
        if self.state_path is not None:
            state = _mirror_state.MirrorState(self.size, {copy.uri: copy.in_sync for copy in self.copies})
            try:
                _mirror_state.save(self.state_path, state)
            except OSError as e:
                log.error("mirror: cannot write state=%s: %s: writes are refused until it can be written",
                          self.state_path, e)
                raise NBDError(errno.EIO, f"mirror: cannot record which copies are in sync in {self.state_path}: "
                                          f"{e}") from None
        self._saved = changes

    def save(self) -> None:
        with self._state_lock:
            self._save()

    def ensure_saved(self) -> None:
        """Before a write is acknowledged: the state file must already say which copies missed it."""
        if self._saved != self._changes:
            with self._state_lock:
                if self._saved != self._changes:
                    self._save()

    def mark_stale(self, copy: Copy, reason: str) -> None:
        with self._state_lock:
            if not copy.in_sync:
                return
            self._changes += 1  # first: a write that no longer sees the copy must see the change to record
            copy.in_sync = False
            left = sum(c.in_sync for c in self.copies)
            log.warning("mirror: %s is stale and no longer used: %s; %d of %d copies in sync. It is rebuilt "
                        "from a copy in sync once it can be reached.", copy.describe(), reason, left, len(self.copies))
            try:
                self._save()
            except NBDError:
                pass  # logged; ensure_saved() refuses writes until it is saved

    def rejoin(self, copy: Copy) -> None:
        """A rebuilt copy holds the current data (called while no write is in flight)."""
        with self._state_lock:
            copy.in_sync = True
            self._changes += 1
            try:
                self._save()
            except NBDError:
                copy.in_sync = False
                self._changes += 1
                raise
            self.rebuild = None  # writes reach it as a copy in sync now
        log.info("mirror: %s is in sync again and rejoins the mirror", copy.describe())

    # -- Requests ----------------------------------------------------------------------------------
    def _reachable(self) -> list[tuple[Copy, NBDClient]]:
        """The copies in sync that can be reached, with their connections; those that cannot become stale
        if another can."""
        reachable, unreachable = [], []
        for copy in self.copies:
            if copy.in_sync:
                try:
                    reachable.append((copy, copy.leg.client()))
                except NBDError as e:
                    unreachable.append((copy, e))
        if not reachable:
            raise NBDError(errno.EIO, "mirror: no copy in sync can be reached" +
                                      (f": {unreachable[0][1]}" if unreachable else ""))
        for copy, _ in unreachable:
            self.mark_stale(copy, copy.leg.why_down)
        return reachable

    def write(self, type: int, offset: int, length: int, flags: int, payload: memoryview | None = None) -> None:
        """WRITE, WRITE_ZEROES or TRIM to every copy in sync, and to the copy being rebuilt."""
        name, quorum = P.COMMAND_NAMES[type], self.write_quorum
        with self.writes.tracking(offset, length):
            copies = self._reachable()
            if len(copies) < quorum:
                raise NBDError(errno.EIO, f"mirror: {len(copies)} copies in sync can be reached, fewer than "
                                          f"write-quorum={quorum}")
            rebuild = self.rebuild
            rebuilt = [] if rebuild is None else rebuild.target.submit_split(type, offset, length, flags,
                                                                             payload=payload)
            sent = [(copy, client, client.submit_split(type, offset, length, flags, payload=payload))
                    for copy, client in copies]
            rebuild_failure = next((c for c in rebuilt if c.wait().error), None)
            succeeded: list[tuple[Copy, NBDClient]] = []
            failed: list[tuple[Copy, NBDClient, Command]] = []
            for copy, client, commands in sent:
                failure = next((c for c in commands if c.wait().error), None)
                if failure is None:
                    succeeded.append((copy, client))
                else:
                    failed.append((copy, client, failure))
            if not succeeded:
                failed[0][2].result()  # raises: no copy took it, none is blamed
            for copy, client, command in failed:
                self.mark_stale(copy, client.failure or f"{name} failed: {describe(command)}")
            if rebuild is not None and rebuild_failure is not None:
                rebuild.fail(f"{name} failed: {describe(rebuild_failure)}")
            self.ensure_saved()
            if len(succeeded) < quorum:
                raise NBDError(errno.EIO, f"mirror: {name} succeeded on {len(succeeded)} copies, fewer than "
                                          f"write-quorum={quorum}")
            for copy, client in succeeded:
                copy.leg.wrote(client, flags)

    def flush(self) -> None:
        copies = self._reachable()
        flushes: list[tuple[Copy, Flush]] = []
        failed: list[tuple[Copy, NBDError]] = []
        for copy, _ in copies:  # all sent first, then all waited for
            try:
                flushes.append((copy, copy.leg.start_flush()))
            except NBDError as e:
                failed.append((copy, e))
        for copy, flush in flushes:
            try:
                copy.leg.finish_flush(flush)
            except NBDError as e:
                failed.append((copy, e))
        if len(failed) == len(copies):
            raise failed[0][1]
        for copy, error in failed:
            self.mark_stale(copy, f"FLUSH failed: {error}")
        self.ensure_saved()
        if len(copies) - len(failed) < self.write_quorum:
            raise NBDError(errno.EIO, f"mirror: FLUSH succeeded on {len(copies) - len(failed)} copies, fewer "
                                      f"than write-quorum={self.write_quorum}")

    def from_one(self, name: str, call: Callable[[NBDClient], Result]) -> Result:
        """`call` on one copy in sync, the next in turn for each request, or on the others if it fails;
        a copy that failed where another succeeded is stale."""
        copies = self._reachable()
        start = next(self._turn) % len(copies)
        failed: list[tuple[Copy, NBDClient, NBDError]] = []
        for copy, client in copies[start:] + copies[:start]:
            try:
                result = call(client)
            except NBDError as e:
                failed.append((copy, client, e))
                continue
            for bad, bad_client, error in failed:
                self.mark_stale(bad, bad_client.failure or f"{name} failed: {error}")
            return result
        raise failed[0][2]

    def cache(self, count: int, offset: int) -> None:
        for _, client in self._reachable():
            client.submit_split(P.CMD_CACHE, offset, count)  # advisory: not waited for

    # -- Rebuilding stale copies, in the background --------------------------------------------------
    def status(self) -> dict[str, object] | None:
        """For --stats-json, while a copy is stale: each copy's state and the rebuild's progress."""
        rebuild = self.rebuild
        if rebuild is None and all(copy.in_sync for copy in self.copies):
            return None
        copies = {copy.uri: "in-sync" if copy.in_sync else "stale" for copy in self.copies}
        return {"copies": copies, "rebuild": rebuild.status() if rebuild is not None else None}

    def start(self) -> None:
        self._stopping.clear()
        report_status("mirror", self.status)
        self._service = threading.Thread(target=self._rebuild_stale_copies, name="mirror-rebuild", daemon=True)
        self._service.start()

    def stop(self) -> None:
        """Stop rebuilding (a rebuild stops within one span of its copy) and close the connections."""
        self._stopping.set()
        withdraw_status("mirror")
        if self._service is not None:
            self._service.join()
            self._service = None
        close_all(copy.leg for copy in self.copies)

    def _rebuild_stale_copies(self) -> None:
        """Rebuild each stale copy, one at a time, once it can be reached (looking every second)."""
        while True:
            for copy in self.copies:
                if self._stopping.is_set():
                    return
                if copy.in_sync or not copy.leg.may_try() or time.monotonic() < copy.rebuild_at:
                    continue
                try:
                    target = copy.leg.client()
                except NBDError as e:
                    if str(e) != copy.last_problem:
                        log.info("mirror: cannot rebuild %s yet: %s", copy.describe(), e)
                        copy.last_problem = str(e)
                    continue
                try:
                    self._rebuild(copy, target)
                except Stopped:
                    return
                except NBDError as e:
                    if self._stopping.is_set():
                        return
                    log.warning("mirror: rebuilding %s failed: %s; trying again in %g s", copy.describe(), e,
                                REBUILD_RETRY_DELAY)
                    copy.rebuild_at = time.monotonic() + REBUILD_RETRY_DELAY
            if self._stopping.wait(SERVICE_INTERVAL):
                return

    def _rebuild(self, copy: Copy, target: NBDClient) -> None:
        log.info("mirror: rebuilding %s from the copies in sync (%d MiB%s)", copy.describe(), self.size >> 20,
                 f", at most {self.resync_rate >> 20} MiB/s" if self.resync_rate else "")
        copy.last_problem = ""
        copy.leg.forget_lost_writes()  # what it held before does not matter: it is overwritten
        self.rebuild = Rebuild(copy.describe(), self.size, target, lambda: self._reachable()[0][1], self.writes,
                               lambda: self.rejoin(copy), self.resync_rate, self._stopping)
        try:
            self.rebuild.run()
        finally:
            self.rebuild = None


class MirrorPlugin(Plugin):
    """RAID-1 across NBD servers: writes to all, reads balanced, a failed copy rebuilt online."""

    name = "mirror"
    latency_bound = True

    server = Param(String(), repeat=True, required=True,
                   help="NBD URI of one copy (repeat): nbd://HOST/EXPORT, nbd+unix:///?socket=PATH")
    write_quorum = Param(Int(minimum=1), default=1,
                         help="copies that must succeed for a write to be acknowledged (default 1)")
    state = Param(String(), help="file recording which copies are in sync, so that a restart never reads a "
                                 "stale copy (strongly recommended)")
    resync_rate = Param(Size(), default=0,
                        help="bytes of data per second a rebuild copies at most, e.g. 50M (default 0: no limit)")
    connect_timeout = connect_timeout_param()
    request_timeout = request_timeout_param()

    def config_complete(self) -> None:
        self.addresses = parse_servers(self.name, self.server)
        if len(set(self.server)) < len(self.server):
            raise ConfigError("mirror: a server= is given twice")
        if self.write_quorum > len(self.addresses):
            raise ConfigError(f"mirror: write-quorum={self.write_quorum} but only {len(self.addresses)} servers")
        if self.state is not None and not os.path.isdir(os.path.dirname(os.path.abspath(self.state))):
            raise ConfigError(f"mirror: state={self.state}: its directory does not exist")

    def get_ready(self) -> None:
        recorded = _mirror_state.load(self.state) if self.state is not None else None
        legs = [Leg(self.name, f"server {index}", address, Timeouts.of(self))
                for index, address in enumerate(self.addresses)]
        failures = [None if failure is None else f"cannot connect: {error_text(failure)}" for failure in open_all(legs)]
        try:
            self.mirror = self._mirror(recorded, legs, failures)
        except BaseException:
            close_all(legs)
            raise
        self.mirror.start()
        # The server forks to detach after get_ready(), and the child keeps no thread of ours: rebuilding
        # stops and the connections close before, and the child starts again (connecting when needed).
        os.register_at_fork(before=self.mirror.stop, after_in_parent=self.mirror.start,
                            after_in_child=self.mirror.start)

    def _mirror(self, recorded: _mirror_state.MirrorState | None, legs: list[Leg],
                failures: list[str | None]) -> Mirror:
        """Which copies are in sync and usable now, the mirror's size and what it offers; refuses to start
        with fewer than write-quorum copies in sync that can be used."""
        offers = [leg.offer if failure is None else None for leg, failure in zip(legs, failures)]
        if recorded is None:
            # Nothing recorded: the copies reachable now are taken to hold the same data, the others are stale.
            if self.state is None:
                log.info("mirror: no state= file: the copies reachable now are taken to hold the same data")
            in_sync = [offer is not None for offer in offers]
        else:
            in_sync = [recorded.copies.get(uri, False) for uri in self.server]  # a new copy is stale
            forgotten = sorted(set(recorded.copies) - set(self.server))
            if forgotten:
                log.info("mirror: %s lists copies no longer given with server=, now forgotten: %s", self.state,
                         ", ".join(forgotten))
        sizes = [offer.size for offer, sync in zip(offers, in_sync) if offer is not None and sync]
        size = recorded.size if recorded is not None else min(sizes, default=0)
        for index, offer in enumerate(offers):
            if offer is not None and offer.size < size:
                failures[index] = f"it has {offer.size} bytes, fewer than the mirror's {size}"
                offers[index] = None
        usable = [offer for offer, sync in zip(offers, in_sync) if offer is not None and sync]
        if len(usable) < self.write_quorum:
            def status(sync: bool, failure: str | None) -> str:
                known = "in sync" if sync else "stale"
                return f"{known}, {failure}" if failure and recorded is not None else failure or known

            raise ConfigError(f"mirror: {len(usable)} copies in sync can be used, fewer than write-quorum="
                              f"{self.write_quorum}: " + "; ".join(f"{leg.describe()}: {status(sync, failure)}"
                                                                  for leg, sync, failure in zip(legs, in_sync, failures)))
        if recorded is None and len(set(sizes)) > 1:
            log.warning("mirror: servers have different sizes %s: the mirror is %d bytes", sizes, size)
        offer = replace(Offer.common(usable), size=size)
        copies = []
        for uri, leg, sync, failure in zip(self.server, legs, in_sync, failures):
            leg.offer = offer  # a copy connecting later must hold and do what the mirror offers
            copies.append(Copy(uri, leg, sync and failure is None))
            if not copies[-1].in_sync:
                leg.disconnect()  # the rebuild connects again, checking the copy against the offer
                log.warning("mirror: starting without %s (%s): it is rebuilt from a copy in sync once it "
                            "can be reached", leg.describe(), failure or "stale")
        mirror = Mirror(copies, size, offer, self.write_quorum, self.state, self.resync_rate)
        try:
            mirror.save()
        except NBDError as e:
            raise ConfigError(str(e)) from None
        return mirror

    def cleanup(self) -> None:
        mirror = getattr(self, "mirror", None)
        if mirror is not None:
            mirror.stop()

    class Handle(PluginHandle):
        def __init__(self, plugin: "MirrorPlugin", readonly: bool, export_name: str) -> None:
            self.mirror = plugin.mirror
            self.offer = plugin.mirror.offer

        def get_size(self) -> int:
            return self.mirror.size

        def block_size(self) -> tuple[int, int, int] | None:
            return self.offer.block_size

        def can_write(self) -> bool:
            return not self.offer.has(P.TF_READ_ONLY)

        def can_flush(self) -> bool:
            return self.offer.has(P.TF_SEND_FLUSH)

        def is_rotational(self) -> bool:
            return self.offer.has(P.TF_ROTATIONAL)

        def can_trim(self) -> bool:
            return self.offer.has(P.TF_SEND_TRIM)

        def can_zero(self) -> int:
            return NATIVE if self.offer.has(P.TF_SEND_WRITE_ZEROES) else EMULATE

        def can_fast_zero(self) -> bool:
            return self.offer.has(P.TF_SEND_WRITE_ZEROES) and self.offer.has(P.TF_SEND_FAST_ZERO)

        def can_fua(self) -> int:
            if self.offer.has(P.TF_SEND_FUA):
                return NATIVE
            return EMULATE if self.can_flush() else NONE

        def can_multi_conn(self) -> bool:
            return True  # every client's requests share one connection per copy: a flush covers them all

        def can_extents(self) -> bool:
            return self.offer.block_status

        def can_cache(self) -> int:
            return NATIVE if self.offer.has(P.TF_SEND_CACHE) else NONE

        def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
            self.mirror.write(P.CMD_WRITE, offset, len(buf), command_flags(flags), buf)

        def zero(self, count: int, offset: int, flags: int) -> None:
            self.mirror.write(P.CMD_WRITE_ZEROES, offset, count, zero_command_flags(flags))

        def trim(self, count: int, offset: int, flags: int) -> None:
            self.mirror.write(P.CMD_TRIM, offset, count, command_flags(flags))

        def flush(self, flags: int) -> None:
            self.mirror.flush()

        def cache(self, count: int, offset: int, flags: int) -> None:
            self.mirror.cache(count, offset)

        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            self.mirror.from_one("READ", lambda client: client.pread_into(buf, offset))

        def extents(self, count: int, offset: int, flags: int, extents: Extents) -> None:
            status = self.mirror.from_one("BLOCK_STATUS", lambda client: client.block_status(
                count, offset, command_flags(flags)))
            position = offset
            for length, state in status:
                extents.add(position, length, state & (P.STATE_HOLE | P.STATE_ZERO))
                position += length


PLUGIN = MirrorPlugin
