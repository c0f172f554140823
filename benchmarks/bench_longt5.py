"""LongT5 encoder time and peak memory against input length: free_jax against transformers' PyTorch.

A random LongT5-base-shaped encoder (d_model 768, d_kv 64, 12 heads, d_ff 2048, 12 layers, gated
GELU, vocab 32128, local_radius 127, global_block_size 16; the shapes of
google/long-t5-{local,tglobal}-base) encodes one batch of random tokens of each length, with both
attention types. Every (framework, attention, length) runs in a fresh subprocess, so that its
peak memory is its own:

* time: median of `--repeats` encoder calls after a warm-up call (free_jax: after compilation,
  which is reported apart; each call ends with `block_until_ready`; PyTorch: `inference_mode`).
* peak RSS: the subprocess's `resource.getrusage(RUSAGE_SELF).ru_maxrss` at the end: runtime,
  weights, inputs, compiler and activations together.
* free_jax's XLA temp: the compiled encoder's temporary buffers (`memory_analysis()`), i.e. its
  activations and scratch, exactly, without weights, inputs or output.
* PyTorch's work: the growth of the peak RSS during the encoder calls (peak RSS after them minus
  RSS before the first one), which approximates its activations.

The "x" columns divide each quantity by the one at the previous (half) length: 2.0 is linear
growth, 4.0 quadratic. Weights are random and differ between the frameworks (timing and memory do
not depend on their values; `tests/test_longt5.py` checks that the two compute the same function).
free_jax's process also holds the embedding and a one-block decoder (the parameter pytree is the
whole model's); PyTorch's is `LongT5EncoderModel` (embedding and encoder).

    python benchmarks/bench_longt5.py                    # 1k, 2k, 4k, 8k tokens, both types
    python benchmarks/bench_longt5.py --quick            # a small model, 256 and 512 tokens
    python benchmarks/bench_longt5.py --xla-memory-only  # compile only: XLA temp per length

Expected runtime of the full run on 2 CPU cores: tens of minutes (the 8k transient-global encoder
is ~1.8 TFLOP per call); `--quick` takes about a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

BASE = dict(
    vocab_size=32128,
    d_model=768,
    d_kv=64,
    d_ff=2048,
    num_layers=12,
    num_heads=12,
    local_radius=127,
    global_block_size=16,
)
QUICK = dict(
    vocab_size=512,
    d_model=64,
    d_kv=16,
    d_ff=128,
    num_layers=2,
    num_heads=4,
    local_radius=15,
    global_block_size=4,
)
ATTENTION_TYPES = ("local", "transient-global")


def _config(shape: dict, attention: str):
    from free_jax.models.config import T5Config

    return T5Config(
        **shape,
        num_decoder_layers=1,
        dense_act_fn="gelu_new",
        is_gated_act=True,
        tie_word_embeddings=True,
        scale_decoder_outputs=False,
        model_type="t5" if attention == "full" else "longt5",  # "full": T5's, for comparison
        encoder_attention_type=attention,
    )


def _max_rss_mb() -> float:
    # Linux reports kilobytes, macOS bytes.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def _timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _inputs(vocab_size: int, batch: int, length: int):
    import numpy as np

    ids = np.random.default_rng(length).integers(2, vocab_size, (batch, length), dtype=np.int32)
    return ids, np.ones_like(ids)


def worker_jax(shape: dict, attention: str, batch: int, length: int, repeats: int) -> dict:
    import functools

    import jax

    from free_jax.models import t5

    config = _config(shape, attention)
    params = t5.init_params(config, jax.random.key(0))
    params = {"shared": params["shared"], "encoder": params["encoder"]}
    ids, mask = _inputs(config.vocab_size, batch, length)
    ids, mask = jax.device_put(ids), jax.device_put(mask)
    encode = jax.jit(functools.partial(t5.encode, config=config))
    start = time.perf_counter()
    compiled = encode.lower(params, input_ids=ids, attention_mask=mask).compile()
    compile_s = time.perf_counter() - start
    analysis = compiled.memory_analysis()

    def run():
        return jax.block_until_ready(compiled(params, input_ids=ids, attention_mask=mask))

    run()  # warm-up
    times = _timed(run, repeats)
    return dict(
        median_s=statistics.median(times),
        times_s=times,
        compile_s=compile_s,
        xla_temp_mb=analysis.temp_size_in_bytes / 2**20 if analysis else float("nan"),
        peak_rss_mb=_max_rss_mb(),
        device=jax.devices()[0].platform,
    )


def worker_torch(shape: dict, attention: str, batch: int, length: int, repeats: int) -> dict:
    import torch
    import transformers

    config = _config(shape, attention)
    hf = config.to_hf_dict()
    hf.pop("architectures")
    torch.manual_seed(0)
    model = transformers.LongT5EncoderModel(transformers.LongT5Config(**hf)).eval()
    ids, mask = _inputs(config.vocab_size, batch, length)
    ids, mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)

    def run():
        with torch.inference_mode():
            return model(input_ids=ids, attention_mask=mask).last_hidden_state

    before = _current_rss_mb()
    run()  # warm-up
    times = _timed(run, repeats)
    peak = _max_rss_mb()
    return dict(
        median_s=statistics.median(times),
        times_s=times,
        work_mb=peak - before,
        peak_rss_mb=peak,
        threads=torch.get_num_threads(),
    )


def xla_memory_only(shape: dict, attentions, batch: int, lengths) -> None:
    """Compiles free_jax's encoder at each length (abstract weights, nothing runs or allocates)
    and prints XLA's temporary-buffer size: deterministic, so meaningful on a busy machine. T5's
    full attention at the same shapes ("full") is the quadratic baseline."""
    import functools

    import jax

    from free_jax.models import t5

    print("| attention | tokens | XLA temp MB | x | weights MB |")
    print("|---|---|---|---|---|")
    for attention in (*attentions, "full"):
        config = _config(shape, attention)
        params = t5.param_shapes(config)
        params = {"shared": params["shared"], "encoder": params["encoder"]}
        weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)) / 2**20
        encode = jax.jit(functools.partial(t5.encode, config=config))
        previous = None
        for length in lengths:
            ids = jax.ShapeDtypeStruct((batch, length), "int32")
            compiled = encode.lower(params, input_ids=ids, attention_mask=ids).compile()
            temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
            ratio = _fmt(temp / previous if previous else None, ".2f")
            print(f"| {attention} | {length} | {temp:.0f} | {ratio} | {weights:.0f} |", flush=True)
            previous = temp


def _run_worker(framework: str, args, attention: str, length: int) -> dict:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        framework,
        "--attention",
        attention,
        "--lengths",
        str(length),
        "--batch",
        str(args.batch),
        "--repeats",
        str(args.repeats),
    ] + (["--quick"] if args.quick else [])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        return dict(error=" / ".join(tail)[-300:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def _fmt(x, spec: str) -> str:
    return "-" if x is None or x != x else format(x, spec)


def _ratio(rows: list[dict], i: int, key: str):
    if i == 0 or key not in rows[i] or key not in rows[i - 1]:
        return None
    previous = rows[i - 1][key]
    return rows[i][key] / previous if previous else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--attention", nargs="+", choices=ATTENTION_TYPES, default=ATTENTION_TYPES)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a small model at 256 and 512 tokens")
    parser.add_argument("--no-transformers", action="store_true", help="free_jax only")
    parser.add_argument(
        "--xla-memory-only", action="store_true", help="compile free_jax only; print XLA temp"
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = QUICK if args.quick else BASE
    lengths = args.lengths or ([256, 512] if args.quick else [1024, 2048, 4096, 8192])

    if args.xla_memory_only:
        xla_memory_only(shape, args.attention, args.batch, lengths)
        return 0
    if args.worker:
        worker = worker_jax if args.worker == "jax" else worker_torch
        result = worker(shape, args.attention[0], args.batch, lengths[0], args.repeats)
        print(json.dumps(result))
        return 0

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{load:.2f} at start; batch {args.batch}, median of {args.repeats} after a warm-up"
        + (" (quick: small model)" if args.quick else " (LongT5-base-shaped encoder)")
    )
    header = (
        "attention",
        "tokens",
        "free_jax s",
        "x",
        "compile s",
        "XLA temp MB",
        "x",
        "peak RSS MB",
        "HF s",
        "x",
        "HF work MB",
        "x",
        "HF peak RSS MB",
        "HF / free_jax",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    results = []
    for attention in args.attention:
        rows = []
        for length in lengths:
            row = dict(attention=attention, tokens=length)
            ours = _run_worker("jax", args, attention, length)
            row.update({f"jax_{k}": v for k, v in ours.items()})
            if not args.no_transformers:
                theirs = _run_worker("torch", args, attention, length)
                row.update({f"hf_{k}": v for k, v in theirs.items()})
            rows.append(row)
            i = len(rows) - 1
            speedup = None
            if "jax_median_s" in row and "hf_median_s" in row:
                speedup = row["hf_median_s"] / row["jax_median_s"]
            cells = (
                attention,
                str(length),
                _fmt(row.get("jax_median_s"), ".3f"),
                _fmt(_ratio(rows, i, "jax_median_s"), ".2f"),
                _fmt(row.get("jax_compile_s"), ".1f"),
                _fmt(row.get("jax_xla_temp_mb"), ".0f"),
                _fmt(_ratio(rows, i, "jax_xla_temp_mb"), ".2f"),
                _fmt(row.get("jax_peak_rss_mb"), ".0f"),
                _fmt(row.get("hf_median_s"), ".3f"),
                _fmt(_ratio(rows, i, "hf_median_s"), ".2f"),
                _fmt(row.get("hf_work_mb"), ".0f"),
                _fmt(_ratio(rows, i, "hf_work_mb"), ".2f"),
                _fmt(row.get("hf_peak_rss_mb"), ".0f"),
                _fmt(speedup, ".2f"),
            )
            print("| " + " | ".join(cells) + " |", flush=True)
            for key in ("jax_error", "hf_error"):
                if key in row:
                    print(f"# {attention} {length} {key}: {row[key]}", flush=True)
        results.extend(rows)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# load average {load:.2f} at the end")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), rows=results), f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
