"""Decoding: `decode` and the methods it runs (full, static, oracle, CALM, FREE).

Owns: the public `decode`, `DecodeOutput`, input preparation and the encoder call (`api`); the
method registry and one module per method, each with its jitted core (`methods`); the loops the
methods run, which see the network only through narrow callables (`search`: greedy search over
a step function; `spd`: FREE's synchronized parallel decoding; `calm_search`: CALM's per-block
exits); the exit confidences FREE and CALM share (`confidence`); and the XLA options every
decode program compiles with, scoped to that program (`xla_options.decode_jit`).

May import: `free_jax.models`, `free_jax.threshold` (the adaptive threshold) and
`free_jax.errors`; never checkpoints, data, evaluation, training or cli.
"""

from free_jax.decoding.api import (
    METHODS,
    SOURCE_BUCKET,
    DecodeOutput,
    decode,
    encode_source,
    prepare_inputs,
)
from free_jax.decoding.methods.base import FREE_SETTINGS, default_exit_layer, free_settings
from free_jax.decoding.methods.free import MODES, free_decode
from free_jax.decoding.methods.full import greedy_full
from free_jax.decoding.methods.oracle import oracle_exit_layers
from free_jax.decoding.methods.static import greedy_static

__all__ = [
    "FREE_SETTINGS",
    "METHODS",
    "MODES",
    "SOURCE_BUCKET",
    "DecodeOutput",
    "decode",
    "default_exit_layer",
    "encode_source",
    "free_decode",
    "free_settings",
    "greedy_full",
    "greedy_static",
    "oracle_exit_layers",
    "prepare_inputs",
]
