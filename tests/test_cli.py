"""The `free-jax` command: decoding on the embedded default, on a checkpoint, and its errors."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import free_jax
from free_jax import cli, testing
from free_jax.cli import decode as cli_decode
from free_jax.data import demo


def test_decode_tiny_random_model_prints_texts(capsys):
    assert cli.main(["decode", "--model", "tiny-random", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert len(lines) == len(cli_decode.DEFAULT_TEXTS) and lines[0].startswith("[0] '")
    assert "# model: tiny-random" in out.err


def test_decode_without_a_model_restores_punctuation_with_the_demo_model(capsys):
    text = "restore: However the deep model only runs when the shallow model is not confident"
    assert cli.main(["decode", text]) == 0
    out = capsys.readouterr()
    restored = "However, the deep model only runs when the shallow model is not confident."
    assert out.out.startswith(f"[0] {restored!r} tokens:")
    assert demo.strip_punctuation(restored) == text.removeprefix(demo.PREFIX)
    assert "# model: demo" in out.err


def test_load_demo_by_name_gives_the_shipped_model():
    model = free_jax.load("demo")
    assert model.config.num_decoder_layers == 8 and model.tokenizer is not None
    assert model.metadata["free"]["exit_layer"] == 1


def test_decode_ids_json_matches_the_api(tmp_path, capsys):
    model = testing.tiny_model("v1.0", seed=4)
    free_jax.save(model, tmp_path / "ckpt")
    argv = [
        "decode",
        "--model",
        str(tmp_path / "ckpt"),
        "--ids",
        "5 6 7 8",
        "--ids",
        "9, 10",
        "--max-new-tokens",
        "6",
        "--json",
    ]
    assert cli.main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    ids = np.array([[5, 6, 7, 8], [9, 10, 0, 0]])
    expected = free_jax.decode(model, ids, max_new_tokens=6)
    for row, record in enumerate(rows):
        assert record["tokens"] == expected.tokens[row, : expected.lengths[row]].tolist()
        assert record["text"] is None  # no tokenizer in this checkpoint


@pytest.mark.parametrize(
    "argv, message",
    [
        (["decode", "--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1, got 0"),
        (["decode", "--ids", "5 x"], "--ids '5 x' is not a list of integers"),
        (["decode", "hello", "--ids", "5"], "either texts or --ids"),
        (["decode", "--model", "/no/such/dir"], "/no/such/dir"),
    ],
)
def test_errors_exit_2_with_a_message(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_console_script_runs():
    """The installed `free-jax` entry point (what the README runs) answers --help."""
    script = Path(sys.executable).parent / "free-jax"
    if not script.exists():
        pytest.skip("free-jax is not installed next to this interpreter")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "decode" in result.stdout and "fit-threshold" in result.stdout


def test_decode_keeps_its_compiled_programs_for_the_next_run(tmp_path, capsys):
    """`free-jax decode` (as eval, demo, bench and calibrate) keeps the programs it compiles in
    a persistent cache, `--compile-cache` or the default; `--no-compile-cache` keeps none."""
    import jax

    cache = tmp_path / "compiled"
    argv = ["decode", "--model", "tiny-random", "--max-new-tokens", "3", "--method", "free"]
    before = jax.config.jax_compilation_cache_dir
    assert cli.main(argv + ["--compile-cache", str(cache)]) == 0
    assert any(cache.iterdir()), "no compiled program was kept"
    assert jax.config.jax_compilation_cache_dir == before  # for the command only
    elsewhere = tmp_path / "not-used"
    assert cli.main(argv + ["--compile-cache", str(elsewhere), "--no-compile-cache"]) == 0
    assert not elsewhere.exists()
    commands = next(
        a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    ).choices
    for command in ("decode", "bench", "calibrate", "eval", "demo"):
        assert "--no-compile-cache" in commands[command]._option_string_actions, command


def test_decode_free_method_reports_exits(capsys):
    argv = [
        "decode",
        "--method",
        "free",
        "--exit-layer",
        "2",
        "--threshold",
        "0.0",
        "--buffer-capacity",
        "4",
        "--max-new-tokens",
        "6",
        "--json",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr()
    rows = [json.loads(line) for line in out.out.strip().splitlines()]
    assert all(len(r["exited"]) == len(r["tokens"]) for r in rows)
    assert any(any(r["exited"]) for r in rows) and "exit rate" in out.err
    assert cli.main(argv[:-1] + ["--mode", "fast"]) == 2
    assert "mode='fast' is not known" in capsys.readouterr().err
    assert cli.main(argv + ["--shallow-head", "int8-dynamic"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert any(any(r["exited"]) for r in rows)
    assert cli.main(argv[:-1] + ["--shallow-head", "int4"]) == 2
    assert "shallow_head='int4' is not known" in capsys.readouterr().err


def test_decode_calm_method_reports_exits(capsys):
    argv = ["decode", "--method", "calm", "--exit-layer", "1", "--threshold", "0.0"]
    assert cli.main(argv + ["--calm-tau", "0", "--max-new-tokens", "5", "--json"]) == 0
    out = capsys.readouterr()
    rows = [json.loads(line) for line in out.out.strip().splitlines()]
    assert all(len(r["exited"]) == len(r["tokens"]) for r in rows)
    assert "exit rate" in out.err
    assert cli.main(argv + ["--calm-tau", "-2"]) == 2
    assert "calm_tau must be a finite number >= 0" in capsys.readouterr().err
