"""Numerical parity with `transformers`' PyTorch T5 on tiny random checkpoints of every variant.

Each case writes a checkpoint the way users get one (`save_pretrained`, or the 4.x-style untied
layout of real v1.1 / Flan-T5 / mT5 files), loads it with `free_jax.load`, and compares encoder
outputs, every decoder block's output, logits and greedy tokens with the reference.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import free_jax  # noqa: E402
from free_jax import testing  # noqa: E402
from free_jax.models import t5  # noqa: E402

ATOL = 1e-4  # float32 parity bound required of every compared tensor


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    variant: str
    overrides: dict

    @property
    def config(self):
        return testing.tiny_config(self.variant, **self.overrides)

    @property
    def equal_depths(self) -> bool:
        return self.config.num_layers == self.config.num_decoder_layers


CASES = [
    Case("v1.0-tied-relu", "v1.0", dict(num_layers=3, num_decoder_layers=3)),
    Case("v1.1-untied-gated-gelu", "v1.1", dict(num_layers=3, num_decoder_layers=3)),
    Case("mt5", "mt5", dict(num_layers=2, num_decoder_layers=2)),
    # 3 heads of width 7 (21 != d_model 20), odd bucket count.
    Case(
        "odd-head-dims",
        "v1.1",
        dict(
            d_model=20,
            d_kv=7,
            num_heads=3,
            d_ff=36,
            relative_attention_num_buckets=7,
            num_layers=2,
            num_decoder_layers=2,
        ),
    ),
    Case("v1.0-deeper-decoder", "v1.0", dict(num_layers=2, num_decoder_layers=4)),
    Case("v1.1-deeper-encoder", "v1.1", dict(num_layers=4, num_decoder_layers=2)),
]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.name)
def pair(request, tmp_path_factory):
    """(case, free_jax model, reference torch model) built from one checkpoint on disk."""
    case = request.param
    directory = tmp_path_factory.mktemp(case.name)
    testing.make_hf_checkpoint(directory, case.config, seed=CASES.index(case))
    return case, free_jax.load(directory), testing.load_hf_reference(directory)


def _batch(seed: int = 0):
    """Source ids with ragged lengths (right padding) and teacher-forced decoder inputs."""
    ids = testing.random_ids((3, 19), seed)
    mask = np.ones_like(ids)
    mask[1, 11:] = 0
    mask[2, 4:] = 0
    ids = np.where(mask == 1, ids, 0)
    dec = testing.random_ids((3, 13), seed + 1)
    dec[:, 0] = 0  # decoder start token
    return ids, mask, dec


def _reference(model, ids, mask, dec):
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            decoder_input_ids=torch.tensor(dec, dtype=torch.long),
            output_hidden_states=True,
        )


def _max_diff(ours, theirs, where=None) -> float:
    ours = np.asarray(ours, np.float64)
    theirs = theirs.detach().numpy().astype(np.float64) if hasattr(theirs, "detach") else theirs
    diff = np.abs(ours - theirs)
    if where is not None:
        diff = diff[where]
    return float(diff.max())


def test_config_read_from_checkpoint(pair):
    case, model, _ = pair
    assert model.config == case.config.replace(max_source_length=model.config.max_source_length)


def test_encoder_blocks_and_logits_match(pair):
    case, model, ref = pair
    ids, mask, dec = _batch()
    theirs = _reference(ref, ids, mask, dec)
    ours = t5.forward(
        model.params,
        model.config,
        jnp.asarray(ids),
        jnp.asarray(dec),
        jnp.asarray(mask),
        return_block_states=True,
    )
    # Padded source positions are garbage in both implementations: compare real ones.
    assert _max_diff(ours.encoder_output, theirs.encoder_last_hidden_state, mask == 1) <= ATOL
    L = model.config.num_decoder_layers
    assert len(ours.block_states) == L
    # transformers' decoder_hidden_states[i + 1] is the stream after block i, except the last,
    # which has the final RMS norm applied.
    for i in range(L - 1):
        assert _max_diff(ours.block_states[i], theirs.decoder_hidden_states[i + 1]) <= ATOL, i
    final = t5.rms_norm(
        ours.block_states[-1],
        model.params["decoder"]["final_norm"],
        model.config.layer_norm_epsilon,
    )
    assert _max_diff(final, theirs.decoder_hidden_states[L]) <= ATOL
    assert _max_diff(ours.logits, theirs.logits) <= ATOL
    # The public, validated entry point gives the same logits.
    public = free_jax.forward(model, ids, dec, attention_mask=mask)
    assert _max_diff(public, theirs.logits) <= ATOL


def _reference_greedy(ref, ids, mask, max_new_tokens, min_new_tokens=0):
    """Greedy decoding by repeated full reference forward passes (no cache, no generate)."""
    B = ids.shape[0]
    dec = np.zeros((B, 1), np.int64)
    done = np.zeros(B, bool)
    out = []
    for step in range(max_new_tokens):
        with torch.no_grad():
            logits = (
                ref(
                    input_ids=torch.tensor(ids, dtype=torch.long),
                    attention_mask=torch.tensor(mask, dtype=torch.long),
                    decoder_input_ids=torch.tensor(dec),
                )
                .logits[:, -1]
                .numpy()
            )
        if step < min_new_tokens:
            logits[:, 1] = -np.inf
        token = np.where(done, 0, logits.argmax(-1))
        out.append(token)
        done |= token == 1
        dec = np.concatenate([dec, token[:, None]], axis=1)
        if done.all():
            break
    return np.stack(out, axis=1)


@pytest.mark.parametrize("min_new_tokens", [0, 9])
def test_greedy_tokens_match(pair, min_new_tokens):
    case, model, ref = pair
    ids, mask, _ = _batch(seed=3)
    T = 12
    ours = free_jax.decode(
        model, ids, attention_mask=mask, max_new_tokens=T, min_new_tokens=min_new_tokens
    )
    if case.equal_depths:
        with torch.no_grad():
            generated = ref.generate(
                input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                do_sample=False,
                num_beams=1,
                max_new_tokens=T,
                min_new_tokens=min_new_tokens,
            ).numpy()[:, 1:]  # drop the decoder start token
    else:
        # transformers 5.23's generate fails when the depths differ.
        generated = _reference_greedy(ref, ids, mask, T, min_new_tokens)
    width = generated.shape[1]
    np.testing.assert_array_equal(ours.tokens[:, :width], generated)
    assert (ours.tokens[:, width:] == 0).all()
    np.testing.assert_array_equal(ours.lengths, _lengths(generated, eos_id=1))


def _lengths(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """Tokens per row up to and including the first EOS (all of them when there is none)."""
    is_eos = tokens == eos_id
    return np.where(is_eos.any(axis=1), is_eos.argmax(axis=1) + 1, tokens.shape[1])


@pytest.mark.parametrize("variant", ["v1.0", "v1.1"])
def test_exported_checkpoint_round_trips_into_transformers(tmp_path, variant):
    model = testing.tiny_model(variant, seed=11)
    free_jax.export_hf(model, tmp_path)
    ref = testing.load_hf_reference(tmp_path)
    ids, mask, dec = _batch(seed=5)
    ours = free_jax.forward(model, ids, dec, attention_mask=mask)
    assert _max_diff(ours, _reference(ref, ids, mask, dec).logits) <= ATOL
    # ...and back into free_jax bit for bit.
    again = free_jax.load(tmp_path)
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(again.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bfloat16_load_tracks_float32(tmp_path):
    """bfloat16 weights and activations stay close to float32 (bf16 has ~3 significant digits)."""
    testing.make_hf_checkpoint(tmp_path, testing.tiny_config("v1.1"), seed=2)
    f32 = free_jax.load(tmp_path)
    bf16 = free_jax.load(tmp_path, dtype=jnp.bfloat16)
    assert bf16.dtype == jnp.bfloat16
    ids, mask, dec = _batch(seed=7)
    a = np.asarray(free_jax.forward(f32, ids, dec, attention_mask=mask))
    b = np.asarray(free_jax.forward(bf16, ids, dec, attention_mask=mask))
    assert b.dtype == np.float32  # logits are always float32
    scale = np.abs(a).max()
    assert np.abs(a - b).max() <= 0.05 * scale


def test_rows_stop_at_eos_like_transformers(tmp_path):
    """Rows finishing at different steps: padding after EOS, and the loop stops when all are done.

    Random weights rarely emit EOS, so both models get the same boosted EOS column of the head.
    """
    config = testing.tiny_config("v1.1", num_layers=3, num_decoder_layers=3)
    testing.make_hf_checkpoint(tmp_path, config, seed=1)
    model, ref = free_jax.load(tmp_path), testing.load_hf_reference(tmp_path)
    boost = 2.5
    head = np.asarray(model.params["lm_head"]).copy()
    head[:, config.eos_token_id] *= boost
    model = dataclasses.replace(model, params={**model.params, "lm_head": jnp.asarray(head)})
    with torch.no_grad():
        ref.lm_head.weight[config.eos_token_id] *= boost

    ids = testing.random_ids((6, 10), 4)
    T = 16
    ours = free_jax.decode(model, ids, max_new_tokens=T)
    assert ours.lengths.min() < T and ours.lengths.max() == T, "test needs rows of mixed lengths"
    with torch.no_grad():
        generated = ref.generate(
            input_ids=torch.tensor(ids, dtype=torch.long),
            do_sample=False,
            num_beams=1,
            max_new_tokens=T,
        ).numpy()[:, 1:]
    np.testing.assert_array_equal(ours.tokens, generated)
    np.testing.assert_array_equal(ours.lengths, _lengths(generated, config.eos_token_id))

    # When every row ends early, the loop stops there too.
    short = ids[ours.lengths < T]
    out = free_jax.decode(model, short, max_new_tokens=T)
    assert out.steps == out.lengths.max() < T
