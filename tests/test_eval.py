"""The demo task's data: the builder's determinism and splits, the shipped files, the task."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from free_jax import data, demo_data, testing

SENTENCES = [
    "However, current models still fall behind their counterparts in translation quality.",
    "We propose a neural graph matching model for short text matching.",
    "The score places more importance on recall than precision.",
    "In our future work, we would like to extend this idea to unseen numbers.",
    "A beam search is then used to find the highest probability tag sequence.",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return testing.tiny_tokenizer(tmp_path_factory.mktemp("tok"))


# ---------------------------------------------------------------------------- demo data


def _shipped_papers(count: int) -> list[tuple[str, list[str]]]:
    """Real papers for the builder: the shipped training sentences of `count` papers, each
    sentence a paragraph (no need for aclsum)."""
    papers: dict[str, list[str]] = collections.defaultdict(list)
    for row in demo_data.read_split("train"):
        if row["paper"] in papers or len(papers) < count:
            papers[row["paper"]].append(row["text"])
    return sorted(papers.items())


def test_builder_is_deterministic_and_splits_are_disjoint(tmp_path):
    papers = _shipped_papers(10)
    held_out = {"validation": 2, "test": 2}
    kwargs = dict(papers=papers, vocab_size=400, held_out_papers=held_out)
    stats = demo_data.build_demo_data(tmp_path / "a", seed=1, **kwargs)
    demo_data.build_demo_data(tmp_path / "b", seed=1, **kwargs)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.*"))
    assert [str(f) for f in files] == [
        "stats.json",
        "test.jsonl",
        "tokenizer/spiece.model",
        "tokenizer/tokenizer_config.json",
        "train.jsonl",
        "validation.jsonl",
    ]
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    rows = {s: demo_data.read_split(s, tmp_path / "a") for s in demo_data.SPLITS}
    assert {s: len({r["paper"] for r in rows[s]}) for s in rows} == {
        "train": 6,
        "validation": 2,
        "test": 2,
    }
    _assert_disjoint(rows)
    assert stats["splits"]["test"]["sentences"] == len(rows["test"])
    assert set(stats["splits"]["test"]["baselines"]) == {"copy_input", "capitalise_and_period"}
    # Another seed holds out other papers.
    ids = [paper for paper, _ in papers]
    assignment = demo_data.assign_splits(ids, 2, held_out)
    assert {p for p, s in assignment.items() if s == "test"} != {r["paper"] for r in rows["test"]}


def _assert_disjoint(rows):
    papers = {s: {r["paper"] for r in rs} for s, rs in rows.items()}
    sources = {s: {demo_data.strip_punctuation(r["text"]) for r in rs} for s, rs in rows.items()}
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not papers[a] & papers[b], (a, b)
        assert not sources[a] & sources[b], (a, b)
    for rs in rows.values():
        assert len({demo_data.strip_punctuation(r["text"]) for r in rs}) == len(rs)


def test_shipped_data_splits_tokenizer_and_stats():
    rows = {s: demo_data.read_split(s) for s in demo_data.SPLITS}
    _assert_disjoint(rows)
    stats = json.loads((demo_data.ASSETS / "stats.json").read_text())
    for split, split_rows in rows.items():
        assert stats["splits"][split]["sentences"] == len(split_rows)
        for row in split_rows[:200]:
            assert demo_data.clean_sentence(row["text"]) == row["text"]
    tok = demo_data.load_tokenizer()
    assert len(tok) == demo_data.VOCAB_SIZE == stats["vocab_size"]
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.convert_ids_to_tokens(demo_data.VOCAB_SIZE - 1) == "<extra_id_0>"
    text = rows["test"][0]["text"]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


def test_the_demo_task_reads_its_shipped_files(tokenizer, tmp_path):
    task = data.get_task(demo_data.TASK_NAME)
    assert task.metric == "sacrebleu" and task.prefix == "restore: "
    assert task.source({"text": "However, BERT works; see: it."}) == "however bert works see it"
    # No data_files: the task's shipped file of the split.
    examples = data.load_examples(task, tokenizer, split="validation", cache_dir=tmp_path)
    assert (
        len(examples)
        == json.loads((demo_data.ASSETS / "stats.json").read_text())["splits"]["validation"][
            "sentences"
        ]
    )
    with pytest.raises(data.DataError, match="ships the splits"):
        data.load_examples(task, tokenizer, split="dev", cache_dir=tmp_path)


def test_sentence_cleaning_and_splitting():
    assert demo_data.split_sentences("We use e.g. BERT here. It works. Smith et al. did so.") == [
        "We use e.g. BERT here.",
        "It works.",
        "Smith et al. did so.",
    ]
    keep = "However, current models still fall behind their counterparts in quality."
    assert demo_data.clean_sentence(keep) == keep
    assert demo_data.clean_sentence("Too short, really.") is None
    assert (
        demo_data.clean_sentence("We follow Smith et al. (2019) in all eight of our tests.") is None
    )
    assert (
        demo_data.clean_sentence("It reaches 3.5 points of BLEU on all eight of the tests.") is None
    )
    curly = "The model\u2019s outputs are compared with the reference in every single case."
    assert demo_data.clean_sentence(curly) == curly.replace("\u2019", "'")


@pytest.mark.slow
def test_shipped_files_equal_a_fresh_build_from_aclsum(tmp_path):
    import importlib.metadata

    try:
        importlib.metadata.distribution("aclsum")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("needs `pip install aclsum==0.1.2 --no-deps`")
    demo_data.build_demo_data(tmp_path)
    for f in ("train.jsonl", "validation.jsonl", "test.jsonl", "stats.json"):
        assert (tmp_path / f).read_bytes() == (demo_data.ASSETS / f).read_bytes(), f
    for f in ("spiece.model", "tokenizer_config.json"):
        assert (tmp_path / "tokenizer" / f).read_bytes() == (
            demo_data.ASSETS / "tokenizer" / f
        ).read_bytes()


def test_statistics_of_a_tiny_set(tokenizer):
    rows = {"test": [{"paper": "P", "text": s} for s in SENTENCES]}
    stats = demo_data.statistics(rows, tokenizer)["test"]
    assert stats["sentences"] == 5 and stats["papers"] == 1
    assert 0 < stats["target_tokens_copied_from_source"] < 1
    assert stats["baselines"]["copy_input"]["exact_match"] == 0.0
    assert np.isclose(stats["baselines"]["copy_input"]["rougeL"], 100.0)
