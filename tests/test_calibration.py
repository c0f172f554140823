"""Choosing FREE's threshold with a bootstrap lower bound (free_jax.evaluation.calibration)."""

from __future__ import annotations

import numpy as np
import pytest

import free_jax
from free_jax import data
from free_jax.data import demo, metrics
from free_jax.errors import InputError
from free_jax.evaluation import calibration


@pytest.fixture(scope="module")
def model():
    return free_jax.load("demo")


@pytest.fixture(scope="module")
def examples(model):
    split = data.load_examples(demo.TASK_NAME, model.tokenizer, split="validation")
    return split.select(np.linspace(0, len(split) - 1, 24).astype(int))


def test_scorer_counts_equal_the_corpus_metric_on_every_resample():
    references = ["Yes, it works.", "No; it does not.", "Well, then: try again!", "Fine."]
    texts = ["Yes it works.", "No, it does not.", "Well, then: try again.", "Fine."]
    scorer = calibration._Scorer("punct_f1", references)
    counts = scorer.per_sentence(texts)
    index = calibration._bootstrap_indices(len(texts), 20, seed=3)
    fast = scorer.corpus(texts, counts, index)
    slow = calibration._Scorer("punct_f1", references).corpus(texts, None, index)
    np.testing.assert_allclose(fast, slow, rtol=1e-12)
    whole = metrics.compute("punct_f1", texts, references)["punct_f1"]
    assert float(scorer.corpus(texts, counts, np.arange(4))) == pytest.approx(whole)


def test_never_exiting_qualifies_and_the_choice_is_the_lowest_qualifying(model, examples):
    choice = calibration.choose_threshold(
        model, examples, candidates=(1.0, 0.2, 0.0), num_resamples=200, batch_size=8
    )
    by_threshold = {c.threshold: c for c in choice.checks}
    never = by_threshold[1.0]  # threshold 1 never exits: the full model's output
    assert never.exit_rate == 0.0 and never.share == 1.0 and never.lower_bound == 1.0
    for check in choice.checks:
        assert check.lower_bound <= check.share + 1e-12  # a bound below the point estimate
    qualifying = [c.threshold for c in choice.checks if c.lower_bound >= choice.level]
    assert choice.threshold == min(qualifying)
    assert choice.num_examples == 24 and choice.metric == "punct_f1"


def test_a_level_nothing_but_the_full_model_keeps(model, examples):
    choice = calibration.choose_threshold(
        model, examples, candidates=(1.0, 0.0), level=1.0, num_resamples=100, batch_size=8
    )
    always = {c.threshold: c for c in choice.checks}[0.0]
    assert always.exit_rate > 0.9
    assert choice.threshold == (0.0 if always.lower_bound >= 1.0 else 1.0)


@pytest.mark.parametrize(
    "kwargs", [{"level": 1.5}, {"confidence": 1.0}, {"num_resamples": 0}, {"candidates": ()}]
)
def test_bad_settings_are_named(model, examples, kwargs):
    with pytest.raises(InputError):
        calibration.choose_threshold(model, examples, **kwargs)
