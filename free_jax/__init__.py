"""free_jax: FREE (Fast and Robust Early-Exiting) decoding for T5-family models in JAX/Flax.

Public API:

* `load(path_or_name, dtype=None) -> Model`: a Hugging Face T5 / mT5 / LongT5 checkpoint
  (directory or hub name) or one written by `save`.
* `save(model, path)`, `export_hf(model, path)`: our orbax format; back to Hugging Face format.
* `decode(model, inputs, method="full", ...) -> DecodeOutput`: batched greedy decoding.
* `forward(model, input_ids, decoder_input_ids, exit_layer=None)`: teacher-forced logits.
* The adaptive threshold estimator (`ThresholdEstimator`, `BetaMixture`, ...) from
  `free_jax.threshold`; it is imported on first use, since TensorFlow Probability is slow to import.
"""

from __future__ import annotations

import importlib
from typing import Any

from free_jax import _moved, errors
from free_jax.checkpoints import export_hf, load, save
from free_jax.decoding import METHODS, DecodeOutput, decode
from free_jax.errors import CheckpointError, ConfigError, InputError
from free_jax.models.config import T5Config
from free_jax.models.model import Model, forward

__version__ = "0.1.0"

_THRESHOLD_NAMES = (
    "BetaMixture",
    "FitResult",
    "FitStatus",
    "FitWarning",
    "RefitRecord",
    "ThresholdConfig",
    "ThresholdEstimator",
    "ThresholdResult",
    "fit_from_file",
    "load_agreement_data",
    "plot_mixture",
    "plot_trajectory",
)

__all__ = [
    "METHODS",
    "CheckpointError",
    "ConfigError",
    "DecodeOutput",
    "InputError",
    "Model",
    "T5Config",
    "decode",
    "errors",
    "export_hf",
    "forward",
    "load",
    "save",
    *_THRESHOLD_NAMES,
]


_moved.install()


def __getattr__(name: str) -> Any:
    if name in _THRESHOLD_NAMES:
        return getattr(importlib.import_module("free_jax.threshold"), name)
    if f"free_jax.{name}" in _moved.MOVED:  # `from free_jax import modeling`, say
        return _moved.resolve(f"free_jax.{name}")
    raise AttributeError(f"module 'free_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
