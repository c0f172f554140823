"""Evaluation harness: the quality and speed of decoding methods on a task's held-out split.

    report = evaluate(model, examples, default_methods(model), sweep=default_sweep(model))
    print(format_table(report))
    write_report(report, "eval_out/")        # report.json and quality_vs_speed.png

What it measures, per method configuration (`MethodSpec`):

* quality: the task's metric (`free_jax.data.metrics.compute`) on the decoded texts, plus the
  share of outputs equal to the (first) reference and the share equal to the full model's output;
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
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from free_jax import data
from free_jax.data import metrics
from free_jax.decoding import SOURCE_BUCKET, decode, free_settings
from free_jax.errors import InputError
from free_jax.evaluation.report import MethodResult, Report
from free_jax.evaluation.specs import MethodSpec
from free_jax.models.model import Model

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
        kwargs = self.kwargs
        if self.estimator is not None:
            kwargs = {**kwargs, "threshold": self.estimator.threshold}
        return decode(self.model, ids, attention_mask=mask, encoder_length=encoder_length, **kwargs)

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
    _check_evaluation(model, methods, batch_size, repeats)
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
    cpu_shares = _decode_all(runners, batches, repeats, progress)

    references = list(examples.references[:n])
    results = _compare_with_full(runners, [r.result(task, references) for r in runners])
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
    return Report(
        task=task,
        split=examples.split,
        num_examples=n,
        metric=task.metric,
        methods=[by_spec[s] for s in methods],
        sweep=[by_spec[s] for s in sweep],
        baselines=_baseline_scores(task, baselines, sources, references),
        settings=settings,
        environment=_environment(load_start, cpu_shares),
        model_info=_model_info(model, model_source),
        references=references,
    )


def _check_evaluation(model: Model, methods: Sequence[Any], batch_size: Any, repeats: Any) -> None:
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


def _decode_all(
    runners: list[_Runner], batches: _Batches, repeats: int, progress: bool
) -> dict[str, float] | None:
    """Compiles every runner on the first batch of each shape (untimed), then decodes every
    batch with every runner in turn; returns the CPU shares others took meanwhile."""
    from tqdm.auto import tqdm

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
    return meter.shares()


def _compare_with_full(runners: list[_Runner], results: list[MethodResult]) -> list:
    """Fills each result's agreement with the full model's output and its speed-up."""
    i_full = next(i for i, r in enumerate(results) if r.family == "full")
    full, full_rows = results[i_full], runners[i_full].rows()
    for runner, result in zip(runners, results, strict=True):
        same = [np.array_equal(a, b) for a, b in zip(runner.rows(), full_rows, strict=True)]
        result.matches_full = 100.0 * float(np.mean(same))
        result.tokens_equal_full = all(same)
        result.speedup = full.seconds / max(result.seconds, 1e-9)
    return results


def _baseline_scores(task, baselines, sources, references) -> dict[str, dict[str, float]]:
    scores = {}
    for name, fn in baselines.items():
        predictions = [fn(s) for s in sources]
        scores[name] = _scores(task, predictions, references)
        scores[name]["exact_match"] = 100.0 * _exact_match(predictions, references)
    return scores


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
