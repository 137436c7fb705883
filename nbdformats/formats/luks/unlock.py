"""Unlocking: derive a keyslot key from the passphrase, decrypt and merge the split volume key,
check it against the digest (sans-IO: reads through a `read(offset, length)` function)."""

from __future__ import annotations

import time
from typing import Callable

from ..readers import Reader
from .cipher import SectorCipher
from .errors import LuksError
from .header import Keyslot, Volume
from .kdf import af_merge

Tried = Callable[[Keyslot, bool, float], None]


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


def open_keyslot(slot: Keyslot, secret: bytes, read: Reader, device_size: int) -> bytes | None:
    """The volume key if `secret` opens this keyslot, else None."""
    end = slot.area_offset + slot.material_size
    if end > device_size:
        raise LuksError(f"the file is truncated: keyslot {slot.index} ends at {end} "
                        f"but the file has {device_size} bytes")
    slot_key = slot.kdf.derive(secret, slot.area_key_size)
    material = bytearray(read(slot.area_offset, slot.material_size))
    SectorCipher(slot.area_cipher, slot_key).decrypt(memoryview(material), 0)
    candidate = af_merge(bytes(material), slot.key_size, slot.stripes, slot.af_hash)
    return candidate if slot.digest.matches(candidate) else None


def unlock(volume: Volume, secret: bytes, read: Reader, device_size: int, keyslot: int | None = None,
           tried: Tried | None = None) -> bytes:
    """The volume key, or LuksError("no keyslot matches ...").  `tried(slot, opened, seconds)`
    hears about each keyslot tried (-D luks.keyslots=1)."""
    slots = keyslot_order(volume, keyslot)
    for slot in slots:
        started = time.monotonic()
        key = open_keyslot(slot, secret, read, device_size)
        if tried is not None:
            tried(slot, key is not None, time.monotonic() - started)
        if key is not None:
            volume.segment.cipher.check_key_size(len(key))
            return key
    tried = ", ".join(str(slot.index) for slot in slots)
    raise LuksError(f"no keyslot matches the passphrase (tried keyslot{'s' if len(slots) > 1 else ''} {tried})")
