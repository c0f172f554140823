"""The evaluation harness, `free-jax eval` / `free-jax demo`, and the demo task's data.

Models here are tiny and random (`free_jax.testing`), so their outputs are noise; what is tested is
the harness: the report's fields and their consistency, exact mode against the full model, the
files written, the data builder's determinism and splits, and clear errors for bad input.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import free_jax
from free_jax import cli, data, evaluation, testing
from free_jax.cli import evaluate as cli_evaluate
from free_jax.data import demo
from free_jax.errors import InputError
from free_jax.evaluation import harness
from free_jax.evaluation import report as report_module

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


@pytest.fixture(scope="module")
def checkpoint(tokenizer, tmp_path_factory):
    # Two decoder blocks: the exit layer is 1 and the static sweep a single exit.
    model = testing.tiny_model("v1.1", seed=3, tokenizer=tokenizer, num_decoder_layers=2)
    return free_jax.save(model, tmp_path_factory.mktemp("ckpt") / "model")


@pytest.fixture(scope="module")
def model(checkpoint):
    return free_jax.load(checkpoint)


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sentences.jsonl"
    path.write_text("".join(json.dumps({"paper": "P", "text": s}) + "\n" for s in SENTENCES))
    return path


@pytest.fixture(scope="module")
def examples(tokenizer, jsonl, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    task = demo.TASK_NAME
    return data.load_examples(task, tokenizer, split="test", data_files=jsonl, cache_dir=cache)


# The runs that decode, in one subprocess whose XLA compiles without LLVM optimisation: compiling
# the decode loops (FREE's above all) is nearly all of this file's time, and the flag cuts it
# about 3.5x. Timings are never asserted on, so the slower code it makes does not matter; the
# flag cannot be set in this process, whose XLA backend other tests may have started.
_RUNS = """
import contextlib, dataclasses, io, pickle, sys
import free_jax
from free_jax import cli, data, evaluation
from free_jax.data import demo


def share_compilation(spec):
    # FREE with a fixed threshold also records agreement, so that it shares the adaptive
    # threshold's compilation (one FREE compilation fewer).
    if spec.method == "free" and spec.mode == "default" and not spec.adaptive:
        return dataclasses.replace(spec, options=(("record_agreement", True),))
    return spec


ckpt, jsonl, work = sys.argv[1:4]
model = free_jax.load(ckpt)
examples = data.load_examples(
    demo.TASK_NAME, model.tokenizer, split="test", data_files=jsonl, cache_dir=work
)
common = dict(max_examples=4, max_new_tokens=8, progress=False)
report = evaluation.evaluate(
    model,
    examples,
    [share_compilation(s) for s in evaluation.default_methods(model)],
    sweep=[share_compilation(s) for s in evaluation.default_sweep(model, (0.5, 0.05))],
    baselines={
        "copy_input": evaluation.copy_input,
        "add_full_stop": demo.add_full_stop,
    },
    **common,
)
full = [evaluation.MethodSpec(method="full")]
batched = evaluation.evaluate(model, examples, full, batch_size=2, **common)
argv = [
    "eval", "--model", ckpt, "--task", "acl_punct", "--data-files", jsonl, "--out", work + "/cli",
    "--cache-dir", work, "--max-examples", "2", "--max-new-tokens", "8", "--methods", "full",
    "free:exact@1", "--no-sweep", "--no-progress", "--no-compile-cache",
]
stdout = io.StringIO()
with contextlib.redirect_stdout(stdout):
    status = cli.main(argv)
with open(work + "/runs.pkl", "wb") as f:
    pickle.dump({"report": report, "batched": batched, "cli": (status, stdout.getvalue())}, f)
"""


@pytest.fixture(scope="module")
def runs(checkpoint, jsonl, tmp_path_factory):
    work = tmp_path_factory.mktemp("runs")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(free_jax.__file__).parents[1]), env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    out = subprocess.run(
        [sys.executable, "-c", _RUNS, str(checkpoint), str(jsonl), str(work)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    with open(work / "runs.pkl", "rb") as f:
        result = pickle.load(f)
    result["work"] = work
    return result


@pytest.fixture(scope="module")
def report(runs):
    return runs["report"]


# ---------------------------------------------------------------------------- the harness


def test_report_fields_and_consistency(report):
    labels = [r.spec.name for r in report.methods]
    assert labels == [
        "full",
        "static Ls=1",
        "calm thr=0.90 Ls=1",
        "free thr=0.90 Ls=1",
        "free adaptive Ls=1",
        "free exact thr=0.90 Ls=1",
    ]
    assert [r.spec.name for r in report.sweep] == [
        "static Ls=1",
        "calm thr=0.50 Ls=1",
        "calm thr=0.05 Ls=1",
        "free thr=0.50 Ls=1",
        "free thr=0.05 Ls=1",
    ]
    assert report.num_examples == 4 and report.metric == "punct_f1"
    full = report.full
    assert full.speedup == 1.0 and full.matches_full == 100.0 and full.exit_rate == 0.0
    assert full.deep_passes_per_token == 1.0  # batch 1: one deep pass per step
    static = report.methods[1]
    assert static.exit_rate == 1.0 and static.deep_passes_per_token == 0.0
    for r in report.methods + report.sweep:
        assert r.seconds > 0 and r.speedup > 0 and r.tokens > 0
        assert 0.0 <= r.exit_rate <= 1.0 and 0.0 <= r.deep_passes_per_token <= 1.0
        assert len(r.texts) == 4 and 0.0 <= r.quality["punct_f1"] <= 100.0
        assert 0.0 <= r.quality["sacrebleu"] <= 100.0  # the task's extra metric
        assert r.speedup == pytest.approx(full.seconds / r.seconds)
    adaptive = report.methods[4]
    assert adaptive.spec.adaptive and 0.0 <= adaptive.final_threshold <= 1.0
    assert adaptive.calibration_points > 0 and adaptive.calibration_seconds > 0
    assert report.settings["threshold_estimator"]["schedule"] == "reference"
    assert set(report.baselines) == {"copy_input", "add_full_stop"}
    # Copying the unpunctuated input restores no punctuation; adding a full stop to it does
    # better, in both metrics.
    copy, stop = report.baselines["copy_input"], report.baselines["add_full_stop"]
    assert copy["punct_f1"] == 0.0 < stop["punct_f1"]
    assert copy["sacrebleu"] < stop["sacrebleu"]


def test_exact_mode_output_equals_full(report):
    exact = report.methods[5]
    assert exact.spec.mode == "exact"
    assert exact.tokens_equal_full and exact.matches_full == 100.0
    assert exact.texts == report.full.texts
    assert report.summary()["exact_mode_equals_full"] is True


def test_json_report_and_plot_are_written(report, tmp_path):
    paths = evaluation.write_report(report, tmp_path / "out")
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loaded = json.loads(paths["report"].read_text())
    assert set(loaded) >= {
        "task",
        "model",
        "settings",
        "environment",
        "baselines",
        "summary",
        "methods",
        "sweep",
        "references",
    }
    assert loaded["task"]["name"] == "acl_punct" and loaded["task"]["num_examples"] == 4
    row = loaded["methods"][0]
    for key in ("label", "quality", "speedup", "exit_rate", "deep_passes_per_token", "texts"):
        assert key in row
    summary = loaded["summary"]
    assert summary["quality_at_99_percent"] == pytest.approx(0.99 * summary["full_quality"])
    assert set(summary["best_speedup_at_99_percent"]) == {"static", "calm", "free"}
    table = evaluation.format_table(report)
    assert "free exact thr=0.90 Ls=1" in table and "baseline: copy_input" in table
    header = table.splitlines()[1].split()
    assert header[:3] == ["method", "punct_f1", "sacrebleu"]  # the headline, then the extra one
    full_row = table.splitlines()[3].split()
    assert full_row[:3] == ["full", f"{report.full.quality['punct_f1']:.2f}"] + [
        f"{report.full.quality['sacrebleu']:.2f}"
    ]


def test_batched_evaluation_keeps_the_rows(runs, report):
    batched = runs["batched"]
    assert batched.num_examples == 4 and batched.settings["batch_size"] == 2
    # Batched greedy decoding gives each row what it gets alone, in the split's order.
    assert batched.full.texts == report.full.texts
    assert batched.full.deep_passes_per_token < 1.0  # a pass serves several rows


def test_best_point_at_least_as_fast():
    # Not monotone, as static exit is on the demo model: the fastest setting is also the best.
    points = [(1.8, 79.1, "Ls=4"), (2.9, 81.0, "Ls=2"), (3.6, 83.9, "Ls=1"), (3.0, 70.0, "x")]
    assert report_module._best_at_least_as_fast(points, 2.7) == (3.6, 83.9, "Ls=1")
    assert report_module._best_at_least_as_fast(points, 1.0) == (3.6, 83.9, "Ls=1")
    assert report_module._best_at_least_as_fast(points[:2], 2.0) == (2.9, 81.0, "Ls=2")
    assert report_module._best_at_least_as_fast(points[:2], 2.9) == (2.9, 81.0, "Ls=2")  # inclusive
    assert report_module._best_at_least_as_fast(points, 3.7) is None


# ---------------------------------------------------------------------------- method specs


@pytest.mark.parametrize(
    "text, fields",
    [
        ("full", dict(method="full")),
        ("static@2", dict(method="static", exit_layer=2)),
        ("calm:0.9", dict(method="calm", threshold=0.9)),
        ("free:0.8@2", dict(method="free", threshold=0.8, exit_layer=2)),
        ("free:adaptive", dict(method="free", adaptive=True)),
        ("free:exact", dict(method="free", mode="exact")),
        ("free:rollback:0.5@3", dict(method="free", mode="rollback", threshold=0.5, exit_layer=3)),
    ],
)
def test_parse_method(text, fields):
    assert evaluation.parse_method(text) == evaluation.MethodSpec(**fields)


@pytest.mark.parametrize(
    "text, message",
    [
        ("fast:0.5", "unknown method 'fast'"),
        ("oracle", "unknown method 'oracle'"),
        ("free:high", "cannot read 'high'"),
        ("static@x", "exit layer after '@' must be an integer"),
        ("full:0.5", "method 'full' takes no threshold"),
        ("calm:adaptive", "adaptive thresholds and modes are for 'free'"),
        ("free:adaptive:0.5", "cannot also be fixed"),
    ],
)
def test_bad_method_specs(text, message):
    with pytest.raises(InputError, match=message):
        evaluation.parse_method(text)


def test_harness_input_errors(model, examples):
    full = [evaluation.MethodSpec(method="full")]
    no_tokenizer = free_jax.Model(config=model.config, params=model.params)
    with pytest.raises(InputError, match="no tokenizer"):
        evaluation.evaluate(no_tokenizer, examples, full, progress=False)
    with pytest.raises(InputError, match="repeats must be an integer >= 1"):
        evaluation.evaluate(model, examples, full, repeats=0, progress=False)
    with pytest.raises(InputError, match="no methods"):
        evaluation.evaluate(model, examples, [], progress=False)


# ---------------------------------------------------------------------------- the CLI


def _eval_argv(checkpoint, tmp_path, *extra):
    return [
        "eval",
        "--model",
        str(checkpoint),
        "--task",
        "acl_punct",
        "--out",
        str(tmp_path / "out"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--no-progress",
        "--no-compile-cache",
        *extra,
    ]


def test_cli_eval_writes_the_report(runs):
    status, out = runs["cli"]
    assert status == 0
    assert "free exact Ls=1" in out and "exact mode output == full model output: yes" in out
    report = json.loads((runs["work"] / "cli" / evaluation.REPORT_FILE).read_text())
    assert [m["label"] for m in report["methods"]] == ["full", "free exact Ls=1"]
    assert report["task"]["num_examples"] == 2
    assert (runs["work"] / "cli" / evaluation.PLOT_FILE).is_file()


def test_cli_compile_cache_is_set_for_the_command_only(checkpoint, jsonl, tmp_path, capsys):
    """The persistent compilation cache is on while a command runs and off again after it, so an
    in-process call leaves the caller's jax settings, and its later compilations, as they were
    (jax keeps a cache it has opened whatever the settings say later)."""
    import jax
    import jax.numpy as jnp

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = {name: getattr(jax.config, name) for name in names}
    cache = tmp_path / "compiled"
    argv = _eval_argv(
        checkpoint, tmp_path, "--data-files", str(jsonl), "--max-examples", "1",
        "--max-new-tokens", "2", "--methods", "full", "--no-sweep",
    )  # fmt: skip
    argv[argv.index("--no-compile-cache")] = "--compile-cache=" + str(cache)
    assert cli.main(argv) == 0
    written = set(cache.iterdir())
    assert written  # the command's programs went to its cache
    assert {name: getattr(jax.config, name) for name in names} == before
    # A program compiled after the command, however quickly, is not written to its cache.
    jax.config.update(names[1], 0.0)
    try:
        jax.block_until_ready(jax.jit(lambda x: jnp.sin(x) * 3.25 + 0.5)(jnp.ones(7)))
    finally:
        jax.config.update(names[1], before[names[1]])
    assert set(cache.iterdir()) == written


def test_cli_eval_missing_checkpoint_dir(tmp_path, capsys):
    argv = _eval_argv(tmp_path / "no_such_model", tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "no_such_model" in err and "does not exist" in err


def test_cli_eval_dataset_file_missing_fields(checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"sentence": SENTENCES[0]}) + "\n")
    assert cli.main(_eval_argv(checkpoint, tmp_path, "--data-files", str(bad))) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "'text'" in err and "is missing" in err and "sentence" in err


def test_cli_eval_hub_dataset_offline(checkpoint, tmp_path, monkeypatch, capsys):
    import datasets
    import huggingface_hub.constants

    # What HF_DATASETS_OFFLINE=1 / HF_HUB_OFFLINE=1 set when the libraries are imported.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    argv = _eval_argv(checkpoint, tmp_path)
    argv[argv.index("acl_punct")] = "samsum"
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "knkarthick/samsum" in err and "no network is reachable" in err
    assert "data_files" in err


def test_cli_eval_hub_model_offline(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert cli.main(_eval_argv("google/flan-t5-small", tmp_path)) == 2
    err = capsys.readouterr().err
    assert "google/flan-t5-small" in err and "could not be reached" in err


def test_cli_eval_unknown_method_fails_before_loading(tmp_path, capsys):
    argv = _eval_argv(tmp_path / "not_loaded", tmp_path, "--methods", "full", "fast:0.5")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "unknown method 'fast'" in err and "not_loaded" not in err


def test_cli_eval_unknown_task(checkpoint, tmp_path, capsys):
    argv = _eval_argv(checkpoint, tmp_path)
    argv[argv.index("acl_punct")] = "nope"
    assert cli.main(argv) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err


def test_cli_demo_without_the_shipped_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli_evaluate, "DEMO_MODEL", tmp_path / "model")
    assert cli.main(["demo", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "demo model is not in this installation" in err and "free-jax eval" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_demo_on_the_shipped_model(tmp_path, capsys):
    """The README's main command, shortened: every method of the table, report and plot."""
    out = tmp_path / "out"
    argv = ["demo", "--quick", "--max-examples", "4", "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "FREE exact mode output == full model output: yes" in printed
    report = json.loads((out / "report.json").read_text())
    labels = {m["label"] for m in report["methods"]}
    assert {"full", "static Ls=1", "free thr=0.50 Ls=1", "free adaptive Ls=1"} <= labels
    # The sample is spread over the split, not its first rows.
    test_rows = demo.read_split("test")
    assert report["references"][-1] == test_rows[-1]["text"]
    assert (out / "quality_vs_speed.png").stat().st_size > 10_000


# ---------------------------------------------------------------------------- demo data


def _shipped_papers(count: int) -> list[tuple[str, list[str]]]:
    """Real papers for the builder: the shipped training sentences of `count` papers, each
    sentence a paragraph (no need for aclsum)."""
    papers: dict[str, list[str]] = collections.defaultdict(list)
    for row in demo.read_split("train"):
        if row["paper"] in papers or len(papers) < count:
            papers[row["paper"]].append(row["text"])
    return sorted(papers.items())


def test_builder_is_deterministic_and_splits_are_disjoint(tmp_path):
    papers = _shipped_papers(7)
    held_out = {"validation": 2, "test": 2}
    kwargs = dict(papers=papers, vocab_size=300, held_out_papers=held_out)
    stats = demo.build_demo_data(tmp_path / "a", seed=1, **kwargs)
    demo.build_demo_data(tmp_path / "b", seed=1, **kwargs)
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
    rows = {s: demo.read_split(s, tmp_path / "a") for s in demo.SPLITS}
    assert {s: len({r["paper"] for r in rows[s]}) for s in rows} == {
        "train": 3,
        "validation": 2,
        "test": 2,
    }
    _assert_disjoint(rows)
    assert stats["splits"]["test"]["sentences"] == len(rows["test"])
    assert set(stats["splits"]["test"]["baselines"]) == {"copy_input", "add_full_stop"}
    # Another seed holds out other papers.
    ids = [paper for paper, _ in papers]
    assignment = demo.assign_splits(ids, 2, held_out)
    assert {p for p, s in assignment.items() if s == "test"} != {r["paper"] for r in rows["test"]}


def _assert_disjoint(rows):
    papers = {s: {r["paper"] for r in rs} for s, rs in rows.items()}
    sources = {s: {demo.strip_punctuation(r["text"]).lower() for r in rs} for s, rs in rows.items()}
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not papers[a] & papers[b], (a, b)
        assert not sources[a] & sources[b], (a, b)
    for rs in rows.values():
        assert len({demo.strip_punctuation(r["text"]).lower() for r in rs}) == len(rs)


def test_shipped_data_splits_tokenizer_and_stats():
    rows = {s: demo.read_split(s) for s in demo.SPLITS}
    _assert_disjoint(rows)
    stats = json.loads((demo.ASSETS / "stats.json").read_text())
    for split, split_rows in rows.items():
        assert stats["splits"][split]["sentences"] == len(split_rows)
        for row in split_rows[:200]:
            assert demo.clean_sentence(row["text"]) == row["text"]
    tok = demo.load_tokenizer()
    assert len(tok) == demo.VOCAB_SIZE == stats["vocab_size"]
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.convert_ids_to_tokens(demo.VOCAB_SIZE - 1) == "<extra_id_0>"
    text = rows["test"][0]["text"]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


def test_the_demo_task_reads_its_shipped_files(tokenizer, tmp_path):
    task = data.get_task(demo.TASK_NAME)
    assert task.metric == "punct_f1" and task.extra_metrics == ("sacrebleu",)
    assert task.prefix == "restore: "
    assert task.source({"text": "However, BERT works; see: it."}) == "However BERT works see it"
    # No data_files: the task's shipped file of the split.
    examples = data.load_examples(task, tokenizer, split="validation", cache_dir=tmp_path)
    assert (
        len(examples)
        == json.loads((demo.ASSETS / "stats.json").read_text())["splits"]["validation"]["sentences"]
    )
    with pytest.raises(data.DataError, match="ships the splits"):
        data.load_examples(task, tokenizer, split="dev", cache_dir=tmp_path)


def test_sentence_cleaning_and_splitting():
    assert demo.split_sentences("We use e.g. BERT here. It works. Smith et al. did so.") == [
        "We use e.g. BERT here.",
        "It works.",
        "Smith et al. did so.",
    ]
    keep = "However, current models still fall behind their counterparts in quality."
    assert demo.clean_sentence(keep) == keep
    assert demo.clean_sentence("Too short, really.") is None
    assert demo.clean_sentence("We follow Smith et al. (2019) in all eight of our tests.") is None
    assert demo.clean_sentence("It reaches 3.5 points of BLEU on all eight of the tests.") is None
    curly = "The model\u2019s outputs are compared with the reference in every single case."
    assert demo.clean_sentence(curly) == curly.replace("\u2019", "'")


@pytest.mark.slow
def test_shipped_files_equal_a_fresh_build_from_aclsum(tmp_path):
    import importlib.metadata

    try:
        importlib.metadata.distribution("aclsum")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("needs `pip install aclsum==0.1.2 --no-deps`")
    demo.build_demo_data(tmp_path)
    for f in ("train.jsonl", "validation.jsonl", "test.jsonl", "stats.json"):
        assert (tmp_path / f).read_bytes() == (demo.ASSETS / f).read_bytes(), f
    for f in ("spiece.model", "tokenizer_config.json"):
        assert (tmp_path / "tokenizer" / f).read_bytes() == (
            demo.ASSETS / "tokenizer" / f
        ).read_bytes()


def test_statistics_of_a_tiny_set(tokenizer):
    rows = {"test": [{"paper": "P", "text": s} for s in SENTENCES]}
    stats = demo.statistics(rows, tokenizer)["test"]
    assert stats["sentences"] == 5 and stats["papers"] == 1
    assert 0 < stats["target_tokens_copied_from_source"] < 1
    assert stats["baselines"]["copy_input"]["exact_match"] == 0.0
    assert np.isclose(stats["baselines"]["copy_input"]["rougeL"], 100.0)


def test_cpu_meter_counts_others_and_steal_not_this_process(monkeypatch):
    """The busy check compares the machine's CPU time with this process's own: on 2 CPUs over
    10 s (20 CPU-seconds), 13 busy of which 9 are ours and 1 steal leaves others 4 = 20%."""
    readings = iter([(100.0, 40.0, 2.0, 30.0), (120.0, 53.0, 3.0, 39.0)])
    monkeypatch.setattr(harness._CpuMeter, "_read", staticmethod(lambda: next(readings)))
    shares = harness._CpuMeter().shares()
    assert shares == {"others": 0.2, "steal": 0.05}
    env = harness._environment(None, shares)
    assert env["cpu_time_of_others_while_timing"] == shares and not env["timings_under_load"]
    busy = harness._environment(None, {"others": 0.4, "steal": 0.3})
    assert busy["timings_under_load"]
    # On this machine the meter reads real numbers, each a share of the whole.
    real = harness._CpuMeter.__new__(harness._CpuMeter)
    monkeypatch.undo()
    real.__init__()
    measured = real.shares()
    if measured is not None:
        assert all(0.0 <= v <= 1.0 for v in measured.values())
