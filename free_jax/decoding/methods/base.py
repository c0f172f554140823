"""The interface every decoding method implements, and the option checks methods share.

`decode` (in `free_jax.decoding.api`) does what every method needs, in order: it checks the
lengths, asks the method to `plan` (validate its own options, filling in the model's saved
defaults), prepares and encodes the inputs, calls the method's `run` on the encoded source
(the method's jitted core), fetches the arrays the method names in `fetch` in one transfer,
and lets the method `report` its diagnostics and `finish` (e.g. feed the adaptive threshold).
A method therefore lives in one module, and `methods.REGISTRY` names it.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

import jax
import numpy as np

from free_jax.errors import InputError
from free_jax.models.config import T5Config
from free_jax.models.model import Model

# The `decode` arguments a checkpoint's `metadata["free"]` may set as its defaults.
FREE_SETTINGS = ("exit_layer", "threshold", "confidence", "buffer_capacity")


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """The method-specific `decode` arguments, as the caller gave them (None: not given).

    `decode`'s docstring describes each; a method reads the ones it takes and ignores the rest.
    """

    exit_layer: int | None = None
    threshold: Any = None
    confidence: str | None = None
    buffer_capacity: int | None = None
    mode: str = "default"
    record_agreement: bool = False
    rollback_margin: float = 0.1
    max_wait: int = 0
    wait_mode: str = "hold"
    calm_tau: float | None = None
    shallow_head: str | None = None


@dataclasses.dataclass(frozen=True)
class DecodeCall:
    """What `decode` hands a method's `run`: the encoded source and the lengths.

    Attributes:
      model: the model (its `config`, `params` and tokenizer).
      params: the decode-layout weights (`Model.decode_params`).
      encoder_output: [B, S, D]; encoder_mask: int32[B, S] (S the padded encoder length).
      input_ids, attention_mask: int32[B, S'] the prepared source (for teacher-forced analysis).
      max_new_tokens, min_new_tokens: the output length bounds (static for the jitted cores).
    """

    model: Model
    params: Any
    encoder_output: jax.Array
    encoder_mask: jax.Array
    input_ids: np.ndarray
    attention_mask: np.ndarray
    max_new_tokens: int
    min_new_tokens: int

    @property
    def config(self) -> T5Config:
        return self.model.config

    @property
    def lengths(self) -> dict[str, int]:
        return {"max_new_tokens": self.max_new_tokens, "min_new_tokens": self.min_new_tokens}


@dataclasses.dataclass(frozen=True)
class Report:
    """A method's per-token diagnostics, host arrays over [B, T] (see `DecodeOutput`)."""

    exited: np.ndarray
    exit_layer: np.ndarray
    confidence: np.ndarray
    agree: np.ndarray
    num_deep_passes: int
    deep_pass_tokens: np.ndarray
    deep_pass_rows: np.ndarray


class Method(abc.ABC):
    """A decoding method. Subclasses set `name` and implement `plan`, `run` and `report`.

    `plan(model, options, max_new_tokens)` returns a settings object (any frozen value) or
    raises `InputError`; `run(settings, call)` returns the jitted core's result (device arrays);
    `fetch(settings, result)` names the arrays `report` needs beyond tokens, lengths and steps;
    `report(settings, got, generated, config)` turns them, fetched to the host with `tokens`,
    `lengths` and `steps`, into a `Report` (`generated`: bool[B, T], the positions each row
    generated). `outputs(settings, result)` is what `decode` fetches: tokens, lengths, steps
    and `fetch`'s arrays. On a mesh (`free_jax.decoding.mesh`) `run` is traced once per data
    shard with that shard's rows, `outputs` is fetched per shard and `report` runs per shard;
    a method whose `run` reads `call.model.params`, `call.input_ids` or
    `call.attention_mask` sets `reads_source` (else they are not handed to the devices).
    """

    name: ClassVar[str]
    #: `run` reads the model's own parameters and the source ids (teacher-forced analysis).
    reads_source: ClassVar[bool] = False

    @abc.abstractmethod
    def plan(self, model: Model, options: DecodeOptions, max_new_tokens: int) -> Any: ...

    @abc.abstractmethod
    def run(self, settings: Any, call: DecodeCall) -> Any: ...

    def fetch(self, settings: Any, result: Any) -> dict[str, Any]:
        return {}

    def outputs(self, settings: Any, result: Any) -> dict[str, Any]:
        """The arrays `decode` fetches: `tokens`, `lengths`, `steps` and `fetch`'s."""
        wanted = {"tokens": result.tokens, "lengths": result.lengths, "steps": result.steps}
        return wanted | self.fetch(settings, result)

    @abc.abstractmethod
    def report(
        self, settings: Any, got: dict[str, Any], generated: np.ndarray, config: T5Config
    ) -> Report: ...

    def finish(self, settings: Any, output: Any) -> None:
        """Called with the finished `DecodeOutput` (the adaptive threshold learns from it)."""
        return None


# ---------------------------------------------------------------------------- shared checks


def check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    ok = not isinstance(value, bool) and isinstance(value, int | np.integer)
    if not ok or value < low or (high is not None and value > high):
        valid = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise InputError(f"{name} must be an integer {valid}, got {value!r}.")
    return int(value)


def free_settings(model: Model) -> dict[str, Any]:
    """The FREE settings a checkpoint was saved with (`exit_layer`, `threshold`, `confidence`,
    `buffer_capacity`), from `Model.metadata["free"]`; empty when it has none."""
    settings = model.metadata.get("free", {}) if model.metadata else {}
    return {k: settings[k] for k in FREE_SETTINGS if k in settings}


def default_exit_layer(config: T5Config) -> int:
    """L_s when none is given: a quarter of the decoder (the paper's 6 of 24), at least 1."""
    return max(1, config.num_decoder_layers // 4)


def resolve_exit_layer(model: Model, method: str, exit_layer: int | None, high: int) -> int:
    """The exit layer in [1, high]: the given one, else the checkpoint's, else L // 4."""
    L = model.config.num_decoder_layers
    if high < 1:
        raise InputError(f"method={method!r} needs at least 2 decoder blocks; this model has {L}.")
    if exit_layer is None:
        exit_layer = free_settings(model).get("exit_layer", default_exit_layer(model.config))
    return check_int("exit_layer", exit_layer, 1, high)


def resolve_confidence(model: Model, confidence: str | None) -> str:
    """The confidence measure: the given one, else the checkpoint's, else "softmax_diff"."""
    from free_jax.decoding.confidence import CONFIDENCES
    from free_jax.models.exit_classifier import KEY, has_exit_classifier

    if confidence is None:
        confidence = free_settings(model).get("confidence", "softmax_diff")
    if confidence not in CONFIDENCES:
        raise InputError(f"confidence={confidence!r} is not known; valid: {CONFIDENCES}.")
    if confidence == "meta" and not has_exit_classifier(model.params):
        raise InputError(
            "confidence='meta' needs a model with a trained exit classifier head "
            f"(params[{KEY!r}]), and this model has none; train one "
            "(free_jax.training, objective 'meta') or use 'softmax_diff', 'softmax_max' or "
            "'state_cosine'."
        )
    return confidence


def resolve_threshold(model: Model, threshold: Any) -> Any:
    """The threshold as given, else the checkpoint's, else 0.9 (not yet checked)."""
    return free_settings(model).get("threshold", 0.9) if threshold is None else threshold


def check_threshold(threshold: Any, confidence: str) -> np.ndarray | jax.Array:
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


def is_plain_threshold(threshold: Any) -> bool:
    """A number or an array (not an adaptive estimator, not a string)."""
    return isinstance(threshold, int | float | np.ndarray | np.generic | jax.Array)


# ---------------------------------------------------------------------------- shared reports


def fixed_depth_report(
    lengths: np.ndarray, depth: np.ndarray | int, *, exited: np.ndarray, passes: int
) -> Report:
    """The report of a method that decides nothing per token: no confidence, no agreement data;
    each of its first `passes` steps is a deep pass over the rows still generating."""
    B, T = exited.shape
    active_per_step = (np.arange(T)[:, None] < lengths[None, :]).sum(axis=1)
    return Report(
        exited=exited,
        exit_layer=np.broadcast_to(depth, (B, T)),
        confidence=np.full((B, T), np.nan, np.float32),
        agree=np.full((B, T), -1, np.int8),
        num_deep_passes=passes,
        deep_pass_tokens=active_per_step[:passes].astype(np.int32),
        deep_pass_rows=active_per_step[:passes].astype(np.int32),
    )
