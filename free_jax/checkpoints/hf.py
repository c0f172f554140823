"""Hugging Face T5-family checkpoint directories: config, weights, tokenizer; and export.

A directory holds `config.json` and weights in one of the formats `read_hf_weights` lists.
Tokenizer files (`spiece.model`, `tokenizer.json`, ...) are loaded when present, and so are the
two files `export_hf` adds for FREE: `free_jax_metadata.json` (`Model.metadata`, e.g. the exit
layer and threshold training chose) and `exit_classifier.safetensors` (the "meta" head).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from free_jax.checkpoints import hf_names, torch_pickle
from free_jax.checkpoints.files import listing, read_json_object
from free_jax.checkpoints.flax_msgpack import read_flax_msgpack
from free_jax.errors import CheckpointError, ConfigError
from free_jax.models import exit_classifier
from free_jax.models.config import T5Config
from free_jax.models.model import Model

# Beside a Hugging Face export: what the HF format has no place for.
HF_EXTRA_METADATA = "free_jax_metadata.json"
HF_EXTRA_CLASSIFIER = "exit_classifier.safetensors"
TOKENIZER_FILES = (
    "spiece.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def read_hf_config(path: Path) -> T5Config:
    """Reads `config.json` of a Hugging Face checkpoint directory into a `T5Config`."""
    config_file = path / "config.json"
    hf = read_json_object(config_file)
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
    # Always the torch-free reader for torch.save's zip format (every torch >= 1.6 writes it),
    # even where torch is importable:
    # * exact: tests/test_torch_pickle.py shows it bit-exact against torch.load (fp32, fp16,
    #   bf16, uint16, NaN payloads, shared / strided / offset storages, big-endian records);
    # * safe: it resolves only the globals that rebuild tensors, a narrower allowlist than
    #   torch.load(weights_only=True), which could be made to run code up to torch 2.5.1
    #   (CVE-2025-32434) - a torch that may be installed here;
    # * one code path: the same arrays and errors with or without torch, and no seconds-long
    #   torch import for JAX users.
    # Only the legacy (pre-1.6, non-zip) format still needs torch, when it is installed.
    if torch_pickle.is_legacy_format(file):
        try:
            import torch
        except ImportError:
            torch = None
        if torch is not None:
            return _read_legacy_torch_bin(file, torch)
    return torch_pickle.read_torch_bin(file)  # names the alternatives for a legacy file


def _read_legacy_torch_bin(file: Path, torch: Any) -> dict[str, np.ndarray]:
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


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    """One way a Hugging Face directory may hold its weights: a single file or an index + shards.

    `reader(file) -> {HF PyTorch tensor name: array [out, in] for linear layers}`: every format
    is read into the PyTorch state-dict convention, which `hf_names` maps to free_jax's pytree.
    """

    name: str
    single: str
    index: str
    reader: Callable[[Path], dict[str, np.ndarray]]

    @property
    def files(self) -> tuple[str, str]:
        """The two names its weights may go by (single file, shard index)."""
        return self.single, self.index


# In order of preference: when a directory (or a hub repo) holds several, the first is read.
WEIGHT_FORMATS = (
    WeightFormat(
        "safetensors", "model.safetensors", "model.safetensors.index.json", _read_safetensors
    ),
    WeightFormat("flax", "flax_model.msgpack", "flax_model.msgpack.index.json", read_flax_msgpack),
    WeightFormat("pytorch", "pytorch_model.bin", "pytorch_model.bin.index.json", _read_torch_bin),
)


def read_hf_weights(path: Path) -> dict[str, np.ndarray]:
    """Reads every tensor of a Hugging Face checkpoint directory as NumPy arrays.

    The first format of `WEIGHT_FORMATS` the directory holds is read, single file first.
    """
    for fmt in WEIGHT_FORMATS:
        if (path / fmt.single).is_file():
            return fmt.reader(path / fmt.single)
        if (path / fmt.index).is_file():
            return _read_sharded(path, fmt.index, fmt.reader)
    expected = ", ".join(name for fmt in WEIGHT_FORMATS for name in fmt.files)
    raise CheckpointError(
        f"{path} has a config.json but no weights: expected one of {expected}; "
        f"found: {listing(path)}."
    )


def load_tokenizer(path: Path) -> Any:
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None
    import re

    from transformers import AutoTokenizer, T5Tokenizer

    try:
        # A tokenizer class named by tokenizer_config.json or config.json (ByT5 does) is
        # followed. Otherwise the checkpoint is T5-family, and T5's tokenizer fits every member:
        # AutoTokenizer would pick one by config.json's model_type, which gives T5's for t5 and
        # mt5 but none for longt5 and one without T5's special tokens for umt5.
        tokenizer_config = path / "tokenizer_config.json"
        named = any(
            file.is_file() and "tokenizer_class" in read_json_object(file)
            for file in (tokenizer_config, path / "config.json")
        )
        kwargs = {}
        if not tokenizer_config.is_file() and (path / "tokenizer.json").is_file():
            # tokenizer.json alone is the whole tokenizer, its <extra_id_N> sentinels included;
            # say how many, or T5Tokenizer adds its default 100 on top of them.
            with open(path / "tokenizer.json", encoding="utf-8") as f:
                serialized = json.load(f)
            tokens = [t.get("content") for t in serialized.get("added_tokens") or []]
            vocab = (serialized.get("model") or {}).get("vocab") or []
            tokens += [v[0] if isinstance(v, list) and v else v for v in vocab]
            sentinel = re.compile(r"<extra_id_\d+>")
            sentinels = {t for t in tokens if isinstance(t, str) and sentinel.fullmatch(t)}
            kwargs["extra_ids"] = len(sentinels)
        return (AutoTokenizer if named else T5Tokenizer).from_pretrained(str(path), **kwargs)
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


def load_hf_dir(path: Path, dtype: Any) -> Model:
    config = read_hf_config(path)
    state = read_hf_weights(path)
    params, config = hf_names.hf_to_params(config, state, source=str(path))
    tokenizer = load_tokenizer(path)
    _check_tokenizer(tokenizer, config, path)
    metadata = {}
    if (path / HF_EXTRA_METADATA).is_file():
        metadata = read_json_object(path / HF_EXTRA_METADATA)
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
    state = hf_names.params_to_hf(model.config, model.params)
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
