"""`free-jax bench`: full, static, CALM and FREE side by side at several batch sizes.

    free-jax bench [--model demo|DIR|HUB_NAME|random:t5-base] [--batch-sizes 1 8 32]
                   [--task acl_punct --split test] [--max-examples N] [--repeats 1]
                   [--exit-layer N] [--threshold T] [--exit-rate 0.8] [--max-wait 4]
                   [--weights f32|bf16|int8|int8-dynamic] [--out bench_out]

Prints a table (ms/token, speed-up, weight-bytes ideal, exit rate, deep passes, rows and
positions per pass, peak memory, quality) and writes `bench.json` and `speedup_vs_batch.png`
to `--out` (`free_jax.evaluation.bench`). A trained model is scored on a task's split (the demo
model: its whole test split by default). `random:SHAPE` is a random model of a published T5
shape (`free_jax.models.shapes`) on random sources, decoding `--new-tokens` tokens per row; its
threshold is the one whose exit rate is closest to `--exit-rate` (random weights give no
meaningful confidences, so exits are set by the threshold rather than learned). `--weights`
decodes with bf16 weights (`Model.astype`) or int8 decoder weights (`Model.quantize`) in every
method, the full model's included, so that quality and speed-ups compare within that format.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from free_jax.cli import compile_cache

RANDOM_PREFIX = "random:"


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "bench",
        help="decoding methods side by side at several batch sizes (speed, memory, quality)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "--model", default="demo", help="'demo', a checkpoint, a hub name or random:SHAPE"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--task", default=None, help="task to score on (default: the demo's)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--data-files", nargs="+", default=None)
    parser.add_argument("--max-examples", type=int, default=None, help="the split's first N")
    parser.add_argument("--repeats", type=int, default=1, help="calls per batch (median kept)")
    parser.add_argument("--exit-layer", type=int, default=None)
    parser.add_argument("--threshold", type=float, default=None)
    parser.add_argument("--max-wait", type=int, default=4, help="FREE draft waiting's bound")
    parser.add_argument(
        "--exit-rate", type=float, default=0.8, help="random models: the target exit rate"
    )
    parser.add_argument("--new-tokens", type=int, default=64, help="random models")
    parser.add_argument("--source-length", type=int, default=64, help="random models")
    parser.add_argument(
        "--weights",
        default="f32",
        help="decoder weights: f32 (as stored), bf16, int8 or int8-dynamic (Model.quantize)",
    )
    parser.add_argument(
        "--shallow-head",
        default=None,
        help="FREE cases: int8-dynamic decides exits with an int8 copy of the LM head",
    )
    parser.add_argument("--out", default="bench_out", help="where bench.json and the plot go")
    compile_cache.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from free_jax.errors import InputError
    from free_jax.evaluation import bench

    if args.max_examples is not None and args.max_examples < 1:
        raise InputError(f"--max-examples {args.max_examples} is invalid: at least 1.")
    bench.check_batch_sizes(args.batch_sizes, sys.maxsize)
    if args.model.startswith(RANDOM_PREFIX):
        model, inputs, threshold = _random_model(args)
    else:
        model = bench.with_decode_weights(_trained_model(args), args.weights)
        inputs, threshold = _task_inputs(args, model), args.threshold
    cases = bench.default_cases(
        model,
        exit_layer=args.exit_layer,
        threshold=threshold,
        max_wait=args.max_wait,
        shallow_head=args.shallow_head,
    )
    result = bench.run_bench(
        model,
        inputs,
        cases,
        batch_sizes=args.batch_sizes,
        repeats=args.repeats,
        progress=sys.stderr.isatty(),
        model_name=args.model + ("" if args.weights == "f32" else f" ({args.weights})"),
    )
    print(bench.format_bench(result))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result.to_dict(), indent=2))
    plot = bench.plot_bench(result, out / bench.PLOT_FILE)
    print(f"\nwrote {out / 'bench.json'} and {plot}")
    return 0


def _trained_model(args: argparse.Namespace):
    from free_jax.checkpoints import load

    return load(args.model)


def _task_inputs(args: argparse.Namespace, model):
    from free_jax import data
    from free_jax.data import demo
    from free_jax.errors import InputError
    from free_jax.evaluation import bench

    if model.tokenizer is None:
        raise InputError(f"model {args.model!r} has no tokenizer, so it cannot decode a task.")
    task = args.task or demo.TASK_NAME
    examples = data.load_examples(
        task, model.tokenizer, split=args.split, data_files=args.data_files
    )
    n = len(examples) if args.max_examples is None else min(args.max_examples, len(examples))
    examples = examples.select(range(n))
    return bench.BenchInputs(
        sources=[examples.source_ids(i) for i in range(n)],
        max_new_tokens=examples.task.max_target_length,
        references=list(examples.references),
        metric=examples.task.metric,
        pad_id=examples.pad_id,
        description=f"{task} {args.split} split",
    )


def _random_model(args: argparse.Namespace):
    import numpy as np

    from free_jax import testing
    from free_jax.errors import InputError
    from free_jax.evaluation import bench
    from free_jax.models import Model, shapes

    name = args.model[len(RANDOM_PREFIX) :]
    if name not in shapes.NAMES:
        raise InputError(
            f"unknown model shape {name!r} in --model {args.model}; known: "
            + ", ".join(RANDOM_PREFIX + n for n in shapes.NAMES)
        )
    if not 0.0 <= args.exit_rate <= 1.0:
        raise InputError(f"--exit-rate {args.exit_rate} is invalid: a fraction in [0, 1].")
    for flag in ("new_tokens", "source_length"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag.replace('_', '-')} {getattr(args, flag)} is invalid: >= 1.")
    model = bench.with_decode_weights(Model.random(shapes.t5_v1_0(name), seed=0), args.weights)
    n = args.max_examples or max(64, max(args.batch_sizes))
    ids = testing.random_ids((n, args.source_length), seed=0, vocab_size=32100)
    inputs = bench.BenchInputs(
        sources=list(np.asarray(ids)),
        max_new_tokens=args.new_tokens,
        # Random weights soon repeat themselves; EOS is suppressed so every row decodes the
        # same number of tokens in every method.
        min_new_tokens=args.new_tokens,
        description=f"random sources of {args.source_length} tokens, {args.new_tokens} new",
    )
    threshold = args.threshold
    if threshold is None:
        threshold = bench.threshold_for_exit_rate(
            model, inputs, args.exit_rate, exit_layer=args.exit_layer
        )
        print(f"# threshold {threshold:.4f}: exit rate closest to {args.exit_rate:.0%}")
    return model, inputs, threshold
