"""FREE's adaptive threshold estimator (ATE): a two-component Beta mixture over shallow confidence.

Each data point is a pair (c, a): the shallow exit's confidence c in [0, 1] and a = 1 when the
shallow argmax agreed with the deep argmax. A mixture of two Beta densities is fitted to c, one
component for disagreeing tokens (index 0) and one for agreeing tokens (index 1, always the
larger-mean component). The exit threshold is the smallest confidence in [low, high] at which the
posterior P(agree | c) exceeds zeta. See docs/free-method.md, section 3.

Modules, bottom up:

- `beta_mixture`: `BetaMixture`, a frozen pytree with `fit` / `fit_with_status` (jitted EM,
  supervised or not),
  `threshold` (jittable), `pdf` and `posterior`.
- `estimator`: `ThresholdConfig` and `ThresholdEstimator`, the host-level online estimator
  stepped once per
  decoded input; its `threshold` is a float32 scalar array, so handing a new value to compiled
  decoding does not recompile.
- `plots` (`plot_mixture`, `plot_trajectory`) and `files` (`load_agreement_data`,
  `fit_from_file`): inspection helpers.

May import: `free_jax.errors` only (TensorFlow Probability's JAX substrate, NumPy, matplotlib).

Axis legend: N data points, P padded (bucketed) size, G threshold-grid points.
"""

from free_jax.threshold.beta_mixture import (
    BetaMixture,
    FitResult,
    FitStatus,
    FitWarning,
    ThresholdResult,
)
from free_jax.threshold.estimator import RefitRecord, ThresholdConfig, ThresholdEstimator
from free_jax.threshold.files import fit_from_file, load_agreement_data
from free_jax.threshold.plots import plot_mixture, plot_trajectory

__all__ = [
    "BetaMixture",
    "FitResult",
    "FitStatus",
    "FitWarning",
    "RefitRecord",
    "ThresholdConfig",
    "ThresholdEstimator",
    "ThresholdResult",
    "fit_from_file",
    "load_agreement_data",
    "plot_mixture",
    "plot_trajectory",
]
