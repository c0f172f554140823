"""Training configuration, presets, overrides, schedules, sharding rules and batch checks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from free_jax import testing
from free_jax.errors import ConfigError, InputError
from free_jax.training import (
    DataConfig,
    MeshConfig,
    ModelSpec,
    ObjectiveConfig,
    OptimConfig,
    TrainConfig,
    apply_overrides,
    inputs,
    load_config,
    sharding,
)
from free_jax.training.trainer import make_schedule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ARCH = testing.tiny_config("v1.1")  # 4 decoder blocks


def base(**changes) -> TrainConfig:
    return dataclasses.replace(TrainConfig(model=ModelSpec(arch=ARCH)), **changes)


# ---------------------------------------------------------------------------- presets


@pytest.mark.parametrize(
    "name, exit_layer, model_name",
    [
        ("t5_large_samsum", 6, "t5-large"),
        ("t5_large_cnndm", 6, "t5-large"),
        ("t5_large_squad", 6, "t5-large"),
        ("mt5_large_iwslt", 6, "google/mt5-large"),
        ("tiny", 2, None),
    ],
)
def test_presets_load_with_the_papers_settings(name, exit_layer, model_name):
    config = load_config(CONFIGS / f"{name}.py")
    assert config.objective.exit_layer == exit_layer and config.model.name == model_name
    assert config.objective.kd == "dyna" and config.objective.alpha == 0.5
    if name != "tiny":
        assert config.optim.optimizer == "adafactor" and config.optim.learning_rate == 1e-4
    # The preset's docstring holds its command and expected cost.
    text = (CONFIGS / f"{name}.py").read_text()
    assert f"free-jax train --config configs/{name}.py" in text and "Expected cost" in text


@pytest.mark.parametrize("name", ["longt5_base_multinews", "longt5_base_bigpatent"])
def test_longt5_presets_load(name):
    config = load_config(CONFIGS / f"{name}.py")
    assert config.model.name == "google/long-t5-tglobal-base"
    assert config.model.model_type == "longt5" and config.objective.exit_layer == 3
    assert (config.data.source_length, config.data.target_length) == (2048, 512)


def test_missing_preset_lists_the_available_ones():
    with pytest.raises(ConfigError, match=r"does not exist\. Presets in .*'tiny'"):
        load_config(CONFIGS / "nope.py")


# ---------------------------------------------------------------------------- overrides


def test_overrides_parse_by_field_type():
    config = apply_overrides(
        base(),
        [
            "steps=77",
            "optim.learning_rate=3e-4",
            "progress=false",
            "checkpoint.best_metric=none",
            "data.prefix='summarize: '",
            "model.arch.d_model=48",
            "objective.kd=last",
        ],
    )
    assert config.steps == 77 and config.optim.learning_rate == 3e-4
    assert config.progress is False and config.checkpoint.best_metric is None
    assert config.data.prefix == "summarize: " and config.model.arch.d_model == 48
    assert config.objective.kd == "last"


@pytest.mark.parametrize(
    "override, message",
    [
        ("steps", r"not of the form key=value"),
        ("stepz=3", r"TrainConfig has no field 'stepz'"),
        ("optim.lr=1", r"OptimConfig has no field 'lr'; valid: \['b1'"),
        ("steps=many", r"steps='many': expected an integer"),
        ("progress=maybe", r"expected true or false"),
        ("steps=0", r"TrainConfig.steps must be an integer >= 1, got 0"),
        ("objective.exit_layer=4", r"exit_layer=4 must be below the decoder's 4 blocks"),
        ("model.name.x=1", r"model.name is None in this config"),
        ("steps.x=1", r"steps is a value of type int, not a config section"),
    ],
)
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(base(), [override])


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: ModelSpec(), r"needs either name .* or arch"),
        (lambda: ModelSpec(arch=ARCH, model_type="mt5"), r"model_type='mt5' but arch.model_type"),
        (lambda: ObjectiveConfig(kind="distil"), r"ObjectiveConfig.kind='distil' is not known"),
        (lambda: ObjectiveConfig(alpha=-1.0), r"alpha must be a number >= 0"),
        (lambda: OptimConfig(optimizer="sgd"), r"optimizer='sgd' is not known"),
        (lambda: OptimConfig(schedule="warmup"), r"'warmup' needs warmup_steps >= 1"),
        (lambda: OptimConfig(warmup_steps=10), r"schedule='constant' has no warmup"),
        (lambda: OptimConfig(learning_rate=0.0), r"learning_rate must be > 0"),
        (lambda: OptimConfig(b2=1.0), r"b2 must be in \[0, 1\)"),
        (lambda: MeshConfig(data=-1, fsdp=-1), r"at most one of data and fsdp may be -1"),
        (lambda: MeshConfig(fsdp=0), r"fsdp must be -1 or an integer >= 1"),
        (lambda: DataConfig(batch_size=0), r"DataConfig.batch_size must be an integer >= 1"),
        (
            lambda: base(optim=OptimConfig(grad_accum_steps=3)),
            r"batch_size=32 is not divisible by optim.grad_accum_steps=3",
        ),
        (lambda: base(compute_dtype="float16"), r"compute_dtype='float16' is not known"),
    ],
)
def test_config_sections_validate_themselves(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def test_config_round_trips_to_a_dict():
    config = base()
    d = config.to_dict()
    assert d["objective"]["kd"] == "dyna" and d["model"]["arch"]["d_model"] == ARCH.d_model


# ---------------------------------------------------------------------------- schedules


def _lr(optim, steps=100):
    schedule = make_schedule(optim, steps)
    return np.array([float(schedule(s)) for s in (0, 5, 10, 55, 100)])


def test_schedules():
    np.testing.assert_allclose(_lr(OptimConfig(learning_rate=1.0)), [1, 1, 1, 1, 1])
    warm = OptimConfig(learning_rate=1.0, schedule="warmup", warmup_steps=10)
    np.testing.assert_allclose(_lr(warm), [0, 0.5, 1, 1, 1])
    linear = OptimConfig(learning_rate=1.0, schedule="linear", warmup_steps=10)
    np.testing.assert_allclose(_lr(linear), [0, 0.5, 1, 0.5, 0], atol=1e-6)
    cosine = OptimConfig(
        learning_rate=1.0, schedule="cosine", warmup_steps=10, final_lr_fraction=0.1
    )
    np.testing.assert_allclose(_lr(cosine), [0, 0.5, 1, 0.55, 0.1], atol=1e-6)


# ---------------------------------------------------------------------------- sharding rules


@pytest.mark.parametrize(
    "shape, fsdp, min_size, spec",
    [
        ((1024, 4096), 4, 1, P(None, "fsdp")),  # the largest divisible axis
        ((4096, 1024), 4, 1, P("fsdp")),
        ((512, 512), 4, 1, P(None, "fsdp")),  # ties: the later (output) axis
        ((30, 4096), 8, 1, P(None, "fsdp")),
        ((30, 31), 4, 1, P()),  # nothing divisible: replicated
        ((1024,), 4, 2048, P()),  # small: replicated
        ((1024, 4096), 1, 1, P()),  # no fsdp axis
        ((), 4, 1, P()),
    ],
)
def test_sharding_rule(shape, fsdp, min_size, spec):
    assert sharding.array_spec(shape, fsdp, min_size) == spec


def test_mesh_must_fit_the_devices():
    mesh = sharding.make_mesh(MeshConfig())
    assert mesh.axis_names == ("data", "fsdp") and mesh.devices.size >= 1
    n = mesh.devices.size
    with pytest.raises(ConfigError, match=rf"does not fit the {n} available devices"):
        sharding.make_mesh(MeshConfig(data=n + 1, fsdp=1))


# ---------------------------------------------------------------------------- batches


def test_check_batch_enforces_the_contract():
    batch = testing.toy_batch("sort", 0, batch_size=4, source_length=6, target_length=5)
    checked = inputs.check_batch(batch, 4, 6, 5)
    assert checked["loss_mask"].dtype == np.float32 and checked["labels"].dtype == np.int32
    with pytest.raises(
        InputError,
        match=r"batch\['decoder_input_ids'\] has shape \(4, 5\), expected \(4, L\) with L in \[7\]",
    ):
        inputs.check_batch(batch, 4, 6, 7)
    # Length buckets admit smaller shapes, and only those.
    inputs.check_batch(batch, 4, 8, 7, length_buckets=(5, 6))
    with pytest.raises(InputError, match=r"with L in \[4, 8\]"):
        inputs.check_batch(batch, 4, 8, 7, length_buckets=(4,))
    with pytest.raises(InputError, match=r"batch lacks \['loss_mask'\]"):
        inputs.check_batch({k: v for k, v in batch.items() if k != "loss_mask"}, 4, 6, 5)
    with pytest.raises(InputError, match=r"must hold integers"):
        inputs.check_batch({**batch, "labels": batch["labels"].astype(float)}, 4, 6, 5)


def test_toy_batches_follow_the_contract_and_depend_on_seed_and_step_only():
    a = testing.toy_batch("reverse", 7, batch_size=3, source_length=8, target_length=8, seed=1)
    b = next(
        testing.toy_batches("reverse", 7, batch_size=3, source_length=8, target_length=8, seed=1)
    )
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    n = a["attention_mask"].sum(1) - 1  # symbols before EOS
    for i in range(3):
        src = a["input_ids"][i, : n[i]]
        np.testing.assert_array_equal(a["labels"][i, : n[i]], src[::-1])
        assert a["labels"][i, n[i]] == 1 and a["loss_mask"][i].sum() == n[i] + 1
        np.testing.assert_array_equal(a["decoder_input_ids"][i, 1:], a["labels"][i, :-1])
    assert a["decoder_input_ids"][:, 0].tolist() == [0, 0, 0]


def test_a_pipeline_task_without_the_pipeline_says_so():
    try:
        import free_jax.data  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"needs the input pipeline \(free_jax.data\)"):
            inputs.source_for(DataConfig(task="samsum"), split="train", seed=0, batch_size=8)
    else:
        pytest.skip("free_jax.data exists in this build")


def test_iterables_are_sources_that_skip_on_resume():
    batches = [{"i": i} for i in range(5)]
    source = inputs.as_source(batches)
    assert [b["i"] for b in source(3)] == [3, 4]
    with pytest.raises(InputError, match="a batch source must be a callable"):
        inputs.as_source(42)
