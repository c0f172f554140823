"""`decode(..., mesh=mesh)`: decoding on a device mesh, one decode loop per data shard.

The mesh (a `jax.sharding.Mesh`, checked by `free_jax.models.partition.check_mesh`) has a
`data` axis and optionally a `model` axis:

- `data`: the batch's rows are split into one contiguous block per data shard, balanced (shard
  i takes B // n rows, one more for the first B % n shards) and padded to a common size with
  copies of the shard's own last row (a shard with no row at all takes copies of row 0). A copy
  makes the same decisions as its original, so it never lengthens its shard's loop. The method's
  jitted core then runs under `jax.shard_map`, manual over `data` only: each shard runs its own
  `lax.while_loop`, so it stops when its own rows are done, and FREE's exits, buffers, waits
  and deep passes are decided among its own rows. Its output equals a single-device decode of
  that shard's rows alone (for every method whose rows do not influence each other, which is
  all but FREE's "rollback" mode and waiting, a single-device decode of the whole batch).
- `model` (automatic, for GSPMD): the parameters are split for tensor parallelism by
  `Model.shard` (`free_jax.models.partition`), and XLA inserts the reductions.

What the core returns per shard is fetched per shard, and the method's `report` runs on each
shard on its own; `decode` then joins them: per-row arrays are concatenated (padding dropped),
`DecodeOutput.shard_steps` holds each shard's loop iterations (`steps` is their maximum), and
the per-pass diagnostics of the shards that hold real rows are joined: `num_deep_passes` is
their sum (the deep passes run over all devices), `deep_pass_tokens` the concatenation of the
shards' lists, shard by shard, so that it keeps one entry per pass (its entries count copies
made for padding too).

Multi-host (`jax.distributed`): every process passes the same global batch and the same model
(host values, or arrays already on the mesh), and every process gets the whole output.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from free_jax.decoding.methods.base import DecodeCall, Method
from free_jax.decoding.xla_options import decode_jit
from free_jax.errors import InputError
from free_jax.models.model import Model
from free_jax.models.partition import DATA_AXIS, check_mesh

_ROWS = PartitionSpec(DATA_AXIS)
_REPLICATED = PartitionSpec()


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """Where the batch's rows go on the `data` axis.

    Attributes:
      index: int[n * b] the source row of each padded row (shard-major, b rows per shard).
      real: bool[n * b] the padded row is a real row (not a copy made for padding).
      shards: data shards, n; rows_per_shard: b.
    """

    index: np.ndarray
    real: np.ndarray
    shards: int
    rows_per_shard: int

    @classmethod
    def make(cls, batch: int, shards: int) -> RowLayout:
        b = -(-batch // shards)
        index, real, start = [], [], 0
        for i in range(shards):
            count = batch // shards + (i < batch % shards)
            rows = list(range(start, start + count))
            index += rows + [rows[-1] if rows else 0] * (b - count)
            real += [True] * count + [False] * (b - count)
            start += count
        return cls(np.asarray(index, np.int64), np.asarray(real), shards, b)

    def shard_has_rows(self) -> np.ndarray:
        """bool[n]: the shard holds at least one real row."""
        return self.real.reshape(self.shards, self.rows_per_shard).any(axis=1)


def data_shards(mesh: Mesh) -> int:
    return int(dict(mesh.shape)[DATA_AXIS])


def check_same_batch(arrays: tuple[np.ndarray, ...]) -> None:
    """Under `jax.distributed`, every process must pass the same global batch: compares the
    arrays' shapes and a checksum of their contents across processes.

    Raises:
      InputError: the processes passed different batches (naming each one's shapes).
    """
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    shapes = [np.asarray(a).shape for a in arrays]
    summary = np.array(
        [len(shapes)]
        + [d for shape in shapes for d in (len(shape), *shape)]
        + [int(zlib.crc32(np.ascontiguousarray(a).tobytes())) for a in arrays],
        np.int64,
    )
    width = np.array([summary.size], np.int64)
    widths = multihost_utils.process_allgather(width)
    if np.any(widths != widths[0]):
        raise InputError(
            "decode(..., mesh=...) under jax.distributed takes the same global batch on every "
            f"process; the processes' inputs have different ranks (summaries of {widths.ravel()} "
            "numbers). Pass every process the whole batch, not its own rows."
        )
    gathered = multihost_utils.process_allgather(summary)  # [processes, n]
    if np.any(gathered != gathered[0]):
        raise InputError(
            "decode(..., mesh=...) under jax.distributed takes the same global batch on every "
            f"process, but process {jax.process_index()} has inputs of shapes {shapes} and the "
            "processes' batches differ (shapes or contents). Pass every process the whole "
            "batch, not its own rows."
        )


def place_rows(arrays: tuple[np.ndarray, ...], layout: RowLayout, mesh: Mesh) -> tuple:
    """Host arrays [B, ...] padded and laid out as `layout` says, split over `data` (every
    process passes the same arrays and places its own shards)."""
    check_same_batch(arrays)
    sharding = NamedSharding(mesh, _ROWS)
    out = []
    for array in arrays:
        value = np.asarray(array)[layout.index]
        out.append(jax.make_array_from_callback(value.shape, sharding, lambda i, v=value: v[i]))
    return tuple(out)


def _split_settings(settings: Any) -> tuple[Any, dict[str, Any]]:
    """(static part, array fields): the arrays (a threshold) become traced arguments, so that a
    new value does not recompile; the rest, hashable, selects the compiled program."""
    if not dataclasses.is_dataclass(settings):
        return settings, {}
    arrays = {}
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if isinstance(value, np.ndarray | np.generic | jax.Array):
            arrays[field.name] = value
    return dataclasses.replace(settings, **dict.fromkeys(arrays)), arrays


def run(
    impl: Method,
    settings: Any,
    model: Model,
    encoded: tuple[jax.Array, jax.Array],
    source: tuple[jax.Array, jax.Array],
    *,
    mesh: Mesh,
    max_new_tokens: int,
    min_new_tokens: int,
) -> list[dict[str, np.ndarray]]:
    """Runs the method's core on every data shard; returns each shard's `Method.outputs`,
    fetched to the host (on every process).

    Args:
      model: the model, placed on `mesh` (`Model.shard`).
      encoded: (encoder_output [n*b, S, D], encoder_mask [n*b, S]) split over `data`.
      source: (input_ids, attention_mask) int32[n*b, S'] split over `data`.
    """
    static, arrays = _split_settings(settings)
    model_params = model.params if impl.reads_source else None
    source = source if impl.reads_source else (None, None)
    got = _sharded(
        model.decode_params,
        model_params,
        *encoded,
        *source,
        arrays,
        impl=impl,
        static=static,
        config=model.config,
        mesh=mesh,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
    )
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        got = multihost_utils.process_allgather(got, tiled=True)
    else:
        got = jax.device_get(got)
    return [{k: np.asarray(v[i]) for k, v in got.items()} for i in range(data_shards(mesh))]


@decode_jit(
    static_argnames=("impl", "static", "config", "mesh", "max_new_tokens", "min_new_tokens"),
)
def _sharded(
    decode_params,
    model_params,
    encoder_output,
    encoder_mask,
    input_ids,
    attention_mask,
    arrays,
    *,
    impl,
    static,
    config,
    mesh,
    max_new_tokens,
    min_new_tokens,
):
    """The method's core under `shard_map`, manual over `data`: each output leaf gets a leading
    shard axis, [n, ...] globally."""

    def shard(decode_params, model_params, encoder_output, encoder_mask, ids, mask, arrays):
        settings = dataclasses.replace(static, **arrays) if arrays else static
        call = DecodeCall(
            model=Model(config=config, params=model_params),
            params=decode_params,
            encoder_output=encoder_output,
            encoder_mask=encoder_mask,
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
        )
        outputs = impl.outputs(settings, impl.run(settings, call))
        return jax.tree.map(lambda x: x[None], outputs)

    mapped = jax.shard_map(
        shard,
        mesh=mesh,
        in_specs=(_REPLICATED, _REPLICATED, _ROWS, _ROWS, _ROWS, _ROWS, _REPLICATED),
        out_specs=_ROWS,
        axis_names=frozenset({DATA_AXIS}),
        check_vma=False,
    )
    return mapped(
        decode_params, model_params, encoder_output, encoder_mask, input_ids, attention_mask, arrays
    )


__all__ = ["RowLayout", "check_mesh", "data_shards", "place_rows", "run"]
