"""FREE on LongT5-base (TGlobal), Multi-News multi-document summarisation (L_s = 3 of 12).

Command (needs google/long-t5-tglobal-base, Multi-News through `free_jax.data`, accelerators):

    free-jax train --config configs/longt5_base_multinews.py

Recipe (the reference scripts): Adafactor, constant learning rate 1e-4, global batch 4,
3 epochs of the 44,972 training clusters (33,729 steps), sources 2048 tokens, targets 512,
prefix "summarize: ". L_s = 3: the reference's distillation tables support only 3 shallow
blocks for a 12-block decoder (its script's 6 has no teacher table).

Expected cost (an estimate, not measured: 6 x 248M parameters x 10,240 padded tokens = 1.5e13
FLOPs per step plus attention over 2048-token sources, at 30% of one H100's bf16 peak): about
0.05-0.1 s per step, 0.5-1 GPU-hours for the whole run in bf16.
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
        model=ModelSpec(name="google/long-t5-tglobal-base", model_type="longt5"),
        data=DataConfig(
            task="multi_news",
            prefix="summarize: ",
            source_length=2048,
            target_length=512,
            batch_size=4,
            eval_batch_size=16,
            num_eval_batches=50,
        ),
        objective=ObjectiveConfig(kind="free", exit_layer=3, kd="dyna", alpha=0.5),
        optim=OptimConfig(optimizer="adafactor", learning_rate=1e-4, schedule="constant"),
        checkpoint=CheckpointConfig(every=1000, keep=2, best_metric="eval/loss"),
        eval=EvalConfig(every=2000),
        steps=33_729,
        log_every=50,
        output_dir="runs/longt5_base_multinews",
    )
