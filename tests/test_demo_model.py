"""The shipped demo model (`free_jax/assets/demo/model/`): it loads, it is what its config says,
and it does the task, clearly better than copying the input."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import free_jax
from free_jax import data
from free_jax.data import demo, metrics
from free_jax.models import t5
from free_jax.training.config import load_config

CONFIG = demo.ASSETS.parents[2] / "configs" / "demo.py"


@pytest.fixture(scope="module")
def model():
    return demo.load_model()


def test_the_shipped_model_is_what_configs_demo_builds(model):
    assert demo.MODEL_DIR.is_dir()
    size = sum(f.stat().st_size for f in demo.MODEL_DIR.rglob("*") if f.is_file())
    assert size < 25 * 2**20, f"the shipped model is {size / 2**20:.1f} MiB; the limit is 25"
    config = load_config(CONFIG)
    assert model.config == config.model.arch
    free = model.metadata["free"]
    assert free["exit_layer"] == config.objective.exit_layer
    assert free["threshold"] == config.export.threshold
    assert model.metadata["training"]["steps"] == config.steps
    # Parameters have the shapes and dtype a fresh model of that architecture has.
    expected = t5.param_shapes(config.model.arch, np.float32)
    assert jax.tree.structure(model.params) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(model.params), jax.tree.leaves(expected), strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype


def test_the_shipped_tokenizer_is_the_demo_tokenizer(model):
    reference = demo.load_tokenizer()
    for row in demo.read_split("test")[:200]:
        for text in (row["text"], demo.PREFIX + demo.demo_source(row)):
            assert model.tokenizer(text).input_ids == reference(text).input_ids


def test_the_shipped_model_restores_punctuation(model):
    rows = demo.read_split("test")[:48]
    sources = [demo.PREFIX + demo.demo_source(r) for r in rows]
    references = [r["text"] for r in rows]
    out = free_jax.decode(model, sources, method="full", max_new_tokens=64)
    bleu = metrics.compute("sacrebleu", out.texts, references)["sacrebleu"]
    copied = metrics.compute("sacrebleu", [demo.demo_source(r) for r in rows], references)[
        "sacrebleu"
    ]
    exact = np.mean([o == r for o, r in zip(out.texts, references, strict=True)])
    f1 = metrics.compute("punct_f1", out.texts, references)["punct_f1"]
    stop = [demo.add_full_stop(demo.demo_source(r)) for r in rows]
    stop_f1 = metrics.compute("punct_f1", stop, references)["punct_f1"]
    # Measured when the model was shipped, on these 48 sentences: punctuation F1 72.6 (adding a
    # full stop: 64.4; copying the input: 0), BLEU 87.0 (copying the input: 82.2; adding a full
    # stop: 87.3, as the model loops on a few sentences of one paper that repeat "code"), exact
    # restorations 58% (adding a full stop: 23%). A broken load, tokenizer or decoder falls far
    # below these bars.
    assert f1 > stop_f1 + 4, (f1, stop_f1)
    assert bleu > copied + 3, (bleu, copied)
    assert exact > 0.45, exact


def test_the_config_file_is_the_documented_recipe(model):
    config = load_config(CONFIG)
    assert config.data.task == demo.TASK_NAME
    assert config.objective.kind == "free" and config.objective.kd == "dyna"
    assert config.model.tokenizer and data.get_task(config.data.task).metric == "punct_f1"
    assert config.export.buffer_capacity == model.metadata["free"]["buffer_capacity"]
    # The shipped model's record of how it was made names this file and its command.
    notes = (demo.MODEL_DIR / "TRAINING.md").read_text()
    assert "free-jax train --config configs/demo.py" in notes
