"""Method "oracle" (analysis): full-model tokens, each labelled with the shallowest exit that
predicts it (`DecodeOutput.exit_layer`): the exit rate a perfect confidence measure would reach."""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from free_jax.decoding.methods.base import (
    DecodeCall,
    DecodeOptions,
    Method,
    Report,
    fixed_depth_report,
)
from free_jax.decoding.methods.full import greedy_full
from free_jax.models import t5
from free_jax.models.config import T5Config
from free_jax.models.model import Model


@functools.partial(jax.jit, static_argnames=("config",))
def oracle_exit_layers(params, input_ids, attention_mask, tokens, *, config):
    """int32[B, T]: for each generated token, the fewest decoder blocks whose exit predicts it.

    Teacher-forced over the tokens full greedy decoding emitted, which is exactly what the decode
    loop computed at every position (tested in test_decode.py), with every block's exit applied.
    """
    start = jnp.full((tokens.shape[0], 1), config.decoder_start_token_id, tokens.dtype)
    dec = jnp.concatenate([start, tokens[:, :-1]], axis=1)
    out = t5.forward(params, config, input_ids, dec, attention_mask, return_block_states=True)
    preds = jnp.stack(
        [jnp.argmax(t5.exit_head(params, config, h), axis=-1) for h in out.block_states]
    )  # [L, B, T]
    return (jnp.argmax(preds == preds[-1][None], axis=0) + 1).astype(jnp.int32)


@flax.struct.dataclass
class OracleResult:
    """Full greedy decoding's `tokens` int32[B, T], `lengths` int32[B], `steps` int32[], and
    `exit_layer` int32[B, T] from `oracle_exit_layers`."""

    tokens: jax.Array
    lengths: jax.Array
    steps: jax.Array
    exit_layer: jax.Array


class Oracle(Method):
    name = "oracle"
    reads_source = True

    def plan(self, model: Model, options: DecodeOptions, max_new_tokens: int) -> None:
        return None

    def run(self, settings: None, call: DecodeCall) -> OracleResult:
        result = greedy_full(
            call.params, call.encoder_output, call.encoder_mask, config=call.config, **call.lengths
        )
        layers = oracle_exit_layers(
            call.model.params,
            call.input_ids,
            call.attention_mask,
            result.tokens,
            config=call.config,
        )
        return OracleResult(result.tokens, result.lengths, result.steps, layers)

    def fetch(self, settings: None, result: OracleResult) -> dict[str, Any]:
        return {"layer": result.exit_layer}

    def report(
        self, settings: None, got: dict[str, Any], generated: np.ndarray, config: T5Config
    ) -> Report:
        layer = np.asarray(got["layer"])
        exited = (layer < config.num_decoder_layers) & generated
        return fixed_depth_report(got["lengths"], layer, exited=exited, passes=int(got["steps"]))
