"""Keeps other libraries' chatter out of the command line's output.

Without torch, `import transformers` logs "PyTorch was not found. Models won't be available...",
which says nothing about free_jax (it never uses transformers' models); `datasets` draws a
"Generating ... split" progress bar for every local file it reads. Both read their switches from
the environment when first imported, so the CLI sets them (unless the user already has) before
any subcommand imports them. A user's own Python process is left alone.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

_QUIET_ENVIRONMENT = {
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
}


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silences the libraries' advisory messages and progress bars for the enclosed command."""
    added = {k: v for k, v in _QUIET_ENVIRONMENT.items() if k not in os.environ}
    os.environ.update(added)
    if "datasets" in sys.modules:  # already imported: its switch was read
        sys.modules["datasets"].disable_progress_bars()
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)
