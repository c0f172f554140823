"""T5 as pure functions over a parameter pytree.

The parameters are nested dicts of arrays (layout below); every function takes them explicitly and
returns new values, so caches and decode state are plain pytrees that go in and come out of every
call. Decoder blocks are a Python list, and `decoder_blocks` runs any contiguous range `[start,
stop)` of them over a block of Q new positions per example: FREE's shallow step (blocks
`[0, L_s)`, Q = 1), its deep step (blocks `[L_s, L)`, Q = k + 1) and teacher-forced training
(all blocks, Q = T) all call the same code. A list rather than stacked `[L, ...]` arrays makes a
segment a zero-cost static slice; the blocks are unrolled, which at T5 depths keeps compile times
to seconds.

Parameter layout (kernels are `[in, out]`; shapes use the legend in `free_jax.models.config`):

    shared/embedding                 [V, D]
    lm_head                          [D, V]   (absent when the head is the embedding)
    encoder/rel_bias                 [NB, H]
    encoder/final_norm               [D]
    encoder/blocks[i]/self_attn/{q,k,v} [D, H*Dh], self_attn/o [H*Dh, D], self_attn_norm [D]
    encoder/blocks[i]/ffn/{wi | wi_0, wi_1} [D, F], ffn/wo [F, D], ffn_norm [D]
    decoder/rel_bias, decoder/final_norm, decoder/blocks[i]/... as the encoder, plus
    decoder/blocks[i]/cross_attn/{q,k,v,o}, cross_attn_norm [D]

LongT5 (`config.encoder_attention_type` "local" or "transient-global") has the same layout; its
encoder self-attention is computed in `free_jax.models.longt5`, and transient-global attention adds

    encoder/global_rel_bias                  [NB, H]
    encoder/blocks[i]/self_attn/global_norm  [D]
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from free_jax.models import longt5
from free_jax.models.config import T5Config
from free_jax.models.inplace import run_if
from free_jax.models.kv_cache import DecoderCache, LayerCache, take_rows, write_positions
from free_jax.models.layers import (  # noqa: F401 - part of this module's interface
    Array,
    Params,
    activation,
    attend,
    cache_layout,
    embed,
    feed_forward,
    merge_heads,
    relative_bias,
    relative_position_bucket,
    rms_norm,
    self_attention_qkv,
    split_heads,
)
from free_jax.models.quantize import Int8Weight

_F32 = jnp.float32


# ---------------------------------------------------------------------------- initialisation


def init_params(config: T5Config, rng: Array, dtype: Any = jnp.float32) -> Params:
    """Random parameters with the scales of Hugging Face's T5 initialiser (factor 1.0).

    Random tiny models built from these give non-degenerate logits, which the tests rely on.
    """
    D, F, V, H, NB = (
        config.d_model,
        config.d_ff,
        config.vocab_size,
        config.num_heads,
        config.relative_attention_num_buckets,
    )
    inner = config.inner_dim
    keys = iter(jax.random.split(rng, 4096))

    def normal(shape, std):
        return (jax.random.normal(next(keys), shape, _F32) * std).astype(dtype)

    def ones(n):
        return jnp.ones((n,), dtype)

    def attn():
        return {
            "q": normal((D, inner), (D * config.d_kv) ** -0.5),
            "k": normal((D, inner), D**-0.5),
            "v": normal((D, inner), D**-0.5),
            "o": normal((inner, D), inner**-0.5),
        }

    def ffn():
        if config.is_gated_act:
            p = {"wi_0": normal((D, F), D**-0.5), "wi_1": normal((D, F), D**-0.5)}
        else:
            p = {"wi": normal((D, F), D**-0.5)}
        p["wo"] = normal((F, D), F**-0.5)
        return p

    def block(cross: bool):
        b = {"self_attn": attn(), "self_attn_norm": ones(D)}
        if cross:
            b["cross_attn"] = attn()
            b["cross_attn_norm"] = ones(D)
        b["ffn"] = ffn()
        b["ffn_norm"] = ones(D)
        return b

    params: Params = {
        "shared": {"embedding": normal((V, D), 1.0)},
        "encoder": {
            "rel_bias": normal((NB, H), D**-0.5),
            "blocks": [block(cross=False) for _ in range(config.num_layers)],
            "final_norm": ones(D),
        },
        "decoder": {
            "rel_bias": normal((NB, H), D**-0.5),
            "blocks": [block(cross=True) for _ in range(config.num_decoder_layers)],
            "final_norm": ones(D),
        },
    }
    if not config.tie_word_embeddings:
        params["lm_head"] = normal((D, V), 1.0)
    if config.encoder_attention_type == "transient-global":
        # Drawn last, so that every other parameter is initialised as for a T5 of the same shape.
        params["encoder"]["global_rel_bias"] = normal((NB, H), D**-0.5)
        for block in params["encoder"]["blocks"]:
            block["self_attn"]["global_norm"] = ones(D)
    return params


def param_shapes(config: T5Config, dtype: Any = jnp.float32) -> Params:
    """The parameter pytree's `ShapeDtypeStruct`s, computed without allocating anything."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0), dtype))


def cast_params(params: Params, dtype: Any) -> Params:
    """Casts every floating-point parameter to `dtype` (activations follow the parameters)."""
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params
    )


# ---------------------------------------------------------------------------- decode layout


#: Top-level key (a zero-size array) of decode-layout weights whose decoder blocks stay unfused:
#: tensor parallelism (`free_jax.models.partition`) splits Q/K/V and the gated kernels by heads
#: and columns, which the thirds and halves of a fused kernel would cut across.
UNFUSED_KEY = "decode_unfused"


def fuse_for_decoding(params: Params, *, fuse_blocks: bool = True) -> Params:
    """The decoder's weights rearranged for one-token-at-a-time decoding; same function.

    Decoding at small batch is a chain of matrix-vector products that are bound by memory
    bandwidth and per-operation overhead, and a few large products do better than many small
    ones. This concatenates each block's self-attention Q/K/V kernels into one `qkv`
    [D, 3*H*Dh] and gated feed-forward kernels into one `wi_fused` [D, 2*F], in the decoder and
    in the encoder (which a decode call runs too: 13-14% less encoder time than unfused on the
    demo model, 100 test sentences at batch 1, 2-core AMD EPYC), and stores a tied
    head as an explicit `lm_head` [D, V] (a contiguous copy of the embedding's transpose, which
    XLA reads faster than the embedding itself). Other arrays are shared, not copied.
    `decoder_blocks`, `feed_forward` and `exit_head` accept either layout, and parameters already
    in decode layout are returned as they are. The rearrangement costs about as much as a few
    decode steps, so `Model.decode_params` does it once per model rather than once per call.
    `fuse_blocks=False` only adds `lm_head` and marks the result (`UNFUSED_KEY`) so that it
    counts as decode layout (for weights split over a mesh's `model` axis, see `Model.shard`).
    """
    if UNFUSED_KEY in params:
        return params
    if not fuse_blocks:
        out = {**params, UNFUSED_KEY: jnp.zeros((0,), jnp.int8)}
        if "lm_head" not in params:
            out["lm_head"] = params["shared"]["embedding"].T
        return out
    fused = {
        **params,
        "encoder": {**params["encoder"], "blocks": _fused_blocks(params["encoder"]["blocks"])},
        "decoder": {**params["decoder"], "blocks": _fused_blocks(params["decoder"]["blocks"])},
    }
    if "lm_head" not in params:
        fused["lm_head"] = params["shared"]["embedding"].T
    return fused


def _fused_blocks(blocks: list[Params]) -> list[Params]:
    """Blocks with their self-attention Q/K/V kernels as one `qkv` and their gated feed-forward
    input kernels as one `wi_fused`; other entries (cross-attention, norms, LongT5's
    `global_norm`) shared."""
    out = []
    for block in blocks:
        sa = dict(block["self_attn"])
        if "qkv" not in sa:
            qkv = jnp.concatenate([sa.pop("q"), sa.pop("k"), sa.pop("v")], axis=1)
            sa = {"qkv": qkv, **sa}
        ffn = dict(block["ffn"])
        if "wi_0" in ffn:
            ffn = {"wi_fused": jnp.concatenate([ffn["wi_0"], ffn["wi_1"]], axis=1), "wo": ffn["wo"]}
        out.append({**block, "self_attn": sa, "ffn": ffn})
    return out


def is_decode_layout(params: Params) -> bool:
    """Whether `params` are already in `fuse_for_decoding`'s layout."""
    if UNFUSED_KEY in params:
        return True
    blocks = params["decoder"]["blocks"]
    return "lm_head" in params and all("qkv" in b["self_attn"] for b in blocks)


# ---------------------------------------------------------------------------- encoder


def encoder_params(params: Params) -> Params:
    """The part of `params` the encoder reads (`encode`): its blocks and the embedding."""
    return {"encoder": params["encoder"], "shared": params["shared"]}


def encode(params: Params, config: T5Config, input_ids: Array, attention_mask: Array) -> Array:
    """Runs the encoder (T5's full self-attention, or LongT5's from `free_jax.models.longt5`).

    Args:
      input_ids: int32[B, S].
      attention_mask: [B, S], nonzero for real tokens.

    Returns:
      [B, S, D] encoder output after the final norm.
    """
    if config.encoder_attention_type != "full":
        return longt5.encode(params, config, input_ids, attention_mask)
    enc = params["encoder"]
    eps = config.layer_norm_epsilon
    S = input_ids.shape[1]
    mask = attention_mask.astype(bool)[:, None, None, :]  # [B, 1, 1, S]
    positions = jnp.arange(S, dtype=jnp.int32)
    bias = relative_bias(
        enc["rel_bias"], positions[None], positions, bidirectional=True, config=config
    )  # [1, H, S, S]
    x = embed(params, input_ids)
    for block in enc["blocks"]:
        h = rms_norm(x, block["self_attn_norm"], eps)
        a = block["self_attn"]
        q, k, v = self_attention_qkv(a, h, config)
        x = x + merge_heads(attend(q, *cache_layout(k, v), bias, mask)) @ a["o"]
        x = x + feed_forward(block["ffn"], rms_norm(x, block["ffn_norm"], eps), config)
    return rms_norm(x, enc["final_norm"], eps)


# ---------------------------------------------------------------------------- decoder


def init_decoder_cache(
    params: Params,
    config: T5Config,
    encoder_output: Array,
    encoder_mask: Array,
    max_length: int,
    *,
    num_layers: int | None = None,
    cross_layers: int | None = None,
) -> DecoderCache:
    """An empty self-attention cache and the cross-attention K/V, computed once.

    Args:
      encoder_output: [B, S, D].
      encoder_mask: [B, S], nonzero for real source tokens.
      max_length: T, decoder positions the cache can hold.
      num_layers: cache only blocks [0, num_layers) (a decoder that never runs deeper, such
        as static exiting, skips the others' cross-attention K/V); default all L.
      cross_layers: compute the cross-attention K/V of blocks [0, cross_layers) only and leave
        the rest zero, for `fill_cross_attention` to compute when (if ever) they are needed;
        default all of them.
    """
    B, S = encoder_output.shape[:2]
    dtype = encoder_output.dtype
    blocks = params["decoder"]["blocks"][:num_layers]
    cross_layers = len(blocks) if cross_layers is None else cross_layers
    layers, cross_k, cross_v = [], [], []
    for i, block in enumerate(blocks):
        layers.append(LayerCache.empty(B, max_length, config.num_heads, config.d_kv, dtype))
        if i < cross_layers:
            k, v = _cross_kv(block, config, encoder_output)
        else:
            k = jnp.zeros((B * config.num_heads, config.d_kv, S), dtype)
            v = jnp.zeros((B * config.num_heads, S, config.d_kv), dtype)
        cross_k.append(k)
        cross_v.append(v)
    return DecoderCache(
        layers=tuple(layers),
        cross_k=tuple(cross_k),
        cross_v=tuple(cross_v),
        encoder_mask=encoder_mask.astype(bool),
        cross_ready=jnp.arange(len(blocks)) < cross_layers,
    )


def _cross_kv(block: Params, config: T5Config, encoder_output: Array) -> tuple[Array, Array]:
    ca = block["cross_attn"]
    return cache_layout(
        split_heads(encoder_output @ ca["k"], config),
        split_heads(encoder_output @ ca["v"], config),
    )


def fill_cross_attention(
    params: Params,
    config: T5Config,
    cache: DecoderCache,
    encoder_output: Array,
    *,
    start: int,
    stop: int,
) -> DecoderCache:
    """The cache with blocks [start, stop)'s cross-attention K/V computed from `encoder_output`
    [B, S, D], unless they all are already (`cache.cross_ready`): a decoder that builds its cache
    with `cross_layers` calls this before running those blocks. It does the work only once; the
    check is an in-place conditional (`inplace.run_if`), so the cache is not copied."""

    def fill(cache: DecoderCache) -> DecoderCache:
        cross_k, cross_v = list(cache.cross_k), list(cache.cross_v)
        for i in range(start, stop):
            block = params["decoder"]["blocks"][i]
            cross_k[i], cross_v[i] = _cross_kv(block, config, encoder_output)
        block_index = jnp.arange(len(cross_k))
        ready = cache.cross_ready | ((block_index >= start) & (block_index < stop))
        return cache.replace(cross_k=tuple(cross_k), cross_v=tuple(cross_v), cross_ready=ready)

    return run_if(~jnp.all(cache.cross_ready[start:stop]), fill, cache)


@flax.struct.dataclass
class SegmentOutput:
    """What `decoder_blocks` returns.

    Attributes:
      hidden: [B, Q, D] residual stream after the segment's last block (before the final norm).
      cache: the cache with the segment's layers updated.
      block_states: with `return_block_states`, one [B, Q, D] residual stream per block of the
        segment (after that block); otherwise an empty tuple.
    """

    hidden: Array
    cache: DecoderCache
    block_states: tuple[Array, ...] = ()


def decoder_blocks(
    params: Params,
    config: T5Config,
    cache: DecoderCache,
    hidden: Array,
    *,
    start: int,
    stop: int,
    num_new: Array | None = None,
    rows: Array | None = None,
    return_block_states: bool = False,
) -> SegmentOutput:
    """Runs decoder blocks `[start, stop)` over Q new positions per example.

    The queries of row b sit at absolute positions `cache.layers[start].length[b] + [0, Q)`; the
    first `num_new[b]` of them are real. Their keys and values are written into each layer's cache
    at those positions (padding queries write nothing), and each query attends causally to every
    cached position up to its own. Rows may therefore be at different positions, and a block of
    Q positions gives the same cache and outputs as Q single-position calls.

    Args:
      hidden: [B, Q, D] input residual stream (token embeddings when `start == 0`).
      start, stop: static block range, 0 <= start < stop <= L.
      num_new: int32[B], real positions per row (default: all Q).
      rows: int32[R], ascending: run over these rows of the cache only, with `hidden` [R, Q, D]
        and `num_new` int32[R] (FREE's deep pass over the rows that need it). Their new K/V are
        written into the full cache; attention reads the R rows' entries, gathered.
      return_block_states: also return every block's output (training, analysis, parity).
    """
    L = config.num_decoder_layers
    if not 0 <= start < stop <= L:
        raise ValueError(f"decoder block range [{start}, {stop}) is not within [0, {L}].")
    B, Q, _ = hidden.shape
    eps = config.layer_norm_epsilon
    if num_new is None:
        num_new = jnp.full((B,), Q, jnp.int32)
    H = config.num_heads

    def part(x: Array) -> Array:  # a [B*H, ...] cache array, as the rows taking part see it
        return x if rows is None else take_rows(x, rows, H)

    offsets = cache.layers[start].length  # [B]
    encoder_mask = cache.encoder_mask
    if rows is not None:
        offsets, encoder_mask = offsets[rows], encoder_mask[rows]
    query_pos = offsets[:, None] + jnp.arange(Q, dtype=jnp.int32)[None, :]  # [B, Q]
    max_len = cache.layers[start].max_length
    key_pos = jnp.arange(max_len, dtype=jnp.int32)  # [T]
    self_bias = relative_bias(
        params["decoder"]["rel_bias"], query_pos, key_pos, bidirectional=False, config=config
    )  # [B, H, Q, T]
    causal = (key_pos[None, None, :] <= query_pos[:, :, None])[:, None]  # [B, 1, Q, T]
    cross_mask = encoder_mask[:, None, None, :]  # [B, 1, 1, S]
    valid = jnp.arange(Q)[None, :] < num_new[:, None]  # [B, Q]

    layers = list(cache.layers)
    states = []
    x = hidden
    for i in range(start, stop):
        block = params["decoder"]["blocks"][i]
        # Self-attention: write this call's K/V, then attend over the cache.
        h = rms_norm(x, block["self_attn_norm"], eps)
        sa = block["self_attn"]
        q, k, v = self_attention_qkv(sa, h, config)
        layers[i] = write_positions(layers[i], k, v, query_pos, valid, num_new, rows)
        attn = attend(q, part(layers[i].k), part(layers[i].v), self_bias, causal)
        x = x + merge_heads(attn) @ sa["o"]
        # Cross-attention over the encoder output (no position bias in T5).
        h = rms_norm(x, block["cross_attn_norm"], eps)
        ca = block["cross_attn"]
        q = split_heads(h @ ca["q"], config)
        cross_k, cross_v = cache.cross_k[i], cache.cross_v[i]
        if rows is not None:
            # Gather this layer's rows once its input is ready. Left free, XLA's CPU scheduler
            # gathers every layer's at the start and holds them all at once (and it drops
            # optimization barriers), so the row indices take a data dependence on x that
            # is always 0 (no float compares greater than +inf).
            after_x = rows + (x[0, 0, 0] > jnp.inf).astype(rows.dtype)
            cross_k, cross_v = take_rows(cross_k, after_x, H), take_rows(cross_v, after_x, H)
        attn = attend(q, cross_k, cross_v, None, cross_mask)
        x = x + merge_heads(attn) @ ca["o"]
        x = x + feed_forward(block["ffn"], rms_norm(x, block["ffn_norm"], eps), config)
        if return_block_states:
            states.append(x)
    return SegmentOutput(
        hidden=x, cache=cache.replace(layers=tuple(layers)), block_states=tuple(states)
    )


def copy_state_kv(
    params: Params,
    config: T5Config,
    cache: DecoderCache,
    hidden: Array,
    *,
    start: int,
    stop: int,
    num_new: Array | None = None,
) -> DecoderCache:
    """CALM's state copying: blocks `[start, stop)` get K/V projected from one copied state.

    A token that exits early skips the blocks above its exit, but later tokens attend to those
    blocks' K/V at its position. State copying fills them from the exit's hidden state: each
    skipped block's keys and values are its own projections of `hidden` (after the block's
    pre-attention norm), as if the state had passed through the skipped blocks unchanged. Only
    the K/V projections run; no attention, no feed-forward.

    Args:
      hidden: [B, Q, D] the exit's residual stream at the Q new positions.
      start, stop: static block range, 0 <= start <= stop <= L.
      num_new: int32[B], real positions per row (default: all Q).
    """
    B, Q, _ = hidden.shape
    if num_new is None:
        num_new = jnp.full((B,), Q, jnp.int32)
    inner = config.inner_dim
    valid = jnp.arange(Q)[None, :] < num_new[:, None]  # [B, Q]
    layers = list(cache.layers)
    for i in range(start, stop):
        block = params["decoder"]["blocks"][i]
        h = rms_norm(hidden, block["self_attn_norm"], config.layer_norm_epsilon)
        sa = block["self_attn"]
        if "qkv" in sa:  # decode layout: skip the query third of the fused kernel
            k, v = jnp.split(h @ sa["qkv"][:, inner:], 2, axis=-1)
        else:
            k, v = h @ sa["k"], h @ sa["v"]
        positions = layers[i].length[:, None] + jnp.arange(Q, dtype=jnp.int32)[None, :]
        layers[i] = write_positions(
            layers[i],
            split_heads(k, config),
            split_heads(v, config),
            positions,
            valid,
            num_new,
        )
    return cache.replace(layers=tuple(layers))


def start_decoding(
    params: Params,
    config: T5Config,
    encoder_output: Array,
    encoder_mask: Array,
    max_new_tokens: int,
    num_layers: int | None = None,
    cross_layers: int | None = None,
) -> tuple[Params, DecoderCache]:
    """What every decoding method does first, once the source is encoded: build the decoder
    cache for blocks [0, num_layers) (with the cross-attention K/V of [0, cross_layers), see
    `init_decoder_cache`) and put the weights in decode layout (a no-op for weights already in
    it, such as `Model.decode_params`). Returns (decode-layout params, cache).

    Args:
      encoder_output: [B, S, D] (`encode`, maybe padded: see `free_jax.decoding.encode_source`).
      encoder_mask: [B, S], nonzero for real source positions.
    """
    cache = init_decoder_cache(
        params,
        config,
        encoder_output,
        encoder_mask,
        max_new_tokens,
        num_layers=num_layers,
        cross_layers=cross_layers,
    )
    return fuse_for_decoding(params), cache


def exit_head(params: Params, config: T5Config, hidden: Array) -> Array:
    """The exit shared by every block: final RMS norm, the v1.0 rescale, the LM head.

    Args:
      hidden: [..., D] residual stream after any decoder block.

    Returns:
      float32[..., V] logits.
    """
    h = rms_norm(hidden, params["decoder"]["final_norm"], config.layer_norm_epsilon)
    if config.scale_decoder_outputs:
        h = h * jnp.asarray(config.d_model**-0.5, h.dtype)
    if isinstance(params.get("lm_head"), Int8Weight):  # `Model.quantize`
        return params["lm_head"].matmul(h, out_dtype=_F32)
    if "lm_head" in params:
        return jnp.einsum("...d,dv->...v", h, params["lm_head"], preferred_element_type=_F32)
    return jnp.einsum(
        "...d,vd->...v", h, params["shared"]["embedding"], preferred_element_type=_F32
    )


# ---------------------------------------------------------------------------- whole model


@flax.struct.dataclass
class ForwardOutput:
    """Teacher-forced outputs.

    Attributes:
      logits: float32[B, T, V] at the requested exit.
      encoder_output: [B, S, D].
      block_states: with `return_block_states`, L' residual streams [B, T, D], one after each
        decoder block up to the exit.
    """

    logits: Array
    encoder_output: Array
    block_states: tuple[Array, ...] = ()


def forward(
    params: Params,
    config: T5Config,
    input_ids: Array,
    decoder_input_ids: Array,
    attention_mask: Array | None = None,
    *,
    exit_layer: int | None = None,
    return_block_states: bool = False,
) -> ForwardOutput:
    """Teacher-forced encoder-decoder pass, read at the exit after block `exit_layer`.

    Args:
      input_ids: int32[B, S].
      decoder_input_ids: int32[B, T] (start token first).
      attention_mask: [B, S], default all ones.
      exit_layer: number of decoder blocks to run, in [1, L]; default L.
    """
    L = config.num_decoder_layers
    exit_layer = L if exit_layer is None else exit_layer
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    enc = encode(params, config, input_ids, attention_mask)
    T = decoder_input_ids.shape[1]
    cache = init_decoder_cache(params, config, enc, attention_mask, T)
    out = decoder_blocks(
        params,
        config,
        cache,
        embed(params, decoder_input_ids),
        start=0,
        stop=exit_layer,
        return_block_states=return_block_states,
    )
    return ForwardOutput(
        logits=exit_head(params, config, out.hidden),
        encoder_output=enc,
        block_states=out.block_states,
    )
