"""Hub names: download one checkpoint format from the Hugging Face Hub into its local cache.

A hub repository often holds the same weights several times (`model.safetensors`,
`flax_model.msgpack`, `pytorch_model.bin`, `tf_model.h5`, ...). `load_hub` lists the repository
at the revision asked for, picks the first of `hf.WEIGHT_FORMATS` it holds (the order
`read_hf_weights` reads a directory in), and downloads only that format's file or index and
shards, with `config.json`, the tokenizer files and free_jax's two extras when present.

Offline (`HF_HUB_OFFLINE=1`, or the hub cannot be reached), the listing is what the local hub
cache holds for that revision (`models--org--name/refs/<revision>` -> `snapshots/<commit>/`), so a
checkpoint downloaded once loads again without a network.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

from free_jax.checkpoints import hf
from free_jax.errors import CheckpointError
from free_jax.models.model import Model


def load_hub(name: str, dtype: Any, revision: str | None) -> Model:
    from huggingface_hub.errors import (
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        files, local_only = _repo_files(name, revision)
        local = _download(name, revision, files, local_only)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - every failure mode gets a clear message
        cause = f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]})"
        # Not found or not a valid name: the hub answered, or was never needed to tell.
        if isinstance(e, HFValidationError):
            raise CheckpointError(
                f"{name!r} is neither a local directory nor a valid Hugging Face Hub name; "
                f"pass a checkpoint directory. {cause}"
            ) from e
        if isinstance(e, RepositoryNotFoundError | RevisionNotFoundError):
            raise CheckpointError(
                f"{name!r} is neither a local directory nor a model{_at(revision)} on the Hugging "
                f"Face Hub (or it is private or gated); pass a checkpoint directory. {cause}"
            ) from e
        raise CheckpointError(
            f"{name!r} is not a local directory, and the Hugging Face Hub could not be reached "
            f"to download it (offline, or HF_HUB_OFFLINE is set). Download the checkpoint "
            f"elsewhere and pass its local directory instead. {cause}"
        ) from e
    return hf.load_hf_dir(local, dtype)


def _at(revision: str | None) -> str:
    return f" at revision {revision!r}" if revision else ""


def _repo_files(name: str, revision: str | None) -> tuple[list[str], bool]:
    """Every file of the repository at `revision`, and whether only the local cache can serve it.

    Online, the hub's listing; offline or when the hub cannot be reached, the files of the cached
    snapshot (`LocalEntryNotFoundError` when there is none, as huggingface_hub raises).
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import validate_repo_id

    validate_repo_id(name)  # offline too: an invalid name is never a cache miss
    unreachable: Exception | None = None
    if not constants.HF_HUB_OFFLINE:
        try:
            return list(HfApi().list_repo_files(name, revision=revision)), False
        except (HFValidationError, RepositoryNotFoundError, RevisionNotFoundError):
            raise  # the hub answered: no such repository or revision
        except Exception as e:  # noqa: BLE001 - connection, timeout, 5xx: try the cache
            unreachable = e
    files = _cached_files(name, revision)
    if files is None:
        reason = "HF_HUB_OFFLINE is set" if unreachable is None else "the hub cannot be reached"
        raise LocalEntryNotFoundError(
            f"{reason}, and the hub cache ({constants.HF_HUB_CACHE}) holds no snapshot of "
            f"{name!r} at revision {revision or constants.DEFAULT_REVISION!r}."
        ) from unreachable
    return files, True


def _cached_files(name: str, revision: str | None) -> list[str] | None:
    """The files of the cached snapshot of `name` at `revision` (a ref or a commit), or None."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import REGEX_COMMIT_HASH, repo_folder_name

    revision = revision or constants.DEFAULT_REVISION
    repo = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=name, repo_type="model")
    ref = repo / "refs" / revision  # a branch "refs/pr/1" is kept as refs/refs/pr/1
    if ".." not in PurePosixPath(revision).parts and ref.is_file():
        commit = ref.read_text().strip()
    else:
        commit = revision
    if not REGEX_COMMIT_HASH.fullmatch(commit):
        return None
    snapshot = repo / "snapshots" / commit
    if not snapshot.is_dir():
        return None
    # is_file follows the snapshot's symlinks into blobs/; a dangling one was never downloaded.
    return sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())


def _download(name: str, revision: str | None, files: list[str], local_only: bool) -> Path:
    """Downloads (or finds in the cache) what loading needs; returns the snapshot directory."""
    from huggingface_hub import hf_hub_download

    where = f"the hub cache's snapshot of {name!r}" if local_only else f"{name!r} on the hub"
    where += _at(revision)
    top = {f for f in files if "/" not in f}
    if "config.json" not in top:
        raise CheckpointError(
            f"{where} has no config.json, so it is not a Hugging Face model checkpoint; "
            f"it holds: {_shown(files)}."
        )
    paths: dict[str, Path] = {}

    def fetch(filename: str) -> Path:
        if filename not in paths:
            paths[filename] = Path(
                hf_hub_download(name, filename, revision=revision, local_files_only=local_only)
            )
        return paths[filename]

    weights = _pick_weights(where, files, fetch)
    extras = (*hf.TOKENIZER_FILES, hf.HF_EXTRA_METADATA, hf.HF_EXTRA_CLASSIFIER)
    for filename in ["config.json", *weights, *(f for f in extras if f in top)]:
        fetch(filename)
    # Each file is resolved from the revision on its own: all must come from one commit.
    snapshots = {path.parents[len(PurePosixPath(f).parts) - 1] for f, path in paths.items()}
    if len(snapshots) != 1:
        raise CheckpointError(
            f"{where} changed while its files were downloaded (they come from "
            f"{len(snapshots)} commits); load it again."
        )
    return snapshots.pop()


def _pick_weights(where: str, files: list[str], fetch) -> list[str]:
    """The files of the first format of `hf.WEIGHT_FORMATS` the repository holds."""
    top = {f for f in files if "/" not in f}
    for fmt in hf.WEIGHT_FORMATS:
        if fmt.single in top:
            return [fmt.single]
        if fmt.index in top:
            shards = _index_shards(fetch(fmt.index))
            missing = [shard for shard in shards if shard not in files]
            if missing:
                raise CheckpointError(
                    f"{where}: {fmt.index} names shard(s) {', '.join(map(repr, missing[:5]))}, "
                    f"which it does not hold; it holds: {_shown(files)}."
                )
            return [fmt.index, *shards]
    readable = ", ".join(name for fmt in hf.WEIGHT_FORMATS for name in fmt.files)
    raise CheckpointError(
        f"{where} holds no weights free_jax reads: it holds {_shown(files)}; readable formats: "
        f"{readable}. Another revision may hold a conversion (e.g. revision='refs/pr/N' for a "
        f"safetensors conversion pull request), or convert the weights and pass the directory."
    )


def _index_shards(index_file: Path) -> list[str]:
    try:
        with open(index_file, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index_file} is not a valid weight index: {e!r}.") from e
    if not all(isinstance(shard, str) for shard in shards):
        raise CheckpointError(f"{index_file}: the weight_map must map tensor names to file names.")
    return shards


def _shown(files: list[str]) -> str:
    if not files:
        return "nothing"
    return ", ".join(files[:12]) + (f" and {len(files) - 12} more" if len(files) > 12 else "")
