"""`free_jax.decode`: batched greedy decoding, one jitted `lax.while_loop` per call.

The methods ("full", "static", "free", "calm", "oracle") live in `free_jax.decoding.methods`,
one module each. `decode` is the host-level entry point: it validates and tokenizes inputs,
pads the source length to a multiple of 16, runs the encoder (`encode_source`, which pads its
output to `encoder_length` so that inputs of different lengths can share one compiled loop),
lets the method run its jitted core on the model's decode-layout weights
(`Model.decode_params`) and returns NumPy results with decoded texts. The jitted cores
(`encode_source`, then `greedy_full`, `greedy_static`, `free_decode`,
`calm_search.calm_decode` on its output) are public too, for callers who compose them inside
their own `jit`; their `threshold` is a traced argument, so a new threshold never recompiles.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from free_jax.decoding import calm_search, methods
from free_jax.decoding import mesh as mesh_decode
from free_jax.decoding.methods.base import DecodeCall, DecodeOptions, check_int
from free_jax.decoding.xla_options import decode_jit
from free_jax.errors import InputError
from free_jax.models import t5
from free_jax.models.config import T5Config
from free_jax.models.model import Model, check_token_ids

METHODS = methods.METHODS
# Source lengths are padded up to a multiple of this (masked), so a stream of inputs of varying
# length compiles a handful of times instead of once per length.
SOURCE_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class DecodeOutput:
    """Result of `decode`. T = max_new_tokens.

    Attributes:
      tokens: int32[B, T] generated tokens, without the decoder start token, EOS included,
        padding after EOS.
      lengths: int32[B] tokens generated per row, EOS included.
      texts: decoded strings (special tokens removed) when the model has a tokenizer, else None.
      steps: loop iterations the search ran.
      exited: bool[B, T] the token was emitted from the early exit (after `exit_layer` blocks).
      exit_layer: int32[B, T] decoder blocks the token's prediction came from (0 beyond a row's
        length).
      confidence: float32[B, T] the confidence that decided the token ("free": the shallow
        exit's; "calm": the exit's, or for tokens that ran every block the last one measured;
        NaN for methods that decide nothing).
      agree: int8[B, T] for calibration ("free"): 1 / 0 when a deep pass saw the token and its
        shallow and deep argmaxes agreed / disagreed, -1 when no deep pass saw it.
      num_deep_passes: deep passes the batch took ("free"; for "full" every step is one; for
        "calm" the steps at which some row ran every block).
      deep_pass_tokens: int32[num_deep_passes] positions each deep pass processed, over all rows
        ("calm": rows that ran every block at that step).
      deep_pass_rows: int32[num_deep_passes] rows that took part in each deep pass (joined shard
        by shard on a mesh, as `deep_pass_tokens`).
      shard_steps: int32[num_data_shards] loop iterations each data shard ran (`decode(...,
        mesh=...)`, where every shard runs its own loop and `steps` is the largest; one entry
        without a mesh). On a mesh, `num_deep_passes` is the sum over the shards that hold rows
        and `deep_pass_tokens` their lists joined shard by shard (see
        `free_jax.decoding.mesh`).
    """

    tokens: np.ndarray
    lengths: np.ndarray
    texts: list[str] | None
    steps: int
    exited: np.ndarray
    exit_layer: np.ndarray
    confidence: np.ndarray
    agree: np.ndarray
    num_deep_passes: int
    deep_pass_tokens: np.ndarray
    deep_pass_rows: np.ndarray
    shard_steps: np.ndarray

    @property
    def exit_rate(self) -> float:
        """Share of generated tokens emitted from the early exit."""
        n = int(self.lengths.sum())
        return float(self.exited.sum() / n) if n else 0.0


def encode_source(
    params: t5.Params,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    config: T5Config,
    length: int,
) -> tuple[jax.Array, jax.Array]:
    """Runs the encoder and pads its output to `length` positions for the decoding cores.

    The encoder's cost follows the source's own (bucketed) length, while the decode loop, whose
    compilation is the costly one, sees a fixed `length`: sources of different lengths then share
    one compiled loop, at the price of cross-attending over masked padding.

    Only the encoder's weights and the embedding go into the compiled call (`t5.encoder_params`):
    each array passed costs the call about a microsecond, and a T5's decoder holds most of them.
    `decode` passes `Model.decode_params`, whose encoder blocks are fused as the decoder's are.

    Args:
      params: the model's weights, in either layout.
      input_ids, attention_mask: int32[B, S] with S <= length.

    Returns:
      (encoder_output [B, length, D], encoder_mask int32[B, length]).
    """
    return _encode_source(
        t5.encoder_params(params), input_ids, attention_mask, config=config, length=length
    )


@decode_jit(static_argnames=("config", "length"))
def _encode_source(params, input_ids, attention_mask, *, config, length):  # see encode_source
    S = input_ids.shape[1]
    if S > length:
        raise ValueError(f"the source has {S} positions, more than length={length}.")
    encoder_output = t5.encode(params, config, input_ids, attention_mask)
    pad = length - S
    return (
        jnp.pad(encoder_output, ((0, 0), (0, pad), (0, 0))),
        jnp.pad(attention_mask.astype(jnp.int32), ((0, 0), (0, pad))),
    )


def fetch(tree: Any) -> Any:
    """`jax.device_get(tree)` in one transfer: the leaves' bytes are packed into one buffer on
    the device, brought over once, and read back as NumPy views of it.

    Each array `device_get` converts costs a synchronisation of its own: for the 9 arrays a FREE
    call returns, 190 us against 40 us packed (2-core Xeon, batch 1), which at batch 1 on a small
    model is a few percent of the call.
    """
    leaves, treedef = jax.tree.flatten(tree)
    packed = np.asarray(_packed_bytes(leaves))
    out, offset = [], 0
    for leaf in leaves:
        dtype = np.dtype(leaf.dtype)
        size = math.prod(leaf.shape) * dtype.itemsize
        out.append(packed[offset : offset + size].view(dtype).reshape(leaf.shape))
        offset += _padded(size)
    return jax.tree.unflatten(treedef, out)


def _padded(size: int) -> int:
    """Bytes a packed leaf takes: whole words, so that every leaf's view is aligned."""
    return -(-size // 4) * 4


@jax.jit
def _packed_bytes(leaves: list[jax.Array]) -> jax.Array:
    """uint8[...]: each leaf's bytes in memory order, zero-padded to whole words, in turn."""
    parts = []
    for leaf in leaves:
        if leaf.dtype == jnp.bool_:
            leaf = leaf.astype(jnp.uint8)  # NumPy's bool is one byte, 0 or 1, as this
        raw = jax.lax.bitcast_convert_type(leaf, jnp.uint8).reshape(-1)
        parts.append(jnp.pad(raw, (0, _padded(raw.size) - raw.size)))
    return jnp.concatenate(parts)


def prepare_inputs(
    model: Model,
    inputs: Any,
    attention_mask: Any = None,
    *,
    truncate: bool = False,
    bucket: int = SOURCE_BUCKET,
) -> tuple[np.ndarray, np.ndarray]:
    """Validates, tokenizes and pads decode inputs.

    Args:
      inputs: int[B, S] token ids, or a string / list of strings for the model's tokenizer.
      attention_mask: [B, S] for id inputs; default: nonzero where the id is not padding.
      truncate: cut inputs longer than `config.max_source_length` (with a warning) instead of
        raising.
      bucket: pad the source length up to a multiple of this.

    Returns:
      (input_ids int32[B, S'], attention_mask int32[B, S']) with S' a multiple of `bucket`.
    """
    config = model.config
    if isinstance(inputs, str):
        inputs = [inputs]
    if isinstance(inputs, Sequence) and len(inputs) == 0:
        raise InputError("inputs is empty; give at least one string or one row of token ids.")
    if isinstance(inputs, Sequence) and all(isinstance(x, str) for x in inputs):
        if model.tokenizer is None:
            raise InputError(
                "string inputs need a tokenizer, but this model has none; pass token ids "
                "[B, S] instead, or load a checkpoint that includes tokenizer files."
            )
        if attention_mask is not None:
            raise InputError("attention_mask is only accepted with token-id inputs.")
        encoded = model.tokenizer(list(inputs), padding=True, return_tensors="np")
        ids = encoded["input_ids"].astype(np.int32)
        mask = encoded["attention_mask"].astype(np.int32)
    else:
        ids = check_token_ids("inputs", inputs, config.vocab_size)
        if attention_mask is None:
            mask = (ids != config.pad_token_id).astype(np.int32)
        else:
            mask = np.asarray(attention_mask).astype(np.int32)
            if mask.shape != ids.shape:
                raise InputError(
                    f"attention_mask has shape {mask.shape}; it must match inputs {ids.shape}."
                )
    empty = np.flatnonzero(mask.sum(axis=1) == 0)
    if empty.size:
        raise InputError(
            f"input row(s) {empty.tolist()} have no real tokens (all padding or masked out)."
        )
    longest = int(mask.sum(axis=1).max())
    limit = config.max_source_length
    if limit is not None and longest > limit:
        if not truncate:
            raise InputError(
                f"an input has {longest} tokens, more than the model's max_source_length={limit}; "
                f"shorten it or pass truncate=True."
            )
        warnings.warn(
            f"truncating inputs from {longest} to max_source_length={limit} tokens.", stacklevel=3
        )
        ids, mask = ids[:, :limit], mask[:, :limit]
    pad = -ids.shape[1] % bucket
    if pad:  # (np.pad costs ten times as much on arrays this small, on every call)
        filler = np.zeros((ids.shape[0], pad), np.int32)
        ids = np.concatenate([ids, filler + config.pad_token_id], axis=1)
        mask = np.concatenate([mask, filler], axis=1)
    return ids, mask


def _check_lengths(max_new_tokens: Any, min_new_tokens: Any) -> None:
    check_int("max_new_tokens", max_new_tokens, 1)
    check_int("min_new_tokens", min_new_tokens, 0)
    if min_new_tokens > max_new_tokens:
        raise InputError(
            f"min_new_tokens={min_new_tokens} exceeds max_new_tokens={max_new_tokens}."
        )


def decode(
    model: Model,
    inputs: Any,
    *,
    method: str = "full",
    max_new_tokens: int = 64,
    min_new_tokens: int = 0,
    attention_mask: Any = None,
    truncate: bool = False,
    exit_layer: int | None = None,
    threshold: Any = None,
    confidence: str | None = None,
    buffer_capacity: int | None = None,
    mode: str = "default",
    record_agreement: bool = False,
    rollback_margin: float = 0.1,
    max_wait: int = 0,
    wait_mode: str = "hold",
    calm_tau: float | None = calm_search.DEFAULT_TAU,
    shallow_head: str | None = None,
    encoder_length: int | None = None,
    mesh: Any = None,
) -> DecodeOutput:
    """Greedy decoding with the chosen method.

    Args:
      model: the model.
      inputs: int[B, S] source token ids, or a string / list of strings (needs a tokenizer).
      method: "full" (all decoder blocks), "static" (every token exits after `exit_layer`
        blocks), "free" (FREE's shallow-deep module with synchronized parallel decoding),
        "calm" (CALM: exit at the first confident block from `exit_layer` up, state copying
        for the skipped blocks) or "oracle" (full-model tokens labelled with the shallowest
        exit that predicts each).
      max_new_tokens: tokens to generate at most per row (the decode cache size), >= 1.
      min_new_tokens: EOS is suppressed until this many tokens exist (benchmarks use
        `min_new_tokens = max_new_tokens` to fix the work done).
      attention_mask: [B, S] for id inputs; default: nonzero where the id is not padding.
      truncate: cut inputs longer than the model's `max_source_length` with a warning instead of
        raising.
      exit_layer: "static" and "free": decoder blocks of the early exit, L_s; in [1, L] for
        "static", [1, L - 1] for "free". "calm": the shallowest block a token may exit after,
        in [1, L - 1]. Default: the checkpoint's FREE metadata (`Model.metadata`) when it has
        one, else `default_exit_layer` (L // 4).
      threshold: "free" and "calm": a token exits when its confidence is strictly greater
        ("calm" first decays it with the position, see `free_jax.decoding.calm_search`); a float
        or a
        float32 scalar array (traced: changing it does not recompile), or a
        `free_jax.ThresholdEstimator` ("free" only): its current threshold is used, agreement
        data are recorded, and each row is then added to it as one input (it refits on its
        schedule). Default: the checkpoint's FREE metadata, else 0.9.
      confidence: "free" and "calm": "softmax_diff" (top-1 minus top-2 probability),
        "softmax_max", "state_cosine" (cosine of the residual stream before and after the
        exit's last block) or "meta" (the trained exit classifier; needs a model that has one).
        Default: the checkpoint's FREE metadata, else "softmax_diff".
      buffer_capacity: "free": K >= 1, exited tokens a row may queue before a deep pass is
        forced, or None for no limit: the buffer then holds a whole output (K =
        `max_new_tokens`), so deep passes happen only for tokens that do not exit, as in the
        paper. A bound only forces deep passes that nothing may need (tokens pending when a row
        ends never go deep); it saves memory ([B, K, D] states) at large B and T. Default: the
        checkpoint's FREE metadata, else None.
      mode: "free": "default" (the paper), "exact" (output identical to "full") or
        "rollback" (the reference code's option: a deep pass replaces the first pending token it
        disagrees with by more than `rollback_margin` and discards the rest). Exact mode runs
        the deep head at every position of a pass's window, not only at the current token: at
        batch 1 its decode program needs 1.21x (demo model) to 1.24x (t5-base shape) of full
        decoding's temporary memory, against 1.07x in default mode (demo); at batch 8 and 32,
        where the caches dominate, 1.06x (demo).
      max_wait: "free", batches: steps a row that needs the deep model may wait while other rows
        advance, so that one deep pass serves several rows (0: never wait). Changes when deep
        passes happen, not the tokens.
      wait_mode: how a row waits: "hold" (it stalls until the pass) or "draft" (it goes on
        from its shallow guess, which the pass verifies; a rejected guess and what followed are
        redone). Not "draft" with mode="rollback". See `free_jax.decoding.spd`.
      calm_tau: "calm": the threshold decay's temperature τ; None keeps the threshold
        constant.
      shallow_head: "free": None (the model's LM head) or "int8-dynamic": the shallow exit's
        logits, which pick its token and its confidence, come from an int8 copy of the head
        (`Model.int8_exit_head`, with activations rounded to int8 per row: XLA CPU's fast
        product). On a large vocabulary the head is about half of a shallow step at batch 8.
        The deep blocks' exit keeps the model's head, so exact mode still equals full decoding;
        a batch decodes as its rows alone up to rare flips (rounded activations). Not with
        `mesh`.
      encoder_length: the encoder output is padded (masked) to this many positions before the
        decode loop, so sources of different lengths share one compiled loop (the encoder itself
        runs at the source's length, rounded up to a multiple of 16). Default: that rounded
        length, one compiled loop per length. At least the longest source.
      record_agreement: "free": also record whether the shallow and deep predictions of pending
        tokens agree (`DecodeOutput.agree`, the threshold estimator's data); it costs the deep
        exit head on every position of a deep pass. Without it, only the tokens that went deep
        themselves are recorded.
      mesh: a `jax.sharding.Mesh` with a `data` axis and optionally a `model` axis: the rows are
        split over `data`, each shard running its own decode loop (it stops when its own rows
        are done; FREE decides exits and deep passes among its own rows), and the weights over
        `model` (tensor parallelism, `Model.shard`; pass a model already sharded to skip
        placing it on every call). Under `jax.distributed` every process passes the same
        global batch and gets the global output. See `free_jax.decoding.mesh`.

    Returns:
      A `DecodeOutput`.
    """
    impl = methods.get(method)
    _check_lengths(max_new_tokens, min_new_tokens)
    options = DecodeOptions(
        exit_layer=exit_layer,
        threshold=threshold,
        confidence=confidence,
        buffer_capacity=buffer_capacity,
        mode=mode,
        record_agreement=record_agreement,
        rollback_margin=rollback_margin,
        max_wait=max_wait,
        wait_mode=wait_mode,
        calm_tau=calm_tau,
        shallow_head=shallow_head,
    )
    if mesh is not None and shallow_head is not None:
        raise InputError(
            f"shallow_head={shallow_head!r} does not work with mesh= yet; decode without a "
            "mesh, or with shallow_head=None."
        )
    if mesh is not None:
        mesh = mesh_decode.check_mesh(mesh)
        model = model.shard(mesh)  # a no-op for a model already placed on this mesh
    settings = impl.plan(model, options, max_new_tokens)
    ids, mask = prepare_inputs(model, inputs, attention_mask, truncate=truncate)
    encoder_length = _check_encoder_length(encoder_length, ids.shape[1])
    lengths = {"max_new_tokens": int(max_new_tokens), "min_new_tokens": int(min_new_tokens)}
    if mesh is None:
        encoded = encode_source(
            model.decode_params, ids, mask, config=model.config, length=encoder_length
        )
        call = DecodeCall(
            model=model,
            # The decoding cores take the weights in decode layout, rearranged once per model.
            params=model.decode_params,
            encoder_output=encoded[0],
            encoder_mask=encoded[1],
            input_ids=ids,
            attention_mask=mask,
            **lengths,
        )
        # One transfer for everything the method reports (`fetch`).
        shards = [fetch(impl.outputs(settings, impl.run(settings, call)))]
        real = np.ones(ids.shape[0], bool)
    else:
        layout = mesh_decode.RowLayout.make(ids.shape[0], mesh_decode.data_shards(mesh))
        source = mesh_decode.place_rows((ids, mask), layout, mesh)
        encoded = encode_source(model.params, *source, config=model.config, length=encoder_length)
        shards = mesh_decode.run(impl, settings, model, encoded, source, mesh=mesh, **lengths)
        real = layout.real
    out = _to_output(model, impl, settings, shards, real)
    impl.finish(settings, out)
    return out


def _check_encoder_length(encoder_length: int | None, source_length: int) -> int:
    if encoder_length is None:
        return source_length
    encoder_length = check_int("encoder_length", encoder_length, 1)
    if encoder_length < source_length:
        raise InputError(
            f"encoder_length={encoder_length} is shorter than the source ({source_length} "
            f"positions after padding to a multiple of {SOURCE_BUCKET}); pass at least that, "
            "or None."
        )
    return encoder_length


def _to_output(
    model: Model, impl: methods.Method, settings: Any, shards: list[dict], real: np.ndarray
) -> DecodeOutput:
    """Joins the shards' fetched outputs (one shard without a mesh): `real` bool[rows] marks the
    rows (over all shards, in order) that are not padding."""
    reports = []
    for got in shards:
        generated = np.arange(got["tokens"].shape[1])[None, :] < got["lengths"][:, None]
        reports.append(impl.report(settings, got, generated, model.config))

    def rows(parts: list[Any]) -> np.ndarray:
        return np.concatenate([np.asarray(p) for p in parts])[real]

    tokens = rows([got["tokens"] for got in shards])
    lengths = rows([got["lengths"] for got in shards])
    generated = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
    # Per-pass diagnostics of the shards that hold real rows, shard by shard.
    holds_rows = real.reshape(len(shards), -1).any(axis=1)
    passing = [r for r, keep in zip(reports, holds_rows, strict=True) if keep]
    shard_steps = np.asarray([int(got["steps"]) for got in shards], np.int32)
    texts = None
    if model.tokenizer is not None:
        texts = model.tokenizer.batch_decode(
            [row[:n].tolist() for row, n in zip(tokens, lengths, strict=True)],
            skip_special_tokens=True,
        )
    return DecodeOutput(
        tokens=tokens,
        lengths=lengths,
        texts=texts,
        steps=int(shard_steps.max()),
        exited=rows([r.exited for r in reports]),
        exit_layer=np.where(generated, rows([r.exit_layer for r in reports]), 0).astype(np.int32),
        confidence=rows([r.confidence for r in reports]),
        agree=rows([r.agree for r in reports]),
        num_deep_passes=sum(int(r.num_deep_passes) for r in passing),
        deep_pass_tokens=np.concatenate(
            [np.asarray(r.deep_pass_tokens, np.int32).reshape(-1) for r in passing]
        ),
        deep_pass_rows=np.concatenate(
            [np.asarray(r.deep_pass_rows, np.int32).reshape(-1) for r in passing]
        ),
        shard_steps=shard_steps,
    )
