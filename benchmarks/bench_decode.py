"""Full-model greedy decoding: free_jax against `transformers` PyTorch `generate`, side by side.

Both run the same random t5-small-shaped checkpoint (d_model 512, 6+6 layers, 8 heads, d_ff 2048,
vocab 32128), written by free_jax and read by both, with EOS suppressed (`min_new_tokens =
max_new_tokens`) so every run generates exactly the same number of tokens. free_jax's compile time
is reported apart from its run time; run times are medians over `--repeats` runs after a warm-up,
each ended with `block_until_ready`.

    python benchmarks/bench_decode.py [--batch-sizes 1 8] [--new-tokens 64] [--repeats 7]

Memory-bound floor at batch 1: each new token reads every decoder weight and the LM head once, so
ms/token >= decoder-side bytes / memory bandwidth (`--bandwidth-gbs`, 30 GB/s measured for a
matrix-vector product on the development machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import jax
import numpy as np

import free_jax
from free_jax import decoding, testing
from free_jax.models.config import T5Config

T5_SMALL = T5Config(
    vocab_size=32128,
    d_model=512,
    d_kv=64,
    d_ff=2048,
    num_layers=6,
    num_decoder_layers=6,
    num_heads=8,
    dense_act_fn="relu",
    is_gated_act=False,
    tie_word_embeddings=True,
    scale_decoder_outputs=True,
)


def decoder_side_bytes(model: free_jax.Model) -> int:
    """Bytes read per generated token at batch 1: decoder blocks, final norm, LM head."""
    decoder = model.params["decoder"]
    leaves = jax.tree.leaves(decoder["blocks"]) + [decoder["final_norm"]]
    # The head is the embedding matrix when tied, a separate [D, V] matrix otherwise.
    leaves.append(model.params.get("lm_head", model.params["shared"]["embedding"]))
    # Cross-attention K/V projections run once per input (into the cache), not per token.
    per_input = sum(b["cross_attn"][n].nbytes for b in decoder["blocks"] for n in ("k", "v"))
    return sum(x.nbytes for x in leaves) - per_input


def median_seconds(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def bench_free_jax(model, ids, mask, new_tokens, repeats):
    def run():  # the encoder included, as in transformers' generate
        encoded = decoding.encode_source(
            model.params, ids, mask, config=model.config, length=ids.shape[1]
        )
        result = decoding.greedy_full(
            model.decode_params,
            *encoded,
            config=model.config,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
        )
        return jax.block_until_ready(result.tokens)

    start = time.perf_counter()
    tokens = run()  # compiles
    first = time.perf_counter() - start
    run()  # warm-up
    median, times = median_seconds(run, repeats)
    return dict(
        first_call_s=first,
        compile_s=first - median,
        median_s=median,
        times=times,
        tokens=np.asarray(tokens),
    )


def bench_transformers(ref, ids, mask, new_tokens, repeats):
    import torch

    ids_t = torch.tensor(ids, dtype=torch.long)
    mask_t = torch.tensor(mask, dtype=torch.long)

    def run():
        with torch.inference_mode():
            return ref.generate(
                input_ids=ids_t,
                attention_mask=mask_t,
                do_sample=False,
                num_beams=1,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
            )

    run()  # warm-up
    median, times = median_seconds(run, repeats)
    return dict(median_s=median, times=times, tokens=run().numpy()[:, 1:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--source-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--bandwidth-gbs", type=float, default=30.0)
    parser.add_argument("--no-transformers", action="store_true", help="free_jax only")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    model = free_jax.Model.random(T5_SMALL, seed=0)
    floor_ms = decoder_side_bytes(model) / (args.bandwidth_gbs * 1e9) * 1e3
    ref = None
    if not args.no_transformers:
        import torch

        with tempfile.TemporaryDirectory() as directory:
            free_jax.export_hf(model, directory)
            ref = testing.load_hf_reference(directory)
        threads = torch.get_num_threads()
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, jax "
        f"{jax.__version__} on {jax.devices()[0].platform}"
        + (f", torch threads {threads}" if ref is not None else "")
    )
    print(
        f"# batch-1 floor: {decoder_side_bytes(model) / 1e6:.1f} MB decoder-side weights per "
        f"token at {args.bandwidth_gbs:g} GB/s = {floor_ms:.2f} ms/token"
    )
    header = ("batch", "free_jax ms/tok", "compile s", "HF ms/tok", "speed-up", "x floor", "same")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    rows = []
    for batch in args.batch_sizes:
        ids = testing.random_ids((batch, args.source_length), seed=batch, vocab_size=32100)
        mask = np.ones_like(ids)
        ours = bench_free_jax(model, ids, mask, args.new_tokens, args.repeats)
        ours_ms = ours["median_s"] / args.new_tokens * 1e3
        row = dict(
            batch=batch,
            free_jax_ms_per_token=ours_ms,
            compile_s=ours["compile_s"],
            free_jax_times_s=ours["times"],
            floor_ms_per_token=floor_ms,
        )
        theirs_ms = speedup = same = None
        if ref is not None:
            theirs = bench_transformers(ref, ids, mask, args.new_tokens, args.repeats)
            theirs_ms = theirs["median_s"] / args.new_tokens * 1e3
            speedup = theirs_ms / ours_ms
            # Same checkpoint, same greedy rule: the tokens should agree (float ties aside).
            same = float((theirs["tokens"] == ours["tokens"]).mean())
            row.update(
                hf_ms_per_token=theirs_ms,
                hf_times_s=theirs["times"],
                speedup=speedup,
                token_agreement=same,
            )
        rows.append(row)
        fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
        print(
            f"| {batch} | {ours_ms:.2f} | {ours['compile_s']:.2f} | {fmt(theirs_ms, '.2f')} | "
            f"{fmt(speedup, '.2f')} | {ours_ms / floor_ms:.2f} | {fmt(same, '.3f')} |",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), rows=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
