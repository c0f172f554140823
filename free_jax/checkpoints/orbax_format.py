"""free_jax's own checkpoint format: `free_jax.json` (config, dtype, metadata) + orbax `params/`."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from free_jax.checkpoints.files import listing, read_json_object
from free_jax.checkpoints.hf import load_tokenizer
from free_jax.errors import CheckpointError
from free_jax.models import exit_classifier, t5
from free_jax.models.config import T5Config
from free_jax.models.model import Model

FREE_JAX_META = "free_jax.json"
_FORMAT_VERSION = 1


def save(
    model: Model, path: str | os.PathLike, *, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Saves `model` as a free_jax checkpoint: config + orbax parameters + tokenizer.

    Args:
      model: the model to save.
      path: the directory to write: a new one, or an existing empty one. Never overwritten: an
        existing non-empty directory (an earlier checkpoint, say) raises `CheckpointError`.
      metadata: extra JSON-serialisable entries kept beside the config (e.g. FREE settings
        under "free"); default `model.metadata`. `load` returns them as `Model.metadata`.

    Returns:
      The absolute checkpoint directory.
    """

    path = Path(path).absolute()
    if path.exists() and not (path.is_dir() and not any(path.iterdir())):
        raise CheckpointError(
            f"cannot save to {path}: it already exists and is not an empty directory "
            f"(found: {listing(path) if path.is_dir() else 'a file'}). save never overwrites; "
            f"choose a new path or remove the old one first."
        )
    meta = {
        "format_version": _FORMAT_VERSION,
        "config": dataclasses.asdict(model.config),
        "dtype": str(jnp.dtype(model.dtype)),
        "metadata": dict(model.metadata if metadata is None else metadata),
        "exit_classifier": exit_classifier.has_exit_classifier(model.params),
    }
    # Serialised before anything is written, so bad metadata leaves no half-written directory.
    try:
        header = json.dumps(meta, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"metadata must be JSON-serialisable: {e}.") from e
    path.mkdir(parents=True, exist_ok=True)
    with _checkpointer() as checkpointer:
        checkpointer.save(path / "params", model.params)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(path / "tokenizer"))
    # Written last: a directory without it is an interrupted save, not a checkpoint.
    with open(path / FREE_JAX_META, "w") as f:
        f.write(header)
    return path


def _checkpointer() -> Any:
    """An orbax checkpointer for this process alone.

    `save` and `load` work on one process's copy of the parameters. In a multi-process JAX job
    orbax's default would wait at barriers for every process, and hang when (as after training)
    only one process saves.
    """
    import orbax.checkpoint as ocp

    if jax.process_count() == 1:
        return ocp.StandardCheckpointer()
    me = jax.process_index()
    options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    return ocp.StandardCheckpointer(multiprocessing_options=options)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The `metadata` dictionary saved beside a free_jax checkpoint."""
    meta_file = Path(path) / FREE_JAX_META
    if not meta_file.is_file():
        raise CheckpointError(
            f"{path} is not a free_jax checkpoint (no {FREE_JAX_META}); only checkpoints written "
            f"by free_jax.save carry metadata."
        )
    return read_json_object(meta_file).get("metadata", {})


def load_free_jax(path: Path, dtype: Any) -> Model:

    meta_file = path / FREE_JAX_META
    try:
        with open(meta_file, encoding="utf-8") as f:
            meta = json.load(f)
        version = meta["format_version"]
        config = T5Config(**meta["config"])
        stored_dtype = jnp.dtype(meta["dtype"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{meta_file} is not a valid free_jax checkpoint header: {e!r}."
        ) from e
    if version > _FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer free_jax (format {version}; this one reads up to "
            f"{_FORMAT_VERSION}); upgrade free_jax."
        )
    target = t5.param_shapes(config, stored_dtype)
    if meta.get("exit_classifier", False):
        target[exit_classifier.KEY] = jax.eval_shape(
            lambda: exit_classifier.init_exit_classifier(config, jax.random.key(0), stored_dtype)
        )
    try:
        with _checkpointer() as checkpointer:
            params = checkpointer.restore(path.absolute() / "params", target)
    except Exception as e:  # noqa: BLE001 - orbax raises many types for damaged checkpoints
        raise CheckpointError(f"cannot restore parameters from {path / 'params'}: {e}") from e
    # Orbax hands back host (NumPy) arrays; put them on the device once, or every jitted call
    # would copy all the weights over again (a few ms per call for the demo model).
    params = jax.device_put(params)
    if dtype is not None:
        params = t5.cast_params(params, dtype)
    tokenizer = load_tokenizer(path / "tokenizer") if (path / "tokenizer").is_dir() else None
    return Model(
        config=config, params=params, tokenizer=tokenizer, metadata=meta.get("metadata", {})
    )
