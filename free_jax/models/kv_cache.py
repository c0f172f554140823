"""The decoder's explicit, per-example key/value cache.

Each decoder layer has its own cache and its own per-example length, because FREE's deep layers lag
behind its shallow layers by the number of pending tokens, and by a different number in each row.
Caches are plain pytrees passed into and returned from every call; nothing is mutated in place.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array


@flax.struct.dataclass
class LayerCache:
    """Self-attention keys and values of one decoder layer.

    Attributes:
      k: [B, T, H, Dh] keys by absolute position.
      v: [B, T, H, Dh] values by absolute position.
      length: int32[B] positions written so far; the next query of row b sits at `length[b]`.
        Entries at or beyond it are stale and never attended to (attention is causal by position),
        so rolling a row back is just lowering its length.
    """

    k: Array
    v: Array
    length: Array

    @classmethod
    def empty(cls, batch: int, max_length: int, heads: int, head_dim: int, dtype: Any):
        zeros = jnp.zeros((batch, max_length, heads, head_dim), dtype)
        return cls(k=zeros, v=zeros, length=jnp.zeros((batch,), jnp.int32))

    @property
    def max_length(self) -> int:
        return self.k.shape[1]


@flax.struct.dataclass
class DecoderCache:
    """Everything the decoder needs besides its parameters.

    Attributes:
      layers: L `LayerCache`s, one per decoder block.
      cross_k, cross_v: L arrays [B, S, H, Dh], cross-attention K/V from the encoder output,
        computed once per input.
      encoder_mask: bool[B, S], True for real source tokens.
      cross_ready: bool[L] whether each block's cross_k/cross_v hold their values yet (a
        decoder that may never run its upper blocks computes theirs on first use; see
        `free_jax.models.t5.init_decoder_cache`).
    """

    layers: tuple[LayerCache, ...]
    cross_k: tuple[Array, ...]
    cross_v: tuple[Array, ...]
    encoder_mask: Array
    cross_ready: Array

    def truncate(self, lengths: Array) -> DecoderCache:
        """Rolls every layer of row b back to at most `lengths[b]` positions (int32[B])."""
        layers = tuple(
            layer.replace(length=jnp.minimum(layer.length, lengths)) for layer in self.layers
        )
        return self.replace(layers=layers)

    def lengths(self) -> Array:
        """int32[L, B], positions each layer has cached for each row."""
        return jnp.stack([layer.length for layer in self.layers])


def write_positions(
    layer: LayerCache,
    k: Array,
    v: Array,
    positions: Array,
    valid: Array,
    num_new: Array,
) -> LayerCache:
    """Writes Q new keys/values per row at the given absolute positions.

    Args:
      k, v: [B, Q, H, Dh].
      positions: int32[B, Q] absolute position of each new entry.
      valid: bool[B, Q]; invalid entries (padding of a ragged block) are not written.
      num_new: int32[B] valid entries per row; the row's length grows by this much.
    """
    B, Q = positions.shape
    # Out-of-range indices are dropped by the scatter, which is how padding writes nothing.
    index = jnp.where(valid, positions, layer.max_length)
    rows = jnp.broadcast_to(jnp.arange(B)[:, None], (B, Q))
    return LayerCache(
        k=layer.k.at[rows, index].set(k.astype(layer.k.dtype), mode="drop"),
        v=layer.v.at[rows, index].set(v.astype(layer.v.dtype), mode="drop"),
        length=layer.length + num_new.astype(jnp.int32),
    )
