"""FREE on T5-large, SQuAD v1.1 extractive question answering as generation (L_s = 6 of 24).

Command (needs the t5-large checkpoint, SQuAD through `free_jax.data`, and accelerators):

    free-jax train --config configs/t5_large_squad.py [mesh.fsdp=4 compute_dtype=bfloat16]

Recipe (the reference scripts): Adafactor, constant learning rate 1e-4, global batch 8,
10 epochs of the 87,599 training questions (109,500 steps), "question: ... context: ..."
sources of 512 tokens; answers are short, so targets are 32 tokens (not the summarisation
128). KD-dyna with alpha 0.5.

Expected cost (an estimate, not measured here: 6 x 738M parameters x 4,352 padded tokens =
1.9e13 FLOPs per step, at 30% of one H100's bf16 peak): about 0.07 s per step, 2 GPU-hours for
the whole run in bf16; float32 about twice that.
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
            task="squad",
            source_length=512,
            target_length=32,
            batch_size=8,
            eval_batch_size=32,
            num_eval_batches=25,  # 800 of the 10,570 validation questions per evaluation
        ),
        objective=ObjectiveConfig(kind="free", exit_layer=6, kd="dyna", alpha=0.5),
        optim=OptimConfig(optimizer="adafactor", learning_rate=1e-4, schedule="constant"),
        checkpoint=CheckpointConfig(every=5000, keep=2, best_metric="eval/loss"),
        eval=EvalConfig(every=5000),
        steps=109_500,
        log_every=100,
        output_dir="runs/t5_large_squad",
    )
