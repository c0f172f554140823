"""Hugging Face *Flax* checkpoints: `flax_model.msgpack`, sharded msgpack + index, bad files.

The checkpoints in `tests/fixtures/hf_flax/` were written by transformers 4.46.3's own Flax
classes (`make_fixtures.py` there says how), with the logits and greedy tokens the library's Flax
model computed on fixed inputs, and the same weights converted by the library to PyTorch and saved
as safetensors (`pt/`). So free_jax is checked against the library's numbers, not against itself.
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
from flax.serialization import msgpack_restore, msgpack_serialize
from safetensors.numpy import load_file

import free_jax
from free_jax import CheckpointError
from free_jax.checkpoints.flax_msgpack import read_flax_msgpack
from free_jax.checkpoints.hf import read_hf_weights

FIXTURES = Path(__file__).parent / "fixtures" / "hf_flax"
CASES = ("t5_v11", "t5_v10_sharded", "longt5_tglobal", "longt5_local")
ATOL = 1e-4
MAX_NEW_TOKENS = 8
# Copies of the shared embedding that the library's PyTorch save leaves out or may keep.
ALIASES = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}


@pytest.fixture(scope="module")
def models() -> dict[str, free_jax.Model]:
    return {case: free_jax.load(FIXTURES / case) for case in (*CASES, "t5_v11_bf16")}


def expected(case: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / case / "expected.npz") as data:
        return dict(data)


def logits_of(model: free_jax.Model, case: str) -> np.ndarray:
    e = expected(case)
    out = free_jax.forward(
        model, e["input_ids"], e["decoder_input_ids"], attention_mask=e["attention_mask"]
    )
    return np.asarray(out, np.float32)


def greedy_of(model: free_jax.Model, case: str) -> np.ndarray:
    e = expected(case)
    out = free_jax.decode(
        model, e["input_ids"], attention_mask=e["attention_mask"], max_new_tokens=MAX_NEW_TOKENS
    )
    return np.asarray(out.tokens)


def assert_logits_close(got: np.ndarray, want: np.ndarray, case: str) -> None:
    diff = float(np.abs(got - want).max())
    print(f"{case}: max |logit diff| vs the library's Flax model = {diff:.3g}")
    assert got.shape == want.shape, (got.shape, want.shape)
    assert diff <= ATOL, f"{case}: max |logit diff| {diff:.3g} > {ATOL}"


# ---------------------------------------------------------------------------- the fixtures


def test_fixtures_hold_only_flax_weights():
    """The directories `load` reads hold Flax weights only, so the Flax reader is what runs."""
    for case in (*CASES, "t5_v11_bf16"):
        names = {p.name for p in (FIXTURES / case).iterdir()}
        assert not {n for n in names if n.endswith((".safetensors", ".bin", ".h5"))}, case
        if case == "t5_v10_sharded":
            assert "flax_model.msgpack" not in names
            index = json.loads((FIXTURES / case / "flax_model.msgpack.index.json").read_text())
            shards = set(index["weight_map"].values())
            assert len(shards) >= 2 and shards <= names
        else:
            assert "flax_model.msgpack" in names, case


# ---------------------------------------------------------------------------- the library's numbers


@pytest.mark.parametrize("case", CASES)
def test_logits_match_library(models, case):
    assert_logits_close(logits_of(models[case], case), expected(case)["logits"], case)


@pytest.mark.parametrize("case", CASES)
def test_greedy_matches_library(models, case):
    np.testing.assert_array_equal(greedy_of(models[case], case), expected(case)["greedy"])


@pytest.mark.parametrize("case", CASES)
def test_state_matches_library_pytorch_conversion(case):
    """Names, layouts and values equal what the library's Flax-to-PyTorch conversion saved."""
    ours = read_hf_weights(FIXTURES / case)
    theirs = load_file(str(FIXTURES / case / "pt" / "model.safetensors"))
    assert set(ours) == set(theirs) - ALIASES
    for name, array in ours.items():
        assert array.dtype == np.float32, name
        np.testing.assert_array_equal(array, theirs[name], err_msg=name)


@pytest.mark.parametrize("case", CASES)
def test_same_model_as_from_safetensors(models, case):
    """The same parameters and greedy tokens as the same weights loaded from safetensors."""
    flax_model = models[case]
    pt_model = free_jax.load(FIXTURES / case / "pt")
    assert flax_model.config == pt_model.config
    assert jax.tree.structure(flax_model.params) == jax.tree.structure(pt_model.params)
    for a, b in zip(
        jax.tree.leaves(flax_model.params), jax.tree.leaves(pt_model.params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(greedy_of(flax_model, case), greedy_of(pt_model, case))


def test_tied_and_untied_heads(models):
    assert models["t5_v10_sharded"].config.tie_word_embeddings
    assert "lm_head" not in models["t5_v10_sharded"].params
    for case in ("t5_v11", "longt5_tglobal", "longt5_local"):
        assert not models[case].config.tie_word_embeddings, case
        assert "lm_head" in models[case].params, case
    assert models["longt5_tglobal"].config.encoder_attention_type == "transient-global"
    assert models["longt5_local"].config.encoder_attention_type == "local"


# ---------------------------------------------------------------------------- bfloat16


def test_bf16_weights_keep_their_dtype(models):
    """`load(dtype=None)` of a bf16 msgpack gives bf16 params: the f32 weights rounded to bf16."""
    state = read_flax_msgpack(FIXTURES / "t5_v11_bf16" / "flax_model.msgpack")
    assert {a.dtype for a in state.values()} == {np.dtype(jnp.bfloat16)}
    bf16, f32 = models["t5_v11_bf16"], models["t5_v11"]
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf16.params))
    for a, b in zip(jax.tree.leaves(bf16.params), jax.tree.leaves(f32.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b.astype(jnp.bfloat16)))


def test_bf16_weights_in_float32_match_library():
    """The library computed the bf16 fixture's logits in float32 on the bf16 weights."""
    case = "t5_v11_bf16"
    model = free_jax.load(FIXTURES / case, dtype=jnp.float32)
    assert_logits_close(logits_of(model, case), expected(case)["logits"], case)
    np.testing.assert_array_equal(greedy_of(model, case), expected(case)["greedy"])


# ---------------------------------------------------------------------------- the reader


def test_reader_names_and_layout():
    state = read_flax_msgpack(FIXTURES / "longt5_tglobal" / "flax_model.msgpack")
    attention = "encoder.block.0.layer.0.TransientGlobalSelfAttention"
    # d_model 16, 2 heads of 6, d_ff 32, vocab 64, 8 buckets: linear weights are [out, in].
    assert state[f"{attention}.q.weight"].shape == (12, 16)
    assert state[f"{attention}.o.weight"].shape == (16, 12)
    assert state[f"{attention}.relative_attention_bias.weight"].shape == (8, 2)
    assert state[f"{attention}.global_relative_attention_bias.weight"].shape == (8, 2)
    assert state[f"{attention}.global_input_layer_norm.weight"].shape == (16,)
    assert state["encoder.block.1.layer.1.DenseReluDense.wi_0.weight"].shape == (32, 16)
    assert state["decoder.block.1.layer.1.EncDecAttention.k.weight"].shape == (12, 16)
    assert state["shared.weight"].shape == (64, 16)
    assert state["lm_head.weight"].shape == (64, 16)
    assert state["decoder.final_layer_norm.weight"].shape == (16,)


def test_shard_keys_joined_with_slashes(tmp_path):
    """A shard whose keys are "/"-joined paths (the index's spelling) reads the same."""
    source = FIXTURES / "t5_v10_sharded"
    shutil.copytree(source, tmp_path / "ckpt")
    shard = tmp_path / "ckpt" / "flax_model-00002-of-00004.msgpack"
    flat = _flatten(msgpack_restore(shard.read_bytes()))
    shard.write_bytes(msgpack_serialize({"/".join(k): v for k, v in flat.items()}))
    ours, reference = read_hf_weights(tmp_path / "ckpt"), read_hf_weights(source)
    assert set(ours) == set(reference)
    for name in ours:
        np.testing.assert_array_equal(ours[name], reference[name], err_msg=name)


def test_params_collection_prefix_is_dropped(tmp_path):
    file = FIXTURES / "t5_v11" / "flax_model.msgpack"
    wrapped = tmp_path / "flax_model.msgpack"
    wrapped.write_bytes(msgpack_serialize({"params": msgpack_restore(file.read_bytes())}))
    assert read_flax_msgpack(wrapped).keys() == read_flax_msgpack(file).keys()


def _flatten(tree: dict, prefix: tuple = ()) -> dict[tuple, np.ndarray]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out


# ---------------------------------------------------------------------------- bad files


def _copy(case: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / case, tmp_path / case, ignore=_skip_pt))


def _skip_pt(directory: str, names: list[str]) -> list[str]:
    return ["pt"] if "pt" in names else []


def test_truncated_msgpack(tmp_path):
    directory = _copy("t5_v11", tmp_path)
    file = directory / "flax_model.msgpack"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=re.escape(str(file)) + ".*not a complete Flax"):
        free_jax.load(directory)


def test_truncated_shard(tmp_path):
    directory = _copy("t5_v10_sharded", tmp_path)
    file = directory / "flax_model-00003-of-00004.msgpack"
    file.write_bytes(file.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match=re.escape(str(file))):
        free_jax.load(directory)


def test_git_lfs_pointer(tmp_path):
    directory = _copy("t5_v11", tmp_path)
    file = directory / "flax_model.msgpack"
    file.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 123\n")
    with pytest.raises(CheckpointError, match=re.escape(str(file)) + ".*Git LFS pointer"):
        free_jax.load(directory)


@pytest.mark.parametrize(
    "content, what",
    [([1, 2, 3], "a list"), ({"shared": {"embedding": "text"}}, "'shared/embedding' is a str")],
)
def test_msgpack_that_is_not_a_parameter_tree(tmp_path, content, what):
    directory = _copy("t5_v11", tmp_path)
    file = directory / "flax_model.msgpack"
    file.write_bytes(msgpack_serialize(content))
    with pytest.raises(CheckpointError, match=re.escape(str(file)) + ".*" + re.escape(what)):
        free_jax.load(directory)


def test_msgpack_without_decoder_blocks(tmp_path):
    directory = _copy("t5_v11", tmp_path)
    file = directory / "flax_model.msgpack"
    tree = msgpack_restore(file.read_bytes())
    del tree["decoder"]["block"]
    file.write_bytes(msgpack_serialize(tree))
    with pytest.raises(CheckpointError, match=r"missing: 'decoder\.block\.0\.layer\.0\.") as info:
        free_jax.load(directory)
    assert str(directory) in str(info.value)


def test_index_naming_a_missing_shard(tmp_path):
    directory = _copy("t5_v10_sharded", tmp_path)
    shard = "flax_model-00002-of-00004.msgpack"
    (directory / shard).unlink()
    index = directory / "flax_model.msgpack.index.json"
    message = re.escape(f"{index} names shard {shard!r}, which is missing")
    with pytest.raises(CheckpointError, match=message):
        free_jax.load(directory)
