"""Shared test settings: each test module starts with jax's compiled-program caches empty, and
`free-jax` commands run in-process keep their compiled programs in the session's temporary
directory, not in the user's cache (`FREE_JAX_CACHE`, `free_jax.cli.compile_cache`).

The default suite compiles a few thousand programs in one process. Past some number, XLA's CPU
compiler segfaulted in a later module (twice in `test_spd`, at a compilation that passes alone),
so the programs of finished modules are released rather than kept for the process's life.

The suite's time is XLA compiling those programs, most of it in LLVM's optimisation passes, while
the tiny models run for milliseconds. The tests therefore compile at XLA's backend optimisation
level 0 (`_TEST_XLA_FLAG`, also passed to the worker processes tests start): 2.2x less compile
CPU time for a FREE loop program (`test_row_compacted_passes_keep_every_invariant`: 86 -> 39 s of
CPU). Level 0 changes LLVM's code generation, not XLA's graph (fusions, YNN choices, layouts),
and no test compares results across optimisation levels. A run that sets
`xla_backend_optimization_level` in `XLA_FLAGS` itself keeps its own level: to test exactly what
users run, `XLA_FLAGS=--xla_backend_optimization_level=2 python -m pytest -q`.
"""

from __future__ import annotations

import gc
import os

import jax
import pytest

_TEST_XLA_FLAG = "--xla_backend_optimization_level=0"
# Set before any test starts a JAX backend (XLA reads its flags once, when the first one starts).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_TEST_XLA_FLAG}".strip()


@pytest.fixture(scope="session", autouse=True)
def _commands_cache_in_a_temporary_directory(tmp_path_factory):
    saved = os.environ.get("FREE_JAX_CACHE")
    os.environ["FREE_JAX_CACHE"] = str(tmp_path_factory.mktemp("free_jax_cache"))
    yield
    if saved is None:
        os.environ.pop("FREE_JAX_CACHE", None)
    else:
        os.environ["FREE_JAX_CACHE"] = saved


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    yield
    jax.clear_caches()
    gc.collect()
