"""The trainer on one CPU device: a CLI run end to end, checkpoints, resume, divergence, exports.

Slow tests (`pytest -m slow tests/test_train*.py`): the tiny preset learns its toy task.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache as jax_cache

import free_jax
from free_jax import cli, testing
from free_jax.checkpoints import read_metadata
from free_jax.errors import ConfigError
from free_jax.models import exit_classifier
from free_jax.training import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    ExportConfig,
    ModelSpec,
    ObjectiveConfig,
    OptimConfig,
    TrainConfig,
    Trainer,
    TrainingDivergedError,
    checkpoints,
    load_config,
    train,
)

ROOT = Path(__file__).resolve().parents[1]
ARCH = testing.tiny_config("v1.1", vocab_size=32, num_layers=1, num_decoder_layers=2)


def small_config(output_dir, **changes) -> TrainConfig:
    """A 1-encoder-block, 2-decoder-block model on the toy reverse task, 8 rows per batch."""
    config = TrainConfig(
        model=ModelSpec(arch=ARCH),
        data=DataConfig(task="reverse", source_length=6, target_length=6, batch_size=8),
        objective=ObjectiveConfig(kind="free", exit_layer=1, kd="dyna"),
        optim=OptimConfig(optimizer="adamw", learning_rate=3e-3),
        checkpoint=CheckpointConfig(every=4, keep=2, async_save=False),
        eval=EvalConfig(every=0),
        export=ExportConfig(free_jax=False, hf=False),
        steps=12,
        output_dir=str(output_dir),
        log_every=1,
        progress=False,
    )
    return dataclasses.replace(config, **changes)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """A persistent compilation cache for this module: runs that build the same training step
    (a resumed run, the same preset) reuse its compiled program instead of compiling again."""
    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    saved = {name: getattr(jax.config, name) for name in names}
    # jax keeps a cache it has opened whatever the settings say later: reset it on both sides,
    # so this module's directory takes effect and later modules compile without it.
    jax_cache.reset_cache()
    jax.config.update(names[0], str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update(names[1], 0.5)
    jax.config.update(names[2], 0)
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    jax_cache.reset_cache()


# ---------------------------------------------------------------------------- the CLI run


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """`free-jax train` on the tiny preset, shortened: 12 steps, evaluations at 6 and 12."""
    out = tmp_path_factory.mktemp("cli") / "run"
    argv = [
        "train",
        "--config",
        str(ROOT / "configs" / "tiny.py"),
        "steps=12",
        f"output_dir={out}",
        "checkpoint.every=4",
        "checkpoint.keep=2",
        "eval.every=6",
        "log_every=3",
        "progress=false",
        "data.num_eval_batches=1",
    ]
    return out, argv


def test_cli_train_runs_logs_and_exports(cli_run, capsys):
    out, argv = cli_run
    assert cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 12 and np.isfinite(summary["eval/loss"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train_records] == [3, 6, 9, 12]
    for r in train_records:  # the KD-dyna mapping at every logging step
        assert len(r["kd_mapping"]) == 2 and r["kd_mapping"] == sorted(r["kd_mapping"])
        assert {"loss", "ce_shallow", "ce_deep", "kd", "grad_norm", "tokens_per_s"} <= set(r)
    assert [r["step"] for r in records if r["split"] == "eval"] == [6, 12]
    # Latest two steps kept, plus the best by eval/loss.
    kept = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert kept[-2:] == [8, 12] and set(kept) <= {6, 8, 12}
    assert summary["best_step"] in kept
    # Exports: a free_jax checkpoint with FREE metadata, and a Hugging Face directory.
    final = free_jax.load(out / "final")
    meta = read_metadata(out / "final")["free"]
    assert meta["exit_layer"] == 2 and meta["confidence"] == "softmax_diff"
    assert meta["threshold"] == 0.9 and meta["buffer_capacity"] is None  # no bound
    hf = free_jax.load(out / "hf")
    assert final.metadata == hf.metadata and hf.metadata["free"] == meta  # decode's defaults
    for a, b in zip(jax.tree.leaves(final.params), jax.tree.leaves(hf.params), strict=True):
        np.testing.assert_array_equal(a, b)


# Orbax's failed asynchronous reads of the damaged files leave callbacks that fire after their
# event loop has closed; Python reports them as unraisable. The restore itself fails cleanly.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_cli_train_resumes_and_skips_a_corrupt_checkpoint(cli_run, capsys):
    """A damaged latest step is skipped for the previous good one, with a clear message."""
    out, argv = cli_run
    if not (out / "checkpoints" / "12").is_dir():
        pytest.skip("needs the run of test_cli_train_runs_logs_and_exports")
    state = out / "checkpoints" / "12" / "state"
    for file in state.rglob("*"):  # truncate every array file of step 12
        if file.is_file() and file.name != "_METADATA":
            file.write_bytes(b"")
    (out / "checkpoints" / "20").mkdir()  # and a partial step directory: nothing in it
    capsys.readouterr()
    assert cli.main([*argv, "steps=14"]) == 0
    messages = [m for m in capsys.readouterr().err.splitlines() if "WARNING" in m]
    assert any("checkpoint step 20" in m and "unreadable" in m for m in messages)
    assert any(
        "checkpoint step 12" in m and "skipping it for the previous good" in m for m in messages
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # The resumed run started after step 8 (the good one) and went on to 14.
    resumed = [r["step"] for r in records if r["split"] == "train"][4:]
    assert resumed == [9, 12, 14]
    assert sorted(p.name.split("-")[0] for p in (out / "checkpoints_bad").iterdir()) == ["12", "20"]


def test_resuming_with_another_optimizer_is_refused_not_treated_as_damage(cli_run):
    out, _ = cli_run
    if not (out / "checkpoints").is_dir():
        pytest.skip("needs the run of test_cli_train_runs_logs_and_exports")
    config = load_config(
        ROOT / "configs" / "tiny.py", [f"output_dir={out}", "optim.optimizer=adafactor"]
    )
    trainer = Trainer(config)
    ckpt = checkpoints.TrainCheckpoints(out, config.checkpoint)
    before = ckpt.steps()
    try:
        with pytest.raises(ConfigError, match=r"holds a training state of a different shape"):
            ckpt.restore_latest(trainer.abstract_state())
        assert ckpt.steps() == before  # nothing moved aside
    finally:
        ckpt.close()


def test_cli_train_reports_bad_config_values(capsys):
    tiny = str(ROOT / "configs" / "tiny.py")
    assert cli.main(["train", "--config", tiny, "optim.lr=1"]) == 2
    assert "OptimConfig has no field 'lr'" in capsys.readouterr().err
    assert cli.main(["train", "--config", tiny, "objective.kd=best"]) == 2
    assert "ObjectiveConfig.kd='best' is not known" in capsys.readouterr().err
    assert cli.main(["train", "--config", tiny, "--print-config", "steps=7"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 7


# ---------------------------------------------------------------------------- divergence


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    config = small_config(tmp_path / "run")
    clean = config.data

    def source(start):
        for step in range(start, config.steps):
            batch = testing.toy_batch(
                "reverse",
                step,
                batch_size=8,
                source_length=clean.source_length,
                target_length=clean.target_length,
            )
            if step == 6:  # the 7th step sees a NaN
                batch["loss_mask"][0, 0] = np.nan
            yield batch

    with pytest.raises(TrainingDivergedError, match=r"diverged at step 7: loss=nan") as info:
        train(config, train_source=source)
    assert "the last good checkpoint, step 4, is kept" in str(info.value)
    steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert steps == [4]


# ---------------------------------------------------------------------------- steps


def _update_after_one_step(config, batch):
    trainer = Trainer(config)
    state = trainer.init_state()
    before = jax.device_get(state.params)
    state, metrics = trainer.train_step(state, batch)
    return jax.device_get(state.params), before, metrics


@pytest.mark.slow
def test_gradient_accumulation_equals_the_whole_batch(tmp_path):
    batch = testing.toy_batch("reverse", 0, batch_size=8, source_length=6, target_length=6)
    batch["loss_mask"][:3] = 0  # unequal token counts per micro-batch
    # AdamW with a large epsilon: the first update is then about lr * gradient, so the updates
    # compare the gradients themselves (with a small epsilon it is about lr * sign(gradient)).
    optim = OptimConfig(optimizer="adamw", learning_rate=1e-2, eps=1.0, clip_norm=0.0)
    base = small_config(tmp_path, objective=ObjectiveConfig(exit_layer=1, kd="unif"), optim=optim)
    whole, before, m1 = _update_after_one_step(base, batch)
    accum = dataclasses.replace(base, optim=dataclasses.replace(optim, grad_accum_steps=4))
    split, _, m4 = _update_after_one_step(accum, batch)
    for key in ("loss", "ce_shallow", "ce_deep", "kd", "grad_norm", "tokens"):
        np.testing.assert_allclose(m4[key], m1[key], rtol=2e-6, err_msg=key)
    for a, b, p in zip(*(jax.tree.leaves(t) for t in (whole, split, before)), strict=True):
        # Updates agree to 1e-4, up to the rounding of adding them to the parameters.
        bound = 1e-4 * np.abs(a - p) + 2 * np.spacing(np.abs(p).astype(np.float32))
        assert np.all(np.abs(a - b) <= bound), np.max(np.abs(a - b) - bound)


def test_meta_objective_trains_the_exit_classifier_only(tmp_path):
    config = small_config(tmp_path, objective=ObjectiveConfig(kind="meta", exit_layer=1))
    trainer = Trainer(config)
    state = trainer.init_state()
    before = jax.device_get(state.params)
    batch = testing.toy_batch("reverse", 0, batch_size=8, source_length=6, target_length=6)
    state, metrics = trainer.train_step(state, batch)
    after = jax.device_get(state.params)
    assert np.isfinite(metrics["loss"]) and 0 <= metrics["meta_positive_rate"] <= 1
    head_before = before.pop(exit_classifier.KEY)
    head_after = after.pop(exit_classifier.KEY)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(head_before), jax.tree.leaves(head_after), strict=True)
    ]
    assert all(changed)


# ---------------------------------------------------------------------------- learning


@pytest.mark.slow
def test_tiny_preset_learns_copy_and_the_exits_agree(tmp_path):
    """The tiny preset's own run (600 steps): the loss falls > 50x, the exits agree on > 95%."""
    config = load_config(
        ROOT / "configs" / "tiny.py",
        [f"output_dir={tmp_path}", "progress=false", "eval.decode=true"],
    )
    calls = []

    def exact_match(predictions, references):  # the task-metric hook, on decoded texts
        calls.append((list(predictions), list(references)))
        return {
            "exact_match": float(
                np.mean([p == r for p, r in zip(predictions, references, strict=True)])
            )
        }

    result = train(config, metric_fn=exact_match)
    train_records = [r for r in result.history if r["split"] == "train"]
    evals = [r for r in result.history if r["split"] == "eval"]
    first, last = train_records[0]["loss"], evals[-1]["eval/loss"]
    print(
        f"tiny preset: train loss (first 50 steps) {first:.3f} -> eval loss {last:.4f} "
        f"(x{first / last:.0f}); eval accuracy shallow {evals[-1]['eval/acc_shallow']:.4f}, "
        f"deep {evals[-1]['eval/acc_deep']:.4f}; shallow/deep agreement "
        f"{evals[-1]['eval/agreement']:.4f}; greedy exact match {evals[-1]['eval/exact_match']:.3f}"
    )
    assert first / last > 50
    assert len(calls) == 3 and len(calls[0][0]) == config.data.eval_batch_size
    assert calls[-1][1][0] and all(t.isdigit() for t in calls[-1][1][0].split())  # ids as text
    assert evals[-1]["eval/exact_match"] > 0.9
    assert evals[-1]["eval/acc_deep"] > 0.95
    assert evals[-1]["eval/agreement"] > 0.95
    # The shallow exit alone decodes the task: static exiting after 2 of 4 blocks.
    batch = testing.toy_batch(
        "copy", 10**6, batch_size=16, source_length=10, target_length=10, num_symbols=12
    )
    model = free_jax.load(tmp_path / "final")
    out = free_jax.decode(
        model,
        batch["input_ids"],
        attention_mask=batch["attention_mask"],
        method="static",
        exit_layer=2,
        max_new_tokens=10,
    )
    exact = [
        np.array_equal(
            out.tokens[i, : out.lengths[i]], batch["labels"][i][batch["loss_mask"][i] > 0]
        )
        for i in range(16)
    ]
    assert np.mean(exact) > 0.8


def test_save_and_load_keep_a_trained_exit_classifier(tmp_path):
    model = testing.tiny_model("v1.1", seed=2)
    head = exit_classifier.init_exit_classifier(model.config, jax.random.key(3))
    with_head = dataclasses.replace(model, params={**model.params, exit_classifier.KEY: head})
    loaded = free_jax.load(free_jax.save(with_head, tmp_path / "ckpt"))
    assert exit_classifier.has_exit_classifier(loaded.params)
    for a, b in zip(jax.tree.leaves(with_head.params), jax.tree.leaves(loaded.params), strict=True):
        np.testing.assert_array_equal(a, b)
    # A model without one still loads without one.
    plain = free_jax.load(free_jax.save(model, tmp_path / "plain"))
    assert not exit_classifier.has_exit_classifier(plain.params)
