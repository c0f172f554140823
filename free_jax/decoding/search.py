"""Greedy search, separated from the network.

The loop sees the model only through a `step_fn(cache, tokens, step) -> (logits, cache)` callable,
so its logic can be tested with scripted logits and no weights, and other decoding methods can
reuse it. The whole search is one `lax.while_loop` with static shapes; finished rows keep stepping
(their outputs are masked to padding) and the loop stops when every row is done.

Also the reductions over the vocabulary that every decoding method's step shares: the greedy
token (`greedy_token`, with EOS banned below `min_new_tokens`: `eos_ban`) and the two largest
logits that FREE's confidence reads (`top_two_logits`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array
StepFn = Callable[[Any, Array, Array], tuple[Array, Any]]


@flax.struct.dataclass
class GreedyState:
    """Loop carry of `greedy_search`.

    Attributes:
      step: int32[] decoder positions processed so far.
      last_token: int32[B] the token each row feeds to the next step.
      tokens: int32[B, T] emitted tokens; padding after EOS and beyond `step`.
      done: bool[B] the row has emitted EOS (monotonic).
      lengths: int32[B] tokens emitted per row, EOS included.
      cache: the step function's state (for T5, a `DecoderCache`).
    """

    step: Array
    last_token: Array
    tokens: Array
    done: Array
    lengths: Array
    cache: Any


@flax.struct.dataclass
class GreedyResult:
    """Output of `greedy_search`: `tokens` int32[B, T], `lengths` int32[B], `steps` int32[], and
    the step function's final `cache` (None where a caller dropped it, as the jitted decoding
    cores do unless asked to keep it)."""

    tokens: Array
    lengths: Array
    steps: Array
    cache: Any


def suppress_eos(logits: Array, position: Array, *, eos_id: int, min_new_tokens: int) -> Array:
    """Forbids EOS at output positions below `min_new_tokens`.

    Args:
      logits: [..., V].
      position: the output position of each row of logits, broadcastable to `logits[..., 0]`
        (a scalar step, per-row positions [B], or per-query positions [B, Q]).
    """
    return _banned_logits(logits, eos_ban(position, eos_id=eos_id, min_new_tokens=min_new_tokens))


def _banned_logits(logits: Array, banned: tuple[int, Array] | None) -> Array:
    """A copy of `logits` with the banned token's logit at -inf where its mask is set."""
    if banned is None:
        return logits
    token, where = banned
    return logits.at[..., token].set(jnp.where(where, -jnp.inf, logits[..., token]))


def eos_ban(position: Array, *, eos_id: int, min_new_tokens: int) -> tuple[int, Array] | None:
    """The `banned` argument of `greedy_token` that forbids EOS at output positions below
    `min_new_tokens` (None when nothing is forbidden): what `suppress_eos` does to the logits,
    without writing a suppressed copy of them.

    Args:
      position: as `suppress_eos`'s.
    """
    if min_new_tokens <= 0:
        return None
    return eos_id, position < min_new_tokens


# The vocabulary reductions of a decoding step (the greedy token, FREE's top two logits) view
# the logits [..., V] as blocks [..., V / d, d]: one pass takes each block's maximum, and the rest
# works on the [V / d] block maxima and on the one d-wide block that holds the arg-max. Written
# plainly (a max, then a min over the indices that reach it), each elementwise producer of a
# reduction (the index select, the broadcast maximum) is its own vocabulary-wide buffer on XLA's
# CPU backend: on a t5-base-shaped model they were a tenth of FREE's peak memory at batch 1, and
# at a deep pass over 16 positions 2 MiB each.
_MIN_BLOCK = 16


@functools.cache
def _block_width(vocab: int) -> int | None:
    """The divisor d of `vocab` nearest its square root from above (at least `_MIN_BLOCK`, with
    at least two blocks), or None where there is none (a prime vocabulary)."""
    for d in range(max(math.isqrt(vocab), _MIN_BLOCK), vocab // 2 + 1):
        if vocab % d == 0:
            return d
    return None


class _Blocks:
    """The arg-max of logits [..., V] by blocks, with the `banned` token read as -inf where its
    mask is set."""

    def __init__(self, logits: Array, banned: tuple[int, Array] | None = None):
        lead, V = logits.shape[:-1], logits.shape[-1]
        self.d = d = _block_width(V)
        self.n = V // d
        x = logits.reshape(*lead, self.n, d)
        self.block_max = jnp.max(x, axis=-1)  # [..., n]
        unban = None
        if banned is not None:
            token, where = banned
            ban_block, offset = divmod(token, d)
            where = jnp.broadcast_to(where, lead)

            def unban(chunk: Array, in_ban_block: Array | bool) -> Array:
                hit = (where & in_ban_block)[..., None] & (jnp.arange(d) == offset)
                return jnp.where(hit, -jnp.inf, chunk)

            inside = unban(x[..., ban_block, :], True)
            self.block_max = self.block_max.at[..., ban_block].set(jnp.max(inside, axis=-1))
        self.first = jnp.max(self.block_max, axis=-1)  # [...]
        # The first block that reaches the maximum holds its first index. Clamped: NaN logits
        # reach nothing and give some index in range.
        self.block = _first_index(self.block_max, self.first)
        self.chunk = jnp.take_along_axis(x, self.block[..., None, None], axis=-2)[..., 0, :]
        if unban is not None:
            self.chunk = unban(self.chunk, self.block == ban_block)
        self.offset = _first_index(self.chunk, self.first)

    @property
    def token(self) -> Array:
        return self.block * self.d + self.offset

    def second(self) -> Array:
        """The largest logit but the arg-max's one: the maximum again where it is tied."""
        others = jnp.where(jnp.arange(self.n) == self.block[..., None], -jnp.inf, self.block_max)
        inside = jnp.where(jnp.arange(self.d) == self.offset[..., None], -jnp.inf, self.chunk)
        return jnp.maximum(jnp.max(others, axis=-1), jnp.max(inside, axis=-1))


def _first_index(values: Array, target: Array) -> Array:
    """The first index along the last axis where `values` equals `target` [...], int32."""
    n = values.shape[-1]
    index = jnp.arange(n, dtype=jnp.int32)
    found = jnp.min(jnp.where(values == target[..., None], index, n), axis=-1)
    return jnp.minimum(found, n - 1)


def greedy_token(logits: Array, banned: tuple[int, Array] | None = None) -> Array:
    """The arg-max over the last axis, int32 (the first of tied maxima, as `jnp.argmax`).

    Args:
      logits: [..., V].
      banned: (token id, bool mask broadcastable to `logits[..., 0]`): where the mask is set, that
        token's logit counts as -inf (`eos_ban`).

    Two plain max and min reductions, which XLA's CPU backend vectorises, where `jnp.argmax`'s
    variadic (value, index) reduction runs element by element (over a 32128-wide vocabulary 150
    us per row at batch 1 on a 2-core Xeon); by blocks of the vocabulary where its size allows,
    so that only the logits themselves are vocabulary-wide. Logits holding NaN give some index
    in range (no NaN arises from finite weights).
    """
    if _block_width(logits.shape[-1]) is not None:
        return _Blocks(logits, banned).token
    logits = _banned_logits(logits, banned)
    return _first_index(logits, jnp.max(logits, axis=-1))


def top_two_logits(logits: Array) -> tuple[Array, Array]:
    """The largest logit and the largest but the arg-max's (equal to it at a tie), float[...]
    each, from logits [..., V]."""
    if _block_width(logits.shape[-1]) is not None:
        blocks = _Blocks(logits)
        return blocks.first, blocks.second()
    first = jnp.max(logits, axis=-1)
    token = _first_index(logits, first)
    others = jnp.where(jnp.arange(logits.shape[-1]) == token[..., None], -jnp.inf, logits)
    return first, jnp.max(others, axis=-1)


def greedy_search(
    step_fn: StepFn,
    cache: Any,
    *,
    batch_size: int,
    max_new_tokens: int,
    start_id: int,
    eos_id: int,
    pad_id: int,
    min_new_tokens: int = 0,
) -> GreedyResult:
    """Greedy decoding of up to `max_new_tokens` tokens per row in one `lax.while_loop`.

    Args:
      step_fn: `(cache, tokens int32[B], step int32[]) -> (logits float[B, V], cache)`; `step` is
        the position of `tokens` in the decoder input.
      cache: initial state of `step_fn`.
      batch_size: B.
      max_new_tokens: T, tokens to emit at most per row.
      start_id, eos_id, pad_id: decoder start, end and padding token ids.
      min_new_tokens: EOS is suppressed until this many tokens are emitted.
    """
    B, T = batch_size, max_new_tokens
    state = GreedyState(
        step=jnp.zeros((), jnp.int32),
        last_token=jnp.full((B,), start_id, jnp.int32),
        tokens=jnp.full((B, T), pad_id, jnp.int32),
        done=jnp.zeros((B,), bool),
        lengths=jnp.zeros((B,), jnp.int32),
        cache=cache,
    )

    def cond(s: GreedyState) -> Array:
        return (s.step < T) & ~jnp.all(s.done)

    def body(s: GreedyState) -> GreedyState:
        logits, cache = step_fn(s.cache, s.last_token, s.step)
        ban = eos_ban(s.step, eos_id=eos_id, min_new_tokens=min_new_tokens)
        token = greedy_token(logits, ban)
        token = jnp.where(s.done, pad_id, token)
        return GreedyState(
            step=s.step + 1,
            last_token=token,
            tokens=s.tokens.at[:, s.step].set(token),
            done=s.done | (token == eos_id),
            lengths=s.lengths + (~s.done).astype(jnp.int32),
            cache=cache,
        )

    final = jax.lax.while_loop(cond, body, state)
    return GreedyResult(
        tokens=final.tokens, lengths=final.lengths, steps=final.step, cache=final.cache
    )
