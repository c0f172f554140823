"""A training run in its own process, for the multi-device, multi-process and kill tests.

    python tests/train_worker.py OUT_DIR [--steps 12] [--fsdp 1] [--accum 1]
        [--process-id I --num-processes N --port P] [--checkpoint-every 4]

Device counts come from `XLA_FLAGS=--xla_force_host_platform_device_count=N`, set by the caller
before this process starts. Process 0 writes `OUT_DIR/result.npz`: the per-step training losses
and the final parameters (flattened).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from free_jax import T5Config  # noqa: E402
from free_jax.training import (  # noqa: E402
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
    train,
)

ARCH = T5Config(
    vocab_size=32,
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=1,
    num_decoder_layers=4,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
    # T5 v1.0 layout: the tied, rescaled head starts near log(V) rather than at a large loss,
    # which keeps these few steps well conditioned (float rounding is not amplified).
    dense_act_fn="relu",
    is_gated_act=False,
    tie_word_embeddings=True,
    scale_decoder_outputs=True,
)


def worker_config(
    out: str,
    *,
    steps: int = 12,
    fsdp: int = 1,
    accum: int = 1,
    checkpoint_every: int = 4,
    distributed: DistributedConfig | None = None,
    export: bool = False,
) -> TrainConfig:
    return TrainConfig(
        model=ModelSpec(arch=ARCH, init_seed=1),
        data=DataConfig(
            task="reverse", source_length=8, target_length=8, num_symbols=12, batch_size=16
        ),
        objective=ObjectiveConfig(kind="free", exit_layer=2, kd="dyna"),
        optim=OptimConfig(
            optimizer="adafactor",
            learning_rate=3e-3,
            schedule="warmup",  # independent of the total: runs of different lengths agree
            warmup_steps=2,
            grad_accum_steps=accum,
        ),
        # min_shard_size 1: shard every array the fsdp axis divides, even in this tiny model.
        mesh=MeshConfig(data=-1, fsdp=fsdp, min_shard_size=1),
        checkpoint=CheckpointConfig(every=checkpoint_every, keep=2, async_save=True),
        eval=EvalConfig(every=0),
        export=ExportConfig(free_jax=export, hf=export),
        distributed=distributed or DistributedConfig(),
        steps=steps,
        seed=3,
        output_dir=out,
        log_every=1,
        progress=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--fsdp", type=int, default=1)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--checkpoint-every", type=int, default=4)
    parser.add_argument("--process-id", type=int, default=None)
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--export", action="store_true")
    args = parser.parse_args()
    distributed = None
    if args.process_id is not None:
        distributed = DistributedConfig(
            coordinator_address=f"127.0.0.1:{args.port}",
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    config = worker_config(
        args.out,
        steps=args.steps,
        fsdp=args.fsdp,
        accum=args.accum,
        checkpoint_every=args.checkpoint_every,
        distributed=distributed,
        export=args.export,
    )
    result = train(config)
    if jax.process_index() == 0:
        losses = [r["loss"] for r in result.history if r["split"] == "train"]
        steps = [r["step"] for r in result.history if r["split"] == "train"]
        flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(result.params)])
        np.savez(Path(args.out) / "result.npz", losses=losses, steps=steps, params=flat)
        print(f"devices={jax.device_count()} processes={jax.process_count()} done", flush=True)


if __name__ == "__main__":
    main()
