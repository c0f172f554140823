"""Metrics against values computed by hand on small examples."""

from __future__ import annotations

import pytest

from free_jax.data import metrics
from free_jax.errors import InputError


def test_rouge_hand_computed():
    # 6 words each; LCS "the cat on the mat" = 5 -> P = R = F = 5/6. Unigrams: the x2, cat, on,
    # mat match (5/6). Bigrams: "the cat", "on the", "the mat" of 5 -> 3/5.
    scores = metrics.compute("rougeL", ["the cat sat on the mat"], ["the cat is on the mat"])
    assert scores["rougeL"] == pytest.approx(500 / 6)
    assert scores["rouge1"] == pytest.approx(500 / 6)
    assert scores["rouge2"] == pytest.approx(60.0)
    assert scores["rougeLsum"] == pytest.approx(500 / 6)
    assert set(scores) == set(metrics.ROUGE_METRICS)


def test_rouge_stems_and_averages_examples():
    # Porter stemming: running ~ runs. {run, fast} vs {he, run, fast}: P = 1, R = 2/3, F = 0.8.
    scores = metrics.compute("rouge1", ["running fast", "a b"], ["he runs fast", "c d"])
    assert scores["rouge1"] == pytest.approx((80.0 + 0.0) / 2)


def test_rougelsum_splits_sentences():
    # Sentence order swapped: the LCS over the whole text is 2 of 4 words, but every reference
    # sentence is matched in full by a predicted sentence (summary-level LCS).
    scores = metrics.compute("rougeLsum", ["Cats purr. Dogs bark."], ["Dogs bark. Cats purr."])
    assert scores["rougeL"] == pytest.approx(50.0)
    assert scores["rougeLsum"] == pytest.approx(100.0)


def test_sentence_splitter():
    assert metrics.split_sentences('He said "hi." Then left!  Ok?\nNo stop here') == [
        'He said "hi."',
        "Then left!",
        "Ok?",
        "No stop here",
    ]


def test_rouge_takes_the_best_reference():
    scores = metrics.compute("rougeL", ["the cat"], [["a dog", "the cat"]])
    assert scores["rougeL"] == pytest.approx(100.0)


def test_squad_normalisation_f1_and_exact_match():
    assert metrics.normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert metrics.normalize_answer("An apple, a pear and THE plum.") == "apple pear and plum"
    scores = metrics.compute(
        "squad_f1",
        ["The Eiffel Tower!", "a big red dog", "Paris", ""],
        [["Eiffel tower", "the tower in Paris"], "red dog", ["London"], []],
    )
    # 1) exact after normalisation; 2) "big red dog" vs "red dog": P = 2/3, R = 1, F1 = 0.8;
    # 3) no overlap; 4) empty prediction against no answer counts as a match.
    assert scores["squad_f1"] == pytest.approx(100 * (1 + 0.8 + 0 + 1) / 4)
    assert scores["squad_em"] == pytest.approx(100 * (1 + 0 + 0 + 1) / 4)
    # The maximum over gold answers, not the first.
    assert metrics.compute("squad_em", ["tower in paris"], [["x", "The tower in Paris."]])[
        "squad_em"
    ] == pytest.approx(100.0)
    # {tower} vs {tower, in, paris}: P = 1, R = 1/3, F1 = 0.5.
    assert metrics.squad_f1("tower", "the tower in Paris") == pytest.approx(0.5)


def test_bleu_identical_and_hand_computed():
    assert metrics.compute(
        "sacrebleu", ["Thank you so much, Chris."], ["Thank you so much, Chris."]
    )["sacrebleu"] == pytest.approx(100.0)
    # n-gram precisions 5/6, 3/5, 2/4, 1/3, equal lengths (no brevity penalty):
    # BLEU = (5/6 * 3/5 * 1/2 * 1/3) ** (1/4) = 12 ** -0.25.
    score = metrics.compute("sacrebleu", ["the cat sat on the mat"], ["the cat sat on a mat"])
    assert score["sacrebleu"] == pytest.approx(100 * 12**-0.25)
    # Two reference streams: the second reference matches exactly.
    two = metrics.compute(
        "sacrebleu", ["the cat sat on the mat"], [["a dog", "the cat sat on the mat"]]
    )
    assert two["sacrebleu"] == pytest.approx(100.0)


def test_punctuation_slots_attach_marks_to_the_word_before():
    assert metrics.punctuation_slots("Yes, it works.") == (["Yes", "it", "works"], [",", "", "."])
    assert metrics.punctuation_slots("e.g., Why?!") == (["e", "g", "Why"], [".", ".,", "?!"])
    # Marks before any word go to a leading empty word; hyphens and apostrophes are word parts.
    assert metrics.punctuation_slots(", real-world model's") == (
        ["", "real-world", "model's"],
        [",", "", ""],
    )


def test_punctuation_f1_hand_computed():
    perfect = metrics.compute("punct_f1", ["Yes, it works."], ["Yes, it works."])
    assert perfect == {"punct_f1": 100.0, "punct_precision": 100.0, "punct_recall": 100.0}
    # Copying the words restores nothing: no true positives.
    assert metrics.compute("punct_f1", ["Yes it works"], ["Yes, it works."])["punct_f1"] == 0.0
    # 1: "works." right, "Yes," missed (TP 1, FN 1). 2: "A," and "c." right, "b," added (TP 2,
    # FP 1). Corpus: P = 3/4, R = 3/4.
    scores = metrics.compute(
        "punct_f1", ["Yes it works.", "A, b, c."], ["Yes, it works.", "A, b c."]
    )
    assert scores == pytest.approx(
        {"punct_f1": 75.0, "punct_precision": 75.0, "punct_recall": 75.0}
    )
    # The wrong mark on the right word is one false positive and one false negative.
    wrong = metrics.punctuation_counts("One; two.", "One, two.")
    assert wrong == (1, 1, 1)


def test_punctuation_f1_aligns_words_the_prediction_repeats_or_drops():
    # A looping prediction: the aligned "Code," and "works." count, the repeats' commas do not.
    reference = "Code, and data works."
    assert metrics.punctuation_counts("Code, Code, Code, and data works.", reference) == (2, 2, 0)
    # A dropped word takes its mark with it.
    assert metrics.punctuation_counts("and data works.", reference) == (1, 0, 1)
    # The first reference of several is the one scored.
    two = metrics.compute("punct_f1", ["A, b."], [["A, b.", "A b."]])
    assert two["punct_f1"] == pytest.approx(100.0)


def test_errors():
    with pytest.raises(InputError, match="unknown metric 'bleu'; valid: .*sacrebleu"):
        metrics.compute("bleu", ["a"], ["a"])
    with pytest.raises(InputError, match="2 predictions but 1 references"):
        metrics.compute("rougeL", ["a", "b"], ["a"])
    with pytest.raises(InputError, match="no predictions"):
        metrics.compute("squad_f1", [], [])
    with pytest.raises(InputError, match="not a single string"):
        metrics.compute("rougeL", "a b", "a b")
    with pytest.raises(InputError, match="prediction 0 is a int"):
        metrics.compute("rougeL", [3], ["a"])
    with pytest.raises(InputError, match="reference 0 must be a string or a list of strings"):
        metrics.compute("squad_f1", ["a"], [[1]])
    with pytest.raises(InputError, match="same number"):
        metrics.compute("sacrebleu", ["a", "b"], [["a"], ["b", "c"]])
