"""FREE decoding on tiny random T5s: the method's invariants, no-recompile thresholds, bad input."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import free_jax
from free_jax import decoding, testing
from free_jax.decoding import spd
from free_jax.errors import InputError
from free_jax.models import t5

T = 12  # new tokens per row
LS = 2  # shallow blocks of the 4-block tiny decoder


@pytest.fixture(scope="module")
def model():
    # v1.0: its tied, rescaled head is the exit that differs most from the plain layout. The
    # exact-mode property test below uses v1.1; both layouts are checked in test_decode.py.
    return testing.tiny_model("v1.0", seed=5)


@pytest.fixture(scope="module")
def batch():
    ids = testing.random_ids((4, 11), seed=9)
    mask = (np.arange(11)[None, :] < np.array([11, 8, 5, 3])[:, None]).astype(np.int32)
    return np.where(mask == 1, ids, 0), mask


def _confidences(model, batch):
    """The shallow confidences the model produces on this batch (to pick thresholds from)."""
    ids, mask = batch
    out = free_jax.decode(
        model,
        ids,
        attention_mask=mask,
        method="free",
        exit_layer=LS,
        threshold=1.0,
        max_new_tokens=T,
    )
    return out.confidence[~np.isnan(out.confidence)]


def test_thresholds_the_tests_pick_lie_between_confidences():
    conf = np.array([0.9, 0.1, 0.5, 0.5, np.nan, 0.3], np.float32)
    for q, expected in [(0.0, 0.2), (0.4, 0.4), (1.0, 0.7)]:
        threshold = testing.threshold_between(conf, q)
        assert threshold == pytest.approx(expected) and threshold not in conf.tolist()
    with pytest.raises(ValueError, match="two distinct confidences"):
        testing.threshold_between(np.array([0.5, 0.5, np.nan]), 0.5)


def _free(model, batch, threshold, **kw):
    ids, mask = batch
    kw = dict(method="free", exit_layer=LS, threshold=threshold, max_new_tokens=T) | kw
    return free_jax.decode(model, ids, attention_mask=mask, **kw)


def test_never_exiting_equals_full_and_always_exiting_equals_static(model, batch):
    ids, mask = batch
    full = free_jax.decode(model, ids, attention_mask=mask, max_new_tokens=T)
    never = _free(model, batch, 1.0)
    np.testing.assert_array_equal(never.tokens, full.tokens)
    assert never.exit_rate == 0.0 and never.num_deep_passes == full.steps
    static = free_jax.decode(
        model, ids, attention_mask=mask, method="static", exit_layer=LS, max_new_tokens=T
    )
    always = _free(model, batch, 0.0, buffer_capacity=T)
    np.testing.assert_array_equal(always.tokens, static.tokens)
    assert always.exit_rate == 1.0 and always.num_deep_passes == 0


def test_every_token_matches_its_exit_under_teacher_forcing(model, batch):
    """Deep tokens are the full model's argmax, shallow ones the shallow exit's, confidently."""
    ids, mask = batch
    conf = _confidences(model, batch)
    for threshold in (testing.threshold_between(conf, q) for q in (0.3, 0.6)):
        out = _free(model, batch, float(threshold), buffer_capacity=3)
        assert 0 < out.exit_rate < 1, "pick thresholds that mix both exits"
        dec = np.concatenate([np.zeros((4, 1), np.int32), out.tokens[:, :-1]], axis=1)
        deep = np.asarray(free_jax.forward(model, ids, dec, attention_mask=mask))
        shallow = np.asarray(free_jax.forward(model, ids, dec, attention_mask=mask, exit_layer=LS))
        probs = np.asarray(jnp.asarray(shallow)).astype(np.float64)
        probs = np.exp(probs - probs.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        top2 = -np.sort(-probs, axis=-1)[..., :2]
        diff = top2[..., 0] - top2[..., 1]
        for b, n in enumerate(out.lengths):
            ex = out.exited[b, :n]
            np.testing.assert_array_equal(out.tokens[b, :n][~ex], deep[b, :n].argmax(-1)[~ex])
            np.testing.assert_array_equal(out.tokens[b, :n][ex], shallow[b, :n].argmax(-1)[ex])
            np.testing.assert_allclose(out.confidence[b, :n], diff[b, :n], atol=1e-5)
            assert (out.confidence[b, :n][ex] > threshold).all()
            np.testing.assert_array_equal(out.exit_layer[b, :n], np.where(ex, LS, 4))


def test_deep_cache_equals_the_full_models_for_the_emitted_prefix(model, batch):
    ids, mask = batch
    threshold = testing.threshold_between(_confidences(model, batch), 0.5)
    ids16 = np.pad(ids, ((0, 0), (0, 5)))
    mask16 = np.pad(mask, ((0, 0), (0, 5)))
    encoded = decoding.encode_source(model.params, ids16, mask16, config=model.config, length=16)
    result = decoding.free_decode(
        model.params,
        *encoded,
        jnp.float32(threshold),
        config=model.config,
        exit_layer=LS,
        max_new_tokens=T,
        buffer_capacity=4,
        keep_cache=True,
    )
    tokens, lengths = np.asarray(result.tokens), np.asarray(result.lengths)
    # Reference: the full model over [start, emitted tokens...] in one teacher-forced block.
    config, params = model.config, model.params
    enc = t5.encode(params, config, jnp.asarray(ids16), jnp.asarray(mask16))
    cache = t5.init_decoder_cache(params, config, enc, jnp.asarray(mask16), T)
    dec = np.concatenate([np.zeros((4, 1), np.int32), tokens[:, :-1]], axis=1)
    ref = t5.decoder_blocks(
        params,
        config,
        cache,
        t5.embed(params, jnp.asarray(dec)),
        start=0,
        stop=config.num_decoder_layers,
    ).cache
    for i, (ours, theirs) in enumerate(zip(result.cache.layers, ref.layers, strict=True)):
        filled = np.asarray(ours.length)
        assert (filled <= lengths).all()
        if i < LS:  # the shallow blocks saw every token
            np.testing.assert_array_equal(filled, lengths)
        for b in range(4):
            n = filled[b]
            H = config.num_heads
            rows = slice(b * H, (b + 1) * H)  # the cache's first axis is (row, head) pairs
            for ours_kv, theirs_kv in (
                (ours.k[rows, :, :n], theirs.k[rows, :, :n]),
                (ours.v[rows, :n], theirs.v[rows, :n]),
            ):
                np.testing.assert_allclose(
                    np.asarray(ours_kv),
                    np.asarray(theirs_kv),
                    atol=1e-5,
                    rtol=0,
                )


# Slow: exact mode equals full decoding at every row count in the default suite's
# test_row_compacted_passes_keep_every_invariant, and for random thresholds on a scripted model
# in test_spd; this adds random thresholds on a real model.
@pytest.mark.slow
@settings(max_examples=10, deadline=None)
@given(quantile=st.floats(0.0, 1.0), K=st.sampled_from([1, 4]))
def test_exact_mode_equals_full_greedy_for_any_threshold(quantile, K):
    model = testing.tiny_model("v1.1", seed=5)
    ids = testing.random_ids((4, 11), seed=9)
    full = free_jax.decode(model, ids, max_new_tokens=T)
    threshold = testing.threshold_between(_confidences(model, (ids, ids != 0)), quantile)
    out = free_jax.decode(
        model,
        ids,
        method="free",
        exit_layer=LS,
        threshold=threshold,
        max_new_tokens=T,
        mode="exact",
        buffer_capacity=K,
    )
    np.testing.assert_array_equal(out.tokens, full.tokens)
    np.testing.assert_array_equal(out.lengths, full.lengths)


@pytest.mark.parametrize("mode", ["default", pytest.param("exact", marks=pytest.mark.slow)])
def test_batch_equals_rows_decoded_alone(model, batch, mode):
    ids, mask = batch
    threshold = testing.threshold_between(_confidences(model, batch), 0.5)
    together = _free(model, batch, threshold, buffer_capacity=3, mode=mode)
    for b in range(4):
        n = int(mask[b].sum())
        alone = free_jax.decode(
            model,
            ids[b : b + 1, :n],
            method="free",
            exit_layer=LS,
            threshold=threshold,
            max_new_tokens=T,
            buffer_capacity=3,
            mode=mode,
        )
        np.testing.assert_array_equal(alone.tokens[0], together.tokens[b])
        if mode == "default":  # exact mode verifies every row at each pass: exits may differ
            np.testing.assert_array_equal(alone.exited[0], together.exited[b])


def test_an_int8_shallow_head_keeps_exact_mode_exact(model, batch):
    """With `shallow_head="int8-dynamic"` the shallow exit decides from an int8 copy of the
    head: its confidences move (a little), and exact mode, whose deep exit keeps the float
    head, still equals full decoding. (Batch independence holds only up to rare flips here, as
    with any rounding of activations: a row's hidden state differs from the same row's in a
    batch in its last bits, which can move a value across a rounding boundary.)"""
    int8 = dict(shallow_head="int8-dynamic")
    reference = _free(model, batch, 1.0)
    measured = _free(model, batch, 1.0, **int8)  # never exits: every confidence, float tokens
    np.testing.assert_array_equal(measured.tokens, reference.tokens)
    seen = ~np.isnan(reference.confidence)
    assert not np.array_equal(measured.confidence[seen], reference.confidence[seen])
    np.testing.assert_allclose(measured.confidence[seen], reference.confidence[seen], atol=0.05)
    # Mostly exits, so that some steps need no pass and drafts wait for a later one.
    low = testing.threshold_between(measured.confidence[seen], 0.2)
    exact = _free(model, batch, low, buffer_capacity=3, mode="exact", **int8)
    assert exact.deep_pass_tokens.sum() > exact.deep_pass_rows.sum(), "passes verified drafts"
    np.testing.assert_array_equal(exact.tokens, reference.tokens)
    default = _free(model, batch, low, buffer_capacity=3, **int8)
    assert 0 < default.exit_rate < 1


def test_row_compacted_passes_keep_every_invariant(model):
    """Batch 8 passes run at 2 gathered rows or all 8 (`spd.row_buckets`). Thresholds that send
    no row, few rows and every row into passes: the batch equals each row alone (default
    mode), exact mode equals full greedy, threshold 1 equals full, and both row counts ran."""
    B, S = 8, 11
    # Reversed, so that the rows which need the deep blocks most are not the first ones (a
    # pass that gathered rows 0 and 1 whatever the rows taking part would pass otherwise).
    ids = testing.random_ids((B, S), seed=31)[::-1]
    lengths = np.array([11, 4, 9, 2, 11, 7, 5, 10])[::-1]
    mask = (np.arange(S)[None, :] < lengths[:, None]).astype(np.int32)
    batch = (np.where(mask == 1, ids, 0), mask)
    assert spd.row_buckets(B) == (2, B)
    full = free_jax.decode(model, batch[0], attention_mask=mask, max_new_tokens=T)
    conf = _confidences(model, batch)
    pass_rows = []
    for threshold in (
        0.0,
        testing.threshold_between(conf, 0.2),
        testing.threshold_between(conf, 0.6),
        1.0,
    ):
        together = _free(model, batch, threshold)
        pass_rows.extend(together.deep_pass_rows.tolist())
        for b in range(B):
            n = lengths[b]
            alone = _free(model, (ids[b : b + 1, :n], mask[b : b + 1, :n]), threshold)
            np.testing.assert_array_equal(alone.tokens[0], together.tokens[b])
            np.testing.assert_array_equal(alone.exited[0], together.exited[b])
        exact = _free(model, batch, threshold, mode="exact")
        np.testing.assert_array_equal(exact.tokens, full.tokens)
        if threshold == 1.0:
            np.testing.assert_array_equal(together.tokens, full.tokens)
    assert min(pass_rows) <= 2 < max(pass_rows)  # both the gathered and the whole-batch pass


def test_min_new_tokens_holds_for_both_exits(model, batch):
    threshold = testing.threshold_between(_confidences(model, batch), 0.5)
    out = _free(model, batch, threshold, min_new_tokens=T)
    np.testing.assert_array_equal(out.lengths, T)
    assert (out.tokens != model.config.eos_token_id).all()


@pytest.mark.parametrize(
    "confidence", ["softmax_max", pytest.param("state_cosine", marks=pytest.mark.slow)]
)
def test_other_confidence_measures(model, batch, confidence):
    ids, mask = batch
    full = free_jax.decode(model, ids, attention_mask=mask, max_new_tokens=T)
    out = _free(model, batch, 1.0, confidence=confidence)
    np.testing.assert_array_equal(out.tokens, full.tokens)  # 1.0 never exits
    conf = out.confidence[~np.isnan(out.confidence)]
    low = -1 if confidence == "state_cosine" else 0
    assert ((conf >= low - 1e-6) & (conf <= 1 + 1e-6)).all() and conf.std() > 0


def test_changing_the_threshold_does_not_recompile(model, batch):
    _free(model, batch, 0.5)
    before = decoding.free_decode._cache_size()
    for threshold in (0.1, 0.2, 0.7, np.float32(0.3), jnp.float32(0.9)):
        _free(model, batch, threshold)
    assert decoding.free_decode._cache_size() == before


@pytest.mark.parametrize("mode", ["default", pytest.param("exact", marks=pytest.mark.slow)])
def test_another_batch_of_the_same_shape_does_not_recompile(model, batch, mode):
    """Other tokens, other row lengths, another threshold: the same compiled loop."""
    _free(model, batch, 0.5, mode=mode)
    before = decoding.free_decode._cache_size()
    ids, mask = batch
    other_ids = testing.random_ids(ids.shape, seed=21)
    for lengths, threshold in (([3, 11, 6, 9], 0.4), ([11, 11, 11, 11], 0.8)):
        other_mask = (np.arange(ids.shape[1])[None, :] < np.array(lengths)[:, None]).astype(
            np.int32
        )
        _free(model, (np.where(other_mask == 1, other_ids, 0), other_mask), threshold, mode=mode)
    assert decoding.free_decode._cache_size() == before


def test_agreement_data_covers_what_deep_passes_saw(model, batch):
    ids, mask = batch
    threshold = testing.threshold_between(_confidences(model, batch), 0.5)
    lean = _free(model, batch, threshold, buffer_capacity=4)
    out = _free(model, batch, threshold, buffer_capacity=4, record_agreement=True)
    np.testing.assert_array_equal(lean.tokens, out.tokens)  # bookkeeping only
    assert ((lean.agree >= 0) == (~lean.exited & (lean.exit_layer > 0))).all()
    assert out.deep_pass_tokens.shape == (out.num_deep_passes,)
    assert out.deep_pass_tokens.sum() == (out.agree >= 0).sum()
    # Rows per pass: each row that takes part brings its pending tokens and its current one.
    assert out.deep_pass_rows.shape == (out.num_deep_passes,)
    assert ((out.deep_pass_rows >= 1) & (out.deep_pass_rows <= len(ids))).all()
    assert (out.deep_pass_rows <= out.deep_pass_tokens).all()
    assert out.deep_pass_rows.sum() == (~out.exited & (out.exit_layer > 0)).sum()
    # Agreement is the shallow argmax against the deep one, under teacher forcing.
    dec = np.concatenate([np.zeros((4, 1), np.int32), out.tokens[:, :-1]], axis=1)
    deep = np.asarray(free_jax.forward(model, ids, dec, attention_mask=mask)).argmax(-1)
    shallow = np.asarray(
        free_jax.forward(model, ids, dec, attention_mask=mask, exit_layer=LS)
    ).argmax(-1)
    seen = out.agree >= 0
    assert seen.sum() > (~out.exited & (out.exit_layer > 0)).sum()  # pending tokens included
    np.testing.assert_array_equal(out.agree[seen], (deep == shallow)[seen])


# ---------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def small():
    return testing.tiny_model("v1.1", seed=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(exit_layer=0), r"exit_layer must be an integer in \[1, 3\], got 0"),
        (dict(exit_layer=4), r"exit_layer must be an integer in \[1, 3\], got 4"),
        (dict(threshold=float("nan")), r"threshold=nan is invalid"),
        (dict(threshold=1.5), r"threshold=1.5 is invalid .* in \[0, 1\]"),
        (dict(threshold=-0.1), r"threshold=-0.1\d* is invalid"),
        (dict(threshold="high"), r"threshold='high': pass a number, a float32 array, or a "),
        (dict(threshold=object()), r"threshold must be a number, got <object"),
        (dict(threshold=[0.1, 0.2]), r"threshold must be a scalar"),
        (dict(buffer_capacity=0), r"buffer_capacity must be an integer >= 1, got 0"),
        (dict(confidence="entropy"), r"confidence='entropy' is not known; valid: \("),
        (dict(confidence="meta"), r"confidence=.meta. needs a model with a trained exit"),
        (dict(mode="speculative"), r"mode='speculative' is not known; valid modes: \('default'"),
        (dict(shallow_head="int4"), r"shallow_head='int4' is not known; valid: \(None, 'int8-d"),
        (
            dict(mode="rollback", rollback_margin=1.5),
            r"rollback_margin must be a number in \[0, 1\]",
        ),
    ],
)
def test_bad_free_arguments_raise_clear_errors(small, kwargs, message):
    with pytest.raises(InputError, match=message):
        free_jax.decode(small, np.array([[5, 6, 7]]), method="free", max_new_tokens=3, **kwargs)


def test_static_exit_layer_range(small):
    with pytest.raises(InputError, match=r"exit_layer must be an integer in \[1, 4\], got 5"):
        free_jax.decode(small, np.array([[5, 6]]), method="static", exit_layer=5)
    with pytest.raises(InputError, match=r"method='beam' is not known; valid methods: \('full'"):
        free_jax.decode(small, np.array([[5, 6]]), method="beam")


def test_adaptive_threshold_estimator_updates_without_recompiling(model, batch):
    """An estimator as `threshold`: each row becomes one input, the estimator refits, and the
    next call runs the already compiled loop with the new threshold."""
    from free_jax.threshold import ThresholdConfig, ThresholdEstimator

    ids, mask = batch
    estimator = ThresholdEstimator(ThresholdConfig(initial=0.3, low=0.05, high=0.9, min_points=5))
    used, compiled = [], []
    for _ in range(3):
        used.append(float(estimator.threshold))
        free_jax.decode(
            model,
            ids,
            attention_mask=mask,
            method="free",
            exit_layer=LS,
            threshold=estimator,
            max_new_tokens=T,
        )
        compiled.append(decoding.free_decode._cache_size())
    assert estimator.num_inputs == 3 * ids.shape[0] and estimator.num_points > 0
    assert estimator.refits[-1].num_points == estimator.num_points
    assert used[0] == pytest.approx(0.3) and used[1] != used[0], "the threshold moved"
    assert compiled[1] == compiled[2] == compiled[0]  # no recompilation for a new threshold


def test_adaptive_threshold_rejects_unbounded_confidence(model, batch):
    from free_jax.threshold import ThresholdEstimator

    with pytest.raises(InputError, match="confidence='state_cosine' is not one"):
        _free(model, batch, ThresholdEstimator(), confidence="state_cosine")


@pytest.mark.slow  # the rollback rules are tested on scripted steps in test_spd.py
def test_rollback_mode_on_a_model(model, batch):
    """Margin 1 never rolls back (the default mode); margin 0 leaves no checked disagreement."""
    threshold = testing.threshold_between(_confidences(model, batch), 0.4)
    default = _free(model, batch, threshold, buffer_capacity=4)
    loose = _free(model, batch, threshold, buffer_capacity=4, mode="rollback", rollback_margin=1.0)
    np.testing.assert_array_equal(loose.tokens, default.tokens)
    strict = _free(model, batch, threshold, buffer_capacity=4, mode="rollback", rollback_margin=0.0)
    # Every token a deep pass saw now agrees with the deep model, except tokens the pass
    # itself replaced (they are deep tokens, recorded as the shallow draft's disagreement).
    seen = strict.agree >= 0
    assert seen.any()
    kept_exits = seen & strict.exited
    assert (strict.agree[kept_exits] == 1).all()


# Slow: the waiting rules are checked on scripted models in test_spd, and draft waiting on a
# model by test_bench.
@pytest.mark.slow
def test_waiting_rows_on_a_model(model, batch):
    threshold = testing.threshold_between(_confidences(model, batch), 0.5)
    eager = _free(model, batch, threshold, buffer_capacity=4)
    patient = _free(model, batch, threshold, buffer_capacity=4, max_wait=3)
    np.testing.assert_array_equal(patient.tokens, eager.tokens)
    np.testing.assert_array_equal(patient.exited, eager.exited)
    assert patient.num_deep_passes <= eager.num_deep_passes
    drafting = _free(model, batch, threshold, buffer_capacity=4, max_wait=3, wait_mode="draft")
    np.testing.assert_array_equal(drafting.tokens, eager.tokens)
    np.testing.assert_array_equal(drafting.exited, eager.exited)


def test_bad_waiting_settings_are_named(model, batch):
    threshold = 0.5
    with pytest.raises(InputError, match=r"wait_mode='sleep' is not known; valid: \('hold'"):
        _free(model, batch, threshold, max_wait=1, wait_mode="sleep")
    with pytest.raises(InputError, match=r"wait_mode='draft' works with mode='default' or"):
        _free(model, batch, threshold, max_wait=1, wait_mode="draft", mode="rollback")
    with pytest.raises(InputError, match=r"max_wait must be an integer >= 0, got -1"):
        _free(model, batch, threshold, max_wait=-1)


def test_oracle_labels_each_full_token_with_its_shallowest_correct_exit(model, batch):
    ids, mask = batch
    full = free_jax.decode(model, ids, attention_mask=mask, max_new_tokens=T)
    oracle = free_jax.decode(model, ids, attention_mask=mask, method="oracle", max_new_tokens=T)
    np.testing.assert_array_equal(oracle.tokens, full.tokens)
    L = model.config.num_decoder_layers
    dec = np.concatenate([np.zeros((4, 1), np.int32), full.tokens[:, :-1]], axis=1)
    preds = np.stack(
        [
            np.asarray(free_jax.forward(model, ids, dec, attention_mask=mask, exit_layer=k)).argmax(
                -1
            )
            for k in range(1, L + 1)
        ]
    )  # [L, B, T]
    for b, n in enumerate(full.lengths):
        for t in range(n):
            k = oracle.exit_layer[b, t]
            assert preds[k - 1, b, t] == full.tokens[b, t]
            assert k == 1 or (preds[: k - 1, b, t] != full.tokens[b, t]).all()
        assert (oracle.exited[b, :n] == (oracle.exit_layer[b, :n] < L)).all()
    assert 0 < oracle.exit_rate < 1  # the tiny model exits early sometimes, not always


def test_the_checkpoints_free_settings_are_decodes_defaults(model, batch):
    """metadata["free"] (what training exports) sets exit layer, threshold and buffer size."""
    ids, mask = batch
    saved = {"exit_layer": LS, "threshold": 0.0, "buffer_capacity": 2}
    tagged = free_jax.Model(config=model.config, params=model.params, metadata={"free": saved})
    by_default = free_jax.decode(tagged, ids, attention_mask=mask, method="free", max_new_tokens=T)
    explicit = _free(model, batch, 0.0, buffer_capacity=2)
    np.testing.assert_array_equal(by_default.tokens, explicit.tokens)
    assert by_default.num_deep_passes == explicit.num_deep_passes
    # Threshold 0 exits every token a full buffer allows: with K = 2, every third one goes deep.
    assert by_default.num_deep_passes == -(-(T - 2) // 3)
    # An argument overrides the saved value (the threshold: no other program to compile).
    never = free_jax.decode(
        tagged, ids, attention_mask=mask, method="free", max_new_tokens=T, threshold=1.0
    )
    assert never.exit_rate == 0.0 and never.num_deep_passes > by_default.num_deep_passes


def test_an_unbounded_buffer_forces_no_deep_pass(model, batch):
    """By default (no bound) rows that always exit never take a deep pass, as in the paper, and
    emit the static exit's tokens; a bound K forces a pass at every (K+1)-th token."""
    ids, mask = batch
    unbounded = _free(model, batch, 0.0, min_new_tokens=T)
    assert unbounded.num_deep_passes == 0 and unbounded.exit_rate == 1.0
    static = free_jax.decode(
        model,
        ids,
        attention_mask=mask,
        method="static",
        exit_layer=LS,
        max_new_tokens=T,
        min_new_tokens=T,
    )
    np.testing.assert_array_equal(unbounded.tokens, static.tokens)
    # K = 4: positions 0-3 exit, 4 is forced deep (a pass over 5 positions per row), 5-8 exit,
    # 9 is forced deep, 10-11 exit.
    bounded = _free(model, batch, 0.0, min_new_tokens=T, buffer_capacity=4)
    assert bounded.num_deep_passes == 2
    np.testing.assert_array_equal(bounded.deep_pass_tokens, [5 * len(ids)] * 2)
    np.testing.assert_array_equal(bounded.deep_pass_rows, [len(ids)] * 2)  # in lockstep
    np.testing.assert_array_equal(bounded.exited.sum(axis=1), [T - 2] * len(ids))


def test_deep_passes_update_the_pending_buffers_in_place(model, batch):
    """The compiled default-mode loop makes no copy of the pending buffers [B, S, D]: every
    row queues its current state before a pass reads the buffers as its queries, so XLA updates
    them in place (queued after the read, the buffers were copied twice for every pass, and
    once more as the queries)."""
    ids, mask = batch
    config, K = model.config, 5
    encoded = decoding.encode_source(model.params, ids, mask, config=config, length=16)
    program = decoding.free_decode.lower(
        model.params,
        *encoded,
        jnp.float32(0.5),
        config=config,
        exit_layer=LS,
        max_new_tokens=T,
        buffer_capacity=K,
    )
    text = program.compile().as_text()
    # S = K + 1 slots: the pass of at most K + 1 positions runs in one call (no windows).
    buffers = f"f32[{len(ids)},{K + 1},{config.d_model}]"
    assert buffers in text  # the buffers' shape, as the compiled program spells it
    assert re.findall(r"= (f32\[[\d,]+\])\{[\d,]*\} copy\(", text).count(buffers) == 0


def test_the_deep_cross_attention_is_computed_at_the_first_deep_pass_only(model, batch):
    """The deep blocks' cross-attention K/V are filled by the first deep pass: an input whose
    every token exits never computes them; one with deep passes gets the encoder's values."""
    ids, mask = batch
    config = model.config
    encoded = decoding.encode_source(model.params, ids, mask, config=config, length=16)
    kw = dict(config=config, exit_layer=LS, max_new_tokens=T, buffer_capacity=T, keep_cache=True)
    lazy = decoding.free_decode(model.params, *encoded, jnp.float32(0.0), **kw)
    assert int(lazy.num_deep_passes) == 0
    expected = np.arange(config.num_decoder_layers) < LS
    np.testing.assert_array_equal(lazy.cache.cross_ready, expected)
    for i in range(config.num_decoder_layers):
        assert bool(jnp.any(lazy.cache.cross_k[i] != 0)) == expected[i]
    deep = decoding.free_decode(model.params, *encoded, jnp.float32(1.0), **kw)
    assert int(deep.num_deep_passes) > 0 and bool(jnp.all(deep.cache.cross_ready))
    full = t5.init_decoder_cache(model.params, config, encoded[0], encoded[1], T)
    got_kv, want_kv = deep.cache.cross_k + deep.cache.cross_v, full.cross_k + full.cross_v
    for got, want in zip(got_kv, want_kv, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_the_int8_exit_head_first_made_inside_a_trace_is_concrete():
    """`free-jax bench` measures a program's memory by tracing a method's `run`, which is where
    the int8 head is first asked for: it must be made eagerly, not cached as a tracer."""
    model = testing.tiny_model("v1.0", seed=5)
    jax.jit(lambda x: x + model.int8_exit_head.q.sum())(1)
    head = model.int8_exit_head
    assert not isinstance(head.q, jax.core.Tracer) and head.q.dtype == jnp.int8
    np.testing.assert_array_equal(
        head.q, free_jax.models.quantize.quantize_kernel(model.decode_params["lm_head"]).q
    )


def test_an_int8_shallow_head_is_refused_on_a_mesh(small):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    with pytest.raises(InputError, match=r"shallow_head='int8-dynamic' does not work with mesh"):
        free_jax.decode(
            small, np.array([[5, 6, 7]]), method="free", shallow_head="int8-dynamic", mesh=mesh
        )
