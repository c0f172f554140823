"""FREE decoding against full-model decoding, side by side on the same inputs, in one run.

A random t5-base-shaped model (12+12 layers, d_model 768, 12 heads, d_ff 3072, vocab 32128) with
the shallow model at `--exit-layer` blocks (default 3 of 12, the paper's LongT5-base setting).
Random weights give no meaningful confidences (greedy decoding of a random model soon repeats
itself, so its confidences barely vary and the exit rate jumps with the threshold), so exit rates
are controlled with the buffer: at threshold 0 a row exits until its buffer of K is full, which
gives an exit rate of K / (K + 1) (50%, 80%, 89%, 94% for K = 1, 4, 8, 16) with a forced deep
pass every K + 1 tokens. A few rows with thresholds found by bisection on the measured exit rate
follow.

For every row: median ms/token over `--repeats` runs after compilation (each ended with
`block_until_ready`), speed-up over full decoding, and the *ideal* speed-up implied by the
measured exit rate and deep passes: with c_s the measured per-token cost of the shallow model
(static exiting at L_s) and c_d = c_full - c_s the cost of a deep pass over one position,
ideal = T * c_full / (T * c_s + passes * c_d), i.e. what FREE would give if a deep pass over k
pending tokens cost the same as over one and the loop cost nothing extra. On a CPU a pass over k
positions is *not* free (the deep blocks' products become compute-bound after a few positions),
so the table also gives "ideal@pass": the same formula with each pass costed at the measured time
of a lone deep pass of its query-block size (the `pass ms` line), which isolates the loop's own
overhead.

    python benchmarks/bench_free.py [--batch-sizes 1 8] [--new-tokens 64] [--repeats 3]
        [--capacities 1 2 4 8 16] [--rates 0.5 0.8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import free_jax
from free_jax import decoding, testing
from free_jax.decoding import spd
from free_jax.models import shapes, t5

T5_BASE = shapes.t5_v1_0("t5-base")


def timed(fn, repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return out, statistics.median(times), first


def deep_pass_ms(params, config, ids, mask, exit_layer, T, sizes, repeats=15) -> dict[int, float]:
    """Median time of one deep pass (blocks [L_s, L) + the head at one position per row), per
    query-block size, measured alone from a prepared cache and decode-layout weights."""
    B = ids.shape[0]
    fused = jax.jit(t5.fuse_for_decoding)(params)
    enc = t5.encode(params, config, jnp.asarray(ids), jnp.asarray(mask))
    cache = t5.init_decoder_cache(params, config, enc, jnp.asarray(mask), T)

    @jax.jit
    def one_pass(fused, cache, queries):
        out = t5.decoder_blocks(
            fused, config, cache, queries, start=exit_layer, stop=config.num_decoder_layers
        )
        return t5.exit_head(fused, config, out.hidden[:, -1]), out.cache

    costs = {}
    for q in sizes:
        queries = jnp.ones((B, q, config.d_model), jnp.float32)
        _, t, _ = timed(lambda q=queries: one_pass(fused, cache, q), repeats)
        costs[q] = t * 1e3
    return costs


def temp_bytes(jitted, *args, **kwargs) -> int | None:
    """XLA's temporary-buffer size for a compiled call (activations, caches, loop state)."""
    analysis = jitted.lower(*args, **kwargs).compile().memory_analysis()
    if analysis is None:
        return None
    return int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes)


def bench_batch(B: int, model, args, records: list) -> None:
    """Every row of one batch size's table."""
    config, params, T, Ls = model.config, model.decode_params, args.new_tokens, args.exit_layer
    ids = testing.random_ids((B, args.source_length), seed=B, vocab_size=32100)
    mask = np.ones_like(ids)
    # The encoder runs once, outside the timed calls: the tables compare the decode loops.
    enc, enc_mask = decoding.encode_source(params, ids, mask, config=config, length=ids.shape[1])
    common = dict(config=config, max_new_tokens=T, min_new_tokens=T)

    full, t_full, c_full_first = timed(
        lambda: decoding.greedy_full(params, enc, enc_mask, **common), args.repeats
    )
    _, t_static, _ = timed(
        lambda: decoding.greedy_static(params, enc, enc_mask, exit_layer=Ls, **common), args.repeats
    )
    c_full, c_s = t_full / T, t_static / T
    c_d = c_full - c_s

    def free(threshold, K, mode="default", max_wait=0, wait_mode="hold"):
        return decoding.free_decode(
            params,
            enc,
            enc_mask,
            jnp.float32(threshold),
            exit_layer=Ls,
            buffer_capacity=K,
            mode=mode,
            max_wait=max_wait,
            wait_mode=wait_mode,
            **common,
        )

    def calibrate(target: float, iters: int = 10) -> float:
        """The threshold whose measured exit rate is closest to `target` (bisection; the
        threshold is traced, so the search reuses one compilation)."""
        lo, hi = 0.0, 1.0
        best = (2.0, 1.0)
        for _ in range(iters):
            mid = (lo + hi) / 2
            rate = float(np.asarray(free(mid, args.capacity).exited).mean())
            best = min(best, (abs(rate - target), mid))
            lo, hi = (lo, mid) if rate < target else (mid, hi)
        return best[1]

    mem_full = temp_bytes(decoding.greedy_full, params, enc, enc_mask, **common)
    mem_free = temp_bytes(
        decoding.free_decode,
        params,
        enc,
        enc_mask,
        jnp.float32(0.5),
        exit_layer=Ls,
        buffer_capacity=args.capacity,
        **common,
    )
    print(
        f"\n## batch {B}: full {c_full * 1e3:.2f} ms/token (first call "
        f"{c_full_first:.1f} s), shallow-only (static L_s) {c_s * 1e3:.2f} ms/token; "
        f"XLA temp+output memory: full {mem_full / 2**20:.1f} MiB, free "
        f"{mem_free / 2**20:.1f} MiB"
    )
    buffers = {*args.capacities, args.capacity}
    buffers |= {spd.buffer_size(args.capacity, w, "draft") for w in args.waits}
    sizes = sorted({q for K in buffers for q in spd.query_buckets(K)})
    pass_ms = deep_pass_ms(params, config, ids, mask, Ls, T, sizes)
    print(
        "pass ms by query-block size: "
        + ", ".join(f"{q}: {ms:.2f}" for q, ms in sorted(pass_ms.items()))
    )
    print(
        "| mode | K | wait | target rate | threshold | exit rate | deep passes | ms/token | "
        "speed-up | ideal | of ideal | ideal@pass | of ideal@pass |"
    )
    print("|---" * 13 + "|")

    def row(mode, K, target, threshold, max_wait=0, wait_mode="hold"):
        out, t, _ = timed(lambda: free(threshold, K, mode, max_wait, wait_mode), args.repeats)
        exited = np.asarray(out.exited)
        rate = float(exited.mean())
        passes = int(out.num_deep_passes)
        ideal = T * c_full / (T * c_s + passes * c_d)
        buckets = np.asarray(spd.query_buckets(spd.buffer_size(K, max_wait, wait_mode)))
        widths = np.asarray(out.pass_width)[:passes]
        sizes = buckets[np.searchsorted(buckets, widths)]
        pass_cost = sum(pass_ms[int(q)] for q in sizes) / 1e3
        ideal_pass = T * c_full / (T * c_s + pass_cost)
        speedup = t_full / t
        if mode == "exact":
            assert (np.asarray(out.tokens) == np.asarray(full.tokens)).all()
        rec = dict(
            batch=B,
            mode=mode,
            K=K,
            max_wait=max_wait,
            wait_mode=wait_mode,
            target=target,
            threshold=float(threshold),
            exit_rate=rate,
            deep_passes=passes,
            ms_per_token=t / T * 1e3,
            speedup=speedup,
            ideal=ideal,
            ideal_at_pass=ideal_pass,
            full_ms_per_token=c_full * 1e3,
            shallow_ms_per_token=c_s * 1e3,
            mem_full=mem_full,
            mem_free=mem_free,
        )
        records.append(rec)
        print(
            f"| {mode} | {K} | {max_wait} {wait_mode if max_wait else ''} | {target:.2f} | "
            f"{threshold:.4f} | {rate:.2f} | {passes} | {t / T * 1e3:.2f} | "
            f"{speedup:.2f} | {ideal:.2f} | {speedup / ideal:.0%} | {ideal_pass:.2f} | "
            f"{speedup / ideal_pass:.0%} |",
            flush=True,
        )

    # Controlled exit rates: at a threshold below every confidence, a row exits until its
    # buffer is full, so the exit rate is K / (K + 1) and every (K + 1)-th token forces a pass.
    for mode in () if args.skip_k_sweep else ("default", "exact"):
        for K in args.capacities:
            row(mode, K, K / (K + 1), 0.0)
    # Exit rates picked by threshold (with random weights confidences barely vary, so these
    # rates come out coarse; a trained model spreads them).
    for r in args.rates:
        threshold = calibrate(r)
        for wait in args.waits:
            for wait_mode in args.wait_modes if wait else ("hold",):
                for mode in args.threshold_modes:
                    row(mode, args.capacity, r, threshold, max_wait=wait, wait_mode=wait_mode)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--source-length", type=int, default=64)
    parser.add_argument("--exit-layer", type=int, default=3)
    parser.add_argument("--rates", type=float, nargs="*", default=[0.5, 0.8])
    parser.add_argument("--capacities", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--capacity", type=int, default=8, help="K for the threshold rows")
    parser.add_argument(
        "--waits", type=int, nargs="+", default=[0], help="max_wait values for threshold rows"
    )
    parser.add_argument(
        "--wait-modes", nargs="+", default=["hold"], choices=spd.WAIT_MODES, help="with --waits"
    )
    parser.add_argument(
        "--threshold-modes", nargs="+", default=["default"], help="modes for threshold rows"
    )
    parser.add_argument("--skip-k-sweep", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    model = free_jax.Model.random(T5_BASE, seed=0)
    config, T, Ls = model.config, args.new_tokens, args.exit_layer
    print(
        f"# t5-base-shaped random model, L_s = {Ls} of {config.num_decoder_layers}, "
        f"{T} new tokens (EOS suppressed), source {args.source_length}, jax {jax.__version__} "
        f"on {jax.devices()[0].platform}, median of {args.repeats}"
    )
    records = []
    for B in args.batch_sizes:
        bench_batch(B, model, args, records)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
