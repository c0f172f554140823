"""The decoding methods `decode` can run, by name: one module each, one line each here.

A new method is a module with a `base.Method` subclass (options, jitted core, report) and a line
in `REGISTRY`; `decode` needs no change.
"""

from __future__ import annotations

from free_jax.decoding.methods.base import Method
from free_jax.decoding.methods.calm import Calm
from free_jax.decoding.methods.free import Free
from free_jax.decoding.methods.full import Full
from free_jax.decoding.methods.oracle import Oracle
from free_jax.decoding.methods.static import Static
from free_jax.errors import InputError

REGISTRY: dict[str, Method] = {m.name: m for m in (Full(), Static(), Free(), Calm(), Oracle())}
METHODS = tuple(REGISTRY)


def get(name: str) -> Method:
    """The method registered as `name`; an `InputError` lists the valid names otherwise."""
    if not isinstance(name, str) or name not in REGISTRY:
        raise InputError(f"method={name!r} is not known; valid methods: {METHODS}.")
    return REGISTRY[name]
