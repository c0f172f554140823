"""In-place conditionals: run a function on a carry only when a predicate holds.

The network (lazy cross-attention K/V) and the decoding loops (FREE's deep pass) both need a
conditional update of large caches; these helpers keep XLA from copying them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def run_if(pred: Array, fn: Callable[[Any], Any], carry: Any) -> Any:
    """`fn(carry)` if `pred` else `carry`, as a while loop of zero or one trips.

    `lax.cond` would do, but XLA gives a conditional's results their own buffers: a branch that
    passes the decode caches through copies them, and one that updates them copies them first,
    every step. A while loop updates its carry in place, so the caches are never copied (the
    FREE decode program's cache copies went from 103 to 0; on the small demo model at batch 1
    the wall time did not change measurably; a copy grows with the cache).
    """

    def body(c):
        return jnp.zeros((), bool), fn(c[1])

    return jax.lax.while_loop(lambda c: c[0], body, (jnp.asarray(pred, bool), carry))[1]


def branch(pred: Array, if_true: Callable[[Any], Any], if_false: Callable[[Any], Any], carry):
    """`lax.cond(pred, if_true, if_false, carry)` with in-place carries (see `run_if`)."""
    pred = jnp.asarray(pred, bool)
    return run_if(~pred, if_false, run_if(pred, if_true, carry))
