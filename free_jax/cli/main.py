"""The `free-jax` command line: one module per subcommand.

free-jax decode [TEXT ...] [--model DIR_OR_HUB_NAME|demo|tiny-random] [--ids "5 8 13"]
                [--method full|static|free|calm|oracle] [--exit-layer N] [--threshold 0.9]
                [--confidence softmax_diff] [--buffer-capacity K] [--mode default|exact]
                [--max-wait 0] [--wait-mode hold|draft] [--calm-tau 4]
                [--max-new-tokens 32] [--dtype float32|bfloat16] [--json]
                                                     (free_jax.cli.decode)
free-jax fit-threshold agreement.npz [...]           (free_jax.cli.fit_threshold)
free-jax eval --model DIR_OR_HUB --task NAME [...]   (free_jax.cli.evaluate)
free-jax demo [--out DIR] [--quick]                  (free_jax.cli.evaluate)
free-jax train --config configs/NAME.py [key=value ...] [--print-config]
                                                     (free_jax.cli.train)
free-jax calibrate [--model demo] [--split validation] (free_jax.cli.calibrate)
free-jax bench [--model demo|random:t5-base] [--batch-sizes 1 8 32]
                                                     (free_jax.cli.bench)
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from free_jax.cli import bench, calibrate, compile_cache, decode, evaluate, fit_threshold, train
from free_jax.cli.quiet import quiet_libraries
from free_jax.errors import CheckpointError, ConfigError, DataError, InputError

# Subcommand -> (add its parser, run it).
SUBCOMMANDS = {
    "decode": (decode.add_parser, decode.run),
    "fit-threshold": (fit_threshold.add_parser, fit_threshold.run),
    "eval": (evaluate.add_eval_parser, evaluate.run_eval),
    "demo": (evaluate.add_demo_parser, evaluate.run_demo),
    "train": (train.add_parser, train.run),
    "calibrate": (calibrate.add_parser, calibrate.run),
    "bench": (bench.add_parser, bench.run),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="free-jax", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add_parser, _ in SUBCOMMANDS.values():
        add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # Commands that compile decode programs keep them in a persistent cache, for the
        # command only (`compile_cache`).
        cache = contextlib.nullcontext()
        if hasattr(args, "no_compile_cache"):
            cache = compile_cache.scoped(args)
        with quiet_libraries(), cache:
            return SUBCOMMANDS[args.command][1](args)
    except (InputError, ConfigError, CheckpointError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
