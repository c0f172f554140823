"""Loading and saving models: Hugging Face directories and hub names, our orbax checkpoints, export.

Formats `load` understands, by what the directory holds:

* `free_jax.json` + `params/`: a checkpoint written by `save` (orbax, any dtype, sharded-ready).
* `config.json` + weights: a Hugging Face T5 / mT5 / LongT5 directory, weights in
  `model.safetensors`, sharded safetensors (`model.safetensors.index.json`), or
  `pytorch_model.bin` (needs torch). Tokenizer files (`spiece.model`, `tokenizer.json`, ...) are
  loaded when present, and so are the two files `export_hf` adds for FREE:
  `free_jax_metadata.json` (`Model.metadata`, e.g. the exit layer and threshold training chose)
  and `exit_classifier.safetensors` (the "meta" head).
* Anything else that is not a directory is taken as a hub name and downloaded with
  `huggingface_hub` (weights and tokenizer only), which needs a network.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from free_jax import convert, exit_classifier, modeling
from free_jax.config import T5Config
from free_jax.errors import CheckpointError, ConfigError
from free_jax.model import Model

FREE_JAX_META = "free_jax.json"
# Beside a Hugging Face export: what the HF format has no place for.
HF_EXTRA_METADATA = "free_jax_metadata.json"
HF_EXTRA_CLASSIFIER = "exit_classifier.safetensors"
_FORMAT_VERSION = 1
_TOKENIZER_FILES = (
    "spiece.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
_HUB_PATTERNS = ["config.json", "*.safetensors", "*.safetensors.index.json", *_TOKENIZER_FILES]


def load(
    path_or_name: str | os.PathLike, *, dtype: Any = None, revision: str | None = None
) -> Model:
    """Loads a model from a directory (Hugging Face or free_jax format) or a hub name.

    Args:
      path_or_name: a local directory, or a Hugging Face hub name such as "google/flan-t5-small".
      dtype: cast floating-point parameters to this dtype (e.g. `jnp.bfloat16`); default: as
        stored (a checkpoint with mixed float dtypes is cast to its embedding's dtype).
      revision: hub revision (branch, tag or commit), for hub names only.

    Returns:
      A `Model` with `.config`, `.params` and `.tokenizer` (None when the checkpoint has none).

    Raises:
      CheckpointError: the directory is missing or its contents are unreadable or inconsistent.
      ConfigError: `config.json` does not describe a T5-family model.
    """
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        if (path / FREE_JAX_META).is_file():
            return _load_free_jax(path, dtype)
        if (path / "config.json").is_file():
            return _load_hf_dir(path, dtype)
        raise CheckpointError(
            f"{path} has neither 'config.json' (a Hugging Face checkpoint) nor "
            f"'{FREE_JAX_META}' (a free_jax checkpoint); found: {_listing(path)}."
        )
    if path.exists():
        raise CheckpointError(f"{path} is a file; free_jax.load expects a checkpoint directory.")
    if _looks_like_path(str(path_or_name)):
        raise CheckpointError(f"checkpoint directory {str(path_or_name)!r} does not exist.")
    return _load_hub(str(path_or_name), dtype, revision)


def _looks_like_path(text: str) -> bool:
    # Hub names are "name" or "owner/name"; anything with more structure must be a local path.
    return (
        text.startswith((".", "/", "~", "\\"))
        or os.path.isabs(text)
        or text.count("/") > 1
        or "\\" in text
    )


def _listing(path: Path) -> str:
    names = sorted(p.name for p in path.iterdir())
    if not names:
        return "nothing (the directory is empty)"
    return ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")


# ---------------------------------------------------------------------------- Hugging Face


def _load_hub(name: str, dtype: Any, revision: str | None) -> Model:
    import huggingface_hub
    from huggingface_hub.errors import (
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        local = huggingface_hub.snapshot_download(
            name, revision=revision, allow_patterns=_HUB_PATTERNS
        )
    except Exception as e:  # noqa: BLE001 - every failure mode gets a clear message
        cause = f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]})"
        # Not found or not a valid name: the hub answered, or was never needed to tell.
        if isinstance(e, HFValidationError):
            raise CheckpointError(
                f"{name!r} is neither a local directory nor a valid Hugging Face Hub name; "
                f"pass a checkpoint directory. {cause}"
            ) from e
        if isinstance(e, RepositoryNotFoundError | RevisionNotFoundError):
            at = f" at revision {revision!r}" if revision else ""
            raise CheckpointError(
                f"{name!r} is neither a local directory nor a model{at} on the Hugging Face Hub "
                f"(or it is private or gated); pass a checkpoint directory. {cause}"
            ) from e
        raise CheckpointError(
            f"{name!r} is not a local directory, and the Hugging Face Hub could not be reached "
            f"to download it (offline, or HF_HUB_OFFLINE is set). Download the checkpoint "
            f"elsewhere and pass its local directory instead. {cause}"
        ) from e
    return _load_hf_dir(Path(local), dtype)


def _read_json_object(file: Path) -> dict[str, Any]:
    """A JSON file that must hold an object; anything else is a `CheckpointError` naming it."""
    try:
        with open(file, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}.") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{file} must hold a JSON object, got {type(value).__name__}.")
    return value


def read_hf_config(path: Path) -> T5Config:
    """Reads `config.json` of a Hugging Face checkpoint directory into a `T5Config`."""
    config_file = path / "config.json"
    hf = _read_json_object(config_file)
    try:
        return T5Config.from_hf_dict(hf)
    except ConfigError as e:
        raise ConfigError(f"{config_file}: {e}") from e
    except (TypeError, ValueError, AttributeError) as e:
        # A field of the wrong JSON type (e.g. "feed_forward_proj": null, "d_model": "512").
        raise ConfigError(f"{config_file} has a field of the wrong type: {e!r}.") from e


def _read_safetensors(file: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read weights file {file}: {e}.") from e


def _read_torch_bin(file: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(
            f"{file} is a PyTorch pickle; reading it needs torch (pip install torch), or convert "
            f"the checkpoint to safetensors."
        ) from e
    try:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many unrelated types for bad files
        raise CheckpointError(f"cannot read weights file {file}: {e}.") from e
    if not isinstance(state, Mapping):
        raise CheckpointError(
            f"{file} holds a {type(state).__name__}; expected a state dict (tensor name -> tensor)."
        )
    out = {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(
                f"{file}: entry {name!r} is not a tensor but a {type(tensor).__name__}; expected a "
                f"flat state dict (a training checkpoint must be reduced to its model weights)."
            )
        if tensor.dtype == torch.bfloat16:
            import ml_dtypes

            out[name] = tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            out[name] = tensor.numpy()
    return out


def _read_sharded(path: Path, index_name: str, reader) -> dict[str, np.ndarray]:
    index_file = path / index_name
    try:
        with open(index_file) as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_file} is not a valid weight index: {e!r}.") from e
    state: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        shard_file = path / shard
        if not shard_file.is_file():
            raise CheckpointError(f"{index_file} names shard {shard!r}, which is missing.")
        state.update(reader(shard_file))
    return state


def read_hf_weights(path: Path) -> dict[str, np.ndarray]:
    """Reads every tensor of a Hugging Face checkpoint directory as NumPy arrays."""
    if (path / "model.safetensors").is_file():
        return _read_safetensors(path / "model.safetensors")
    if (path / "model.safetensors.index.json").is_file():
        return _read_sharded(path, "model.safetensors.index.json", _read_safetensors)
    if (path / "pytorch_model.bin").is_file():
        return _read_torch_bin(path / "pytorch_model.bin")
    if (path / "pytorch_model.bin.index.json").is_file():
        return _read_sharded(path, "pytorch_model.bin.index.json", _read_torch_bin)
    raise CheckpointError(
        f"{path} has a config.json but no weights: expected model.safetensors, "
        f"model.safetensors.index.json or pytorch_model.bin; found: {_listing(path)}."
    )


def _load_tokenizer(path: Path) -> Any:
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - a broken tokenizer must not block loading weights
        warnings.warn(
            f"{path}: tokenizer files are present but could not be loaded ({e}); "
            "continuing without a tokenizer.",
            stacklevel=3,
        )
        return None


def _to_jax(params: Any, dtype: Any) -> Any:
    if dtype is None:
        dtype = params["shared"]["embedding"].dtype
    return jax.tree.map(lambda x: jnp.asarray(x, dtype=dtype), params)


def _load_hf_dir(path: Path, dtype: Any) -> Model:
    config = read_hf_config(path)
    state = read_hf_weights(path)
    params, config = convert.hf_to_params(config, state, source=str(path))
    tokenizer = _load_tokenizer(path)
    _check_tokenizer(tokenizer, config, path)
    metadata = {}
    if (path / HF_EXTRA_METADATA).is_file():
        metadata = _read_json_object(path / HF_EXTRA_METADATA)
    if (path / HF_EXTRA_CLASSIFIER).is_file():
        params[exit_classifier.KEY] = _read_exit_classifier(path / HF_EXTRA_CLASSIFIER, config)
    return Model(
        config=config, params=_to_jax(params, dtype), tokenizer=tokenizer, metadata=metadata
    )


def _read_exit_classifier(file: Path, config: T5Config) -> dict[str, Any]:
    """The "meta" head saved by `export_hf` (flat `hidden.kernel`-style names), shape-checked."""
    flat = _read_safetensors(file)
    expected = jax.eval_shape(
        lambda: exit_classifier.init_exit_classifier(config, jax.random.key(0))
    )
    tree: dict[str, Any] = {}
    for layer, entries in expected.items():
        tree[layer] = {}
        for name, shape in entries.items():
            key = f"{layer}.{name}"
            if key not in flat or flat[key].shape != shape.shape:
                found = flat[key].shape if key in flat else "missing"
                raise CheckpointError(
                    f"{file}: exit classifier tensor {key!r} should have shape {shape.shape}, "
                    f"found {found}."
                )
            tree[layer][name] = flat[key]
    return tree


def _check_tokenizer(tokenizer: Any, config: T5Config, path: Path) -> None:
    # Unlike an unreadable tokenizer (warned, dropped), a readable one that emits ids the model
    # has no embedding for is a mismatched checkpoint, and decoding with it would fail later.
    if tokenizer is not None and len(tokenizer) > config.vocab_size:
        raise CheckpointError(
            f"{path}: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has "
            f"only {config.vocab_size}."
        )


def export_hf(model: Model, path: str | os.PathLike) -> Path:
    """Writes `model` as a Hugging Face checkpoint directory that `transformers` loads.

    The config is written in the 4.x convention (`tie_word_embeddings: false` and a separate
    `lm_head.weight` for untied models), which transformers 4.x and 5.x both read correctly.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "config.json", "w") as f:
        json.dump(model.config.to_hf_dict(), f, indent=2)
    state = convert.params_to_hf(model.config, model.params)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(path))
    # transformers ignores these two; `load` reads them back.
    if model.metadata:
        with open(path / HF_EXTRA_METADATA, "w") as f:
            json.dump(model.metadata, f, indent=2, sort_keys=True, allow_nan=False)
    if exit_classifier.has_exit_classifier(model.params):
        head = model.params[exit_classifier.KEY]
        flat = {
            f"{layer}.{name}": np.asarray(value, np.float32)
            for layer, entries in head.items()
            for name, value in entries.items()
        }
        save_file(flat, str(path / HF_EXTRA_CLASSIFIER))
    return path


# ---------------------------------------------------------------------------- free_jax (orbax)


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
            f"(found: {_listing(path) if path.is_dir() else 'a file'}). save never overwrites; "
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
    return _read_json_object(meta_file).get("metadata", {})


def _load_free_jax(path: Path, dtype: Any) -> Model:

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
    target = modeling.param_shapes(config, stored_dtype)
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
        params = modeling.cast_params(params, dtype)
    tokenizer = _load_tokenizer(path / "tokenizer") if (path / "tokenizer").is_dir() else None
    return Model(
        config=config, params=params, tokenizer=tokenizer, metadata=meta.get("metadata", {})
    )
