"""The canonical block hash (:mod:`kvfleet.hashing`), compiled: one loop over a prompt.

:func:`kvfleet.hashing.block_hashes` computes the chain in about fifteen NumPy passes,
each ~1 µs on a warm core and several on a cold one, whatever the prompt's length. The
router hashes every prompt it routes, most of them a few dozen blocks long, so it pays
those calls and not the arithmetic. :func:`block_hashes` here is the same function
(``tests/unit/test_hashing.py`` checks it against the NumPy form and the plain-Python
reference) as one compiled loop. Node agents keep the NumPy form: they do not load Numba.
"""

from __future__ import annotations

import numba
import numpy as np

from kvfleet.hashing import _FMIX_M1, _FMIX_M2, _T, P, _unfmix_state

_M1 = np.uint64(_FMIX_M1)
_M2 = np.uint64(_FMIX_M2)
_P = np.uint64(P)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_ONE = np.uint64(1)


@numba.njit(cache=True, nogil=True, inline="always")
def _fmix(x):
    x ^= x >> _S30
    x *= _M1
    x ^= x >> _S27
    x *= _M2
    x ^= x >> _S31
    return x


@numba.njit(cache=True, nogil=True)
def _chain(tokens, block_size, r, state, out):
    """``out[i]`` = hash of block ``i`` of ``tokens`` (uint32), chained from ``state``."""
    for i in range(out.shape[0]):
        c = np.uint64(0)
        base = i * block_size
        for k in range(block_size):
            c += (np.uint64(tokens[base + k]) + _ONE) * r[k]
        state = state * _P + _fmix(c)
        h = _fmix(state)
        out[i] = h if h != 0 else _ONE


def block_hashes(tokens: np.ndarray, block_size: int, parent: int | None = None) -> np.ndarray:
    """:func:`kvfleet.hashing.block_hashes` of a uint32 token array, compiled."""
    if block_size <= 0 or block_size > len(_T.r):
        raise ValueError(f"block_size must be in 1..{len(_T.r)}, got {block_size}")
    out = np.empty(len(tokens) // block_size, np.uint64)
    _chain(np.ascontiguousarray(tokens, np.uint32), block_size, _T.r, np.uint64(_unfmix_state(parent)), out)
    return out


def warm_up() -> None:
    """Compiles (or loads from Numba's cache) the kernel before the first request."""
    block_hashes(np.zeros(16, np.uint32), 16)
