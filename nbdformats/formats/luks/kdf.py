"""Key derivation (PBKDF2, Argon2i/Argon2id) and the anti-forensic merge of LUKS keyslots."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.kdf.argon2 import Argon2i, Argon2id

from .errors import LuksError

# LUKS names hashes as gcrypt does; hashlib (OpenSSL) spells a few differently.
_HASH_NAMES = {"sha1": "sha1", "sha224": "sha224", "sha256": "sha256", "sha384": "sha384",
               "sha512": "sha512", "ripemd160": "ripemd160", "whirlpool": "whirlpool",
               "sha3-256": "sha3_256", "sha3-512": "sha3_512", "sm3": "sm3"}


def hash_name(luks_name: str) -> str:
    """The hashlib name of a LUKS hash spec, or a LuksError naming it."""
    name = _HASH_NAMES.get(luks_name.lower())
    if name is None:
        raise LuksError(f"unsupported hash {luks_name!r}")
    try:
        hashlib.new(name)
    except ValueError:
        raise LuksError(f"hash {luks_name!r} is not available in this Python's OpenSSL") from None
    return name


@dataclass(frozen=True)
class Pbkdf2:
    hash: str  # LUKS spelling
    iterations: int
    salt: bytes

    def derive(self, secret: bytes, length: int) -> bytes:
        return pbkdf2(self.hash, secret, self.salt, self.iterations, length)


@dataclass(frozen=True)
class Argon2:
    variant: str  # "argon2i" or "argon2id"
    time: int
    memory_kib: int
    lanes: int
    salt: bytes

    def derive(self, secret: bytes, length: int) -> bytes:
        kdf_class = Argon2id if self.variant == "argon2id" else Argon2i
        try:
            kdf = kdf_class(salt=self.salt, length=length, iterations=self.time, lanes=self.lanes,
                            memory_cost=self.memory_kib)
            return kdf.derive(secret)
        except (ValueError, UnsupportedAlgorithm) as e:
            raise LuksError(f"{self.variant} (time {self.time}, memory {self.memory_kib} KiB, "
                            f"{self.lanes} lanes): {e}") from None


Kdf = Pbkdf2 | Argon2


def pbkdf2(luks_hash: str, secret: bytes, salt: bytes, iterations: int, length: int) -> bytes:
    if iterations < 1:
        raise LuksError(f"PBKDF2 iteration count {iterations} is invalid")
    return hashlib.pbkdf2_hmac(hash_name(luks_hash), secret, salt, iterations, length)


def _diffuse(block: bytes, name: str) -> bytes:
    """LUKS AF diffusion: hash each digest-sized piece i as H(be32(i) || piece), truncated to fit."""
    size = hashlib.new(name).digest_size
    out = bytearray()
    for index, start in enumerate(range(0, len(block), size)):
        piece = block[start:start + size]
        out += hashlib.new(name, index.to_bytes(4, "big") + piece).digest()[:len(piece)]
    return bytes(out)


def af_merge(material: bytes, key_size: int, stripes: int, luks_hash: str) -> bytes:
    """Recover the key from its anti-forensic split (LUKS1 spec, section 2.4):
    d_0 = 0; d_k = diffuse(d_{k-1} xor s_{k-1}) for k < stripes; key = d_{stripes-1} xor s_{stripes-1}."""
    name = hash_name(luks_hash)
    if len(material) < key_size * stripes:
        raise LuksError(f"keyslot material is {len(material)} bytes, expected {key_size * stripes}")
    acc = bytes(key_size)
    for stripe in range(stripes - 1):
        piece = material[stripe * key_size:(stripe + 1) * key_size]
        acc = _diffuse(_xor(acc, piece), name)
    return _xor(acc, material[(stripes - 1) * key_size:stripes * key_size])


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")
