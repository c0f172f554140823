"""Test kit: tiny configurations, random models, a tiny tokenizer, reference checkpoints.

Every test builds its models here, so tests stay fast, deterministic and offline. The reference
helpers (`make_hf_checkpoint`) need torch and are used only by parity tests.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from free_jax.models import exit_classifier
from free_jax.models.config import T5Config
from free_jax.models.model import Model

VARIANTS = ("v1.0", "v1.1", "mt5")
TINY_VOCAB = 128
_TOKENIZER_EXTRA_IDS = 8


def tiny_config(variant: str = "v1.1", **overrides: Any) -> T5Config:
    """A tiny T5 of the given family; `overrides` replace any field.

    v1.0: ReLU feed-forward, head tied to the embedding, decoder output rescaled.
    v1.1: gated-GELU, separate LM head, no rescale (also Flan-T5). mt5: v1.1 labelled mT5.
    Head dim times heads (4 * 12 = 48) deliberately differs from d_model (32).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}; valid: {VARIANTS}.")
    base = dict(
        vocab_size=TINY_VOCAB,
        d_model=32,
        d_kv=12,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=4,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
    )
    if variant == "v1.0":
        base.update(
            dense_act_fn="relu",
            is_gated_act=False,
            tie_word_embeddings=True,
            scale_decoder_outputs=True,
        )
    else:
        base.update(
            dense_act_fn="gelu_new",
            is_gated_act=True,
            tie_word_embeddings=False,
            scale_decoder_outputs=False,
            model_type="mt5" if variant == "mt5" else "t5",
        )
    base.update(overrides)
    return T5Config(**base)


def tiny_longt5_config(attention_type: str = "transient-global", **overrides: Any) -> T5Config:
    """A tiny LongT5 (T5 v1.1 shapes of `tiny_config`) with the given encoder attention.

    Local blocks of 4 positions (`local_radius` 3) and global blocks of 3, so that inputs of a few
    dozen tokens span many blocks of both kinds, and the two block sizes do not divide each other.
    `attention_type` is passed on unchecked, so that the config's own validation reports it.
    """
    base = dict(
        model_type="longt5",
        encoder_attention_type=attention_type,
        local_radius=3,
        global_block_size=3,
    )
    base.update(overrides)
    return tiny_config("v1.1", **base)


def tiny_model(
    variant: str = "v1.1",
    seed: int = 0,
    *,
    dtype: Any = jnp.float32,
    tokenizer: Any = None,
    **overrides: Any,
) -> Model:
    """A randomly initialised tiny model (see `tiny_config`)."""
    return Model.random(tiny_config(variant, **overrides), seed, dtype=dtype, tokenizer=tokenizer)


def with_exit_classifier(model: Model, seed: int = 0) -> Model:
    """`model` with a randomly initialised "meta" exit classifier head (see `exit_classifier`)."""
    head = exit_classifier.init_exit_classifier(model.config, jax.random.key(seed), model.dtype)
    return dataclasses.replace(model, params={**model.params, exit_classifier.KEY: head})


def threshold_between(confidences: Any, quantile: float) -> float:
    """A FREE threshold near the `quantile` of `confidences` that lies halfway between two
    distinct values among them, never on one.

    A row decoded alone and the same row in a batch compute their confidences equal to rounding,
    not bit for bit (XLA vectorises other shapes differently), so a threshold equal to a
    confidence the model produces would let that token's last bits decide its exit, and tests
    of "a batch decodes as each row alone" would depend on the machine they run on.
    """
    values = np.asarray(confidences, np.float64).ravel()
    values = np.unique(values[np.isfinite(values)])
    if len(values) < 2 or not 0.0 <= quantile <= 1.0:
        raise ValueError(
            f"need two distinct confidences and a quantile in [0, 1], got {len(values)} "
            f"distinct values and quantile={quantile!r}."
        )
    i = min(int(round(quantile * (len(values) - 1))), len(values) - 2)
    return float((values[i] + values[i + 1]) / 2)


def random_ids(
    shape: tuple[int, int], seed: int = 0, *, vocab_size: int = TINY_VOCAB, low: int = 2
) -> np.ndarray:
    """Random token ids in [low, vocab_size): by default no padding (0) and no EOS (1)."""
    return np.random.default_rng(seed).integers(low, vocab_size, shape, dtype=np.int32)


# ---------------------------------------------------------------------------- tokenizer


def train_tiny_spiece(directory: str | os.PathLike, vocab_size: int = TINY_VOCAB) -> Path:
    """Trains a T5-style SentencePiece model on the shipped tiny corpus into `directory`.

    Ids follow T5: pad 0, EOS 1, unk 2, no BOS. The tokenizer adds `_TOKENIZER_EXTRA_IDS`
    sentinels, so the SentencePiece vocabulary is `vocab_size - _TOKENIZER_EXTRA_IDS`.
    Deterministic (one thread, fixed corpus).
    """
    import sentencepiece as spm

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    corpus = importlib.resources.files("free_jax") / "assets" / "tiny_corpus.txt"
    with importlib.resources.as_file(corpus) as corpus_path:
        spm.SentencePieceTrainer.train(
            input=str(corpus_path),
            model_prefix=str(directory / "spiece"),
            vocab_size=vocab_size - _TOKENIZER_EXTRA_IDS,
            model_type="unigram",
            character_coverage=1.0,
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            num_threads=1,
            minloglevel=2,
        )
    return directory / "spiece.model"


def tiny_tokenizer(directory: str | os.PathLike | None = None) -> Any:
    """A `T5Tokenizer` over a SentencePiece model trained on the tiny corpus (TINY_VOCAB ids)."""
    from transformers import T5Tokenizer

    directory = Path(directory or tempfile.mkdtemp(prefix="free_jax_tok_"))
    if not (directory / "spiece.model").is_file():
        train_tiny_spiece(directory)
    # from_pretrained on the directory (not vocab_file=...): see the environment notes.
    return T5Tokenizer.from_pretrained(str(directory), extra_ids=_TOKENIZER_EXTRA_IDS)


# ---------------------------------------------------------------------------- references


def _hf_classes(model_type: str) -> tuple[Any, Any]:
    """The `transformers` (config class, model class) that reads checkpoints of `model_type`."""
    import transformers

    if model_type == "longt5":
        return transformers.LongT5Config, transformers.LongT5ForConditionalGeneration
    return transformers.T5Config, transformers.T5ForConditionalGeneration


def make_hf_checkpoint(
    directory: str | os.PathLike, config: T5Config, seed: int = 0, *, tokenizer: Any = None
) -> Path:
    """Writes a randomly initialised `transformers` PyTorch checkpoint for `config`.

    A `T5ForConditionalGeneration`, or a `LongT5ForConditionalGeneration` for LongT5 configs.
    Tied configs are saved with `save_pretrained`. transformers 5.x ties the head of every model it
    creates, so untied configs are written in the 4.x format by hand: a separate random
    `lm_head.weight` and `tie_word_embeddings: false` in `config.json`, as real v1.1 / Flan-T5 /
    mT5 / LongT5 checkpoints have. Needs torch.
    """
    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    torch.manual_seed(seed)
    hf_dict = config.to_hf_dict()
    architectures = hf_dict.pop("architectures")
    hf_dict.pop("scale_decoder_outputs")
    hf_dict["dropout_rate"] = 0.0
    config_class, model_class = _hf_classes(config.model_type)
    model = model_class(config_class(**hf_dict)).eval()
    if config.tie_word_embeddings:
        model.save_pretrained(str(directory))
    else:
        directory.mkdir(parents=True, exist_ok=True)
        state = {
            k: v.detach().clone().contiguous()
            for k, v in model.state_dict().items()
            if not k.endswith("embed_tokens.weight")
        }
        state["lm_head.weight"] = torch.randn_like(state["shared.weight"])
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        hf_dict["tie_word_embeddings"] = False
        hf_dict["architectures"] = architectures
        with open(directory / "config.json", "w") as f:
            json.dump(hf_dict, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return directory


def load_hf_reference(directory: str | os.PathLike) -> Any:
    """The `transformers` PyTorch model of a checkpoint directory, in eval mode, float32.

    A `T5ForConditionalGeneration`, or a `LongT5ForConditionalGeneration` when `config.json` says
    `model_type: longt5`.
    """
    with open(Path(directory) / "config.json") as f:
        model_type = json.load(f).get("model_type")
    _, model_class = _hf_classes(model_type)
    return model_class.from_pretrained(str(directory)).eval()


# ---------------------------------------------------------------------------- toy tasks

TOY_TASKS = ("copy", "reverse", "sort")
TOY_FIRST_SYMBOL = 2  # ids 0 (pad/start) and 1 (EOS) are never symbols


def toy_batch(
    task: str,
    step: int,
    *,
    batch_size: int,
    source_length: int,
    target_length: int,
    seed: int = 0,
    num_symbols: int = 16,
    min_length: int = 2,
) -> dict[str, np.ndarray]:
    """One batch of a toy sequence task, in the training batch contract.

    Each row is `n` distinct symbols (ids `2 .. 2 + num_symbols`), `n` uniform in
    `[min_length, max_length]`, followed by EOS (1) and padding (0); the target is the same
    symbols copied, reversed or sorted, then EOS. The batch depends only on `(seed, step)`, so a
    resumed run sees exactly the batches an uninterrupted one would.

    Returns:
      `input_ids`, `attention_mask` int32[B, S]; `decoder_input_ids`, `labels` int32[B, T];
      `loss_mask` float32[B, T] (see `free_jax.training`).
    """
    if task not in TOY_TASKS:
        raise ValueError(f"task={task!r} is not a toy task; valid: {TOY_TASKS}.")
    max_length = min(source_length, target_length) - 1  # room for EOS
    if not 1 <= min_length <= max_length or max_length > num_symbols:
        raise ValueError(
            f"toy rows of {min_length}..{max_length} distinct symbols do not fit "
            f"source_length={source_length}, target_length={target_length} (each needs one "
            f"more for EOS) and num_symbols={num_symbols}."
        )
    rng = np.random.default_rng([seed, step])
    B, S, T = batch_size, source_length, target_length
    input_ids = np.zeros((B, S), np.int32)
    labels = np.zeros((B, T), np.int32)
    for b in range(B):
        n = int(rng.integers(min_length, max_length + 1))
        symbols = rng.permutation(num_symbols)[:n] + TOY_FIRST_SYMBOL
        target = {"copy": symbols, "reverse": symbols[::-1], "sort": np.sort(symbols)}[task]
        input_ids[b, :n], input_ids[b, n] = symbols, 1
        labels[b, :n], labels[b, n] = target, 1
    decoder_input_ids = np.zeros_like(labels)  # the start token (0), then labels shifted right
    decoder_input_ids[:, 1:] = labels[:, :-1]
    return {
        "input_ids": input_ids,
        "attention_mask": (input_ids != 0).astype(np.int32),
        "decoder_input_ids": decoder_input_ids,
        "labels": labels,
        "loss_mask": (labels != 0).astype(np.float32),
    }


def toy_batches(task: str, start_step: int = 0, **kwargs: Any):
    """The endless stream `toy_batch(task, step, **kwargs)` for step = start_step, ..."""
    step = start_step
    while True:
        yield toy_batch(task, step, **kwargs)
        step += 1
