"""`free-jax train`: trains (or resumes) the run a preset in `configs/` describes."""

from __future__ import annotations

import argparse
import json
import sys
import time


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train",
        help="train with FREE's shallow-deep loss (or CALM's, or the exit classifier)",
        description="Trains (or resumes) the run a preset describes. Presets are Python files in "
        "configs/ defining get_config(); each docstring gives its command and cost.",
    )
    parser.add_argument("--config", required=True, help="preset file, e.g. configs/tiny.py")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides, e.g. steps=100 optim.learning_rate=3e-4 data.batch_size=16",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the final config as JSON and exit"
    )


def run(args: argparse.Namespace) -> int:
    import logging

    from free_jax.training import load_config, train
    from free_jax.training.trainer import TrainingDivergedError

    config = load_config(args.config, args.overrides)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2, default=str))
        return 0
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    train_log = logging.getLogger("free_jax.training")
    train_log.addHandler(handler)
    train_log.setLevel(logging.INFO)
    train_log.propagate = False  # orbax's absl logging may have configured the root logger
    started = time.perf_counter()
    try:
        result = train(config)
    except TrainingDivergedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        train_log.removeHandler(handler)
        train_log.propagate = True
    last = {}
    for record in result.history:
        last[record["split"]] = record
    summary = {
        "step": result.step,
        "output_dir": str(result.output_dir),
        "best_step": result.best_step,
        "train_loss": last.get("train", {}).get("loss"),
        **{k: v for k, v in last.get("eval", {}).items() if k.startswith("eval/")},
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(summary))
    return 0
