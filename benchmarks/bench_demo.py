"""The shipped demo model at batch size 1: full, static, CALM and FREE timed side by side.

`free-jax demo` times each sentence once, which on a shared 2-core machine (or a virtual one that
loses CPU time to its host) moves its speed-ups by a tenth or more between runs. This benchmark
repeats the measurement: in each of `--rounds` rounds every sentence is decoded by every method in
turn (so a change in the machine's load touches them alike), and for each method it reports

* the median over rounds of the round's total time, and the median, minimum and maximum over
  rounds of the speed-up (full model's total / the method's total in the same round);
* the total of each sentence's fastest time over the rounds ("best of"), the usual estimate of
  what the code costs when nothing else runs.

Every timed call is `free_jax.decode` on token ids, which returns NumPy arrays, so it ends with
the result on the host; compilation happens in a warm-up and is not timed. Sources are encoded at
their own length and padded to 64 for the loop, as `free-jax demo` does. Quality (punctuation F1
on the same sentences) is printed next to the speed, from the first round's outputs.

    python benchmarks/bench_demo.py [--sentences 100] [--rounds 5] [--json out.json]
        [--weights int8-dynamic ...]

`--weights` adds, in the same rounds, full decoding and FREE at the saved threshold with other
decoder weights (bf16, or `Model.quantize`'s int8 modes); their speed-ups and F1 are still over
the float32 full model's.

About 2 minutes on 2 CPU cores with the defaults.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

import free_jax
from free_jax import data
from free_jax.data import demo, metrics
from free_jax.evaluation import bench

METHODS = {
    "full": dict(method="full"),
    "static Ls=1": dict(method="static", exit_layer=1),
    "calm thr=0.2": dict(method="calm", exit_layer=1, threshold=0.2),
    "calm thr=0.9": dict(method="calm", exit_layer=1, threshold=0.9),
    "free thr=0.2": dict(method="free", threshold=0.2),
    # Every token exits, so no deep pass runs: FREE's own cost per step over static exiting.
    "free thr=0 (no deep)": dict(method="free", threshold=0.0),
    "free thr=0.5": dict(method="free", threshold=0.5),
    "free exact thr=0.2": dict(method="free", threshold=0.2, mode="exact"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--split", default="test")
    parser.add_argument("--json", help="also write the measurements here")
    parser.add_argument("--weights", nargs="*", default=[], choices=bench.DECODE_WEIGHTS[1:])
    args = parser.parse_args()

    model = free_jax.load(demo.MODEL_DIR)
    runs = {name: (model, kwargs) for name, kwargs in METHODS.items()}
    for weights in args.weights:
        variant = bench.with_decode_weights(model, weights)
        runs[f"full {weights}"] = (variant, METHODS["full"])
        runs[f"free thr=0.5 {weights}"] = (variant, METHODS["free thr=0.5"])
    examples = data.load_examples(demo.TASK_NAME, model.tokenizer, split=args.split)
    # Evenly spaced over the split (it is ordered by paper), as free-jax demo samples it.
    rows = np.linspace(0, len(examples) - 1, args.sentences).round().astype(int)
    examples = examples.select(rows)
    sources = [examples.source_ids(i)[None] for i in range(len(examples))]
    references = list(examples.references)
    length = data.get_task(demo.TASK_NAME).max_source_length

    def decode(ids, run):
        variant, kwargs = run
        return free_jax.decode(variant, ids, max_new_tokens=64, encoder_length=length, **kwargs)

    for run in runs.values():  # compile every shape
        seen = set()
        for ids in sources:
            if ids.shape not in seen:
                seen.add(ids.shape)
                decode(ids, run)

    totals = {name: [] for name in runs}
    best = {name: [float("inf")] * len(sources) for name in runs}
    texts: dict[str, list[str]] = {name: [] for name in runs}
    tokens = dict.fromkeys(runs, 0)
    for r in range(args.rounds):
        round_total = dict.fromkeys(runs, 0.0)
        for i, ids in enumerate(sources):
            for name, run in runs.items():
                start = time.perf_counter()
                out = decode(ids, run)
                seconds = time.perf_counter() - start
                round_total[name] += seconds
                best[name][i] = min(best[name][i], seconds)
                if r == 0:
                    texts[name] += out.texts
                    tokens[name] += int(out.lengths.sum())
        for name in runs:
            totals[name].append(round_total[name])

    full_f1 = metrics.compute("punct_f1", texts["full"], references)["punct_f1"]
    print(
        f"demo model, {len(sources)} {args.split} sentences, batch 1, {args.rounds} rounds; "
        f"speed-up = full / method, per round"
    )
    header = (
        f"{'method':<26} {'punct_f1':>8} {'of full':>7} {'ms/sent':>8} {'speed-up':>9} "
        f"{'min':>5} {'max':>5} {'best-of':>8}"
    )
    print(header + "\n" + "-" * len(header))
    results = {}
    full_best = sum(best["full"])
    for name in runs:
        ratios = [f / m for f, m in zip(totals["full"], totals[name], strict=True)]
        f1 = metrics.compute("punct_f1", texts[name], references)["punct_f1"]
        results[name] = {
            "punct_f1": f1,
            "relative_quality": f1 / full_f1 if full_f1 else None,
            "tokens": tokens[name],
            "ms_per_sentence_median": 1e3 * statistics.median(totals[name]) / len(sources),
            "speedup_median": statistics.median(ratios),
            "speedup_min": min(ratios),
            "speedup_max": max(ratios),
            "speedup_best_of": full_best / sum(best[name]),
            "round_totals_s": totals[name],
        }
        res = results[name]
        print(
            f"{name:<26} {f1:8.2f} {100 * f1 / full_f1:6.1f}% "
            f"{res['ms_per_sentence_median']:8.2f} {res['speedup_median']:8.2f}x "
            f"{res['speedup_min']:5.2f} {res['speedup_max']:5.2f} {res['speedup_best_of']:7.2f}x"
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"sentences": len(sources), "rounds": args.rounds, "results": results}, f)


if __name__ == "__main__":
    main()
