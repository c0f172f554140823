"""Training throughput of the tiny preset: tokens per second on 1 and on 8 (fake) devices.

Each configuration runs in its own process (the device count is fixed when JAX starts):
`XLA_FLAGS=--xla_force_host_platform_device_count=N` gives N CPU devices. The timed loop is the
trainer's own jitted step (`Trainer.train_step`: host batch -> global arrays -> step -> host
metrics), without evaluation or checkpoints; compile time is reported apart. Throughput counts
real tokens (source tokens with attention_mask 1 plus target tokens with loss_mask 1) and, in
brackets, padded ones. Medians over `--repeats` timed windows of `--steps` steps each.

    python benchmarks/bench_train.py [--devices 1 8] [--steps 50] [--repeats 5] [--json]

On a CPU the fake devices share the same cores, so 8 devices measure the cost of splitting the
same work 8 ways (collectives, smaller kernels), not a speed-up; on accelerators the same
command with real devices measures scaling. Timings taken while other work loads the machine
(`uptime` load above the core count) are not meaningful; the script prints the load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {
    1: [("1 device", 1, 1)],
    8: [("8 devices, data 8", 8, 1), ("8 devices, data 4 x fsdp 2", 4, 2)],
}


def measure(data: int, fsdp: int, steps: int, repeats: int) -> dict:
    """Runs in the child process: builds the tiny preset's trainer and times its steps."""
    import jax
    import numpy as np

    from free_jax import testing
    from free_jax.training import load_config
    from free_jax.training.trainer import Trainer

    config = load_config(
        ROOT / "configs" / "tiny.py",
        [
            f"mesh.data={data}",
            f"mesh.fsdp={fsdp}",
            "mesh.min_shard_size=1",  # shard even the tiny model's matrices over fsdp
            "output_dir=/tmp/free_jax_bench_train",
            "progress=false",
        ],
    )
    d = config.data
    batches = [
        testing.toy_batch(
            d.task,
            i,
            batch_size=d.batch_size,
            source_length=d.source_length,
            target_length=d.target_length,
            num_symbols=d.num_symbols,
        )
        for i in range(steps)
    ]
    real = sum(float(b["attention_mask"].sum() + b["loss_mask"].sum()) for b in batches) / steps
    padded = d.batch_size * (d.source_length + d.target_length)
    trainer = Trainer(config)
    state = trainer.init_state()
    started = time.perf_counter()
    state, _ = trainer.train_step(state, batches[0])  # compile
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - started
    windows = []
    for _ in range(repeats):
        started = time.perf_counter()
        for batch in batches:
            state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready(state)
        windows.append((time.perf_counter() - started) / steps)
    step_s = statistics.median(windows)
    return {
        "devices": jax.device_count(),
        "mesh": {"data": data, "fsdp": fsdp},
        "compile_s": round(compile_s, 2),
        "ms_per_step": round(step_s * 1e3, 2),
        "tokens_per_s": round(real / step_s),
        "padded_tokens_per_s": round(padded / step_s),
        "windows_ms": [round(w * 1e3, 2) for w in windows],
        "final_loss": float(np.asarray(metrics["loss"])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 8], choices=sorted(LAYOUTS))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print one JSON object per row")
    parser.add_argument(
        "--child", nargs=2, type=int, metavar=("DATA", "FSDP"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child, args.steps, args.repeats)))
        return
    load = os.getloadavg()[0]
    cores = os.cpu_count()
    print(f"# {platform.processor() or platform.machine()}, {cores} cores, load {load:.2f}")
    if load > 0.75 * (cores or 1):
        print("# warning: the machine is busy; these timings are not meaningful")
    for n in args.devices:
        for name, data, fsdp in LAYOUTS[n]:
            env = dict(os.environ)
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
            env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
            child = [
                sys.executable,
                __file__,
                "--child",
                str(data),
                str(fsdp),
                "--steps",
                str(args.steps),
                "--repeats",
                str(args.repeats),
            ]
            out = subprocess.run(child, env=env, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                print(f"{name}: failed\n{out.stderr[-2000:]}")
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["layout"] = name
            if args.json:
                print(json.dumps(row))
            else:
                print(
                    f"{name:28s} {row['tokens_per_s']:>9,d} tokens/s "
                    f"({row['padded_tokens_per_s']:,d} padded), {row['ms_per_step']:.2f} ms/step, "
                    f"compile {row['compile_s']:.1f} s"
                )
    print(f"# load at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
