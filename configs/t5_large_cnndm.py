"""FREE on T5-large, CNN/DailyMail news summarisation (L_s = 6 of 24).

Command (needs the t5-large checkpoint, CNN/DailyMail 3.0.0 through `free_jax.data`, and
accelerators):

    free-jax train --config configs/t5_large_cnndm.py [mesh.fsdp=4 compute_dtype=bfloat16]

Recipe (the reference scripts): Adafactor, constant learning rate 1e-4, global batch 16,
3 epochs of the 287,113 training articles (53,835 steps), sources 512 tokens, targets 128,
prefix "summarize: ", KD-dyna with alpha 0.5.

Expected cost (an estimate, not measured here: 6 x 738M parameters x 10,240 padded tokens =
4.5e13 FLOPs per step, at 30% of one H100's bf16 peak): about 0.15 s per step, 2.3 GPU-hours
for the whole run in bf16; float32 about twice that. Memory as the SAMSum preset plus
activations for batch 16 (split it with optim.grad_accum_steps if needed).
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
            task="cnn_dailymail",
            prefix="summarize: ",
            source_length=512,
            target_length=128,
            batch_size=16,
            eval_batch_size=16,
            num_eval_batches=50,  # 800 of the 13,368 validation articles per evaluation
        ),
        objective=ObjectiveConfig(kind="free", exit_layer=6, kd="dyna", alpha=0.5),
        optim=OptimConfig(optimizer="adafactor", learning_rate=1e-4, schedule="constant"),
        checkpoint=CheckpointConfig(every=5000, keep=2, best_metric="eval/loss"),
        eval=EvalConfig(every=5000),
        steps=53_835,
        log_every=100,
        output_dir="runs/t5_large_cnndm",
    )
