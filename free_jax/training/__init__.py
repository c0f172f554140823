"""Training FREE's shallow-deep T5: losses, the trainer, sharding and checkpoints.

Public API:

* `TrainConfig` and its sections (`ModelSpec`, `DataConfig`, `ObjectiveConfig`, `OptimConfig`,
  `MeshConfig`, `CheckpointConfig`, `EvalConfig`, `ExportConfig`, `DistributedConfig`);
  `load_config(path, overrides)` reads a preset from `configs/`, `apply_overrides` applies
  `key=value` strings.
* `train(config, train_source=None, eval_source=None, metric_fn=None) -> TrainResult`, and the
  `Trainer` it drives (`free_jax.training.trainer`).
* `free_jax.training.losses`: the pure loss functions and objectives.

The batch contract every objective and the trainer read (a dict of NumPy or JAX arrays, fixed
shapes per configuration so that steps never recompile):

    input_ids          int32[B, S]   source token ids (padding 0)
    attention_mask     int32[B, S]   1 on real source tokens
    decoder_input_ids  int32[B, T]   the decoder start token, then the labels shifted right
    labels             int32[B, T]   target token ids
    loss_mask          float32[B, T] 1 where the label is a real target token (EOS included)

A batch source is a callable `source(start_step) -> iterator of global batches`, deterministic
in (seed, position) so that a resumed run sees what an uninterrupted one would
(`free_jax.training.inputs`).
"""

from __future__ import annotations

from free_jax.data.batching import BATCH_KEYS
from free_jax.training.config import (
    CheckpointConfig,
    DataConfig,
    DistributedConfig,
    EvalConfig,
    ExportConfig,
    MeshConfig,
    ModelSpec,
    ObjectiveConfig,
    OptimConfig,
    TrainConfig,
    apply_overrides,
    load_config,
)
from free_jax.training.trainer import (
    Trainer,
    TrainingDivergedError,
    TrainResult,
    train,
)

__all__ = [
    "BATCH_KEYS",
    "CheckpointConfig",
    "DataConfig",
    "DistributedConfig",
    "EvalConfig",
    "ExportConfig",
    "MeshConfig",
    "ModelSpec",
    "ObjectiveConfig",
    "OptimConfig",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingDivergedError",
    "apply_overrides",
    "load_config",
    "train",
]
