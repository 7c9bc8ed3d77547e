"""The world's randomness: seeds derived from names, and the counter-based draws of attempts.

`seed_int` turns any tuple of parts (a purpose, the world's name, the seed, ...) into a 64-bit seed,
so every stream of the world (population, card fingerprints, traffic, subscriptions, attempts) has
its own.

The draws of an attempt come from a counter-based generator: SplitMix64 of (seed, payment,
attempt, stream), so attempt k of payment j draws the same numbers under every policy and in any
order (common random numbers). `attempt_uniforms` is written once, on numpy ``uint64`` arrays
(the emitter's rounds), and the closed loop calls it with Python ints, one attempt at a time
(3.4 µs a draw against 67 µs for size-1 arrays); integer arithmetic modulo 2^64 is exact either
way, so both give the same bits.

The normal draw of latency (Box–Muller) stays twice, `gaussian` (numpy) and `gaussian1` (math):
``np.log`` and ``math.log`` differ in the last bit for some inputs: measured on the three built-in
worlds (seed 3; each world's 48,000 payments, at a random attempt number 1-7), ``z`` from the numpy
form differed from the math form's in 99, 75 and 80 of them — so the closed loop keeps its math
form and its bits.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, overload

import numpy as np
import numpy.typing as npt

__all__ = ["N_STREAMS", "attempt_uniforms", "gaussian", "gaussian1", "seed_int", "splitmix", "unit"]

_U64 = npt.NDArray[np.uint64]

N_STREAMS = 7  # uniforms per attempt: error, available, transient, code, MAC, and two for latency
_MASK = 2**64 - 1
_GOLDEN, _ATTEMPT_MUL, _STREAM_MUL = 0x9E3779B97F4A7C15, 0xD1B54A32D192ED03, 0xBF58476D1CE4E5B9


def seed_int(*parts: object) -> int:
    """A 64-bit seed named by `parts` (their repr, hashed)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


@overload
def splitmix(x: int) -> int: ...
@overload
def splitmix(x: _U64) -> _U64: ...
def splitmix(x: Any) -> Any:
    """SplitMix64's output function, of a Python int or of each element of a ``uint64`` array."""
    z = (x + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


@overload
def unit(x: int) -> float: ...
@overload
def unit(x: _U64) -> npt.NDArray[np.float64]: ...
def unit(x: Any) -> Any:
    """Uniform [0, 1) from the top 53 bits."""
    return (x >> 11) * (1.0 / 9007199254740992.0)


@overload
def attempt_uniforms(salt: int, payment: int, attempt: int) -> list[float]: ...
@overload
def attempt_uniforms(salt: int, payment: _U64, attempt: _U64) -> list[npt.NDArray[np.float64]]: ...
def attempt_uniforms(salt: int, payment: Any, attempt: Any) -> Any:
    """The `N_STREAMS` uniforms of attempt number `attempt` of payment `payment` (ints, or ``uint64``
    arrays of them) in the world whose attempt salt is `salt`."""
    base = salt ^ ((payment * _GOLDEN) & _MASK) ^ ((attempt * _ATTEMPT_MUL) & _MASK)
    return [unit(splitmix((base + ((k * _STREAM_MUL) & _MASK)) & _MASK)) for k in range(N_STREAMS)]


def gaussian(u1: npt.NDArray[np.float64], u2: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Standard normals from two uniforms each (Box–Muller)."""
    return np.sqrt(-2.0 * np.log(np.maximum(u1, 1e-12))) * np.cos(2.0 * np.pi * u2)  # type: ignore[no-any-return]


def gaussian1(u1: float, u2: float) -> float:
    """`gaussian` of one pair, in math (not numpy: see the module docstring)."""
    return math.sqrt(-2.0 * math.log(max(u1, 1e-12))) * math.cos(2.0 * math.pi * u2)
