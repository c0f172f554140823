"""Where a model's parameters live on a device mesh (`Model.shard`).

Decoding meshes have a `data` axis (rows of the batch; parameters replicated over it) and
optionally a `model` axis (tensor parallelism). Over `model`, each weight matrix is split along
the axis that keeps the matrix products local, Megatron-style, and GSPMD inserts the reductions:

    attention q, k, v [D, H*Dh], decode-layout qkv [D, 3*H*Dh]   columns over `model`
    attention o [H*Dh, D]                                        rows over `model`
    feed-forward wi, wi_0, wi_1 [D, F], decode-layout wi_fused   columns over `model`
    feed-forward wo [F, D]                                       rows over `model`
    shared embedding [V, D]                                      rows (vocabulary) over `model`
    lm_head [D, V]                                               columns (vocabulary) over `model`

Everything else (norms, relative position biases, the exit classifier) is small and
replicated. A `model` axis of size N thus holds about 1/N of the weights per device; it must
divide the heads, `d_ff` and the vocabulary, which `check_model_axis` verifies.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from free_jax.errors import InputError
from free_jax.models.config import T5Config

DATA_AXIS, MODEL_AXIS = "data", "model"
#: The axis names a decoding mesh may have.
AXES = (DATA_AXIS, MODEL_AXIS)

_COLUMNS = PartitionSpec(None, MODEL_AXIS)
_ROWS = PartitionSpec(MODEL_AXIS, None)
# Leaf name -> spec, for the leaves under an attention or feed-forward dict.
_ATTENTION = {"q": _COLUMNS, "k": _COLUMNS, "v": _COLUMNS, "qkv": _COLUMNS, "o": _ROWS}
_FFN = {"wi": _COLUMNS, "wi_0": _COLUMNS, "wi_1": _COLUMNS, "wi_fused": _COLUMNS, "wo": _ROWS}


def check_mesh(mesh: Any) -> Mesh:
    """Validates a decoding mesh: a `jax.sharding.Mesh` with a `data` axis and at most a `model`
    axis besides. Returns it with automatic axes: decoding places the rows and weights itself
    and leaves the `model` axis to GSPMD, so a mesh with explicit axes (`jax.make_mesh`'s
    default) is used as its automatic twin (same devices and names)."""
    if not isinstance(mesh, Mesh):
        raise InputError(
            f"mesh must be a jax.sharding.Mesh with a {DATA_AXIS!r} axis (and optionally a "
            f"{MODEL_AXIS!r} axis), got {type(mesh).__name__}."
        )
    names = tuple(mesh.axis_names)
    if DATA_AXIS not in names or any(n not in AXES for n in names):
        raise InputError(
            f"mesh has axes {names}; a decoding mesh needs a {DATA_AXIS!r} axis (rows of the "
            f"batch) and may have a {MODEL_AXIS!r} axis (tensor parallelism), nothing else, e.g. "
            f"Mesh(devices.reshape(4, 2), ('data', 'model'))."
        )
    if any(t != AxisType.Auto for t in mesh.axis_types):
        mesh = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(names))
    return mesh


def model_axis_size(mesh: Mesh) -> int:
    return int(dict(mesh.shape).get(MODEL_AXIS, 1))


def check_model_axis(config: T5Config, size: int) -> None:
    """Raises `InputError` unless a `model` axis of `size` divides what it splits."""
    if size == 1:
        return
    dims = {
        "num_heads": config.num_heads,
        "d_ff": config.d_ff,
        "vocab_size": config.vocab_size,
    }
    bad = {k: v for k, v in dims.items() if v % size}
    if bad:
        listed = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise InputError(
            f"the mesh's {MODEL_AXIS!r} axis has size {size}, which does not divide {listed}; "
            f"tensor parallelism splits the heads, d_ff and the vocabulary, so the {MODEL_AXIS!r} "
            f"axis must divide num_heads={config.num_heads}, d_ff={config.d_ff} and "
            f"vocab_size={config.vocab_size} (or be 1)."
        )


def param_specs(params: Any, model_size: int) -> Any:
    """A `PartitionSpec` for every leaf of `params` (either layout), by the table above."""

    def leaf(path, x):
        if model_size == 1 or getattr(x, "ndim", 0) != 2:
            return PartitionSpec()
        keys = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
        name, parent = keys[-1], (keys[-2] if len(keys) > 1 else "")
        if parent in ("self_attn", "cross_attn") and name in _ATTENTION:
            return _ATTENTION[name]
        if parent == "ffn" and name in _FFN:
            return _FFN[name]
        if keys == ["shared", "embedding"]:
            return _ROWS
        if keys == ["lm_head"]:
            return _COLUMNS
        return PartitionSpec()

    return jax.tree_util.tree_map_with_path(leaf, params)


def param_shardings(params: Any, config: T5Config, mesh: Mesh) -> Any:
    """A `NamedSharding` on `mesh` for every leaf of `params` (checks the `model` axis)."""
    mesh = check_mesh(mesh)
    size = model_axis_size(mesh)
    check_model_axis(config, size)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(params, size))


def place(tree: Any, shardings: Any) -> Any:
    """`tree` laid out with `shardings`; leaves already laid out so are kept as they are.

    Under `jax.distributed`, host values (or arrays on one local device) must be the same on
    every process; each process then places its own shards.
    """

    def leaf(x, sharding):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if jax.process_count() > 1 and not (
            isinstance(x, jax.Array) and not x.is_fully_addressable
        ):
            import numpy as np

            value = np.asarray(x)
            return jax.make_array_from_callback(value.shape, sharding, lambda i: value[i])
        return jax.device_put(x, sharding)

    return jax.tree.map(leaf, tree, shardings)


def is_placed(tree: Any, shardings: Any) -> bool:
    """Whether every leaf of `tree` already has its sharding."""
    leaves = jax.tree.leaves(tree)
    targets = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, NamedSharding))
    return len(leaves) == len(targets) and all(
        isinstance(x, jax.Array) and x.sharding == s for x, s in zip(leaves, targets, strict=True)
    )
