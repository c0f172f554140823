"""Hugging Face *Flax* weights (`flax_model.msgpack`, or its shards) as a PyTorch-style state dict.

`transformers`' Flax models (4.x) save their parameter tree with `flax.serialization.to_bytes`:
nested dicts such as `encoder/block/0/layer/0/SelfAttention/q/kernel`, linear kernels `[in, out]`,
embeddings named `embedding`. A sharded checkpoint (`flax_model-0000N-of-0000M.msgpack` and
`flax_model.msgpack.index.json`, whose `weight_map` keys are the tree paths joined with "/") holds
part of that tree in each shard; a shard's keys may also be "/"-joined paths. Both read into the
names and layouts of the PyTorch state dict (`...SelfAttention.q.weight` `[out, in]`,
`shared.weight`), as every format of `free_jax.checkpoints.hf.WEIGHT_FORMATS` is, following the
rules of transformers' own Flax-to-PyTorch conversion. Arrays keep their stored dtype (bfloat16
as `ml_dtypes.bfloat16`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from free_jax.errors import CheckpointError

_LFS_POINTER = b"version https://git-lfs"


def read_flax_msgpack(file: Path) -> dict[str, np.ndarray]:
    """Reads a Flax msgpack weights file (whole or one shard) into HF PyTorch tensor names.

    `kernel` becomes `weight`, transposed to `[out, in]` when 2-D; `embedding` and `scale` become
    `weight`; other leaves (T5's layer-norm `weight`) keep their name. The path components are
    joined with ".". A leading `params` collection, when every path has it, is dropped.

    Raises:
      CheckpointError: the file cannot be read, is not a complete Flax msgpack file, or holds
        something other than a tree of arrays; the message names the file.
    """
    from flax.serialization import msgpack_restore

    try:
        data = Path(file).read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read weights file {file}: {e}.") from e
    if data.startswith(_LFS_POINTER):
        raise CheckpointError(
            f"{file} is a Git LFS pointer, not the weights: fetch the file itself "
            f"(`git lfs pull` in the cloned repository)."
        )
    try:
        tree = msgpack_restore(data)
    except Exception as e:  # noqa: BLE001 - msgpack and numpy raise many types for bad bytes
        raise CheckpointError(
            f"cannot read weights file {file}: it is not a complete Flax msgpack file "
            f"(truncated or corrupt? {type(e).__name__}: {e})."
        ) from e
    if not isinstance(tree, Mapping) or not tree:
        raise CheckpointError(
            f"{file} holds {_describe(tree)}; expected a Flax parameter tree (a nested dict of "
            f"arrays, as `save_pretrained` of a transformers Flax model writes)."
        )
    leaves: dict[tuple[str, ...], np.ndarray] = {}
    _flatten(tree, (), leaves, file)
    if all(path[0] == "params" and len(path) > 1 for path in leaves):
        leaves = {path[1:]: array for path, array in leaves.items()}
    state: dict[str, np.ndarray] = {}
    for path, array in leaves.items():
        name, value = _to_torch_name(path, array)
        if name in state:
            raise CheckpointError(
                f"{file}: two entries map to the tensor {name!r} (one is {'/'.join(path)!r})."
            )
        state[name] = value
    return state


def _flatten(
    node: Any, prefix: tuple[str, ...], out: dict[tuple[str, ...], np.ndarray], file: Path
) -> None:
    for key, value in node.items():
        # A key may itself be a "/"-joined path (the layout of transformers' shard index).
        path = prefix + tuple(part for part in str(key).split("/") if part)
        if isinstance(value, Mapping):
            _flatten(value, path, out, file)
        elif isinstance(value, np.ndarray):
            if not path:
                raise CheckpointError(f"{file}: an array is stored under an empty key.")
            if path in out:
                raise CheckpointError(f"{file}: the entry {'/'.join(path)!r} is stored twice.")
            out[path] = value
        else:
            raise CheckpointError(
                f"{file}: entry {'/'.join(path)!r} is {_describe(value)}, not an array; expected "
                f"a Flax parameter tree (a nested dict of arrays)."
            )


def _to_torch_name(path: tuple[str, ...], array: np.ndarray) -> tuple[str, np.ndarray]:
    *module, leaf = path
    if leaf == "kernel":
        leaf = "weight"
        if array.ndim == 2:
            array = np.ascontiguousarray(array.T)
    elif leaf in ("embedding", "scale"):
        leaf = "weight"
    return ".".join((*module, leaf)), array


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of dtype {value.dtype}"
    if isinstance(value, Mapping):
        return "an empty dict" if not value else "a dict"
    return f"a {type(value).__name__}"
