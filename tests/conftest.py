"""Shared test settings: each test module starts with jax's compiled-program caches empty, and
`free-jax` commands run in-process keep their compiled programs in the session's temporary
directory, not in the user's cache (`FREE_JAX_CACHE`, `free_jax.cli.compile_cache`).

The default suite compiles a few thousand programs in one process. Past some number, XLA's CPU
compiler segfaulted in a later module (twice in `test_spd`, at a compilation that passes alone),
so the programs of finished modules are released rather than kept for the process's life.
"""

from __future__ import annotations

import gc
import os

import jax
import pytest


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
