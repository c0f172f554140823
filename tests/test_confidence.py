"""The exit confidence measures against NumPy references written from their definitions."""

import jax.numpy as jnp
import numpy as np
import pytest

from free_jax.decoding.confidence import confidence_score


def _softmax(logits):
    z = logits.astype(np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _reference(name, logits):
    probs = np.sort(_softmax(logits), axis=-1)
    return probs[:, -1] if name == "softmax_max" else probs[:, -1] - probs[:, -2]


def _cases():
    rng = np.random.default_rng(0)
    yield rng.normal(size=(5, 2048)).astype(np.float32)  # flat: small confidences
    peaked = rng.normal(size=(4, 2048)).astype(np.float32)
    peaked[np.arange(4), rng.integers(0, 2048, 4)] += np.array([2.0, 6.0, 12.0, 40.0], np.float32)
    yield peaked  # from unsure to certain
    yield rng.normal(scale=30.0, size=(3, 512)).astype(np.float32)  # large logits
    two_close = rng.normal(size=(2, 100)).astype(np.float32)
    two_close[:, 7], two_close[:, 42] = 9.0, 8.5
    yield two_close


@pytest.mark.parametrize("name", ["softmax_diff", "softmax_max"])
def test_softmax_confidences_match_their_definitions(name):
    for logits in _cases():
        got = np.asarray(confidence_score(name, jnp.asarray(logits), ()))
        np.testing.assert_allclose(got, _reference(name, logits), rtol=1e-5, atol=1e-6)


def test_a_tied_maximum_has_zero_difference():
    logits = np.zeros((3, 64), np.float32)
    logits[0, [3, 9]] = 5.0  # two tied maxima
    logits[1, [3, 9, 11]] = 5.0  # three
    logits[2, 3] = 5.0  # a clear maximum
    diff = np.asarray(confidence_score("softmax_diff", jnp.asarray(logits), ()))
    assert diff[0] == 0.0 and diff[1] == 0.0
    assert diff[2] == pytest.approx(_reference("softmax_diff", logits[2:])[0], rel=1e-6)
    top = np.asarray(confidence_score("softmax_max", jnp.asarray(logits), ()))
    np.testing.assert_allclose(top, _reference("softmax_max", logits), rtol=1e-6)


def test_state_cosine_is_the_cosine_of_the_two_states():
    rng = np.random.default_rng(1)
    before, after = rng.normal(size=(2, 4, 16)).astype(np.float32)
    after[1] = 3.0 * before[1]  # parallel: cosine 1
    got = np.asarray(confidence_score("state_cosine", None, (before, after)))
    want = np.sum(before * after, -1) / (
        np.linalg.norm(before, axis=-1) * np.linalg.norm(after, axis=-1)
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert got[1] == pytest.approx(1.0, abs=1e-6)
