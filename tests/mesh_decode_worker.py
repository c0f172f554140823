"""One process of the multi-host decoding test (`tests/test_mesh_decode.py`).

    python tests/mesh_decode_worker.py OUT [--process-id I --num-processes N --port P]
        [--rows-of-my-own]

Decodes one fixed batch of a tiny model with "full", "free" and "calm" on a data x model =
4 x 2 mesh over every device (all of this process's, or with `--num-processes` every
process's after `jax.distributed.initialize` on 127.0.0.1), and writes the tokens and lengths
to OUT/result.npz (process 0), or the error to OUT/error-<I>.txt. `--rows-of-my-own` passes
each process a different batch, which `decode` must refuse.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--port", default=None)
    parser.add_argument("--rows-of-my-own", action="store_true")
    args = parser.parse_args()
    import jax

    if args.num_processes > 1:
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{args.port}",
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    import free_jax
    from free_jax import testing
    from free_jax.errors import InputError

    model = testing.tiny_model()
    ids = testing.random_ids((7, 16), seed=3)
    ids[np.arange(7), np.linspace(3, 15, 7).astype(int)] = 0  # rows of different lengths
    ids = np.where(np.cumsum(ids == 0, axis=1) > 0, 0, ids)
    if args.rows_of_my_own:
        ids = ids[: 3 + args.process_id]
    mesh = jax.make_mesh((4, 2), ("data", "model"), devices=jax.devices())
    sharded = model.shard(mesh)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    try:
        for method, kwargs in (
            ("full", {}),
            ("free", {"exit_layer": 1, "threshold": 0.3}),
            ("calm", {"exit_layer": 1, "threshold": 0.3}),
        ):
            got = free_jax.decode(
                sharded, ids, method=method, max_new_tokens=12, mesh=mesh, **kwargs
            )
            results[f"{method}_tokens"] = got.tokens
            results[f"{method}_lengths"] = got.lengths
    except InputError as err:
        (out / f"error-{args.process_id}.txt").write_text(str(err))
        return
    if args.process_id == 0:
        np.savez(out / "result.npz", **results)


if __name__ == "__main__":
    sys.exit(main())
