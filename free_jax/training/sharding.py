"""Device mesh, sharding rules and multi-host start-up for training.

The mesh has two axes: `data` (pure data parallelism: parameters replicated) and `fsdp`
(parameters and optimizer state sharded, gathered layer by layer by XLA as needed). A batch is
split over both axes, so every device sees different examples. The same code runs on one CPU,
on 8 fake CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=8`), on several local
processes after `jax.distributed.initialize`, and on accelerators.

Sharding rule for an array (parameters, optimizer moments, Adafactor's factored statistics
alike): arrays smaller than `min_shard_size` elements, and every array when `fsdp == 1`, are
replicated; otherwise the largest axis whose size the `fsdp` axis divides is sharded over
`fsdp` (ties go to the later axis, the output features of a `[in, out]` kernel), and an array
with no such axis is replicated.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from free_jax.errors import ConfigError
from free_jax.training.config import DistributedConfig, MeshConfig

log = logging.getLogger("free_jax.training")

DATA_AXIS, FSDP_AXIS = "data", "fsdp"
#: The batch axis is split over every device.
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)


def maybe_initialize_distributed(config: DistributedConfig) -> bool:
    """Calls `jax.distributed.initialize` when asked to (config or environment); idempotent.

    Must run before anything touches a JAX device. Returns whether this is a multi-process run.
    """
    enabled = (
        config.enabled
        or config.coordinator_address is not None
        or os.environ.get("FREE_JAX_DISTRIBUTED", "") not in ("", "0")
    )
    if enabled and not jax.distributed.is_initialized():
        kwargs = {
            k: v
            for k, v in dict(
                coordinator_address=config.coordinator_address,
                num_processes=config.num_processes,
                process_id=config.process_id,
            ).items()
            if v is not None
        }
        jax.distributed.initialize(**kwargs)
        log.info(
            "jax.distributed initialised: process %d of %d, %d local / %d global devices",
            jax.process_index(),
            jax.process_count(),
            jax.local_device_count(),
            jax.device_count(),
        )
    return jax.process_count() > 1


def make_mesh(config: MeshConfig, devices: Any = None) -> Mesh:
    """The `(data, fsdp)` mesh over `devices` (default: every global device)."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    n = devices.size
    data, fsdp = config.data, config.fsdp
    if data == -1:
        data = n // fsdp
    if fsdp == -1:
        fsdp = n // data
    if data * fsdp != n or data < 1 or fsdp < 1:
        raise ConfigError(
            f"mesh data={config.data} x fsdp={config.fsdp} does not fit the {n} available "
            f"devices; the product must be {n} (use -1 for one axis to take the rest)."
        )
    # Device order is process-major, so a process's devices are contiguous along the batch.
    return Mesh(devices.reshape(data, fsdp), (DATA_AXIS, FSDP_AXIS))


def array_spec(shape: tuple[int, ...], fsdp_size: int, min_shard_size: int) -> PartitionSpec:
    """The sharding rule above, for one array shape."""
    if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_shard_size:
        return PartitionSpec()
    best = None
    for axis, size in enumerate(shape):
        if size % fsdp_size == 0 and (best is None or size >= shape[best]):
            best = axis
    if best is None:
        return PartitionSpec()
    return PartitionSpec(*([None] * best + [FSDP_AXIS]))


def tree_shardings(tree: Any, mesh: Mesh, min_shard_size: int) -> Any:
    """A `NamedSharding` for every array leaf of `tree` (arrays or `ShapeDtypeStruct`s)."""
    fsdp_size = mesh.shape[FSDP_AXIS]

    def leaf(x):
        return NamedSharding(mesh, array_spec(tuple(x.shape), fsdp_size, min_shard_size))

    return jax.tree.map(leaf, tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch arrays `[B, ...]`: the batch axis split over every device."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def check_batch_divides(batch_size: int, mesh: Mesh, what: str = "data.batch_size") -> None:
    n = mesh.devices.size
    if batch_size % n:
        raise ConfigError(
            f"{what}={batch_size} must be divisible by the {n} devices of the mesh (each device "
            f"takes an equal share of every batch)."
        )
    if batch_size % jax.process_count():
        raise ConfigError(
            f"{what}={batch_size} must be divisible by the {jax.process_count()} processes."
        )


def process_rows(batch_size: int) -> slice:
    """The rows of a global batch that this process feeds (processes own contiguous blocks)."""
    per = batch_size // jax.process_count()
    return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


def global_batch(
    local: Mapping[str, np.ndarray], sharding: NamedSharding, batch_size: int
) -> dict[str, jax.Array]:
    """Assembles this process's rows of a batch into global arrays split over the mesh."""
    out = {}
    for key, value in local.items():
        value = np.asarray(value)
        out[key] = jax.make_array_from_process_local_data(
            sharding, value, (batch_size, *value.shape[1:])
        )
    return out


def put_global(tree: Any, shardings: Any) -> Any:
    """Places a host tree (identical on every process) onto the mesh with `shardings`."""

    def leaf(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(leaf, tree, shardings)


def decode_mesh(mesh: Mesh, config: Any) -> Mesh:
    """The training mesh's devices as a decoding mesh (`free_jax.decode(mesh=...)`): `fsdp`
    becomes the tensor-parallel `model` axis where it divides the heads, `d_ff` and the
    vocabulary, else every device goes to `data`."""
    from free_jax.errors import InputError
    from free_jax.models.partition import check_model_axis

    devices = mesh.devices
    try:
        check_model_axis(config, mesh.shape[FSDP_AXIS])
    except InputError:
        devices = devices.reshape(-1, 1)
    return Mesh(devices, ("data", "model"))


def to_host(tree: Any) -> Any:
    """NumPy copies of a tree of (possibly sharded, multi-process) arrays, on every process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)
