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

    Both are stored in the layouts attention's batched matrix products read: one batch axis of
    (row, head) pairs, row-major, then the contracted axis first (keys transposed), so that
    `q @ k` and `weights @ v` run on the cache as it is. XLA's CPU backend copied [B, T, H, Dh]
    caches into these layouts at every decode step (two copies per cached array per block), and
    copied a [B, H, ...] cache whole at every step when a matrix product read it through a
    reshape; `free_jax.models.layers.attend` takes these layouts directly.

    Attributes:
      k: [B*H, Dh, T] keys of row b, head h at index b*H + h, transposed: position last.
      v: [B*H, T, Dh] values by (row, head) and absolute position.
      length: int32[B] positions written so far; the next query of row b sits at `length[b]`.
        Entries at or beyond it are stale and never attended to (attention is causal by position),
        so rolling a row back is just lowering its length.
    """

    k: Array
    v: Array
    length: Array

    @classmethod
    def empty(cls, batch: int, max_length: int, heads: int, head_dim: int, dtype: Any):
        return cls(
            k=jnp.zeros((batch * heads, head_dim, max_length), dtype),
            v=jnp.zeros((batch * heads, max_length, head_dim), dtype),
            length=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def max_length(self) -> int:
        return self.v.shape[1]


@flax.struct.dataclass
class DecoderCache:
    """Everything the decoder needs besides its parameters.

    Attributes:
      layers: L `LayerCache`s, one per decoder block.
      cross_k, cross_v: L arrays, keys [B*H, Dh, S] and values [B*H, S, Dh] (the layouts of
        `LayerCache`), cross-attention K/V from the encoder output,
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
    rows: Array | None = None,
) -> LayerCache:
    """Writes Q new keys/values per row at the given absolute positions.

    Args:
      k, v: [R, Q, H, Dh].
      positions: int32[R, Q] absolute position of each new entry.
      valid: bool[R, Q]; invalid entries (padding of a ragged block) are not written.
      num_new: int32[R] valid entries per row; the row's length grows by this much.
      rows: int32[R], ascending: the cache rows written (default: all B, in order).
    """
    R, Q = positions.shape
    # Out-of-range indices are dropped by the scatter, which is how padding writes nothing.
    index = jnp.where(valid, positions, layer.max_length)
    ids = jnp.arange(R, dtype=jnp.int32) if rows is None else rows.astype(jnp.int32)
    ids = jnp.broadcast_to(ids[:, None], (R, Q))
    where = jnp.stack([ids, index.astype(jnp.int32)], axis=-1)  # [R, Q, 2]: (row, position)
    num_new = num_new.astype(jnp.int32)
    return LayerCache(
        k=_write(layer.k, where, k, position_axis=3),
        v=_write(layer.v, where, v, position_axis=2),
        length=layer.length + num_new
        if rows is None
        else layer.length.at[rows].add(num_new, unique_indices=True),
    )


def take_rows(x: Array, rows: Array, heads: int) -> Array:
    """Rows `rows` (int32[R]) of a cache array in `LayerCache`'s layouts, [B*H, ...] ->
    [R*H, ...]: what attention over a subset of the batch reads."""
    # One contiguous slice per row (the form measured): the compiled gather came with
    # transposed copies of whole cross-attention K/V arrays.
    starts = rows.astype(jnp.int32) * heads
    return jnp.concatenate(
        [jax.lax.dynamic_slice_in_dim(x, starts[r], heads, axis=0) for r in range(rows.shape[0])]
    )


def _write(cache: Array, where: Array, updates: Array, *, position_axis: int) -> Array:
    """Scatters [R, Q, H, Dh] updates into a cache at (row, position) pairs `where` [R, Q, 2].

    The cache is viewed as [B, H, Dh, T] (keys, `position_axis` 3) or [B, H, T, Dh] (values,
    2); the window is (heads, head dimension), in that order in both. Spelled out rather than
    `cache.at[rows, :, index]`, which JAX lowers by transposing the whole cache to put the
    indexed axes first, and back again.
    """
    H = updates.shape[2]
    B = cache.shape[0] // H
    dims = jax.lax.ScatterDimensionNumbers(
        update_window_dims=(2, 3),
        inserted_window_dims=(0, position_axis),
        scatter_dims_to_operand_dims=(0, position_axis),
    )
    written = jax.lax.scatter(
        cache.reshape(B, H, *cache.shape[1:]),
        where,
        updates.astype(cache.dtype),
        dims,
        indices_are_sorted=True,
        unique_indices=False,
        mode=jax.lax.GatherScatterMode.FILL_OR_DROP,
    )
    return written.reshape(cache.shape)
