"""`free-jax decode`: greedy decoding of texts or token ids with any method.

Without `--model` it decodes with the shipped demo model (`free_jax.load("demo")`), a small T5
trained here to restore the punctuation of sentences from ACL papers, so the default output
means something. `--model tiny-random` gives a tiny random model with a SentencePiece tokenizer
trained on a corpus shipped in `free_jax/assets` (it exercises the whole path; its words are
random).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from free_jax.cli import compile_cache
from free_jax.errors import InputError

TINY_RANDOM = "tiny-random"
DEFAULT_TEXTS = (
    "The early exit lets a confident token leave the decoder after a few blocks.",
    "Synchronized parallel decoding keeps the key and value cache of the deep blocks exact.",
)
# The demo model's task: its inputs carry the task prefix and no punctuation.
DEMO_TEXTS = (
    "restore: However the deep model only runs when the shallow model is not confident",
    "restore: We thank the anonymous reviewers for their helpful comments",
)
_DTYPES = ("float32", "bfloat16")


def add_parser(sub: argparse._SubParsersAction) -> None:
    from free_jax.decoding import METHODS

    parser = sub.add_parser(
        "decode",
        help="greedy decoding of texts or token ids",
        description="Greedy decoding with free_jax. Without --model, uses the shipped demo "
        "model, which restores the punctuation of English sentences (no network needed); "
        f"--model {TINY_RANDOM} gives a tiny random model with a toy tokenizer.",
    )
    parser.add_argument(
        "texts", nargs="*", help="input texts (default: sample sentences for the model)"
    )
    parser.add_argument(
        "--model",
        default=None,
        help="checkpoint directory, hub name, 'demo' (the default: the shipped demo model) or "
        f"{TINY_RANDOM!r} (a tiny random model, for trying the machinery)",
    )
    parser.add_argument(
        "--ids",
        action="append",
        default=None,
        help='one input row of space-separated token ids, e.g. "13 7 42"; repeat for a batch',
    )
    parser.add_argument("--method", default="full", choices=METHODS)
    parser.add_argument(
        "--exit-layer", type=int, default=None, help="static/free: blocks of the early exit"
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="free/calm: exit threshold (default: the checkpoint's, else 0.9)",
    )
    parser.add_argument(
        "--confidence",
        default=None,
        help="free/calm: softmax_diff, softmax_max, state_cosine or meta (default: the "
        "checkpoint's, else softmax_diff)",
    )
    parser.add_argument(
        "--buffer-capacity",
        type=int,
        default=None,
        help="free: pending buffer K (default: the checkpoint's, else 8)",
    )
    parser.add_argument("--mode", default="default", help="free: default, exact or rollback")
    parser.add_argument("--max-wait", type=int, default=0, help="free: steps a row may wait")
    parser.add_argument("--wait-mode", default="hold", help="free: hold or draft")
    parser.add_argument(
        "--shallow-head",
        default=None,
        help="free: int8-dynamic decides exits with an int8 copy of the LM head (faster at large "
        "vocabularies; the deep exit keeps the model's head)",
    )
    parser.add_argument(
        "--calm-tau", type=float, default=4.0, help="calm: threshold decay temperature"
    )
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--min-new-tokens", type=int, default=0)
    parser.add_argument("--dtype", default=None, choices=_DTYPES)
    parser.add_argument(
        "--quantize",
        default=None,
        help="int8 decoder weights: int8 or int8-dynamic (the fast one on CPU; Model.quantize)",
    )
    parser.add_argument("--truncate", action="store_true", help="cut over-long inputs, warned")
    parser.add_argument("--seed", type=int, default=0, help=f"seed of the {TINY_RANDOM} model")
    parser.add_argument("--json", action="store_true", help="print one JSON object per row")
    compile_cache.add_arguments(parser)


def tiny_random_model(seed: int = 0):
    """A tiny random v1.1 model with the tiny-corpus tokenizer (`--model tiny-random`)."""
    from free_jax import testing
    from free_jax.models.model import Model

    tokenizer = testing.tiny_tokenizer()
    config = testing.tiny_config("v1.1", num_layers=4, num_decoder_layers=6)
    return Model.random(config, seed, tokenizer=tokenizer)


def _parse_ids(rows: list[str]):
    import numpy as np

    parsed = []
    for row in rows:
        try:
            parsed.append([int(x) for x in row.replace(",", " ").split()])
        except ValueError:
            raise InputError(f"--ids {row!r} is not a list of integers.") from None
    width = max(len(r) for r in parsed)
    ids = np.zeros((len(parsed), width), np.int32)  # T5 pads with id 0
    mask = np.zeros_like(ids)
    for i, r in enumerate(parsed):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask


def run(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from free_jax.checkpoints import load
    from free_jax.decoding import decode

    if args.ids and args.texts:
        raise InputError("give either texts or --ids, not both.")
    started = time.perf_counter()
    source = args.model or "demo"
    if source == TINY_RANDOM:
        model = tiny_random_model(args.seed)
    else:
        model = load(source)
    if args.dtype is not None:
        model = model.astype(jnp.dtype(args.dtype))
    if args.quantize is not None:
        model = model.quantize(args.quantize)
    loaded = time.perf_counter()
    if args.ids:
        inputs, mask = _parse_ids(args.ids)
    else:
        default = DEMO_TEXTS if source == "demo" else DEFAULT_TEXTS
        inputs, mask = list(args.texts or default), None
    out = decode(
        model,
        inputs,
        method=args.method,
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens,
        attention_mask=mask,
        truncate=args.truncate,
        # Every method reads the options it takes and ignores the others.
        exit_layer=args.exit_layer,
        threshold=args.threshold,
        confidence=args.confidence,
        buffer_capacity=args.buffer_capacity,
        mode=args.mode,
        max_wait=args.max_wait,
        wait_mode=args.wait_mode,
        calm_tau=args.calm_tau,
        shallow_head=args.shallow_head,
    )
    done = time.perf_counter()
    for i in range(out.tokens.shape[0]):
        row = out.tokens[i, : out.lengths[i]].tolist()
        text = out.texts[i] if out.texts is not None else None
        if args.json:
            record = {"row": i, "tokens": row, "text": text}
            if args.method in ("free", "calm", "static", "oracle"):
                record["exited"] = out.exited[i, : out.lengths[i]].tolist()
            print(json.dumps(record))
        else:
            print(f"[{i}] {text!r}" if text is not None else f"[{i}]", "tokens:", row)
    print(
        f"# model: {source} ({model.config.num_layers}+{model.config.num_decoder_layers} layers, "
        f"{model.dtype}"
        + (f", {model.quantization} decoder weights" if model.quantization else "")
        + f"); method={args.method}"
        + (
            f", exit rate {out.exit_rate:.0%}, {out.num_deep_passes} deep passes"
            if args.method in ("free", "calm")
            else ""
        )
        + f"; load {loaded - started:.1f}s, "
        f"decode (incl. compile) {done - loaded:.1f}s",
        file=sys.stderr,
    )
    return 0
