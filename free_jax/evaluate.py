"""Evaluation harness: the quality and speed of decoding methods on a task's held-out split.

    report = evaluate(model, examples, default_methods(model), sweep=default_sweep(model))
    print(format_table(report))
    write_report(report, "eval_out/")        # report.json and quality_vs_speed.png

What it measures, per method configuration (`MethodSpec`):

* quality: the task's metric (`free_jax.metrics.compute`) on the decoded texts, plus the share of
  outputs equal to the (first) reference and the share equal to the full model's output;
* speed: wall time of the jitted decode per batch (batch size 1 by default, the paper's setting),
  after compilation, summed over the split; with `repeats > 1` each batch is decoded that many
  times and its median is taken. Speed-up is the full model's time over the method's;
* exit rate (tokens emitted from an early exit) and deep passes per generated token (a pass of the
  blocks above the exit: every step for the full model, none for static exiting).

All methods decode every batch before the next batch is taken, so a change in the machine's load
during a run affects them alike. The encoder runs at each batch's own length (rounded up to a
multiple of 16), and its output is padded to one length (the task's maximum, unless
`source_bucket` is given), so each method compiles its decode loop once; compilation happens in
a warm-up on the first batch of each shape and is reported, not timed. `decode` returns NumPy
arrays, so a timed call has finished on the device when it returns.

The adaptive threshold ("free:adaptive") keeps one `ThresholdEstimator` per configuration; it is
updated after each batch outside the timed call, and the time its refits take is reported apart
(`calibration_seconds`).

A threshold sweep (`sweep`, see `default_sweep`) adds quality-versus-speed curves: static exiting
at every exit layer, CALM and FREE over a range of thresholds. `summary` answers the questions of
issue 6: the full model against trivial baselines, the largest speed-up at >= 99% of the full
model's quality per method family, where the other families land at FREE's speed-up, and whether
FREE's exact mode reproduced the full model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from free_jax import data, metrics
from free_jax.decoding import SOURCE_BUCKET, default_exit_layer, free_settings
from free_jax.errors import InputError
from free_jax.model import Model

FAMILIES = ("full", "static", "calm", "free")
MODES = ("default", "exact", "rollback")
SPEC_SYNTAX = (
    "METHOD[:ARG...][@EXIT_LAYER] with METHOD one of full, static, calm, free; ARG a threshold "
    "(calm, free), 'adaptive', 'exact' or 'rollback' (free); e.g. full, static@2, calm:0.9, "
    "free:0.8@2, free:adaptive, free:exact"
)
DEFAULT_THRESHOLDS = (0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
QUALITY_LEVEL = 0.99  # the paper's bar: 99% of the full model's quality
REPORT_FILE = "report.json"
PLOT_FILE = "quality_vs_speed.png"


# ---------------------------------------------------------------------------- method specs


@dataclasses.dataclass(frozen=True, kw_only=True)
class MethodSpec:
    """One decoding configuration to evaluate.

    Attributes:
      method: "full", "static", "calm" or "free".
      exit_layer: static: the exit; calm: the shallowest exit; free: L_s. None: the checkpoint's
        FREE metadata, else `default_exit_layer`.
      threshold: calm and free: the exit threshold; None: the checkpoint's, else 0.9.
      adaptive: free: FREE's adaptive threshold (`ThresholdEstimator`), starting from its
        configuration's initial threshold.
      mode: free: "default", "exact" or "rollback".
      options: more keyword arguments for `free_jax.decode` (confidence, buffer_capacity,
        calm_tau, max_wait, ...), as (name, value) pairs.
      label: the name in tables and plots; default derived from the fields.
    """

    method: str
    exit_layer: int | None = None
    threshold: float | None = None
    adaptive: bool = False
    mode: str = "default"
    options: tuple[tuple[str, Any], ...] = ()
    label: str = ""

    def __post_init__(self) -> None:
        if self.method not in FAMILIES:
            raise InputError(
                f"method {self.method!r} cannot be evaluated; valid: {FAMILIES} ({SPEC_SYNTAX})."
            )
        if self.mode not in MODES:
            raise InputError(f"mode={self.mode!r} is not known; valid: {MODES}.")
        if self.method != "free" and (self.adaptive or self.mode != "default"):
            raise InputError(f"adaptive thresholds and modes are for 'free', not {self.method!r}.")
        if self.method in ("full", "static") and self.threshold is not None:
            raise InputError(f"method {self.method!r} takes no threshold.")
        if self.method == "full" and self.exit_layer is not None:
            raise InputError("method 'full' takes no exit layer.")
        if self.adaptive and self.threshold is not None:
            raise InputError("an adaptive threshold cannot also be fixed; drop one of them.")

    @property
    def name(self) -> str:
        """`label`, else a description such as "free thr=0.80 Ls=2"."""
        if self.label:
            return self.label
        parts = [self.method]
        if self.mode != "default":
            parts.append(self.mode)
        if self.adaptive:
            parts.append("adaptive")
        if self.threshold is not None:
            parts.append(f"thr={self.threshold:.2f}")
        if self.exit_layer is not None:
            parts.append(f"Ls={self.exit_layer}")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["options"] = dict(self.options)
        out["label"] = self.name
        return out


def parse_method(text: str) -> MethodSpec:
    """A `MethodSpec` from its command-line form (`SPEC_SYNTAX`), e.g. "free:0.8@2"."""
    head, _, layer = text.strip().partition("@")
    method, *args = head.split(":")
    if method not in FAMILIES:
        raise InputError(
            f"unknown method {method!r} in {text!r}; valid: {FAMILIES}. {SPEC_SYNTAX}."
        )
    fields: dict[str, Any] = {"method": method}
    if layer:
        if not layer.isdigit():
            raise InputError(f"{text!r}: the exit layer after '@' must be an integer.")
        fields["exit_layer"] = int(layer)
    for arg in args:
        if arg == "adaptive":
            fields["adaptive"] = True
        elif arg in MODES:
            fields["mode"] = arg
        else:
            try:
                fields["threshold"] = float(arg)
            except ValueError:
                raise InputError(f"{text!r}: cannot read {arg!r}. {SPEC_SYNTAX}.") from None
    return MethodSpec(**fields)


def default_methods(model: Model, exit_layer: int | None = None) -> list[MethodSpec]:
    """The table of issue 6: full, static, CALM, FREE (fixed and adaptive threshold), FREE exact.

    Thresholds and the exit layer are the checkpoint's FREE metadata where it has them (see
    `free_jax.decode`); CALM uses the same exit layer and threshold as FREE.
    """
    saved = free_settings(model)
    layer = exit_layer if exit_layer is not None else saved.get("exit_layer")
    layer = layer if layer is not None else default_exit_layer(model.config)
    threshold = float(saved.get("threshold", 0.9))
    return [
        MethodSpec(method="full"),
        MethodSpec(method="static", exit_layer=layer),
        MethodSpec(method="calm", exit_layer=layer, threshold=threshold),
        MethodSpec(method="free", exit_layer=layer, threshold=threshold),
        MethodSpec(method="free", exit_layer=layer, adaptive=True),
        MethodSpec(method="free", exit_layer=layer, threshold=threshold, mode="exact"),
    ]


def default_sweep(
    model: Model,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    exit_layer: int | None = None,
    static_layers: Sequence[int] | None = None,
) -> list[MethodSpec]:
    """Curves: static exiting at `static_layers` (default every layer below the top; each is a
    compilation), CALM and FREE at each threshold (one compilation each)."""
    saved = free_settings(model)
    layer = exit_layer if exit_layer is not None else saved.get("exit_layer")
    layer = layer if layer is not None else default_exit_layer(model.config)
    if static_layers is None:
        static_layers = range(1, model.config.num_decoder_layers)
    specs = [MethodSpec(method="static", exit_layer=int(k)) for k in static_layers]
    for method in ("calm", "free"):
        specs += [
            MethodSpec(method=method, exit_layer=layer, threshold=float(t)) for t in thresholds
        ]
    return specs


# ---------------------------------------------------------------------------- results


@dataclasses.dataclass
class MethodResult:
    """What `evaluate` measured for one `MethodSpec` (times in seconds; rates in [0, 1])."""

    spec: MethodSpec
    quality: dict[str, float]
    exact_match: float
    matches_full: float
    seconds: float
    compile_seconds: float
    tokens: int
    exit_rate: float
    deep_passes_per_token: float
    speedup: float = 1.0
    calibration_seconds: float = 0.0
    final_threshold: float | None = None
    calibration_points: int = 0
    texts: list[str] = dataclasses.field(default_factory=list, repr=False)
    tokens_equal_full: bool = False

    @property
    def family(self) -> str:
        return self.spec.method

    @property
    def ms_per_token(self) -> float:
        return 1e3 * self.seconds / max(self.tokens, 1)

    def to_dict(self, metric: str, keep_texts: bool = False) -> dict[str, Any]:
        out = {
            "label": self.spec.name,
            "family": self.family,
            "spec": self.spec.to_dict(),
            "quality": self.quality[metric],
            "scores": self.quality,
            "exact_match": self.exact_match,
            "matches_full": self.matches_full,
            "tokens_equal_full": self.tokens_equal_full,
            "speedup": self.speedup,
            "seconds": self.seconds,
            "ms_per_token": self.ms_per_token,
            "compile_seconds": self.compile_seconds,
            "tokens": self.tokens,
            "exit_rate": self.exit_rate,
            "deep_passes_per_token": self.deep_passes_per_token,
        }
        if self.spec.adaptive:
            out["calibration_seconds"] = self.calibration_seconds
            out["calibration_points"] = self.calibration_points
            out["final_threshold"] = self.final_threshold
        if keep_texts:
            out["texts"] = self.texts
        return out


@dataclasses.dataclass
class Report:
    """The outcome of `evaluate`: `to_dict()` is the JSON report."""

    task: data.Task
    split: str
    num_examples: int
    metric: str
    methods: list[MethodResult]
    sweep: list[MethodResult]
    baselines: dict[str, dict[str, float]]
    settings: dict[str, Any]
    environment: dict[str, Any]
    model_info: dict[str, Any]
    references: list[Any] = dataclasses.field(default_factory=list, repr=False)

    @property
    def full(self) -> MethodResult:
        return next(r for r in self.methods if r.family == "full")

    def summary(self) -> dict[str, Any]:
        """Issue 6's questions, answered from the measurements."""
        full_q = self.full.quality[self.metric]
        target = QUALITY_LEVEL * full_q
        points = self.methods + self.sweep
        best: dict[str, Any] = {}
        for family in ("static", "calm", "free"):
            ok = [r for r in points if r.family == family and r.quality[self.metric] >= target]
            # exact mode reproduces the full model; it is reported apart from the speed/quality
            # trade-off curve.
            if family == "free":
                ok = [r for r in ok if r.spec.mode == "default"]
            if ok:
                top = max(ok, key=lambda r: r.speedup)
                best[family] = {
                    "label": top.spec.name,
                    "speedup": top.speedup,
                    "quality": top.quality[self.metric],
                    "relative_quality": top.quality[self.metric] / full_q if full_q else None,
                }
            else:
                best[family] = None
        at_free: dict[str, Any] = {}
        if best.get("free"):
            s = best["free"]["speedup"]
            for family in ("static", "calm"):
                members = [
                    (r.speedup, r.quality[self.metric], r.spec.name)
                    for r in points
                    if r.family == family
                ]
                if not members:
                    continue
                # A user who needs FREE's speed picks the family's best setting that is at least
                # as fast; its curve need not be monotone (static exit at a trained exit layer
                # beats deeper untrained ones), so no interpolation between settings.
                top = _best_at_least_as_fast(members, s)
                fastest = max(members)
                at_free[family] = {
                    "speedup": s,
                    "best_at_least_as_fast": (
                        None
                        if top is None
                        else {
                            "label": top[2],
                            "speedup": top[0],
                            "quality": top[1],
                            "relative_quality": top[1] / full_q if full_q else None,
                        }
                    ),
                    "fastest": {"label": fastest[2], "speedup": fastest[0], "quality": fastest[1]},
                }
        exact = [r for r in self.methods if r.family == "free" and r.spec.mode == "exact"]
        baseline_best = max((b[self.metric] for b in self.baselines.values()), default=None)
        return {
            "full_quality": full_q,
            "quality_at_99_percent": target,
            "best_baseline_quality": baseline_best,
            "full_minus_best_baseline": (
                full_q - baseline_best if baseline_best is not None else None
            ),
            "best_speedup_at_99_percent": best,
            "quality_at_free_speedup": at_free,
            "exact_mode_equals_full": (all(r.tokens_equal_full for r in exact) if exact else None),
        }

    def to_dict(self, keep_texts: bool = False) -> dict[str, Any]:
        return {
            "task": {
                "name": self.task.name,
                "metric": self.metric,
                "extra_metrics": list(self.task.extra_metrics),
                "split": self.split,
                "num_examples": self.num_examples,
                "prefix": self.task.prefix,
                "max_source_length": self.task.max_source_length,
                "max_target_length": self.task.max_target_length,
            },
            "model": self.model_info,
            "settings": self.settings,
            "environment": self.environment,
            "baselines": self.baselines,
            "summary": self.summary(),
            "methods": [r.to_dict(self.metric, keep_texts) for r in self.methods],
            "sweep": [r.to_dict(self.metric) for r in self.sweep],
            **({"references": self.references} if keep_texts else {}),
        }


def _best_at_least_as_fast(
    points: Sequence[tuple[float, float, str]], speedup: float
) -> tuple[float, float, str] | None:
    """The (speedup, quality, label) point of highest quality among those with a speed-up of at
    least `speedup`; None when none is that fast."""
    fast = [p for p in points if p[0] >= speedup]
    return max(fast, key=lambda p: (p[1], p[0])) if fast else None


# ---------------------------------------------------------------------------- evaluation


class _Batches:
    """The split's first `n` examples as decode inputs: ([B, S] ids, [B, S] mask, rows) per
    batch, and the encoder length every batch is decoded with.

    Each batch is as long as its longest source (rounded up to `decode`'s multiple), so the
    encoder's cost follows the source. With `source_bucket` None, every batch's encoder output is
    padded to one length (the task's maximum), so each method compiles its decode loop once (the
    encoder compiles once per source length, which is cheap); with an int, batches are padded to
    a multiple of it and the loop compiles once per length used.
    """

    def __init__(self, examples: data.Examples, n: int, batch_size: int, source_bucket: int | None):
        self.batches: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.encoder_lengths: list[int | None] = []
        longest_of_all = max(len(examples.source_ids(i)) for i in range(n))
        fixed = max(examples.task.max_source_length or 0, longest_of_all)
        fixed = -(-fixed // SOURCE_BUCKET) * SOURCE_BUCKET
        for start in range(0, n, batch_size):
            rows = list(range(start, min(start + batch_size, n)))
            sources = [examples.source_ids(i) for i in rows]
            longest = max(len(s) for s in sources)
            bucket = SOURCE_BUCKET if source_bucket is None else source_bucket
            width = -(-longest // bucket) * bucket
            # Pad to the multiple that decode would choose too, so its padding adds nothing.
            width = -(-width // SOURCE_BUCKET) * SOURCE_BUCKET
            ids = np.full((len(rows), width), examples.pad_id, np.int32)
            mask = np.zeros_like(ids)
            for j, s in enumerate(sources):
                ids[j, : len(s)], mask[j, : len(s)] = s, 1
            self.batches.append((ids, mask, np.asarray(rows)))
            self.encoder_lengths.append(fixed if source_bucket is None else width)

    def first_of_each_shape(self) -> list[int]:
        seen: dict[tuple[int, int, int | None], int] = {}
        for i, (ids, _, _) in enumerate(self.batches):
            seen.setdefault((*ids.shape, self.encoder_lengths[i]), i)
        return sorted(seen.values())


class _Runner:
    """Decodes batches with one `MethodSpec`, keeping its outputs, times and estimator."""

    def __init__(self, model: Model, spec: MethodSpec, max_new_tokens: int, estimator_config: Any):
        self.model, self.spec = model, spec
        self.kwargs: dict[str, Any] = dict(
            method=spec.method, max_new_tokens=max_new_tokens, **dict(spec.options)
        )
        if spec.exit_layer is not None:
            self.kwargs["exit_layer"] = spec.exit_layer
        if spec.threshold is not None:
            self.kwargs["threshold"] = spec.threshold
        if spec.method == "free":
            self.kwargs["mode"] = spec.mode
        self.estimator = None
        if spec.adaptive:
            from free_jax.threshold import ThresholdEstimator  # TFP is slow to import

            self.estimator = ThresholdEstimator(estimator_config)
            self.kwargs["record_agreement"] = True
        self.times: list[float] = []
        self.compile_seconds = 0.0
        self.calibration_seconds = 0.0
        self.outputs: list[Any] = []

    def _decode(self, ids: np.ndarray, mask: np.ndarray, encoder_length: int) -> Any:
        import free_jax

        kwargs = self.kwargs
        if self.estimator is not None:
            kwargs = {**kwargs, "threshold": self.estimator.threshold}
        return free_jax.decode(
            self.model, ids, attention_mask=mask, encoder_length=encoder_length, **kwargs
        )

    def warm_up(self, ids: np.ndarray, mask: np.ndarray, encoder_length: int) -> None:
        start = time.perf_counter()
        self._decode(ids, mask, encoder_length)
        self.compile_seconds += time.perf_counter() - start

    def run(self, ids: np.ndarray, mask: np.ndarray, encoder_length: int, repeats: int) -> None:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = self._decode(ids, mask, encoder_length)
            times.append(time.perf_counter() - start)
        self.times.append(statistics.median(times))
        self.outputs.append(out)
        if self.estimator is not None:
            # What decode(threshold=estimator) does, outside the timed call: one estimator input
            # per row, its tokens' confidences and agreement where a deep pass saw them.
            start = time.perf_counter()
            for row in range(out.tokens.shape[0]):
                seen = out.agree[row] >= 0
                self.estimator.update(out.confidence[row], out.agree[row] == 1, mask=seen)
            self.calibration_seconds += time.perf_counter() - start

    def result(self, task: data.Task, references: Sequence[Any]) -> MethodResult:
        texts = [t for out in self.outputs for t in out.texts]
        tokens = sum(int(out.lengths.sum()) for out in self.outputs)
        exited = sum(int(out.exited.sum()) for out in self.outputs)
        passes = sum(out.num_deep_passes for out in self.outputs)
        return MethodResult(
            spec=self.spec,
            quality=_scores(task, texts, references),
            exact_match=100.0 * _exact_match(texts, references),
            matches_full=0.0,
            seconds=float(sum(self.times)),
            compile_seconds=self.compile_seconds,
            tokens=tokens,
            exit_rate=exited / tokens if tokens else 0.0,
            deep_passes_per_token=passes / tokens if tokens else 0.0,
            calibration_seconds=self.calibration_seconds,
            final_threshold=(
                float(self.estimator.threshold) if self.estimator is not None else None
            ),
            calibration_points=self.estimator.num_points if self.estimator is not None else 0,
            texts=texts,
        )

    def rows(self) -> list[np.ndarray]:
        """Each example's generated tokens, in order."""
        return [
            out.tokens[i, : out.lengths[i]] for out in self.outputs for i in range(len(out.lengths))
        ]


def _scores(task: data.Task, texts: Sequence[str], references: Sequence[Any]) -> dict[str, float]:
    """The task's headline metric and its extra metrics, with their families."""
    scores: dict[str, float] = {}
    for metric in dict.fromkeys((task.metric, *task.extra_metrics)):
        scores.update(metrics.compute(metric, texts, references))
    return scores


def _exact_match(texts: Sequence[str], references: Sequence[Any]) -> float:
    firsts = [r if isinstance(r, str) else (r[0] if r else "") for r in references]
    return float(np.mean([t.strip() == r.strip() for t, r in zip(texts, firsts, strict=True)]))


def source_texts(examples: data.Examples, tokenizer: Any, n: int) -> list[str]:
    """The first `n` examples' source texts, from their token ids, without the task's prefix."""
    texts = tokenizer.batch_decode(
        [examples.source_ids(i).tolist() for i in range(n)], skip_special_tokens=True
    )
    prefix = examples.task.prefix.strip()
    return [t[len(prefix) :].lstrip() if prefix and t.startswith(prefix) else t for t in texts]


def copy_input(source: str) -> str:
    """The trivial baseline every task gets: the output is the input."""
    return source


def evaluate(
    model: Model,
    examples: data.Examples,
    methods: Sequence[MethodSpec],
    *,
    sweep: Sequence[MethodSpec] = (),
    max_examples: int | None = None,
    batch_size: int = 1,
    repeats: int = 1,
    max_new_tokens: int | None = None,
    source_bucket: int | None = None,
    baselines: Mapping[str, Callable[[str], str]] | None = None,
    estimator_config: Any = None,
    progress: bool = True,
    model_source: str = "",
) -> Report:
    """Decodes a split with every method (and sweep point) and measures quality and speed.

    Args:
      model: the model; it needs a tokenizer (outputs are scored as text).
      examples: the tokenised split (`data.load_examples`).
      methods: the configurations of the main table; "full" is added first when missing (it is
        the speed-up's denominator).
      sweep: more configurations, for the quality-versus-speed curves.
      max_examples: the split's first this many examples; default all.
      batch_size: rows per decode call (1: the paper's latency setting).
      repeats: decode each batch this many times per method and keep the median time.
      max_new_tokens: default the task's `max_target_length`.
      source_bucket: None encodes each batch at its own length (a multiple of 16) and pads the
        encoder output to the task's `max_source_length` (one loop compilation per method); an
        int pads each batch to a multiple of it and decodes at that length (a loop compilation
        per length used).
      baselines: trivial predictions from the source text, by name; default {"copy_input"}.
      estimator_config: the `ThresholdConfig` of adaptive-threshold methods; default its
        defaults (the reference schedule).
      progress: show progress bars.
      model_source: where the model came from, for the report.

    Returns:
      A `Report`.
    """
    from tqdm.auto import tqdm

    if model.tokenizer is None:
        raise InputError(
            "evaluation scores decoded text, but this model has no tokenizer; load a checkpoint "
            "that includes its tokenizer files."
        )
    if not methods:
        raise InputError("no methods to evaluate.")
    for name, value, low in (("batch_size", batch_size, 1), ("repeats", repeats, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise InputError(f"{name} must be an integer >= {low}, got {value!r}.")
    task = examples.task
    n = len(examples) if max_examples is None else min(int(max_examples), len(examples))
    if n < 1:
        raise InputError(
            f"no examples to evaluate (split has {len(examples)}, max_examples={max_examples})."
        )
    max_new_tokens = task.max_target_length if max_new_tokens is None else max_new_tokens
    methods = list(methods)
    if not any(s.method == "full" for s in methods):
        methods.insert(0, MethodSpec(method="full"))
    specs = methods + list(sweep)
    load_start = _load_average()

    batches = _Batches(examples, n, batch_size, source_bucket)
    # A configuration both in the table and in the sweep is decoded once.
    unique = list(dict.fromkeys(specs))
    runners = [_Runner(model, s, max_new_tokens, estimator_config) for s in unique]
    warm = batches.first_of_each_shape()
    for runner in tqdm(runners, desc="compiling", disable=not progress, unit="method"):
        for i in warm:
            ids, mask, _ = batches.batches[i]
            runner.warm_up(ids, mask, batches.encoder_lengths[i])
    bar = tqdm(
        zip(batches.batches, batches.encoder_lengths, strict=True),
        total=len(batches.batches),
        desc="decoding",
        disable=not progress,
        unit="batch",
    )
    meter = _CpuMeter()
    for (ids, mask, _), encoder_length in bar:
        for runner in runners:
            runner.run(ids, mask, encoder_length, repeats)
    cpu_shares = meter.shares()

    references = list(examples.references[:n])
    results = [r.result(task, references) for r in runners]
    i_full = next(i for i, r in enumerate(results) if r.family == "full")
    full, full_rows = results[i_full], runners[i_full].rows()
    for runner, result in zip(runners, results, strict=True):
        same = [np.array_equal(a, b) for a, b in zip(runner.rows(), full_rows, strict=True)]
        result.matches_full = 100.0 * float(np.mean(same))
        result.tokens_equal_full = all(same)
        result.speedup = full.seconds / max(result.seconds, 1e-9)
    by_spec = dict(zip(unique, results, strict=True))
    settings: dict[str, Any] = {
        "batch_size": batch_size,
        "repeats": repeats,
        "max_new_tokens": max_new_tokens,
        "source_lengths": sorted({b[0].shape[1] for b in batches.batches}),
        "encoder_lengths": sorted(set(batches.encoder_lengths)),
        "timing": "wall time of decode() per batch after a warm-up, summed; median over repeats",
    }
    estimators = [r.estimator for r in runners if r.estimator is not None]
    if estimators:
        settings["threshold_estimator"] = dataclasses.asdict(estimators[0].config)

    sources = source_texts(examples, model.tokenizer, n)
    baselines = {"copy_input": copy_input} if baselines is None else baselines
    baseline_scores = {}
    for name, fn in baselines.items():
        predictions = [fn(s) for s in sources]
        scores = _scores(task, predictions, references)
        scores["exact_match"] = 100.0 * _exact_match(predictions, references)
        baseline_scores[name] = scores

    return Report(
        task=task,
        split=examples.split,
        num_examples=n,
        metric=task.metric,
        methods=[by_spec[s] for s in methods],
        sweep=[by_spec[s] for s in sweep],
        baselines=baseline_scores,
        settings=settings,
        environment=_environment(load_start, cpu_shares),
        model_info=_model_info(model, model_source),
        references=references,
    )


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


class _CpuMeter:
    """How much of the machine's CPU time something other than this process took while the
    timed decoding ran: other processes, and (in a virtual machine) steal time, the host giving
    our CPUs to someone else. Linux only (`/proc/stat`); elsewhere `share()` is None.

    The load average, used before, cannot tell this process's own threads from anyone else's.
    """

    BUSY_SHARE = 0.25  # others took over a quarter of all CPU time: timings are unreliable

    def __init__(self) -> None:
        self.start = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float, float] | None:
        try:
            with open("/proc/stat", encoding="ascii") as f:
                fields = [float(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        tick = os.sysconf("SC_CLK_TCK")
        # user nice system idle iowait irq softirq steal (guest time is inside user)
        user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0.0] * 8)[:8]
        total = (user + nice + system + idle + iowait + irq + softirq + steal) / tick
        busy = (user + nice + system + irq + softirq + steal) / tick
        own = sum(os.times()[:2])
        return total, busy, steal / tick, own

    def shares(self) -> dict[str, float] | None:
        """{"others": share of all CPU time used by others (steal included), "steal": ...}."""
        end = self._read()
        if self.start is None or end is None:
            return None
        total, busy, steal, own = (b - a for a, b in zip(self.start, end, strict=True))
        if total <= 0:
            return None
        return {
            "others": round(max(busy - own, 0.0) / total, 3),
            "steal": round(steal / total, 3),
        }


def _environment(load_start: list[float] | None, cpu: dict[str, float] | None) -> dict[str, Any]:
    import jax

    load_end = _load_average()
    cpus = os.cpu_count()
    if cpu is not None:
        busy = cpu["others"] > _CpuMeter.BUSY_SHARE
    else:  # no /proc/stat: the load average before the run, when only others made it
        busy = load_start is not None and cpus is not None and load_start[0] > 0.75 * cpus
    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": cpus,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_start": load_start,
        "load_average_end": load_end,
        "cpu_time_of_others_while_timing": cpu,
        "timings_under_load": bool(busy),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _model_info(model: Model, source: str) -> dict[str, Any]:
    import jax

    c = model.config
    return {
        "source": source,
        "parameters": int(sum(x.size for x in jax.tree_util.tree_leaves(model.params))),
        "dtype": str(model.dtype),
        "d_model": c.d_model,
        "num_layers": c.num_layers,
        "num_decoder_layers": c.num_decoder_layers,
        "vocab_size": c.vocab_size,
        "free_metadata": free_settings(model),
    }


# ---------------------------------------------------------------------------- output


def format_table(report: Report) -> str:
    """The main table as text: quality (the headline metric, then the task's extra metrics),
    speed-up, exit rate, deep passes per token."""
    metric = report.metric
    extra = [m for m in report.task.extra_metrics if m != metric]
    extra_header = "".join(f" {m:>9}" for m in extra)
    header = (
        f"{'method':<32} {metric:>9}{extra_header} {'exact%':>7} {'=full%':>7} {'speedup':>8} "
        f"{'ms/tok':>7} {'exit%':>6} {'deep/tok':>8}"
    )
    lines = [
        f"{report.task.name} ({report.split}, {report.num_examples} examples, batch "
        f"{report.settings['batch_size']}): quality = {metric}",
        header,
        "-" * len(header),
    ]
    for r in report.methods:
        extra_cells = "".join(f" {r.quality[m]:9.2f}" for m in extra)
        lines.append(
            f"{r.spec.name:<32} {r.quality[metric]:9.2f}{extra_cells} {r.exact_match:7.1f} "
            f"{r.matches_full:7.1f} {r.speedup:7.2f}x {r.ms_per_token:7.2f} "
            f"{100 * r.exit_rate:6.1f} {r.deep_passes_per_token:8.3f}"
        )
    for name, scores in report.baselines.items():
        extra_cells = "".join(f" {scores[m]:9.2f}" for m in extra)
        lines.append(
            f"{'baseline: ' + name:<32} {scores[metric]:9.2f}{extra_cells} "
            f"{scores['exact_match']:7.1f}"
        )
    s = report.summary()
    lines.append("")
    lines.append(
        f"99% of the full model's {metric}: {s['quality_at_99_percent']:.2f}; best speed-up "
        "reaching it:"
    )
    for family, best in s["best_speedup_at_99_percent"].items():
        if best is None:
            lines.append(f"  {family:<7} none of its points reaches it")
        else:
            lines.append(
                f"  {family:<7} {best['speedup']:.2f}x  ({best['label']}, {metric} "
                f"{best['quality']:.2f} = {_percent(best['relative_quality'])} of full)"
            )
    for family, at in s["quality_at_free_speedup"].items():
        top, fastest = at["best_at_least_as_fast"], at["fastest"]
        where = (
            f"none of its points is as fast; fastest: {fastest['label']} at "
            f"{fastest['speedup']:.2f}x, {metric} {fastest['quality']:.2f}"
            if top is None
            else f"{top['label']} at {top['speedup']:.2f}x, {metric} {top['quality']:.2f} "
            f"({_percent(top['relative_quality'])} of full)"
        )
        lines.append(f"  at FREE's {at['speedup']:.2f}x or faster, {family}: {where}")
    if s["exact_mode_equals_full"] is not None:
        lines.append(
            "FREE exact mode output == full model output: "
            + ("yes" if s["exact_mode_equals_full"] else "NO")
        )
    env = report.environment
    if env.get("timings_under_load"):
        cpu = env.get("cpu_time_of_others_while_timing")
        what = (
            f"others took {100 * cpu['others']:.0f}% of the CPU time while decoding was timed "
            f"(steal {100 * cpu['steal']:.0f}%)"
            if cpu
            else f"load average {env['load_average_start']} on {env['cpu_count']} CPUs"
        )
        lines.append(f"warning: the machine was busy ({what}); speed-ups are unreliable.")
    return "\n".join(lines)


def _percent(fraction: float | None) -> str:
    """A share as "99.47%", or "n/a" where it is undefined (a full model that scores 0). Two
    decimals, so that a point just under the 99% bar does not print as "99.0%"."""
    return "n/a" if fraction is None else f"{100 * fraction:.2f}%"


_COLOURS = {"full": "black", "static": "tab:blue", "calm": "tab:orange", "free": "tab:green"}


def plot(report: Report, path: str | os.PathLike) -> Path:
    """The quality-versus-speed-up plot: a curve per family from the sweep (and the main
    methods), the full model's point, the 99%-quality line and the trivial baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = report.metric
    full_q = report.full.quality[metric]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for family in ("static", "calm", "free"):
        points = sorted(
            (r.speedup, r.quality[metric])
            for r in report.methods + report.sweep
            if r.family == family and r.spec.mode == "default" and not r.spec.adaptive
        )
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, "o-", color=_COLOURS[family], label=family, ms=4, alpha=0.8)
    for r in report.methods:
        if r.family == "full":
            continue
        marker = "s" if r.spec.adaptive else ("D" if r.spec.mode == "exact" else "*")
        ax.plot(
            r.speedup,
            r.quality[metric],
            marker,
            color=_COLOURS[r.family],
            ms=12 if marker == "*" else 8,
            mec="black",
            ls="none",
            label=r.spec.name,
        )
    ax.plot(1.0, full_q, "k*", ms=14, label="full model")
    ax.axhline(QUALITY_LEVEL * full_q, color="grey", ls="--", lw=1, label="99% of full")
    # The axis spans the methods and the best baseline; a baseline far below them (copying the
    # input scores 0 punctuation F1) would squash the curves, so it is named at the bottom.
    ys = [r.quality[metric] for r in report.methods + report.sweep]
    best = max((b[metric] for b in report.baselines.values()), default=None)
    low, high = min(ys + ([best] if best is not None else [])), max(ys)
    pad = max(0.08 * (high - low), 0.5)
    ax.set_ylim(low - pad, high + pad)
    below = 0
    for name, scores in report.baselines.items():
        value = scores[metric]
        shown = low - pad <= value <= high + pad
        if shown:
            ax.axhline(value, color="tab:red", ls=":", lw=1)
        else:
            below += 1
        ax.annotate(
            f"baseline: {name}" + ("" if shown else f" = {value:.2f} (off the axis)"),
            (0.01, value if shown else low - pad),
            xycoords=("axes fraction", "data"),
            fontsize=7,
            color="tab:red",
            xytext=(0, 2 + 9 * (below - 1) if not shown else 2),
            textcoords="offset points",
        )
    ax.set_xlabel("speed-up over the full model (wall time, x)")
    ax.set_ylabel(metric)
    ax.set_title(
        f"{report.task.name}: {report.num_examples} {report.split} examples, batch "
        f"{report.settings['batch_size']}, {report.environment['backend']}",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best", ncols=2)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(
    report: Report, out_dir: str | os.PathLike, *, keep_texts: bool = True
) -> dict[str, Path]:
    """Writes `report.json` (with the main methods' outputs when `keep_texts`) and the plot."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / REPORT_FILE
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(report.to_dict(keep_texts=keep_texts), f, indent=2, allow_nan=False)
        f.write("\n")
    return {"report": json_path, "plot": plot(report, out_dir / PLOT_FILE)}
