"""The "meta" exit classifier: a small head that predicts whether an early exit is safe.

CALM's learned confidence measure, used by FREE as an alternative to softmax confidences: an MLP
`Linear(D, D) - ReLU - Linear(D, 2)` over the exit's normalised hidden state (the decoder's final
RMS norm applied, which is what the LM head reads; no v1.0 rescale). Class 1 means "the exit's
arg-max equals the full model's", and the confidence is that class's probability, so a higher
threshold exits less, as with every other measure. It is trained with the backbone frozen
(`free_jax.training.losses.meta_classifier_loss`) and lives in the parameter tree under the
top-level key `exit_classifier`:

    exit_classifier/hidden/kernel [D, D], hidden/bias [D]
    exit_classifier/out/kernel    [D, 2], out/bias    [2]
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from free_jax.models.config import T5Config

KEY = "exit_classifier"

Params = dict[str, Any]


def init_exit_classifier(config: T5Config, rng: jax.Array, dtype: Any = jnp.float32) -> Params:
    """Random exit-classifier parameters (LeCun-normal kernels, zero biases)."""
    D = config.d_model
    k_hidden, k_out = jax.random.split(rng)
    return {
        "hidden": {
            "kernel": (jax.random.normal(k_hidden, (D, D), jnp.float32) * D**-0.5).astype(dtype),
            "bias": jnp.zeros((D,), dtype),
        },
        "out": {
            "kernel": (jax.random.normal(k_out, (D, 2), jnp.float32) * D**-0.5).astype(dtype),
            "bias": jnp.zeros((2,), dtype),
        },
    }


def has_exit_classifier(params: Params) -> bool:
    """Whether a parameter tree carries a trained exit classifier."""
    return KEY in params


def normalised_exit_state(params: Params, config: T5Config, hidden: jax.Array) -> jax.Array:
    """The decoder's final RMS norm of a residual stream: the exit classifier's input."""
    from free_jax.models.t5 import rms_norm  # modeling imports nothing from here; avoid a cycle

    return rms_norm(hidden, params["decoder"]["final_norm"], config.layer_norm_epsilon)


def exit_classifier_logits(classifier: Params, normed: jax.Array) -> jax.Array:
    """float32[..., 2] logits (class 1: exiting is safe) from normalised states [..., D]."""
    x = normed.astype(jnp.float32)
    h = x @ classifier["hidden"]["kernel"].astype(jnp.float32)
    h = jax.nn.relu(h + classifier["hidden"]["bias"].astype(jnp.float32))
    out = h @ classifier["out"]["kernel"].astype(jnp.float32)
    return out + classifier["out"]["bias"].astype(jnp.float32)


def exit_classifier_confidence(params: Params, config: T5Config, hidden: jax.Array) -> jax.Array:
    """float32[...] probability that exiting here is safe, from residual streams [..., D]."""
    normed = normalised_exit_state(params, config, hidden)
    logits = exit_classifier_logits(params[KEY], normed)
    return jax.nn.softmax(logits, axis=-1)[..., 1]
