"""Tests of FREE's adaptive threshold estimator (free_jax/threshold.py).

Ground truth comes from NumPy only: data drawn from known Beta mixtures, true posteriors written
with math.lgamma, and an independent loop implementation of the reference procedure. Statistical
tolerances are about three standard deviations of the estimator at the stated sample size (measured
over 20 seeds when they were chosen) and are fixed per check, not tuned to a seed.

Compile time dominates this file's runtime, so data sizes are chosen to share padding buckets: small
sets fit in the 1024-point bucket, recovery sets have 20,000 points (bucket 32,768).
"""

from __future__ import annotations

import json
import math
import warnings

import chex
import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from free_jax.cli.fit_threshold import main as cli_main
from free_jax.errors import ConfigError, InputError
from free_jax.threshold import (
    BetaMixture,
    FitStatus,
    FitWarning,
    ThresholdConfig,
    ThresholdEstimator,
    fit_from_file,
    load_agreement_data,
    plot_mixture,
    plot_trajectory,
)

N_RECOVERY = 20_000


# -------------------------------------------------------------------------------------------------
# NumPy ground truth.


def beta_logpdf(x: np.ndarray, a: float, b: float) -> np.ndarray:
    log_norm = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    return (a - 1) * np.log(x) + (b - 1) * np.log1p(-x) - log_norm


def true_posterior(x: np.ndarray, w_agree: float, disagree, agree) -> np.ndarray:
    """P(agree | x) of the mixture (1 - w) Beta(*disagree) + w Beta(*agree), in float64."""
    log_odds = (
        math.log(w_agree) + beta_logpdf(x, *agree) - math.log(1 - w_agree)
        - beta_logpdf(x, *disagree)
    )  # fmt: skip
    return 1 / (1 + np.exp(-log_odds))


def true_crossing(w_agree: float, disagree, agree, zeta=0.4, low=0.3, high=0.9) -> float:
    """Smallest x in [low, high] with posterior > zeta, on a grid of spacing 1e-6."""
    grid = np.linspace(low, high, 600_001)
    above = true_posterior(grid, w_agree, disagree, agree) > zeta
    assert above.any(), "test mixtures are chosen to cross"
    return float(grid[np.argmax(above)])


def draw(rng: np.random.Generator, n: int, w_agree: float, disagree, agree):
    """n points from the mixture; returns confidence float64[n], agree bool[n]."""
    labels = rng.uniform(size=n) < w_agree
    conf = np.where(labels, rng.beta(*agree, size=n), rng.beta(*disagree, size=n))
    return conf, labels


def reference_threshold_numpy(conf, agree, zeta=0.4, low=0.3, high=0.9, initial=0.9):
    """The authors' procedure, written independently with plain loops.

    Hard label responsibilities, equal weights, method of moments per class, the agree component is
    the one with the larger mean, and the threshold is the first of 10 grid points where its
    posterior exceeds zeta (else the initial threshold).
    """
    x = [min(max(float(c), 1e-4), 1 - 1e-4) for c in conf]
    params = []
    for label in (False, True):
        values = [c for c, a in zip(x, agree, strict=True) if bool(a) == label]
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / len(values)
        alpha = mean * (mean * (1 - mean) / var - 1)
        params.append((alpha, alpha * (1 - mean) / mean))
    means = [a / (a + b) for a, b in params]
    agree_idx = 1 if means[1] > means[0] else 0
    for c in np.linspace(low, high, 10):
        dens = [math.exp(beta_logpdf(np.float64(c), a, b)) for a, b in params]
        if dens[agree_idx] / (dens[0] + dens[1]) > zeta:
            return float(c), params
    return initial, params


# Mixtures: (weight of agree, disagree (alpha, beta), agree (alpha, beta)).
SEPARATED = ((2.0, 8.0), (12.0, 1.5))
MIXTURES = {
    "balanced": (0.5, *SEPARATED),
    "agree95": (0.95, *SEPARATED),
    "agree05": (0.05, *SEPARATED),
    "overlap30_70": (0.7, (1.5, 3.0), (5.0, 2.0)),
}


# -------------------------------------------------------------------------------------------------
# Parameter recovery and the threshold against the true crossing.


def _check_recovery(mixture: BetaMixture, w_agree, disagree, agree, *, mean_rtol, param_rtol):
    chex.assert_trees_all_equal_shapes_and_dtypes(
        mixture, BetaMixture.create([0.5, 0.5], [1, 1], [1, 1])
    )
    true_w = np.array([1 - w_agree, w_agree])
    true_a = np.array([disagree[0], agree[0]])
    true_b = np.array([disagree[1], agree[1]])
    # Weights: sampling sd at n=20,000 is <= 0.0035.
    np.testing.assert_allclose(mixture.weights, true_w, atol=0.01)
    np.testing.assert_allclose(mixture.means, true_a / (true_a + true_b), rtol=mean_rtol)
    np.testing.assert_allclose(mixture.alpha, true_a, rtol=param_rtol)
    np.testing.assert_allclose(mixture.beta, true_b, rtol=param_rtol)


@pytest.mark.parametrize("name", list(MIXTURES))
def test_supervised_recovery_and_threshold(name):
    """20,000 points; means within 5%, alpha/beta within 20% (the 5% class has only ~1,000 points),
    weights within 0.01, threshold within 0.01 of the true posterior's crossing."""
    w_agree, disagree, agree = MIXTURES[name]
    conf, labels = draw(np.random.default_rng(1), N_RECOVERY, w_agree, disagree, agree)
    result = BetaMixture.fit_with_status(conf, labels)
    assert result.fit_status == FitStatus.OK
    _check_recovery(result.mixture, w_agree, disagree, agree, mean_rtol=0.05, param_rtol=0.2)
    thr = result.mixture.threshold(0.4)
    assert bool(thr.found)
    assert abs(float(thr.value) - true_crossing(w_agree, disagree, agree)) < 0.01


@pytest.mark.parametrize("name", ["balanced", "agree95", "agree05"])
def test_unsupervised_recovery_and_threshold(name):
    """Full EM without labels, same sample size; weights within 0.01, means within 5%, alpha/beta
    within 25%, threshold within 0.02. (Heavily overlapping components are not identifiable without
    labels at this size, so only the separated mixtures are used here.)"""
    w_agree, disagree, agree = MIXTURES[name]
    conf, _ = draw(np.random.default_rng(2), N_RECOVERY, w_agree, disagree, agree)
    result = BetaMixture.fit_with_status(conf)
    assert result.fit_status == FitStatus.OK
    assert bool(result.converged)
    assert 1 <= int(result.num_iters) < 200
    _check_recovery(result.mixture, w_agree, disagree, agree, mean_rtol=0.05, param_rtol=0.25)
    thr = result.mixture.threshold(0.4)
    assert abs(float(thr.value) - true_crossing(w_agree, disagree, agree)) < 0.02


def test_threshold_search_finds_exact_crossing():
    """Given the true parameters, grid search + bisection lands on the crossing to 1e-4."""
    for w_agree, disagree, agree in MIXTURES.values():
        mixture = BetaMixture.create([1 - w_agree, w_agree], [disagree[0], agree[0]],
                                     [disagree[1], agree[1]])  # fmt: skip
        for zeta in (0.2, 0.4, 0.6):
            thr = mixture.threshold(zeta)
            expected = true_crossing(w_agree, disagree, agree, zeta=zeta)
            assert bool(thr.found)
            assert abs(float(thr.value) - expected) < 1e-4, (w_agree, zeta)
            chex.assert_shape(thr.value, ())
            chex.assert_type(thr.value, jnp.float32)


@hypothesis.settings(max_examples=60, deadline=None, derandomize=True)
@hypothesis.given(
    w_agree=st.floats(0.02, 0.98),
    params=st.lists(st.floats(0.3, 60.0), min_size=4, max_size=4),
    zeta=st.floats(0.05, 0.95),
)
def test_threshold_is_first_crossing_of_the_posterior(w_agree, params, zeta):
    """For any mixture: the posterior reaches zeta at the value, and no point of the grid below
    it is above zeta.

    The refined value is the crossing itself to float32 precision, where the posterior equals
    zeta but for its last bits, and those differ between the search's compiled arithmetic and
    this test's own evaluation (XLA may vectorise either differently): so at the value the test
    asks for zeta up to a few ulps."""
    mixture = BetaMixture.create([1 - w_agree, w_agree], params[:2], params[2:])
    thr = mixture.threshold(zeta)
    grid = np.linspace(0.3, 0.9, 241, dtype=np.float32)
    posterior = np.asarray(mixture.posterior(grid))
    value = float(thr.value)
    if bool(thr.found):
        assert 0.3 - 1e-6 <= value <= 0.9 + 1e-6
        ulps = 4 * np.spacing(np.float32(zeta))
        assert float(mixture.posterior(value)) >= zeta - ulps
        assert not np.any(posterior[grid < value - 1e-6] > zeta)
    else:
        assert value == np.float32(0.9) and not np.any(posterior > zeta)


@hypothesis.settings(max_examples=40, deadline=None, derandomize=True)
@hypothesis.given(
    conf=hnp.arrays(
        np.float64,
        st.integers(0, 1000),
        elements=st.one_of(
            st.floats(0.0, 1.0), st.sampled_from([0.0, 1.0, 0.5, np.nan, np.inf, -np.inf])
        ),
    ),
    data=st.data(),
    supervised=st.booleans(),
)
def test_fit_never_produces_nan_or_raises(conf, data, supervised):
    labels = data.draw(hnp.arrays(np.bool_, conf.shape)) if supervised else None
    previous = BetaMixture.create([0.3, 0.7], [2.0, 6.0], [5.0, 2.0])
    result = BetaMixture.fit_with_status(conf, labels, previous=previous)
    chex.assert_tree_all_finite(result)
    chex.assert_tree_all_finite(result.mixture.threshold())
    if not bool(result.ok):
        chex.assert_trees_all_equal(result.mixture, previous)
    else:
        np.testing.assert_allclose(np.sum(result.mixture.weights), 1.0, rtol=1e-5)
        assert float(result.mixture.means[1]) >= float(result.mixture.means[0])


def test_threshold_edges_and_jit():
    mixture = BetaMixture.create([0.5, 0.5], [2.0, 8.0], [8.0, 2.0])
    # Posterior already above zeta at `low`: the crossing is `low` itself.
    np.testing.assert_allclose(mixture.threshold(0.4, low=0.6).value, 0.6, atol=1e-7)
    # Never above zeta: the fallback, and found=False.
    thr = mixture.threshold(0.999999, fallback=0.77)
    assert not bool(thr.found)
    np.testing.assert_allclose(thr.value, 0.77, rtol=1e-7)
    # Jittable with traced zeta: same value as eager.
    jitted = jax.jit(lambda m, z: m.threshold(z).value)
    np.testing.assert_allclose(jitted(mixture, 0.4), mixture.threshold(0.4).value, atol=1e-7)
    # The posterior uses the weights: P(agree | 0.5) = w1 for symmetric components.
    skewed = BetaMixture.create([0.2, 0.8], [2.0, 2.0], [3.0, 3.0])  # two Beta(2, 3)
    np.testing.assert_allclose(skewed.posterior(0.5), 0.8, rtol=1e-5)
    np.testing.assert_allclose(
        skewed.pdf(np.array([0.25, 0.5])),
        np.exp(beta_logpdf(np.array([0.25, 0.5]), 2.0, 3.0)),
        rtol=1e-5,
    )
    with pytest.raises(InputError, match="zeta must be in"):
        mixture.threshold(1.5)
    with pytest.raises(InputError, match="low < high"):
        mixture.threshold(0.4, low=0.8, high=0.2)


def test_components_are_ordered_by_mean():
    """Component 1 is the larger-mean one even when the labels say the opposite."""
    rng = np.random.default_rng(3)
    conf, labels = draw(rng, 900, 0.5, *SEPARATED)
    swapped = BetaMixture.fit(conf, ~labels)
    means = np.asarray(swapped.means)
    assert means[1] > means[0]


def test_mask_and_nonfinite_points_are_ignored():
    rng = np.random.default_rng(4)
    conf, labels = draw(rng, 600, 0.6, *SEPARATED)
    mask = rng.uniform(size=600) < 0.7
    noisy = conf.copy()
    noisy[~mask] = rng.uniform(size=(~mask).sum())
    noisy[np.flatnonzero(~mask)[:5]] = np.nan
    masked = BetaMixture.fit_with_status(noisy, labels, mask=mask)
    subset = BetaMixture.fit_with_status(conf[mask], labels[mask])
    assert int(masked.num_points) == mask.sum()
    chex.assert_trees_all_close(masked.mixture, subset.mixture, rtol=1e-5)
    with_nan = conf.copy()
    with_nan[:7] = np.nan
    nan_fit = BetaMixture.fit_with_status(with_nan, labels)
    assert int(nan_fit.num_points) == 600 - 7
    chex.assert_tree_all_finite(nan_fit)


def test_sizes_in_one_bucket_share_a_compilation():
    from free_jax.threshold.beta_mixture import fit_jit

    rng = np.random.default_rng(5)
    conf, labels = draw(rng, 1000, 0.5, *SEPARATED)
    BetaMixture.fit_with_status(conf[:300], labels[:300])
    before = fit_jit._cache_size()
    for n in (301, 512, 777, 1000):
        BetaMixture.fit_with_status(conf[:n], labels[:n])
    assert fit_jit._cache_size() == before


# -------------------------------------------------------------------------------------------------
# Reference mode against the independent NumPy implementation.

REFERENCE_SETS = {
    # name: (seed, n, weight of agree, disagree, agree)
    "balanced": (10, 800, 0.5, (2.0, 8.0), (12.0, 1.5)),
    "agree95": (11, 900, 0.95, (2.0, 5.0), (8.0, 1.5)),
    "agree05": (12, 1000, 0.05, (2.0, 5.0), (8.0, 1.5)),
    "overlap": (13, 700, 0.6, (2.0, 3.0), (4.0, 2.5)),
    "first_grid_point": (14, 600, 0.5, (1.0, 12.0), (3.0, 1.0)),
    "no_crossing": (15, 600, 0.5, (2.0, 2.0), (200.0, 5.0)),
}


@pytest.mark.parametrize("name", list(REFERENCE_SETS))
def test_reference_mode_matches_numpy_reference(name):
    seed, n, w_agree, disagree, agree = REFERENCE_SETS[name]
    conf, labels = draw(np.random.default_rng(seed), n, w_agree, disagree, agree)
    expected, params = reference_threshold_numpy(conf, labels)
    mixture = BetaMixture.fit(conf, labels, reference=True)
    np.testing.assert_allclose(mixture.weights, [0.5, 0.5])
    # float32 moments against float64 ones.
    ours = sorted(zip(np.asarray(mixture.alpha), np.asarray(mixture.beta), strict=True))
    np.testing.assert_allclose(ours, sorted(params), rtol=2e-4)
    thr = mixture.threshold()  # reference mixture: 10-point grid, no refinement, fallback 0.9
    np.testing.assert_allclose(float(thr.value), expected, atol=1e-6)
    if name == "no_crossing":
        assert not bool(thr.found) and expected == 0.9
    if name == "first_grid_point":
        assert expected == 0.3


def test_reference_estimator_tracks_numpy_reference_per_input():
    """Reference preset: before each new input (up to freeze_after), the threshold equals the numpy
    reference on all data so far; afterwards it is frozen."""
    rng = np.random.default_rng(20)
    est = ThresholdEstimator(ThresholdConfig.reference_preset(freeze_after=25))
    all_conf, all_agree = [], []
    for i in range(40):
        # 14 agreeing and 6 disagreeing tokens per input keep both classes non-degenerate.
        conf = np.concatenate([rng.beta(12, 1.5, 14), rng.beta(2, 5, 6)])
        labels = np.arange(20) < 14
        assert est.update(conf, labels) == (i < 25)
        all_conf.append(conf)
        all_agree.append(labels)
        if i < 25:
            expected, _ = reference_threshold_numpy(np.concatenate(all_conf),
                                                    np.concatenate(all_agree))  # fmt: skip
            np.testing.assert_allclose(float(est.threshold), expected, atol=1e-6)
    assert np.all(est.history[24:] == est.history[24])
    assert est.frozen


# -------------------------------------------------------------------------------------------------
# Degenerate data.

_rng = np.random.default_rng(30)
_spread = _rng.uniform(0.05, 0.95, size=200)
DEGENERATE = {
    # name: (confidence, agree or None, expected status)
    "all_agree": (_spread, np.ones(200, bool), FitStatus.ALL_AGREE),
    "none_agree": (_spread, np.zeros(200, bool), FitStatus.NONE_AGREE),
    "fewer_than_10": (_spread[:7], _spread[:7] > 0.5, FitStatus.TOO_FEW_POINTS),
    "zero_variance_component": (
        np.where(_spread > 0.5, 0.8, _spread),
        _spread > 0.5,
        FitStatus.ZERO_VARIANCE,
    ),
    "single_point_class": (_spread, np.arange(200) > 0, FitStatus.ZERO_VARIANCE),
    "exactly_0_and_1": (np.where(_spread > 0.5, 1.0, 0.0), _spread > 0.5, FitStatus.ZERO_VARIANCE),
    "empty": (np.zeros(0), np.zeros(0, bool), FitStatus.EMPTY),
    "all_nan": (np.full(50, np.nan), np.ones(50, bool), FitStatus.EMPTY),
    "unsupervised_constant": (np.full(100, 0.3), None, FitStatus.ZERO_VARIANCE),
    "unsupervised_all_ones": (np.ones(100), None, FitStatus.ZERO_VARIANCE),
    "unsupervised_empty": (np.zeros(0), None, FitStatus.EMPTY),
}


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        (name, ref)
        for name, v in DEGENERATE.items()
        for ref in (False, True)
        if v[1] is not None or not ref
    ],
)
def test_degenerate_fit_keeps_previous(name, reference):
    conf, labels, expected = DEGENERATE[name]
    previous = BetaMixture.create([0.3, 0.7], [2.0, 6.0], [5.0, 2.0])
    result = BetaMixture.fit_with_status(conf, labels, reference=reference, previous=previous)
    assert result.fit_status == expected, result.message
    assert not bool(result.ok)
    assert result.message == expected.message
    chex.assert_tree_all_finite(result)
    chex.assert_trees_all_equal(result.mixture, previous.replace(reference=reference))
    with pytest.warns(FitWarning, match=expected.name):
        BetaMixture.fit(conf, labels, reference=reference, previous=previous)


@pytest.mark.parametrize("name", [k for k, v in DEGENERATE.items() if v[1] is not None])
def test_degenerate_update_keeps_threshold(name):
    conf, labels, expected = DEGENERATE[name]
    est = ThresholdEstimator(ThresholdConfig(schedule="every", period=1, initial=0.77))
    assert est.update(conf, labels)
    assert est.status == expected
    assert float(est.threshold) == np.float32(0.77)
    assert np.isfinite(est.history).all()


def test_degenerate_refit_keeps_fitted_threshold():
    """With a window, degenerate data can replace all held data: the fitted threshold stays."""
    rng = np.random.default_rng(31)
    est = ThresholdEstimator(ThresholdConfig(schedule="every", period=1, window=200))
    est.update(*draw(rng, 200, 0.5, *SEPARATED))
    fitted = float(est.threshold)
    assert est.status == FitStatus.OK and fitted != 0.9
    est.update(rng.uniform(size=200), np.ones(200, bool))  # window now holds only agreeing tokens
    assert est.status == FitStatus.ALL_AGREE
    assert float(est.threshold) == fitted
    np.testing.assert_array_equal(est.history, [fitted, fitted])


def test_mixed_exact_boundaries_fit_finitely():
    """Confidences of exactly 0 and 1 among spread ones are clipped, not fatal."""
    conf = np.concatenate([_spread, [0.0, 1.0, 0.0, 1.0, 1.0]])
    labels = np.concatenate([_spread > 0.5, [False, True, False, True, True]])
    for reference in (False, True):
        result = BetaMixture.fit_with_status(conf, labels, reference=reference)
        assert result.fit_status == FitStatus.OK
        chex.assert_tree_all_finite(result)
        chex.assert_tree_all_finite(result.mixture.threshold())


# -------------------------------------------------------------------------------------------------
# Online estimator: schedules, dtype, recompilation, buffers.


def test_every_schedule_refits_at_multiples_of_the_period():
    rng = np.random.default_rng(40)
    cfg = ThresholdConfig(schedule="every", period=0.03, expected_inputs=200)
    assert cfg.refit_period == 6
    est = ThresholdEstimator(cfg)
    refitted = [i + 1 for i in range(40) if est.update(*draw(rng, 4, 0.6, *SEPARATED))]
    assert refitted == [6, 12, 18, 24, 30, 36]
    assert [r.input_index for r in est.refits] == refitted
    # Before the first refit with enough data the threshold is the initial one.
    assert np.all(est.history[:5] == np.float32(0.9))
    assert est.history.shape == (40,) and est.history.dtype == np.float32
    assert est.num_points == 160


def test_reference_schedule_freezes_after_300():
    rng = np.random.default_rng(41)
    est = ThresholdEstimator(ThresholdConfig.reference_preset())
    refitted = [i + 1 for i in range(320) if est.update(*draw(rng, 3, 0.6, *SEPARATED))]
    assert refitted == list(range(1, 301))
    assert len(est.refits) == 300 and est.frozen
    assert np.all(est.history[299:] == est.history[299])
    assert not est.refit_due(301) and est.refit_due(300)


def test_threshold_is_float32_scalar_and_does_not_recompile():
    traces = 0

    def decode_like(conf, threshold):
        nonlocal traces
        traces += 1
        return jnp.sum(conf > threshold)

    decode = jax.jit(decode_like)
    rng = np.random.default_rng(42)
    est = ThresholdEstimator(ThresholdConfig(schedule="every", period=1))
    probe = jnp.linspace(0, 1, 8)
    seen = set()
    for _ in range(15):
        thr = est.threshold
        assert isinstance(thr, jax.Array)
        chex.assert_shape(thr, ())
        chex.assert_type(thr, jnp.float32)
        assert not thr.weak_type
        decode(probe, thr)
        seen.add(float(thr))
        est.update(*draw(rng, 12, 0.5, (2.0, 5.0), (5.0, 2.0)))
    assert len(seen) >= 5  # the threshold really changed
    assert traces == 1
    assert decode._cache_size() == 1


def test_update_validates_shapes_and_applies_mask():
    est = ThresholdEstimator()
    with pytest.raises(InputError, match="agree must have as many elements"):
        est.update(np.zeros(4), np.zeros(3, bool))
    with pytest.raises(InputError, match="mask must have"):
        est.update(np.zeros(4), np.zeros(4, bool), mask=np.ones(2, bool))
    conf = np.array([[0.1, 0.9], [0.8, np.nan]])  # [B, T] decode output, flattened
    est.update(conf, conf > 0.5, mask=np.array([[True, False], [True, True]]))
    held_conf, held_agree = est.data()
    np.testing.assert_allclose(held_conf, [0.1, 0.8])
    np.testing.assert_array_equal(held_agree, [False, True])


def test_buffers_grow_and_window_is_bounded():
    rng = np.random.default_rng(43)
    grow = ThresholdEstimator(ThresholdConfig(schedule="every", period=1000))
    ring = ThresholdEstimator(ThresholdConfig(schedule="every", period=1000, window=100))
    chunks = [draw(rng, 700, 0.5, *SEPARATED) for _ in range(10)]
    for conf, labels in chunks:
        grow.update(conf, labels)
        ring.update(conf, labels)
    assert grow.num_points == 7000
    np.testing.assert_allclose(grow.data()[0], np.concatenate([c for c, _ in chunks]), rtol=1e-6)
    assert ring.num_points == 100 and ring._conf.size == 100
    # The ring holds exactly the last 100 points (in some order).
    np.testing.assert_allclose(np.sort(ring.data()[0]), np.sort(chunks[-1][0][-100:]), rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"zeta": 0.0}, r"zeta must be a number in \(0, 1\), got 0.0"),
        ({"zeta": 1.2}, r"zeta must be a number in \(0, 1\), got 1.2"),
        ({"low": 0.9, "high": 0.3}, r"low < high, got low=0.9, high=0.3"),
        ({"low": 0.5, "high": 0.5}, r"low < high"),
        ({"high": 1.5}, r"high must be a number in \[0, 1\], got 1.5"),
        ({"initial": -0.1}, r"initial must be a number in \[0, 1\]"),
        ({"schedule": "weekly"}, r"schedule must be one of \('every', 'reference'\), got 'weekly'"),
        ({"schedule": "every", "period": -3}, r"period must be an int >= 1 .* got -3"),
        ({"schedule": "every", "period": 1.5}, r"period must be .* float in \(0, 1\]"),
        ({"schedule": "every", "period": 0.03}, r"expected_inputs must be set"),
        ({"freeze_after": -1}, r"freeze_after must be an int >= 0, got -1"),
        ({"min_points": 1}, r"min_points must be an int >= 2, got 1"),
        ({"window": 5}, r"window must be None or an int >= min_points \(10\), got 5"),
        ({"prior": -1.0}, r"prior must be a finite number >= 0"),
        ({"grid": 1}, r"grid must be None or an int >= 2, got 1"),
        ({"reference": True, "supervised": False}, r"reference=True needs supervised=True"),
        ({"expected_inputs": 0}, r"expected_inputs must be None or an int >= 1, got 0"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ThresholdConfig(**kwargs)


def test_fit_argument_validation():
    with pytest.raises(InputError, match="reference=True needs agree labels"):
        BetaMixture.fit(np.ones(20) * 0.5, reference=True)
    with pytest.raises(InputError, match="agree must have as many elements as confidence"):
        BetaMixture.fit(np.ones(20) * 0.5, np.ones(19, bool))
    with pytest.raises(InputError, match="newton_steps must be an int >= 0, got -1"):
        BetaMixture.fit(np.ones(20) * 0.5, newton_steps=-1)
    with pytest.raises(InputError, match=r"alpha must have shape \(2,\)"):
        BetaMixture.create([0.5, 0.5], [1.0], [1.0, 1.0])


# -------------------------------------------------------------------------------------------------
# Stream shift.

REGIME_1 = (0.7, (2.0, 8.0), (12.0, 1.5))  # true crossing 0.548
REGIME_2 = (0.5, (5.0, 3.0), (10.0, 1.5))  # true crossing 0.750
SHIFT_AT = 350  # inputs 1..350 from regime 1, then regime 2; after the reference freeze (300)


@pytest.fixture(scope="module")
def shifted_stream_histories():
    rng = np.random.default_rng(50)
    stream = [draw(rng, 10, *(REGIME_1 if i < SHIFT_AT else REGIME_2)) for i in range(700)]
    configs = {
        "reference": ThresholdConfig(schedule="reference"),
        "every": ThresholdConfig(schedule="every", period=0.05, expected_inputs=700),
        "every_window": ThresholdConfig(schedule="every", period=35, window=1500),
    }
    histories = {}
    for name, cfg in configs.items():
        est = ThresholdEstimator(cfg)
        for conf, labels in stream:
            est.update(conf, labels)
        histories[name] = est.history
    return histories


def test_stream_shift(shifted_stream_histories):
    h = shifted_stream_histories
    c1, c2 = true_crossing(*REGIME_1), true_crossing(*REGIME_2)
    assert c2 - c1 > 0.15
    for name in h:
        assert h[name].shape == (700,) and np.isfinite(h[name]).all()
        # Before the shift, every schedule sits near regime 1's crossing (3,500 points).
        assert abs(h[name][SHIFT_AT - 1] - c1) < 0.03, name
    # Reference: frozen from input 300 on, so it never sees regime 2.
    assert np.all(h["reference"][299:] == h["reference"][299])
    # "every" on all data ends between the regimes, clearly moved toward regime 2.
    assert h["every"][-1] - h["every"][SHIFT_AT - 1] > 0.05
    assert c1 < h["every"][-1] < c2
    # With a window of the last 150 inputs' points it reaches regime 2's crossing.
    assert abs(h["every_window"][-1] - c2) < 0.03


# -------------------------------------------------------------------------------------------------
# Plots, files and the CLI.


def _is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plots_write_pngs(tmp_path, shifted_stream_histories):
    conf, labels = draw(np.random.default_rng(60), 800, 0.6, *SEPARATED)
    mixture = BetaMixture.fit(conf, labels)
    assert _is_png(plot_mixture(mixture, conf, labels, tmp_path / "mix.png", title="fit"))
    assert _is_png(plot_mixture(mixture, conf, None, tmp_path / "sub" / "unlabelled.png"))
    assert _is_png(plot_trajectory(shifted_stream_histories, tmp_path / "traj.png",
                                   hlines={"c1": 0.548}, vlines={"shift": SHIFT_AT}))  # fmt: skip
    assert _is_png(plot_trajectory(shifted_stream_histories["every"], tmp_path / "one.png"))


def test_fit_from_file_npz_and_jsonl(tmp_path, capsys):
    conf, labels = draw(np.random.default_rng(61), 900, 0.6, *SEPARATED)
    npz = tmp_path / "agree.npz"
    np.savez(npz, confidence=conf, agree=labels)
    jsonl = tmp_path / "agree.jsonl"
    with open(jsonl, "w") as f:
        # One line per "input" with lists, plus one scalar line.
        for start in range(0, 890, 89):
            row = {"confidence": conf[start : start + 89].tolist(),
                   "agree": labels[start : start + 89].tolist()}  # fmt: skip
            f.write(json.dumps(row) + "\n")
        for i in range(890, 900):
            f.write(json.dumps({"confidence": conf[i], "agree": bool(labels[i])}) + "\n")
    loaded = load_agreement_data(jsonl)
    np.testing.assert_allclose(loaded[0], conf, rtol=1e-6)
    np.testing.assert_array_equal(loaded[1], labels)

    a, b = fit_from_file(npz), fit_from_file(jsonl)
    assert a["status"] == "OK" and a["ok"] and a["num_points"] == 900
    assert a["threshold"] == pytest.approx(b["threshold"], abs=1e-6)
    direct = BetaMixture.fit(conf, labels).threshold()
    assert a["threshold"] == pytest.approx(float(direct.value), abs=1e-6)
    ref = fit_from_file(npz, reference=True, plot=tmp_path / "ref.png")
    assert ref["mode"] == "reference" and ref["weights"] == [0.5, 0.5]
    assert ref["threshold"] == pytest.approx(reference_threshold_numpy(conf, labels)[0], abs=1e-6)
    assert _is_png(ref["plot"])

    assert cli_main([str(npz), "--zeta", "0.4"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["threshold"] == pytest.approx(a["threshold"])


def test_cli_degenerate_and_bad_files(tmp_path, capsys):
    npz = tmp_path / "all_agree.npz"
    np.savez(npz, confidence=_spread, agree=np.ones(200, bool))
    assert cli_main([str(npz)]) == 1
    printed = json.loads(capsys.readouterr().out)
    assert printed["status"] == "ALL_AGREE" and printed["threshold"] == 0.9
    assert cli_main([str(tmp_path / "missing.npz")]) == 2
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"confidence": 0.5, "agree": true}\nnot json\n')
    assert cli_main([str(bad)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no stray warnings from the host API on good data
        unlabelled = tmp_path / "unlabelled.npz"
        np.savez(unlabelled, confidence=draw(np.random.default_rng(62), 500, 0.5, *SEPARATED)[0])
        assert cli_main([str(unlabelled), "--reference"]) == 2
        assert cli_main([str(unlabelled)]) == 0
        assert json.loads(capsys.readouterr().out)["mode"] == "em"
