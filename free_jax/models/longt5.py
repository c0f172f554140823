"""LongT5 encoders: local and transient-global self-attention as pure functions.

LongT5 (Guo et al., 2022, arXiv:2112.07916) keeps T5 v1.1's decoder and replaces only the
encoder's self-attention, so that its cost grows linearly with the source length S instead of
quadratically. Both kinds cut the sequence into blocks of W = local_radius + 1 positions:

* "local": the queries of a block attend to the keys of that block and of its two neighbours (a
  window of 3W keys), of which only those at most `local_radius` positions away. T5's bidirectional
  relative-position bias is computed once for the [W, 3W] window and shared by every block.
* "transient-global": in addition, every `global_block_size` positions are summed into one global
  token (padding left out; a trailing partial block joins the last complete one), which goes
  through a per-layer RMS norm (`global_norm`) and the layer's own K and V projections. Every
  position attends to its local window and to all S // global_block_size global tokens, with a
  second bias table (`global_rel_bias`) over `global_index - own_global_block`.

As in transformers, both relative-position biases come from the first encoder block and are shared
by all blocks; positions whose `attention_mask` is 0 are never attended to and never summed into a
global token, and the encoder outputs at those positions are unspecified (as in T5's encoder).

The attention is computed for a chunk of query blocks at a time (`lax.map` over chunks of about
`QUERY_CHUNK` positions), so no array grows faster than linearly in S: the local scores are
[chunk, 3W] per head, and the global scores [chunk, S / global_block_size]. Inputs of up to
`QUERY_CHUNK` positions take a single chunk, with no loop.

Parameter layout additions (see `free_jax.models.t5`; the encoder's `rel_bias` is the local one):

    encoder/global_rel_bias                  [NB, H]   (transient-global only)
    encoder/blocks[i]/self_attn/global_norm  [D]       (transient-global only)

Axes beyond the legend in `free_jax.models.config`: W local block length (local_radius + 1), N query
blocks in a chunk, G global tokens (S // global_block_size).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from free_jax.models.config import T5Config
from free_jax.models.layers import (
    Array,
    Params,
    embed,
    feed_forward,
    merge_heads,
    relative_position_bucket,
    rms_norm,
    self_attention_qkv,
)

# Query positions per step of the chunked attention (rounded to whole blocks, at least one). On a
# 2-core CPU, LongT5-base's attention layer at 1k-8k tokens ran 1.5-2x faster with chunks of one or
# two blocks of 128 than with 1024 (smaller working sets); an accelerator may prefer larger chunks
# (`encode(..., query_chunk=...)`), which was not measured.
QUERY_CHUNK = 256

_F32 = jnp.float32
_MASKED = jnp.finfo(_F32).min


# ---------------------------------------------------------------------------- positions


def _buckets(relative_position: Array, config: T5Config) -> Array:
    return relative_position_bucket(
        relative_position,
        bidirectional=True,
        num_buckets=config.relative_attention_num_buckets,
        max_distance=config.relative_attention_max_distance,
    )


def window_offsets(block_len: int) -> Array:
    """int32[W, 3W]: key position minus query position, for a query block and its 3-block window."""
    keys = jnp.arange(3 * block_len, dtype=jnp.int32)
    queries = block_len + jnp.arange(block_len, dtype=jnp.int32)
    return keys[None, :] - queries[:, None]


def local_bias(table: Array, config: T5Config) -> Array:
    """float32[H, W, 3W]: the relative-position bias of every query of a block for its window.

    Args:
      table: [NB, H] the encoder's relative-attention bias.
    """
    buckets = _buckets(window_offsets(config.local_radius + 1), config)  # [W, 3W]
    return jnp.transpose(table.astype(_F32)[buckets], (2, 0, 1))


def global_block_ids(attention_mask: Array, block_size: int) -> tuple[Array, Array]:
    """Which global token each position is summed into.

    Position i belongs to block i // block_size. A trailing partial block is folded into the last
    complete block; as in transformers, the complete blocks are counted as the blocks whose last
    position is real (for a right-padded row, the blocks without padding), and a row without one
    has no global tokens at all. Integer arithmetic throughout: transformers floors a float32
    cumulative sum of 1 / block_size instead, which on torch 2.13's CPU gave the same ids for
    every block size from 1 to 32 at 16,384 positions except 25 and 31, where rounding moves the
    first position of some blocks (from 425 and 527 on) into the previous block. Released LongT5
    models use block size 16, where both are exact.

    Args:
      attention_mask: [B, S], nonzero for real positions.
      block_size: positions per global token.

    Returns:
      (block_ids int32[B, S], the global token of each position, -1 for padding;
       last int32[B], the last global token of each row, -1 when it has none). Global token g of
      row b exists exactly when g <= last[b].
    """
    S = attention_mask.shape[1]
    real = attention_mask.astype(bool)
    pos = jnp.arange(S, dtype=jnp.int32)
    complete = jnp.sum(real & (pos % block_size == block_size - 1), axis=1, dtype=jnp.int32)
    last = complete - 1  # [B]
    block_ids = jnp.where(real, jnp.minimum(pos // block_size, last[:, None]), -1)
    return block_ids.astype(jnp.int32), last


def global_aggregates(h: Array, block_ids: Array, last: Array, block_size: int) -> Array:
    """Sums each global block's positions: [B, S, D] -> [B, G, D], G = S // block_size.

    Equal to a one-hot [B, S, G] contraction over `block_ids`, without building it: block sums
    of fixed size, then every block past `last` folded into `last` (the trailing partial block,
    and blocks of padding, which contribute zeros).
    """
    B, S, D = h.shape
    G = S // block_size
    n_fixed = -(-S // block_size)
    x = jnp.where((block_ids >= 0)[..., None], h, jnp.zeros((), h.dtype))
    x = jnp.pad(x, ((0, 0), (0, n_fixed * block_size - S), (0, 0)))
    fixed = jnp.sum(x.reshape(B, n_fixed, block_size, D), axis=2)  # [B, n_fixed, D]
    after = jnp.arange(n_fixed)[None, :] >= last[:, None]  # [B, n_fixed]
    tail = jnp.sum(jnp.where(after[..., None], fixed, 0), axis=1)  # [B, D]
    g = jnp.arange(G)[None, :]  # [1, G]
    out = jnp.where((g < last[:, None])[..., None], fixed[:, :G], 0)
    return jnp.where((g == last[:, None])[..., None], tail[:, None, :], out).astype(h.dtype)


def global_offset_bias(table: Array, num_globals: int, config: T5Config) -> Array:
    """float32[2G, H]: the global bias by offset `g - block_id` + G - 1.

    Offsets range over [-(G - 1), G] (block ids are in [-1, G - 1]), so a position's bias for
    all G global tokens is a gather from this small table rather than a bucket computation.

    Args:
      table: [NB, H] the encoder's global relative-attention bias.
    """
    offsets = jnp.arange(-(num_globals - 1), num_globals + 1, dtype=jnp.int32)
    return table.astype(_F32)[_buckets(offsets, config)]


# ---------------------------------------------------------------------------- attention


@flax.struct.dataclass
class GlobalTokens:
    """One encoder layer's transient global tokens, as its attention sees them.

    Attributes:
      k, v: [B, G, H, Dh] keys and values of the normed global aggregates.
      bias_by_offset: float32[2G, H], see `global_offset_bias`.
      block_ids: int32[B, S] each position's own global block (-1 for padding).
      valid: bool[B, G] the global token exists (has real positions).
    """

    k: Array
    v: Array
    bias_by_offset: Array
    block_ids: Array
    valid: Array


def _windows(x: Array, num_blocks: int, block_len: int) -> Array:
    """[B, (N + 2) W, ...] -> [B, N, 3W, ...]: each block with its left and right neighbours."""
    blocks = x.reshape(x.shape[0], num_blocks + 2, block_len, *x.shape[2:])
    parts = [blocks[:, i : i + num_blocks] for i in range(3)]
    return jnp.concatenate(parts, axis=2)


def blocked_attention(
    q: Array,
    k: Array,
    v: Array,
    key_valid: Array,
    bias: Array,
    *,
    block_len: int,
    global_tokens: GlobalTokens | None = None,
    query_chunk: int = QUERY_CHUNK,
) -> Array:
    """LongT5 encoder attention: local windows, plus global tokens when given.

    Args:
      q, k, v: [B, S, H, Dh].
      key_valid: bool[B, S], False for padding (never attended to).
      bias: float32[H, W, 3W] local relative-position bias (`local_bias`).
      block_len: W.
      global_tokens: the transient global tokens, or None for local attention.
      query_chunk: query positions per step (rounded to whole blocks).

    Returns:
      [B, S, H, Dh] in the dtype of `v`.
    """
    B, S, H, Dh = q.shape
    W = block_len
    n_blocks = -(-S // W)
    n_chunks = -(-n_blocks // max(1, min(n_blocks, query_chunk // W)))
    N = -(-n_blocks // n_chunks)  # blocks per chunk, evened out over the chunks
    total = n_chunks * N * W
    # Queries padded to whole chunks; keys, values and their validity also by one (masked) block
    # on either side, the missing neighbours of the first and last blocks.
    q = jnp.pad(q, ((0, 0), (0, total - S), (0, 0), (0, 0)))
    kv_pad = ((0, 0), (W, total - S + W), (0, 0), (0, 0))
    k, v = jnp.pad(k, kv_pad), jnp.pad(v, kv_pad)
    key_valid = jnp.pad(key_valid, kv_pad[:2])
    near = jnp.abs(window_offsets(W)) < W  # [W, 3W], at most local_radius away
    if global_tokens is not None:
        G = global_tokens.k.shape[1]
        block_ids = jnp.pad(global_tokens.block_ids, ((0, 0), (0, total - S)), constant_values=-1)
        side_valid = global_tokens.valid[:, None, None, None, :]  # [B, 1, 1, 1, G]

    def chunk(start: Array) -> Array:
        """Queries of blocks [start, start + N): [B, N W, H, Dh]."""
        pos = start * W
        qc = jax.lax.dynamic_slice_in_dim(q, pos, N * W, axis=1).reshape(B, N, W, H, Dh)
        kc, vc, ok = (
            _windows(jax.lax.dynamic_slice_in_dim(x, pos, (N + 2) * W, axis=1), N, W)
            for x in (k, v, key_valid)
        )  # [B, N, 3W, H, Dh] twice, bool[B, N, 3W]
        logits = jnp.einsum("bnqhd,bnkhd->bnhqk", qc, kc, preferred_element_type=_F32)
        logits = jnp.where(ok[:, :, None, None, :] & near, logits + bias, _MASKED)
        if global_tokens is None:
            weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # [B, N, H, W, 3W]
            out = jnp.einsum("bnhqk,bnkhd->bnqhd", weights, vc)
            return out.reshape(B, N * W, H, Dh)
        # Each query also attends to every global token, biased by its offset from its own.
        own = jax.lax.dynamic_slice_in_dim(block_ids, pos, N * W, axis=1).reshape(B, N, W)
        offset = jnp.arange(G)[None, None, None, :] - own[..., None] + (G - 1)  # [B, N, W, G]
        side_bias = jnp.moveaxis(global_tokens.bias_by_offset[offset], -1, 2)  # [B, N, H, W, G]
        side = jnp.einsum("bnqhd,bghd->bnhqg", qc, global_tokens.k, preferred_element_type=_F32)
        side = jnp.where(side_valid, side + side_bias, _MASKED)
        weights = jax.nn.softmax(jnp.concatenate([logits, side], axis=-1), axis=-1)
        weights = weights.astype(v.dtype)  # [B, N, H, W, 3W + G]
        out = jnp.einsum("bnhqk,bnkhd->bnqhd", weights[..., : 3 * W], vc)
        out = out + jnp.einsum("bnhqg,bghd->bnqhd", weights[..., 3 * W :], global_tokens.v)
        return out.reshape(B, N * W, H, Dh)

    if n_chunks == 1:
        out = chunk(jnp.int32(0))
    else:
        out = jax.lax.map(chunk, jnp.arange(n_chunks, dtype=jnp.int32) * N)  # [C, B, N W, H, Dh]
        out = jnp.moveaxis(out, 0, 1).reshape(B, total, H, Dh)
    return out[:, :S]


# ---------------------------------------------------------------------------- encoder


def encode(
    params: Params,
    config: T5Config,
    input_ids: Array,
    attention_mask: Array,
    *,
    query_chunk: int = QUERY_CHUNK,
) -> Array:
    """Runs a LongT5 encoder (`config.encoder_attention_type` "local" or "transient-global").

    Args:
      input_ids: int32[B, S], any S.
      attention_mask: [B, S], nonzero for real tokens.
      query_chunk: query positions per attention step; bounds the attention's working memory.

    Returns:
      [B, S, D] encoder output after the final norm.
    """
    enc = params["encoder"]
    eps = config.layer_norm_epsilon
    S = input_ids.shape[1]
    W = config.local_radius + 1
    real = attention_mask.astype(bool)
    bias = local_bias(enc["rel_bias"], config)
    G = 0
    if config.encoder_attention_type == "transient-global":
        G = S // config.global_block_size  # 0 for inputs shorter than one global block
    if G:
        block_ids, last = global_block_ids(real, config.global_block_size)
        valid = jnp.arange(G)[None, :] <= last[:, None]  # [B, G]
        bias_by_offset = global_offset_bias(enc["global_rel_bias"], G, config)
    x = embed(params, input_ids)
    for block in enc["blocks"]:
        h = rms_norm(x, block["self_attn_norm"], eps)
        a = block["self_attn"]
        q, k, v = self_attention_qkv(a, h, config)
        global_tokens = None
        if G:
            aggregates = global_aggregates(h, block_ids, last, config.global_block_size)
            g = rms_norm(aggregates, a["global_norm"], eps)  # [B, G, D]
            _, global_k, global_v = self_attention_qkv(a, g, config)  # (G rows: the q is cheap)
            global_tokens = GlobalTokens(
                k=global_k,
                v=global_v,
                bias_by_offset=bias_by_offset,
                block_ids=block_ids,
                valid=valid,
            )
        attn = blocked_attention(
            q,
            k,
            v,
            real,
            bias,
            block_len=W,
            global_tokens=global_tokens,
            query_chunk=query_chunk,
        )
        x = x + merge_heads(attn) @ a["o"]
        x = x + feed_forward(block["ffn"], rms_norm(x, block["ffn_norm"], eps), config)
    return rms_norm(x, enc["final_norm"], eps)
