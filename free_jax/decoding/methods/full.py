"""Method "full": every token runs all L decoder blocks (the speed-up denominator)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from free_jax.decoding.methods.base import (
    DecodeCall,
    DecodeOptions,
    Method,
    Report,
    fixed_depth_report,
)
from free_jax.decoding.search import GreedyResult, greedy_search
from free_jax.decoding.xla_options import decode_jit
from free_jax.models import t5
from free_jax.models.config import T5Config
from free_jax.models.model import Model


def greedy_through(
    params,
    encoder_output,
    encoder_mask,
    *,
    config,
    stop,
    max_new_tokens,
    min_new_tokens,
    keep_cache,
) -> GreedyResult:
    """Greedy decoding through decoder blocks [0, stop) and the exit head (not jitted)."""
    B = encoder_output.shape[0]
    params, cache = t5.start_decoding(
        params, config, encoder_output, encoder_mask, max_new_tokens, num_layers=stop
    )

    def step(cache, tokens, _):
        x = t5.embed(params, tokens[:, None])  # [B, 1, D]
        out = t5.decoder_blocks(params, config, cache, x, start=0, stop=stop)
        return t5.exit_head(params, config, out.hidden[:, 0]), out.cache

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


@decode_jit(static_argnames=("config", "max_new_tokens", "min_new_tokens", "keep_cache"))
def greedy_full(
    params: t5.Params,
    encoder_output: jax.Array,
    encoder_mask: jax.Array,
    *,
    config: T5Config,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    keep_cache: bool = False,
) -> GreedyResult:
    """Full-model greedy decoding, jitted. Returns a `search.GreedyResult`.

    Args:
      params: the parameters, in either layout (`Model.decode_params` saves a rearrangement).
      encoder_output: [B, S, D] from `encode_source`.
      encoder_mask: int32[B, S], 1 for real source positions.
      keep_cache: return the final decoder cache in `GreedyResult.cache` (else None: at batch 1
        every returned array is a buffer the call allocates and hands back, which shows in the
        per-call cost).
    """
    return greedy_through(
        params,
        encoder_output,
        encoder_mask,
        config=config,
        stop=config.num_decoder_layers,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        keep_cache=keep_cache,
    )


class Full(Method):
    name = "full"

    def plan(self, model: Model, options: DecodeOptions, max_new_tokens: int) -> None:
        return None

    def run(self, settings: None, call: DecodeCall) -> GreedyResult:
        return greedy_full(
            call.params, call.encoder_output, call.encoder_mask, config=call.config, **call.lengths
        )

    def report(
        self, settings: None, got: dict[str, Any], generated: np.ndarray, config: T5Config
    ) -> Report:
        return fixed_depth_report(
            got["lengths"],
            config.num_decoder_layers,
            exited=np.zeros_like(generated),
            passes=int(got["steps"]),
        )
