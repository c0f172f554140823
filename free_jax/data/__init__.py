"""Data: tasks, loading, cached tokenisation, static-shape batches, exact resume; metrics; the demo.

Owns: `tasks` (the task registry), `examples` (reading, tokenising, the on-disk cache),
`batching` (training and evaluation batches, the trainer's batch source), `metrics` (ROUGE,
SQuAD F1, BLEU, punctuation F1: how a task is scored), `demo` (the embedded demo task
`acl_punct`: its builder, data, tokenizer and model location).

May import: `free_jax.checkpoints` (the demo model, on demand), `free_jax.errors`; never
decoding, evaluation, training or cli.

Three steps, each usable on its own:

1. `get_task(name)` names a task of the paper (SAMSum, CNN/DailyMail, SQuAD, Multi-News,
   BIGPATENT, IWSLT2017 De-En) or the embedded demo's (`acl_punct`, `free_jax.data.demo`): where
   its text lives, its prefix, its lengths and its metric.
2. `load_examples(task, tokenizer, split=..., data_files=...)` reads a split from local
   JSON / JSONL / CSV files (or the Hugging Face Hub when a network exists), tokenises it
   (prefix, truncation, EOS) and caches the token ids on disk.
3. `TrainBatches(examples, global_batch_size, seed=...)` turns them into fixed-shape batches in a
   deterministic order: `batch_at(step)` is a pure function of (seed, step), so a resumed run sees
   exactly the batches an uninterrupted one would. `eval_batches(examples, batch_size)` walks a
   split in order and keeps the reference strings.

The batch contract (a dict of NumPy arrays; shapes fixed per configuration so jitted steps never
recompile; axis legend in `free_jax.models.config`):

    input_ids          int32[B, S]    prefix + source tokens + EOS, then pad
    attention_mask     int32[B, S]    1 on real source tokens
    decoder_input_ids  int32[B, T]    decoder start token (the pad id, 0, for T5), then labels
                                      shifted right by one
    labels             int32[B, T]    target tokens + EOS, then pad
    loss_mask          float32[B, T]  1 on real target tokens, EOS included

Padding rows (the last partial batch when `drop_remainder=False`, an eval split's tail) are all
pad with zero masks: they add nothing to a loss normalised by `loss_mask.sum()`.

Static shapes: by default every batch is padded to the task's maximum lengths (one compiled
shape). `source_buckets` / `target_buckets` add a few smaller shapes: each batch takes the
smallest bucket its longest row fits, so short batches cost less compute, at the price of one
compilation per (source, target) bucket pair used. Batches are shuffled, not grouped by length,
so a batch of B random rows usually holds one long row and large buckets dominate; buckets pay
off for small batches (eval at batch size 1) and for datasets with a long-tailed length
distribution.
"""

from free_jax.data.batching import (
    BATCH_KEYS,
    EvalBatch,
    TrainBatches,
    epoch_permutation,
    eval_batches,
    make_batch,
    make_batch_source,
)
from free_jax.data.examples import (
    Examples,
    default_cache_dir,
    load_examples,
    tokenizer_fingerprint,
)
from free_jax.data.tasks import (
    TASKS,
    FieldSpec,
    Task,
    get_task,
    squad_first_answer,
    squad_source,
)
from free_jax.errors import DataError  # what loading raises

__all__ = [
    "DataError",
    "TASKS",
    "BATCH_KEYS",
    "EvalBatch",
    "Examples",
    "FieldSpec",
    "Task",
    "TrainBatches",
    "default_cache_dir",
    "epoch_permutation",
    "eval_batches",
    "get_task",
    "load_examples",
    "make_batch",
    "make_batch_source",
    "squad_first_answer",
    "squad_source",
    "tokenizer_fingerprint",
]
