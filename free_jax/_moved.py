"""Old import paths: the flat modules free_jax had before its subpackages keep working.

`import free_jax.modeling`, `from free_jax import modeling` and `from free_jax.modeling import
forward` give the module's new home (here, `free_jax.models.t5`) with a `DeprecationWarning`
that names it. Only names that are not packages of their own are listed: `free_jax.decoding`,
`free_jax.data` and `free_jax.threshold` kept their names and re-export what they had.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType

MOVED = {
    "free_jax.config": "free_jax.models.config",
    "free_jax.modeling": "free_jax.models.t5",
    "free_jax.longt5": "free_jax.models.longt5",
    "free_jax.kv_cache": "free_jax.models.kv_cache",
    "free_jax.exit_classifier": "free_jax.models.exit_classifier",
    "free_jax.model": "free_jax.models.model",
    "free_jax.convert": "free_jax.checkpoints.hf_names",
    "free_jax.checkpoint": "free_jax.checkpoints",
    "free_jax.search": "free_jax.decoding.search",
    "free_jax.spd": "free_jax.decoding.spd",
    "free_jax.calm": "free_jax.decoding.calm_search",
    "free_jax.confidence": "free_jax.decoding.confidence",
    "free_jax.demo_data": "free_jax.data.demo",
    "free_jax.metrics": "free_jax.data.metrics",
    "free_jax.evaluate": "free_jax.evaluation",
    "free_jax.eval_cli": "free_jax.cli.evaluate",
    "free_jax.threshold_cli": "free_jax.cli.fit_threshold",
}


def resolve(old: str) -> ModuleType:
    """The module `old` moved to, imported, with a warning naming the new path."""
    new = MOVED[old]
    warnings.warn(
        f"{old} moved to {new}; import it from there (the old path will be removed).",
        DeprecationWarning,
        stacklevel=3,
    )
    return importlib.import_module(new)


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old module path and hands back the new module object itself."""

    def __init__(self) -> None:
        self._specs: dict[str, object] = {}

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = resolve(spec.name)
        self._specs[module.__name__] = module.__spec__
        return module

    def exec_module(self, module):
        # Already executed under its new name; the import system has just set `__spec__` to
        # the alias's, which would make the module claim the old name: put its own back.
        module.__spec__ = self._specs.pop(module.__name__)


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
