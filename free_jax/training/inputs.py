"""Batch sources for the trainer: the contract, toy tasks, and the hook for `free_jax.data`.

A *batch source* is a callable `source(start_step) -> Iterator[batch]` yielding **global**
batches (every process sees the same batches; the trainer feeds each process's rows to its
devices) in the contract of `free_jax.training`. The batch at position `start_step + i` must
depend only on the source's seed and that position, so that a resumed run sees exactly what an
uninterrupted one would. A plain iterable is accepted too: on resume it is re-iterated from the
start and the first `start_step` batches are skipped (exact only if it repeats itself).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from free_jax import testing
from free_jax.data.batching import BATCH_KEYS
from free_jax.errors import ConfigError, InputError
from free_jax.training.config import DataConfig

Batch = dict[str, np.ndarray]
BatchSource = Callable[[int], Iterator[Batch]]

_INT_KEYS = ("input_ids", "attention_mask", "decoder_input_ids", "labels")
EVAL_SEED_OFFSET = 1_000_003  # evaluation batches of toy tasks differ from training ones


def as_source(obj: BatchSource | Iterable[Batch]) -> BatchSource:
    """A batch source from a callable `(start_step) -> iterator` or from an iterable."""
    if callable(obj):
        return obj
    if isinstance(obj, Iterable):

        def source(start_step: int) -> Iterator[Batch]:
            return itertools.islice(iter(obj), start_step, None)

        return source
    raise InputError(
        f"a batch source must be a callable (start_step) -> iterator of batches, or an iterable "
        f"of batches; got {type(obj).__name__}."
    )


def toy_source(data: DataConfig, *, seed: int, batch_size: int) -> BatchSource:
    """The toy task of `data` (`free_jax.testing.toy_batch`) as a batch source."""

    def source(start_step: int) -> Iterator[Batch]:
        return testing.toy_batches(
            data.task,
            start_step,
            batch_size=batch_size,
            source_length=data.source_length,
            target_length=data.target_length,
            seed=seed,
            num_symbols=data.num_symbols,
            min_length=data.min_length,
        )

    return source


def source_for(
    data: DataConfig, *, split: str, seed: int, batch_size: int, tokenizer: Any = None
) -> BatchSource:
    """The batch source a configuration names: a toy task, or one of `free_jax.data`'s tasks.

    `split` is `data.train_split` or `data.eval_split`. Pipeline tasks call
    `free_jax.data.make_batch_source(data, split=..., seed=..., batch_size=..., tokenizer=...)`,
    which must return a batch source as described above.
    """
    if data.task in testing.TOY_TASKS:
        if split != data.train_split:
            seed += EVAL_SEED_OFFSET
        return toy_source(data, seed=seed, batch_size=batch_size)
    try:
        from free_jax import data as pipeline
    except ImportError as e:
        raise ConfigError(
            f"data.task={data.task!r} needs the input pipeline (free_jax.data), which this build "
            f"does not have; toy tasks need none: {testing.TOY_TASKS}. ({e})"
        ) from e
    make = getattr(pipeline, "make_batch_source", None)
    if make is None:
        raise ConfigError(
            f"data.task={data.task!r}: free_jax.data has no make_batch_source(data, split, seed, "
            f"batch_size, tokenizer), the trainer's entry point into the input pipeline."
        )
    return make(data, split=split, seed=seed, batch_size=batch_size, tokenizer=tokenizer)


def check_batch(
    batch: Mapping[str, Any],
    batch_size: int,
    source_length: int,
    target_length: int,
    length_buckets: Sequence[int] = (),
):
    """Validates one batch against the contract and the configured static shapes.

    A batch's source and target lengths are each `source_length` / `target_length` or one of
    `length_buckets` (`DataConfig.length_buckets`): a bounded set of shapes, each compiled once.

    Returns:
      The batch as a dict of NumPy arrays with the contract's dtypes (int32, loss_mask float32).
    """
    if not isinstance(batch, Mapping):
        raise InputError(f"a batch must be a dict of arrays, got {type(batch).__name__}.")
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise InputError(
            f"batch lacks {missing}; the contract is {BATCH_KEYS} (see free_jax.training)."
        )
    allowed_source = {source_length, *length_buckets}
    allowed_target = {target_length, *length_buckets}
    lengths = {
        "input_ids": allowed_source,
        "attention_mask": allowed_source,
        "decoder_input_ids": allowed_target,
        "labels": allowed_target,
        "loss_mask": allowed_target,
    }
    shapes: dict[str, tuple[int, ...]] = {}
    out = {}
    for key in BATCH_KEYS:
        value = np.asarray(batch[key])
        shapes[key] = value.shape
        if value.ndim != 2 or value.shape[0] != batch_size or value.shape[1] not in lengths[key]:
            raise InputError(
                f"batch[{key!r}] has shape {value.shape}, expected ({batch_size}, L) with L in "
                f"{sorted(lengths[key])} (batch size, and the configured source_length/"
                "target_length or data.length_buckets: shapes are static so that training "
                "steps compile a bounded number of times)."
            )
        if key in _INT_KEYS and not np.issubdtype(value.dtype, np.integer):
            raise InputError(f"batch[{key!r}] must hold integers, got dtype {value.dtype}.")
        out[key] = value.astype(np.float32 if key == "loss_mask" else np.int32)
    if not shapes["input_ids"] == shapes["attention_mask"] or not (
        shapes["decoder_input_ids"] == shapes["labels"] == shapes["loss_mask"]
    ):
        raise InputError(f"the batch's arrays disagree in shape: {shapes}.")
    return out
