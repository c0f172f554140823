"""Agreement data saved to disk: reading it, and fitting a mixture to it (`fit-threshold`)."""

from __future__ import annotations

import json
import os

import numpy as np

from free_jax.errors import InputError
from free_jax.threshold.beta_mixture import BetaMixture, FitStatus
from free_jax.threshold.plots import plot_mixture


def load_agreement_data(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """Reads saved agreement data.

    Formats: `.npz` with arrays `confidence` and (optionally) `agree`; or JSON Lines (`.jsonl`),
    one object per line with `confidence` and `agree`, each a scalar or a list (e.g. one line per
    decoded input).

    Args:
      path: the file.

    Returns:
      confidence float32[N] and agree bool[N] (None when the file has no labels).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"agreement data file not found: {path}")
    if path.endswith(".npz"):
        with np.load(path) as data:
            if "confidence" not in data:
                raise InputError(f"{path} has no 'confidence' array (has {sorted(data.files)})")
            conf = np.asarray(data["confidence"], np.float32).reshape(-1)
            agree = np.asarray(data["agree"]).reshape(-1).astype(bool) if "agree" in data else None
    elif path.endswith((".jsonl", ".json")):
        confs, agrees = [], []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    confs.append(np.asarray(row["confidence"], np.float32).reshape(-1))
                    if "agree" in row:
                        agrees.append(np.asarray(row["agree"]).reshape(-1).astype(bool))
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                    raise InputError(
                        f"{path}:{number}: expected a JSON object with 'confidence' (number or "
                        f"list) and 'agree' (bool or list): {err}"
                    ) from err
        if agrees and len(agrees) != len(confs):
            raise InputError(f"{path}: 'agree' is present on some lines but not all")
        conf = np.concatenate(confs) if confs else np.zeros(0, np.float32)
        agree = np.concatenate(agrees) if agrees else None
    else:
        raise InputError(f"unsupported agreement data file {path!r}: expected .npz or .jsonl")
    if agree is not None and agree.size != conf.size:
        raise InputError(f"{path}: confidence has {conf.size} values but agree has {agree.size}")
    return conf, agree


def fit_from_file(
    path: str | os.PathLike,
    *,
    reference: bool = False,
    supervised: bool = True,
    zeta: float = 0.4,
    low: float = 0.3,
    high: float = 0.9,
    fallback: float = 0.9,
    plot: str | os.PathLike | None = None,
) -> dict:
    """Fits the mixture to saved agreement data and returns a JSON-ready summary.

    Args:
      path: `.npz` or `.jsonl` file (see `load_agreement_data`).
      reference: fit the reference way (needs labels).
      supervised: use the labels when the file has them.
      zeta, low, high, fallback: threshold search (see `BetaMixture.threshold`).
      plot: optional PNG path for `plot_mixture`.

    Returns:
      dict with threshold, found, status, message, ok, num_points, num_iters, converged,
      log_likelihood, weights, alpha, beta, mode, path.
    """
    conf, agree = load_agreement_data(path)
    labels = agree if supervised else None
    result = BetaMixture.fit_with_status(conf, labels, reference=reference)
    mix = result.mixture
    thr = mix.threshold(zeta, low=low, high=high, fallback=fallback)
    status = result.fit_status
    ok = status == FitStatus.OK
    summary = {
        "path": os.fspath(path),
        "mode": "reference" if reference else ("supervised" if labels is not None else "em"),
        "threshold": float(thr.value) if ok else float(fallback),
        "found": bool(thr.found) and ok,
        "status": status.name,
        "message": status.message,
        "ok": ok,
        "num_points": int(result.num_points),
        "num_iters": int(result.num_iters),
        "converged": bool(result.converged),
        "log_likelihood": float(result.log_likelihood) if ok else None,
        "weights": np.asarray(mix.weights).tolist(),
        "alpha": np.asarray(mix.alpha).tolist(),
        "beta": np.asarray(mix.beta).tolist(),
    }
    if plot is not None:
        summary["plot"] = plot_mixture(
            mix, conf, agree, plot, zeta=zeta, threshold=summary["threshold"]
        )
    return summary
