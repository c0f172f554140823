"""Small file helpers every checkpoint format shares."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from free_jax.errors import CheckpointError


def listing(path: Path) -> str:
    names = sorted(p.name for p in path.iterdir())
    if not names:
        return "nothing (the directory is empty)"
    return ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")


def read_json_object(file: Path) -> dict[str, Any]:
    """A JSON file that must hold an object; anything else is a `CheckpointError` naming it."""
    try:
        with open(file, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}.") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{file} must hold a JSON object, got {type(value).__name__}.")
    return value
