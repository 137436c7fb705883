"""nbdkit's pseudo-random numbers (common/include/random.h), vectorised with numpy, so that the random
and sparse-random plugins serve the same bytes as nbdkit's for the same seed.

The generator is xoshiro256** 1.0 seeded by splitmix64.  Every array operation works on many
independent generators ("lanes") at once.  The sparse-random plugin needs one long sequential
stream instead; `stream()` cuts it into lanes by jumping ahead: xoshiro's state update is linear
over GF(2), so jumping m steps is a 256x256 bit matrix (A^m) applied to the state.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

U64 = np.uint64
MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_STATE_BITS = 256


def _rotl(x: np.ndarray, k: int) -> np.ndarray:
    return (x << U64(k)) | (x >> U64(64 - k))


def seed_states(seeds: np.ndarray) -> list[np.ndarray]:
    """xsrandom(seed) for each element: the four 64-bit state words (splitmix64)."""
    seeds = np.asarray(seeds, dtype=U64)
    words = []
    for k in range(1, 5):
        z = seeds + U64((_GOLDEN * k) & MASK64)
        z = (z ^ (z >> U64(30))) * U64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> U64(27))) * U64(0x94D049BB133111EB)
        words.append(z ^ (z >> U64(31)))
    return words


def next_output(state: list[np.ndarray]) -> np.ndarray:
    """xrandom: 64 random bits per lane; updates `state` (four arrays) in place."""
    s0, s1, s2, s3 = state
    result = _rotl(s1 * U64(5), 7) * U64(9)
    t = s1 << U64(17)
    s2 ^= s0
    s3 ^= s1
    s1 ^= s2
    s0 ^= s3
    s2 ^= t
    state[3] = _rotl(s3, 45)
    return result


def _step_matrix() -> np.ndarray:
    """A: the state update as a 256x256 matrix over GF(2) (column j: the image of state bit j)."""
    basis = np.zeros((4, _STATE_BITS), dtype=U64)
    for bit in range(_STATE_BITS):
        basis[bit // 64, bit] = U64(1 << (bit % 64))
    state = [basis[w].copy() for w in range(4)]
    next_output(state)  # the update is linear; the output is not needed
    return _unpack(np.stack(state))


def _unpack(words: np.ndarray) -> np.ndarray:
    """(4, k) state words -> (256, k) bits, bit j of the state in row j."""
    as_bytes = np.ascontiguousarray(words.T).astype("<u8").view(np.uint8)  # (k, 32)
    return np.unpackbits(as_bytes, axis=1, bitorder="little").T.astype(np.float32)


def _pack(bits: np.ndarray) -> np.ndarray:
    """(256, k) bits -> (4, k) state words."""
    as_bytes = np.packbits(bits.T.astype(np.uint8), axis=1, bitorder="little")  # (k, 32)
    return np.ascontiguousarray(as_bytes).view("<u8").T.astype(U64)


def _gf2_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # Sums of at most 256 ones: exact in float32, so BLAS does the work.
    return np.remainder(a @ b, 2).astype(np.float32)


def _matrix_power(matrix: np.ndarray, exponent: int) -> np.ndarray:
    result = np.eye(_STATE_BITS, dtype=np.float32)
    square = matrix
    while exponent:
        if exponent & 1:
            result = _gf2_matmul(square, result)
        exponent >>= 1
        if exponent:
            square = _gf2_matmul(square, square)
    return result


def stream(seed: int, count: int, lanes: int = 1024, steps: int = 2048) -> Iterator[np.ndarray]:
    """The first `count` outputs of one generator seeded with xsrandom(seed), in order, as
    arrays of at most lanes*steps values (memory stays bounded for any count)."""
    step_matrix = _step_matrix()
    jump = _matrix_power(step_matrix, steps)  # one lane's worth of steps
    # jumps[i] = A^(steps * 2^i): lane starts are made by doubling the set of starts.
    jumps = [jump]
    while (1 << len(jumps)) < lanes:
        jumps.append(_gf2_matmul(jumps[-1], jumps[-1]))
    start = np.stack(seed_states(np.array([seed], dtype=U64)))  # (4, 1)
    produced = 0
    while produced < count:
        bits = _unpack(start)
        for matrix in jumps:
            bits = np.concatenate([bits, _gf2_matmul(matrix, bits)], axis=1)
        starts = _pack(bits[:, :lanes])
        state = [starts[w].copy() for w in range(4)]
        outputs = np.empty((steps, lanes), dtype=U64)
        for k in range(steps):
            outputs[k] = next_output(state)
        # After `steps` steps the last lane stands where the next segment begins.
        start = np.stack([w[-1:] for w in state])
        segment = outputs.T.reshape(-1)[:count - produced]  # lane by lane: the stream's order
        produced += len(segment)
        yield segment
