"""Deterministic orders: a permutation of a split per (seed, epoch), the same on every machine.

Training batches and the demo task's paper-to-split assignment both draw from it, so neither
depends on NumPy's generators or on how many processes read the data.
"""

from __future__ import annotations

import numpy as np


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 (wrap-around arithmetic)."""
    x = np.asarray(x, np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """int64[n]: the order of epoch `epoch`, a pure function of (n, seed, epoch).

    Built from a fixed integer hash rather than `np.random.Generator.permutation`, whose streams
    NumPy does not promise to keep across versions: a run resumed after an upgrade must still see
    the same batches.
    """
    key = _mix64(_mix64(np.uint64(seed)) ^ np.uint64(epoch))
    keys = _mix64(np.arange(n, dtype=np.uint64) ^ key)  # distinct, since _mix64 is a bijection
    return np.argsort(keys, kind="stable")
