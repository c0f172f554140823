"""Evaluation: the quality and speed of decoding methods on a task's held-out split.

Owns: `specs` (what to run: `MethodSpec`, defaults, sweeps), `harness` (`evaluate`: decoding,
timing, scoring), `report` (`Report`, its summary, table, plot and files).

May import: `free_jax.decoding`, `free_jax.data`, `free_jax.models`, `free_jax.errors`; never
training or cli.

    report = evaluate(model, examples, default_methods(model), sweep=default_sweep(model))
    print(format_table(report))
    write_report(report, "eval_out/")        # report.json and quality_vs_speed.png

What it measures, per method configuration (`MethodSpec`):

* quality: the task's metric (`free_jax.data.metrics.compute`) on the decoded texts, plus the
  share of
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

from free_jax.evaluation.harness import (
    copy_input,
    evaluate,
    source_texts,
)
from free_jax.evaluation.report import (
    PLOT_FILE,
    QUALITY_LEVEL,
    REPORT_FILE,
    MethodResult,
    Report,
    format_table,
    plot,
    write_report,
)
from free_jax.evaluation.specs import (
    DEFAULT_THRESHOLDS,
    FAMILIES,
    MODES,
    SPEC_SYNTAX,
    MethodSpec,
    default_methods,
    default_sweep,
    parse_method,
)

__all__ = [
    "DEFAULT_THRESHOLDS",
    "FAMILIES",
    "MODES",
    "MethodResult",
    "MethodSpec",
    "PLOT_FILE",
    "QUALITY_LEVEL",
    "REPORT_FILE",
    "Report",
    "SPEC_SYNTAX",
    "copy_input",
    "default_methods",
    "default_sweep",
    "evaluate",
    "format_table",
    "parse_method",
    "plot",
    "source_texts",
    "write_report",
]
