"""Per-device memory of decoding on a mesh: a t5-large-shaped model at bf16, tensor-parallel.

Not a timing: it lowers and compiles the sharded "full" decoding core (`free_jax.decoding.mesh`)
for meshes data x model = 8 x 1, 4 x 2 and 2 x 4 of fake CPU devices, with abstract parameters
(nothing of the 1.5 GB model is allocated), and prints the compiled program's per-device
memory analysis: argument bytes (the parameters dominate: they fall as ~1/N with a `model` axis
of N), temporaries and outputs.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/bench_mesh_memory.py
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from free_jax.decoding import encode_source, methods
from free_jax.decoding import mesh as mesh_decode
from free_jax.models import partition, shapes, t5

# t5-large (v1.0): 24 + 24 blocks, d_model 1024, 16 heads of 64, d_ff 4096, tied embedding.
CONFIG = shapes.t5_v1_0("t5-large")
BATCH_PER_SHARD, SOURCE, NEW_TOKENS = 1, 64, 32


def abstract(tree, mesh, size):
    specs = partition.param_specs(tree, size)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s)),
        tree,
        specs,
    )


def analyse(data: int, model: int):
    mesh = Mesh(np.asarray(jax.devices()[: data * model]).reshape(data, model), ("data", "model"))
    partition.check_model_axis(CONFIG, model)
    params = t5.param_shapes(CONFIG, jnp.bfloat16)
    fuse = functools.partial(t5.fuse_for_decoding, fuse_blocks=model == 1)
    decode_params = abstract(jax.eval_shape(fuse, params), mesh, model)
    rows = NamedSharding(mesh, mesh_decode._ROWS)
    B = BATCH_PER_SHARD * data
    ids = jax.ShapeDtypeStruct((B, SOURCE), jnp.int32, sharding=rows)
    encoded = jax.eval_shape(
        functools.partial(encode_source, config=CONFIG, length=SOURCE), params, ids, ids
    )
    encoded = tuple(jax.ShapeDtypeStruct(e.shape, e.dtype, sharding=rows) for e in encoded)
    compiled = mesh_decode._sharded.lower(
        decode_params,
        None,
        *encoded,
        None,
        None,
        {},
        impl=methods.get("full"),
        static=None,
        config=CONFIG,
        mesh=mesh,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=0,
    ).compile()
    return compiled.memory_analysis()


def main() -> None:
    total = sum(
        x.size * x.dtype.itemsize
        for x in jax.tree.leaves(
            jax.eval_shape(t5.fuse_for_decoding, t5.param_shapes(CONFIG, jnp.bfloat16))
        )
    )
    print(f"t5-large-shaped, bf16: decode-layout parameters {total / 2**20:.0f} MiB in all")
    print("mesh (data x model)  arguments MiB  temporaries MiB  outputs MiB  (per device)")
    for data, model in ((8, 1), (4, 2), (2, 4)):
        m = analyse(data, model)
        print(
            f"{data} x {model:<17} {m.argument_size_in_bytes / 2**20:13.1f}  "
            f"{m.temp_size_in_bytes / 2**20:15.1f}  {m.output_size_in_bytes / 2**20:11.3f}"
        )


if __name__ == "__main__":
    main()
