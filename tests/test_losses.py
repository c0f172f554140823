"""FREE's training losses against independent NumPy implementations, on random states."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from free_jax import testing
from free_jax.errors import ConfigError
from free_jax.models import exit_classifier, t5
from free_jax.training import losses

B, T, D, V = 3, 5, 8, 11


def _rng(seed):
    return np.random.default_rng(seed)


def _mask(seed, *, empty_row=True):
    mask = (_rng(seed).random((B, T)) < 0.7).astype(np.float32)
    mask[0, 0] = 1.0
    if empty_row:
        mask[-1] = 0.0  # a row that is all padding
    return mask


# ---------------------------------------------------------------------------- NumPy references


def np_ce_tokens(logits, labels):
    logits = np.asarray(logits, np.float64)
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, labels[..., None], -1)[..., 0]


def np_masked_mean(values, mask):
    return float((values * mask).sum() / max(mask.sum(), 1.0))


def np_ce(logits, labels, mask):
    return np_masked_mean(np_ce_tokens(logits, labels), mask)


def np_mse(a, b, mask):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    per_token = ((a - b) ** 2).mean(-1)
    return np_masked_mean(per_token, mask)


def np_greedy_mapping(costs):
    """Direct transcription of the rule: last teacher first, lowest cost strictly below."""
    n_t, n_s = costs.shape
    previous, picks = n_s, []
    for t in range(n_t - 1, -1, -1):
        order = [s for s in np.argsort(costs[t], kind="stable") if s < previous]
        if order:
            previous = int(order[0])
        picks.append(previous)
    return np.array(picks[::-1])


def np_rms_norm(x, scale, eps):
    x = np.asarray(x, np.float64)
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * np.asarray(scale, np.float64)


# ---------------------------------------------------------------------------- cross-entropy


def test_cross_entropy_is_the_masked_token_mean():
    rng = _rng(0)
    logits = rng.normal(size=(B, T, V)).astype(np.float32) * 3
    labels = rng.integers(0, V, (B, T))
    mask = _mask(1)
    got = losses.cross_entropy(logits, labels, mask)
    np.testing.assert_allclose(got, np_ce(logits, labels, mask), rtol=1e-6)
    # Padding positions do not count, whatever their logits.
    noisy = np.where(mask[..., None] == 0, rng.normal(size=logits.shape) * 100, logits)
    np.testing.assert_allclose(losses.cross_entropy(noisy, labels, mask), got, rtol=1e-6)
    assert float(losses.cross_entropy(logits, labels, np.zeros((B, T)))) == 0.0


def test_shallowdeep_ce_weights_exits_by_depth():
    rng = _rng(2)
    shallow, deep = (rng.normal(size=(B, T, V)).astype(np.float32) for _ in range(2))
    labels, mask = rng.integers(0, V, (B, T)), _mask(3)
    loss, ce_s, ce_d = losses.shallowdeep_ce(
        shallow, deep, labels, mask, exit_layer=6, num_layers=24
    )
    want_s, want_d = np_ce(shallow, labels, mask), np_ce(deep, labels, mask)
    np.testing.assert_allclose([ce_s, ce_d], [want_s, want_d], rtol=1e-6)
    np.testing.assert_allclose(loss, 0.2 * want_s + 0.8 * want_d, rtol=1e-6)


def test_weighted_ce_is_calms_depth_weighting():
    ces = [0.5, 2.0, 1.0, 4.0]
    want = (1 * 0.5 + 2 * 2.0 + 3 * 1.0 + 4 * 4.0) / 10
    np.testing.assert_allclose(losses.weighted_ce([jnp.float32(c) for c in ces]), want, rtol=1e-6)


# ---------------------------------------------------------------------------- distillation


@pytest.mark.parametrize(
    "exit_layer, num_layers, blocks",
    [
        (6, 24, [4, 8, 12, 16, 20, 24]),  # the paper's T5-large setting
        (8, 24, [3, 6, 9, 12, 15, 18, 21, 24]),
        (4, 24, [6, 12, 18, 24]),
        (3, 12, [4, 8, 12]),  # LongT5-base
        (2, 4, [2, 4]),
        (4, 4, [1, 2, 3, 4]),
        (1, 5, [5]),
    ],
)
def test_teacher_layers_are_evenly_spaced_and_end_with_the_last(exit_layer, num_layers, blocks):
    assert losses.teacher_layers(exit_layer, num_layers) == tuple(b - 1 for b in blocks)


def test_teacher_layers_rejects_a_shallow_exit_outside_the_decoder():
    with pytest.raises(ConfigError, match="exit_layer=5 must be in"):
        losses.teacher_layers(5, 4)


def _states(n, seed, scale=1.0):
    rng = _rng(seed)
    return [(rng.normal(size=(B, T, D)) * scale).astype(np.float32) for _ in range(n)]


def test_mse_cost_matrix_counts_real_tokens_only():
    teachers, students, mask = _states(3, 4), _states(4, 5), _mask(6)
    got = np.asarray(losses.mse_cost_matrix(teachers, students, mask))
    want = np.array([[np_mse(t, s, mask) for s in students] for t in teachers])
    assert got.shape == (3, 4)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # Anything at padded positions is ignored.
    moved = [np.where(mask[..., None] == 0, 1e3, s) for s in students]
    np.testing.assert_allclose(losses.mse_cost_matrix(teachers, moved, mask), got, rtol=1e-6)
    # A student identical to its teacher costs exactly zero.
    assert float(losses.mse_cost_matrix(teachers, [teachers[1]], mask)[1, 0]) == 0.0


_jit_mapping = jax.jit(losses.dynamic_layer_mapping)


@settings(max_examples=80, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=6),
        elements=st.floats(0, 10, width=32, allow_subnormal=False),  # XLA flushes subnormals
    )
)
def test_dynamic_mapping_is_the_greedy_rule_and_monotone(costs):
    n_t, n_s = costs.shape
    mapping = np.asarray(_jit_mapping(costs))
    np.testing.assert_array_equal(mapping, np_greedy_mapping(costs))
    assert mapping.dtype == np.int32 and mapping.shape == (n_t,)
    assert ((0 <= mapping) & (mapping < n_s)).all()
    assert (np.diff(mapping) >= 0).all(), "the mapping must be monotone"
    positive = mapping[mapping > 0]
    assert (np.diff(positive) > 0).all(), "picks above student 0 are strictly increasing"
    # The last teacher takes its globally cheapest student.
    assert costs[-1, mapping[-1]] == costs[-1].min()


def test_dynamic_mapping_on_a_hand_made_matrix():
    costs = np.array(
        [
            [0.1, 0.9, 0.9],  # teacher 0: would like student 0
            [0.9, 0.9, 0.1],  # teacher 1: would like student 2, but teacher 2 took it
            [0.5, 0.9, 0.0],  # teacher 2: takes student 2
        ],
        np.float32,
    )
    # teacher 2 -> 2; teacher 1: cheapest below 2 is student 1 (0.9) vs 0 (0.9): lowest index;
    # teacher 0: nothing below 0, keeps 0.
    np.testing.assert_array_equal(losses.dynamic_layer_mapping(costs), [0, 0, 2])
    costs[1, 1] = 0.2
    np.testing.assert_array_equal(losses.dynamic_layer_mapping(costs), [0, 1, 2])


def test_kd_dyna_kd_unif_kd_last_against_numpy():
    teachers, students, mask = _states(4, 7), _states(4, 8, scale=1.3), _mask(9)
    costs = np.array([[np_mse(t, s, mask) for s in students] for t in teachers])
    mapping = np_greedy_mapping(costs)
    loss, got_mapping = losses.kd_dyna(teachers, students, mask)
    np.testing.assert_array_equal(got_mapping, mapping)
    np.testing.assert_allclose(loss, costs[np.arange(4), mapping].mean(), rtol=1e-5)
    np.testing.assert_allclose(
        losses.kd_unif(teachers, students, mask), np.diag(costs).mean(), rtol=1e-5
    )
    np.testing.assert_allclose(
        losses.kd_last(teachers[-1], students[-1], mask), costs[-1, -1], rtol=1e-5
    )


def test_kd_dyna_gradient_flows_to_students_only():
    teachers, students, mask = _states(2, 10), _states(2, 11), _mask(12, empty_row=False)

    def f(t, s):
        return losses.kd_dyna(t, s, mask)[0]

    g_t, g_s = jax.grad(f, argnums=(0, 1))(teachers, students)
    assert all(np.abs(np.asarray(g)).sum() > 0 for g in g_t)  # kd_dyna itself does not stop
    # ... but the mapping is constant, so the gradient is that of the matched costs.
    mapping = np.asarray(losses.kd_dyna(teachers, students, mask)[1])
    for j, g in enumerate(g_s):
        matched = [t for t in range(2) if mapping[t] == j]
        if not matched:
            assert np.abs(np.asarray(g)).sum() == 0
        else:
            assert np.abs(np.asarray(g)[mask == 0]).sum() == 0  # padding gets no gradient


# ---------------------------------------------------------------------------- exit classifier


def np_meta_loss(classifier, normed, shallow, deep, mask, balance):
    c = jax.tree.map(lambda x: np.asarray(x, np.float64), classifier)
    h = np.maximum(normed @ c["hidden"]["kernel"] + c["hidden"]["bias"], 0)
    logits = h @ c["out"]["kernel"] + c["out"]["bias"]
    labels = (shallow.argmax(-1) == deep.argmax(-1)).astype(int)
    pos = np.clip((labels * mask).sum() / max(mask.sum(), 1), 1e-6, 1 - 1e-6)
    prior = np.array([1 - pos, pos])
    if balance == "logit_adjust":
        return np_ce(logits + np.log(prior), labels, mask)
    ce = np_ce_tokens(logits, labels)
    if balance == "reweight":
        return float((ce * 0.5 / prior[labels] * mask).sum() / max(mask.sum(), 1))
    return np_masked_mean(ce, mask)


@pytest.mark.parametrize("balance", losses.BALANCE_MODES)
def test_meta_classifier_loss_against_numpy(balance):
    rng = _rng(13)
    config = testing.tiny_config(d_model=D)
    classifier = exit_classifier.init_exit_classifier(config, jax.random.key(1))
    normed = rng.normal(size=(B, T, D)).astype(np.float32)
    # Few logits so that the exits agree on some tokens and not on others.
    shallow, deep = (rng.normal(size=(B, T, 3)).astype(np.float32) for _ in range(2))
    mask = _mask(14)
    loss, aux = losses.meta_classifier_loss(
        classifier, normed, shallow, deep, mask, balance=balance
    )
    want = np_meta_loss(classifier, normed, shallow, deep, mask, balance)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    labels = shallow.argmax(-1) == deep.argmax(-1)
    np.testing.assert_allclose(aux["meta_positive_rate"], np_masked_mean(labels, mask), rtol=1e-6)
    assert 0 < float(aux["meta_positive_rate"]) < 1


def test_meta_classifier_loss_rejects_an_unknown_balance():
    config = testing.tiny_config(d_model=D)
    classifier = exit_classifier.init_exit_classifier(config, jax.random.key(1))
    x = np.zeros((B, T, D), np.float32)
    with pytest.raises(ConfigError, match="balance='focal' is not known"):
        losses.meta_classifier_loss(classifier, x, x, x, _mask(0), balance="focal")


# ---------------------------------------------------------------------------- objectives


KD_VARIANTS = ("dyna", "last", "unif", None)


@pytest.fixture(scope="module")
def tiny():
    # v1.0: the tied, rescaled head; one encoder block keeps compile times down.
    model = testing.tiny_model("v1.0", seed=3, num_layers=1, num_decoder_layers=6)
    batch = testing.toy_batch("reverse", 0, batch_size=3, source_length=9, target_length=8)
    return model, batch


def _np_exit(params, config, state):
    """Final norm, v1.0 rescale and head, in NumPy."""
    normed = np_rms_norm(state, params["decoder"]["final_norm"], config.layer_norm_epsilon)
    h = normed * (config.d_model**-0.5 if config.scale_decoder_outputs else 1.0)
    head = np.asarray(params["shared"]["embedding"], np.float64).T
    return normed, h @ head


def _block_states(model, batch):
    return t5.forward(
        model.params,
        model.config,
        batch["input_ids"],
        batch["decoder_input_ids"],
        batch["attention_mask"],
        return_block_states=True,
    ).block_states


def test_free_objective_composes_the_losses(tiny):
    model, batch = tiny
    config, params = model.config, model.params
    L, ls, alpha = 6, 3, 0.7

    @jax.jit
    def objectives(p, b):  # one compile for every variant; the forward pass is shared
        return [
            losses.free_objective(p, config, b, exit_layer=ls, kd=kd, alpha=alpha)
            for kd in KD_VARIANTS
        ]

    results = objectives(params, batch)
    exits = [_np_exit(params, config, s) for s in _block_states(model, batch)]
    labels, mask = batch["labels"], batch["loss_mask"]
    ce_s, ce_d = np_ce(exits[ls - 1][1], labels, mask), np_ce(exits[L - 1][1], labels, mask)
    ce = (ls * ce_s + L * ce_d) / (ls + L)
    normed = [e[0] for e in exits]
    teachers = [normed[i] for i in (1, 3, 5)]  # blocks 2, 4, 6 of 6 for L_s = 3
    costs = np.array([[np_mse(t, normed[s], mask) for s in range(ls)] for t in teachers])
    assert costs[0, 1] == 0.0  # block 2 is both the first teacher and the second student
    dyna = np_greedy_mapping(costs)
    want = {
        "dyna": (costs[np.arange(ls), dyna].mean(), dyna),
        "unif": (np.diag(costs).mean(), np.arange(ls)),
        "last": (np_mse(normed[L - 1], normed[ls - 1], mask), np.array([-1, -1, ls - 1])),
        None: (0.0, np.full(ls, -1)),
    }
    agree = exits[ls - 1][1].argmax(-1) == exits[L - 1][1].argmax(-1)
    for kd, (loss, aux) in zip(KD_VARIANTS, results, strict=True):
        kd_value, mapping = want[kd]
        np.testing.assert_allclose(aux["ce_shallow"], ce_s, rtol=1e-5)
        np.testing.assert_allclose(aux["ce_deep"], ce_d, rtol=1e-5)
        np.testing.assert_allclose(aux["kd"], kd_value, rtol=1e-5, atol=1e-7, err_msg=str(kd))
        np.testing.assert_allclose(loss, ce + alpha * kd_value, rtol=1e-5, err_msg=str(kd))
        np.testing.assert_array_equal(aux["kd_mapping"], mapping, err_msg=str(kd))
        np.testing.assert_allclose(aux["agreement"], np_masked_mean(agree, mask), rtol=1e-6)
        assert float(aux["tokens"]) == mask.sum()


def test_free_objective_distillation_never_trains_the_deep_blocks(tiny):
    """Teachers are gradient-stopped: blocks past the shallow exit get no KD gradient."""
    model, batch = tiny
    ls = 3

    def kd_only(p):
        return losses.free_objective(p, model.config, batch, exit_layer=ls, kd="dyna")[1]["kd"]

    grads = jax.jit(jax.grad(kd_only))(model.params)
    blocks = grads["decoder"]["blocks"]
    deep = jax.tree.leaves(blocks[ls:])
    assert all(float(jnp.abs(g).max()) == 0.0 for g in deep)
    assert any(float(jnp.abs(g).max()) > 0.0 for g in jax.tree.leaves(blocks[:ls]))


def test_free_objective_bfloat16_compute_is_close_and_keeps_float32_gradients(tiny):
    model, batch = tiny

    def loss(p, dtype):
        return losses.free_objective(p, model.config, batch, exit_layer=3, compute_dtype=dtype)[0]

    loss32, loss16 = jax.jit(lambda p: (loss(p, None), loss(p, jnp.bfloat16)))(model.params)
    np.testing.assert_allclose(loss16, loss32, rtol=2e-2)
    grads = jax.eval_shape(jax.grad(functools.partial(loss, dtype=jnp.bfloat16)), model.params)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


def test_calm_objective_weights_every_exit(tiny):
    model, batch = tiny
    config, params = model.config, model.params
    loss, aux = jax.jit(functools.partial(losses.calm_objective, config=config))(
        params, batch=batch
    )
    states = t5.forward(
        params,
        config,
        batch["input_ids"],
        batch["decoder_input_ids"],
        batch["attention_mask"],
        return_block_states=True,
    ).block_states
    ces = [
        np_ce(_np_exit(params, config, s)[1], batch["labels"], batch["loss_mask"]) for s in states
    ]
    want = sum((i + 1) * c for i, c in enumerate(ces)) / sum(range(1, 7))
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose([aux["ce_shallow"], aux["ce_deep"]], [ces[0], ces[-1]], rtol=1e-5)


def test_meta_objective_trains_the_classifier_only(tiny):
    model, batch = tiny
    params = dict(model.params)
    params["exit_classifier"] = exit_classifier.init_exit_classifier(
        model.config, jax.random.key(2)
    )
    loss, grads = jax.jit(
        jax.value_and_grad(lambda p: losses.meta_objective(p, model.config, batch, exit_layer=2)[0])
    )(params)
    assert np.isfinite(float(loss))
    head = grads.pop("exit_classifier")
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))
    assert any(float(jnp.abs(g).max()) > 0.0 for g in jax.tree.leaves(head))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(exit_layer=6), r"exit_layer=6 must be an int in \[1, 5\]"),
        (dict(exit_layer=0), r"exit_layer=0 must be an int in \[1, 5\]"),
        (dict(exit_layer=2, kd="best"), r"kd='best' is not known"),
    ],
)
def test_free_objective_rejects_bad_settings(tiny, kwargs, message):
    model, batch = tiny
    with pytest.raises(ConfigError, match=message):
        losses.free_objective(model.params, model.config, batch, **kwargs)


def test_meta_objective_without_a_classifier_says_how_to_add_one(tiny):
    model, batch = tiny
    with pytest.raises(ConfigError, match="init_exit_classifier"):
        losses.meta_objective(model.params, model.config, batch, exit_layer=2)
