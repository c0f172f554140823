"""FREE on mT5-large, IWSLT 2017 German-to-English translation (L_s = 6 of 24).

Command (needs the google/mt5-large checkpoint, IWSLT2017 de-en through `free_jax.data`, and
accelerators):

    free-jax train --config configs/mt5_large_iwslt.py [mesh.fsdp=4 compute_dtype=bfloat16]

Recipe (the reference scripts): Adafactor, constant learning rate 1e-4, global batch 8,
2 epochs of the 206,112 training sentence pairs (51,528 steps), prefix "translate German to
English: ", sources and targets 128 tokens (IWSLT sentences are short), KD-dyna with alpha 0.5.

Expected cost (an estimate, not measured here: about 6 x 1.0B parameters that cost FLOPs per
token (mT5's 250k-word input embedding does not, its two exit heads do) x 2,048 padded tokens
= 1.2e13 FLOPs per step, at 30% of one H100's bf16 peak): about 0.04 s per step, 0.6
GPU-hours for the whole run in bf16. Parameters and Adafactor state take about 5 GB.
"""

from free_jax.training.config import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    ModelSpec,
    ObjectiveConfig,
    OptimConfig,
    TrainConfig,
)


def get_config() -> TrainConfig:
    return TrainConfig(
        model=ModelSpec(name="google/mt5-large", model_type="mt5"),
        data=DataConfig(
            task="iwslt2017",
            dataset="iwslt2017-de-en",
            prefix="translate German to English: ",
            source_length=128,
            target_length=128,
            batch_size=8,
            eval_batch_size=32,
            num_eval_batches=28,  # the 888 validation pairs
        ),
        objective=ObjectiveConfig(kind="free", exit_layer=6, kd="dyna", alpha=0.5),
        optim=OptimConfig(optimizer="adafactor", learning_rate=1e-4, schedule="constant"),
        checkpoint=CheckpointConfig(every=5000, keep=2, best_metric="eval/loss"),
        eval=EvalConfig(every=5000),
        steps=51_528,
        log_every=100,
        output_dir="runs/mt5_large_iwslt",
    )
