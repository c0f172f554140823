"""`load`: one entry point for every checkpoint, by what the path or name holds.

* `free_jax.json` + `params/`: a checkpoint written by `save` (`orbax_format`).
* `config.json` + weights: a Hugging Face T5 / mT5 / LongT5 directory (`hf`).
* Anything else that is not a directory is taken as a hub name (`hub`), which needs a network
  or the checkpoint in the local hub cache.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from free_jax.checkpoints.files import listing
from free_jax.checkpoints.hf import load_hf_dir
from free_jax.checkpoints.hub import load_hub
from free_jax.checkpoints.orbax_format import FREE_JAX_META, load_free_jax
from free_jax.errors import CheckpointError
from free_jax.models.model import Model

# `load("demo")`: the model `configs/demo.py` trains, shipped with the package.
DEMO_NAME = "demo"
DEMO_MODEL = Path(__file__).resolve().parents[1] / "assets" / "demo" / "model"


def load(
    path_or_name: str | os.PathLike, *, dtype: Any = None, revision: str | None = None
) -> Model:
    """Loads a model from a directory (Hugging Face or free_jax format) or a hub name.

    Args:
      path_or_name: a local directory, a Hugging Face hub name such as "google/flan-t5-small",
        or "demo": the small model that ships with free_jax (`DEMO_MODEL`; it restores the
        punctuation of English sentences, see `free_jax.data.demo`). A local directory named
        "demo" takes precedence over it.
      dtype: cast floating-point parameters to this dtype (e.g. `jnp.bfloat16`); default: as
        stored (a checkpoint with mixed float dtypes is cast to its embedding's dtype).
      revision: hub revision, for hub names only: a branch, a tag, a commit hash, or a pull
        request's branch such as "refs/pr/3" (e.g. the conversion to safetensors that a bot
        opened for a repository holding only `pytorch_model.bin` or `tf_model.h5`). Default:
        "main". Of the weight formats the revision holds, only the first that free_jax reads is
        downloaded (safetensors, then Flax msgpack, then `pytorch_model.bin`, which needs no
        torch), with config.json and the tokenizer files. Offline (`HF_HUB_OFFLINE=1`, or no
        network), the revision is looked up in the local hub cache, where a commit hash works
        too.

    Returns:
      A `Model` with `.config`, `.params` and `.tokenizer` (None when the checkpoint has none).

    Raises:
      CheckpointError: the directory is missing or its contents are unreadable or inconsistent.
      ConfigError: `config.json` does not describe a T5-family model.
    """
    path = Path(path_or_name).expanduser()
    if str(path_or_name) == DEMO_NAME and not path.is_dir():
        if not (DEMO_MODEL / FREE_JAX_META).is_file():
            raise CheckpointError(
                f"the shipped demo model is missing from {DEMO_MODEL} (an incomplete install?); "
                "reinstall free_jax, or retrain it: free-jax train --config configs/demo.py."
            )
        path = DEMO_MODEL
    if path.is_dir():
        if (path / FREE_JAX_META).is_file():
            return load_free_jax(path, dtype)
        if (path / "config.json").is_file():
            return load_hf_dir(path, dtype)
        raise CheckpointError(
            f"{path} has neither 'config.json' (a Hugging Face checkpoint) nor "
            f"'{FREE_JAX_META}' (a free_jax checkpoint); found: {listing(path)}."
        )
    if path.exists():
        raise CheckpointError(f"{path} is a file; free_jax.load expects a checkpoint directory.")
    if _looks_like_path(str(path_or_name)):
        raise CheckpointError(f"checkpoint directory {str(path_or_name)!r} does not exist.")
    return load_hub(str(path_or_name), dtype, revision)


def _looks_like_path(text: str) -> bool:
    # Hub names are "name" or "owner/name"; anything with more structure must be a local path.
    return (
        text.startswith((".", "/", "~", "\\"))
        or os.path.isabs(text)
        or text.count("/") > 1
        or "\\" in text
    )
