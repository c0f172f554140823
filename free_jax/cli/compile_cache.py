"""The persistent compilation cache of the `free-jax` commands that compile decode programs.

A decode program compiles once per process and shape, and FREE's take seconds: a t5-base-shaped
model at batch 1 on a 2-core CPU compiles FREE's program in about 7 s and full decoding's in
about 2 s. With the cache, a later run of a command loads the programs an earlier one compiled.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

#: The jax settings `scoped` changes, and restores when the command ends.
_SETTINGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")


def default_dir() -> Path:
    """`$FREE_JAX_CACHE/jax`, else `~/.cache/free_jax/jax`: compiled programs kept between runs."""
    root = os.environ.get("FREE_JAX_CACHE") or Path.home() / ".cache" / "free_jax"
    return Path(root) / "jax"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--compile-cache",
        default=None,
        help=f"keep compiled programs here between runs (default {default_dir()})",
    )
    parser.add_argument(
        "--no-compile-cache", action="store_true", help="compile afresh, keep nothing"
    )


@contextlib.contextmanager
def scoped(args: argparse.Namespace):
    """Keeps the programs a command compiles in a persistent cache, for the command only.

    jax's cache settings are process-wide: a command run in-process (`free_jax.cli.main` from a
    notebook or a test) would otherwise leave them set for all of the caller's later jitted code.
    Restoring the settings is not enough: jax opens the cache at the first compilation that
    finds a directory set and keeps it open whatever the settings say later, so the cache is
    reset on the way in (the command's directory takes effect even after earlier compilations)
    and on the way out (the caller's settings take effect again).
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache as jax_cache

    saved = {name: getattr(jax.config, name) for name in _SETTINGS}
    jax_cache.reset_cache()
    if not args.no_compile_cache:
        path = Path(args.compile_cache) if args.compile_cache else default_dir()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            print(f"# not caching compiled programs ({path}: {e})", file=sys.stderr)
        else:
            jax.config.update(_SETTINGS[0], str(path))
            jax.config.update(_SETTINGS[1], 0.5)
    try:
        yield
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)
        jax_cache.reset_cache()
