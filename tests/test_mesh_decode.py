"""`decode(..., mesh=...)` on 8 fake CPU devices: identity with single-device decoding, one
decode loop per data shard, tensor-parallel parameter memory, bad meshes.

Device counts are fixed when JAX starts, so the checks run in a subprocess (this file run as a
script with `XLA_FLAGS=--xla_force_host_platform_device_count=8`), each reporting to a JSON
file; the tests read their outcome. The default suite runs the quick checks in one subprocess;
the full method x mesh identity matrix is slow:

    pytest -m slow tests/test_mesh_decode.py
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
from worker_processes import run_two_processes, run_worker

HERE = Path(__file__)
FAST = ("identity", "per_shard", "errors")
SLOW = ("memory", "matrix", "trainer")


def _run_checks(out: Path, checks: tuple[str, ...]) -> dict:
    run_worker(HERE, str(out), *checks, devices=8, timeout=1200)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def fast_results(tmp_path_factory) -> dict:
    return _run_checks(tmp_path_factory.mktemp("mesh") / "fast.json", FAST)


@pytest.mark.parametrize("check", FAST)
def test_mesh_decode(fast_results, check):
    assert fast_results[check] == "ok", fast_results[check]


@pytest.mark.slow
def test_mesh_decode_every_method_and_mesh(tmp_path):
    results = _run_checks(tmp_path / "slow.json", SLOW)
    for check in SLOW:
        assert results[check] == "ok", results[check]


# ------------------------------------------------------------------ the checks (8 devices)


def _mesh(data: int, model: int):
    import jax
    import numpy as np
    from jax.sharding import Mesh

    devices = np.asarray(jax.devices()[: data * model]).reshape(data, model)
    return Mesh(devices, ("data", "model"))


def _varied_inputs(rows: int, seed: int = 1):
    """int32[rows, 24] ids whose real lengths vary from 2 to 24 (padding 0 after them)."""
    import numpy as np

    from free_jax import testing

    ids = testing.random_ids((rows, 24), seed=seed)
    lengths = np.linspace(2, 24, rows).astype(int)[np.random.default_rng(seed).permutation(rows)]
    for row, n in enumerate(lengths):
        ids[row, n:] = 0
    return ids


def _eos_model():
    """A tiny model with an EOS logit boosted along a random direction: some rows end after a
    few tokens, others run to the end."""
    import jax.numpy as jnp
    import numpy as np

    from free_jax import testing

    model = testing.tiny_model()
    head = np.array(model.params["lm_head"])
    rng = np.random.default_rng(0)
    head[:, 1] += 4 * head.std() * rng.standard_normal(head.shape[0])
    return dataclasses.replace(model, params={**model.params, "lm_head": jnp.asarray(head)})


def _assert_same(a, b, what):
    import numpy as np

    for field in ("tokens", "lengths"):
        x, y = getattr(a, field), getattr(b, field)
        assert np.array_equal(x, y), f"{what}: {field} differ:\n{x}\n{y}"


def check_identity() -> None:
    """Mesh (4, 2), a batch of 5 (not a multiple of 4) of very different lengths: "full" and
    FREE equal single-device decoding; FREE's rows also equal each row decoded alone."""
    from free_jax import decode, testing

    model = testing.tiny_model()
    ids = _varied_inputs(5)
    mesh = _mesh(4, 2)
    sharded = model.shard(mesh)
    assert sharded.shard(mesh) is sharded
    for method, kw in (("full", {}), ("free", {"threshold": 0.2})):
        one = decode(model, ids, method=method, max_new_tokens=10, **kw)
        many = decode(sharded, ids, method=method, max_new_tokens=10, mesh=mesh, **kw)
        _assert_same(one, many, method)
        assert many.shard_steps.shape == (4,) and many.steps == many.shard_steps.max()
        assert many.exited.shape == one.exited.shape
    out = decode(sharded, ids, method="free", threshold=0.2, max_new_tokens=10, mesh=mesh)
    assert 0 < out.exit_rate < 1, out.exit_rate
    for row in range(ids.shape[0]):
        alone = decode(model, ids[row : row + 1], method="free", threshold=0.2, max_new_tokens=10)
        n = int(alone.lengths[0])
        assert (out.tokens[row, :n] == alone.tokens[0, :n]).all() and out.lengths[row] == n


def check_per_shard(shapes=((4, 2),)) -> None:
    """One long row on shard 0, short rows elsewhere: the other shards stop earlier (also with a
    `model` axis, whose reductions then run a different number of times per shard)."""
    import numpy as np

    from free_jax import decode, testing

    model = _eos_model()
    pool = testing.random_ids((32, 9), seed=3)
    lengths = decode(model, pool, max_new_tokens=16).lengths
    long = pool[lengths == 16][:1]
    short = pool[lengths <= 3][:7]
    assert len(long) == 1 and len(short) == 7, lengths
    ids = np.concatenate([long, short])
    for shape in shapes:
        mesh = _mesh(*shape)
        for method in ("full", "free"):
            one = decode(model, ids, method=method, max_new_tokens=16, threshold=0.5)
            many = decode(model, ids, method=method, max_new_tokens=16, threshold=0.5, mesh=mesh)
            _assert_same(one, many, f"{method} on {shape}")
            steps = many.shard_steps
            # FREE may take a step or two beyond its last token (a final deep pass).
            assert steps[0] >= 16 and steps[1:].max() <= 6, (shape, method, steps)


def _param_bytes(model, mesh) -> int:
    """Per-device argument bytes of the compiled sharded "full" core (parameters dominate)."""
    import jax
    import numpy as np

    from free_jax.decoding import encode_source, methods
    from free_jax.decoding import mesh as mesh_decode

    model = model.shard(mesh)
    n = mesh_decode.data_shards(mesh)
    rows = mesh_decode.RowLayout.make(n, n)
    ids = np.full((n, 16), 5, np.int32)
    source = mesh_decode.place_rows((ids, np.ones_like(ids)), rows, mesh)
    encoded = jax.eval_shape(
        functools.partial(encode_source, config=model.config, length=16), model.params, *source
    )
    encoded = tuple(
        jax.ShapeDtypeStruct(e.shape, e.dtype, sharding=s.sharding)
        for e, s in zip(encoded, source, strict=True)
    )
    compiled = mesh_decode._sharded.lower(
        model.decode_params,
        None,
        *encoded,
        None,
        None,
        {},
        impl=methods.get("full"),
        static=None,
        config=model.config,
        mesh=mesh,
        max_new_tokens=4,
        min_new_tokens=0,
    ).compile()
    return int(compiled.memory_analysis().argument_size_in_bytes)


def check_memory() -> None:
    """Per-device parameter bytes fall as ~1/N with a `model` axis of N = 2, 4."""
    import jax

    from free_jax import testing

    model = testing.tiny_model(d_model=64, d_ff=256, vocab_size=512, num_heads=8, d_kv=16)
    base = sum(x.nbytes for x in jax.tree.leaves(model.decode_params))
    for n in (2, 4):
        got = _param_bytes(model, _mesh(8 // n, n))
        assert got < 1.25 * base / n, (n, got, base)


def check_errors() -> None:
    import jax
    import numpy as np
    from jax.sharding import Mesh

    from free_jax import decode, testing
    from free_jax.errors import InputError

    model = testing.tiny_model()
    ids = testing.random_ids((2, 8))
    cases = [
        (Mesh(np.asarray(jax.devices()), ("batch",)), model, "'data' axis"),
        (_mesh(2, 3), model, "num_heads=4"),
        (_mesh(2, 4), testing.tiny_model(d_ff=70), "d_ff=70"),
        ("not a mesh", model, "jax.sharding.Mesh"),
    ]
    for mesh, m, expected in cases:
        try:
            decode(m, ids, max_new_tokens=2, mesh=mesh)
        except InputError as error:
            assert expected in str(error), (expected, str(error))
        else:
            raise AssertionError(f"no error for {mesh}")


def check_matrix() -> None:
    """Every method on meshes (8, 1), (4, 2), (2, 4) equals single-device decoding; per-shard
    loops without a `model` axis too."""
    check_per_shard(((8, 1), (2, 4)))
    from free_jax import decode, testing
    from free_jax.threshold import ThresholdEstimator

    model = testing.tiny_model()
    ids = _varied_inputs(11, seed=2)
    variants = [
        ("full", {}),
        ("static", {"exit_layer": 2}),
        ("oracle", {}),
        ("calm", {"threshold": 0.3}),
        ("free", {"threshold": 0.2}),
        ("free", {"threshold": 0.2, "mode": "exact"}),
        ("free", {"threshold": 0.2, "mode": "rollback"}),
        ("free", {"threshold": 0.2, "max_wait": 2, "wait_mode": "draft"}),
    ]
    for shape in ((8, 1), (4, 2), (2, 4)):
        mesh = _mesh(*shape)
        sharded = model.shard(mesh)
        for method, kw in variants:
            one = decode(model, ids, method=method, max_new_tokens=10, **kw)
            many = decode(sharded, ids, method=method, max_new_tokens=10, mesh=mesh, **kw)
            _assert_same(one, many, f"{method} {kw} on {shape}")
            if method == "oracle":
                assert (one.exit_layer == many.exit_layer).all()
        estimator = ThresholdEstimator()
        before = estimator.threshold
        out = decode(sharded, ids, method="free", threshold=estimator, max_new_tokens=10, mesh=mesh)
        assert out.agree.shape == out.tokens.shape and (out.agree >= 0).any()
        one = decode(model, ids, method="free", threshold=before, max_new_tokens=10)
        _assert_same(one, out, f"estimator on {shape}")


def check_trainer() -> None:
    """The trainer's evaluation decode on its data x fsdp = 4 x 2 mesh gives the predictions
    that decoding host copies of the parameters on one device gives."""
    import tempfile

    import numpy as np
    from train_worker import worker_config

    from free_jax import decode
    from free_jax.training import inputs, sharding
    from free_jax.training.trainer import Trainer, _detokenize

    config = worker_config(tempfile.mkdtemp(), fsdp=2)
    trainer = Trainer(config)
    state = trainer.init_state()
    source = inputs.toy_source(config.data, seed=5, batch_size=16)
    seen = []

    def metric(predictions, references):
        seen.append((list(predictions), list(references)))
        return {"n": float(len(predictions))}

    assert trainer.decode_metrics(state.params, source, metric)["eval/n"] > 0
    model = dataclasses.replace(trainer.model, params=sharding.to_host(state.params))
    batch = next(iter(source(0)))
    out = decode(
        model,
        np.asarray(batch["input_ids"]),
        attention_mask=np.asarray(batch["attention_mask"]),
        max_new_tokens=config.data.target_length,
    )
    expected = [
        _detokenize(row[:n], model, trainer.model_config)
        for row, n in zip(out.tokens, out.lengths, strict=True)
    ]
    assert seen[0][0][: len(expected)] == expected, (seen[0][0], expected)


def main(out: str, *checks: str) -> None:
    results = {}
    for name in checks:
        try:
            globals()[f"check_{name}"]()
            results[name] = "ok"
        except Exception:  # noqa: BLE001 - reported to the test
            results[name] = traceback.format_exc()[-3000:]
        Path(out).write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])


# ------------------------------------------------------------------ two processes

WORKER = Path(__file__).with_name("mesh_decode_worker.py")


@pytest.mark.slow
def test_two_processes_decode_a_sharded_batch_like_one(tmp_path):
    """jax.distributed on 127.0.0.1, 4 fake devices per process, a 4 x 2 mesh over both: the
    tokens equal one process's with 8 devices; per-process batches that differ are refused."""
    one = tmp_path / "one"
    run_worker(WORKER, str(one), devices=8)
    run_two_processes(WORKER, str(tmp_path / "two"))
    with np.load(one / "result.npz") as a, np.load(tmp_path / "two" / "result.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    run_two_processes(WORKER, str(tmp_path / "own"), "--rows-of-my-own")
    for i in range(2):
        message = (tmp_path / "own" / f"error-{i}.txt").read_text()
        assert "same global batch on every process" in message
