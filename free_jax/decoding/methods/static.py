"""Method "static": every token exits after block `exit_layer` (static exiting)."""

from __future__ import annotations

from typing import Any

import numpy as np

from free_jax.decoding.methods.base import (
    DecodeCall,
    DecodeOptions,
    Method,
    Report,
    fixed_depth_report,
    resolve_exit_layer,
)
from free_jax.decoding.methods.full import greedy_through
from free_jax.decoding.search import GreedyResult
from free_jax.decoding.xla_options import decode_jit
from free_jax.models.config import T5Config
from free_jax.models.model import Model


@decode_jit(
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
) -> GreedyResult:
    """Greedy decoding where every token exits after block `exit_layer` (static exiting); the
    arguments are `greedy_full`'s."""
    return greedy_through(
        params,
        encoder_output,
        encoder_mask,
        config=config,
        stop=exit_layer,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        keep_cache=keep_cache,
    )


class Static(Method):
    name = "static"

    def plan(self, model: Model, options: DecodeOptions, max_new_tokens: int) -> int:
        L = model.config.num_decoder_layers
        return resolve_exit_layer(model, self.name, options.exit_layer, high=L)

    def run(self, exit_layer: int, call: DecodeCall) -> GreedyResult:
        return greedy_static(
            call.params,
            call.encoder_output,
            call.encoder_mask,
            config=call.config,
            exit_layer=exit_layer,
            **call.lengths,
        )

    def report(
        self, exit_layer: int, got: dict[str, Any], generated: np.ndarray, config: T5Config
    ) -> Report:
        return fixed_depth_report(got["lengths"], exit_layer, exited=generated, passes=0)
