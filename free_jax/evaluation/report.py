"""The evaluation's results (`MethodResult`, `Report` with its summary), the printed table,
the quality-versus-speed plot and the written report."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from free_jax import data
from free_jax.evaluation.specs import MethodSpec

# ---------------------------------------------------------------------------- results

QUALITY_LEVEL = 0.99  # the paper's bar: 99% of the full model's quality
REPORT_FILE = "report.json"
PLOT_FILE = "quality_vs_speed.png"


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
