"""Exit confidence measures: how sure an early exit is of its prediction.

Shared by FREE (`free_jax.decoding.spd` through `decoding.free_decode`) and CALM
(`free_jax.decoding.calm_search`). A
token exits when its confidence is strictly greater than the threshold.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from free_jax.decoding.search import top_two_logits
from free_jax.models import exit_classifier
from free_jax.models.config import T5Config

CONFIDENCES = ("softmax_diff", "softmax_max", "state_cosine", "meta")


def confidence_score(name: str, logits: jax.Array, states: tuple[jax.Array, ...]) -> jax.Array:
    """Exit confidence per row, float32[B].

    Args:
      name: "softmax_diff" (top-1 minus top-2 probability, FREE's default), "softmax_max"
        (top-1 probability) or "state_cosine" (cosine similarity of the residual stream before
        and after the exit's last block: CALM's state saturation).
      logits: [B, V] at the exit.
      states: the residual streams [B, D] before and after the exit's last block.
    """
    if name == "state_cosine":
        before, after = (x.astype(jnp.float32) for x in states)
        dot = jnp.sum(before * after, axis=-1)
        norms = jnp.linalg.norm(before, axis=-1) * jnp.linalg.norm(after, axis=-1)
        return dot / jnp.maximum(norms, 1e-12)
    # From the logits, without materialising the softmax: with l1 >= l2 the two largest logits
    # and Z = sum(exp(logits - l1)), p1 = 1 / Z and p2 = exp(l2 - l1) / Z. Only max and sum
    # reductions, which vectorise; `jnp.argmax` (a variadic reduction) and the softmax's extra
    # passes made this two thirds of FREE's per-step cost over static exiting at batch 1 on a
    # CPU. lax.top_k would sort.
    logits = logits.astype(jnp.float32)
    first, second = top_two_logits(logits)  # equal at a tied maximum: a difference of 0
    total = jnp.sum(jnp.exp(logits - first[..., None]), axis=-1)  # [B], >= 1
    if name == "softmax_max":
        return 1.0 / total
    return -jnp.expm1(second - first) / total


def exit_confidence(
    name: str,
    params: dict,
    config: T5Config,
    logits: jax.Array,
    hidden: jax.Array,
    before: jax.Array | None = None,
) -> jax.Array:
    """Any of `CONFIDENCES` at an exit, float32[B].

    Args:
      logits: [B, V] the exit's logits.
      hidden: [B, D] the residual stream after the exit's last block.
      before: [B, D] the stream before that block ("state_cosine" only).
    """
    if name == "meta":
        return exit_classifier.exit_classifier_confidence(params, config, hidden)
    states = (before, hidden) if name == "state_cosine" else ()
    return confidence_score(name, logits, states)
