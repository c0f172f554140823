"""`free-jax eval` and `free-jax demo`: thin command-line fronts of `free_jax.evaluation`.

    free-jax eval --model DIR_OR_HUB --task NAME [--data-files F ...] [--split validation]
                  [--max-examples N] [--out DIR] [--methods full static@2 free:0.8 ...]
                  [--thresholds 0.9 0.5 ...] [--no-sweep] [--batch-size 1] [--repeats 1]
    free-jax demo [--out DIR] [--quick]

`demo` evaluates the shipped demo model (`free_jax/assets/demo/model/`) on the held-out test
split of the demo task (`free_jax.data.demo`), with the default methods and a threshold sweep,
and writes `report.json` and `quality_vs_speed.png`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from free_jax.checkpoints import loading
from free_jax.cli import compile_cache

DEMO_MODEL = loading.DEMO_MODEL
DEMO_SPLIT = "test"
# The demo's size: enough examples for a stable BLEU, few enough for about a minute on 2 CPU
# cores, compilation included.
DEMO_EXAMPLES = 100
DEMO_THRESHOLDS = (0.9, 0.5, 0.2, 0.1)
QUICK_EXAMPLES = 25
QUICK_THRESHOLDS = (0.8, 0.4)


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-examples", type=int, default=None, help="the split's first N")
    parser.add_argument("--batch-size", type=int, default=1, help="rows per decode call")
    parser.add_argument(
        "--repeats", type=int, default=1, help="decode each batch this often, keep the median"
    )
    parser.add_argument(
        "--exit-layer", type=int, default=None, help="L_s (default: the checkpoint's, or L/4)"
    )
    parser.add_argument(
        "--thresholds",
        type=float,
        nargs="+",
        default=None,
        help="the sweep's thresholds for CALM and FREE",
    )
    parser.add_argument(
        "--static-layers",
        type=int,
        nargs="+",
        default=None,
        help="the sweep's static exits (default: every layer below the top)",
    )
    parser.add_argument("--no-sweep", action="store_true", help="only the main methods")
    compile_cache.add_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    from free_jax.evaluation import SPEC_SYNTAX

    parser = sub.add_parser(
        "eval",
        help="quality and speed of decoding methods on a task's split",
        description="Decodes a task's split with each method at batch size 1 (by default), "
        "measures the task's metric, the speed-up over the full model, the exit rate and the "
        "deep passes per token, sweeps thresholds, and writes report.json and a "
        "quality-versus-speed plot.",
    )
    parser.add_argument("--model", required=True, help="checkpoint directory or hub name")
    parser.add_argument("--task", required=True, help="a registered task (free_jax.data.TASKS)")
    parser.add_argument(
        "--data-files",
        nargs="+",
        default=None,
        help="local .json/.jsonl/.csv files of the split (default: the task's shipped files, "
        "else the hub)",
    )
    parser.add_argument("--split", default="validation")
    parser.add_argument("--out", default="eval_out", help="output directory")
    parser.add_argument(
        "--methods", nargs="+", default=None, help=f"default: the issue-6 table. {SPEC_SYNTAX}"
    )
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument(
        "--source-bucket",
        type=int,
        default=None,
        help="pad sources to a multiple of this (default: all to the task's maximum)",
    )
    parser.add_argument("--cache-dir", default=None, help="token-id cache (data.load_examples)")
    _common_arguments(parser)


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "demo",
        help="FREE against full, static and CALM decoding on the shipped demo model",
        description="Evaluates the shipped demo model (a small T5 trained here on restoring the "
        "punctuation of ACL paper sentences) on sentences spread evenly over the held-out test "
        "split: "
        "full model, static exit, CALM, FREE (fixed and adaptive threshold) and FREE exact "
        "mode, with a threshold sweep; prints the table, writes report.json and the plot.",
    )
    parser.add_argument("--out", default="free_jax_demo", help="output directory")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_EXAMPLES} examples and a shorter sweep (default {DEMO_EXAMPLES} examples)",
    )
    parser.add_argument(
        "--model", default=None, help="another checkpoint instead of the shipped demo model"
    )
    _common_arguments(parser)


def _specs(
    args: argparse.Namespace, model: Any, thresholds: Any, static_layers: Any = None
) -> tuple[list, list]:
    from free_jax import evaluation

    if getattr(args, "methods", None):
        methods = [evaluation.parse_method(m) for m in args.methods]
    else:
        methods = evaluation.default_methods(model, args.exit_layer)
    if args.no_sweep:
        return methods, []
    layers = args.static_layers if args.static_layers is not None else static_layers
    return methods, evaluation.default_sweep(model, thresholds, args.exit_layer, layers)


def _finish(report: Any, out: str, started: float) -> int:
    from free_jax import evaluation

    paths = evaluation.write_report(report, out)
    print(evaluation.format_table(report))
    print(
        f"\nwrote {paths['report']} and {paths['plot']} ({time.perf_counter() - started:.0f}s "
        "in all)"
    )
    return 0


def run_eval(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    from free_jax import evaluation

    if args.methods:  # bad method names fail before anything is loaded
        for m in args.methods:
            evaluation.parse_method(m)
    from free_jax import data
    from free_jax.checkpoints import load
    from free_jax.errors import InputError

    task = data.get_task(args.task)
    model = load(args.model)
    if model.tokenizer is None:
        raise InputError(
            f"{args.model} has no tokenizer files; evaluation decodes and scores text. Save the "
            "checkpoint with its tokenizer (free_jax.save of a Model that has one)."
        )
    examples = data.load_examples(
        task,
        model.tokenizer,
        split=args.split,
        data_files=args.data_files,
        cache_dir=args.cache_dir,
    )
    thresholds = evaluation.DEFAULT_THRESHOLDS if args.thresholds is None else args.thresholds
    methods, sweep = _specs(args, model, thresholds)
    report = evaluation.evaluate(
        model,
        examples,
        methods,
        sweep=sweep,
        max_examples=args.max_examples,
        batch_size=args.batch_size,
        repeats=args.repeats,
        max_new_tokens=args.max_new_tokens,
        source_bucket=args.source_bucket,
        progress=not args.no_progress,
        model_source=str(args.model),
    )
    return _finish(report, args.out, started)


def demo_unavailable_message() -> str:
    return (
        f"the demo model is not in this installation ({DEMO_MODEL} is missing). Retrain it with "
        "`free-jax train --config configs/demo.py` and run `free-jax demo --model "
        "runs/demo/final`, or evaluate any checkpoint that has a tokenizer with "
        "`free-jax eval --model DIR --task acl_punct --split test`."
    )


def run_demo(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    model_path = Path(args.model) if args.model else DEMO_MODEL
    if args.model is None and not DEMO_MODEL.is_dir():
        print(f"free-jax demo: {demo_unavailable_message()}", file=sys.stderr)
        return 2
    import numpy as np

    from free_jax import data, evaluation
    from free_jax.checkpoints import load
    from free_jax.data import demo
    from free_jax.models import Model

    model = load(model_path)
    if model.tokenizer is None:
        model = Model(
            config=model.config,
            params=model.params,
            tokenizer=demo.load_tokenizer(),
            metadata=model.metadata,
        )
    examples = data.load_examples(demo.TASK_NAME, model.tokenizer, split=DEMO_SPLIT)
    n = min(args.max_examples or (QUICK_EXAMPLES if args.quick else DEMO_EXAMPLES), len(examples))
    # The split is ordered by paper: its first n sentences would come from two or three papers.
    # An evenly spaced sample covers all of them (`free-jax eval` takes the first n).
    examples = examples.select(np.linspace(0, len(examples) - 1, n).round().astype(int))
    thresholds = args.thresholds or (QUICK_THRESHOLDS if args.quick else DEMO_THRESHOLDS)
    L = model.config.num_decoder_layers
    # Three static exits (each one compiles) rather than every one, to keep the demo short.
    static_layers = sorted({1, 2, L // 2} & set(range(1, L)))
    methods, sweep = _specs(args, model, thresholds, static_layers)
    report = evaluation.evaluate(
        model,
        examples,
        methods,
        sweep=sweep,
        batch_size=args.batch_size,
        repeats=args.repeats,
        baselines={
            "copy_input": evaluation.copy_input,
            "add_full_stop": demo.add_full_stop,
        },
        progress=not args.no_progress,
        model_source=str(model_path),
    )
    return _finish(report, args.out, started)
