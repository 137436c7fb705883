"""Key derivation (PBKDF2, Argon2i/Argon2id) and the anti-forensic merge of LUKS keyslots.

A header sets the cost of its key derivation, so a hostile one could ask for hours of CPU or
more memory than the machine has.  The limits follow cryptsetup's (lib/utils_pbkdf.c,
crypt_pbkdf_get_limits): PBKDF2 iterations up to 2^32-1, Argon2 memory up to 4 GiB and never
more than half the physical memory (pbkdf_adjusted_phys_memory_kb).  cryptsetup bounds no
time when it opens a keyslot; it writes keyslots that take about 2 s (--iter-time 2000).  So
each derivation's time is estimated from a short benchmark of CPU time on this machine
(`estimated_seconds`) and the caller refuses what its time budget does not allow.  PBKDF2
counts of 2^31 and more are refused: OpenSSL's PKCS5_PBKDF2_HMAC takes an int.
"""

from __future__ import annotations

import functools
import hashlib
import os
import time
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


MAX_PBKDF2_ITERATIONS = (1 << 31) - 1  # OpenSSL's iteration count is an int
MAX_ARGON2_MEMORY_KIB = 4 * 1024 * 1024  # cryptsetup's maximum
MAX_ARGON2_LANES = 0xFFFFFF  # the Argon2 specification's (RFC 9106, 3.1)
MAX_ARGON2_TIME = 0xFFFFFFFF
BENCHMARK_SECONDS = 0.02  # each benchmark runs about this long, once per hash or KDF
# The benchmarks count this thread's CPU time, not the wall clock: on a loaded machine one
# preemption during a 20 ms benchmark made a 4 s keyslot look like 444 s (and refused it).
_cpu_clock = time.thread_time


def argon2_memory_limit_kib() -> int:
    """cryptsetup's limit: 4 GiB, and never more than half the physical memory."""
    try:
        physical_kib = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 1024
    except (ValueError, OSError):
        return MAX_ARGON2_MEMORY_KIB
    return min(MAX_ARGON2_MEMORY_KIB, max(physical_kib // 2, 32))


@functools.cache
def _pbkdf2_seconds_per_block(name: str) -> float:
    """Seconds per iteration and output block of hashlib's PBKDF2 with this hash, measured."""
    iterations = 1024
    while True:
        started = _cpu_clock()
        hashlib.pbkdf2_hmac(name, b"benchmark", b"salt" * 4, iterations, hashlib.new(name).digest_size)
        elapsed = _cpu_clock() - started
        if elapsed >= BENCHMARK_SECONDS or iterations >= 1 << 24:
            return elapsed / iterations
        iterations *= 4


@functools.cache
def _argon2_seconds_per_kib_pass(variant: str) -> float:
    """Seconds Argon2 takes per KiB of memory and pass (one lane), measured."""
    memory_kib = 1024
    while True:
        started = _cpu_clock()
        Argon2(variant, 1, memory_kib, 1, b"benchmark salt16").derive(b"benchmark", 32)
        elapsed = _cpu_clock() - started
        if elapsed >= BENCHMARK_SECONDS or memory_kib >= 1 << 18:
            return elapsed / memory_kib
        memory_kib *= 4


@dataclass(frozen=True)
class Pbkdf2:
    hash: str  # LUKS spelling
    iterations: int
    salt: bytes

    def derive(self, secret: bytes, length: int) -> bytes:
        self.check_costs()
        return hashlib.pbkdf2_hmac(hash_name(self.hash), secret, self.salt, self.iterations, length)

    def check_costs(self) -> None:
        """LuksError unless OpenSSL can run this derivation."""
        if not 1 <= self.iterations <= MAX_PBKDF2_ITERATIONS:
            raise LuksError(f"PBKDF2 iteration count {self.iterations} is invalid (1 to 2^31-1: OpenSSL takes "
                            "an int; cryptsetup writes about 2 s worth, around a million)")

    def estimated_seconds(self, length: int) -> float:
        """How long deriving `length` bytes takes on this machine (PBKDF2 runs the iterations
        once per digest-sized block of output)."""
        name = hash_name(self.hash)
        blocks = -(-length // hashlib.new(name).digest_size)
        return self.iterations * blocks * _pbkdf2_seconds_per_block(name)

    def describe(self) -> str:
        return f"pbkdf2-{self.hash}, {self.iterations} iterations"


@dataclass(frozen=True)
class Argon2:
    variant: str  # "argon2i" or "argon2id"
    time: int
    memory_kib: int
    lanes: int
    salt: bytes

    def check_costs(self) -> None:
        """LuksError unless the costs are within the Argon2 and cryptsetup limits (memory at
        most half the physical memory, as cryptsetup)."""
        memory_limit = argon2_memory_limit_kib()
        if not (1 <= self.time <= MAX_ARGON2_TIME and 1 <= self.lanes <= MAX_ARGON2_LANES and
                8 * self.lanes <= self.memory_kib <= memory_limit):
            raise LuksError(f"{self.variant} costs are out of range (time {self.time}, memory {self.memory_kib} KiB, "
                            f"{self.lanes} lanes; memory at most {memory_limit} KiB: 4 GiB and half the "
                            "physical memory, as cryptsetup)")

    def estimated_seconds(self, length: int) -> float:
        """How long the derivation takes on this machine, as if its lanes ran one after the other."""
        return self.time * self.memory_kib * _argon2_seconds_per_kib_pass(self.variant)

    def describe(self) -> str:
        return f"{self.variant}, {self.time} passes, {self.memory_kib} KiB, {self.lanes} lanes"

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
