"""Training FREE's shallow-deep T5: losses, the trainer, sharding and checkpoints.

* `free_jax.training.losses`: the pure loss functions (shallow-deep cross-entropy, layerwise
  distillation with dynamic layer mapping, CALM's weighted cross-entropy, the exit-classifier
  loss) and the objectives the trainer optimises.

The batch contract every objective and the trainer read (a dict of NumPy or JAX arrays, fixed
shapes per configuration so that steps never recompile):

    input_ids          int32[B, S]   source token ids (padding 0)
    attention_mask     int32[B, S]   1 on real source tokens
    decoder_input_ids  int32[B, T]   the decoder start token, then the labels shifted right
    labels             int32[B, T]   target token ids
    loss_mask          float32[B, T] 1 where the label is a real target token (EOS included)
"""

from __future__ import annotations

BATCH_KEYS = ("input_ids", "attention_mask", "decoder_input_ids", "labels", "loss_mask")
