"""FREE on T5-large, SAMSum dialogue summarisation (the paper's setting: L_s = 6 of 24).

Command (from the repository root; needs the t5-large checkpoint, the SAMSum data through
`free_jax.data`, and a GPU or TPU):

    free-jax train --config configs/t5_large_samsum.py
    free-jax train --config configs/t5_large_samsum.py model.name=/path/to/t5-large \
        mesh.fsdp=4 compute_dtype=bfloat16          # e.g. 4 accelerators, bf16 activations

Recipe (the reference scripts): Adafactor, constant learning rate 1e-4, global batch 8,
20 epochs of the 14,732 training dialogues (36,840 steps), sources 512 tokens, targets 128,
prefix "summarize: ", KD-dyna with alpha 0.5.

Expected cost (an estimate, not measured here: 6 x 738M parameters x 5,120 padded tokens =
2.3e13 FLOPs per step, at 30% of one H100's bf16 peak): about 0.08 s per step, 0.8 GPU-hours
for the whole run in bf16; float32 (the default, as the reference trained) about twice that.
Parameters and Adafactor state take about 3 GB; checkpoints about 3 GB each (keep 2 + best).
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
        model=ModelSpec(name="t5-large", model_type="t5"),
        data=DataConfig(
            task="samsum",
            prefix="summarize: ",
            source_length=512,
            target_length=128,
            batch_size=8,
            eval_batch_size=32,
            num_eval_batches=26,  # the 819 validation dialogues
        ),
        objective=ObjectiveConfig(kind="free", exit_layer=6, kd="dyna", alpha=0.5),
        optim=OptimConfig(optimizer="adafactor", learning_rate=1e-4, schedule="constant"),
        checkpoint=CheckpointConfig(every=2000, keep=2, best_metric="eval/loss"),
        eval=EvalConfig(every=2000),
        steps=36_840,
        log_every=50,
        output_dir="runs/t5_large_samsum",
    )
