"""Shared test settings: each test module starts with jax's compiled-program caches empty.

The default suite compiles a few thousand programs in one process. Past some number, XLA's CPU
compiler segfaulted in a later module (twice in `test_spd`, at a compilation that passes alone),
so the programs of finished modules are released rather than kept for the process's life.
"""

from __future__ import annotations

import gc

import jax
import pytest


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    yield
    jax.clear_caches()
    gc.collect()
