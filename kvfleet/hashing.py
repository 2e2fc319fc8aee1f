"""Canonical KV block hashes: chained 64-bit hashes of token ids.

Every part of kvfleet names a cached block by the same function of its tokens and of
all the tokens before it, so the prefix index never depends on an engine's own hash
algorithm or seed. Node agents apply it to the token ids that each ``BlockStored``
event carries; routers apply it to a prompt.

Definition, for blocks ``b_0 .. b_{n-1}`` of ``block_size`` tokens each (only full
blocks are hashed, as in vLLM)::

    c_i = fmix(sum_k (t_{i,k} + 1) * R_k)            # content of one block (mod 2**64)
    s_i = s_{i-1} * P + c_i,  s_{-1} = ROOT_STATE     # chain state (mod 2**64)
    h_i = fmix(s_i), with 0 mapped to 1               # the block hash

``R_k`` are fixed odd 64-bit constants, ``P`` is a fixed odd multiplier and ``fmix``
is SplitMix64's finaliser (a bijection). Because the chain is linear in ``s``, all
``s_i`` of a prompt come from one cumulative sum, so hashing a prompt is a handful
of vectorised NumPy passes rather than a Python loop per block. Because ``fmix`` is a
bijection, the state of a parent can be recovered from its hash, so a chain can be
continued from any block hash (``parent=``) exactly as if it had been hashed in one
go. Hash value 0 is reserved ("no block"); it is mapped to 1 (probability 2**-64).
"""

from __future__ import annotations

from typing import NewType, Sequence

import numpy as np

MAX_BLOCK_SIZE = 4096
"""The largest block size (tokens) the canonical hash, and so the router's index, supports."""

BlockHash = NewType("BlockHash", int)
"""A canonical block hash: an unsigned 64-bit int, never 0."""

_U64 = np.uint64
_MASK = (1 << 64) - 1

# Odd multiplier of the chain and its inverse mod 2**64.
P = 0x9E3779B97F4A7C15
P_INV = pow(P, -1, 1 << 64)
ROOT_STATE = 0x6B766665_6574_7631  # "kvfleetv1"
_FMIX_M1 = 0xBF58476D1CE4E5B9
_FMIX_M2 = 0x94D049BB133111EB
_FMIX_M1_INV = pow(_FMIX_M1, -1, 1 << 64)
_FMIX_M2_INV = pow(_FMIX_M2, -1, 1 << 64)


def _splitmix_sequence(n: int, seed: int) -> list[int]:
    out, x = [], seed
    for _ in range(n):
        x = (x + 0x9E3779B97F4A7C15) & _MASK
        out.append(fmix_int(x) | 1)
    return out


def fmix_int(x: int) -> int:
    """SplitMix64's finaliser on a Python int (reference; the arrays use ``_fmix``)."""
    x &= _MASK
    x ^= x >> 30
    x = (x * _FMIX_M1) & _MASK
    x ^= x >> 27
    x = (x * _FMIX_M2) & _MASK
    x ^= x >> 31
    return x


def _unxorshift(x: int, shift: int) -> int:
    y = x
    for _ in range(64 // shift + 1):
        y = x ^ (y >> shift)
    return y & _MASK


def unfmix_int(h: int) -> int:
    """Inverse of :func:`fmix_int`."""
    x = _unxorshift(h & _MASK, 31)
    x = (x * _FMIX_M2_INV) & _MASK
    x = _unxorshift(x, 27)
    x = (x * _FMIX_M1_INV) & _MASK
    return _unxorshift(x, 30)


class _Tables:
    """Per-position multipliers ``R_k`` and powers of ``P`` / ``P_INV``, grown on demand."""

    def __init__(self) -> None:
        self.r = np.array(_splitmix_sequence(MAX_BLOCK_SIZE, 0x5EED), dtype=_U64)
        self.p_pow = np.empty(0, dtype=_U64)
        self.p_inv_pow = np.empty(0, dtype=_U64)
        self._grow(1024)

    def _grow(self, n: int) -> None:
        p, pi = [1], [1]
        for _ in range(n - 1):
            p.append((p[-1] * P) & _MASK)
            pi.append((pi[-1] * P_INV) & _MASK)
        self.p_pow = np.array(p, dtype=_U64)
        self.p_inv_pow = np.array(pi, dtype=_U64)

    def powers(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``(P**i, P_INV**i)`` for ``i < n``."""
        if n > len(self.p_pow):
            self._grow(max(n, 2 * len(self.p_pow)))
        return self.p_pow[:n], self.p_inv_pow[:n]


_T = _Tables()


def _fmix(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> _U64(30))
    x = x * _U64(_FMIX_M1)
    x ^= x >> _U64(27)
    x *= _U64(_FMIX_M2)
    x ^= x >> _U64(31)
    return x


def _unfmix_state(parent: int | None) -> int:
    return ROOT_STATE if parent is None else unfmix_int(parent)


def block_hashes(
    token_ids: Sequence[int] | np.ndarray,
    block_size: int,
    parent: int | None = None,
) -> np.ndarray:
    """Canonical hashes of the full blocks of ``token_ids`` (uint64 array, one per block).

    ``parent`` is the hash of the block that precedes ``token_ids[0]``; ``None`` means
    the tokens start the sequence. A trailing partial block is ignored.
    """
    if block_size <= 0 or block_size > len(_T.r):
        raise ValueError(f"block_size must be in 1..{len(_T.r)}, got {block_size}")
    tokens = np.asarray(token_ids, dtype=_U64)
    n = len(tokens) // block_size
    if n == 0:
        return np.empty(0, dtype=_U64)
    blocks = tokens[: n * block_size].reshape(n, block_size)
    with np.errstate(over="ignore"):
        content = _fmix(((blocks + _U64(1)) * _T.r[:block_size]).sum(axis=1, dtype=_U64))
        p_pow, p_inv_pow = _T.powers(n)
        # s_i = P^(i+1) * s_{-1} + sum_{j<=i} c_j * P^(i-j)
        #     = P^i * (P * s_{-1} + cumsum_j(c_j * P^-j))
        s0 = _U64((P * _unfmix_state(parent)) & _MASK)
        state = p_pow * (np.cumsum(content * p_inv_pow, dtype=_U64) + s0)
        h = _fmix(state)
    h[h == 0] = 1
    return h


def block_hashes_reference(
    token_ids: Sequence[int], block_size: int, parent: int | None = None
) -> list[int]:
    """The same function as :func:`block_hashes`, written as a plain loop (for tests)."""
    r = [int(x) for x in _T.r[:block_size]]
    s = _unfmix_state(parent)
    out = []
    for i in range(len(token_ids) // block_size):
        blk = token_ids[i * block_size : (i + 1) * block_size]
        c = fmix_int(sum((int(t) + 1) * r[k] for k, t in enumerate(blk)) & _MASK)
        s = (s * P + c) & _MASK
        h = fmix_int(s)
        out.append(h or 1)
    return out
