"""`free-jax calibrate`: choose FREE's threshold on a held-out split with a stated margin.

    free-jax calibrate --model demo --task acl_punct --split validation \\
        --level 0.99 --confidence 0.95 [--thresholds 0.9 0.5 ...] [--out choice.json]

Prints each candidate's quality, share of the full model's and the share's bootstrap lower
bound, and the lowest threshold whose bound keeps the level (`free_jax.evaluation.calibration`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from free_jax.cli import compile_cache


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "calibrate",
        help="choose FREE's threshold on a held-out split, with a bootstrap margin",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--model", default="demo", help="checkpoint, hub name or 'demo'")
    parser.add_argument("--task", default="acl_punct", help="task name (free_jax.data.TASKS)")
    parser.add_argument("--split", default="validation", help="the split to choose on")
    parser.add_argument("--data-files", nargs="+", default=None, help="local data files")
    parser.add_argument("--max-examples", type=int, default=None, help="the split's first N")
    parser.add_argument("--thresholds", type=float, nargs="+", default=None)
    parser.add_argument("--level", type=float, default=0.99, help="promised share of full")
    parser.add_argument("--confidence", type=float, default=0.95, help="of the lower bound")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--exit-layer", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the choice as JSON here")
    compile_cache.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from free_jax import data
    from free_jax.checkpoints import load
    from free_jax.evaluation import calibration

    model = load(args.model)
    examples = data.load_examples(
        args.task, model.tokenizer, split=args.split, data_files=args.data_files
    )
    if args.max_examples is not None:
        examples = examples.select(range(min(args.max_examples, len(examples))))
    choice = calibration.choose_threshold(
        model,
        examples,
        candidates=args.thresholds or calibration.DEFAULT_CANDIDATES,
        level=args.level,
        confidence=args.confidence,
        num_resamples=args.resamples,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=sys.stderr.isatty(),
        exit_layer=args.exit_layer,
    )
    print(
        f"{args.task} ({args.split}, {choice.num_examples} examples): full model "
        f"{choice.metric} {choice.full_quality:.2f}; lower bound: {1 - choice.confidence:.0%} "
        f"quantile of {choice.num_resamples} paired bootstrap resamples"
    )
    print(f"{'threshold':>9} {choice.metric:>9} {'share':>8} {'bound':>8} {'exit%':>6}")
    for c in choice.checks:
        mark = "  <- chosen" if c.threshold == choice.threshold else ""
        print(
            f"{c.threshold:>9.2f} {c.quality:>9.2f} {c.share:>8.2%} {c.lower_bound:>8.2%} "
            f"{c.exit_rate:>6.1%}{mark}"
        )
    if choice.threshold is None:
        print(f"no candidate keeps {choice.level:.0%} with {choice.confidence:.0%} confidence")
    if args.out:
        Path(args.out).write_text(json.dumps(choice.to_dict(), indent=2))
    return 0 if choice.threshold is not None else 1
