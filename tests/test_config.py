"""`T5Config`: validation and conversion to and from Hugging Face `config.json` conventions."""

from __future__ import annotations

import pytest

from free_jax import testing
from free_jax.errors import ConfigError
from free_jax.models.config import T5Config

# Excerpts of real config.json files (the fields that matter), as transformers 4.x saved them.
T5_SMALL_4X = dict(
    model_type="t5",
    d_model=512,
    d_kv=64,
    d_ff=2048,
    num_layers=6,
    num_heads=8,
    feed_forward_proj="relu",
    tie_word_embeddings=True,
    n_positions=512,
    vocab_size=32128,
    eos_token_id=1,
    pad_token_id=0,
    decoder_start_token_id=0,
)
FLAN_T5_SMALL_4X = dict(
    model_type="t5",
    d_model=512,
    d_kv=64,
    d_ff=1024,
    num_layers=8,
    num_decoder_layers=8,
    num_heads=6,
    feed_forward_proj="gated-gelu",
    dense_act_fn="gelu_new",
    tie_word_embeddings=False,
    n_positions=512,
    vocab_size=32128,
)
MT5_SMALL_4X = dict(
    model_type="mt5",
    d_model=512,
    d_kv=64,
    d_ff=1024,
    num_layers=8,
    num_decoder_layers=8,
    num_heads=6,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
    vocab_size=250112,
)


def test_t5_v1_0_config_is_tied_relu_and_rescaled():
    c = T5Config.from_hf_dict(T5_SMALL_4X)
    assert (c.dense_act_fn, c.is_gated_act, c.tie_word_embeddings, c.scale_decoder_outputs) == (
        "relu",
        False,
        True,
        True,
    )
    assert c.num_decoder_layers == 6 and c.max_source_length == 512


@pytest.mark.parametrize("hf", [FLAN_T5_SMALL_4X, MT5_SMALL_4X], ids=["flan-t5", "mt5"])
def test_v1_1_configs_are_untied_gated_gelu_unscaled(hf):
    c = T5Config.from_hf_dict(hf)
    assert (c.dense_act_fn, c.is_gated_act, c.tie_word_embeddings, c.scale_decoder_outputs) == (
        "gelu_new",
        True,
        False,
        False,
    )
    assert c.model_type == hf["model_type"] and c.feed_forward_proj == "gated-gelu"


def test_transformers_5_convention_separates_tying_from_rescaling():
    """5.x writes tie_word_embeddings=True for every model and records the rescale on its own."""
    c = T5Config.from_hf_dict(
        {**FLAN_T5_SMALL_4X, "tie_word_embeddings": True, "scale_decoder_outputs": False}
    )
    assert c.tie_word_embeddings and not c.scale_decoder_outputs


@pytest.mark.parametrize("variant", testing.VARIANTS)
def test_hf_round_trip(variant):
    c = testing.tiny_config(variant, max_source_length=64)
    assert T5Config.from_hf_dict(c.to_hf_dict()) == c
    # transformers 5.x's config object always says tied; whether the head is tied is then read
    # from the weights (an lm_head.weight or not), and the rescale survives on its own.
    back = T5Config.from_hf_config(c.to_hf_config())
    assert back.tie_word_embeddings is True
    assert back.replace(tie_word_embeddings=c.tie_word_embeddings) == c


def test_transformers_reads_our_config_as_we_mean_it():
    c = testing.tiny_config("v1.1")
    hf = c.to_hf_config()
    assert hf.num_decoder_layers == c.num_decoder_layers and hf.d_kv == c.d_kv
    assert hf.is_gated_act and hf.dense_act_fn == "gelu_new"
    assert hf.scale_decoder_outputs is False


def test_json_round_trip_and_unknown_fields(tmp_path):
    c = testing.tiny_config("mt5")
    c.to_json(tmp_path / "c.json")
    assert T5Config.from_json(tmp_path / "c.json") == c
    (tmp_path / "bad.json").write_text('{"d_model": 8, "d_modle": 9}')
    with pytest.raises(ConfigError, match="unknown T5Config fields"):
        T5Config.from_json(tmp_path / "bad.json")


def test_config_is_hashable_for_jit():
    assert hash(testing.tiny_config("v1.0")) == hash(testing.tiny_config("v1.0"))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(d_model=0), "d_model must be a positive integer, got 0"),
        (dict(num_heads=2.0), "num_heads must be a positive integer, got 2.0"),
        (dict(relative_attention_num_buckets=2), "at least 4"),
        (dict(dense_act_fn="swish2"), "dense_act_fn='swish2' is not supported"),
        (dict(eos_token_id=500), "eos_token_id=500 is outside the vocabulary"),
        (dict(max_source_length=0), "max_source_length must be None or >= 1"),
        (dict(model_type="bart"), "model_type='bart' is not supported"),
    ],
)
def test_invalid_configs_are_rejected_with_the_value(changes, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        testing.tiny_config("v1.1", **changes)


@pytest.mark.parametrize(
    "hf, message",
    [
        (dict(model_type="bert"), "model_type='bert'"),
        (dict(), "model_type=None"),
        (dict(model_type="t5", feed_forward_proj="gated-gelu-x"), "feed_forward_proj"),
    ],
)
def test_non_t5_hf_configs_are_rejected(hf, message):
    with pytest.raises(ConfigError, match=message):
        T5Config.from_hf_dict(hf)
