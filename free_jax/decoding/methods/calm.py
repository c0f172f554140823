"""Method "calm": the CALM baseline (`calm_search`): each token exits at the first
block from `exit_layer` up whose confidence beats a position-decaying threshold; skipped blocks
get their K/V by state copying."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from free_jax.decoding import calm_search
from free_jax.decoding.methods.base import (
    DecodeCall,
    DecodeOptions,
    Method,
    Report,
    check_threshold,
    is_plain_threshold,
    resolve_confidence,
    resolve_exit_layer,
    resolve_threshold,
)
from free_jax.errors import InputError
from free_jax.models.config import T5Config
from free_jax.models.model import Model


@dataclasses.dataclass(frozen=True)
class CalmSettings:
    exit_layer: int
    threshold: Any  # float32[] (NumPy, or traced)
    confidence: str
    tau: float | None


class Calm(Method):
    name = "calm"

    def plan(self, model: Model, options: DecodeOptions, max_new_tokens: int) -> CalmSettings:
        L = model.config.num_decoder_layers
        exit_layer = resolve_exit_layer(model, self.name, options.exit_layer, high=L - 1)
        threshold = resolve_threshold(model, options.threshold)
        confidence = resolve_confidence(model, options.confidence)
        if not is_plain_threshold(threshold):
            raise InputError(
                f"method='calm' takes a number or a float32 array as threshold, got "
                f"{type(threshold).__name__}; the adaptive ThresholdEstimator is for 'free'."
            )
        tau = options.calm_tau
        if tau is not None:
            tau_ok = isinstance(tau, int | float) and not isinstance(tau, bool)
            if not tau_ok or not np.isfinite(tau) or tau < 0:
                raise InputError(
                    f"calm_tau must be a finite number >= 0 (or None for no decay), got {tau!r}."
                )
            tau = float(tau)
        return CalmSettings(exit_layer, check_threshold(threshold, confidence), confidence, tau)

    def run(self, settings: CalmSettings, call: DecodeCall) -> calm_search.CalmResult:
        return calm_search.calm_decode(
            call.params,
            call.encoder_output,
            call.encoder_mask,
            settings.threshold,
            config=call.config,
            min_layer=settings.exit_layer,
            confidence=settings.confidence,
            tau=settings.tau,
            **call.lengths,
        )

    def fetch(self, settings: CalmSettings, result: calm_search.CalmResult) -> dict[str, Any]:
        return {
            "confidence": result.confidence,
            "passes": result.num_deep_passes,
            "pass_tokens": result.pass_tokens,
            "layer": result.exit_layer,
        }

    def report(
        self, settings: CalmSettings, got: dict[str, Any], generated: np.ndarray, config: T5Config
    ) -> Report:
        layer = got["layer"]
        passes = int(got["passes"])
        return Report(
            exited=(layer < config.num_decoder_layers) & generated,
            exit_layer=layer,
            confidence=np.where(generated, got["confidence"], np.nan).astype(np.float32),
            agree=np.full(generated.shape, -1, np.int8),
            num_deep_passes=passes,
            deep_pass_tokens=got["pass_tokens"][:passes],
            # A row that runs every block does so at one position: rows == positions.
            deep_pass_rows=got["pass_tokens"][:passes],
        )
