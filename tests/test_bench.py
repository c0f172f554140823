"""`free-jax bench` (`free_jax.evaluation.bench`): every case at every batch size on the same
inputs, with the diagnostics the table reports, and clear errors for bad input."""

from __future__ import annotations

import json
import re
import types

import numpy as np
import pytest

from free_jax import cli, decode, testing
from free_jax.errors import InputError
from free_jax.evaluation import bench

T = 10
NUM_INPUTS = 5


@pytest.fixture(scope="module")
def model():
    return testing.tiny_model("v1.1", seed=3)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 20, NUM_INPUTS)
    ids = testing.random_ids((NUM_INPUTS, 20), seed=1)
    return bench.BenchInputs(sources=[ids[i, :n] for i, n in enumerate(lengths)], max_new_tokens=T)


@pytest.fixture(scope="module")
def threshold(model, inputs):
    # A threshold at the median confidence: some tokens exit, others need the deep blocks.
    out = decode(
        model,
        np.stack([s[:3] for s in inputs.sources]),
        method="free",
        exit_layer=1,
        threshold=0.5,
        max_new_tokens=T,
    )
    conf = out.confidence[np.isfinite(out.confidence)]
    return float(np.median(conf))


def _run(model, inputs, threshold, *, every_case: bool) -> bench.BenchResult:
    cases = bench.default_cases(model, exit_layer=1, threshold=threshold, max_wait=2)
    if not every_case:  # CALM and draft waiting: see test_all_six_cases
        cases = [c for c in cases if c.method != "calm" and "draft" not in c.label]
    # Batch 2 over 5 inputs: full batches and a smaller last one. Peak memory compiles every
    # program again; it is tested on its own below.
    return bench.run_bench(model, inputs, cases, batch_sizes=(1, 2), progress=False, memory=False)


@pytest.fixture(scope="module")
def result(model, inputs, threshold):
    return _run(model, inputs, threshold, every_case=False)


def test_full_static_free_and_exact_at_every_batch_size(result):
    _check_rows(result, num_cases=4)


# Slow: two more decode programs per batch size; CALM and draft waiting have their own tests
# (test_calm, test_spd), and the bench runs them through the same code as the other cases.
@pytest.mark.slow
def test_all_six_cases(model, inputs, threshold):
    result = _run(model, inputs, threshold, every_case=True)
    _check_rows(result, num_cases=6)
    by = {(r.label, r.batch_size): r for r in result.rows}
    free = next(r.label for r in result.rows if r.label.startswith("free thr"))
    draft = next(r.label for r in result.rows if "draft" in r.label)
    # Draft waiting changes when passes happen, not the exits.
    assert by[(draft, 2)].exited == by[(free, 2)].exited


def _check_rows(result, num_cases: int):
    labels = [r.label for r in result.rows]
    assert len(result.rows) == 2 * num_cases and labels[:num_cases] == labels[num_cases:]
    assert labels[0] == "full" and "free exact" in labels
    for B in (1, 2):
        rows = {r.label: r for r in result.rows if r.batch_size == B}
        full = rows["full"]
        assert full.speedup == 1.0 and full.ideal == pytest.approx(1.0)
        assert full.exit_rate == 0.0 and full.passes == full.steps
        static = next(r for r in rows.values() if r.method == "static")
        assert static.exit_rate == 1.0 and static.passes == 0 and static.ideal > 1.0
        exact = rows["free exact"]
        assert exact.equals_full is True
        for r in rows.values():
            assert r.seconds > 0 and r.tokens > 0 and r.peak_bytes is None
            assert r.pass_rows <= r.passes * B and r.pass_rows <= r.pass_positions
            if r.label.startswith("free thr"):
                # Default mode: a step reads the shallow weights, a pass the deep ones, so at
                # most the full model's bytes per step and at least the shallow model's (exact
                # mode may redo rejected steps).
                assert static.ideal >= r.ideal >= full.ideal * 0.99
                assert r.of_ideal == pytest.approx(r.speedup / r.ideal)


def test_outputs_do_not_depend_on_the_batch_size(model, inputs, result):
    # Default-mode FREE decodes each row as it would alone, so its exits and passes are the same
    # at every batch size.
    by = {(r.label, r.batch_size): r for r in result.rows}
    for label in ("full", "static Ls=1"):
        assert by[(label, 1)].tokens == by[(label, 2)].tokens
    free = next(r.label for r in result.rows if r.label.startswith("free thr"))
    assert by[(free, 1)].tokens == by[(free, 2)].tokens
    assert by[(free, 1)].exited == by[(free, 2)].exited


def test_table_json_and_plot(result, tmp_path):
    table = bench.format_bench(result)
    assert "| batch | method | ms/token | speed-up | ideal |" in table
    assert table.count("\n| 2 |") == 4
    path = bench.plot_bench(result, tmp_path / bench.PLOT_FILE)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(json.dumps(result.to_dict()))
    assert {"ms_per_token", "speedup", "ideal", "of_ideal", "peak_bytes"} <= set(data["rows"][0])
    # The host probe, before and after the run: in the JSON and above the table.
    for key in ("host_before", "host_after"):
        probe = data["environment"][key]
        assert set(probe) == {"read_gb_s", "reread_gb_s", "product_us"}
        assert all(np.isfinite(v) and v > 0 for v in probe.values())
    assert table.splitlines()[2].startswith("host before: ") and "; after: " in table
    steal = data["environment"]["cpu_steal"]
    if bench.cpu_ticks() is not None:  # Linux
        assert 0.0 <= steal <= 1.0
        assert f"CPU time stolen by the hypervisor during the run: {steal:.0%}" in table
    else:
        assert steal is None and "stolen" not in table


def test_cpu_steal_comes_from_proc_stat(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  600 10 200 3000 50 0 40 100 0 0\ncpu0 300 5 100 1500 25 0 20 50 0 0\n")
    start = bench.cpu_ticks(str(stat))
    assert start == (100, 4000)
    stat.write_text("cpu  900 10 300 3300 50 0 40 400 0 0\n")
    end = bench.cpu_ticks(str(stat))
    assert bench.steal_share(start, end) == pytest.approx(300 / 1000)
    assert bench.steal_share(start, start) is None and bench.steal_share(None, end) is None
    stat.write_text("cpu  900 10 300 3300\n")  # a kernel without the steal column
    assert bench.cpu_ticks(str(stat)) is None
    assert bench.cpu_ticks(str(tmp_path / "missing")) is None


def test_the_host_probe_flags_a_change_of_more_than_a_fifth():
    probe = bench.HostProbe(read_gb_s=10.0, reread_gb_s=30.0, product_us=20.0)
    assert not probe.changed(probe)
    assert not probe.changed(bench.HostProbe(10.0, 30.0, 23.0))  # 13% of the larger
    assert probe.changed(bench.HostProbe(10.0, 30.0, 26.0))  # 23%
    assert probe.changed(bench.HostProbe(7.9, 30.0, 20.0))
    result = bench.BenchResult(
        model="m",
        inputs="i",
        num_examples=1,
        metric=None,
        repeats=1,
        rows=[],
        environment={
            "backend": "cpu",
            "device": "cpu",
            "host_before": probe,
            "host_after": bench.HostProbe(5.0, 30.0, 20.0),
            "cpu_steal": 0.5,
        },
    )
    table = bench.format_bench(result)
    assert "changed by more than 20% during the run" in table
    assert "CPU time stolen by the hypervisor during the run: 50%" in table


def test_the_free_cases_can_decide_exits_with_an_int8_head(model):
    cases = bench.default_cases(model, exit_layer=1, threshold=0.5, shallow_head="int8-dynamic")
    free = [c for c in cases if c.method == "free"]
    assert len(free) == 3 and all(c.options["shallow_head"] == "int8-dynamic" for c in free)
    assert all(c.label.endswith("int8 head") for c in free)
    assert all("shallow_head" not in c.options for c in cases if c.method != "free")
    with pytest.raises(InputError, match=r"shallow_head='fp8' is not known; valid: \(None, 'int8"):
        bench.default_cases(model, exit_layer=1, threshold=0.5, shallow_head="fp8")


def test_peak_memory_of_a_decode_program(model, inputs):
    full = bench.default_cases(model, exit_layer=1, threshold=0.5)[0]
    ids = testing.random_ids((1, 16)), testing.random_ids((4, 16))
    one, four = (
        bench.program_bytes(model, x, np.ones_like(x), 16, full, max_new_tokens=T, min_new_tokens=0)
        for x in ids
    )
    # The KV cache alone: 2 (K, V) x layers x rows x T x heads x head size x 4 bytes.
    c = model.config
    cache = 2 * c.num_decoder_layers * T * c.num_heads * c.d_kv * 4
    assert cache <= one < four and four >= 4 * cache


def test_a_batch_too_large_for_memory_is_refused(model, inputs):
    with pytest.raises(InputError, match=r"batch size 3 is too large .* MiB"):
        bench.run_bench(
            model,
            inputs,
            bench.default_cases(model, exit_layer=1, threshold=0.5)[:1],
            batch_sizes=(3,),
            progress=False,
            memory_limit=1024,
        )


@pytest.mark.parametrize("sizes", [(0,), (1, -2), (2.5,), (NUM_INPUTS + 1,)])
def test_bad_batch_sizes_are_refused(model, inputs, sizes):
    with pytest.raises(InputError, match="batch size"):
        bench.run_bench(model, inputs, [], batch_sizes=sizes, progress=False)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "/nonexistent/model"], "/nonexistent/model' does not exist"),
        (["--batch-sizes", "0"], "batch size 0 is invalid"),
        (["--model", "random:t5-huge"], "unknown model shape 't5-huge'.*random:t5-base"),
        (["--model", "random:t5-small", "--exit-rate", "1.5"], "--exit-rate 1.5"),
        (["--max-examples", "0"], "--max-examples 0"),
    ],
)
def test_cli_bad_input(argv, message, capsys):
    assert cli.main(["bench", *argv]) == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.slow
def test_cli_bench_on_the_demo_model(tmp_path, capsys):
    argv = ["bench", "--batch-sizes", "1", "2", "--max-examples", "3", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "| 2 | free exact |" in out and "punct_f1" in out
    data = json.loads((tmp_path / "bench.json").read_text())
    assert len(data["rows"]) == 12 and data["num_examples"] == 3
    exact = [r for r in data["rows"] if r["label"] == "free exact"]
    assert all(r["equals_full"] for r in exact)
    assert (tmp_path / bench.PLOT_FILE).read_bytes()[:4] == b"\x89PNG"


def test_the_threshold_for_an_exit_rate_is_measured_over_every_input(monkeypatch):
    """The exit rate that sets the threshold counts every input, not only the first batch: the
    first 4 rows (confidence 0.9) exit below 0.9, the other 8 (0.2) only below 0.2. For 70%
    over all 12, only a threshold below 0.2 comes close (100%; above it, 33%); the first batch
    alone would exit 100% up to 0.9 and settle on 0.5."""
    seen = []

    def scripted_decode(model, ids, *, attention_mask, threshold, **_):
        seen.append(len(ids))
        confidence = ids[:, :1] / 100.0  # [B, 1]: one token per row
        return types.SimpleNamespace(
            exited=confidence > threshold, lengths=np.ones(len(ids), np.int32)
        )

    monkeypatch.setattr(bench, "decode", scripted_decode)
    sources = [np.array([90])] * 4 + [np.array([20])] * 8
    inputs = bench.BenchInputs(sources=sources, max_new_tokens=1)
    threshold = bench.threshold_for_exit_rate(None, inputs, 0.7, rows=4, iterations=8)
    assert threshold < 0.2
    assert sum(seen) == 8 * len(sources)  # every input, at every bisection step
