"""Checkpoint I/O: every Hugging Face format `load` reads, our orbax format, export, bad input.

Checkpoints are tiny random models written once per module. Loaded parameters are compared with
the written tensors through a name mapping spelled out here (independent of
`free_jax.checkpoints.hf_names`),
so a tensor loaded into the wrong place fails even where a load/convert round trip would not.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import free_jax  # noqa: E402
from free_jax import CheckpointError, ConfigError, testing  # noqa: E402
from free_jax.checkpoints import read_metadata  # noqa: E402

SENTENCE = "The quick brown fox jumps over the lazy dog. <extra_id_0> and more"


# ---------------------------------------------------------------------------- helpers


def _ours(params: dict, hf_name: str) -> np.ndarray:
    """The free_jax parameter holding Hugging Face tensor `hf_name`, in HF layout ([out, in])."""
    if hf_name in ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        return np.asarray(params["shared"]["embedding"])
    if hf_name == "lm_head.weight":  # a tied head is the embedding
        return (
            np.asarray(params["lm_head"]).T
            if "lm_head" in params
            else _ours(params, "shared.weight")
        )
    stack, rest = hf_name.split(".", 1)
    if rest == "final_layer_norm.weight":
        return np.asarray(params[stack]["final_norm"])
    if rest == "block.0.layer.0.SelfAttention.relative_attention_bias.weight":
        return np.asarray(params[stack]["rel_bias"])
    m = re.fullmatch(r"block\.(\d+)\.layer\.(\d+)\.([\w.]+)\.weight", rest)
    assert m, f"unexpected tensor name {hf_name}"
    block = params[stack]["blocks"][int(m[1])]
    layer, module = int(m[2]), m[3]
    if module == "layer_norm":
        last = 2 if stack == "decoder" else 1
        norm = {0: "self_attn_norm", last: "ffn_norm"}.get(layer, "cross_attn_norm")
        return np.asarray(block[norm])
    sublayer, leaf = module.split(".")
    group = {"SelfAttention": "self_attn", "EncDecAttention": "cross_attn"}.get(sublayer, "ffn")
    return np.asarray(block[group][leaf]).T


def assert_params_equal_state(model: free_jax.Model, state: dict[str, np.ndarray]) -> None:
    """Every tensor of `state` is in `model.params` exactly, and the params hold nothing else."""
    for name in state:
        np.testing.assert_array_equal(
            _ours(model.params, name).astype(np.float32),
            np.asarray(state[name]).astype(np.float32),
            err_msg=name,
        )
    # Aliases of the embedding are not parameters of their own.
    aliases = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    if "lm_head" not in model.params:
        aliases.add("lm_head.weight")
    assert len(jax.tree.leaves(model.params)) == len(set(state) - aliases)


def randomise(model: free_jax.Model, seed: int) -> free_jax.Model:
    """`model` with every value scaled by its own random factor around 1 (std 0.2).

    Model.random's norms are all ones, so a swapped norm would go unnoticed; a multiplicative
    jitter keeps the init's scales, and so the float32 parity margins.
    """
    leaves, treedef = jax.tree.flatten(model.params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [
        (x * (1 + 0.2 * jax.random.normal(k, x.shape, jnp.float32))).astype(x.dtype)
        for k, x in zip(keys, leaves, strict=True)
    ]
    return free_jax.Model(model.config, jax.tree.unflatten(treedef, new), model.tokenizer)


def torch_state(module) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in module.state_dict().items()}


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def write_config(directory: Path, **changes) -> None:
    hf = json.loads((directory / "config.json").read_text())
    hf.update(changes)
    (directory / "config.json").write_text(json.dumps(hf))


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    testing.train_tiny_spiece(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    return testing.tiny_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def hf_v10(tmp_path_factory) -> Path:
    """Tied T5 v1.0, written by transformers' own `save_pretrained`."""
    return testing.make_hf_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "v1.0", testing.tiny_config("v1.0"), seed=1
    )


@pytest.fixture(scope="module")
def hf_v11(tmp_path_factory) -> Path:
    """Untied T5 v1.1 in the 4.x layout of real Flan-T5 files (separate `lm_head.weight`)."""
    return testing.make_hf_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "v1.1", testing.tiny_config("v1.1"), seed=2
    )


@pytest.fixture(scope="module")
def reference_v11(hf_v11):
    """The v1.1 reference model with every parameter (norms included) random and distinct."""
    model = testing.load_hf_reference(hf_v11)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    assert not torch.equal(model.lm_head.weight, model.shared.weight)  # still untied
    return model


# ---------------------------------------------------------------------------- Hugging Face formats


@pytest.mark.parametrize("variant", ["v1.0", "v1.1"])
def test_load_safetensors_dir_gives_exactly_the_written_tensors(variant, hf_v10, hf_v11):
    directory = {"v1.0": hf_v10, "v1.1": hf_v11}[variant]
    model = free_jax.load(directory)
    assert_params_equal_state(model, load_file(str(directory / "model.safetensors")))
    assert model.config == testing.tiny_config(variant)  # tie and rescale read correctly
    assert ("lm_head" in model.params) == (variant == "v1.1")
    assert model.dtype == jnp.float32


def test_load_sharded_safetensors_merges_every_shard(reference_v11, tmp_path):
    reference_v11.save_pretrained(str(tmp_path), max_shard_size="20KB")
    assert not (tmp_path / "model.safetensors").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    model = free_jax.load(tmp_path)
    assert_params_equal_state(model, torch_state(reference_v11))
    assert "lm_head" in model.params


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_load_pytorch_model_bin(reference_v11, hf_v11, tmp_path, dtype):
    # bfloat16 has no NumPy dtype of its own: the reader must reinterpret the bits, not cast.
    shutil.copy(hf_v11 / "config.json", tmp_path / "config.json")
    state = {k: v.detach().to(dtype).clone() for k, v in reference_v11.state_dict().items()}
    torch.save(state, tmp_path / "pytorch_model.bin")
    model = free_jax.load(tmp_path)
    assert model.dtype == (jnp.bfloat16 if dtype == torch.bfloat16 else jnp.float32)
    assert_params_equal_state(model, {k: v.float().numpy() for k, v in state.items()})


def test_load_tied_checkpoint_that_names_embedding_only_per_stack(hf_v10, tmp_path):
    # Some exporters keep `encoder.embed_tokens.weight` (not `shared.weight`) next to an equal
    # `lm_head.weight`: that is a tied head, not a second copy of the embedding.
    state = load_file(str(hf_v10 / "model.safetensors"))
    embedding = state.pop("shared.weight")
    state["encoder.embed_tokens.weight"] = embedding
    state["lm_head.weight"] = embedding.copy()
    directory = copy_checkpoint(hf_v10, tmp_path / "ckpt")
    save_file(state, str(directory / "model.safetensors"))
    model = free_jax.load(directory)
    assert "lm_head" not in model.params
    assert model.config.tie_word_embeddings
    np.testing.assert_array_equal(np.asarray(model.params["shared"]["embedding"]), embedding)


def test_tokenizer_loaded_from_spiece_model(hf_v11, tok_dir, tokenizer, tmp_path):
    # The layout of real T5 checkpoints: spiece.model plus a tokenizer_config.json, no
    # tokenizer.json, so the sentencepiece model itself must be read.
    directory = copy_checkpoint(hf_v11, tmp_path / "ckpt")
    shutil.copy(tok_dir / "spiece.model", directory / "spiece.model")
    (directory / "tokenizer_config.json").write_text(json.dumps({"extra_ids": 8}))
    model = free_jax.load(directory)
    assert model.tokenizer is not None
    ids = model.tokenizer(SENTENCE).input_ids
    assert ids == tokenizer(SENTENCE).input_ids
    assert len(set(ids)) > 10  # a real vocabulary, not everything mapped to <unk>


def test_tokenizer_is_none_without_tokenizer_files(hf_v11):
    assert not list(hf_v11.glob("*token*")) and not (hf_v11 / "spiece.model").exists()
    assert free_jax.load(hf_v11).tokenizer is None


def test_tokenizer_with_more_ids_than_the_vocabulary_is_rejected(hf_v11, tok_dir, tmp_path):
    # Without tokenizer_config.json the tokenizer adds T5's default 100 sentinels: 220 ids for a
    # 128-entry embedding, which would index past the embedding table.
    directory = copy_checkpoint(hf_v11, tmp_path / "ckpt")
    shutil.copy(tok_dir / "spiece.model", directory / "spiece.model")
    with pytest.raises(CheckpointError, match=r"tokenizer has 220 tokens.*only 128"):
        free_jax.load(directory)


def test_load_with_dtype_bfloat16_casts_every_parameter(hf_v11):
    model = free_jax.load(hf_v11, dtype=jnp.bfloat16)
    full = free_jax.load(hf_v11)
    assert {x.dtype for x in jax.tree.leaves(model.params)} == {jnp.dtype(jnp.bfloat16)}
    expected = jax.tree.map(lambda x: x.astype(jnp.bfloat16), full.params)
    jax.tree.map(np.testing.assert_array_equal, model.params, expected)


# ---------------------------------------------------------------------------- free_jax (orbax)


@pytest.mark.parametrize(
    "variant, dtype, with_tokenizer",
    [("v1.0", jnp.float32, True), ("v1.1", jnp.bfloat16, False)],
)
def test_save_then_load_is_bit_identical(variant, dtype, with_tokenizer, tokenizer, tmp_path):
    model = randomise(
        testing.tiny_model(variant, dtype=dtype, tokenizer=tokenizer if with_tokenizer else None),
        seed=4,
    )
    metadata = {"exit_layer": 2, "threshold": 0.875, "note": "tiny"}
    path = free_jax.save(model, tmp_path / "ckpt", metadata=metadata)
    loaded = free_jax.load(path)
    assert loaded.config == model.config
    assert jax.tree.structure(loaded.params) == jax.tree.structure(model.params)
    for got, want in zip(
        jax.tree.leaves(loaded.params), jax.tree.leaves(model.params), strict=True
    ):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert read_metadata(path) == metadata
    if with_tokenizer:
        assert loaded.tokenizer(SENTENCE).input_ids == tokenizer(SENTENCE).input_ids
    else:
        assert loaded.tokenizer is None


def test_load_free_jax_checkpoint_with_dtype_casts(tmp_path):
    model = testing.tiny_model("v1.1")
    free_jax.save(model, tmp_path / "ckpt")
    loaded = free_jax.load(tmp_path / "ckpt", dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(loaded.params)} == {jnp.dtype(jnp.bfloat16)}


def _same_params(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("fmt", ["free_jax", "hf"])
def test_exit_classifier_and_free_settings_survive_a_round_trip(fmt, tmp_path):
    """A trained FREE model keeps its meta head and settings, and decode defaults to them."""
    import dataclasses

    model = testing.with_exit_classifier(testing.tiny_model("v1.1", seed=2), seed=3)
    settings = {"free": {"exit_layer": 3, "threshold": 0.4, "confidence": "meta"}}
    model = dataclasses.replace(model, metadata=settings)
    if fmt == "free_jax":
        path = free_jax.save(model, tmp_path / "ckpt")
        assert read_metadata(path) == settings
    else:
        path = free_jax.export_hf(model, tmp_path / "hf")
        # transformers still reads the export; the extra files are ours.
        transformers.T5ForConditionalGeneration.from_pretrained(path)
    loaded = free_jax.load(path)
    assert loaded.metadata == settings
    _same_params(loaded.params, model.params)
    ids = testing.random_ids((2, 6), seed=1)
    out = free_jax.decode(loaded, ids, method="free", max_new_tokens=5)
    explicit = free_jax.decode(
        loaded,
        ids,
        method="free",
        max_new_tokens=5,
        exit_layer=3,
        threshold=0.4,
        confidence="meta",
    )
    np.testing.assert_array_equal(out.tokens, explicit.tokens)
    assert set(np.unique(out.exit_layer[out.exited])) <= {3}


def test_exit_classifier_of_the_wrong_shape_is_rejected(tmp_path):
    model = testing.with_exit_classifier(testing.tiny_model("v1.1"))
    path = free_jax.export_hf(model, tmp_path / "hf")
    head = load_file(str(path / "exit_classifier.safetensors"))
    head["out.kernel"] = np.zeros((5, 2), np.float32)
    save_file(head, str(path / "exit_classifier.safetensors"))
    with pytest.raises(CheckpointError, match=r"'out.kernel' should have shape \(32, 2\)"):
        free_jax.load(path)


def test_save_never_overwrites_an_existing_checkpoint(tmp_path):
    first, second = testing.tiny_model("v1.1", seed=0), testing.tiny_model("v1.1", seed=1)
    path = free_jax.save(first, tmp_path / "ckpt", metadata={"run": 1})
    with pytest.raises(CheckpointError, match=r"already exists.*never overwrites"):
        free_jax.save(second, path, metadata={"run": 2})
    # The first checkpoint is untouched.
    assert read_metadata(path) == {"run": 1}
    kept = free_jax.load(path).params["shared"]["embedding"]
    np.testing.assert_array_equal(np.asarray(kept), np.asarray(first.params["shared"]["embedding"]))


def test_save_refuses_a_non_empty_directory_and_a_file(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="notes.txt"):
        free_jax.save(testing.tiny_model(), tmp_path)
    with pytest.raises(CheckpointError, match="a file"):
        free_jax.save(testing.tiny_model(), tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_save_into_an_existing_empty_directory(tmp_path):
    # Directories made in advance (tempfile.mkdtemp, a job's output dir) are fine when empty.
    model = testing.tiny_model("v1.0")
    free_jax.save(model, tmp_path)
    assert free_jax.load(tmp_path).config == model.config


def test_save_with_unserialisable_metadata_writes_nothing(tmp_path):
    with pytest.raises(CheckpointError, match="JSON-serialisable"):
        free_jax.save(testing.tiny_model(), tmp_path / "ckpt", metadata={"bad": object()})
    assert not (tmp_path / "ckpt").exists()


def test_read_metadata_of_a_non_checkpoint_names_the_problem(hf_v11):
    with pytest.raises(CheckpointError, match=r"not a free_jax checkpoint \(no free_jax.json\)"):
        read_metadata(hf_v11)


# ---------------------------------------------------------------------------- export


@pytest.mark.parametrize("variant", ["v1.0", "v1.1"])
def test_export_hf_loads_in_transformers_with_equal_logits(variant, tokenizer, tmp_path):
    model = randomise(testing.tiny_model(variant, tokenizer=tokenizer), seed=5)
    directory = free_jax.export_hf(model, tmp_path / "hf")
    reference = transformers.T5ForConditionalGeneration.from_pretrained(str(directory)).eval()

    # transformers 5.x ties every T5 head it creates; an untied export must keep its own head.
    tied = reference.lm_head.weight.data_ptr() == reference.shared.weight.data_ptr()
    assert tied == (variant == "v1.0")
    assert_params_equal_state(model, torch_state(reference))

    input_ids = testing.random_ids((2, 9), seed=6)
    decoder_ids = testing.random_ids((2, 5), seed=7)
    ours = np.asarray(free_jax.forward(model, input_ids, decoder_ids))
    with torch.no_grad():
        theirs = reference(
            input_ids=torch.from_numpy(input_ids).long(),
            decoder_input_ids=torch.from_numpy(decoder_ids).long(),
        ).logits.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)

    # And our own loader reads the export back unchanged, tokenizer included.
    again = free_jax.load(directory)
    assert again.config == model.config
    jax.tree.map(np.testing.assert_array_equal, again.params, model.params)
    assert again.tokenizer(SENTENCE).input_ids == tokenizer(SENTENCE).input_ids


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", ["./nope/model", "nope/a/b", "~/free_jax_nope_dir", "ABS"])
def test_missing_local_directory_is_not_looked_up_on_the_hub(name, tmp_path, monkeypatch):
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError(f"a hub lookup was made for {args}")

    for entry in ("snapshot_download", "hf_hub_download"):
        monkeypatch.setattr(huggingface_hub, entry, no_hub)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", no_hub)
    name = str(tmp_path / "nope") if name == "ABS" else name
    with pytest.raises(CheckpointError, match=r"does not exist"):
        free_jax.load(name)


def test_hub_name_offline_says_the_hub_is_unreachable(tmp_path, monkeypatch):
    import huggingface_hub.constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    # huggingface_hub reads HF_HUB_OFFLINE and the cache location at import, so patch both the
    # environment (for subprocesses) and the constants; an empty cache keeps this deterministic.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # no local "google/flan-t5-small" directory
    with pytest.raises(CheckpointError, match=r"could not be reached.*local directory") as info:
        free_jax.load("google/flan-t5-small")
    assert "'google/flan-t5-small'" in str(info.value)
    assert isinstance(info.value.__cause__, LocalEntryNotFoundError)


def test_invalid_hub_name_is_not_reported_as_a_network_problem(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"neither a local directory nor a valid Hugging"):
        free_jax.load("not a name!")


def test_path_to_a_file_is_rejected(hf_v11):
    with pytest.raises(CheckpointError, match="is a file"):
        free_jax.load(hf_v11 / "model.safetensors")


@pytest.mark.parametrize("contents", [[], ["weights.bin"]], ids=["empty", "no-config"])
def test_directory_without_config_lists_what_it_holds(contents, tmp_path):
    for name in contents:
        (tmp_path / name).write_bytes(b"x")
    expected = "weights.bin" if contents else "empty"
    with pytest.raises(CheckpointError, match=rf"neither 'config.json'.*found: .*{expected}"):
        free_jax.load(tmp_path)


def test_config_without_weights_lists_the_files_found(hf_v11, tmp_path):
    directory = copy_checkpoint(hf_v11, tmp_path / "ckpt")
    (directory / "model.safetensors").rename(directory / "weights.npz")
    with pytest.raises(CheckpointError, match=r"no weights.*found: config.json, weights.npz"):
        free_jax.load(directory)


def test_directory_with_only_tensorflow_weights_names_what_is_readable(hf_v11, tmp_path):
    directory = copy_checkpoint(hf_v11, tmp_path / "ckpt")
    (directory / "model.safetensors").rename(directory / "tf_model.h5")
    with pytest.raises(CheckpointError) as info:
        free_jax.load(directory)
    message = str(info.value)
    assert str(directory) in message and "tf_model.h5" in message
    for readable in ("model.safetensors", "flax_model.msgpack", "pytorch_model.bin"):
        assert readable in message


def test_non_t5_config_is_a_config_error_naming_model_type(hf_v11, tmp_path):
    directory = copy_checkpoint(hf_v11, tmp_path / "ckpt")
    write_config(directory, model_type="bert")
    with pytest.raises(ConfigError, match=r"model_type='bert'"):
        free_jax.load(directory)


def test_config_field_of_wrong_type_is_a_config_error(hf_v11, tmp_path):
    directory = copy_checkpoint(hf_v11, tmp_path / "ckpt")
    write_config(directory, feed_forward_proj=None)
    with pytest.raises(ConfigError, match=r"config.json has a field of the wrong type"):
        free_jax.load(directory)


@pytest.mark.parametrize(
    "text", [b'{"model_type": "t5",', b"\xff\xfe\x00garbage"], ids=["truncated", "not-utf8"]
)
def test_invalid_json_config_names_the_file(text, hf_v11, tmp_path):
    directory = copy_checkpoint(hf_v11, tmp_path / "ckpt")
    (directory / "config.json").write_bytes(text)
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON"):
        free_jax.load(directory)


def test_tensor_of_wrong_shape_is_named(hf_v11, tmp_path):
    directory = copy_checkpoint(hf_v11, tmp_path / "ckpt")
    state = load_file(str(directory / "model.safetensors"))
    name = "decoder.block.2.layer.2.DenseReluDense.wo.weight"
    assert state[name].shape == (32, 64)
    state[name] = np.zeros((32, 48), np.float32)
    save_file(state, str(directory / "model.safetensors"))
    with pytest.raises(
        CheckpointError, match=rf"'{re.escape(name)}' has shape \(32, 48\).*\(32, 64\)"
    ):
        free_jax.load(directory)


def test_config_that_disagrees_with_the_weights_names_a_tensor(hf_v11, tmp_path):
    directory = copy_checkpoint(hf_v11, tmp_path / "ckpt")
    write_config(directory, d_ff=48)
    with pytest.raises(
        CheckpointError, match=r"'encoder\.block\.0\.[\w.]+\.wi_0\.weight'.*d_ff=48"
    ):
        free_jax.load(directory)


def test_missing_tensor_is_named(hf_v11, tmp_path):
    directory = copy_checkpoint(hf_v11, tmp_path / "ckpt")
    state = load_file(str(directory / "model.safetensors"))
    del state["decoder.block.3.layer.1.EncDecAttention.k.weight"]
    save_file(state, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing: 'decoder\.block\.3\.layer\.1\.EncDecAtt"):
        free_jax.load(directory)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors_names_the_file(damage, hf_v11, tmp_path):
    directory = copy_checkpoint(hf_v11, tmp_path / "ckpt")
    file = directory / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x07" * 4096)
    with pytest.raises(CheckpointError, match=r"cannot read weights file .*model\.safetensors"):
        free_jax.load(directory)


def test_corrupt_pytorch_bin_names_the_file(hf_v11, tmp_path):
    shutil.copy(hf_v11 / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match=r"cannot read weights file .*pytorch_model\.bin"):
        free_jax.load(tmp_path)


def test_pytorch_bin_training_checkpoint_is_rejected_clearly(reference_v11, hf_v11, tmp_path):
    # A training checkpoint nests the weights; reading it as a state dict must not crash obscurely.
    shutil.copy(hf_v11 / "config.json", tmp_path / "config.json")
    torch.save({"model": reference_v11.state_dict(), "step": 3}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"entry 'model' is not a tensor"):
        free_jax.load(tmp_path)


def test_sharded_checkpoint_with_missing_shard_names_it(reference_v11, tmp_path):
    reference_v11.save_pretrained(str(tmp_path), max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"names shard '{shard.name}', which is missing"):
        free_jax.load(tmp_path)
