"""Evaluation: the quality and speed of decoding methods on a task's held-out split.

Owns: `specs` (what to run: `MethodSpec`, defaults, sweeps), `harness` (`evaluate`: decoding,
timing, scoring), `report` (`Report`, its summary, table, plot and files), `calibration` (a FREE
threshold chosen on a held-out split with a bootstrap margin), `bench` (`free-jax bench`: every
method at several batch sizes on the same inputs: speed, the weight-bytes ideal, memory, quality).

May import: `free_jax.decoding`, `free_jax.data`, `free_jax.models`, `free_jax.errors`; never
training or cli.

    report = evaluate(model, examples, default_methods(model), sweep=default_sweep(model))
    print(format_table(report))
    write_report(report, "eval_out/")        # report.json and quality_vs_speed.png

What is measured and how it is timed: `harness`'s docstring.
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
