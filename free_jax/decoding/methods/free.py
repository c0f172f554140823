"""Method "free": FREE's shallow-deep module with synchronized parallel decoding (`spd`).

A token whose shallow confidence beats `threshold` exits after block `exit_layer`; the deep blocks
later run once over all exited tokens, so the deep KV cache stays exact. `mode="exact"` verifies
the exited tokens and reproduces full-model greedy output. A `ThresholdEstimator` as the threshold
makes it adaptive: its current threshold is used, and each decoded row is added to its data.
`shallow_head="int8-dynamic"` computes the shallow exit's logits (its token and its confidence)
with an int8 copy of the LM head (`Model.int8_exit_head`); the deep head stays as it is.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from free_jax.decoding import spd
from free_jax.decoding.confidence import exit_confidence
from free_jax.decoding.methods.base import (
    DecodeCall,
    DecodeOptions,
    Method,
    Report,
    check_int,
    check_threshold,
    free_settings,
    is_plain_threshold,
    resolve_confidence,
    resolve_exit_layer,
    resolve_threshold,
)
from free_jax.decoding.xla_options import decode_jit
from free_jax.errors import InputError
from free_jax.models import t5
from free_jax.models.config import T5Config
from free_jax.models.model import Model

MODES = spd.MODES
#: What `decode(..., shallow_head=...)` takes: None (the model's own head) or an int8 copy of it.
SHALLOW_HEADS = (None, "int8-dynamic")
#: Where `Free.run` puts that copy in the parameters `free_decode` gets.
SHALLOW_HEAD_KEY = "shallow_lm_head"


@decode_jit(
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
    params: t5.Params,
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
      mode: "default", "exact" or "rollback" (see `free_jax.decoding.spd`).
      confidence: "softmax_diff", "softmax_max", "state_cosine" or "meta" (needs
        `params["exit_classifier"]`).
      record_agreement: record the shallow/deep agreement of pending tokens too (costs the deep
        exit head on every position of a deep pass; exact mode has it anyway).
      keep_cache: return the final decoder cache in `SpdResult.cache` (else None).

    With `params[SHALLOW_HEAD_KEY]` (an `Int8Weight`), the shallow exit's logits come from it
    rather than from `params["lm_head"]`, which the deep blocks' exit keeps.
    """
    B = encoder_output.shape[0]
    L, Ls = config.num_decoder_layers, exit_layer
    # The deep blocks' cross-attention K/V are computed at the first deep pass, not up front: an
    # input whose every token exits never needs them.
    params, cache = t5.start_decoding(
        params, config, encoder_output, encoder_mask, max_new_tokens, cross_layers=Ls
    )

    def prepare_fn(cache):
        return t5.fill_cross_attention(params, config, cache, encoder_output, start=Ls, stop=L)

    # The shallow exit's head: the int8 copy where the caller passed one (`shallow_head`).
    shallow_params = params
    if SHALLOW_HEAD_KEY in params:
        shallow_params = {**params, "lm_head": params[SHALLOW_HEAD_KEY]}

    def shallow_fn(cache, tokens, active):
        x = t5.embed(params, tokens[:, None])  # [B, 1, D]
        out = t5.decoder_blocks(
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
        logits = t5.exit_head(shallow_params, config, hidden)
        before = None
        if confidence == "state_cosine":
            before = out.block_states[-2][:, 0] if Ls > 1 else x[:, 0]
        score = exit_confidence(confidence, params, config, logits, hidden, before)
        return logits, hidden, score, out.cache

    def deep_fn(cache, queries, num_new, rows=None):
        out = t5.decoder_blocks(
            params, config, cache, queries, start=Ls, stop=L, num_new=num_new, rows=rows
        )
        return out.hidden, out.cache

    drafting = spd.drafts(max_wait, wait_mode)
    every_position = spd.head_at_every_position(mode, record_agreement, drafting)
    result = spd.spd_search(
        shallow_fn,
        deep_fn,
        lambda hidden: t5.exit_head(params, config, hidden),
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
        row_buckets=spd.row_buckets(B),
        chunk_positions=spd.chunk_positions(B, every_position=every_position),
    )
    return result if keep_cache else result.replace(cache=None)


def check_shallow_head(shallow_head: str | None) -> None:
    """Raises `InputError` unless `shallow_head` is one of `SHALLOW_HEADS`."""
    if shallow_head not in SHALLOW_HEADS:
        raise InputError(
            f"shallow_head={shallow_head!r} is not known; valid: {SHALLOW_HEADS} "
            "(None: the model's own head)."
        )


@dataclasses.dataclass(frozen=True)
class FreeSettings:
    exit_layer: int
    threshold: Any  # float32[] (NumPy, or traced)
    confidence: str
    buffer_capacity: int
    mode: str
    record_agreement: bool
    rollback_margin: float
    max_wait: int
    wait_mode: str
    shallow_head: str | None
    # The adaptive `ThresholdEstimator`, or None; host-side only (`finish`), so not part of the
    # settings' equality and hash, which select a compiled program on a mesh.
    estimator: Any = dataclasses.field(compare=False)


class Free(Method):
    name = "free"

    def plan(self, model: Model, options: DecodeOptions, max_new_tokens: int) -> FreeSettings:
        L = model.config.num_decoder_layers
        exit_layer = resolve_exit_layer(model, self.name, options.exit_layer, high=L - 1)
        threshold = resolve_threshold(model, options.threshold)
        confidence = resolve_confidence(model, options.confidence)
        mode, wait_mode = options.mode, options.wait_mode
        if mode not in MODES:
            raise InputError(f"mode={mode!r} is not known; valid modes: {MODES}.")
        capacity = options.buffer_capacity
        if capacity is None:
            capacity = free_settings(model).get("buffer_capacity")
        if capacity is None:  # unbounded: a row never has more than T pending tokens
            capacity = int(max_new_tokens)
        capacity = check_int("buffer_capacity", capacity, 1)
        max_wait = check_int("max_wait", options.max_wait, 0)
        if wait_mode not in spd.WAIT_MODES:
            raise InputError(f"wait_mode={wait_mode!r} is not known; valid: {spd.WAIT_MODES}.")
        if wait_mode == "draft" and mode == "rollback":
            raise InputError(
                "wait_mode='draft' works with mode='default' or 'exact', not 'rollback' (whose "
                "output depends on when deep passes run); use wait_mode='hold'."
            )
        margin = options.rollback_margin
        margin_ok = isinstance(margin, int | float) and not isinstance(margin, bool)
        if not margin_ok or not 0.0 <= margin <= 1.0:
            raise InputError(
                f"rollback_margin must be a number in [0, 1] (a difference of probabilities), "
                f"got {margin!r}."
            )
        check_shallow_head(options.shallow_head)
        record = bool(options.record_agreement)
        estimator = _as_estimator(threshold, confidence)
        if estimator is not None:
            threshold, record = estimator.threshold, True
        return FreeSettings(
            exit_layer=exit_layer,
            threshold=check_threshold(threshold, confidence),
            confidence=confidence,
            buffer_capacity=capacity,
            mode=mode,
            record_agreement=record,
            rollback_margin=float(margin),
            max_wait=max_wait,
            wait_mode=wait_mode,
            shallow_head=options.shallow_head,
            estimator=estimator,
        )

    def run(self, s: FreeSettings, call: DecodeCall) -> spd.SpdResult:
        params = call.params
        if s.shallow_head is not None:
            params = {**params, SHALLOW_HEAD_KEY: call.model.int8_exit_head}
        return free_decode(
            params,
            call.encoder_output,
            call.encoder_mask,
            s.threshold,
            config=call.config,
            exit_layer=s.exit_layer,
            buffer_capacity=s.buffer_capacity,
            mode=s.mode,
            confidence=s.confidence,
            record_agreement=s.record_agreement,
            rollback_margin=s.rollback_margin,
            max_wait=s.max_wait,
            wait_mode=s.wait_mode,
            **call.lengths,
        )

    def fetch(self, s: FreeSettings, result: spd.SpdResult) -> dict[str, Any]:
        return {
            "confidence": result.confidence,
            "passes": result.num_deep_passes,
            "pass_tokens": result.pass_tokens,
            "pass_rows": result.pass_rows,
            "exited": result.exited,
            "agree": result.agree,
        }

    def report(
        self, s: FreeSettings, got: dict[str, Any], generated: np.ndarray, config: T5Config
    ) -> Report:
        exited = got["exited"] & generated
        passes = int(got["passes"])
        return Report(
            exited=exited,
            exit_layer=np.where(exited, s.exit_layer, config.num_decoder_layers),
            confidence=np.where(generated, got["confidence"], np.nan).astype(np.float32),
            agree=got["agree"],
            num_deep_passes=passes,
            deep_pass_tokens=got["pass_tokens"][:passes],
            deep_pass_rows=got["pass_rows"][:passes],
        )

    def finish(self, s: FreeSettings, output: Any) -> None:
        if s.estimator is None:
            return
        # One estimator input per row: its tokens' confidences and their agreement where a deep
        # pass saw them. Rows of a batch share the threshold they were decoded with.
        for row in range(output.tokens.shape[0]):
            seen = output.agree[row] >= 0
            s.estimator.update(output.confidence[row], output.agree[row] == 1, mask=seen)


def _as_estimator(threshold: Any, confidence: str) -> Any:
    """The `ThresholdEstimator` passed as `threshold`, or None for a plain threshold."""
    if is_plain_threshold(threshold):
        return None
    if isinstance(threshold, str):
        raise InputError(
            f"threshold={threshold!r}: pass a number, a float32 array, or a "
            "free_jax.ThresholdEstimator for the adaptive threshold (it updates after each call)."
        )
    from free_jax.threshold import ThresholdEstimator  # imported on demand: TFP is slow to load

    if not isinstance(threshold, ThresholdEstimator):
        return None  # check_threshold reports what is wrong with it
    if confidence not in ("softmax_diff", "softmax_max"):
        raise InputError(
            f"the adaptive threshold models confidences in [0, 1]; confidence={confidence!r} is "
            "not one; use 'softmax_diff' or 'softmax_max'."
        )
    return threshold
