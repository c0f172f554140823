"""The Colab notebooks: valid, public API only, and they run headless (on the shipped model)."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

COLAB = Path(__file__).resolve().parents[1] / "colab"
NOTEBOOKS = ("quickstart", "threshold_estimator", "fine_tuning")
# What a notebook may import from free_jax: the package and its documented public modules.
PUBLIC = {
    "free_jax",
    "free_jax.data",
    "free_jax.data.demo",
    "free_jax.evaluation",
    "free_jax.training",
    "free_jax.training.config",
}


def _read(name: str):
    return nbformat.read(COLAB / f"{name}.ipynb", as_version=4)


def _code(nb) -> str:
    # Cell magics and shell escapes are not Python; the notebooks use neither, but be safe.
    lines = []
    for cell in nb.cells:
        if cell.cell_type == "code":
            lines += [line for line in cell.source.splitlines() if not line.startswith(("%", "!"))]
    return "\n".join(lines)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_valid_and_uses_the_public_api(name):
    nb = _read(name)
    nbformat.validate(nb)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), (
        "notebooks are committed without outputs"
    )
    tree = ast.parse(_code(nb))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("free_jax"):
            imported.add(node.module)
            imported |= {f"{node.module}.{a.name}" for a in node.names if a.name.islower()}
        elif isinstance(node, ast.Import):
            imported |= {a.name for a in node.names if a.name.startswith("free_jax")}
    modules = {m for m in imported if m in PUBLIC or not m.startswith("free_jax.")}
    private = {m for m in imported if m.startswith("free_jax") and m not in PUBLIC}
    # `from free_jax.training import train` names a function, not a module: allowed.
    private = {m for m in private if m.rsplit(".", 1)[0] not in PUBLIC or "._" in m}
    assert not private, f"{name} imports non-public modules: {sorted(private)}"
    assert "free_jax" in {m.split(".")[0] for m in modules}
    assert not re.search(r"\bfree_jax(\.\w+)*\._\w", _code(nb)), "private names used"


def _execute(name: str, tmp_path: Path, timeout: int) -> object:
    from nbclient import NotebookClient

    nb = _read(name)
    env_dir = tmp_path / name
    env_dir.mkdir()
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(env_dir)}},
    )
    client.execute()
    return nb


def _outputs(nb) -> str:
    texts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            texts.append(out.get("text", ""))
            texts += [str(v) for k, v in out.get("data", {}).items() if k.startswith("text/")]
    return "\n".join(texts)


@pytest.fixture
def compile_cache_env(tmp_path, monkeypatch):
    # The kernel is a child process: it inherits the environment.
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    return os.environ


# Slow: about 80 s on 2 cores, nearly all of it compiling the eight decoding programs of the
# speed table; the default suite would pass 10 minutes with it.
@pytest.mark.slow
def test_quickstart_runs_offline_on_the_shipped_model(tmp_path, compile_cache_env):
    nb = _execute("quickstart", tmp_path, timeout=600)
    text = _outputs(nb)
    assert "FREE exit rate" in text
    assert "FREE exact mode output == full model output: yes" in text
    assert (tmp_path / "quickstart" / "quality_vs_speed.png").stat().st_size > 10_000
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the plot is displayed"


@pytest.mark.slow
def test_threshold_notebook_runs_offline(tmp_path, compile_cache_env):
    nb = _execute("threshold_estimator", tmp_path, timeout=900)
    text = _outputs(nb)
    assert "fit: " in text and "threshold" in text
    assert (tmp_path / "threshold_estimator" / "mixture.png").is_file()
    assert (tmp_path / "threshold_estimator" / "trajectory.png").is_file()


@pytest.mark.slow
def test_fine_tuning_notebook_runs_a_short_cpu_version(tmp_path, compile_cache_env, monkeypatch):
    # On CPU the notebook trains 40 steps of configs/demo.py (found through FREE_JAX_SOURCE).
    monkeypatch.setenv("FREE_JAX_SOURCE", str(COLAB.parent))
    nb = _execute("fine_tuning", tmp_path, timeout=1200)
    text = _outputs(nb)
    assert "step 40; last evaluation" in text
    assert "FREE exact mode output == full model output: yes" in text
    assert (tmp_path / "fine_tuning" / "runs" / "colab_demo" / "final").is_dir()
