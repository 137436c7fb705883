"""Sector encryption as dm-crypt and qemu do it: AES in XTS or CBC mode with a per-sector IV.

A cipher spec is cryptsetup's `CIPHER-MODE-IVGEN` ("aes-xts-plain64", "aes-cbc-essiv:sha256").
IVs count 512-byte sectors even when the encryption sector is larger (cryptsetup does not set
dm-crypt's iv_large_sectors for LUKS2), so a 4096-byte sector at byte offset B has IV B / 512.

Speed: OpenSSL's XTS and CBC take one IV per call.  The C extension `_sectors` (built at
install where a compiler is found) loops over the sectors of a request calling OpenSSL's EVP
XTS or CBC per sector, with the GIL released: OpenSSL's speed, and other threads run meanwhile.
Without it, one Python call per 512-byte sector would be far too slow; instead whole runs of
sectors go through one AES-ECB call each (cryptography's, which holds the GIL), with the
per-block XTS tweaks (and the CBC chaining) computed for all sectors at once with numpy:
  XTS (IEEE 1619): C_j = E_K1(P_j ^ T_j) ^ T_j,  T_0 = E_K2(IV),  T_{j+1} = T_j * alpha in GF(2^128)
  CBC decryption:  P_j = D_K(C_j) ^ C_{j-1},  C_{-1} = IV
CBC encryption is inherently sequential within a sector; it runs block column by block
column across all sectors of the run (one ECB call per block position).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .errors import LuksError

try:
    from . import _sectors  # OpenSSL per sector, GIL released (see the module docstring)
except ImportError:  # not built (no compiler at install) or no libcrypto.so.3: numpy it is
    _sectors = None  # type: ignore[assignment]

IV_SECTOR = 512  # IVs count 512-byte units whatever the encryption sector size
BLOCK = 16  # AES block
# Bulk calls work on runs of this many bytes, so temporaries stay in the CPU cache.
RUN_BYTES = 256 * 1024

_U64 = np.dtype("<u8")


@dataclass(frozen=True)
class CipherSpec:
    """A parsed cipher spec: `mode` is xts or cbc, `ivgen` plain, plain64 or essiv."""

    text: str
    mode: str
    ivgen: str
    essiv_hash: str = ""

    def check_key_size(self, key_size: int) -> None:
        allowed = (32, 64) if self.mode == "xts" else (16, 24, 32)
        if key_size not in allowed:
            bits = ", ".join(str(n * 8) for n in allowed)
            raise LuksError(f"{self.text}: a {key_size * 8}-bit key is not supported (use {bits} bits)")


SUPPORTED = "aes-xts-plain64, aes-xts-plain, aes-cbc-essiv:sha256, aes-cbc-plain64, aes-cbc-plain"


def parse_cipher_spec(text: str) -> CipherSpec:
    """Parse `aes-MODE-IVGEN`; anything else is a LuksError naming the spec."""
    parts = text.split("-", 2)
    if len(parts) != 3 or parts[0] != "aes" or parts[1] not in ("xts", "cbc"):
        raise LuksError(f"unsupported cipher {text!r} (supported: {SUPPORTED})")
    mode, ivgen = parts[1], parts[2]
    if ivgen in ("plain", "plain64"):
        return CipherSpec(text, mode, ivgen)
    if ivgen.startswith("essiv:"):
        essiv_hash = ivgen[len("essiv:"):]
        if essiv_hash not in hashlib.algorithms_available:
            raise LuksError(f"unsupported cipher {text!r}: unknown ESSIV hash {essiv_hash!r}")
        if hashlib.new(essiv_hash).digest_size not in (16, 24, 32):
            raise LuksError(f"unsupported cipher {text!r}: the {essiv_hash} digest is not an AES key size")
        return CipherSpec(text, mode, "essiv", essiv_hash)
    raise LuksError(f"unsupported cipher {text!r}: unknown IV mode {ivgen!r} (supported: {SUPPORTED})")


def _octets(words: np.ndarray) -> memoryview:
    """A flat byte view of a contiguous u64 array (cryptography takes buffers of bytes only)."""
    return words.reshape(-1).view(np.uint8).data


def _ecb(key: bytes) -> Cipher:
    return Cipher(algorithms.AES(key), modes.ECB())


def _mul_alpha_power(low: np.ndarray, high: np.ndarray, k: int, out_low: np.ndarray, out_high: np.ndarray) -> None:
    """(out_low, out_high) = (low, high) * alpha^k in GF(2^128) for 1 <= k <= 32, the 128-bit
    values as arrays of their little-endian u64 halves.

    Shifting left by k pushes the top k bits c out; c * x^128 = c * (x^7 + x^2 + x + 1), a
    carry-less product of at most k + 7 <= 39 bits, so it folds into the low word alone.
    (Shift counts are scalars: numpy vectorizes those far better than per-element counts.
    Results go straight into `out_*`: temporaries cost as much as the arithmetic.)
    """
    carry = high >> np.uint64(64 - k)
    np.left_shift(high, np.uint64(k), out=out_high)
    out_high |= low >> np.uint64(64 - k)
    np.left_shift(low, np.uint64(k), out=out_low)
    out_low ^= carry
    for shift in (1, 1, 5):  # carry << 1, << 2, << 7
        carry <<= np.uint64(shift)
        out_low ^= carry


_MODES = {"xts": 0, "cbc": 1}  # _sectors.crypt's numbering
_IV_MODES = {"plain": 0, "plain64": 1, "essiv": 2}


class SectorCipher:
    """Encrypts and decrypts whole sectors of one volume (or one keyslot area) with one key."""

    def __init__(self, spec: CipherSpec, key: bytes, sector_size: int = 512, iv_offset: int = 0) -> None:
        spec.check_key_size(len(key))
        self.spec = spec
        self.sector_size = sector_size
        self.blocks_per_sector = sector_size // BLOCK
        self.iv_step = sector_size // IV_SECTOR
        self.iv_offset = iv_offset  # LUKS2 iv_tweak, in 512-byte units
        if spec.mode == "xts":
            half = len(key) // 2
            self._key, self._tweak_key = key[:half], key[half:]
        else:
            self._key = key
        self._essiv_key = hashlib.new(spec.essiv_hash, key).digest() if spec.ivgen == "essiv" else b""
        self._whole_key = key
        # Chosen at creation (tests choose either).  OpenSSL refuses XTS keys whose two halves are
        # equal (a weak key); the numpy path still serves a volume made with one.
        weak_xts_key = spec.mode == "xts" and key[:len(key) // 2] == key[len(key) // 2:]
        self._native = None if weak_xts_key else _sectors
        self.implementation = "OpenSSL per sector (C extension)" if self._native else "numpy and AES-ECB runs"

    # IVs ---------------------------------------------------------------------------------
    def _ivs(self, first_sector: int, count: int) -> np.ndarray:
        """The 16-byte IVs of `count` sectors from sector index `first_sector`, as (count, 2) u64."""
        numbers = (self.iv_offset + (first_sector + np.arange(count, dtype=np.uint64)) * np.uint64(self.iv_step))
        ivs = np.zeros((count, 2), dtype=_U64)
        # plain: the sector number truncated to 32 bits; plain64 and ESSIV: 64 bits, little-endian.
        ivs[:, 0] = numbers & np.uint64(0xFFFFFFFF) if self.spec.ivgen == "plain" else numbers
        if self.spec.ivgen == "essiv":
            # ESSIV: IV = E_salt(sector), salt = hash(volume key).
            encrypted = _ecb(self._essiv_key).encryptor().update(_octets(ivs))
            ivs = np.frombuffer(encrypted, dtype=_U64).reshape(count, 2)
        return ivs

    def _xts_tweaks(self, first_sector: int, count: int) -> np.ndarray:
        """All per-block tweaks T_j of `count` sectors, shaped (count, blocks_per_sector, 2)."""
        blocks = self.blocks_per_sector
        encrypted = _ecb(self._tweak_key).encryptor().update(_octets(self._ivs(first_sector, count)))
        first = np.frombuffer(encrypted, dtype=_U64).reshape(count, 2)
        # Computed block by block for all sectors at once: (blocks, count) halves, so each
        # doubling step below works on contiguous rows.
        low = np.empty((blocks, count), dtype=_U64)
        high = np.empty((blocks, count), dtype=_U64)
        low[0], high[0] = first[:, 0], first[:, 1]
        done = 1
        while done < blocks:  # doubling: T_{j+step} = T_j * alpha^step for the `step` tweaks before
            step = min(done, 32, blocks - done)
            _mul_alpha_power(low[done - step:done], high[done - step:done], step,
                             low[done:done + step], high[done:done + step])
            done += step
        tweaks = np.empty((count, blocks, 2), dtype=_U64)
        tweaks[..., 0] = low.T
        tweaks[..., 1] = high.T
        return tweaks

    # Bulk operations -------------------------------------------------------------------------
    def decrypt(self, data: memoryview, first_sector: int) -> None:
        """Decrypt whole sectors in place; `first_sector` counts sectors of this cipher's size."""
        if self._native:
            self._native_crypt(data, first_sector, False)
        else:
            self._each_run(data, first_sector, self._decrypt_run)

    def encrypt(self, data: memoryview, first_sector: int) -> None:
        """Encrypt whole sectors in place."""
        if self._native:
            self._native_crypt(data, first_sector, True)
        else:
            self._each_run(data, first_sector, self._encrypt_run)

    def _native_crypt(self, data: memoryview, first_sector: int, encrypt: bool) -> None:
        assert self._native is not None
        self._native.crypt(_MODES[self.spec.mode], self._whole_key, data,
                           self.iv_offset + first_sector * self.iv_step, self.iv_step, self.sector_size,
                           encrypt, _IV_MODES[self.spec.ivgen], self._essiv_key)

    def _each_run(self, data: memoryview, first_sector: int, operation) -> None:
        size = self.sector_size
        if len(data) % size:
            raise ValueError(f"{len(data)} bytes is not a whole number of {size}-byte sectors")
        run = max(RUN_BYTES - RUN_BYTES % size, size)
        for start in range(0, len(data), run):
            piece = data[start:start + run]
            operation(np.frombuffer(piece, dtype=_U64), first_sector + start // size)

    def _decrypt_run(self, words: np.ndarray, first_sector: int) -> None:
        count = len(words) * 8 // self.sector_size
        if self.spec.mode == "xts":
            tweaks = self._xts_tweaks(first_sector, count).reshape(-1)
            words ^= tweaks
            plain = _ecb(self._key).decryptor().update(_octets(words))
            np.bitwise_xor(np.frombuffer(plain, dtype=_U64), tweaks, out=words)
        else:
            blocks = words.reshape(count, self.blocks_per_sector, 2)
            previous = np.empty_like(blocks)
            previous[:, 0] = self._ivs(first_sector, count)
            previous[:, 1:] = blocks[:, :-1]
            plain = _ecb(self._key).decryptor().update(_octets(words))
            np.bitwise_xor(np.frombuffer(plain, dtype=_U64).reshape(blocks.shape), previous, out=blocks)

    def _encrypt_run(self, words: np.ndarray, first_sector: int) -> None:
        count = len(words) * 8 // self.sector_size
        if self.spec.mode == "xts":
            tweaks = self._xts_tweaks(first_sector, count).reshape(-1)
            words ^= tweaks
            sealed = _ecb(self._key).encryptor().update(_octets(words))
            np.bitwise_xor(np.frombuffer(sealed, dtype=_U64), tweaks, out=words)
        elif count < self.blocks_per_sector:
            # Few sectors: one CBC call per sector is cheaper than a call per block column.
            ivs = self._ivs(first_sector, count)
            algorithm = algorithms.AES(self._key)
            sectors = words.reshape(count, -1)
            for index in range(count):
                encryptor = Cipher(algorithm, modes.CBC(ivs[index].tobytes())).encryptor()
                sectors[index] = np.frombuffer(encryptor.update(sectors[index].tobytes()), dtype=_U64)
        else:
            blocks = words.reshape(count, self.blocks_per_sector, 2)
            encryptor = _ecb(self._key).encryptor()
            chain = self._ivs(first_sector, count)
            for j in range(self.blocks_per_sector):
                chain = np.frombuffer(encryptor.update((blocks[:, j] ^ chain).tobytes()),
                                      dtype=_U64).reshape(count, 2)
                blocks[:, j] = chain
