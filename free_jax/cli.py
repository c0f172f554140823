"""The `free-jax` command line.

    free-jax decode [TEXT ...] [--model DIR_OR_HUB_NAME] [--ids "5 8 13"]
                    [--method full|static|free|calm|oracle] [--exit-layer N] [--threshold 0.9]
                    [--confidence softmax_diff] [--buffer-capacity K] [--mode default|exact]
                    [--max-wait 0] [--wait-mode hold|draft] [--calm-tau 4]
                    [--max-new-tokens 32] [--dtype float32|bfloat16] [--json]
    free-jax fit-threshold agreement.npz [...]
    free-jax eval --model DIR_OR_HUB --task NAME [...]     (free_jax.eval_cli)
    free-jax demo [--out DIR] [--quick]                  (free_jax.eval_cli)
    free-jax train --config configs/NAME.py [key=value ...] [--print-config]

`decode` without `--model` runs on the embedded default: a tiny T5 built here from a fixed seed,
with a SentencePiece tokenizer trained on the corpus shipped in `free_jax/assets`. It needs no
network and exercises the whole path (tokenize, encode, jitted decode loop, detokenize); its
weights are random, so its words are too.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from free_jax.errors import CheckpointError, ConfigError, DataError, InputError

DEFAULT_TEXTS = (
    "The early exit lets a confident token leave the decoder after a few blocks.",
    "Synchronized parallel decoding keeps the key and value cache of the deep blocks exact.",
)
_DTYPES = ("float32", "bfloat16")


def _decode_parser(sub: argparse._SubParsersAction) -> None:
    from free_jax.decoding import METHODS

    parser = sub.add_parser(
        "decode",
        help="greedy decoding of texts or token ids",
        description="Greedy decoding with free_jax. Without --model, uses the embedded tiny "
        "random model and tokenizer (no network needed).",
    )
    parser.add_argument("texts", nargs="*", help="input texts (default: two sample sentences)")
    parser.add_argument(
        "--model", default=None, help="checkpoint directory or hub name (default: embedded tiny)"
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
        "--calm-tau", type=float, default=4.0, help="calm: threshold decay temperature"
    )
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--min-new-tokens", type=int, default=0)
    parser.add_argument("--dtype", default=None, choices=_DTYPES)
    parser.add_argument("--truncate", action="store_true", help="cut over-long inputs, warned")
    parser.add_argument("--seed", type=int, default=0, help="seed of the embedded default model")
    parser.add_argument("--json", action="store_true", help="print one JSON object per row")


def _threshold_parser(sub: argparse._SubParsersAction) -> None:
    from free_jax.threshold_cli import build_parser

    template = build_parser("free-jax fit-threshold")
    sub.add_parser(
        "fit-threshold",
        parents=[template],
        add_help=False,
        help="fit the adaptive threshold estimator to saved agreement data",
        description=template.description,
    )


def _train_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train",
        help="train with FREE's shallow-deep loss (or CALM's, or the exit classifier)",
        description="Trains (or resumes) the run a preset describes. Presets are Python files in "
        "configs/ defining get_config(); each docstring gives its command and cost.",
    )
    parser.add_argument("--config", required=True, help="preset file, e.g. configs/tiny.py")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides, e.g. steps=100 optim.learning_rate=3e-4 data.batch_size=16",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the final config as JSON and exit"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="free-jax", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _decode_parser(sub)
    _threshold_parser(sub)
    from free_jax import eval_cli

    eval_cli.add_eval_parser(sub)
    eval_cli.add_demo_parser(sub)
    _train_parser(sub)
    return parser


def default_model(seed: int = 0):
    """The embedded default: a tiny random v1.1 model with the tiny-corpus tokenizer."""
    from free_jax import testing
    from free_jax.model import Model

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


def run_decode(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    import free_jax

    if args.ids and args.texts:
        raise InputError("give either texts or --ids, not both.")
    started = time.perf_counter()
    if args.model is None:
        model = default_model(args.seed)
        source = "embedded tiny random model"
    else:
        model = free_jax.load(args.model)
        source = args.model
    if args.dtype is not None:
        model = model.astype(jnp.dtype(args.dtype))
    loaded = time.perf_counter()
    if args.ids:
        inputs, mask = _parse_ids(args.ids)
    else:
        inputs, mask = list(args.texts or DEFAULT_TEXTS), None
    out = free_jax.decode(
        model,
        inputs,
        method=args.method,
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens,
        attention_mask=mask,
        truncate=args.truncate,
        **(
            dict(exit_layer=args.exit_layer)
            if args.method == "static"
            else dict(
                exit_layer=args.exit_layer,
                threshold=args.threshold,
                confidence=args.confidence,
                buffer_capacity=args.buffer_capacity,
                mode=args.mode,
                max_wait=args.max_wait,
                wait_mode=args.wait_mode,
            )
            if args.method == "free"
            else dict(
                exit_layer=args.exit_layer,
                threshold=args.threshold,
                confidence=args.confidence,
                calm_tau=args.calm_tau,
            )
            if args.method == "calm"
            else {}
        ),
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
        f"{model.dtype}); method={args.method}"
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


def run_train(args: argparse.Namespace) -> int:
    import logging

    from free_jax.training import load_config, train
    from free_jax.training.trainer import TrainingDivergedError

    config = load_config(args.config, args.overrides)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2, default=str))
        return 0
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    train_log = logging.getLogger("free_jax.training")
    train_log.addHandler(handler)
    train_log.setLevel(logging.INFO)
    train_log.propagate = False  # orbax's absl logging may have configured the root logger
    started = time.perf_counter()
    try:
        result = train(config)
    except TrainingDivergedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        train_log.removeHandler(handler)
        train_log.propagate = True
    last = {}
    for record in result.history:
        last[record["split"]] = record
    summary = {
        "step": result.step,
        "output_dir": str(result.output_dir),
        "best_step": result.best_step,
        "train_loss": last.get("train", {}).get("loss"),
        **{k: v for k, v in last.get("eval", {}).items() if k.startswith("eval/")},
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "decode":
            return run_decode(args)
        if args.command in ("eval", "demo"):
            from free_jax import eval_cli

            return eval_cli.run_eval(args) if args.command == "eval" else eval_cli.run_demo(args)
        if args.command == "train":
            return run_train(args)
        from free_jax import threshold_cli

        return threshold_cli.run(args)
    except (InputError, ConfigError, CheckpointError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
