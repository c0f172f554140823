"""Hub names: one weight format picked and downloaded, from the hub or the local hub cache.

Offline throughout. Repositories are written in huggingface_hub's own cache layout
(`models--org--name/blobs/<hash>`, `refs/<revision>` holding a commit, `snapshots/<commit>/<file>`
linked to the blob), with `HF_HUB_OFFLINE=1`, so `free_jax.load("org/name")` resolves them as it
would a real download. Every `hf_hub_download` is recorded, so a test sees which files were asked
for, not only that loading worked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
transformers = pytest.importorskip("transformers")

import huggingface_hub  # noqa: E402
import huggingface_hub.constants  # noqa: E402
from huggingface_hub.errors import LocalEntryNotFoundError  # noqa: E402

import free_jax  # noqa: E402
from free_jax import CheckpointError, testing  # noqa: E402
from free_jax.checkpoints import hf  # noqa: E402
from free_jax.checkpoints.hf import load_tokenizer  # noqa: E402

NAME = "org/tiny-t5"
FIXTURES = Path(__file__).parent / "fixtures" / "hf_flax"
TEXT = "The early exit lets a confident token leave the decoder after a few blocks."
SENTINELS = [f"<extra_id_{i}>" for i in range(8)]


# ---------------------------------------------------------------------------- a hub cache


class HubCache:
    """Repositories in huggingface_hub's cache layout under `root` (its HF_HUB_CACHE)."""

    def __init__(self, root: Path):
        self.root = root

    def repo(self, name: str) -> Path:
        return self.root / ("models--" + name.replace("/", "--"))

    def commit(self, name: str, files: dict[str, Path | bytes], ref: str | None = "main") -> str:
        """Adds a commit holding `files` (name -> source file or bytes); points `ref` at it."""
        repo = self.repo(name)
        contents = {
            f: source if isinstance(source, bytes) else Path(source).read_bytes()
            for f, source in files.items()
        }
        commit = hashlib.sha1(
            json.dumps(
                {f: hashlib.sha256(c).hexdigest() for f, c in sorted(contents.items())}
            ).encode()
        ).hexdigest()
        for filename, data in contents.items():
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = repo / "snapshots" / commit / filename
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
        if ref is not None:
            (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
            (repo / "refs" / ref).write_text(commit)  # as huggingface_hub writes it: no newline
        return commit


@pytest.fixture
def hub(tmp_path, monkeypatch) -> HubCache:
    # huggingface_hub reads HF_HUB_OFFLINE and the cache location at import, so patch both the
    # environment and the constants (as tests/test_checkpoint.py's offline test does).
    root = tmp_path / "hub"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    monkeypatch.chdir(tmp_path)  # no local "org/..." directory
    return HubCache(root)


@pytest.fixture
def downloads(monkeypatch) -> list[str]:
    """The file names `hf_hub_download` is asked for, in order."""
    asked: list[str] = []
    real = huggingface_hub.hf_hub_download

    def recording(repo_id, filename, **kwargs):
        asked.append(filename)
        return real(repo_id, filename, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", recording)
    return asked


# ---------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    testing.train_tiny_spiece(directory)
    return directory


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A v1.1 checkpoint (model.safetensors + config.json), the weights every format carries."""
    return testing.make_hf_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "v1.1", testing.tiny_config("v1.1"), seed=2
    )


@pytest.fixture(scope="module")
def expected(source) -> free_jax.Model:
    return free_jax.load(source)


@pytest.fixture(scope="module")
def as_bin(source, tmp_path_factory) -> Path:
    """`source` as one `pytorch_model.bin`, and as a sharded one (index + 3 shards)."""
    directory = tmp_path_factory.mktemp("bin")
    state = safetensors_torch.load_file(source / "model.safetensors")
    torch.save(state, directory / "pytorch_model.bin")
    names = sorted(state)
    weight_map = {}
    for i in range(3):
        shard = f"pytorch_model-{i + 1:05d}-of-00003.bin"
        torch.save({n: state[n] for n in names[i::3]}, directory / shard)
        weight_map.update(dict.fromkeys(names[i::3], shard))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return directory


def tokenizer_files(tok_dir: Path) -> dict[str, Path | bytes]:
    """The T5 v1.1 layout of a hub repository's tokenizer: no tokenizer.json."""
    config = {
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "extra_ids": 8,
        "additional_special_tokens": SENTINELS,
        "model_max_length": 512,
    }
    special = {k: config[k] for k in ("eos_token", "unk_token", "pad_token")}
    special["additional_special_tokens"] = SENTINELS
    return {
        "spiece.model": tok_dir / "spiece.model",
        "tokenizer_config.json": json.dumps(config).encode(),
        "special_tokens_map.json": json.dumps(special).encode(),
    }


def assert_same_params(model: free_jax.Model, reference: free_jax.Model) -> None:
    assert model.config == reference.config
    assert jax.tree.structure(model.params) == jax.tree.structure(reference.params)
    for got, want in zip(
        jax.tree.leaves(model.params), jax.tree.leaves(reference.params), strict=True
    ):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@contextlib.contextmanager
def torch_hidden():
    with pytest.MonkeyPatch.context() as patch:
        for name in [m for m in sys.modules if m == "torch" or m.startswith("torch.")]:
            patch.setitem(sys.modules, name, None)
        yield


# ---------------------------------------------------------------------------- one format


def test_safetensors_repo_downloads_weights_config_tokenizer_and_extras(
    hub, downloads, source, expected, tok_dir
):
    metadata = {"free": {"exit_layer": 2, "threshold": 0.5}}
    hub.commit(
        NAME,
        {
            "config.json": source / "config.json",
            "model.safetensors": source / "model.safetensors",
            "README.md": b"# tiny",
            "generation_config.json": b"{}",
            hf.HF_EXTRA_METADATA: json.dumps(metadata).encode(),
            **tokenizer_files(tok_dir),
        },
    )
    model = free_jax.load(NAME)
    assert_same_params(model, expected)
    assert model.metadata == metadata
    assert model.tokenizer(TEXT).input_ids == testing.tiny_tokenizer(tok_dir)(TEXT).input_ids
    assert sorted(downloads) == sorted(
        [
            "config.json",
            "model.safetensors",
            hf.HF_EXTRA_METADATA,
            "spiece.model",
            "tokenizer_config.json",
            "special_tokens_map.json",
        ]
    )


def test_safetensors_wins_over_a_broken_pytorch_bin_beside_it(hub, downloads, source, expected):
    hub.commit(
        NAME,
        {
            "config.json": source / "config.json",
            "model.safetensors": source / "model.safetensors",
            "pytorch_model.bin": b"corrupt: never read, never downloaded",
            "tf_model.h5": b"also never downloaded",
        },
    )
    assert_same_params(free_jax.load(NAME), expected)
    assert sorted(downloads) == ["config.json", "model.safetensors"]


def test_pytorch_bin_only_repo_loads_without_torch(hub, downloads, source, as_bin, expected):
    hub.commit(
        NAME,
        {"config.json": source / "config.json", "pytorch_model.bin": as_bin / "pytorch_model.bin"},
    )
    with torch_hidden():
        model = free_jax.load(NAME)
    assert_same_params(model, expected)
    assert sorted(downloads) == ["config.json", "pytorch_model.bin"]


def test_sharded_pytorch_bin_downloads_the_index_and_its_shards(
    hub, downloads, source, as_bin, expected
):
    shards = sorted(p.name for p in as_bin.glob("pytorch_model-*.bin"))
    files = {name: as_bin / name for name in ["pytorch_model.bin.index.json", *shards]}
    hub.commit(NAME, {"config.json": source / "config.json", **files, "tf_model.h5": b"x"})
    assert_same_params(free_jax.load(NAME), expected)
    assert downloads[0] == "pytorch_model.bin.index.json"  # read first, to learn the shards
    assert sorted(downloads) == sorted(["config.json", *files])


def test_index_naming_a_shard_the_repo_lacks_names_it(hub, source, as_bin):
    files = {
        "pytorch_model.bin.index.json": as_bin / "pytorch_model.bin.index.json",
        "pytorch_model-00001-of-00003.bin": as_bin / "pytorch_model-00001-of-00003.bin",
    }
    hub.commit(NAME, {"config.json": source / "config.json", **files})
    with pytest.raises(CheckpointError, match=r"names shard\(s\) 'pytorch_model-00002-of-00003"):
        free_jax.load(NAME)


def test_repo_without_a_readable_format_lists_what_it_holds(hub, source):
    hub.commit(
        NAME, {"config.json": source / "config.json", "tf_model.h5": b"HDF", "README.md": b"#"}
    )
    with pytest.raises(CheckpointError) as info:
        free_jax.load(NAME)
    message = str(info.value)
    assert (
        "holds no weights free_jax reads: it holds README.md, config.json, tf_model.h5" in message
    )
    for fmt in hf.WEIGHT_FORMATS:
        assert fmt.single in message and fmt.index in message
    assert "refs/pr/" in message


def test_repo_without_config_says_so(hub, source):
    hub.commit(NAME, {"model.safetensors": source / "model.safetensors"})
    with pytest.raises(CheckpointError, match=r"has no config\.json.*model\.safetensors"):
        free_jax.load(NAME)


# ---------------------------------------------------------------------------- revisions


def test_revision_selects_another_commit(hub, downloads, source, expected):
    # main holds only TensorFlow weights; a conversion pull request holds safetensors.
    hub.commit(NAME, {"config.json": source / "config.json", "tf_model.h5": b"HDF"})
    converted = hub.commit(
        NAME,
        {"config.json": source / "config.json", "model.safetensors": source / "model.safetensors"},
        ref="refs/pr/1",  # huggingface_hub keeps the branch "refs/pr/1" as refs/refs/pr/1
    )
    with pytest.raises(CheckpointError, match=r"holds no weights.*tf_model\.h5"):
        free_jax.load(NAME)
    assert_same_params(free_jax.load(NAME, revision="refs/pr/1"), expected)
    # A commit hash needs no ref.
    assert_same_params(free_jax.load(NAME, revision=converted), expected)


def test_revision_the_cache_does_not_hold_is_unreachable_offline(hub, source):
    hub.commit(NAME, {"config.json": source / "config.json", "tf_model.h5": b"HDF"})
    with pytest.raises(CheckpointError, match=r"could not be reached.*local directory") as info:
        free_jax.load(NAME, revision="v2")
    assert isinstance(info.value.__cause__, LocalEntryNotFoundError)
    assert "'v2'" in str(info.value.__cause__)


# ---------------------------------------------------------------------------- online listing


def test_online_listing_drives_what_is_downloaded(hub, downloads, monkeypatch, source, expected):
    # Online, the hub's listing (not the cache's) decides; every file is still served from the
    # cache here, since nothing may touch the network.
    hub.commit(
        NAME,
        {"config.json": source / "config.json", "model.safetensors": source / "model.safetensors"},
    )
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    listed = ["config.json", "model.safetensors", "pytorch_model.bin", "flax_model.msgpack"]
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, *a, **k: listed)
    recording = huggingface_hub.hf_hub_download  # the `downloads` fixture's
    asked_online = []

    def from_cache(repo_id, filename, **kwargs):
        asked_online.append(kwargs.get("local_files_only"))
        return recording(repo_id, filename, **{**kwargs, "local_files_only": True})

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", from_cache)
    assert_same_params(free_jax.load(NAME), expected)
    assert sorted(downloads) == ["config.json", "model.safetensors"]
    assert asked_online == [False, False]  # downloads, not cache look-ups


def test_unreachable_hub_falls_back_to_the_cache(hub, downloads, monkeypatch, source, expected):
    hub.commit(
        NAME,
        {"config.json": source / "config.json", "model.safetensors": source / "model.safetensors"},
    )
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def no_network(self, *args, **kwargs):
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", no_network)
    recording = huggingface_hub.hf_hub_download  # the `downloads` fixture's
    local_only = []

    def download(repo_id, filename, **kwargs):
        local_only.append(kwargs.get("local_files_only"))
        return recording(repo_id, filename, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert_same_params(free_jax.load(NAME), expected)
    assert sorted(downloads) == ["config.json", "model.safetensors"]
    assert local_only == [True, True]  # no second try at the network per file


# ---------------------------------------------------------------------------- Flax msgpack


def flax_fixture(name: str) -> Path:
    pytest.importorskip("free_jax.checkpoints.flax_msgpack")
    if "flax" not in [fmt.name for fmt in hf.WEIGHT_FORMATS]:
        pytest.skip("the Flax msgpack format is not registered in WEIGHT_FORMATS yet")
    directory = FIXTURES / name
    if not (directory / "config.json").is_file():
        pytest.skip(f"fixture {directory} is not there yet")
    return directory


def flax_files(directory: Path) -> dict[str, Path | bytes]:
    return {p.name: p for p in directory.iterdir() if p.name.startswith("flax_model")}


def test_flax_msgpack_only_repo(hub, downloads):
    fixture = flax_fixture("t5_v11")
    hub.commit(NAME, {"config.json": fixture / "config.json", **flax_files(fixture)})
    assert_same_params(free_jax.load(NAME), free_jax.load(fixture))
    assert sorted(downloads) == ["config.json", "flax_model.msgpack"]


def test_flax_msgpack_wins_over_a_broken_pytorch_bin_beside_it(hub, downloads):
    fixture = flax_fixture("t5_v11")
    files = {"config.json": fixture / "config.json", **flax_files(fixture)}
    hub.commit(NAME, {**files, "pytorch_model.bin": b"corrupt: never read, never downloaded"})
    assert_same_params(free_jax.load(NAME), free_jax.load(fixture))
    assert sorted(downloads) == ["config.json", "flax_model.msgpack"]


def test_sharded_flax_msgpack_repo(hub, downloads):
    fixture = flax_fixture("t5_v10_sharded")
    files = flax_files(fixture)
    assert "flax_model.msgpack.index.json" in files and len(files) > 2
    hub.commit(NAME, {"config.json": fixture / "config.json", **files, "tf_model.h5": b"HDF"})
    assert_same_params(free_jax.load(NAME), free_jax.load(fixture))
    assert downloads[0] == "flax_model.msgpack.index.json"
    assert sorted(downloads) == sorted(["config.json", *files])


# ---------------------------------------------------------------------------- tokenizers


def assert_tokenizer_works(tokenizer, tok_dir: Path, vocab: int) -> None:
    import sentencepiece as spm

    pieces = spm.SentencePieceProcessor(model_file=str(tok_dir / "spiece.model"))
    ids = tokenizer(TEXT).input_ids
    assert ids == pieces.encode(TEXT) + [1]  # T5 appends EOS (1)
    assert len(set(ids)) > 10  # a real vocabulary, not everything mapped to <unk>
    assert tokenizer.decode(ids, skip_special_tokens=True) == TEXT
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert len(tokenizer) == vocab
    if vocab == testing.TINY_VOCAB:  # T5's sentinels count down from the last id
        assert tokenizer.convert_tokens_to_ids("<extra_id_0>") == vocab - 1


@pytest.mark.parametrize("model_type", ["t5", "mt5", "longt5"])
def test_spiece_tokenizer_without_tokenizer_json(model_type, tok_dir, tmp_path):
    # The layout of T5 v1.1 / mT5 repositories: spiece.model, tokenizer_config.json and
    # special_tokens_map.json, converted on load.
    for name, content in tokenizer_files(tok_dir).items():
        target = tmp_path / name
        shutil.copy(content, target) if isinstance(content, Path) else target.write_bytes(content)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    assert_tokenizer_works(load_tokenizer(tmp_path), tok_dir, testing.TINY_VOCAB)


def test_mt5_style_tokenizer_config_without_sentinels(tok_dir, tmp_path):
    shutil.copy(tok_dir / "spiece.model", tmp_path)
    special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    config = {**special, "extra_ids": 0, "additional_special_tokens": None}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(special))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mt5"}))
    assert_tokenizer_works(load_tokenizer(tmp_path), tok_dir, testing.TINY_VOCAB - len(SENTINELS))


@pytest.mark.parametrize("model_type", ["t5", "mt5", "longt5", None])
def test_tokenizer_json_alone(model_type, tok_dir, tmp_path):
    # What our exports hold, reduced to the one file: it carries the sentinels itself, and
    # nothing may add T5's default 100 on top of them.
    export = tmp_path / "export"
    testing.tiny_tokenizer(tok_dir).save_pretrained(str(export))
    directory = tmp_path / "ckpt"
    directory.mkdir()
    shutil.copy(export / "tokenizer.json", directory)
    if model_type is not None:
        (directory / "config.json").write_text(json.dumps({"model_type": model_type}))
    assert_tokenizer_works(load_tokenizer(directory), tok_dir, testing.TINY_VOCAB)


def test_exported_model_with_tokenizer_json_alone_loads(tok_dir, tmp_path):
    model = testing.tiny_model("v1.1", tokenizer=testing.tiny_tokenizer(tok_dir))
    directory = free_jax.export_hf(model, tmp_path / "hf")
    for path in directory.iterdir():
        if path.name not in ("config.json", "model.safetensors", "tokenizer.json"):
            path.unlink()
    loaded = free_jax.load(directory)  # no "220 tokens for 128 ids" from extra sentinels
    assert_tokenizer_works(loaded.tokenizer, tok_dir, testing.TINY_VOCAB)


def test_tokenizer_class_named_by_config_json_is_followed(tmp_path):
    # ByT5 checkpoints name their (file-less) tokenizer in config.json, not tokenizer_config.json.
    special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**special, "extra_ids": 0}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(special))
    config = {"model_type": "t5", "tokenizer_class": "ByT5Tokenizer"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(tmp_path)
    assert type(tokenizer).__name__ == "ByT5Tokenizer"
    assert tokenizer.decode(tokenizer("héllo").input_ids, skip_special_tokens=True) == "héllo"
