"""luks filter: serve the decrypted contents of a LUKS1 or LUKS2 image, read and write.

The header is parsed and the passphrase tried once at start-up (key derivation is slow by
design); each connection re-reads the header and reuses the volume key when the header is the
same (another export may be another volume: it is unlocked on first use and cached).
"""

from __future__ import annotations

import errno
import logging
import signal
import threading
import time
from dataclasses import dataclass
from typing import ClassVar, Mapping

from ..api.chain import EMULATE, EXTENT_DATA, FLAG_FUA, Extents, Filter, FilterHandle, Layer
from ..api.errors import ConfigError, NBDError
from ..api.params import Float, Int, Param, Path, Secret, SecretValue
from ..api.progress import progress
from ..api.zeroes import write_zeroes
from ..formats.luks.cipher import SectorCipher
from ..formats.luks.errors import LuksError
from ..formats.luks.header import Keyslot, Volume, read_volume
from ..formats.luks.unlock import Derivation, KdfBudgetError, unlock
from ..formats.readers import Reader
from ._layer_bytes import read_bytes

log = logging.getLogger("nbdformats.luks")

KEYFILE_MAX = 8 * 1024 * 1024  # cryptsetup's default --keyfile-size limit
NO_MAXIMUM = 0xFFFFFFFF


@dataclass(frozen=True)
class Unlocked:
    volume: Volume
    cipher: SectorCipher


class SharedExclusiveLock:
    """Aligned writes share it; read-modify-write of a partial sector holds it alone, so a
    concurrent write to the same sector cannot be undone by the write-back of stale bytes."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting_exclusive = 0

    def acquire_shared(self) -> None:
        with self._cond:
            while self._exclusive or self._waiting_exclusive:
                self._cond.wait()
            self._shared += 1

    def release_shared(self) -> None:
        with self._cond:
            self._shared -= 1
            if not self._shared:
                self._cond.notify_all()

    def acquire_exclusive(self) -> None:
        with self._cond:
            self._waiting_exclusive += 1
            while self._exclusive or self._shared:
                self._cond.wait()
            self._waiting_exclusive -= 1
            self._exclusive = True

    def release_exclusive(self) -> None:
        with self._cond:
            self._exclusive = False
            self._cond.notify_all()


def _log_keyslot(slot: Keyslot, opened: bool, seconds: float) -> None:
    log.debug("luks: keyslot %d (%s): %s in %.3f s", slot.index, slot.kdf.describe(),
              "opened" if opened else "no match", seconds)


def derive_interruptibly(job: Derivation) -> bytes:
    """Run a key derivation in a helper thread while this one waits in short steps.

    OpenSSL's PBKDF2 and Argon2 are single C calls: Python runs no signal handler until they
    return, so Ctrl-C (SIGINT) would wait for the whole derivation.  The waiting thread takes
    the signal at once and start-up stops; the abandoned helper dies with the process.  On a
    terminal a progress bar shows the seconds spent of the estimated total."""
    outcome: list[bytes | BaseException] = []

    def work() -> None:
        try:
            outcome.append(job.run())
        except BaseException as e:  # handed to the waiting thread
            outcome.append(e)

    helper = threading.Thread(target=work, name="luks-kdf", daemon=True)
    started = time.monotonic()
    helper.start()
    estimate = max(1, round(job.estimate))
    with progress(estimate, f"luks: key derivation of {job.what}", unit="s") as bar:  # seconds, estimated
        while helper.is_alive():
            helper.join(0.1)  # where Ctrl-C is taken
            # Not inside the bar's code: a KeyboardInterrupt there could leave its lock taken, and
            # closing the bar would then wait for ever.  A signal that comes meanwhile waits here.
            masked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            try:
                bar.set(min(estimate - 1, int(time.monotonic() - started)))
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, masked)
    result = outcome[0]
    if isinstance(result, BaseException):
        raise result
    return result


class LuksKeys:
    """The passphrase parameters and the unlocking of LUKS volumes, for the filters that open
    them: luks (a LUKS image) and qcow2 (LUKS inside qcow2).  Each volume is unlocked once (key
    derivation is slow by design) and its cipher kept by header."""

    name: ClassVar[str]
    debug_flags: Mapping[str, int]
    passphrase = Param(Secret(), help="The passphrase: SECRET, +FILE, - (prompt) or -FD (as nbdkit)")
    keyfile = Param(Path("file"), help="A cryptsetup key file: its whole contents are the passphrase")
    keyslot = Param(Int(0, 31), help="Try only this keyslot (default: every active keyslot)")
    kdf_max_seconds = Param(Float(minimum=0), key="luks-kdf-max-seconds", default=60.0,
                            help="Key derivation time allowed to open the volume, all keyslots tried "
                                 "together; a keyslot whose derivation is estimated to take longer is "
                                 "not tried (cryptsetup writes keyslots of about 2 s; default 60)")

    def check_one_passphrase(self) -> None:
        if (self.passphrase is None) == (self.keyfile is None):
            raise ConfigError(f"{self.name}: give exactly one of passphrase= or keyfile=")

    def prepare_keys(self) -> None:
        """Read the key file (at start-up, before the server listens)."""
        if self.keyfile is not None:
            self.passphrase = SecretValue(self._read_keyfile(self.keyfile))
        self._unlocked: dict[bytes, Unlocked] = {}
        self._unlock_lock = threading.Lock()

    def _read_keyfile(self, path: str) -> bytes:
        try:
            with open(path, "rb") as f:
                data = f.read(KEYFILE_MAX + 1)
        except OSError as e:
            raise ConfigError(f"{self.name}: cannot read keyfile {path}: {e.strerror}") from None
        if len(data) > KEYFILE_MAX:
            raise ConfigError(f"{self.name}: keyfile {path} is larger than {KEYFILE_MAX} bytes")
        return data

    def unlock_volume(self, read: Reader, device_size: int) -> Unlocked:
        """The volume whose header `read` reads, with its cipher; KdfBudgetError or LuksError."""
        volume = read_volume(read, device_size)
        with self._unlock_lock:
            unlocked = self._unlocked.get(volume.identity)
            if unlocked is None:
                for warning in volume.warnings:
                    log.warning("%s: %s", self.name, warning)
                tried = _log_keyslot if self.debug_flags.get("keyslots") else None
                key = unlock(volume, self.passphrase.reveal(), read, device_size, self.keyslot, tried,
                             derive_interruptibly, self.kdf_max_seconds)
                segment = volume.segment
                unlocked = Unlocked(volume, SectorCipher(segment.cipher, key, segment.sector_size,
                                                         segment.iv_tweak))
                self._unlocked[volume.identity] = unlocked
                log.debug("%s: unlocked LUKS%d volume %s (%s, %d-byte sectors; cipher: %s)", self.name,
                          volume.version, volume.uuid, segment.cipher.text, segment.sector_size,
                          unlocked.cipher.implementation)
        return unlocked

    def budget_message(self, error: KdfBudgetError) -> str:
        return f"{self.name}: {error} (raise luks-kdf-max-seconds= to try them)"


KEYSLOTS_FLAG = {"keyslots": "log each keyslot tried at unlock: its KDF, whether the passphrase "
                             "opened it and how long that took (with -v)"}


class LuksFilter(LuksKeys, Filter):
    """Decrypt (and encrypt) a LUKS1 or LUKS2 disk image, as cryptsetup and qemu make them."""

    name = "luks"
    debug_flag_help = KEYSLOTS_FLAG

    def config_complete(self) -> None:
        self.check_one_passphrase()

    def get_ready(self) -> None:
        self.prepare_keys()
        self.write_lock = SharedExclusiveLock()
        try:
            below = self.open_below(True, "")
        except (NBDError, OSError) as e:  # e.g. file dir=: no default export; each volume unlocks at first use
            log.debug("luks: cannot open the layer below at start-up (%s); unlocking at connection", e)
            return
        try:
            self.unlock(below).volume.payload_size(below.get_size())  # a truncated file fails here
        except KdfBudgetError as e:
            raise ConfigError(self.budget_message(e)) from None
        except (LuksError, NBDError) as e:
            raise ConfigError(f"luks: {e}") from None
        finally:
            below.close()

    def unlock(self, below: Layer) -> Unlocked:
        """The volume behind `below` with its cipher; the key derivation runs once per header."""

        def read(offset: int, length: int) -> bytes:
            return read_bytes(below, offset, length)

        return self.unlock_volume(read, below.get_size())

    class Handle(FilterHandle):
        def __init__(self, filter: "LuksFilter", next: Layer, readonly: bool, export_name: str) -> None:
            super().__init__(filter, next, readonly, export_name)
            try:
                unlocked = filter.unlock(next)
                self.size = unlocked.volume.payload_size(next.get_size())
            except LuksError as e:
                raise NBDError(errno.EIO, f"luks: {e}") from None
            self.cipher = unlocked.cipher
            self.sector = unlocked.volume.segment.sector_size
            self.data_offset = unlocked.volume.segment.offset
            self.write_lock = filter.write_lock

        def get_size(self) -> int:
            return self.size

        def block_size(self) -> tuple[int, int, int]:
            sector = self.sector
            minimum, preferred, maximum = self.next.block_size() or (1, 4096, NO_MAXIMUM)
            minimum = max(minimum, sector)
            preferred = max(preferred, minimum)
            if maximum != NO_MAXIMUM:
                maximum = max(maximum - maximum % minimum, minimum)
            return minimum, preferred, maximum

        def can_extents(self) -> bool:
            return True

        def extents(self, count: int, offset: int, flags: int, extents: Extents) -> None:
            # Holes in the encrypted file say nothing about the plaintext: all of it is data.
            extents.add(offset, count, EXTENT_DATA)

        def can_trim(self) -> bool:
            return True

        def can_zero(self) -> int:
            return EMULATE  # the core writes zeroes through our pwrite: encrypted zeroes

        def can_fast_zero(self) -> bool:
            return True  # zeroing is never fast here: FAST_ZERO requests fail at once with ENOTSUP

        def _aligned(self, offset: int, count: int) -> tuple[int, int]:
            start = offset - offset % self.sector
            end = -(-(offset + count) // self.sector) * self.sector
            return start, end

        def pread(self, buf: memoryview, offset: int, flags: int) -> None:
            if not len(buf):
                return
            start, end = self._aligned(offset, len(buf))
            if start == offset and end == offset + len(buf):
                self.next.pread(buf, self.data_offset + offset, flags)
                self.cipher.decrypt(buf, offset // self.sector)
                return
            bounce = memoryview(bytearray(end - start))
            self.next.pread(bounce, self.data_offset + start, flags)
            self.cipher.decrypt(bounce, start // self.sector)
            buf[:] = bounce[offset - start:offset - start + len(buf)]

        def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
            if not len(buf):
                return
            start, end = self._aligned(offset, len(buf))
            if start == offset and end == offset + len(buf):
                sealed = memoryview(bytearray(buf))  # never encrypt the caller's buffer in place
                self.cipher.encrypt(sealed, offset // self.sector)
                self.write_lock.acquire_shared()
                try:
                    self.next.pwrite(sealed, self.data_offset + offset, flags)
                finally:
                    self.write_lock.release_shared()
                return
            self.write_lock.acquire_exclusive()
            try:
                self._read_modify_write(buf, offset, start, end, flags)
            finally:
                self.write_lock.release_exclusive()

        def _read_modify_write(self, buf: memoryview, offset: int, start: int, end: int, flags: int) -> None:
            """Write a request that starts or ends inside a sector: decrypt the partial first and
            last sectors, patch them, encrypt the whole run."""
            sector = self.sector
            span = memoryview(bytearray(end - start))
            partial = set()
            if offset != start:
                partial.add(start)
            if offset + len(buf) != end:
                partial.add(end - sector)
            for edge in partial:
                piece = span[edge - start:edge - start + sector]
                self.next.pread(piece, self.data_offset + edge, 0)
                self.cipher.decrypt(piece, edge // sector)
            span[offset - start:offset - start + len(buf)] = buf
            self.cipher.encrypt(span, start // sector)
            self.next.pwrite(span, self.data_offset + start, flags)

        def trim(self, count: int, offset: int, flags: int) -> None:
            # Punching a hole below would leave ciphertext-less plaintext zeroes (and show the
            # host which blocks are unused): write encrypted zeroes instead.
            write_zeroes(self.pwrite, count, offset, flags & FLAG_FUA)  # pwrite encrypts a copy

        def cache(self, count: int, offset: int, flags: int) -> None:
            start, end = self._aligned(offset, count)
            self.next.cache(end - start, self.data_offset + start, flags)


FILTER = LuksFilter
