"""Choosing FREE's threshold so that it keeps its promise on text it was not chosen on.

A threshold is saved with a model as a promise: FREE at that threshold keeps at least `level`
(99%) of the full model's quality. One sample's point estimate does not keep it on the next
sample (the demo's threshold 0.2 kept 99.5% of 100 test sentences and 98.8% of the validation
split). `choose_threshold` decodes a whole split with the full model and with FREE at each
candidate threshold, and takes the lowest (fastest) threshold whose quality ratio has a
one-sided `confidence` (95%) bootstrap lower bound of at least `level`: sentences are resampled
with replacement, the same resample for both methods (a paired bootstrap), and the corpus
metric is recomputed on each. Thresholds above the chosen one need not all qualify (quality is
not monotone in the threshold); the choice is the lowest qualifying one.

Quality does not depend on the batch size (FREE's default mode decodes each row as it would
alone), so the split is decoded in large batches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from free_jax.data import Examples, batching, metrics
from free_jax.decoding import decode
from free_jax.errors import InputError
from free_jax.models.model import Model

DEFAULT_CANDIDATES = (0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)


@dataclasses.dataclass(frozen=True)
class ThresholdCheck:
    """One candidate: its quality, share of the full model's, and that share's lower bound."""

    threshold: float
    quality: float
    share: float
    lower_bound: float
    exit_rate: float


@dataclasses.dataclass(frozen=True)
class ThresholdChoice:
    """The outcome of `choose_threshold`; `threshold` is None when no candidate qualifies."""

    threshold: float | None
    metric: str
    full_quality: float
    level: float
    confidence: float
    num_examples: int
    num_resamples: int
    checks: tuple[ThresholdCheck, ...]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _decode_split(model: Model, examples: Examples, batch_size: int, **kwargs) -> tuple:
    """Texts and exit counts of the whole split decoded with `decode(**kwargs)`."""
    texts: list[str] = []
    exited = generated = 0
    max_new = examples.task.max_target_length
    for batch in batching.eval_batches(examples, batch_size):
        real = batch.example_ids >= 0
        out = decode(
            model,
            batch.arrays["input_ids"][real],
            attention_mask=batch.arrays["attention_mask"][real],
            max_new_tokens=max_new,
            **kwargs,
        )
        texts.extend(out.texts)
        exited += int(out.exited.sum())
        generated += int(out.lengths.sum())
    return texts, exited / max(generated, 1)


def _bootstrap_indices(n: int, num_resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(num_resamples, n))


class _Scorer:
    """The corpus metric on index resamples: from per-sentence counts where the metric is
    micro-averaged (punctuation F1), else by recomputing it on each resample."""

    def __init__(self, metric: str, references: Sequence[Any]) -> None:
        self.metric = metric
        self.references = list(references)

    def per_sentence(self, texts: Sequence[str]) -> np.ndarray | None:
        if self.metric != "punct_f1":
            return None
        refs = [r if isinstance(r, str) else (r[0] if r else "") for r in self.references]
        return np.array(
            [metrics.punctuation_counts(t, r) for t, r in zip(texts, refs, strict=True)], float
        )

    def corpus(self, texts: Sequence[str], counts: np.ndarray | None, index: np.ndarray):
        """The metric over resampled sentences `index` ([R, n] or [n]) -> [R] or scalar."""
        if counts is not None:
            tp, fp, fn = np.moveaxis(counts[index].sum(axis=-2), -1, 0)
            p = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=tp + fp > 0)
            r = np.divide(tp, tp + fn, out=np.zeros_like(tp), where=tp + fn > 0)
            return 100 * np.divide(2 * p * r, p + r, out=np.zeros_like(p), where=p + r > 0)
        rows = np.atleast_2d(index)
        scores = [
            metrics.compute(
                self.metric, [texts[i] for i in row], [self.references[i] for i in row]
            )[self.metric]
            for row in rows
        ]
        return np.asarray(scores) if index.ndim == 2 else scores[0]


def choose_threshold(
    model: Model,
    examples: Examples,
    *,
    candidates: Sequence[float] = DEFAULT_CANDIDATES,
    level: float = 0.99,
    confidence: float = 0.95,
    num_resamples: int = 1000,
    seed: int = 0,
    batch_size: int = 64,
    metric: str | None = None,
    progress: bool = False,
    **free_options: Any,
) -> ThresholdChoice:
    """The lowest threshold whose quality share keeps `level` with `confidence` (see module).

    Args:
      model, examples: the model and the split to choose on (validation, not test).
      candidates: thresholds to try.
      level: the promised share of the full model's quality (0.99).
      confidence: of the one-sided bootstrap lower bound (0.95: its 5th percentile).
      num_resamples: bootstrap resamples (metrics other than punctuation F1 recompute the
        metric on each, which is slow: use fewer).
      batch_size: decoding batch size (quality does not depend on it).
      metric: the quality metric; default the task's.
      free_options: more `decode` arguments for FREE (exit_layer, confidence, ...).
    """
    if not 0 < level <= 1 or not 0 < confidence < 1:
        raise InputError(f"level={level} must be in (0, 1] and confidence={confidence} in (0, 1).")
    if num_resamples < 1 or not candidates:
        raise InputError("num_resamples must be >= 1 and candidates non-empty.")
    metric = metric or examples.task.metric
    scorer = _Scorer(metric, examples.references)
    full_texts, _ = _decode_split(model, examples, batch_size, method="full")
    full_counts = scorer.per_sentence(full_texts)
    n = len(full_texts)
    index = _bootstrap_indices(n, num_resamples, seed)
    full_quality = float(scorer.corpus(full_texts, full_counts, np.arange(n)))
    full_boot = scorer.corpus(full_texts, full_counts, index)
    checks = []
    iterator = sorted(candidates, reverse=True)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="thresholds", unit="threshold")
    for threshold in iterator:
        texts, exit_rate = _decode_split(
            model, examples, batch_size, method="free", threshold=float(threshold), **free_options
        )
        counts = scorer.per_sentence(texts)
        quality = float(scorer.corpus(texts, counts, np.arange(n)))
        ratios = scorer.corpus(texts, counts, index) / np.maximum(full_boot, 1e-9)
        checks.append(
            ThresholdCheck(
                threshold=float(threshold),
                quality=quality,
                share=quality / full_quality if full_quality else 0.0,
                lower_bound=float(np.quantile(ratios, 1 - confidence)),
                exit_rate=exit_rate,
            )
        )
    qualifying = [c.threshold for c in checks if c.lower_bound >= level]
    return ThresholdChoice(
        threshold=min(qualifying) if qualifying else None,
        metric=metric,
        full_quality=full_quality,
        level=level,
        confidence=confidence,
        num_examples=n,
        num_resamples=num_resamples,
        checks=tuple(sorted(checks, key=lambda c: -c.threshold)),
    )
