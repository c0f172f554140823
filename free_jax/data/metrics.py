"""Evaluation metrics: the paper's (ROUGE, SQuAD F1 / exact match, sacreBLEU) and the demo's
(punctuation restoration F1).

One entry point, `compute(metric_name, predictions, references)`, returns a dict of scores in
[0, 100] holding `metric_name` and the other scores of its family, which cost nothing extra
(`compute("rougeL", ...)` also gives rouge1, rouge2 and rougeLsum). Each example's reference is
a string or a sequence of strings (several gold answers or reference translations).

* ROUGE (`rouge-score`, as the reference scripts call it through `evaluate`): F-measure with
  Porter stemming, averaged over examples (the plain mean, where `evaluate` reports a bootstrap
  median that differs in the last digits), the best reference per example. For rougeLsum, texts
  are stripped and split into sentences, one per line, as the summarisation scripts do with
  `nltk.sent_tokenize`; that needs NLTK's `punkt_tab` data, and where it is not installed a
  regular-expression splitter (breaks after `.`, `!` or `?` and at newlines) stands in.
* SQuAD: the official v1.1 script's normalisation (lower-case, strip punctuation, drop the
  articles a/an/the, collapse whitespace), token F1 and exact match, maximum over gold answers,
  averaged. An empty gold list counts as the single answer "" and an empty normalised answer
  scores F1 = 1 only against another empty one (the v2.0 script's rule; v1.1 never meets either).
* sacreBLEU: `sacrebleu.corpus_bleu` with its defaults (13a tokenisation, exponential smoothing),
  the reference streams being the examples' first, second, ... references.
* Punctuation restoration (`punct_f1`, the usual measure of that task): micro-averaged precision,
  recall and F1 of the punctuation after each word. Both texts are split into words and the marks
  `, . ; : ? !` that follow each word; the words are aligned (`difflib.SequenceMatcher`, Python's
  own longest-matching-blocks diff) and each word of the reference carries one slot, its marks
  ("" for none). A slot whose marks the prediction reproduces on the aligned word is a true
  positive; marks the reference has and the prediction lacks (or puts on an unaligned word, or
  differently) are false negatives; marks the prediction adds are false positives. Counts are
  summed over the corpus. Unlike BLEU, copying the words scores 0: only the restored marks count.
"""

from __future__ import annotations

import collections
import functools
import re
import string
from collections.abc import Sequence
from typing import Any

from free_jax.errors import InputError

ROUGE_METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
SQUAD_METRICS = ("squad_f1", "squad_em")
BLEU_METRICS = ("sacrebleu",)
PUNCTUATION_METRICS = ("punct_f1", "punct_precision", "punct_recall")
METRICS = (*ROUGE_METRICS, *SQUAD_METRICS, *BLEU_METRICS, *PUNCTUATION_METRICS)

Reference = str | Sequence[str]


def compute(
    metric_name: str, predictions: Sequence[str], references: Sequence[Reference]
) -> dict[str, float]:
    """Scores of `predictions` against `references` (one reference or a list per example).

    Args:
      metric_name: one of `METRICS`.
      predictions: N predicted texts.
      references: N references; each a string or a sequence of strings.

    Returns:
      Scores in [0, 100]: `metric_name` and the rest of its family (ROUGE: rouge1, rouge2,
      rougeL, rougeLsum; SQuAD: squad_f1, squad_em; BLEU: sacrebleu; punctuation: punct_f1,
      punct_precision, punct_recall).

    Raises:
      InputError: an unknown metric name, or predictions and references that are not equally
        long, empty, or not text.
    """
    if metric_name not in METRICS:
        raise InputError(f"unknown metric {metric_name!r}; valid: {METRICS}.")
    predictions, references = _check(predictions, references)
    if metric_name in ROUGE_METRICS:
        return rouge(predictions, references)
    if metric_name in SQUAD_METRICS:
        return squad(predictions, references)
    if metric_name in PUNCTUATION_METRICS:
        return punctuation(predictions, references)
    return bleu(predictions, references)


def _check(
    predictions: Sequence[str], references: Sequence[Reference]
) -> tuple[list[str], list[list[str]]]:
    if isinstance(predictions, str) or isinstance(references, str):
        raise InputError(
            "predictions and references must be sequences with one entry per example, not a "
            "single string."
        )
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise InputError(
            f"{len(predictions)} predictions but {len(references)} references; need one "
            "reference (or list of references) per prediction."
        )
    if not predictions:
        raise InputError("no predictions to score.")
    for i, p in enumerate(predictions):
        if not isinstance(p, str):
            raise InputError(f"prediction {i} is a {type(p).__name__}, not a string.")
    refs = []
    for i, r in enumerate(references):
        r = [r] if isinstance(r, str) else list(r)
        if not all(isinstance(x, str) for x in r):
            raise InputError(f"reference {i} must be a string or a list of strings, got {r!r}.")
        refs.append(r)
    return predictions, refs


# ---------------------------------------------------------------------------- ROUGE

_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"'\u201d\u2019)\]]))\s+|\s*\n\s*")


@functools.cache
def _punkt() -> Any:
    """NLTK's sentence splitter when its data is installed, else None."""
    try:
        import nltk

        nltk.data.find("tokenizers/punkt_tab/english/")
        return nltk.sent_tokenize
    except (ImportError, LookupError, OSError):
        return None


def split_sentences(text: str) -> list[str]:
    """The sentences of `text`: NLTK's punkt splitter where installed, else a regex fallback."""
    text = text.strip()
    punkt = _punkt()
    if punkt is not None:
        return punkt(text)
    return [s for s in _SENTENCE_END.split(text) if s]


@functools.cache
def _scorer(use_stemmer: bool) -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_METRICS), use_stemmer=use_stemmer)


def rouge(
    predictions: Sequence[str], references: Sequence[Reference], *, use_stemmer: bool = True
) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F-measure x 100, the best reference per example."""
    predictions, references = _check(predictions, references)
    scorer = _scorer(use_stemmer)
    totals = dict.fromkeys(ROUGE_METRICS, 0.0)
    for prediction, refs in zip(predictions, references, strict=True):
        # rougeLsum reads one sentence per line; the other types ignore line breaks.
        prediction = "\n".join(split_sentences(prediction))
        refs = ["\n".join(split_sentences(r)) for r in refs] or [""]
        scores = scorer.score_multi(refs, prediction)
        for key in ROUGE_METRICS:
            totals[key] += scores[key].fmeasure
    return {key: 100.0 * total / len(predictions) for key, total in totals.items()}


# ---------------------------------------------------------------------------- SQuAD

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """The SQuAD script's normalisation: lower-case, no punctuation or articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def squad_f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 in [0, 1] of two answers after `normalize_answer`."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad(predictions: Sequence[str], references: Sequence[Reference]) -> dict[str, float]:
    """Mean SQuAD F1 and exact match x 100, the best gold answer per example."""
    predictions, references = _check(predictions, references)
    f1 = em = 0.0
    for prediction, golds in zip(predictions, references, strict=True):
        golds = golds or [""]
        f1 += max(squad_f1(prediction, g) for g in golds)
        em += max(float(normalize_answer(prediction) == normalize_answer(g)) for g in golds)
    return {"squad_f1": 100.0 * f1 / len(predictions), "squad_em": 100.0 * em / len(predictions)}


# ---------------------------------------------------------------------------- BLEU


def bleu(predictions: Sequence[str], references: Sequence[Reference]) -> dict[str, float]:
    """sacreBLEU corpus BLEU (0-100) with its default settings."""
    import sacrebleu

    predictions, references = _check(predictions, references)
    counts = {len(r) for r in references}
    if len(counts) != 1 or 0 in counts:
        raise InputError(
            f"sacreBLEU needs the same number (>= 1) of references for every example; got "
            f"counts {sorted(counts)}."
        )
    streams = [list(stream) for stream in zip(*references, strict=True)]
    return {"sacrebleu": float(sacrebleu.corpus_bleu(predictions, streams).score)}


# ---------------------------------------------------------------------------- punctuation

MARKS = ",.;:?!"
_WORD_OR_MARK = re.compile(r"[,.;:?!]|[^\s,.;:?!]+")


def punctuation_slots(text: str) -> tuple[list[str], list[str]]:
    """(words, marks): the words of `text` and the marks that follow each ("" for none).

    Marks before the first word belong to a leading empty word, so that none is lost:
    `punctuation_slots("Yes, it works.")` is `(["Yes", "it", "works"], [",", "", "."])`.
    """
    words: list[str] = []
    marks: list[str] = []
    for piece in _WORD_OR_MARK.findall(text):
        if piece in MARKS:
            if not words:
                words.append("")
                marks.append("")
            marks[-1] += piece
        else:
            words.append(piece)
            marks.append("")
    return words, marks


def punctuation_counts(prediction: str, reference: str) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives) of one prediction's punctuation."""
    import difflib

    ref_words, ref_marks = punctuation_slots(reference)
    pred_words, pred_marks = punctuation_slots(prediction)
    matcher = difflib.SequenceMatcher(None, ref_words, pred_words, autojunk=False)
    tp = fp = fn = 0
    aligned_ref, aligned_pred = set(), set()
    for a, b, size in matcher.get_matching_blocks():
        for k in range(size):
            aligned_ref.add(a + k)
            aligned_pred.add(b + k)
            gold, guess = ref_marks[a + k], pred_marks[b + k]
            if gold and gold == guess:
                tp += 1
            else:
                fn += bool(gold)
                fp += bool(guess)
    fn += sum(1 for i, m in enumerate(ref_marks) if m and i not in aligned_ref)
    fp += sum(1 for j, m in enumerate(pred_marks) if m and j not in aligned_pred)
    return tp, fp, fn


def punctuation(predictions: Sequence[str], references: Sequence[Reference]) -> dict[str, float]:
    """Corpus punctuation-restoration precision, recall and F1 x 100 (the first reference of
    each example; see the module docstring)."""
    predictions, references = _check(predictions, references)
    tp = fp = fn = 0
    for prediction, refs in zip(predictions, references, strict=True):
        a, b, c = punctuation_counts(prediction, refs[0] if refs else "")
        tp, fp, fn = tp + a, fp + b, fn + c
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "punct_f1": 100.0 * f1,
        "punct_precision": 100.0 * precision,
        "punct_recall": 100.0 * recall,
    }
