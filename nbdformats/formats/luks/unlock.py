"""Unlocking: derive a keyslot key from the passphrase, decrypt and merge the split volume key,
check it against the digest (sans-IO: reads through a `read(offset, length)` function).

Each key derivation is a `Derivation` handed to the caller's `derive` (the filter runs it in a
thread it can abandon on Ctrl-C, with a progress bar), and the whole unlock keeps to a time
budget: a keyslot whose estimated derivation does not fit in what is left is not tried.
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass
from typing import Callable

from ..readers import Reader
from .cipher import SectorCipher
from .errors import LuksError
from .header import Keyslot, Volume
from .kdf import Kdf, af_merge

Tried = Callable[[Keyslot, bool, float], None]


@dataclass(frozen=True)
class Derivation:
    """One key derivation: `kdf` over `secret` into `length` bytes, taking about `estimate` seconds."""

    kdf: Kdf
    secret: bytes
    length: int
    what: str  # e.g. "keyslot 0 (pbkdf2-sha256, 1000 iterations)"
    estimate: float

    def run(self) -> bytes:
        return self.kdf.derive(self.secret, self.length)


Derive = Callable[[Derivation], bytes]


class KdfBudgetError(LuksError):
    """No keyslot opened, and some were not tried: their key derivation would exceed the time budget."""


def derivation_seconds(slot: Keyslot) -> float:
    """Estimated seconds to try a keyslot: its KDF, then the digest KDF of the candidate key."""
    return (slot.kdf.estimated_seconds(slot.area_key_size) +
            slot.digest.kdf.estimated_seconds(len(slot.digest.value)))


def keyslot_order(volume: Volume, keyslot: int | None) -> list[Keyslot]:
    """The keyslots to try: only `keyslot` if given, else high priority first, then normal
    (LUKS2 priority 0 means "only when asked for by number", as in cryptsetup)."""
    if keyslot is not None:
        chosen = [slot for slot in volume.keyslots if slot.index == keyslot]
        if not chosen:
            active = ", ".join(str(slot.index) for slot in volume.keyslots) or "none"
            raise LuksError(f"keyslot {keyslot} is not active (active keyslots: {active})")
        return chosen
    slots = [slot for slot in volume.keyslots if slot.priority > 0]
    if not slots:
        raise LuksError("the volume has no usable keyslot" +
                        (f" ({'; '.join(volume.warnings)})" if volume.warnings else ""))
    return sorted(slots, key=lambda slot: -slot.priority)


def open_keyslot(slot: Keyslot, secret: bytes, read: Reader, device_size: int,
                 derive: Derive = Derivation.run) -> bytes | None:
    """The volume key if `secret` opens this keyslot, else None."""
    end = slot.area_offset + slot.material_size
    if end > device_size:
        raise LuksError(f"the file is truncated: keyslot {slot.index} ends at {end} "
                        f"but the file has {device_size} bytes")
    slot_key = derive(Derivation(slot.kdf, secret, slot.area_key_size, f"keyslot {slot.index} ({slot.kdf.describe()})",
                                 slot.kdf.estimated_seconds(slot.area_key_size)))
    material = bytearray(read(slot.area_offset, slot.material_size))
    SectorCipher(slot.area_cipher, slot_key).decrypt(memoryview(material), 0)
    candidate = af_merge(bytes(material), slot.key_size, slot.stripes, slot.af_hash)
    digest = slot.digest
    check = derive(Derivation(digest.kdf, candidate, len(digest.value),
                              f"keyslot {slot.index}: the volume key digest ({digest.kdf.describe()})",
                              digest.kdf.estimated_seconds(len(digest.value))))
    return candidate if hmac.compare_digest(check, digest.value) else None


def unlock(volume: Volume, secret: bytes, read: Reader, device_size: int, keyslot: int | None = None,
           tried: Tried | None = None, derive: Derive = Derivation.run,
           max_kdf_seconds: float | None = None) -> bytes:
    """The volume key, or LuksError("no keyslot matches ...").  `tried(slot, opened, seconds)`
    hears about each keyslot tried (-D luks.keyslots=1).  Keyslots are tried while their
    estimated key derivation fits in what is left of `max_kdf_seconds`; KdfBudgetError if none
    opened and some were left out for that."""
    slots = keyslot_order(volume, keyslot)
    spent = 0.0
    tried_slots: list[int] = []
    too_costly: list[str] = []
    for slot in slots:
        if max_kdf_seconds is not None:
            estimate = derivation_seconds(slot)
            if spent + estimate > max_kdf_seconds:
                too_costly.append(f"keyslot {slot.index} ({slot.kdf.describe()}) would take about "
                                  f"{estimate:.0f} s")
                continue
        started = time.monotonic()
        key = open_keyslot(slot, secret, read, device_size, derive)
        elapsed = time.monotonic() - started
        spent += elapsed
        if tried is not None:
            tried(slot, key is not None, elapsed)
        if key is not None:
            volume.segment.cipher.check_key_size(len(key))
            return key
        tried_slots.append(slot.index)
    listed = ", ".join(map(str, tried_slots))
    outcome = f"tried keyslot{'s' if len(tried_slots) > 1 else ''} {listed}" if tried_slots else "none tried"
    if too_costly:
        raise KdfBudgetError(f"no keyslot matches the passphrase ({outcome}; over the {max_kdf_seconds:g} s "
                             f"key derivation limit: {'; '.join(too_costly)})")
    raise LuksError(f"no keyslot matches the passphrase ({outcome})")
