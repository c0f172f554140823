"""Running test workers in fresh processes: fake device counts, and two `jax.distributed`
processes on 127.0.0.1 (device counts are fixed when JAX starts, so each run is a new process).
Shared by the multi-device and multi-process tests."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker_env(devices: int) -> dict[str, str]:
    """This environment with `devices` fake CPU devices and the repository on the path (and
    the XLA flags of the tests' own process, such as conftest's optimisation level)."""
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("FREE_JAX_DISTRIBUTED", None)
    return env


def run_worker(worker: Path, *args: str, devices: int = 1, timeout: float = 600) -> None:
    """Runs `worker` with `args` in one process; asserts it succeeded (its stderr if not)."""
    proc = subprocess.run(
        [sys.executable, str(worker), *args],
        env=worker_env(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(worker: Path, *args: str, devices: int = 4, timeout: float = 600) -> None:
    """Runs `worker` as processes 0 and 1 of a `jax.distributed` job on 127.0.0.1 (it takes
    `--process-id`, `--num-processes` and `--port`), `devices` fake devices each; asserts both
    succeeded."""
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), *args]
            + ["--process-id", str(i), "--num-processes", "2", "--port", port],
            env=worker_env(devices),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-4000:]
