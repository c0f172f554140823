"""Training across device meshes and processes, and surviving SIGKILL (slow: subprocesses).

Each run is `tests/train_worker.py` in a fresh process (device counts are fixed when JAX
starts): one CPU device; 8 fake devices as a data x fsdp = 4 x 2 mesh; two processes joined by
`jax.distributed.initialize` on 127.0.0.1 with 4 fake devices each (mesh 4 x 2 over both).

    pytest -m slow tests/test_train_distributed.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from worker_processes import run_two_processes, run_worker, worker_env

import free_jax

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("train_worker.py")


def _run(out: Path, *args: str, devices: int = 1, timeout: float = 600) -> None:
    run_worker(WORKER, str(out), *args, devices=devices, timeout=timeout)


def _run_two_processes(out: Path, *args: str, timeout: float = 600) -> None:
    run_two_processes(WORKER, str(out), *args, timeout=timeout)


def _result(out: Path) -> dict[str, np.ndarray]:
    with np.load(out / "result.npz") as f:
        return {k: f[k] for k in f.files}


def test_same_losses_on_1_device_8_devices_and_2_processes(tmp_path):
    """12 steps on three topologies agree to 1e-5; then each resumes on another mesh."""
    _run(tmp_path / "one", "--steps", "16")
    _run(tmp_path / "eight", "--steps", "12", "--fsdp", "2", devices=8)
    _run_two_processes(tmp_path / "two", "--steps", "12", "--fsdp", "2", "--export")
    one, eight, two = (_result(tmp_path / d) for d in ("one", "eight", "two"))
    # Process 0 alone wrote the exports of the 2-process run.
    exported = free_jax.load(tmp_path / "two" / "final")
    flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(exported.params)])
    np.testing.assert_array_equal(flat, two["params"])
    assert free_jax.load(tmp_path / "two" / "hf").config == exported.config
    for other in (eight, two):
        np.testing.assert_allclose(other["losses"], one["losses"][:12], rtol=1e-5)
    # Restore into a different mesh: the 8-device run's step-12 checkpoint continues on one
    # device, the 2-process run's on 8 devices with fsdp 4; both match the 1-device run's 16.
    _run(tmp_path / "eight", "--steps", "16")
    _run(tmp_path / "two", "--steps", "16", "--fsdp", "4", devices=8)
    for name in ("eight", "two"):
        resumed = _result(tmp_path / name)
        np.testing.assert_array_equal(resumed["steps"], np.arange(13, 17))
        np.testing.assert_allclose(resumed["losses"], one["losses"][12:], rtol=1e-5)
        np.testing.assert_allclose(resumed["params"], one["params"], rtol=1e-4, atol=1e-5)


def test_sigkill_mid_training_resumes_to_identical_parameters(tmp_path):
    steps, every = "120", "20"
    _run(tmp_path / "reference", "--steps", steps, "--checkpoint-every", every)
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), str(out), "--steps", steps, "--checkpoint-every", every],
        env=worker_env(1),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            lines = metrics.read_text().splitlines() if metrics.exists() else []
            if lines and json.loads(lines[-1])["step"] >= 50:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(json.loads(line)["step"] for line in metrics.read_text().splitlines())
    assert 50 <= killed_at < 120 and not (out / "result.npz").exists()
    _run(out, "--steps", steps, "--checkpoint-every", every)
    resumed, reference = _result(out), _result(tmp_path / "reference")
    first = int(resumed["steps"][0])
    assert first > 1 and (first - 1) % 20 == 0, f"resumed at step {first}, not after a checkpoint"
    np.testing.assert_array_equal(resumed["params"], reference["params"])
    np.testing.assert_array_equal(resumed["losses"], reference["losses"][first - 1 :])
