"""Plots of a fitted mixture and of an estimator's threshold trajectory."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from free_jax.threshold.beta_mixture import BetaMixture, as_f32, weighted_component_pdfs

# -------------------------------------------------------------------------------------------------
# Inspection: plots and files.


def plot_mixture(
    mixture: BetaMixture,
    confidence,
    agree,
    path: str | os.PathLike,
    *,
    zeta: float = 0.4,
    threshold: float | None = None,
    title: str | None = None,
) -> str:
    """Writes a PNG: data histograms per label, fitted component densities, posterior, threshold.

    Top panel: histograms of the confidences of agreeing and disagreeing tokens, each scaled to its
    share of the data (so they are comparable with the weighted component densities w_k p_k(c)).
    Bottom panel: P(agree | c), the level zeta, and the threshold.

    Args:
      mixture: the fitted mixture.
      confidence: float[N] confidences.
      agree: bool[N] labels, or None to draw a single histogram.
      path: output PNG path (directories are created).
      zeta: posterior level to draw.
      threshold: threshold to draw; None computes `mixture.threshold(zeta)`.
      title: figure title.

    Returns:
      The path written, as a string.
    """
    from matplotlib.figure import Figure  # Figure + savefig use Agg; no global pyplot state.

    conf = np.asarray(confidence, np.float64).reshape(-1)
    if threshold is None:
        threshold = float(mixture.threshold(zeta).value)
    grid = np.linspace(0.0, 1.0, 501)[1:-1]
    weighted = np.asarray(weighted_component_pdfs(mixture, as_f32(grid)))  # [G, 2]

    fig = Figure(figsize=(8, 6.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    bins = np.linspace(0, 1, 51)
    share = 1.0 / max(conf.size, 1)
    if agree is None:
        top.hist(conf, bins=bins, density=True, color="0.7", label="data")
    else:
        labels = np.asarray(agree).reshape(-1).astype(bool)
        for sel, name, color in ((~labels, "disagree", "tab:red"), (labels, "agree", "tab:blue")):
            top.hist(
                conf[sel], bins=bins, weights=np.full(sel.sum(), share / (bins[1] - bins[0])),
                alpha=0.35, color=color, label=f"data: {name} ({sel.sum()})",
            )  # fmt: skip
    w = np.asarray(mixture.weights)
    top.plot(grid, weighted[:, 0], color="tab:red", lw=2, label=f"disagree comp. (w={w[0]:.2f})")
    top.plot(grid, weighted[:, 1], color="tab:blue", lw=2, label=f"agree comp. (w={w[1]:.2f})")
    top.plot(grid, weighted.sum(1), color="k", lw=1, ls="--", label="mixture")
    top.set_ylabel("density")
    top.set_ylim(0, max(1.0, 1.2 * float(np.percentile(weighted.sum(1), 99))))
    top.legend(fontsize=8)
    bottom.plot(grid, np.asarray(mixture.posterior(grid)), color="tab:blue", label="P(agree | c)")
    bottom.axhline(zeta, color="0.4", ls=":", label=f"zeta = {zeta}")
    bottom.set_ylim(-0.02, 1.02)
    bottom.set_xlabel("shallow confidence c")
    bottom.set_ylabel("posterior")
    for ax in (top, bottom):
        ax.axvline(threshold, color="tab:green", lw=1.5)
    bottom.plot([], [], color="tab:green", label=f"threshold = {threshold:.3f}")
    bottom.legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    return str(path)


def plot_trajectory(
    history,
    path: str | os.PathLike,
    *,
    hlines: Mapping[str, float] | None = None,
    vlines: Mapping[str, float] | None = None,
    title: str | None = None,
) -> str:
    """Writes a PNG of threshold trajectories (threshold after each input).

    Args:
      history: float[num_inputs], or a mapping name -> float[num_inputs] for several runs.
      path: output PNG path (directories are created).
      hlines: optional labelled horizontal lines (e.g. the true crossing points).
      vlines: optional labelled vertical lines (e.g. where the stream shifts).
      title: figure title.

    Returns:
      The path written, as a string.
    """
    from matplotlib.figure import Figure

    runs = history if isinstance(history, Mapping) else {"threshold": history}
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    for name, values in runs.items():
        values = np.asarray(values).reshape(-1)
        ax.plot(np.arange(1, values.size + 1), values, lw=1.5, label=name)
    for name, y in (hlines or {}).items():
        ax.axhline(y, ls=":", color="0.3", lw=1)
        ax.annotate(name, (0.01, y), xycoords=("axes fraction", "data"), fontsize=8, va="bottom")
    for name, x in (vlines or {}).items():
        ax.axvline(x, ls="--", color="0.5", lw=1)
        ax.annotate(name, (x, 0.02), xycoords=("data", "axes fraction"), fontsize=8, rotation=90)
    ax.set_xlabel("input")
    ax.set_ylabel("threshold")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    return str(path)
