"""CALM on tiny random T5s: the limits, a step-by-step reference with explicit state copying,
batching, the decay formula, the meta head, no-recompile thresholds, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import free_jax
from free_jax import testing
from free_jax.decoding import calm_search
from free_jax.errors import InputError
from free_jax.models import exit_classifier, t5
from free_jax.models.kv_cache import write_positions

T = 10  # new tokens per row
L = 4  # decoder blocks of the tiny model


@pytest.fixture(scope="module")
def model():
    return testing.tiny_model("v1.1", seed=5)


@pytest.fixture(scope="module")
def batch():
    ids = testing.random_ids((3, 9), seed=4)
    mask = (np.arange(9)[None, :] < np.array([9, 6, 4])[:, None]).astype(np.int32)
    return np.where(mask == 1, ids, 0), mask


def _calm(model, batch, threshold, **kw):
    ids, mask = batch
    kw = dict(method="calm", exit_layer=1, threshold=threshold, max_new_tokens=T) | kw
    return free_jax.decode(model, ids, attention_mask=mask, **kw)


def test_decay_formula_uses_the_position():
    lam = jnp.float32(0.6)
    first = calm_search.decayed_threshold(lam, jnp.int32(0), 20, 4.0)
    last = calm_search.decayed_threshold(lam, jnp.int32(20), 20, 4.0)
    np.testing.assert_allclose(first, 0.9 * 0.6 + 0.1, rtol=1e-6)
    np.testing.assert_allclose(last, 0.9 * 0.6 + 0.1 * np.exp(-4.0), rtol=1e-6)
    np.testing.assert_allclose(calm_search.decayed_threshold(lam, jnp.int32(7), 20, None), 0.6)


def test_never_exiting_equals_full_and_always_exiting_equals_static(model, batch):
    ids, mask = batch
    full = free_jax.decode(model, ids, attention_mask=mask, max_new_tokens=T)
    never = _calm(model, batch, 1.0, calm_tau=None)
    np.testing.assert_array_equal(never.tokens, full.tokens)
    assert never.exit_rate == 0.0 and never.num_deep_passes == full.steps
    static = free_jax.decode(
        model, ids, attention_mask=mask, method="static", exit_layer=1, max_new_tokens=T
    )
    # A top-1 minus top-2 gap is > 0 but for exact ties, so every token exits at block 1.
    always = _calm(model, batch, 0.0, calm_tau=None)
    np.testing.assert_array_equal(always.tokens, static.tokens)
    generated = np.arange(T)[None, :] < always.lengths[:, None]
    assert (always.exit_layer[generated] == 1).all()
    assert always.exit_rate == 1.0 and always.num_deep_passes == 0


def _reference_calm_row(model, ids, mask, threshold, min_layer, tau):
    """CALM for one row, one block at a time in Python, with state copying written out."""
    config, params = model.config, model.params
    eps = config.layer_norm_epsilon
    run_block = jax.jit(t5.decoder_blocks, static_argnames=("config", "start", "stop"))
    exit_head = jax.jit(t5.exit_head, static_argnames=("config",))
    enc = t5.encode(params, config, ids, mask)
    cache = t5.init_decoder_cache(params, config, enc, mask, T)
    token, tokens, layers, scores = config.decoder_start_token_id, [], [], []
    for t in range(T):
        lam = 0.9 * threshold + 0.1 * np.exp(-tau * t / T)
        x = t5.embed(params, jnp.array([[token]]))
        exit_at, logits = L, None
        for i in range(L):
            out = run_block(params, config, cache, x, start=i, stop=i + 1)
            cache, x = out.cache, out.hidden
            logits = np.asarray(exit_head(params, config, x[:, 0]))[0]
            if i + 1 >= min_layer and i + 1 < L:
                p = np.exp(logits - logits.max())
                p /= p.sum()
                top2 = np.sort(p)[-2:]
                score = top2[1] - top2[0]
                if score > lam:
                    exit_at = i + 1
                    break
        scores.append(score)
        layers.append(exit_at)
        # State copying, from its definition: each skipped block's K/V are its own projections
        # of the exit state after its pre-attention norm.
        new_layers = list(cache.layers)
        for j in range(exit_at, L):
            block = params["decoder"]["blocks"][j]
            h = t5.rms_norm(x, block["self_attn_norm"], eps)
            H, Dh = config.num_heads, config.d_kv
            k = (h @ block["self_attn"]["k"]).reshape(1, 1, H, Dh)
            v = (h @ block["self_attn"]["v"]).reshape(1, 1, H, Dh)
            pos = new_layers[j].length[:, None]
            one = jnp.ones((1,), jnp.int32)
            new_layers[j] = write_positions(new_layers[j], k, v, pos, pos >= 0, one)
        cache = cache.replace(layers=tuple(new_layers))
        token = int(np.argmax(logits))
        tokens.append(token)
        if token == config.eos_token_id:
            break
    return np.array(tokens), np.array(layers), np.array(scores)


def test_matches_a_step_by_step_reference_with_state_copying(model, batch):
    ids, mask = batch
    threshold = 0.6
    out = _calm(model, batch, threshold, exit_layer=1, calm_tau=4.0)
    assert 0.1 < out.exit_rate < 0.9  # a mix, so state copying matters
    for b in range(ids.shape[0]):
        n = int(out.lengths[b])
        tokens, layers, scores = _reference_calm_row(
            model, ids[b : b + 1], mask[b : b + 1], threshold, 1, 4.0
        )
        np.testing.assert_array_equal(out.tokens[b, :n], tokens)
        np.testing.assert_array_equal(out.exit_layer[b, :n], layers)
        np.testing.assert_allclose(out.confidence[b, :n], scores, atol=1e-5)


def test_batch_equals_rows_decoded_alone(model, batch):
    ids, mask = batch
    out = _calm(model, batch, 0.7)
    for b in range(ids.shape[0]):
        row = _calm(model, (ids[b : b + 1], mask[b : b + 1]), 0.7)
        n = int(row.lengths[0])
        assert out.lengths[b] == n
        np.testing.assert_array_equal(out.tokens[b], row.tokens[0])
        np.testing.assert_array_equal(out.exit_layer[b], row.exit_layer[0])


def test_state_copying_writes_the_projections_of_the_copied_state(model):
    config, params = model.config, model.params
    enc = t5.encode(params, config, testing.random_ids((2, 5)), jnp.ones((2, 5), jnp.int32))
    cache = t5.init_decoder_cache(params, config, enc, jnp.ones((2, 5), jnp.int32), 6)
    hidden = jnp.asarray(np.random.default_rng(0).normal(size=(2, 1, config.d_model)), jnp.float32)
    for layout in (params, t5.fuse_for_decoding(params)):
        out = t5.copy_state_kv(layout, config, cache, hidden, start=1, stop=L)
        assert out.lengths().tolist() == [[0, 0], [1, 1], [1, 1], [1, 1]]
        for j in range(1, L):
            block = params["decoder"]["blocks"][j]
            h = t5.rms_norm(hidden, block["self_attn_norm"], config.layer_norm_epsilon)
            k = (h @ block["self_attn"]["k"]).reshape(2, config.num_heads, config.d_kv)
            np.testing.assert_allclose(out.layers[j].k[..., 0].reshape(k.shape), k, atol=1e-5)


def test_meta_confidence_uses_the_exit_classifier(model, batch):
    meta_model = testing.with_exit_classifier(model, seed=1)
    ids, mask = batch
    for method in ("free", "calm"):
        kw = dict(exit_layer=2) if method == "free" else {}
        out = free_jax.decode(
            meta_model,
            ids,
            attention_mask=mask,
            method=method,
            confidence="meta",
            threshold=0.5,
            max_new_tokens=T,
            **kw,
        )
        conf = out.confidence[~np.isnan(out.confidence)]
        assert ((conf > 0) & (conf < 1)).all() and conf.std() > 0
    # CALM's first token: its confidence is the head's probability at the block it exited
    # after, or after block L - 1, the last one measured, when it ran every block.
    states = t5.forward(
        meta_model.params,
        meta_model.config,
        ids[:1],
        np.zeros((1, 1), np.int32),
        mask[:1],
        return_block_states=True,
    ).block_states
    layer = min(int(out.exit_layer[0, 0]), L - 1)
    expected = exit_classifier.exit_classifier_confidence(
        meta_model.params, meta_model.config, states[layer - 1][:, 0]
    )
    np.testing.assert_allclose(out.confidence[0, 0], expected[0], atol=1e-6)


def test_changing_the_threshold_does_not_recompile(model, batch):
    _calm(model, batch, 0.5)
    before = calm_search.calm_decode._cache_size()
    for threshold in (0.1, 0.7, np.float32(0.3), jnp.float32(0.9)):
        _calm(model, batch, threshold)
    assert calm_search.calm_decode._cache_size() == before


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(exit_layer=4), r"exit_layer must be an integer in \[1, 3\], got 4"),
        (dict(threshold=float("nan")), r"threshold=nan is invalid"),
        (dict(calm_tau=-1.0), r"calm_tau must be a finite number >= 0 \(or None"),
        (dict(confidence="entropy"), r"confidence='entropy' is not known; valid: \("),
        (dict(confidence="meta"), r"confidence='meta' needs a model with a trained exit"),
        (dict(threshold=object()), r"method='calm' takes a number or a float32 array"),
    ],
)
def test_bad_calm_arguments_raise_clear_errors(model, kwargs, message):
    with pytest.raises(InputError, match=message):
        free_jax.decode(model, np.array([[5, 6, 7]]), method="calm", max_new_tokens=3, **kwargs)
