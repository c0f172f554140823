"""Benchmark of FREE's adaptive threshold estimator: fit time and a stream-shift experiment.

    /work/venv/bin/python benchmarks/bench_threshold.py --out /tmp/free_jax_threshold

About 1 minute on 2 CPU cores, mostly compilation (one program per fit mode and padded size).

Part 1 times `BetaMixture.fit_with_status` after compilation (median over `--repeats` calls, each
ended by `jax.block_until_ready`) for 10^3, 10^5 and 10^6 points drawn from a known mixture: the
host-level call on NumPy input (flatten, pad to the bucket, transfer, fit), the jitted fit alone on
device-resident padded arrays, and `threshold()` on the fitted mixture.

Part 2 streams synthetic decode outputs whose mixture shifts after `--shift-at` inputs (after the
reference schedule's freeze at 300) and records each schedule's threshold after every input. It
writes `trajectories.png`, `mixture_regime1.png`, `mixture_regime2.png` and `stream_shift.json` to
`--out`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import jax
import numpy as np

from free_jax.threshold import (
    BetaMixture,
    ThresholdConfig,
    ThresholdEstimator,
    _fit_jit,
    _prepare,
    plot_mixture,
    plot_trajectory,
)

# (weight of agree, disagree (alpha, beta), agree (alpha, beta)).
BENCH_MIXTURE = (0.7, (2.0, 8.0), (12.0, 1.5))
REGIME_1 = (0.7, (2.0, 8.0), (12.0, 1.5))  # shallow exit reliable: crossing ~0.548
REGIME_2 = (0.5, (5.0, 3.0), (10.0, 1.5))  # less reliable after the shift: crossing ~0.750


def draw(rng: np.random.Generator, n: int, w_agree: float, disagree, agree):
    labels = rng.uniform(size=n) < w_agree
    conf = np.where(labels, rng.beta(*agree, size=n), rng.beta(*disagree, size=n))
    return conf.astype(np.float32), labels


def true_crossing(w_agree, disagree, agree, zeta=0.4, low=0.3, high=0.9) -> float:
    """Smallest c in [low, high] with P(agree | c) > zeta under the true mixture (grid of 1e-6)."""

    def logpdf(x, a, b):
        return (
            (a - 1) * np.log(x) + (b - 1) * np.log1p(-x)
            - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
        )  # fmt: skip

    grid = np.linspace(low, high, 600_001)
    log_odds = (
        math.log(w_agree) + logpdf(grid, *agree) - math.log(1 - w_agree)
        - logpdf(grid, *disagree)
    )  # fmt: skip
    above = 1 / (1 + np.exp(-log_odds)) > zeta
    return float(grid[np.argmax(above)]) if above.any() else float("nan")


def median_ms(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def bench_fit(sizes: list[int], repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    previous = BetaMixture.default()
    for n in sizes:
        conf, labels = draw(rng, n, *BENCH_MIXTURE)
        for mode in ("supervised", "unsupervised", "reference"):
            labels_or_none = None if mode == "unsupervised" else labels
            reference = mode == "reference"

            def host_call(labels_or_none=labels_or_none, reference=reference, conf=conf):
                return BetaMixture.fit_with_status(conf, labels_or_none, reference=reference)

            x, agree, valid = (jax.device_put(v) for v in _prepare(conf, labels_or_none, None))
            prev = previous.replace(reference=reference)

            def core_call(x=x, agree=agree, valid=valid, prev=prev, mode=mode):
                return _fit_jit(
                    x, agree, valid, prev, 200, 1e-6, 1.0, 10,
                    supervised=mode != "unsupervised", reference=mode == "reference",
                    newton_steps=0 if mode == "reference" else 4,
                )  # fmt: skip

            start = time.perf_counter()
            result = jax.block_until_ready(host_call())
            first_s = time.perf_counter() - start
            mixture = result.mixture
            rows.append(
                {
                    "n": n,
                    "padded": int(x.shape[0]),
                    "mode": mode,
                    "first_call_s": first_s,
                    "host_ms": median_ms(host_call, repeats),
                    "core_ms": median_ms(core_call, repeats),
                    "threshold_ms": median_ms(lambda m=mixture: m.threshold(0.4), repeats),
                    "em_iters": int(result.num_iters),
                    "status": result.fit_status.name,
                    "threshold": float(mixture.threshold(0.4).value),
                }
            )
    return rows


def print_fit_table(rows: list[dict]) -> None:
    crossing = true_crossing(*BENCH_MIXTURE)
    print(f"Fit time after compilation ({jax.devices()[0].platform.upper()}, "
          f"{os.cpu_count()} CPUs visible, jax {jax.__version__}); "
          f"true crossing {crossing:.4f}")  # fmt: skip
    header = (
        f"{'points':>9} {'padded':>9} {'mode':<13} {'1st call s':>10} {'fit ms':>8} "
        f"{'core ms':>8} {'thr ms':>7} {'EM it':>6} {'status':<7} {'threshold':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['n']:>9,} {r['padded']:>9,} {r['mode']:<13} {r['first_call_s']:>10.2f} "
            f"{r['host_ms']:>8.2f} {r['core_ms']:>8.2f} {r['threshold_ms']:>7.2f} "
            f"{r['em_iters']:>6} {r['status']:<7} {r['threshold']:>9.4f}"
        )
    print("fit ms: host-level call on NumPy input (pad + transfer + fit); core ms: jitted fit on")
    print("device-resident padded arrays; thr ms: threshold() (grid 241 + bisection; 10-point grid")
    print("for reference). EM it: EM iterations (1 = single M-step, supervised).")


def stream_shift(out: str, inputs: int, tokens: int, shift_at: int) -> dict:
    rng = np.random.default_rng(1)
    stream = [draw(rng, tokens, *(REGIME_1 if i < shift_at else REGIME_2)) for i in range(inputs)]
    configs = {
        "reference (authors)": ThresholdConfig.reference_preset(),
        "reference schedule, EM fit": ThresholdConfig(schedule="reference"),
        "every 3%": ThresholdConfig(schedule="every", period=0.03, expected_inputs=inputs),
        "every 3%, window 3000": ThresholdConfig(
            schedule="every", period=0.03, expected_inputs=inputs, window=3000
        ),
    }
    c1, c2 = true_crossing(*REGIME_1), true_crossing(*REGIME_2)
    histories, summary = {}, {}
    for name, cfg in configs.items():
        est = ThresholdEstimator(cfg)
        start = time.perf_counter()
        for conf, labels in stream:
            est.update(conf, labels)
        wall = time.perf_counter() - start
        h = est.history
        histories[name] = h
        truth = np.where(np.arange(inputs) < shift_at, c1, c2)
        summary[name] = {
            "refits": len(est.refits),
            "wall_s_incl_compile": round(wall, 2),
            "threshold_before_shift": round(float(h[shift_at - 1]), 4),
            "threshold_final": round(float(h[-1]), 4),
            "mean_abs_err_before_shift": round(float(np.abs(h - truth)[50:shift_at].mean()), 4),
            "mean_abs_err_after_shift": round(float(np.abs(h - truth)[shift_at:].mean()), 4),
        }
        if name == "every 3%, window 3000":
            final_mixture = est.mixture
    plot_trajectory(
        histories,
        os.path.join(out, "trajectories.png"),
        hlines={f"regime 1 crossing {c1:.3f}": c1, f"regime 2 crossing {c2:.3f}": c2},
        vlines={"shift": shift_at, "reference freeze": 300},
        title=f"Threshold per input ({tokens} tokens/input, mixture shifts after {shift_at})",
    )
    first = np.concatenate([c for c, _ in stream[:shift_at]])
    first_labels = np.concatenate([a for _, a in stream[:shift_at]])
    plot_mixture(
        BetaMixture.fit(first, first_labels),
        first,
        first_labels,
        os.path.join(out, "mixture_regime1.png"),
        title="Regime 1: supervised fit on inputs before the shift",
    )
    last = np.concatenate([c for c, _ in stream[shift_at:]])
    last_labels = np.concatenate([a for _, a in stream[shift_at:]])
    plot_mixture(
        final_mixture,
        last,
        last_labels,
        os.path.join(out, "mixture_regime2.png"),
        title="Regime 2: final fit of the windowed 'every 3%' estimator",
    )
    result = {
        "inputs": inputs,
        "tokens_per_input": tokens,
        "shift_at": shift_at,
        "true_crossing_regime1": round(c1, 4),
        "true_crossing_regime2": round(c2, 4),
        "schedules": summary,
    }
    with open(os.path.join(out, "stream_shift.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/tmp/free_jax_threshold", help="directory for outputs")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--inputs", type=int, default=1000, help="stream length")
    parser.add_argument("--tokens", type=int, default=20, help="data points per input")
    parser.add_argument("--shift-at", type=int, default=500, help="inputs before the shift")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    print_fit_table(bench_fit(args.sizes, args.repeats))
    print()
    result = stream_shift(args.out, args.inputs, args.tokens, args.shift_at)
    print(
        f"Stream shift: {result['inputs']} inputs x {result['tokens_per_input']} tokens, mixture "
        f"shifts after input {result['shift_at']}; true crossing "
        f"{result['true_crossing_regime1']} -> {result['true_crossing_regime2']}"
    )
    header = (
        f"{'schedule':<28} {'refits':>6} {'wall s':>7} {'thr@shift':>9} {'thr@end':>8} "
        f"{'MAE before':>10} {'MAE after':>9}"
    )
    print(header)
    print("-" * len(header))
    for name, s in result["schedules"].items():
        print(
            f"{name:<28} {s['refits']:>6} {s['wall_s_incl_compile']:>7.2f} "
            f"{s['threshold_before_shift']:>9.4f} {s['threshold_final']:>8.4f} "
            f"{s['mean_abs_err_before_shift']:>10.4f} {s['mean_abs_err_after_shift']:>9.4f}"
        )
    print(
        "MAE: mean |threshold - true crossing of the current regime| (inputs 51..shift, and after)."
    )
    print(f"Wrote {args.out}/trajectories.png, mixture_regime1.png, mixture_regime2.png, "
          "stream_shift.json")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
