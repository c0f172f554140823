"""The blocks every T5-family network is built from: norm, feed-forward, attention, position bias.

`t5` (the encoder-decoder) and `longt5` (LongT5's encoder self-attention) both build on these, so
neither imports the other's internals.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from free_jax.models.config import T5Config

Params = dict[str, Any]
Array = jax.Array

_F32 = jnp.float32


def embed(params: Params, token_ids: Array) -> Array:
    """[B, T] token ids -> [B, T, D] embeddings (no scaling: T5 does not scale them)."""
    return jnp.take(params["shared"]["embedding"], token_ids, axis=0)


def rms_norm(x: Array, scale: Array, eps: float) -> Array:
    """T5's layer norm: RMS only, no mean, no bias; the statistics in float32."""
    variance = jnp.mean(jnp.square(x.astype(_F32)), axis=-1, keepdims=True)
    normed = x.astype(_F32) * jax.lax.rsqrt(variance + eps)
    return scale * normed.astype(scale.dtype)


def activation(name: str):
    return {
        "relu": jax.nn.relu,
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "silu": jax.nn.silu,
        "swish": jax.nn.silu,
    }[name]


def self_attention_qkv(p: Params, h: Array, config: T5Config) -> tuple[Array, Array, Array]:
    """Query, key and value heads [..., H, Dh] of the self-attention input `h`, from separate
    `q`/`k`/`v` kernels or a decode layout's fused `qkv` (`t5.fuse_for_decoding`)."""
    if "qkv" in p:
        return tuple(split_heads(x, config) for x in jnp.split(h @ p["qkv"], 3, axis=-1))
    return tuple(split_heads(h @ p[n], config) for n in ("q", "k", "v"))


def feed_forward(p: Params, x: Array, config: T5Config) -> Array:
    act = activation(config.dense_act_fn)
    if "wi_fused" in p:  # decode layout, see `fuse_for_decoding`
        gate, linear = jnp.split(x @ p["wi_fused"], 2, axis=-1)
        h = act(gate) * linear
    elif config.is_gated_act:
        h = act(x @ p["wi_0"]) * (x @ p["wi_1"])
    else:
        h = act(x @ p["wi"])
    return h @ p["wo"]


def relative_position_bucket(
    relative_position: Array, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> Array:
    """Maps `key_pos - query_pos` to T5's bucket index (int32, same shape).

    Half the buckets hold exact small distances, the other half logarithmically wider bins up to
    `max_distance`; with `bidirectional`, the buckets are split again between the two directions.
    """
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).astype(jnp.int32) * num_buckets
        distance = jnp.abs(relative_position)
    else:
        distance = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # float32 throughout, as in the reference, so bucket edges land on the same integers.
    log_ratio = jnp.log(jnp.maximum(distance, 1).astype(_F32) / max_exact) / math.log(
        max_distance / max_exact
    )
    large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, distance, large)


def relative_bias(
    table: Array,
    query_positions: Array,
    key_positions: Array,
    *,
    bidirectional: bool,
    config: T5Config,
) -> Array:
    """Relative-position attention bias.

    Args:
      table: [NB, H] learned bias per bucket and head.
      query_positions: int32[B, Q] absolute positions of the queries.
      key_positions: int32[T] absolute positions of the keys.

    Returns:
      float32[B, H, Q, T].
    """
    rel = key_positions[None, None, :] - query_positions[:, :, None]  # [B, Q, T]
    buckets = relative_position_bucket(
        rel,
        bidirectional=bidirectional,
        num_buckets=config.relative_attention_num_buckets,
        max_distance=config.relative_attention_max_distance,
    )
    bias = table.astype(_F32)[buckets]  # [B, Q, T, H]
    return jnp.transpose(bias, (0, 3, 1, 2))


def split_heads(x: Array, config: T5Config) -> Array:
    return x.reshape(*x.shape[:-1], config.num_heads, config.d_kv)  # [..., H, Dh]


def attend(q: Array, k: Array, v: Array, bias: Array | None, mask: Array) -> Array:
    """Scaled-free dot-product attention (T5 folds the 1/sqrt(Dh) into the initialisation).

    Args:
      q: [B, Q, H, Dh].
      k: [B*H, Dh, T] keys, transposed; v: [B*H, T, Dh] values, with (row, head) pairs
        row-major on the first axis (the decoder cache's layouts, see
        `free_jax.models.kv_cache.LayerCache`; `cache_layout` makes them).
      bias: float32, broadcastable to [B, H, Q, T], or None.
      mask: bool, broadcastable to [B, H, Q, T]; False keys are ignored.

    Returns:
      [B, Q, H, Dh] in the dtype of `v`.
    """
    B, Q, H, Dh = q.shape
    T = v.shape[1]
    q = jnp.transpose(q, (0, 2, 1, 3)).reshape(B * H, Q, Dh)
    logits = jnp.einsum("nqd,ndk->nqk", q, k, preferred_element_type=_F32).reshape(B, H, Q, T)
    if bias is not None:
        logits = logits + bias
    logits = jnp.where(mask, logits, jnp.finfo(_F32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype).reshape(B * H, Q, T)
    out = jnp.einsum("nqk,nkd->nqd", weights, v).reshape(B, H, Q, Dh)
    return jnp.transpose(out, (0, 2, 1, 3))


def cache_layout(k: Array, v: Array) -> tuple[Array, Array]:
    """Keys and values [B, T, H, Dh] in `attend`'s layouts: [B*H, Dh, T] and [B*H, T, Dh]."""
    B, T, H, Dh = k.shape
    return (
        jnp.transpose(k, (0, 2, 3, 1)).reshape(B * H, Dh, T),
        jnp.transpose(v, (0, 2, 1, 3)).reshape(B * H, T, Dh),
    )


def merge_heads(x: Array) -> Array:
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])
