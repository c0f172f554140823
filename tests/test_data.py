"""Input pipeline: each task's file format, tokenisation, the batch contract, order, resume, cache.

Every file is written here in the real format of its task (SAMSum JSONL and CSV, CNN/DailyMail
JSONL, SQuAD rows and SQuAD's official nested JSON, IWSLT translation dicts, Multi-News, BIGPATENT)
and read offline.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from free_jax import data, testing
from free_jax.data import examples as examples_module
from free_jax.errors import ConfigError, DataError

SAMSUM = [
    {
        "id": "13818513",
        "dialogue": "Amanda: I baked cookies. Do you want some?\r\nJerry: Sure!\r\n"
        "Amanda: I'll bring you tomorrow :-)",
        "summary": "Amanda baked cookies and will bring Jerry some tomorrow.",
    },
    {
        "id": "13728867",
        "dialogue": "Olivia: Who are you voting for in this election?\r\n"
        "Oliver: Liberals as always.\r\nOlivia: Me too!!\r\nOliver: Great",
        "summary": "Olivia and Olivier are voting for liberals in this election.",
    },
    {
        "id": "13681000",
        "dialogue": "Tim: Hi, what's up?\r\nKim: Bad mood tbh, I was going to do lots of "
        "stuff but ended up procrastinating\r\nTim: What did you plan on doing?",
        "summary": "Kim may try the pomodoro technique recommended by Tim to get more stuff done.",
    },
]
CNN = {
    "article": "(CNN) -- The river rose through the night and the town woke to water in the "
    "streets. Officials said the bridge would stay closed until the morning.",
    "highlights": "The river rose through the night .\nThe bridge stays closed until morning .",
    "id": "0001d1afc246a7964130f43ae940af6bc6c57f01",
}
SQUAD = {
    "id": "5733be284776f41900661182",
    "title": "University_of_Notre_Dame",
    "context": "Architecturally, the school has a Catholic character. Atop the Main Building's "
    "gold dome is a golden statue of the Virgin Mary.",
    "question": "What sits on top of the Main Building at Notre Dame?",
    "answers": {
        "text": ["a golden statue of the Virgin Mary", "golden statue"],
        "answer_start": [92, 94],
    },
}
IWSLT = {"translation": {"de": "Vielen Dank, Chris.", "en": "Thank you so much, Chris."}}
MULTI_NEWS = {
    "document": "The mayor spoke on Monday. ||||| The council voted on Tuesday.",
    "summary": "– The mayor spoke and the council voted.",
}
BIG_PATENT = {
    "description": "BACKGROUND OF THE INVENTION The invention relates to a cup holder.",
    "abstract": "A cup holder for a car.",
}


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _t5_ids(tokenizer, text: str, max_length: int) -> list[int]:
    # The T5 tokenizer's own rule (truncate, then EOS) is what load_examples must reproduce.
    return tokenizer(text, max_length=max_length, truncation=True)["input_ids"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return testing.tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


@pytest.fixture
def samsum_file(tmp_path):
    return _jsonl(tmp_path / "samsum_train.jsonl", SAMSUM)


@pytest.fixture
def many(tmp_path, tok, cache):
    """23 short SAMSum-shaped examples of five source and three target lengths."""
    words = "one two three four five six seven eight nine ten".split()
    rows = [
        {"dialogue": " ".join(words[: 1 + i % 5]), "summary": " ".join(words[: 1 + i % 3])}
        for i in range(23)
    ]
    task = data.get_task("samsum", max_source_length=32, max_target_length=8)
    return data.load_examples(
        task, tok, data_files=_jsonl(tmp_path / "many.jsonl", rows), cache_dir=cache
    )


# ---------------------------------------------------------------------------- tasks


def test_registry_holds_the_paper_tasks():
    tasks = data.TASKS
    assert set(tasks) == {
        "samsum",
        "cnn_dailymail",
        "squad",
        "multi_news",
        "big_patent",
        "iwslt2017_de_en",
        "acl_punct",  # the embedded demo's (free_jax.data.demo; tested in test_eval.py)
    }
    for name in ("samsum", "cnn_dailymail", "multi_news", "big_patent"):
        assert tasks[name].prefix == "summarize: "
        assert tasks[name].metric == "rougeL"
    assert tasks["iwslt2017_de_en"].prefix == "translate German to English: "
    assert tasks["iwslt2017_de_en"].metric == "sacrebleu"
    assert tasks["iwslt2017_de_en"].hub_config == "iwslt2017-de-en"
    assert tasks["cnn_dailymail"].hub_config == "3.0.0"
    assert tasks["squad"].metric == "squad_f1"
    for name in ("samsum", "cnn_dailymail", "squad", "iwslt2017_de_en"):
        assert (tasks[name].max_source_length, tasks[name].max_target_length) == (512, 128)
    for name in ("multi_news", "big_patent"):  # LongT5
        assert (tasks[name].max_source_length, tasks[name].max_target_length) == (2048, 512)
    assert data.get_task("samsum", max_source_length=64).max_source_length == 64
    with pytest.raises(ConfigError, match="unknown task 'xsum'.*samsum"):
        data.get_task("xsum")
    with pytest.raises(ConfigError, match=r"unknown Task fields \['max_len'\]; valid: .*prefix"):
        data.get_task("samsum", max_len=4)


# ---------------------------------------------------------------------------- formats


def test_samsum_jsonl_prefix_eos_and_references(tok, samsum_file, cache):
    ex = data.load_examples("samsum", tok, data_files=samsum_file, cache_dir=cache)
    assert len(ex) == 3 and ex.split == "train" and not ex.from_cache
    for i, row in enumerate(SAMSUM):
        np.testing.assert_array_equal(
            ex.source_ids(i), _t5_ids(tok, "summarize: " + row["dialogue"], 512)
        )
        np.testing.assert_array_equal(ex.target_ids(i), _t5_ids(tok, row["summary"], 128))
        assert ex.source_ids(i)[-1] == tok.eos_token_id == ex.target_ids(i)[-1]
    assert ex.references == tuple(r["summary"] for r in SAMSUM)
    assert ex.source_tokens.dtype == np.int32


def test_select_keeps_the_chosen_examples_in_order(tok, samsum_file, cache):
    ex = data.load_examples("samsum", tok, data_files=samsum_file, cache_dir=cache)
    picked = ex.select([2, 0])
    assert len(picked) == 2 and picked.references == (ex.references[2], ex.references[0])
    for i, j in enumerate([2, 0]):
        np.testing.assert_array_equal(picked.source_ids(i), ex.source_ids(j))
        np.testing.assert_array_equal(picked.target_ids(i), ex.target_ids(j))
    np.testing.assert_array_equal(picked.row_ids, ex.row_ids[[2, 0]])
    with pytest.raises(DataError, match=r"in \[0, 3\).*got 0\.\.3"):
        ex.select([0, 3])


def test_samsum_csv_drops_empty_rows(tok, tmp_path, cache):
    # The SAMSum release on the hub is CSV (id, dialogue, summary); one row lacks a dialogue.
    path = tmp_path / "samsum.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "dialogue", "summary"])
        writer.writeheader()
        writer.writerow(SAMSUM[0])
        writer.writerow({"id": "x", "dialogue": "", "summary": "nothing"})
        writer.writerow(SAMSUM[1])
    ex = data.load_examples("samsum", tok, data_files=path, cache_dir=cache)
    assert len(ex) == 2 and ex.num_dropped == 1
    np.testing.assert_array_equal(ex.row_ids, [0, 2])
    np.testing.assert_array_equal(
        ex.source_ids(1), _t5_ids(tok, "summarize: " + SAMSUM[1]["dialogue"], 512)
    )
    strict = data.get_task("samsum", drop_empty=False)
    with pytest.raises(DataError, match="row 1 has an empty source"):
        data.load_examples(strict, tok, data_files=path, cache_dir=cache)


@pytest.mark.parametrize(
    "task, row, source, target, reference",
    [
        (
            "cnn_dailymail",
            CNN,
            "summarize: " + CNN["article"],
            CNN["highlights"],
            CNN["highlights"],
        ),
        (
            "iwslt2017_de_en",
            IWSLT,
            "translate German to English: Vielen Dank, Chris.",
            "Thank you so much, Chris.",
            "Thank you so much, Chris.",
        ),
        (
            "multi_news",
            MULTI_NEWS,
            "summarize: " + MULTI_NEWS["document"],
            MULTI_NEWS["summary"],
            MULTI_NEWS["summary"],
        ),
        (
            "big_patent",
            BIG_PATENT,
            "summarize: " + BIG_PATENT["description"],
            BIG_PATENT["abstract"],
            BIG_PATENT["abstract"],
        ),
    ],
)
def test_jsonl_formats(tok, tmp_path, cache, task, row, source, target, reference):
    ex = data.load_examples(
        task, tok, data_files=_jsonl(tmp_path / "d.jsonl", [row]), cache_dir=cache
    )
    lengths = data.get_task(task)
    np.testing.assert_array_equal(ex.source_ids(0), _t5_ids(tok, source, lengths.max_source_length))
    np.testing.assert_array_equal(ex.target_ids(0), _t5_ids(tok, target, lengths.max_target_length))
    assert ex.references == (reference,)


SQUAD_SOURCE = (
    "question: What sits on top of the Main Building at Notre Dame? context: " + SQUAD["context"]
)


def test_squad_rows_json_with_nested_answers(tok, tmp_path, cache):
    # The hub's row layout as one JSON array: answers = {"text": [...], "answer_start": [...]}.
    other = dict(SQUAD, id="2", answers={"text": ["Virgin Mary"], "answer_start": [120]})
    path = tmp_path / "squad.json"
    path.write_text(json.dumps([SQUAD, other]), encoding="utf-8")
    ex = data.load_examples("squad", tok, split="validation", data_files=path, cache_dir=cache)
    np.testing.assert_array_equal(ex.source_ids(0), _t5_ids(tok, SQUAD_SOURCE, 512))
    # Train on the first gold answer, evaluate against all of them.
    np.testing.assert_array_equal(ex.target_ids(0), _t5_ids(tok, SQUAD["answers"]["text"][0], 128))
    assert ex.references == (tuple(SQUAD["answers"]["text"]), ("Virgin Mary",))


def test_squad_official_nested_json(tok, tmp_path, cache):
    # SQuAD v1.1's own file: data -> paragraphs -> qas -> answers.
    official = {
        "version": "1.1",
        "data": [
            {
                "title": SQUAD["title"],
                "paragraphs": [
                    {
                        "context": SQUAD["context"],
                        "qas": [
                            {
                                "id": SQUAD["id"],
                                "question": SQUAD["question"],
                                "answers": [
                                    {"text": t, "answer_start": s}
                                    for t, s in zip(
                                        SQUAD["answers"]["text"],
                                        SQUAD["answers"]["answer_start"],
                                        strict=True,
                                    )
                                ],
                            }
                        ],
                    }
                ],
            }
        ],
    }
    path = tmp_path / "dev-v1.1.json"
    path.write_text(json.dumps(official), encoding="utf-8")
    ex = data.load_examples("squad", tok, split="validation", data_files=path, cache_dir=cache)
    assert len(ex) == 1
    np.testing.assert_array_equal(ex.source_ids(0), _t5_ids(tok, SQUAD_SOURCE, 512))
    assert ex.references == (tuple(SQUAD["answers"]["text"]),)


def test_custom_fields_dotted_paths_and_functions(tok, tmp_path, cache):
    rows = [{"pair": {"src": ["Guten Morgen."]}, "tgt": {"text": "Good morning."}}]
    path = _jsonl(tmp_path / "pairs.jsonl", rows)
    task = data.get_task(
        "iwslt2017_de_en", source="pair.src.0", target=lambda row: row["tgt"]["text"]
    )
    ex = data.load_examples(task, tok, data_files=path, cache_dir=cache)
    np.testing.assert_array_equal(
        ex.source_ids(0), _t5_ids(tok, "translate German to English: Guten Morgen.", 512)
    )
    assert ex.references == ("Good morning.",)


def test_truncation_keeps_eos(tok, samsum_file, cache):
    task = data.get_task("samsum", max_source_length=8, max_target_length=4)
    ex = data.load_examples(task, tok, data_files=samsum_file, cache_dir=cache)
    np.testing.assert_array_equal(ex.source_lengths, [8, 8, 8])
    np.testing.assert_array_equal(ex.target_lengths, [4, 4, 4])
    for i, row in enumerate(SAMSUM):
        np.testing.assert_array_equal(
            ex.source_ids(i), _t5_ids(tok, "summarize: " + row["dialogue"], 8)
        )
        assert ex.target_ids(i)[-1] == tok.eos_token_id
    assert ex.references[0] == SAMSUM[0]["summary"]  # references are never truncated


# ---------------------------------------------------------------------------- batches


def test_batch_contract(tok, samsum_file, cache):
    task = data.get_task("samsum", max_source_length=48, max_target_length=20)
    ex = data.load_examples(task, tok, data_files=samsum_file, cache_dir=cache)
    batches = data.TrainBatches(ex, 3, seed=0)
    batch = batches.batch_at(0)
    assert set(batch) == set(data.BATCH_KEYS)
    for key, shape, dtype in [
        ("input_ids", (3, 48), np.int32),
        ("attention_mask", (3, 48), np.int32),
        ("decoder_input_ids", (3, 20), np.int32),
        ("labels", (3, 20), np.int32),
        ("loss_mask", (3, 20), np.float32),
    ]:
        assert batch[key].shape == shape and batch[key].dtype == dtype, key
    rows = batches.global_indices(0)
    assert sorted(rows) == [0, 1, 2]
    for r, i in enumerate(rows):
        src, tgt = ex.source_ids(i), ex.target_ids(i)
        np.testing.assert_array_equal(batch["input_ids"][r, : len(src)], src)
        assert (batch["input_ids"][r, len(src) :] == 0).all()
        assert (
            batch["attention_mask"][r].sum()
            == len(src)
            == batch["attention_mask"][r, : len(src)].sum()
        )
        np.testing.assert_array_equal(batch["labels"][r, : len(tgt)], tgt)
        assert (batch["labels"][r, len(tgt) :] == 0).all()  # pad after EOS
        assert batch["loss_mask"][r].sum() == len(tgt) == batch["loss_mask"][r, : len(tgt)].sum()
        assert batch["labels"][r, len(tgt) - 1] == tok.eos_token_id  # EOS is a loss position
    # The decoder starts with the pad id, then reads the labels shifted right.
    np.testing.assert_array_equal(batch["decoder_input_ids"][:, 0], 0)
    np.testing.assert_array_equal(batch["decoder_input_ids"][:, 1:], batch["labels"][:, :-1])


def test_same_seed_and_step_same_batch(many):
    a = data.TrainBatches(many, 4, seed=7)
    b = data.TrainBatches(many, 4, seed=7)
    c = data.TrainBatches(many, 4, seed=8)
    for step in (0, 3, 11, 40):
        for key in data.BATCH_KEYS:
            np.testing.assert_array_equal(a.batch_at(step)[key], b.batch_at(step)[key])
    assert any(
        not np.array_equal(a.global_indices(s), c.global_indices(s))
        for s in range(a.steps_per_epoch)
    )
    # Epochs differ, and each visits distinct examples.
    assert a.steps_per_epoch == 5
    first = np.concatenate([a.global_indices(s) for s in range(5)])
    second = np.concatenate([a.global_indices(s) for s in range(5, 10)])
    assert len(set(first)) == 20 and len(set(second)) == 20
    assert not np.array_equal(first, second)


def test_order_is_pinned():
    # A fixed hash, not NumPy's generator streams: resumes survive NumPy upgrades.
    np.testing.assert_array_equal(
        data.epoch_permutation(10, seed=0, epoch=0), [0, 7, 3, 1, 9, 5, 4, 6, 8, 2]
    )
    perm = data.epoch_permutation(1000, seed=5, epoch=2)
    np.testing.assert_array_equal(np.sort(perm), np.arange(1000))


def test_resumed_iterator_equals_uninterrupted(many):
    full = list(data.TrainBatches(many, 4, seed=1).iterate(0, 13))
    resumed = list(data.TrainBatches(many, 4, seed=1).iterate(start_step=7, num_steps=6))
    for a, b in zip(full[7:], resumed, strict=True):
        for key in data.BATCH_KEYS:
            np.testing.assert_array_equal(a[key], b[key])
    assert next(iter(data.TrainBatches(many, 4, seed=1)))["input_ids"].shape == (4, 32)


def test_process_slices_partition_the_global_batch(many):
    whole = data.TrainBatches(many, 6, seed=2, source_buckets=(8, 16), drop_remainder=False)
    parts = [
        data.TrainBatches(
            many,
            6,
            seed=2,
            source_buckets=(8, 16),
            drop_remainder=False,
            process_index=p,
            process_count=3,
        )
        for p in range(3)
    ]
    assert parts[0].local_batch_size == 2
    for step in range(whole.steps_per_epoch + 2):
        expected = whole.batch_at(step)
        got = [p.batch_at(step) for p in parts]
        for key in data.BATCH_KEYS:
            np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), expected[key])
    with pytest.raises(ConfigError, match="not divisible by process_count=4"):
        data.TrainBatches(many, 6, process_count=4)
    with pytest.raises(ConfigError, match="process_index=3, process_count=3"):
        data.TrainBatches(many, 6, process_index=3, process_count=3)


def test_last_partial_batch_dropped_or_padded(many):
    dropped = data.TrainBatches(many, 5, seed=0)
    assert dropped.steps_per_epoch == 4  # 23 // 5
    padded = data.TrainBatches(many, 5, seed=0, drop_remainder=False)
    assert padded.steps_per_epoch == 5
    rows = padded.global_indices(4)
    np.testing.assert_array_equal(rows[3:], [-1, -1])
    seen = np.concatenate([padded.global_indices(s) for s in range(5)])
    assert sorted(seen[seen >= 0]) == list(range(23))  # every example once per epoch
    last = padded.batch_at(4)
    assert last["input_ids"].shape == (5, 32)
    assert (last["attention_mask"][3:] == 0).all() and (last["loss_mask"][3:] == 0).all()
    assert (last["input_ids"][3:] == 0).all() and (last["labels"][3:] == 0).all()


def test_length_buckets(many):
    batches = data.TrainBatches(many, 2, seed=0, source_buckets=(16, 24), target_buckets=[4])
    assert batches.shapes() == [(16, 4), (16, 8), (24, 4), (24, 8), (32, 4), (32, 8)]
    seen = set()
    for step in range(20):
        batch = batches.batch_at(step)
        s, t = batch["input_ids"].shape[1], batch["labels"].shape[1]
        assert (s, t) in batches.shapes()
        rows = batches.global_indices(step)
        need_s, need_t = many.source_lengths[rows].max(), many.target_lengths[rows].max()
        assert s == min(b for b in (16, 24, 32) if b >= need_s)
        assert t == min(b for b in (4, 8) if b >= need_t)
        assert batch["attention_mask"].sum() == many.source_lengths[rows].sum()
        seen.add((s, t))
    assert len(seen) >= 3
    with pytest.raises(ConfigError, match=r"source_buckets=\[8, 40\]: \[40\] not in \[1, 32\]"):
        data.TrainBatches(many, 4, source_buckets=[8, 40])


def test_group_by_length_keeps_epochs_and_cuts_padding(many):
    plain = data.TrainBatches(many, 2, seed=3, source_buckets=(8, 16, 24))
    grouped = data.TrainBatches(many, 2, seed=3, source_buckets=(8, 16, 24), group_by_length=4)
    longer = np.maximum(many.source_lengths, many.target_lengths)

    def padded_cost(batches, epoch):
        steps = range(epoch * batches.steps_per_epoch, (epoch + 1) * batches.steps_per_epoch)
        return sum(batches.batch_at(s)["input_ids"].size for s in steps)

    for epoch in (0, 1):
        steps = range(epoch * grouped.steps_per_epoch, (epoch + 1) * grouped.steps_per_epoch)
        rows = np.concatenate([grouped.global_indices(s) for s in steps])
        assert len(set(rows)) == len(rows) == 22  # 23 // 2 batches, each example at most once
        # Within a window of 4 batches the rows are sorted by length, so batches are narrower.
        assert padded_cost(grouped, epoch) < padded_cost(plain, epoch)
        spread = [np.ptp(longer[grouped.global_indices(s)]) for s in steps]
        plain_spread = [np.ptp(longer[plain.global_indices(s)]) for s in steps]
        assert np.mean(spread) < np.mean(plain_spread)
    # A pure function of (seed, step): a fresh instance, resumed mid-epoch, agrees.
    again = data.TrainBatches(many, 2, seed=3, source_buckets=(8, 16, 24), group_by_length=4)
    for step in (13, 2, 30):
        np.testing.assert_array_equal(again.global_indices(step), grouped.global_indices(step))
    other = data.TrainBatches(many, 2, seed=4, source_buckets=(8, 16, 24), group_by_length=4)
    assert any(
        not np.array_equal(other.global_indices(s), grouped.global_indices(s)) for s in range(11)
    )
    # drop_remainder=False: the remainder still comes last, in a padded batch.
    padded = data.TrainBatches(many, 5, seed=0, drop_remainder=False, group_by_length=2)
    seen = np.concatenate([padded.global_indices(s) for s in range(padded.steps_per_epoch)])
    assert sorted(seen[seen >= 0]) == list(range(23))
    for bad in (1, -2, 2.5):
        with pytest.raises(ConfigError, match="group_by_length"):
            data.TrainBatches(many, 2, group_by_length=bad)


def test_eval_batches_in_order_with_references(many):
    batches = list(data.eval_batches(many, 5))
    assert len(batches) == 5
    ids = np.concatenate([b.example_ids for b in batches])
    np.testing.assert_array_equal(ids[:23], np.arange(23))
    np.testing.assert_array_equal(ids[23:], [-1, -1])
    assert sum((b.references for b in batches), ()) == many.references
    assert all(isinstance(r, str) for r in many.references)
    assert all(b.arrays["input_ids"].shape == (5, 32) for b in batches)
    assert (batches[-1].arrays["loss_mask"][3:] == 0).all()
    # Two processes: each takes its half of every batch, references included.
    halves = [list(data.eval_batches(many, 4, process_index=p, process_count=2)) for p in (0, 1)]
    refs = sum((a.references + b.references for a, b in zip(*halves, strict=True)), ())
    assert refs == many.references
    firsts = list(data.eval_batches(many, 1, max_examples=3, source_buckets=(8, 16)))
    assert [b.references[0] for b in firsts] == list(many.references[:3])
    assert all(b.arrays["input_ids"].shape[1] in (8, 16, 32) for b in firsts)


# ---------------------------------------------------------------------------- cache


def test_cache_hit_and_invalidation(tok, samsum_file, cache, monkeypatch, tmp_path):
    calls = []
    encode = examples_module._encode

    def counting(tokenizer, texts, max_length):
        calls.append(len(texts))
        return encode(tokenizer, texts, max_length)

    monkeypatch.setattr(examples_module, "_encode", counting)

    def load(task="samsum", tokenizer=tok, **kw):
        calls.clear()
        ex = data.load_examples(task, tokenizer, data_files=samsum_file, cache_dir=cache, **kw)
        return ex, len(calls)

    first, n = load()
    assert n == 2 and not first.from_cache
    second, n = load()
    assert n == 0 and second.from_cache
    for a, b in [
        (first.source_tokens, second.source_tokens),
        (first.source_offsets, second.source_offsets),
        (first.target_tokens, second.target_tokens),
        (first.row_ids, second.row_ids),
    ]:
        np.testing.assert_array_equal(a, b)
    assert first.references == second.references
    # Other lengths, another tokenizer, an edited file: tokenised again.
    ex, n = load(data.get_task("samsum", max_target_length=16))
    assert n == 2 and not ex.from_cache
    other = testing.tiny_tokenizer(tmp_path / "tok2")
    assert data.tokenizer_fingerprint(other) == data.tokenizer_fingerprint(tok)
    other.add_tokens(["<speaker>"])
    assert data.tokenizer_fingerprint(other) != data.tokenizer_fingerprint(tok)
    ex, n = load(tokenizer=other)
    assert n == 2 and not ex.from_cache
    _jsonl(samsum_file, SAMSUM[:2])
    ex, n = load()
    assert n == 2 and len(ex) == 2
    ex, n = load(use_cache=False)
    assert n == 2 and ex.cache_key == ""


# ---------------------------------------------------------------------------- errors


def test_missing_file_and_bad_suffix(tok, tmp_path, cache):
    with pytest.raises(DataError, match=r"data file '.*nope\.jsonl' does not exist"):
        data.load_examples("samsum", tok, data_files=tmp_path / "nope.jsonl", cache_dir=cache)
    bad = tmp_path / "samsum.txt"
    bad.write_text("hello")
    with pytest.raises(
        DataError, match=r"suffix '\.txt'; supported: \['\.csv', '\.json', '\.jsonl'\]"
    ):
        data.load_examples("samsum", tok, data_files=bad, cache_dir=cache)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"dialogue": "a", "summary": \n')
    with pytest.raises(DataError, match=r"could not read .*broken\.jsonl as JSON"):
        data.load_examples("samsum", tok, data_files=broken, cache_dir=cache)


def test_missing_field_names_file_field_and_fields_present(tok, tmp_path, cache):
    path = _jsonl(tmp_path / "cnn.jsonl", [{"id": "1", "article": "Some text."}])
    with pytest.raises(DataError) as info:
        data.load_examples("cnn_dailymail", tok, data_files=path, cache_dir=cache)
    message = str(info.value)
    assert "cnn.jsonl" in message and "'highlights'" in message and "['id', 'article']" in message
    # A missing nested key is found row by row.
    path = _jsonl(tmp_path / "iwslt.jsonl", [{"translation": {"de": "Hallo.", "fr": "Salut."}}])
    with pytest.raises(
        DataError,
        match=r"iwslt\.jsonl: row 0: the target field 'translation\.en'.*"
        r"'translation\.en' not found; present there: \['de', 'fr'\]",
    ):
        data.load_examples("iwslt2017_de_en", tok, data_files=path, cache_dir=cache)
    path = _jsonl(tmp_path / "num.jsonl", [{"dialogue": "A: hi", "summary": 3}])
    with pytest.raises(DataError, match="row 0: the target field is a int"):
        data.load_examples("samsum", tok, data_files=path, cache_dir=cache)


def test_hub_unreachable_is_a_clear_error(tok, cache, monkeypatch):
    import datasets
    import huggingface_hub.constants

    # What HF_DATASETS_OFFLINE=1 / HF_HUB_OFFLINE=1 set at import time.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as info:
        data.load_examples("cnn_dailymail", tok, split="validation", cache_dir=cache)
    message = str(info.value)
    assert "no network is reachable" in message
    assert "abisee/cnn_dailymail" in message and "data_files=" in message
    custom = data.Task(name="mine", source="a", target="b")
    with pytest.raises(DataError, match="task 'mine' has no hub dataset; pass its local files"):
        data.load_examples(custom, tok, cache_dir=cache)


def test_hub_offline_env_in_a_fresh_process(tmp_path):
    script = textwrap.dedent(
        f"""
        from free_jax import data
        class Tok:
            eos_token_id, pad_token_id = 1, 0
        try:
            data.load_examples("samsum", Tok(), cache_dir={str(tmp_path)!r})
        except data.DataError as e:
            print("DataError:", e)
        """
    )
    env = {
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(Path(data.__file__).parents[2]),
    }
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("DataError: task 'samsum'")
    assert "no network is reachable" in out.stdout and "Traceback" not in out.stderr


def test_bad_lengths_and_batch_sizes(many):
    with pytest.raises(ConfigError, match="max_source_length=1; must be an int >= 2"):
        data.get_task("samsum", max_source_length=1)
    with pytest.raises(ConfigError, match="max_target_length=0"):
        data.Task(name="t", source="a", target="b", max_target_length=0)
    with pytest.raises(ConfigError, match="metric='bleu'"):
        data.get_task("samsum", metric="bleu")
    with pytest.raises(ConfigError, match="batch size 0; must be a positive int"):
        data.TrainBatches(many, 0)
    with pytest.raises(ConfigError, match="23 examples, fewer than one batch of 32"):
        data.TrainBatches(many, 32)
    with pytest.raises(ConfigError, match="batch size -1"):
        next(data.eval_batches(many, -1))
    with pytest.raises(ConfigError, match="step=-1"):
        data.TrainBatches(many, 4).batch_at(-1)
    with pytest.raises(ConfigError, match="batch shape is \\(8, 8\\)"):
        data.make_batch(many, np.arange(4), source_length=8, target_length=8)


def test_trainer_batch_source_is_deterministic_and_resumable(tok, samsum_file, cache, monkeypatch):
    from free_jax.training import inputs

    monkeypatch.setenv("FREE_JAX_CACHE", str(cache))
    from free_jax.training.config import DataConfig

    config = DataConfig(
        task="samsum", dataset=str(samsum_file), source_length=24, target_length=8, batch_size=2
    )
    source = inputs.source_for(config, split="train", seed=3, batch_size=2, tokenizer=tok)
    first = [b for _, b in zip(range(4), source(0), strict=False)]
    resumed = next(iter(source(2)))
    for key in data.BATCH_KEYS:
        np.testing.assert_array_equal(resumed[key], first[2][key])
        assert first[0][key].shape[0] == 2
    assert first[0]["input_ids"].shape == (2, 24) and first[0]["labels"].shape == (2, 8)
    with pytest.raises(ConfigError, match="needs a tokenizer"):
        data.make_batch_source(config, split="train", seed=0, batch_size=2, tokenizer=None)
