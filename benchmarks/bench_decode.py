"""Full-model greedy decoding: free_jax against `transformers` PyTorch `generate`, side by side.

Both run the same random checkpoint (t5-small or t5-base shaped), written by free_jax and read by
both, with EOS suppressed (`min_new_tokens = max_new_tokens`) so every run generates exactly the
same number of tokens, and the tokens are compared. For every batch size the benchmark measures,
in interleaved rounds (so that a noisy machine slows all of them alike):

- free_jax end to end (encoder included, as in `generate`) and decode only (the encoder output
  computed beforehand), each call ended with `block_until_ready`;
- transformers' `generate` (PyTorch, float32, its default thread count);
- the weight-read floor: a jitted loop whose every pass reads every decoder-side weight once
  (decoder blocks, final norm, LM head; not the cross-attention K/V projections, which run
  once per input), one pass per generated token, as independent matrix-vector products, XLA's
  fastest way to stream a matrix here (a plain `sum` reduction reads at about half the rate).
  Each generated token must read all of these weights, so decode ms/token cannot go below the
  time per pass. It is measured, not computed from a nominal bandwidth: on this kind of
  machine the weights of a small model partly stay in a large L3 cache, and a streaming
  benchmark over a buffer larger than the cache would misstate the floor either way.

Medians over `--rounds`, after compilation (compile time reported apart).

    python benchmarks/bench_decode.py [--shape t5-small|t5-base] [--batch-sizes 1 8]
        [--new-tokens 64] [--rounds 7] [--no-transformers] [--census] [--products]
        [--xla-option KEY=VALUE] [--json FILE]

`--census` also profiles one decode call at each batch size and prints what runs per generated
token: XLA thunks by kind (count and share of the thunk time), and the matrix products by output
shape, which is where the time beyond the floor goes.

`--products` also times, at each batch size, the decoder-side matrix products alone (every 2-D
weight above times a [batch, in] input, once per generated token), chained as a decode step runs
them (each product's input depends on the previous product's output, so none run concurrently),
in XLA and in PyTorch (`torch.matmul`, its default threads). The step costs at least its
products; the gap between the two frameworks' products, and each framework's step over its own
products, say where the time beyond the floor goes at batch > 1 (compute, or per-step overhead).

`--xla-option KEY=VALUE` (repeatable) also times float32 decoding compiled with that XLA
option (`Lowered.compile(compiler_options=...)`: that one program only, over the options every
decode program has, `free_jax.decoding.xla_options.CPU_COMPILER_OPTIONS`), in the same rounds,
e.g. `--xla-option xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT`
(single matrix products go to YNNPACK again; the decode programs give it none).

`--weights f32 bf16 int8 int8-dynamic` also times the same model with other decoder weights, in
the same rounds: bf16 (`Model.astype`: weights and activations) and the int8 modes of
`Model.quantize` (`free_jax.models.quantize`). A second table gives each one's decode and end to
end ms/token, its speed over float32 decoding, over `generate` (float32), for int8-dynamic also
over `generate` with PyTorch's dynamic int8 quantization of every `nn.Linear` (the same kind of
product), and the share of its tokens that equal float32's (random weights: an argmax between
near-equal logits can flip).
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import json
import os
import platform
import re
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import free_jax
from free_jax import decoding, testing
from free_jax.evaluation import bench
from free_jax.models import shapes

T5_SMALL = shapes.t5_v1_0("t5-small")


def decoder_side_weights(model: free_jax.Model) -> list[jax.Array]:
    """The arrays each generated token reads at batch 1: decoder blocks, final norm, LM head."""
    return bench.decoder_weights(model, 0, model.config.num_decoder_layers)


def decoder_side_bytes(model: free_jax.Model) -> int:
    return sum(x.nbytes for x in decoder_side_weights(model))


@functools.partial(jax.jit, static_argnames="times")
def _read_all(arrays, vectors, times):
    """Reads every array `times` times, as matrix-vector products (vectors: [1, rows] inputs; a
    constant vector of ones would be rewritten by XLA into a slower reduction). The products
    of one pass are independent, so XLA may run them concurrently; each pass depends on the
    last, so none is hoisted out of the loop."""

    def one_pass(_, carry):
        total = carry
        for a, x in zip(arrays, vectors, strict=True):
            x = x + carry * 1e-30 if x is not None else None
            total = total + (jnp.sum(x @ a) if a.ndim == 2 else jnp.sum(a))
        return total

    return jax.lax.fori_loop(0, times, one_pass, jnp.zeros((), jnp.float32))


@functools.partial(jax.jit, static_argnames="times")
def _chained_products(kernels, x, times):
    """`times` passes of `x[:, :in] @ w` over `kernels` in order, each input depending on the
    previous product (a step's order: no two products run at once); x: [batch, widest in]."""

    def one_pass(_, carry):
        for w in kernels:
            y = (x[:, : w.shape[0]] + carry * 1e-30) @ w
            carry = y[0, 0]
        return carry

    return jax.lax.fori_loop(0, times, one_pass, jnp.zeros((), x.dtype))


def products_calls(weights, batch, times):
    """The decoder-side products of one token at `batch` rows, `times` times: in XLA, and in
    PyTorch on the same values (None without torch)."""
    kernels = [w for w in weights if w.ndim == 2]
    widest = max(w.shape[0] for w in kernels)
    x = np.random.default_rng(1).standard_normal((batch, widest)).astype(np.float32)
    xla = lambda: jax.block_until_ready(_chained_products(kernels, jnp.asarray(x), times))  # noqa: E731
    try:
        import torch
    except ImportError:
        return xla, None
    t_kernels = [torch.from_numpy(np.array(w, np.float32)) for w in kernels]
    t_x = torch.from_numpy(x)

    def pytorch():
        carry = torch.zeros(())
        with torch.inference_mode():
            for _ in range(times):
                for w in t_kernels:
                    y = torch.matmul(t_x[:, : w.shape[0]] + carry * 1e-30, w)
                    carry = y[0, 0]
        return carry

    return xla, pytorch


def weight_reader(weights, times):
    """A call that reads the decoder-side weights `times` times in one jitted loop, the way the
    decode loop reads them once per token (so that both see the same cache state)."""
    rng = np.random.default_rng(0)
    vectors = [
        jnp.asarray(rng.standard_normal((1, w.shape[0])), w.dtype) if w.ndim == 2 else None
        for w in weights
    ]
    return lambda: jax.block_until_ready(_read_all(weights, vectors, times))


class Timer:
    """Named callables timed in interleaved rounds.

    Each call starts after a pause: PyTorch's OpenMP workers and XLA's thread pool spin for a
    while after their work ends, and a call timed during that window shares the two cores with
    them (this made whichever ran after `generate` up to 1.7x slower).
    """

    PAUSE_S = 0.2

    def __init__(self):
        self.fns, self.times = {}, collections.defaultdict(list)

    def add(self, name, fn):
        fn()  # compiles or warms up
        fn()
        self.fns[name] = fn

    def run(self, rounds):
        for _ in range(rounds):
            for name, fn in self.fns.items():
                time.sleep(self.PAUSE_S)
                start = time.perf_counter()
                fn()
                self.times[name].append(time.perf_counter() - start)

    def median(self, name):
        return statistics.median(self.times[name])


def free_jax_calls(model, ids, mask, new_tokens):
    params, config = model.decode_params, model.config

    def decode(encoded):
        return decoding.greedy_full(
            params, *encoded, config=config, max_new_tokens=new_tokens, min_new_tokens=new_tokens
        )

    def end_to_end():
        encoded = decoding.encode_source(
            model.params, ids, mask, config=config, length=ids.shape[1]
        )
        return jax.block_until_ready(decode(encoded).tokens)

    encoded = jax.block_until_ready(
        decoding.encode_source(model.params, ids, mask, config=config, length=ids.shape[1])
    )

    def decode_only():
        return jax.block_until_ready(decode(encoded).tokens)

    return end_to_end, decode_only


def option_call(model, ids, mask, new_tokens, option: str):
    """Decode only, float32, the program compiled with one XLA option `KEY=VALUE`."""
    key, _, value = option.partition("=")
    encoded = jax.block_until_ready(
        decoding.encode_source(model.params, ids, mask, config=model.config, length=ids.shape[1])
    )
    lengths = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    lowered = decoding.greedy_full.lower(
        model.decode_params, *encoded, config=model.config, **lengths
    )
    try:
        compiled = lowered.compile(compiler_options={key: value})
    except Exception as e:  # XLA names the option and why it is refused
        raise SystemExit(f"--xla-option {option!r} is refused: {e}") from None
    return lambda: jax.block_until_ready(compiled(model.decode_params, *encoded).tokens)


def transformers_call(ref, ids, mask, new_tokens):
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

    return run


def thunk_census(fn, hlo: str, steps: int) -> tuple[collections.Counter, collections.Counter, dict]:
    """Profiles `fn()` once; returns (count, microseconds) per thunk kind per step, and dots.

    Thunk names are XLA's instruction names (`dot.12`, `add_rsqrt_fusion.3`); their kind is the
    name without the numeric suffix. Matrix products (XLA's own `dot` thunks and the library
    fusions it hands them to, `ynn_fusion`/`xnn_fusion`/`onednn_fusion`) are also keyed by their
    output shape, read from `hlo`, the compiled HLO text of the program `fn` runs.
    """
    from jax.profiler import ProfileData

    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory):
            fn()
        (path,) = glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True)
        profile = ProfileData.from_file(path)
    out_shapes = dict(re.findall(r"%([\w.-]+) = (\S+) (?:dot|fusion)\(", hlo))
    count, micros = collections.Counter(), collections.Counter()
    dots = collections.defaultdict(lambda: [0, 0.0])
    for plane in profile.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLAEigen"):  # the threads that run thunks
                continue
            for event in line.events:
                name = event.name
                if name.startswith(("ThunkExecutor", "end:", "SlinkyThreadPool")):
                    continue
                kind = re.sub(r"[.\d]+$", "", name)
                count[kind] += 1 / steps
                micros[kind] += event.duration_ns / 1e3 / steps
                if kind in ("dot", "ynn_fusion", "xnn_fusion", "onednn_fusion"):
                    key = f"{kind} -> {out_shapes.get(name, '?')}"
                    dots[key][0] += 1 / steps
                    dots[key][1] += event.duration_ns / 1e3 / steps
    return count, micros, dict(dots)


def print_census(batch, census):
    count, micros, dots = census
    total = sum(micros.values())
    print(
        f"\n# batch {batch}: {sum(count.values()):.0f} thunks per generated token, "
        f"{total / 1e3:.2f} ms of thunk time per token under the profiler"
    )
    print("| thunk kind | per token | share of thunk time |")
    print("|---|---|---|")
    for kind, us in micros.most_common(12):
        print(f"| {kind} | {count[kind]:.1f} | {us / total:.1%} |")
    print("| matrix products by output shape | per token | share of thunk time |")
    print("|---|---|---|")
    for shape, (n, us) in sorted(dots.items(), key=lambda kv: -kv[1][1]):
        print(f"| {shape} | {n:.1f} | {us / total:.1%} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=shapes.NAMES, default="t5-small")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--source-length", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-transformers", action="store_true", help="free_jax only")
    parser.add_argument("--census", action="store_true", help="profile thunks per token")
    parser.add_argument(
        "--products", action="store_true", help="also time the step's matrix products alone"
    )
    parser.add_argument(
        "--xla-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="also time decoding compiled with this XLA option (repeatable)",
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument(
        "--weights",
        nargs="+",
        default=["f32"],
        choices=bench.DECODE_WEIGHTS,
        help="decoder weight formats timed side by side (f32 is always the baseline)",
    )
    args = parser.parse_args(argv)
    if min(args.batch_sizes) < 1:
        parser.error(f"--batch-sizes must be >= 1, got {args.batch_sizes}")
    for option in args.xla_option:
        if "=" not in option or option.startswith("="):
            parser.error(f"--xla-option {option!r} is invalid: KEY=VALUE")

    model = free_jax.Model.random(shapes.t5_v1_0(args.shape), seed=0)
    weights = decoder_side_weights(model)
    weight_mb = decoder_side_bytes(model) / 1e6
    ref = ref_int8 = None
    if not args.no_transformers:
        import torch

        with tempfile.TemporaryDirectory() as directory:
            free_jax.export_hf(model, directory)
            ref = testing.load_hf_reference(directory)
        threads = torch.get_num_threads()
        if "int8-dynamic" in args.weights:
            # PyTorch's own CPU int8: dynamic quantization of every nn.Linear (int8 weights per
            # channel, activations quantized at run time), the counterpart of int8-dynamic.
            ref_int8 = torch.ao.quantization.quantize_dynamic(
                ref, {torch.nn.Linear}, dtype=torch.qint8
            )
    print(
        f"# {args.shape}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}"
        + (f", torch threads {threads}" if ref is not None else "")
        + f"; {args.new_tokens} new tokens, source length {args.source_length}, "
        f"medians of {args.rounds} interleaved rounds"
    )
    header = (
        "batch",
        "floor ms/tok",
        "decode ms/tok",
        "x floor",
        "e2e ms/tok",
        "HF ms/tok",
        "HF / ours",
        "same tokens",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    rows, censuses = [], {}
    others = [w for w in dict.fromkeys(args.weights) if w != "f32"]
    variants = {w: bench.with_decode_weights(model, w) for w in others}
    variant_rows = []
    fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
    for batch in args.batch_sizes:
        ids = testing.random_ids((batch, args.source_length), seed=batch, vocab_size=32100)
        mask = np.ones_like(ids)
        timer = Timer()
        timer.add("floor", weight_reader(weights, args.new_tokens))
        if args.products:
            xla_products, torch_products = products_calls(weights, batch, args.new_tokens)
            timer.add("products xla", xla_products)
            if torch_products is not None and not args.no_transformers:
                timer.add("products torch", torch_products)
        end_to_end, decode_only = free_jax_calls(model, ids, mask, args.new_tokens)
        start = time.perf_counter()
        ours_tokens = np.asarray(end_to_end())  # compiles both jitted parts
        compile_s = time.perf_counter() - start
        timer.add("end_to_end", end_to_end)
        timer.add("decode_only", decode_only)
        variant_tokens = {}
        for name, variant in variants.items():
            v_end_to_end, v_decode_only = free_jax_calls(variant, ids, mask, args.new_tokens)
            variant_tokens[name] = np.asarray(v_end_to_end())
            timer.add(f"end_to_end {name}", v_end_to_end)
            timer.add(f"decode_only {name}", v_decode_only)
        option_tokens = {}
        for option in args.xla_option:
            call = option_call(model, ids, mask, args.new_tokens, option)
            option_tokens[option] = np.asarray(call())
            timer.add(f"option {option}", call)
        if ref is not None:
            hf = transformers_call(ref, ids, mask, args.new_tokens)
            hf_tokens = hf().numpy()[:, 1:]
            timer.add("transformers", hf)
        if ref_int8 is not None:
            timer.add(
                "transformers int8-dynamic", transformers_call(ref_int8, ids, mask, args.new_tokens)
            )
        timer.run(args.rounds)
        per_token = {k: timer.median(k) / args.new_tokens * 1e3 for k in timer.fns}
        floor_ms = per_token["floor"]  # one read of the weights = one token's floor
        row = dict(
            batch=batch,
            floor_ms_per_token=floor_ms,
            weight_read_gbs=weight_mb / floor_ms,
            decode_ms_per_token=per_token["decode_only"],
            end_to_end_ms_per_token=per_token["end_to_end"],
            compile_s=compile_s,
            times_s={k: v for k, v in timer.times.items()},
        )
        hf_ms = speedup = same = None
        if ref is not None:
            hf_ms = per_token["transformers"]
            speedup = hf_ms / per_token["end_to_end"]
            same = float((hf_tokens == ours_tokens).mean())
            row.update(hf_ms_per_token=hf_ms, speedup_over_hf=speedup, token_agreement=same)
        row["xla_options"] = [
            dict(
                option=option,
                decode_ms_per_token=per_token[f"option {option}"],
                speedup_over_default=per_token["decode_only"] / per_token[f"option {option}"],
                same_tokens=float((option_tokens[option] == ours_tokens).mean()),
            )
            for option in args.xla_option
        ]
        if args.products:
            row.update(
                products_xla_ms_per_token=per_token["products xla"],
                products_torch_ms_per_token=per_token.get("products torch"),
            )
        rows.append(row)
        print(
            f"| {batch} | {floor_ms:.2f} | {per_token['decode_only']:.2f} | "
            f"{per_token['decode_only'] / floor_ms:.2f} | {per_token['end_to_end']:.2f} | "
            f"{fmt(hf_ms, '.2f')} | {fmt(speedup, '.2f')} | {fmt(same, '.3f')} |",
            flush=True,
        )
        for name in variants:
            decode_ms = per_token[f"decode_only {name}"]
            e2e_ms = per_token[f"end_to_end {name}"]
            variant_rows.append(
                dict(
                    batch=batch,
                    weights=name,
                    decode_ms_per_token=decode_ms,
                    end_to_end_ms_per_token=e2e_ms,
                    speedup_over_f32=per_token["decode_only"] / decode_ms,
                    speedup_over_hf=None if ref is None else per_token["transformers"] / e2e_ms,
                    speedup_over_hf_same_format=(
                        per_token["transformers int8-dynamic"] / e2e_ms
                        if name == "int8-dynamic" and ref_int8 is not None
                        else None
                    ),
                    same_tokens_as_f32=float((variant_tokens[name] == ours_tokens).mean()),
                )
            )
        if args.census:
            encoded = decoding.encode_source(
                model.params, ids, mask, config=model.config, length=ids.shape[1]
            )
            hlo = (
                decoding.greedy_full.lower(
                    model.decode_params,
                    *encoded,
                    config=model.config,
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                )
                .compile()
                .as_text()
            )
            censuses[batch] = thunk_census(decode_only, hlo, args.new_tokens)
    rates = ", ".join(format(r["weight_read_gbs"], ".1f") for r in rows)
    print(
        f"# floor: per-token time of a jitted loop that reads the {weight_mb:.1f} MB of "
        f"decoder-side weights once per pass ({rates} GB/s in the rows above); at batch > 1 "
        "the same bytes are read, and the rest is compute"
    )
    if args.products:
        print(
            "\n| batch | products ms/tok, XLA | products ms/tok, PyTorch | our decode / XLA "
            "products | HF e2e / PyTorch products |"
        )
        print("|---|---|---|---|---|")
        for r in rows:
            torch_ms, hf_ms = r["products_torch_ms_per_token"], r.get("hf_ms_per_token")
            hf_over_torch = None if torch_ms is None or hf_ms is None else hf_ms / torch_ms
            print(
                f"| {r['batch']} | {r['products_xla_ms_per_token']:.2f} | {fmt(torch_ms, '.2f')} | "
                f"{r['decode_ms_per_token'] / r['products_xla_ms_per_token']:.2f} | "
                f"{fmt(hf_over_torch, '.2f')} |"
            )
    if args.xla_option:
        print("\n| batch | XLA option | decode ms/tok | over default | same tokens |")
        print("|---|---|---|---|---|")
        for r in rows:
            for o in r["xla_options"]:
                print(
                    f"| {r['batch']} | `{o['option']}` | {o['decode_ms_per_token']:.2f} | "
                    f"{o['speedup_over_default']:.2f}x | {o['same_tokens']:.3f} |"
                )
    if variant_rows:
        print(
            "\n| batch | weights | decode ms/tok | x f32 floor | over f32 decode | "
            "e2e ms/tok | HF / ours | HF int8 / ours | same tokens as f32 |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        floors = {r["batch"]: r["floor_ms_per_token"] for r in rows}
        for r in variant_rows:
            hf = "-" if r["speedup_over_hf"] is None else f"{r['speedup_over_hf']:.2f}"
            same = r["speedup_over_hf_same_format"]
            hf_int8 = "-" if same is None else f"{same:.2f}"
            print(
                f"| {r['batch']} | {r['weights']} | {r['decode_ms_per_token']:.2f} | "
                f"{r['decode_ms_per_token'] / floors[r['batch']]:.2f} | "
                f"{r['speedup_over_f32']:.2f}x | {r['end_to_end_ms_per_token']:.2f} | {hf} | "
                f"{hf_int8} | "
                f"{r['same_tokens_as_f32']:.3f} |"
            )
    for batch, census in censuses.items():
        print_census(batch, census)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), rows=rows, weight_variants=variant_rows), f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
