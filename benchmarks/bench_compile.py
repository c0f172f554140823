"""How long each decoding method's program takes to trace and compile: the wait before the first
decode at a new shape (a persistent compilation cache saves it from the second process on).

For each batch size and method, the decode program `free_jax.decode` runs is traced, lowered
and compiled ahead of time, as `free-jax bench` does to read its memory (`bench.program_bytes`),
with JAX's in-memory caches cleared before each, so every figure is a cold compile (the encoder,
which all methods share, is compiled before the clock starts). Methods are
compiled in turn within each round, rounds repeat, and the table gives each method's median and
its ratio to full decoding's in the same rounds: on a shared machine the ratios hold better than
the seconds.

    python benchmarks/bench_compile.py                                 # the demo model
    python benchmarks/bench_compile.py --model random:t5-base --batch-sizes 1 8
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

import free_jax
from free_jax.cli.bench import RANDOM_PREFIX
from free_jax.decoding import encode_source
from free_jax.errors import CheckpointError
from free_jax.evaluation import bench
from free_jax.models import shapes


def cases(exit_layer: int) -> list[bench.BenchCase]:
    return [
        bench.BenchCase.make("full", method="full"),
        bench.BenchCase.make(f"static Ls={exit_layer}", method="static", exit_layer=exit_layer),
        bench.BenchCase.make("free", method="free", exit_layer=exit_layer, threshold=0.5),
        bench.BenchCase.make(
            "free exact", method="free", exit_layer=exit_layer, threshold=0.5, mode="exact"
        ),
    ]


def compile_seconds(model, case, batch: int, source: int, new_tokens: int) -> float:
    ids = np.full((batch, source), 5, np.int32)
    ids[:, -1] = model.config.eos_token_id
    mask = np.ones_like(ids)
    jax.clear_caches()
    # The encoder, which every method shares, is compiled before the clock starts.
    encode_source(model.params, ids, mask, config=model.config, length=source)
    start = time.perf_counter()
    bench.program_bytes(model, ids, mask, source, case, new_tokens, 0)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo", help="'demo', a checkpoint or random:SHAPE")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--exit-layer", type=int, default=1)
    parser.add_argument("--source-length", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if min(args.batch_sizes) < 1 or args.rounds < 1:
        parser.error(f"--batch-sizes {args.batch_sizes} and --rounds {args.rounds} must be >= 1.")
    if args.model.startswith(RANDOM_PREFIX):
        name = args.model[len(RANDOM_PREFIX) :]
        if name not in shapes.NAMES:
            parser.error(f"unknown shape {name!r}; known: {', '.join(shapes.NAMES)}")
        model = free_jax.Model.random(shapes.t5_v1_0(name), seed=0)
    else:
        try:
            model = free_jax.load(args.model)
        except CheckpointError as error:
            parser.error(str(error))

    print(
        f"# {args.model}: trace and compile, seconds (median of {args.rounds} rounds), "
        f"source {args.source_length}, {args.new_tokens} new tokens; {jax.default_backend()}"
    )
    print("| batch | method | seconds | of full |")
    print("|---|---|---|---|")
    for batch in args.batch_sizes:
        seconds: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for case in cases(args.exit_layer):
                s = compile_seconds(model, case, batch, args.source_length, args.new_tokens)
                seconds.setdefault(case.label, []).append(s)
        full = seconds["full"]
        for label, times in seconds.items():
            ratio = statistics.median(t / f for t, f in zip(times, full, strict=True))
            print(f"| {batch} | {label} | {statistics.median(times):.1f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
