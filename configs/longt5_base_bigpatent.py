"""FREE on LongT5-base (TGlobal), BIGPATENT category E summarisation (L_s = 3 of 12).

Command (needs google/long-t5-tglobal-base, BIGPATENT through `free_jax.data`, accelerators):

    free-jax train --config configs/longt5_base_bigpatent.py

Recipe (the reference scripts): Adafactor, constant learning rate 1e-4, global batch 4,
3 epochs of the 34,443 category-E ("fixed constructions") training patents (25,833 steps),
sources 2048 tokens, targets 512, prefix "summarize: ". L_s = 3 (see the Multi-News preset).

Expected cost (an estimate, not measured: as the Multi-News preset per step): about 0.05-0.1 s
per step, 0.4-0.8 GPU-hours for the whole run in bf16.
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
            task="big_patent",
            dataset="e",
            prefix="summarize: ",
            source_length=2048,
            target_length=512,
            batch_size=4,
            eval_batch_size=16,
            num_eval_batches=50,
        ),
        objective=ObjectiveConfig(kind="free", exit_layer=3, kd="dyna", alpha=0.5),
        optim=OptimConfig(optimizer="adafactor", learning_rate=1e-4, schedule="constant"),
        checkpoint=CheckpointConfig(every=2583, keep=2, best_metric="eval/loss"),
        eval=EvalConfig(every=2583),
        steps=25_833,
        log_every=50,
        output_dir="runs/longt5_base_bigpatent",
    )
