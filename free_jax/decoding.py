"""`free_jax.decode`: batched greedy decoding, one jitted `lax.while_loop` per call.

`decode` is the host-level entry point: it validates and tokenizes inputs, pads the source length
to a bucket (so inputs of similar lengths share one compilation), runs the jitted search for the
requested method and returns NumPy results with decoded texts. The jitted cores (`greedy_full`)
are public too, for callers who compose them inside their own `jit`.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from free_jax import modeling
from free_jax.config import T5Config
from free_jax.errors import InputError
from free_jax.model import Model, check_token_ids
from free_jax.search import greedy_search

METHODS = ("full",)
# Source lengths are padded up to a multiple of this (masked), so a stream of inputs of varying
# length compiles a handful of times instead of once per length.
SOURCE_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class DecodeOutput:
    """Result of `decode`.

    Attributes:
      tokens: int32[B, T] generated tokens (T = max_new_tokens), without the decoder start
        token, EOS included, padding after EOS.
      lengths: int32[B] tokens generated per row, EOS included.
      texts: decoded strings (special tokens removed) when the model has a tokenizer, else None.
      steps: decoder steps the loop ran (the longest row's length).
    """

    tokens: np.ndarray
    lengths: np.ndarray
    texts: list[str] | None
    steps: int


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "min_new_tokens"))
def greedy_full(
    params: modeling.Params,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    config: T5Config,
    max_new_tokens: int,
    min_new_tokens: int = 0,
):
    """Full-model greedy decoding, jitted. Returns a `search.GreedyResult`.

    Args:
      input_ids: int32[B, S].
      attention_mask: int32[B, S], 1 for real tokens.
    """
    B = input_ids.shape[0]
    L = config.num_decoder_layers
    encoder_output = modeling.encode(params, config, input_ids, attention_mask)
    cache = modeling.init_decoder_cache(
        params, config, encoder_output, attention_mask, max_new_tokens
    )
    params = modeling.fuse_for_decoding(params)

    def step(cache, tokens, _):
        x = modeling.embed(params, tokens[:, None])  # [B, 1, D]
        out = modeling.decoder_blocks(params, config, cache, x, start=0, stop=L)
        return modeling.exit_head(params, config, out.hidden[:, 0]), out.cache

    return greedy_search(
        step,
        cache,
        batch_size=B,
        max_new_tokens=max_new_tokens,
        start_id=config.decoder_start_token_id,
        eos_id=config.eos_token_id,
        pad_id=config.pad_token_id,
        min_new_tokens=min_new_tokens,
    )


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
    if pad:
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=config.pad_token_id)
        mask = np.pad(mask, ((0, 0), (0, pad)))
    return ids, mask


def _check_lengths(max_new_tokens: Any, min_new_tokens: Any) -> None:
    for name, value, low in (
        ("max_new_tokens", max_new_tokens, 1),
        ("min_new_tokens", min_new_tokens, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
            raise InputError(f"{name} must be an integer >= {low}, got {value!r}.")
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
) -> DecodeOutput:
    """Greedy decoding with the chosen method.

    Args:
      model: the model.
      inputs: int[B, S] source token ids, or a string / list of strings (needs a tokenizer).
      method: "full" (every token through all decoder blocks).
      max_new_tokens: tokens to generate at most per row (the decode cache size), >= 1.
      min_new_tokens: EOS is suppressed until this many tokens exist (benchmarks use
        `min_new_tokens = max_new_tokens` to fix the work done).
      attention_mask: [B, S] for id inputs; default: nonzero where the id is not padding.
      truncate: cut inputs longer than the model's `max_source_length` with a warning instead of
        raising.

    Returns:
      A `DecodeOutput`.
    """
    if method not in METHODS:
        raise InputError(f"method={method!r} is not known; valid methods: {METHODS}.")
    _check_lengths(max_new_tokens, min_new_tokens)
    ids, mask = prepare_inputs(model, inputs, attention_mask, truncate=truncate)
    result = greedy_full(
        model.params,
        ids,
        mask,
        config=model.config,
        max_new_tokens=int(max_new_tokens),
        min_new_tokens=int(min_new_tokens),
    )
    tokens, lengths, steps = jax.device_get((result.tokens, result.lengths, result.steps))
    texts = None
    if model.tokenizer is not None:
        texts = model.tokenizer.batch_decode(
            [row[:n].tolist() for row, n in zip(tokens, lengths, strict=True)],
            skip_special_tokens=True,
        )
    return DecodeOutput(tokens=tokens, lengths=lengths, texts=texts, steps=int(steps))
