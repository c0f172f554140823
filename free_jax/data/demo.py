"""The demo task: restoring the punctuation of real English sentences.

No pretrained T5 weights and none of the paper's datasets can be had offline, so the embedded demo
trains its own small T5 on a task built from text a registry package ships: sentences of 250 ACL
papers (the full-text parses in `aclsum==0.1.2`, text CC BY 4.0). The source is a sentence with
its punctuation removed, the target is the sentence itself:

    source  "restore: However current non-autoregressive models still fall behind their
             autoregressive counterparts in translation quality"
    target  "However, current non-autoregressive models still fall behind their autoregressive
             counterparts in translation quality."

Why this task. Most target tokens are copies of source words (easy: a shallow decoder predicts
them confidently), while commas, colons and the tokens around them need the sentence's structure
(hard): tokens differ in difficulty, which is what early exiting needs. Sentences are short
(median 18 words, 28 target tokens) and the vocabulary small (2048 ids), so a small model can learn
the task on a CPU in half an hour. Quality is measured by the task's usual metric, punctuation F1
(`free_jax.data.metrics`: the marks after each aligned word, micro-averaged), which copying the
input
scores 0 and adding a full stop 70 (test). Case-sensitive sacreBLEU is reported too, but since
94% of the target tokens are copies it mostly measures copying: the input itself scores 85 test
BLEU and adding a full stop 90, so BLEU barely separates a model from those baselines
(`free_jax/assets/demo/README.md` has the numbers; ROUGE and SQuAD F1 drop punctuation and score
copying the input 100).

An earlier version also lower-cased the source (restoring case too). A small model trained for
half an hour on 2 CPU cores then scored below the capitalise-and-add-a-full-stop baseline: acronyms
and names ("ICD", "Code Hierarchy") cannot be recovered from lower case without knowledge the
training text does not give, and spelling out a capitalised word whose pieces differ from the
lower-case ones cost many errors. Keeping the case makes the task learnable in that budget.

Layout of `free_jax/assets/demo/` (written by `build_demo_data`):

    train.jsonl, validation.jsonl, test.jsonl   {"paper": ACL id, "text": sentence} per line
    tokenizer/                                  SentencePiece unigram, T5 ids (pad 0, EOS 1,
                                                unk 2, `EXTRA_IDS` sentinels last)
    stats.json                                  what `statistics` measured when it was built
    README.md                                   the statistics, the baselines, the licence
    model/                                      the trained demo model (written by training)

Splits are by paper (no paper's sentences are in two splits), a held-out sentence whose source
also occurs in training is dropped, and so are sentences longer than `MAX_SOURCE_LENGTH` /
`MAX_TARGET_LENGTH` tokens (1%). The build is deterministic in `seed`:

    python -m free_jax.data.demo [--out DIR] [--seed 0]     # needs `pip install aclsum --no-deps`
"""

from __future__ import annotations

import argparse
import collections
import importlib.metadata
import io
import json
import os
import re
import types
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from free_jax.checkpoints.loading import DEMO_MODEL
from free_jax.errors import DataError

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "demo"
MODEL_DIR = DEMO_MODEL  # the shipped demo model (`configs/demo.py` retrains it)
TASK_NAME = "acl_punct"
PREFIX = "restore: "
SPLITS = ("train", "validation", "test")
# Papers per held-out split; the rest train.
HELD_OUT_PAPERS = types.MappingProxyType({"validation": 25, "test": 25})
MIN_WORDS, MAX_WORDS = 8, 40
# What the source loses: the marks a model must restore. Hyphens and apostrophes stay, being
# parts of words ("real-world", "model's").
PUNCTUATION = ",.;:?!"
VOCAB_SIZE = 2048  # the tokenizer's ids, sentinels included (a multiple of 128)
EXTRA_IDS = 8
# Tokens, EOS included (the source with its prefix): longer sentences (about 2%, mostly
# formula-like or full of rare names) are dropped, so the task's shapes stay small.
MAX_SOURCE_LENGTH = 64
MAX_TARGET_LENGTH = 64

# A sentence we keep: a capital, then words separated by single spaces, each word letters and
# digits with inner hyphens or apostrophes, a word followed by at most one of `,;:`, and `.?!` at
# the end. This drops citations ("et al.", brackets), numbers with points, formulae, quotes and
# dashes, whose restoration would be guesswork.
_INNER = r"(?:['\-][A-Za-z0-9]+)*"
_SENTENCE = re.compile(rf"[A-Z][A-Za-z0-9]*{_INNER}(?:[,;:]? [A-Za-z0-9]+{_INNER})*[.?!]")
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
# A fragment ending with one of these was cut at an abbreviation, not at a sentence end.
_ABBREVIATIONS = re.compile(
    r"(?:\b(?:al|e\.g|i\.e|cf|vs|etc|Fig|Figs|Eq|Eqs|Sec|Tab|No|pp|Vol|resp|approx|Dr|Mr|Ms)"
    r"|\b[A-Z])\.$"
)
_STRIP = str.maketrans("", "", PUNCTUATION)


# ---------------------------------------------------------------------------- the task


def strip_punctuation(text: str) -> str:
    """The task's source text: `text` without `PUNCTUATION`, single-spaced, its case kept."""
    return " ".join(text.translate(_STRIP).split())


def demo_source(row: Mapping[str, Any]) -> str:
    """The source field of a row of the demo task's files (`{"text": sentence}`)."""
    return strip_punctuation(row["text"])


def data_files(split: str, directory: str | os.PathLike | None = None) -> Path:
    """The shipped JSONL file of a split ("train", "validation" or "test")."""
    if split not in SPLITS:
        raise DataError(f"the demo task has splits {SPLITS}; got split={split!r}.")
    path = Path(directory or ASSETS) / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(
            f"the demo task's file {str(path)!r} is missing; rebuild it with "
            "`python -m free_jax.data.demo` (needs `pip install aclsum==0.1.2 --no-deps`)."
        )
    return path


def load_model(dtype: Any = None) -> Any:
    """The shipped demo model (`MODEL_DIR`), with its tokenizer and FREE metadata."""
    from free_jax.checkpoints import load

    if not MODEL_DIR.is_dir():
        raise DataError(
            f"the demo model is not in this installation ({MODEL_DIR} is missing); retrain it "
            "with `free-jax train --config configs/demo.py` and copy runs/demo/final there."
        )
    return load(str(MODEL_DIR), dtype=dtype)


def load_tokenizer(directory: str | os.PathLike | None = None) -> Any:
    """The demo task's `T5Tokenizer` (`VOCAB_SIZE` ids)."""
    from transformers import T5Tokenizer

    directory = Path(directory) if directory is not None else ASSETS / "tokenizer"
    if not (directory / "spiece.model").is_file():
        raise DataError(
            f"no tokenizer at {str(directory)!r} (spiece.model is missing); rebuild it with "
            "`python -m free_jax.data.demo`."
        )
    # from_pretrained on the directory, never T5Tokenizer(vocab_file=...): see environment notes.
    return T5Tokenizer.from_pretrained(str(directory), extra_ids=EXTRA_IDS)


def read_split(split: str, directory: str | os.PathLike | None = None) -> list[dict[str, str]]:
    """The rows of a shipped split."""
    with open(data_files(split, directory), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------- sentences


def split_sentences(paragraph: str) -> list[str]:
    """A paragraph's sentences: cut after `.?!` before a capital, except after an abbreviation."""
    pieces = _SPLIT.split(paragraph)
    sentences: list[str] = []
    for piece in pieces:
        if sentences and _ABBREVIATIONS.search(sentences[-1]):
            sentences[-1] += " " + piece
        else:
            sentences.append(piece)
    return sentences


def clean_sentence(sentence: str) -> str | None:
    """The sentence, normalised (NFKC, plain apostrophes, single spaces), if the task keeps it:
    `MIN_WORDS` to `MAX_WORDS` words matching the shape described at `_SENTENCE`; else None."""
    text = unicodedata.normalize("NFKC", sentence).replace("\u2019", "'").replace("\u2018", "'")
    text = " ".join(text.split())
    if not MIN_WORDS <= len(text.split()) <= MAX_WORDS or not _SENTENCE.fullmatch(text):
        return None
    return text


def aclsum_papers() -> list[tuple[str, list[str]]]:
    """(paper id, paragraphs) of the 250 full-text ACL papers `aclsum` ships, sorted by id.

    The paragraphs are the abstract's and the body's (the S2ORC parse's `abstract` and
    `body_text`); acknowledgements and references are left out. The files are found through the
    installed distribution, without importing `aclsum` (whose import needs `sienna`).
    """
    try:
        dist = importlib.metadata.distribution("aclsum")
    except importlib.metadata.PackageNotFoundError:
        raise DataError(
            "building the demo data reads the ACL papers of the `aclsum` package, which is not "
            "installed; `pip install aclsum==0.1.2 --no-deps` (the shipped files need nothing)."
        ) from None
    root = Path(dist.locate_file("aclsum/dataset/paper_jsons"))
    files = sorted(root.glob("*.json"))
    if not files:
        raise DataError(f"aclsum is installed but {root} holds no paper JSON files.")
    papers = []
    for file in files:
        with open(file, encoding="utf-8") as f:
            parse = json.load(f)["pdf_parse"]
        paragraphs = [p["text"] for p in parse["abstract"] + parse["body_text"]]
        papers.append((file.stem, paragraphs))
    return papers


def extract_sentences(papers: Iterable[tuple[str, Sequence[str]]]) -> list[tuple[str, str]]:
    """(paper id, sentence) for every sentence the task keeps, in order."""
    return [
        (paper, text)
        for paper, paragraphs in papers
        for paragraph in paragraphs
        for sentence in split_sentences(paragraph)
        if (text := clean_sentence(sentence)) is not None
    ]


def assign_splits(
    paper_ids: Sequence[str], seed: int, held_out_papers: Mapping[str, int] = HELD_OUT_PAPERS
) -> dict[str, str]:
    """paper id -> split: `held_out_papers[split]` papers per held-out split, drawn by `seed`.

    The order comes from `data.epoch_permutation`, a fixed integer hash, so it does not depend on
    NumPy's random streams.
    """
    from free_jax.data.order import epoch_permutation

    ids = sorted(set(paper_ids))
    held_out = sum(held_out_papers.values())
    if len(ids) <= held_out:
        raise DataError(f"{len(ids)} papers; need more than {held_out} to hold some out.")
    order = [ids[i] for i in epoch_permutation(len(ids), seed, 0)]
    assignment, start = {}, 0
    for split, count in held_out_papers.items():
        for paper in order[start : start + count]:
            assignment[paper] = split
        start += count
    for paper in order[start:]:
        assignment[paper] = "train"
    return assignment


def make_splits(
    sentences: Sequence[tuple[str, str]],
    seed: int,
    held_out_papers: Mapping[str, int] = HELD_OUT_PAPERS,
) -> dict[str, list[dict]]:
    """Rows `{"paper", "text"}` per split, deduplicated by source text.

    A source text occurs once in all splits: the training copy is kept, so no held-out source is
    one the model trained on.
    """
    assignment = assign_splits([paper for paper, _ in sentences], seed, held_out_papers)
    rows: dict[str, list[dict]] = {split: [] for split in SPLITS}
    seen: set[str] = set()
    for split in SPLITS:  # train first: it keeps the duplicates
        for paper, text in sentences:
            key = strip_punctuation(text).lower()
            if assignment[paper] == split and key not in seen:
                seen.add(key)
                rows[split].append({"paper": paper, "text": text})
    return rows


# ---------------------------------------------------------------------------- tokenizer


def train_tokenizer(
    texts: Sequence[str], directory: str | os.PathLike, vocab_size: int = VOCAB_SIZE
) -> Any:
    """Trains the T5-style SentencePiece tokenizer on `texts` into `directory`; returns it.

    Trained on each training sentence and its source form, so both the unpunctuated words of the
    input and the punctuated words of the output are whole pieces. Ids: pad 0, EOS 1,
    unk 2, no BOS; `EXTRA_IDS` sentinels after the SentencePiece pieces. Deterministic: one
    thread, no sampling or shuffling of the input.
    """
    import sentencepiece as spm

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    corpus = [t for text in texts for t in (text, strip_punctuation(text))]
    model = io.BytesIO()  # not model_prefix=..., whose path the model would record
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        vocab_size=vocab_size - EXTRA_IDS,
        model_type="unigram",
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    (directory / "spiece.model").write_bytes(model.getvalue())
    tokenizer = load_tokenizer(directory)
    # tokenizer_config.json records extra_ids, so plain T5Tokenizer/AutoTokenizer.from_pretrained
    # of the directory gives the same ids; the tokenizer.json it also writes is not needed.
    tokenizer.save_pretrained(str(directory))
    (directory / "tokenizer.json").unlink(missing_ok=True)
    return tokenizer


def fits(rows: Sequence[Mapping[str, str]], tokenizer: Any) -> list[bool]:
    """Whether each row's source (prefix included) and target fit the task's lengths with EOS."""
    texts = [r["text"] for r in rows]
    sources = [PREFIX + strip_punctuation(t) for t in texts]
    src = tokenizer(sources, add_special_tokens=False)["input_ids"]
    tgt = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [
        len(s) < MAX_SOURCE_LENGTH and len(t) < MAX_TARGET_LENGTH
        for s, t in zip(src, tgt, strict=True)
    ]


# ---------------------------------------------------------------------------- statistics


def add_full_stop(source: str) -> str:
    """A trivial baseline: the source with a full stop appended (the most predictable
    restoration: nearly every sentence ends with one)."""
    return source + "."


def baselines(texts: Sequence[str]) -> dict[str, list[str]]:
    """Trivial predictions for the targets `texts`, from their sources: "copy_input" (the source
    as it is, without punctuation) and "add_full_stop"."""
    sources = [strip_punctuation(t) for t in texts]
    return {
        "copy_input": sources,
        "add_full_stop": [add_full_stop(s) for s in sources],
    }


def score(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Punctuation F1 (the task's metric) with its precision and recall, sacreBLEU, ROUGE-L
    (blind to case and punctuation, for contrast) and the share of sentences restored exactly,
    all in [0, 100]."""
    from free_jax.data import metrics

    exact = np.mean([p == r for p, r in zip(predictions, references, strict=True)])
    return {
        **metrics.compute("punct_f1", predictions, references),
        "sacrebleu": metrics.compute("sacrebleu", predictions, references)["sacrebleu"],
        "rougeL": metrics.compute("rougeL", predictions, references)["rougeL"],
        "exact_match": 100.0 * float(exact),
    }


def _distribution(values: Sequence[int]) -> dict[str, float]:
    v = np.asarray(values)
    p = np.percentile(v, [5, 50, 95])
    return {
        "min": int(v.min()),
        "p5": float(p[0]),
        "median": float(p[1]),
        "mean": round(float(v.mean()), 2),
        "p95": float(p[2]),
        "max": int(v.max()),
    }


def statistics(rows: Mapping[str, Sequence[Mapping[str, str]]], tokenizer: Any) -> dict:
    """Per split: sizes, word and token length distributions, the share of target tokens that
    are copies of source tokens, the trivial baselines' scores (held-out splits), and how exactly
    the tokenizer round-trips the targets."""
    stats: dict[str, Any] = {}
    for split, split_rows in rows.items():
        texts = [r["text"] for r in split_rows]
        sources = [PREFIX + strip_punctuation(t) for t in texts]
        src_ids = tokenizer(sources, add_special_tokens=False)["input_ids"]
        tgt_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        copied = total = 0
        for s, t in zip(src_ids, tgt_ids, strict=True):
            available = collections.Counter(s)
            for token in t:
                total += 1
                if available[token] > 0:
                    available[token] -= 1
                    copied += 1
        decoded = tokenizer.batch_decode(tgt_ids, skip_special_tokens=True)
        entry = {
            "sentences": len(texts),
            "papers": len({r["paper"] for r in split_rows}),
            "words": _distribution([len(t.split()) for t in texts]),
            # +1: the EOS the data pipeline appends.
            "source_tokens": _distribution([len(s) + 1 for s in src_ids]),
            "target_tokens": _distribution([len(t) + 1 for t in tgt_ids]),
            "target_tokens_copied_from_source": round(copied / total, 4),
            "tokenizer_round_trip_exact": round(
                float(np.mean([d == t for d, t in zip(decoded, texts, strict=True)])), 4
            ),
            "sentences_with": {
                mark: int(sum(mark in t[:-1] for t in texts)) for mark in PUNCTUATION[:1] + ";:"
            },
        }
        if split != "train":
            entry["baselines"] = {
                name: score(predictions, texts) for name, predictions in baselines(texts).items()
            }
        stats[split] = entry
    return stats


# ---------------------------------------------------------------------------- build


def build_demo_data(
    out_dir: str | os.PathLike = ASSETS,
    seed: int = 0,
    *,
    papers: Iterable[tuple[str, Sequence[str]]] | None = None,
    vocab_size: int = VOCAB_SIZE,
    held_out_papers: Mapping[str, int] = HELD_OUT_PAPERS,
) -> dict:
    """Builds the demo task's files into `out_dir`; deterministic in (`papers`, `seed`).

    Steps: sentences (`extract_sentences`), splits by paper (`make_splits`), the tokenizer trained
    on the training sentences (`train_tokenizer`), then every split without the sentences that
    do not fit `MAX_SOURCE_LENGTH` / `MAX_TARGET_LENGTH` tokens, and their statistics.

    Args:
      out_dir: where the JSONL splits, `tokenizer/` and `stats.json` go.
      seed: draws the held-out papers.
      papers: (paper id, paragraphs) pairs; default: the ACL papers of `aclsum`
        (`aclsum_papers`).
      vocab_size: the tokenizer's ids, sentinels included.
      held_out_papers: papers per held-out split.

    Returns:
      The statistics written to `stats.json`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sentences = extract_sentences(aclsum_papers() if papers is None else papers)
    rows = make_splits(sentences, seed, held_out_papers)
    tok = train_tokenizer([r["text"] for r in rows["train"]], out_dir / "tokenizer", vocab_size)
    dropped = {}
    for split in SPLITS:
        keep = fits(rows[split], tok)
        dropped[split] = keep.count(False)
        rows[split] = [row for row, ok in zip(rows[split], keep, strict=True) if ok]
        if not rows[split]:
            raise DataError(f"the {split} split is empty; give more papers.")
        with open(out_dir / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for row in rows[split]:
                f.write(json.dumps(row, ensure_ascii=True) + "\n")
    stats = {
        "seed": seed,
        "vocab_size": len(tok),
        "max_source_length": MAX_SOURCE_LENGTH,
        "max_target_length": MAX_TARGET_LENGTH,
        "dropped_too_long": dropped,
        "splits": statistics(rows, tok),
    }
    with open(out_dir / "stats.json", "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=2)
        f.write("\n")
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m free_jax.data.demo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", default=str(ASSETS), help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="draws the held-out papers")
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = parser.parse_args(argv)
    stats = build_demo_data(args.out, args.seed, vocab_size=args.vocab_size)
    print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
