"""`free_jax.decode`: batched greedy decoding, one jitted `lax.while_loop` per call.

Methods:

* "full": every token runs all L decoder blocks (the speed-up denominator).
* "static": every token exits after block `exit_layer`.
* "calm": the CALM baseline (`free_jax.calm`): each token exits at the first block from
  `exit_layer` up whose confidence beats a position-decaying threshold; skipped blocks get their
  K/V by state copying.
* "oracle" (analysis): full-model tokens, each labelled with the shallowest exit whose
  prediction already equals the full model's (`DecodeOutput.exit_layer`).
* "free": FREE's shallow-deep module with synchronized parallel decoding (`free_jax.spd`): a token
  whose shallow confidence beats `threshold` exits after block `exit_layer`; the deep blocks later
  run once over all exited tokens, so the deep KV cache stays exact. `mode="exact"` verifies the
  exited tokens and reproduces full-model greedy output.

`decode` is the host-level entry point: it validates and tokenizes inputs, pads the source length
to a multiple of 16, runs the encoder (`encode_source`, which pads its output to `encoder_length`
so that inputs of different lengths can share one compiled loop), runs the jitted search for the
requested method on the model's decode-layout weights (`Model.decode_params`) and returns NumPy
results with decoded texts. The jitted cores (`encode_source`, then `greedy_full`,
`greedy_static`, `free_decode`, `calm.calm_decode` on its output) are public too, for callers who
compose them inside their own `jit`; their `threshold` is a traced argument, so a new threshold
never recompiles.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from free_jax import calm, modeling, spd
from free_jax.confidence import CONFIDENCES, exit_confidence
from free_jax.config import T5Config
from free_jax.errors import InputError
from free_jax.exit_classifier import KEY as EXIT_CLASSIFIER_KEY
from free_jax.exit_classifier import has_exit_classifier
from free_jax.model import Model, check_token_ids
from free_jax.search import greedy_search

METHODS = ("full", "static", "free", "calm", "oracle")
MODES = spd.MODES
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

    @property
    def exit_rate(self) -> float:
        """Share of generated tokens emitted from the early exit."""
        n = int(self.lengths.sum())
        return float(self.exited.sum() / n) if n else 0.0


@functools.partial(jax.jit, static_argnames=("config", "length"))
def encode_source(
    params: modeling.Params,
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

    Args:
      input_ids, attention_mask: int32[B, S] with S <= length.

    Returns:
      (encoder_output [B, length, D], encoder_mask int32[B, length]).
    """
    S = input_ids.shape[1]
    if S > length:
        raise ValueError(f"the source has {S} positions, more than length={length}.")
    encoder_output = modeling.encode(params, config, input_ids, attention_mask)
    pad = length - S
    return (
        jnp.pad(encoder_output, ((0, 0), (0, pad), (0, 0))),
        jnp.pad(attention_mask.astype(jnp.int32), ((0, 0), (0, pad))),
    )


def _greedy(
    params,
    encoder_output,
    encoder_mask,
    *,
    config,
    stop,
    max_new_tokens,
    min_new_tokens,
    keep_cache,
):
    """Greedy decoding through decoder blocks [0, stop) and the exit head."""
    B = encoder_output.shape[0]
    params, cache = modeling.start_decoding(
        params, config, encoder_output, encoder_mask, max_new_tokens, num_layers=stop
    )

    def step(cache, tokens, _):
        x = modeling.embed(params, tokens[:, None])  # [B, 1, D]
        out = modeling.decoder_blocks(params, config, cache, x, start=0, stop=stop)
        return modeling.exit_head(params, config, out.hidden[:, 0]), out.cache

    result = greedy_search(
        step,
        cache,
        batch_size=B,
        max_new_tokens=max_new_tokens,
        start_id=config.decoder_start_token_id,
        eos_id=config.eos_token_id,
        pad_id=config.pad_token_id,
        min_new_tokens=min_new_tokens,
    )
    return result if keep_cache else result.replace(cache=None)


@functools.partial(
    jax.jit, static_argnames=("config", "max_new_tokens", "min_new_tokens", "keep_cache")
)
def greedy_full(
    params: modeling.Params,
    encoder_output: jax.Array,
    encoder_mask: jax.Array,
    *,
    config: T5Config,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    keep_cache: bool = False,
):
    """Full-model greedy decoding, jitted. Returns a `search.GreedyResult`.

    Args:
      params: the parameters, in either layout (`Model.decode_params` saves a rearrangement).
      encoder_output: [B, S, D] from `encode_source`.
      encoder_mask: int32[B, S], 1 for real source positions.
      keep_cache: return the final decoder cache in `GreedyResult.cache` (else None: at batch 1
        every returned array is a buffer the call allocates and hands back, which shows in the
        per-call cost).
    """
    return _greedy(
        params,
        encoder_output,
        encoder_mask,
        config=config,
        stop=config.num_decoder_layers,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        keep_cache=keep_cache,
    )


@functools.partial(
    jax.jit,
    static_argnames=("config", "exit_layer", "max_new_tokens", "min_new_tokens", "keep_cache"),
)
def greedy_static(
    params,
    encoder_output,
    encoder_mask,
    *,
    config,
    exit_layer,
    max_new_tokens,
    min_new_tokens=0,
    keep_cache=False,
):
    """Greedy decoding where every token exits after block `exit_layer` (static exiting); the
    arguments are `greedy_full`'s."""
    return _greedy(
        params,
        encoder_output,
        encoder_mask,
        config=config,
        stop=exit_layer,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        keep_cache=keep_cache,
    )


@functools.partial(jax.jit, static_argnames=("config",))
def oracle_exit_layers(params, input_ids, attention_mask, tokens, *, config):
    """int32[B, T]: for each generated token, the fewest decoder blocks whose exit predicts it.

    Teacher-forced over the tokens full greedy decoding emitted, which is exactly what the decode
    loop computed at every position (tested in test_decode.py), with every block's exit applied.
    """
    start = jnp.full((tokens.shape[0], 1), config.decoder_start_token_id, tokens.dtype)
    dec = jnp.concatenate([start, tokens[:, :-1]], axis=1)
    out = modeling.forward(params, config, input_ids, dec, attention_mask, return_block_states=True)
    preds = jnp.stack(
        [jnp.argmax(modeling.exit_head(params, config, h), axis=-1) for h in out.block_states]
    )  # [L, B, T]
    return (jnp.argmax(preds == preds[-1][None], axis=0) + 1).astype(jnp.int32)


@functools.partial(
    jax.jit,
    static_argnames=(
        "config",
        "exit_layer",
        "max_new_tokens",
        "min_new_tokens",
        "buffer_capacity",
        "mode",
        "confidence",
        "record_agreement",
        "rollback_margin",
        "max_wait",
        "wait_mode",
        "keep_cache",
    ),
)
def free_decode(
    params: modeling.Params,
    encoder_output: jax.Array,
    encoder_mask: jax.Array,
    threshold: jax.Array,
    *,
    config: T5Config,
    exit_layer: int,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    buffer_capacity: int = 8,
    mode: str = "default",
    confidence: str = "softmax_diff",
    record_agreement: bool = False,
    rollback_margin: float = 0.1,
    max_wait: int = 0,
    wait_mode: str = "hold",
    keep_cache: bool = False,
) -> spd.SpdResult:
    """FREE decoding, jitted; `threshold` is traced (a float32 scalar), so it never recompiles.

    Args:
      params: the parameters, in either layout (`Model.decode_params` saves a rearrangement).
      encoder_output, encoder_mask: [B, S, D] and int32[B, S], from `encode_source`.
      threshold: a token exits when its confidence is strictly greater.
      exit_layer: L_s, the shallow model's depth, in [1, L - 1].
      buffer_capacity: K, exited tokens a row may queue before a deep pass is forced; K >=
        max_new_tokens means no bound.
      mode: "default", "exact" or "rollback" (see `free_jax.spd`).
      confidence: "softmax_diff", "softmax_max", "state_cosine" or "meta" (needs
        `params["exit_classifier"]`).
      record_agreement: record the shallow/deep agreement of pending tokens too (costs the deep
        exit head on every position of a deep pass; exact mode has it anyway).
      keep_cache: return the final decoder cache in `SpdResult.cache` (else None).
    """
    B = encoder_output.shape[0]
    L, Ls = config.num_decoder_layers, exit_layer
    # The deep blocks' cross-attention K/V are computed at the first deep pass, not up front: an
    # input whose every token exits never needs them.
    params, cache = modeling.start_decoding(
        params, config, encoder_output, encoder_mask, max_new_tokens, cross_layers=Ls
    )

    def prepare_fn(cache):
        return modeling.fill_cross_attention(
            params, config, cache, encoder_output, start=Ls, stop=L
        )

    def shallow_fn(cache, tokens, active):
        x = modeling.embed(params, tokens[:, None])  # [B, 1, D]
        out = modeling.decoder_blocks(
            params,
            config,
            cache,
            x,
            start=0,
            stop=Ls,
            num_new=active.astype(jnp.int32),
            return_block_states=confidence == "state_cosine",
        )
        hidden = out.hidden[:, 0]  # [B, D]
        logits = modeling.exit_head(params, config, hidden)
        before = None
        if confidence == "state_cosine":
            before = out.block_states[-2][:, 0] if Ls > 1 else x[:, 0]
        score = exit_confidence(confidence, params, config, logits, hidden, before)
        return logits, hidden, score, out.cache

    def deep_fn(cache, queries, num_new):
        out = modeling.decoder_blocks(
            params, config, cache, queries, start=Ls, stop=L, num_new=num_new
        )
        return out.hidden, out.cache

    result = spd.spd_search(
        shallow_fn,
        deep_fn,
        lambda hidden: modeling.exit_head(params, config, hidden),
        lambda cache, lengths: cache.truncate(lengths),
        cache,
        threshold,
        batch_size=B,
        hidden_size=config.d_model,
        hidden_dtype=params["shared"]["embedding"].dtype,
        max_new_tokens=max_new_tokens,
        buffer_capacity=buffer_capacity,
        start_id=config.decoder_start_token_id,
        eos_id=config.eos_token_id,
        pad_id=config.pad_token_id,
        mode=mode,
        min_new_tokens=min_new_tokens,
        record_agreement=record_agreement,
        rollback_margin=rollback_margin,
        max_wait=max_wait,
        wait_mode=wait_mode,
        prepare_fn=prepare_fn,
    )
    return result if keep_cache else result.replace(cache=None)


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
    _check_int("max_new_tokens", max_new_tokens, 1)
    _check_int("min_new_tokens", min_new_tokens, 0)
    if min_new_tokens > max_new_tokens:
        raise InputError(
            f"min_new_tokens={min_new_tokens} exceeds max_new_tokens={max_new_tokens}."
        )


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    ok = not isinstance(value, bool) and isinstance(value, int | np.integer)
    if not ok or value < low or (high is not None and value > high):
        valid = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise InputError(f"{name} must be an integer {valid}, got {value!r}.")
    return int(value)


def _check_threshold(threshold: Any, confidence: str) -> np.ndarray | jax.Array:
    """A float or array threshold, as a NumPy float32 scalar (the jitted call transfers it with
    its other arguments; a `jnp.asarray` here was a separate transfer costing about a tenth of a
    millisecond per call); traced values pass through unchecked."""
    if isinstance(threshold, jax.core.Tracer):
        return threshold
    low = -1.0 if confidence == "state_cosine" else 0.0
    try:
        value = np.asarray(threshold, np.float32)
    except (TypeError, ValueError):
        raise InputError(f"threshold must be a number, got {threshold!r}.") from None
    if value.ndim != 0:
        raise InputError(f"threshold must be a scalar, got shape {value.shape}.")
    if not np.isfinite(value) or not low <= float(value) <= 1.0:
        raise InputError(
            f"threshold={float(value)!r} is invalid for confidence={confidence!r}: it must be a "
            f"finite number in [{low:g}, 1] (1 never exits, {low:g} exits almost always)."
        )
    return value


# The `decode` arguments a checkpoint's `metadata["free"]` may set as its defaults.
FREE_SETTINGS = ("exit_layer", "threshold", "confidence", "buffer_capacity")


def free_settings(model: Model) -> dict[str, Any]:
    """The FREE settings a checkpoint was saved with (`exit_layer`, `threshold`, `confidence`,
    `buffer_capacity`), from `Model.metadata["free"]`; empty when it has none."""
    settings = model.metadata.get("free", {}) if model.metadata else {}
    return {k: settings[k] for k in FREE_SETTINGS if k in settings}


def default_exit_layer(config: T5Config) -> int:
    """L_s when none is given: a quarter of the decoder (the paper's 6 of 24), at least 1."""
    return max(1, config.num_decoder_layers // 4)


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
    calm_tau: float | None = calm.DEFAULT_TAU,
    encoder_length: int | None = None,
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
        ("calm" first decays it with the position, see `free_jax.calm`); a float or a
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
        disagrees with by more than `rollback_margin` and discards the rest).
      max_wait: "free", batches: steps a row that needs the deep model may wait while other rows
        advance, so that one deep pass serves several rows (0: never wait). Changes when deep
        passes happen, not the tokens.
      wait_mode: how a row waits: "hold" (it stalls until the pass) or "draft" (it goes on
        from its shallow guess, which the pass verifies; a rejected guess and what followed are
        redone). Not "draft" with mode="rollback". See `free_jax.spd`.
      calm_tau: "calm": the threshold decay's temperature τ; None keeps the threshold
        constant.
      encoder_length: the encoder output is padded (masked) to this many positions before the
        decode loop, so sources of different lengths share one compiled loop (the encoder itself
        runs at the source's length, rounded up to a multiple of 16). Default: that rounded
        length, one compiled loop per length. At least the longest source.
      record_agreement: "free": also record whether the shallow and deep predictions of pending
        tokens agree (`DecodeOutput.agree`, the threshold estimator's data); it costs the deep
        exit head on every position of a deep pass. Without it, only the tokens that went deep
        themselves are recorded.

    Returns:
      A `DecodeOutput`.
    """
    config = model.config
    L = config.num_decoder_layers
    if method not in METHODS:
        raise InputError(f"method={method!r} is not known; valid methods: {METHODS}.")
    _check_lengths(max_new_tokens, min_new_tokens)
    saved = free_settings(model)
    estimator = None
    if method in ("static", "free", "calm"):
        high = L if method == "static" else L - 1
        if high < 1:
            raise InputError(
                f"method={method!r} needs at least 2 decoder blocks; this model has {L}."
            )
        if exit_layer is None:
            exit_layer = saved.get("exit_layer", default_exit_layer(config))
        exit_layer = _check_int("exit_layer", exit_layer, 1, high)
    if method in ("free", "calm"):
        threshold = saved.get("threshold", 0.9) if threshold is None else threshold
        confidence = saved.get("confidence", "softmax_diff") if confidence is None else confidence
        if confidence not in CONFIDENCES:
            raise InputError(f"confidence={confidence!r} is not known; valid: {CONFIDENCES}.")
        if confidence == "meta" and not has_exit_classifier(model.params):
            raise InputError(
                "confidence='meta' needs a model with a trained exit classifier head "
                f"(params[{EXIT_CLASSIFIER_KEY!r}]), and this model has none; train one "
                "(free_jax.training, objective 'meta') or use 'softmax_diff', 'softmax_max' or "
                "'state_cosine'."
            )
    if method == "calm":
        if not isinstance(threshold, int | float | np.ndarray | np.generic | jax.Array):
            raise InputError(
                f"method='calm' takes a number or a float32 array as threshold, got "
                f"{type(threshold).__name__}; the adaptive ThresholdEstimator is for 'free'."
            )
        threshold = _check_threshold(threshold, confidence)
        if calm_tau is not None:
            tau_ok = isinstance(calm_tau, int | float) and not isinstance(calm_tau, bool)
            if not tau_ok or not np.isfinite(calm_tau) or calm_tau < 0:
                raise InputError(
                    f"calm_tau must be a finite number >= 0 (or None for no decay), got "
                    f"{calm_tau!r}."
                )
            calm_tau = float(calm_tau)
    if method == "free":
        if mode not in MODES:
            raise InputError(f"mode={mode!r} is not known; valid modes: {MODES}.")
        if buffer_capacity is None:
            buffer_capacity = saved.get("buffer_capacity")
        if buffer_capacity is None:  # unbounded: a row never has more than T pending tokens
            buffer_capacity = int(max_new_tokens)
        buffer_capacity = _check_int("buffer_capacity", buffer_capacity, 1)
        max_wait = _check_int("max_wait", max_wait, 0)
        if wait_mode not in spd.WAIT_MODES:
            raise InputError(f"wait_mode={wait_mode!r} is not known; valid: {spd.WAIT_MODES}.")
        if wait_mode == "draft" and mode == "rollback":
            raise InputError(
                "wait_mode='draft' works with mode='default' or 'exact', not 'rollback' (whose "
                "output depends on when deep passes run); use wait_mode='hold'."
            )
        margin_ok = isinstance(rollback_margin, int | float) and not isinstance(
            rollback_margin, bool
        )
        if not margin_ok or not 0.0 <= rollback_margin <= 1.0:
            raise InputError(
                f"rollback_margin must be a number in [0, 1] (a difference of probabilities), "
                f"got {rollback_margin!r}."
            )
        estimator = _as_estimator(threshold, confidence)
        if estimator is not None:
            threshold, record_agreement = estimator.threshold, True
        threshold = _check_threshold(threshold, confidence)
    ids, mask = prepare_inputs(model, inputs, attention_mask, truncate=truncate)
    if encoder_length is None:
        encoder_length = ids.shape[1]
    encoder_length = _check_int("encoder_length", encoder_length, 1)
    if encoder_length < ids.shape[1]:
        raise InputError(
            f"encoder_length={encoder_length} is shorter than the source ({ids.shape[1]} "
            "positions after padding to a multiple of "
            f"{SOURCE_BUCKET}); pass at least that, or None."
        )
    lengths_kw = dict(max_new_tokens=int(max_new_tokens), min_new_tokens=int(min_new_tokens))
    encoded = encode_source(model.params, ids, mask, config=config, length=encoder_length)
    # The decoding cores take the weights in decode layout, rearranged once per model.
    params = model.decode_params
    if method == "calm":
        result = calm.calm_decode(
            params,
            *encoded,
            threshold,
            config=config,
            min_layer=exit_layer,
            confidence=confidence,
            tau=calm_tau,
            **lengths_kw,
        )
    elif method == "free":
        result = free_decode(
            params,
            *encoded,
            threshold,
            config=config,
            exit_layer=exit_layer,
            buffer_capacity=buffer_capacity,
            mode=mode,
            confidence=confidence,
            record_agreement=bool(record_agreement),
            rollback_margin=float(rollback_margin),
            max_wait=max_wait,
            wait_mode=wait_mode,
            **lengths_kw,
        )
    elif method == "static":
        result = greedy_static(params, *encoded, config=config, exit_layer=exit_layer, **lengths_kw)
    else:
        result = greedy_full(params, *encoded, config=config, **lengths_kw)
        if method == "oracle":
            layers = oracle_exit_layers(model.params, ids, mask, result.tokens, config=config)
            return _to_output(model, method, result, exit_layer, oracle_layers=layers)
    out = _to_output(model, method, result, exit_layer)
    if estimator is not None:
        # One estimator input per row: its tokens' confidences and their agreement where a deep
        # pass saw them. Rows of a batch share the threshold they were decoded with.
        for row in range(out.tokens.shape[0]):
            seen = out.agree[row] >= 0
            estimator.update(out.confidence[row], out.agree[row] == 1, mask=seen)
    return out


def _as_estimator(threshold: Any, confidence: str) -> Any:
    """The `ThresholdEstimator` passed as `threshold`, or None for a plain threshold."""
    if isinstance(threshold, int | float | np.ndarray | np.generic | jax.Array):
        return None
    if isinstance(threshold, str):
        raise InputError(
            f"threshold={threshold!r}: pass a number, a float32 array, or a "
            "free_jax.ThresholdEstimator for the adaptive threshold (it updates after each call)."
        )
    from free_jax.threshold import ThresholdEstimator  # imported on demand: TFP is slow to load

    if not isinstance(threshold, ThresholdEstimator):
        return None  # _check_threshold reports what is wrong with it
    if confidence not in ("softmax_diff", "softmax_max"):
        raise InputError(
            f"the adaptive threshold models confidences in [0, 1]; confidence={confidence!r} is "
            "not one; use 'softmax_diff' or 'softmax_max'."
        )
    return threshold


def _to_output(
    model: Model, method: str, result: Any, exit_layer: int | None, oracle_layers: Any = None
) -> DecodeOutput:
    L = model.config.num_decoder_layers
    # One transfer for everything the method reports: each separate fetch synchronises on its
    # own, which at batch 1 on a CPU cost as much as several decoding steps.
    wanted = {"tokens": result.tokens, "lengths": result.lengths, "steps": result.steps}
    if method in ("free", "calm"):
        wanted |= {
            "confidence": result.confidence,
            "passes": result.num_deep_passes,
            "pass_tokens": result.pass_tokens,
        }
    if method == "free":
        wanted |= {"exited": result.exited, "agree": result.agree}
    elif method == "calm":
        wanted["layer"] = result.exit_layer
    elif method == "oracle":
        wanted["layer"] = oracle_layers
    got = jax.device_get(wanted)
    tokens, lengths, steps = got["tokens"], got["lengths"], got["steps"]
    B, T = tokens.shape
    generated = np.arange(T)[None, :] < lengths[:, None]
    if method == "free":
        exited = got["exited"] & generated
        confidence = np.where(generated, got["confidence"], np.nan).astype(np.float32)
        agree = got["agree"]
        passes = int(got["passes"])
        pass_tokens = got["pass_tokens"][:passes]
        layer = np.where(exited, exit_layer, L)
    elif method == "calm":
        layer = got["layer"]
        exited = (layer < L) & generated
        confidence = np.where(generated, got["confidence"], np.nan).astype(np.float32)
        agree = np.full((B, T), -1, np.int8)
        passes = int(got["passes"])
        pass_tokens = got["pass_tokens"][:passes]
    else:
        depth = L if method == "full" else exit_layer
        exited = np.full((B, T), method == "static") & generated
        confidence = np.full((B, T), np.nan, np.float32)
        agree = np.full((B, T), -1, np.int8)
        passes = int(steps) if method in ("full", "oracle") else 0
        active_per_step = (np.arange(T)[:, None] < lengths[None, :]).sum(axis=1)
        pass_tokens = active_per_step[:passes].astype(np.int32)
        layer = np.full((B, T), depth)
        if method == "oracle":
            layer = np.asarray(got["layer"])
            exited = (layer < L) & generated
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
        steps=int(steps),
        exited=exited,
        exit_layer=np.where(generated, layer, 0).astype(np.int32),
        confidence=confidence,
        agree=agree,
        num_deep_passes=passes,
        deep_pass_tokens=np.asarray(pass_tokens, np.int32),
    )
