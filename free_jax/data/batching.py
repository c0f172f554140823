"""Batches: fixed-shape training batches in a resumable order (`TrainBatches`), evaluation
batches (`eval_batches`), and the trainer's batch source (`make_batch_source`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from free_jax.data.examples import Examples, load_examples
from free_jax.data.order import epoch_permutation
from free_jax.data.tasks import get_task
from free_jax.errors import ConfigError

# ---------------------------------------------------------------------------- batches

BATCH_KEYS = ("input_ids", "attention_mask", "decoder_input_ids", "labels", "loss_mask")


def make_batch(
    examples: Examples,
    indices: np.ndarray,
    *,
    source_length: int,
    target_length: int,
    decoder_start_id: int | None = None,
) -> dict[str, np.ndarray]:
    """The contract batch of the given examples; index -1 is an empty (all-pad) row.

    Args:
      examples: the split.
      indices: int[B] example indices.
      source_length: S; at least every example's source length.
      target_length: T; at least every example's target length.
      decoder_start_id: the decoder's first input; default the pad id (T5's convention).

    Returns:
      The five arrays of the batch contract (module docstring).
    """
    start = examples.pad_id if decoder_start_id is None else decoder_start_id
    b = len(indices)
    input_ids = np.full((b, source_length), examples.pad_id, np.int32)
    labels = np.full((b, target_length), examples.pad_id, np.int32)
    src_len = np.zeros(b, np.int64)
    tgt_len = np.zeros(b, np.int64)
    for row, i in enumerate(indices):
        if i < 0:
            continue
        src, tgt = examples.source_ids(i), examples.target_ids(i)
        if len(src) > source_length or len(tgt) > target_length:
            raise ConfigError(
                f"example {i} has {len(src)} source / {len(tgt)} target tokens; the batch shape "
                f"is ({source_length}, {target_length}). Lengths must be at least the task's "
                f"({examples.task.max_source_length}, {examples.task.max_target_length})."
            )
        input_ids[row, : len(src)] = src
        labels[row, : len(tgt)] = tgt
        src_len[row], tgt_len[row] = len(src), len(tgt)
    decoder_input_ids = np.empty_like(labels)
    decoder_input_ids[:, 0] = start
    decoder_input_ids[:, 1:] = labels[:, :-1]
    return {
        "input_ids": input_ids,
        "attention_mask": (np.arange(source_length) < src_len[:, None]).astype(np.int32),
        "decoder_input_ids": decoder_input_ids,
        "labels": labels,
        "loss_mask": (np.arange(target_length) < tgt_len[:, None]).astype(np.float32),
    }


def _buckets(buckets: Sequence[int] | None, maximum: int, name: str) -> tuple[int, ...]:
    if buckets is None:
        return (maximum,)
    values = sorted(set(buckets))
    bad = [v for v in values if not isinstance(v, int | np.integer) or not 1 <= v <= maximum]
    if bad:
        raise ConfigError(f"{name}={list(buckets)}: {bad} not in [1, {maximum}] (the task's max).")
    # The task maximum is always a bucket, so every example fits one.
    return tuple(dict.fromkeys([*map(int, values), maximum]))


def _check_processes(batch_size: int, process_index: int, process_count: int) -> None:
    if not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise ConfigError(f"batch size {batch_size!r}; must be a positive int.")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ConfigError(
            f"process_index={process_index}, process_count={process_count}; need "
            "0 <= process_index < process_count."
        )
    if batch_size % process_count:
        raise ConfigError(
            f"the global batch size {batch_size} is not divisible by process_count="
            f"{process_count}; each process takes an equal share of rows."
        )


class _Shaper:
    """Chooses a batch's (S, T) from the lengths of all its global rows."""

    def __init__(self, examples: Examples, source_buckets: Any, target_buckets: Any):
        task = examples.task
        self.source = _buckets(source_buckets, task.max_source_length, "source_buckets")
        self.target = _buckets(target_buckets, task.max_target_length, "target_buckets")
        self.src_len = examples.source_lengths
        self.tgt_len = examples.target_lengths

    def shape(self, global_indices: np.ndarray) -> tuple[int, int]:
        real = global_indices[global_indices >= 0]
        need_s = int(self.src_len[real].max(initial=1))
        need_t = int(self.tgt_len[real].max(initial=1))
        return (
            next(s for s in self.source if s >= need_s),
            next(t for t in self.target if t >= need_t),
        )

    def shapes(self) -> list[tuple[int, int]]:
        return [(s, t) for s in self.source for t in self.target]


class TrainBatches:
    """Fixed-shape training batches in a deterministic order: exact resume, multi-host slices.

    The global batch of step s is rows `[p * B, (p + 1) * B)` of epoch `s // steps_per_epoch`'s
    permutation (`epoch_permutation(N, seed, epoch)`), p = `s % steps_per_epoch`. Nothing is
    carried between steps, so `batch_at(s)` equals the s-th batch of an uninterrupted
    `iterate()`, and a restart only needs the step. Each process computes the same global rows
    and shape and keeps its slice: rows `[i * B / P, (i + 1) * B / P)` for process i of P.

    Args:
      examples: the tokenised split.
      global_batch_size: B, rows per step over all processes.
      seed: fixes every epoch's order.
      drop_remainder: each epoch has `N // B` steps and the last `N % B` examples of its order
        wait for a later epoch's luck; False: `ceil(N / B)` steps, the last batch padded with
        empty rows (zero masks).
      shuffle: False keeps the split's order in every epoch.
      source_buckets, target_buckets: extra, smaller S and T shapes (module docstring); the
        task's maximum lengths are always included. Default: the maximum lengths only.
      group_by_length: 0 (off) or G > 1: each epoch's permutation is cut into windows of G
        batches, each window is sorted by the longer of source and target length and cut into
        batches, and the epoch's batches are shuffled. Rows of a batch then have similar
        lengths, so with buckets most batches take a small shape (56% of the padded tokens
        on the demo task), while the order stays a pure function of (seed, epoch).
      process_index, process_count: this process and the number of processes
        (`jax.process_index()`, `jax.process_count()`).
      decoder_start_id: the decoder's first input; default the pad id.
    """

    def __init__(
        self,
        examples: Examples,
        global_batch_size: int,
        *,
        seed: int = 0,
        drop_remainder: bool = True,
        shuffle: bool = True,
        source_buckets: Sequence[int] | None = None,
        target_buckets: Sequence[int] | None = None,
        group_by_length: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        decoder_start_id: int | None = None,
    ):
        _check_processes(global_batch_size, process_index, process_count)
        if not isinstance(seed, int | np.integer) or not 0 <= seed < 2**64:
            raise ConfigError(f"seed={seed!r}; must be an int in [0, 2**64).")
        if not isinstance(group_by_length, int | np.integer) or not (
            group_by_length == 0 or group_by_length >= 2
        ):
            raise ConfigError(
                f"group_by_length={group_by_length!r}; must be 0 (off) or an int >= 2 (batches "
                "per sorted window)."
            )
        n = len(examples)
        if drop_remainder and n < global_batch_size:
            raise ConfigError(
                f"the split has {n} examples, fewer than one batch of {global_batch_size}; "
                "lower the batch size or pass drop_remainder=False."
            )
        self.examples = examples
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.drop_remainder = drop_remainder
        self.shuffle = shuffle
        self.process_index = process_index
        self.process_count = process_count
        self.decoder_start_id = decoder_start_id
        self.group_by_length = int(group_by_length)
        self.steps_per_epoch = (
            n // self.global_batch_size if drop_remainder else -(-n // self.global_batch_size)
        )
        self._shaper = _Shaper(examples, source_buckets, target_buckets)
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, permutation), the last used

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.process_count

    def shapes(self) -> list[tuple[int, int]]:
        """Every (S, T) a batch can have: compile these ahead of time to avoid mid-run stalls."""
        return self._shaper.shapes()

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            n = len(self.examples)
            order = epoch_permutation(n, self.seed, epoch) if self.shuffle else np.arange(n)
            if self.group_by_length:
                order = self._grouped(order, epoch)
            self._order = (epoch, order)
        return self._order[1]

    def _grouped(self, order: np.ndarray, epoch: int) -> np.ndarray:
        """`order` with rows sorted by length inside windows, then whole batches shuffled."""
        b = self.global_batch_size
        used = len(order) // b * b
        head, tail = order[:used], order[used:]  # the remainder: dropped, or the last batch
        window = self.group_by_length * b
        # The longer side decides a batch's buckets, so sort by it.
        lengths = np.maximum(self.examples.source_lengths, self.examples.target_lengths)
        parts = [
            chunk[np.argsort(lengths[chunk], kind="stable")]
            for chunk in np.split(head, range(window, len(head), window))
        ]
        batches = np.concatenate(parts).reshape(-1, b) if len(head) else head.reshape(0, b)
        if self.shuffle:
            # A second hash stream (the bit-flipped seed): batch order independent of row order.
            batches = batches[epoch_permutation(len(batches), self.seed ^ (2**63), epoch)]
        return np.concatenate([batches.reshape(-1), tail])

    def global_indices(self, step: int) -> np.ndarray:
        """int64[B]: the examples of step `step`'s global batch; -1 marks an empty row."""
        if not isinstance(step, int | np.integer) or step < 0:
            raise ConfigError(f"step={step!r}; must be an int >= 0.")
        epoch, position = divmod(int(step), self.steps_per_epoch)
        b = self.global_batch_size
        rows = self._permutation(epoch)[position * b : (position + 1) * b]
        return np.concatenate([rows, np.full(b - len(rows), -1, np.int64)])

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of step `step`'s batch: the contract arrays, [B / P, ...]."""
        rows = self.global_indices(step)
        source_length, target_length = self._shaper.shape(rows)
        local = self.local_batch_size
        mine = rows[self.process_index * local : (self.process_index + 1) * local]
        return make_batch(
            self.examples,
            mine,
            source_length=source_length,
            target_length=target_length,
            decoder_start_id=self.decoder_start_id,
        )

    def iterate(
        self, start_step: int = 0, num_steps: int | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        """The batches of steps `start_step`, `start_step + 1`, ...: `num_steps`, or forever."""
        step = start_step
        while num_steps is None or step < start_step + num_steps:
            yield self.batch_at(step)
            step += 1

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self.iterate()


@dataclasses.dataclass(frozen=True)
class EvalBatch:
    """One eval batch: this process's contract arrays and the references of its real rows.

    Attributes:
      arrays: the batch contract's arrays, [B / P, ...].
      example_ids: int64[B / P], each row's index in the split; -1 for an empty padding row.
      references: the references of the rows with `example_ids >= 0`, in row order.
    """

    arrays: dict[str, np.ndarray]
    example_ids: np.ndarray
    references: tuple[str | tuple[str, ...], ...]


def eval_batches(
    examples: Examples,
    batch_size: int,
    *,
    max_examples: int | None = None,
    source_buckets: Sequence[int] | None = None,
    target_buckets: Sequence[int] | None = None,
    process_index: int = 0,
    process_count: int = 1,
    decoder_start_id: int | None = None,
) -> Iterator[EvalBatch]:
    """A split in its own order, in fixed-shape batches; the last one is padded with empty rows.

    Args:
      examples: the tokenised split.
      batch_size: rows per global batch (1 for the paper's latency measurements).
      max_examples: stop after the first this many examples; default all.
      source_buckets, target_buckets, process_index, process_count, decoder_start_id: as in
        `TrainBatches`.
    """
    _check_processes(batch_size, process_index, process_count)
    n = len(examples) if max_examples is None else min(max_examples, len(examples))
    shaper = _Shaper(examples, source_buckets, target_buckets)
    local = batch_size // process_count
    for start in range(0, n, batch_size):
        rows = np.arange(start, start + batch_size, dtype=np.int64)
        rows[rows >= n] = -1
        source_length, target_length = shaper.shape(rows)
        mine = rows[process_index * local : (process_index + 1) * local]
        yield EvalBatch(
            arrays=make_batch(
                examples,
                mine,
                source_length=source_length,
                target_length=target_length,
                decoder_start_id=decoder_start_id,
            ),
            example_ids=mine,
            references=tuple(examples.references[i] for i in mine if i >= 0),
        )


# ---------------------------------------------------------------------------- trainer hook


def make_batch_source(
    data: Any, *, split: str, seed: int, batch_size: int, tokenizer: Any
) -> Callable[[int], Iterator[dict[str, np.ndarray]]]:
    """The trainer's entry point (`free_jax.training.inputs.source_for`) into this pipeline.

    Args:
      data: a `free_jax.training.config.DataConfig`: `task` (a registered task), `dataset` (local
        `.json`/`.jsonl`/`.csv` file(s), comma-separated, or None for the task's shipped files or
        its hub dataset), `prefix` (replaces the task's when given), `source_length` and
        `target_length` (the static S and T), `train_split` / `eval_split`, and for the training
        split `length_buckets` and `group_by_length` (`TrainBatches`).
      split: the split to read.
      seed: fixes the order of training batches (evaluation batches keep the split's order).
      batch_size: global rows per batch.
      tokenizer: the model's tokenizer.

    Returns:
      `source(start_step) -> iterator` of global batches; the batch at step s depends only on
      (seed, s), so resumed runs see what uninterrupted ones would.
    """
    if tokenizer is None:
        raise ConfigError(
            f"data.task={data.task!r} needs a tokenizer; the model (model.name or its checkpoint) "
            "has none."
        )
    overrides: dict[str, Any] = dict(
        max_source_length=data.source_length, max_target_length=data.target_length
    )
    if data.prefix:
        overrides["prefix"] = data.prefix
    task = get_task(data.task, **overrides)
    files = None
    if data.dataset:
        files = [part.strip() for part in str(data.dataset).split(",") if part.strip()]
    examples = load_examples(task, tokenizer, split=split, data_files=files)
    training = split == data.train_split
    buckets = tuple(data.length_buckets) or None  # None: the task's maximum lengths only
    batches = TrainBatches(
        examples,
        batch_size,
        seed=seed,
        shuffle=training,
        drop_remainder=training,
        source_buckets=buckets,
        target_buckets=buckets,
        group_by_length=data.group_by_length if training else 0,
    )

    def source(start_step: int) -> Iterator[dict[str, np.ndarray]]:
        return batches.iterate(start_step)

    return source
