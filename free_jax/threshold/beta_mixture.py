"""The two-component Beta mixture over shallow confidence, fitted by EM (jitted), and the
threshold it implies (`BetaMixture`)."""

from __future__ import annotations

import enum
import functools
import math
import warnings
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import digamma
from tensorflow_probability.substrates import jax as tfp

from free_jax.errors import InputError

tfd = tfp.distributions

# The reference clips confidences to [1e-4, 1 - 1e-4]: Beta log-densities are infinite at 0 and 1.
CLIP_EPS = 1e-4
# Bounds on alpha + beta. The upper one keeps a (near) zero-variance component finite; a component
# whose moments ask for more is reported as ZERO_VARIANCE.
MAX_CONCENTRATION = 1e6
MIN_PARAM = 1e-3
# Data are padded to a power of two, at least this many points, so that streams of growing size
# reuse a handful of compiled programs instead of compiling once per size.
MIN_BUCKET = 1024
# Unsupervised EM starts from the best of several hard splits, each refined by a short EM run on a
# strided subsample of at most this many points (cheap, and enough to rank the starts).
INIT_SUBSAMPLE = 4096
INIT_QUANTILES = (0.05, 0.2, 0.5, 0.8, 0.95)
INIT_ITERS = 15
REFERENCE_GRID = 10
DEFAULT_GRID = 241  # spacing 0.0025 on [0.3, 0.9]; bisection then refines to ~1e-7
BISECTION_STEPS = 24
# EM defaults (see `BetaMixture.fit_with_status`).
NUM_ITERS = 200
TOL = 1e-6
NEWTON_STEPS = 4


class FitStatus(enum.IntEnum):
    """Outcome of a fit. Anything but OK means the previous mixture/threshold was kept."""

    OK = 0
    EMPTY = 1
    TOO_FEW_POINTS = 2
    ALL_AGREE = 3
    NONE_AGREE = 4
    ZERO_VARIANCE = 5
    COLLAPSED = 6
    NON_FINITE = 7

    @property
    def message(self) -> str:
        """A human-readable explanation of the status."""
        return _STATUS_MESSAGES[self]


_STATUS_MESSAGES = {
    FitStatus.OK: "fit succeeded",
    FitStatus.EMPTY: "no valid data points (empty input, or all masked out / non-finite)",
    FitStatus.TOO_FEW_POINTS: "fewer valid data points than min_points",
    FitStatus.ALL_AGREE: "every token agrees, so the disagree component has no data",
    FitStatus.NONE_AGREE: "no token agrees, so the agree component has no data",
    FitStatus.ZERO_VARIANCE: "a component's confidences have (near) zero variance",
    FitStatus.COLLAPSED: "unsupervised EM left a component with less than two points' weight",
    FitStatus.NON_FINITE: "the fit produced non-finite parameters",
}


class FitWarning(UserWarning):
    """Issued by `BetaMixture.fit` when the data were degenerate and the previous fit was kept."""


class ThresholdResult(NamedTuple):
    """Output of `BetaMixture.threshold`.

    Attributes:
      value: float32[], the threshold (the fallback when no crossing was found).
      found: bool[], whether P(agree | c) exceeded zeta somewhere in [low, high].
    """

    value: jax.Array
    found: jax.Array


def as_f32(x) -> jax.Array:
    return jnp.asarray(x, dtype=jnp.float32)


@flax.struct.dataclass
class BetaMixture:
    """A two-component Beta mixture over confidence in [0, 1]; component 1 is "agree".

    Attributes:
      weights: float32[2], mixture weights (sum to 1).
      alpha: float32[2], Beta concentration1 per component.
      beta: float32[2], Beta concentration0 per component.
      reference: static; True when fitted the reference way, which makes `threshold` default to the
        reference's 10-point grid without refinement.
    """

    weights: jax.Array
    alpha: jax.Array
    beta: jax.Array
    reference: bool = flax.struct.field(pytree_node=False, default=False)

    @classmethod
    def create(cls, weights, alpha, beta, *, reference: bool = False) -> BetaMixture:
        """Builds a mixture from array-likes of shape [2], checking shapes and positivity."""
        arrays = {"weights": weights, "alpha": alpha, "beta": beta}
        for name, value in arrays.items():
            value = np.asarray(value, dtype=np.float32)
            if value.shape != (2,):
                raise InputError(f"BetaMixture.{name} must have shape (2,), got {value.shape}")
            if not np.all(np.isfinite(value)) or np.any(value <= 0):
                raise InputError(f"BetaMixture.{name} must be finite and > 0, got {value}")
            arrays[name] = as_f32(value)
        return cls(**arrays, reference=reference)

    @classmethod
    def default(cls, *, reference: bool = False) -> BetaMixture:
        """The reference's initial mixture: Beta(1, 2) and Beta(2, 1), equal weights."""
        return cls(
            weights=as_f32([0.5, 0.5]), alpha=as_f32([1.0, 2.0]), beta=as_f32([2.0, 1.0]),
            reference=reference,
        )  # fmt: skip

    @property
    def distribution(self) -> tfd.MixtureSameFamily:
        """The mixture as a TFP distribution (batch shape [], event shape [])."""
        return tfd.MixtureSameFamily(
            mixture_distribution=tfd.Categorical(probs=self.weights),
            components_distribution=tfd.Beta(self.alpha, self.beta),
        )

    @property
    def means(self) -> jax.Array:
        """float32[2], the component means alpha / (alpha + beta)."""
        return self.alpha / (self.alpha + self.beta)

    def pdf(self, x) -> jax.Array:
        """Mixture density at confidences `x` (any shape; clipped like the data). Jitted."""
        return _pdf_impl(self, as_f32(x))

    def posterior(self, x) -> jax.Array:
        """P(agree | c = x) with the mixture weights included; same shape as `x`. Jitted."""
        return _posterior_impl(self, as_f32(x))

    def threshold(
        self,
        zeta: float | jax.Array = 0.4,
        *,
        low: float | jax.Array = 0.3,
        high: float | jax.Array = 0.9,
        grid: int | None = None,
        refine: bool | None = None,
        fallback: float | jax.Array = 0.9,
    ) -> ThresholdResult:
        """The smallest confidence in [low, high] where P(agree | c) > zeta. Jittable.

        The posterior is evaluated on `grid` evenly spaced points including both ends; the first
        point above zeta is then refined by bisection against its left neighbour, so the result is
        the crossing to ~1e-7 rather than to the grid spacing. If no grid point is above zeta the
        result is `fallback`.

        Args:
          zeta: posterior level in (0, 1).
          low, high: the search interval.
          grid: number of grid points (static). None: 10 for a reference-fitted mixture, else 241.
          refine: bisect after the grid search (static). None: not for a reference-fitted mixture
            (the reference returns the grid point itself), otherwise yes.
          fallback: value returned when nothing crosses (reference: 0.9, its initial threshold).

        Returns:
          ThresholdResult(value: float32[], found: bool[]).
        """
        if grid is None:
            grid = REFERENCE_GRID if self.reference else DEFAULT_GRID
        if refine is None:
            refine = not self.reference
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 2:
            raise InputError(f"grid must be an int >= 2, got {grid!r}")
        _check_level("zeta", zeta)
        if isinstance(low, float | int) and isinstance(high, float | int) and not low < high:
            raise InputError(f"need low < high, got low={low!r}, high={high!r}")
        return threshold_impl(self, zeta, low, high, fallback, grid=grid, refine=refine)

    @classmethod
    def fit_with_status(
        cls,
        confidence,
        agree=None,
        *,
        mask=None,
        reference: bool = False,
        num_iters: int = NUM_ITERS,
        tol: float = TOL,
        prior: float = 1.0,
        newton_steps: int = NEWTON_STEPS,
        min_points: int = 10,
        previous: BetaMixture | None = None,
    ) -> FitResult:
        """Fits the mixture and reports how it went. Host-level; the fit itself is one jitted call.

        Supervised (`agree` given, as in FREE): responsibilities are the labels, so one M-step is
        the exact fit; the mixture weights are the label frequencies smoothed by `prior`
        pseudo-counts per component (a symmetric Dirichlet), which keeps them inside (0, 1).

        Unsupervised (`agree=None`): EM with soft responsibilities. Starts are hard splits of the
        data at several quantiles, each refined by a short EM run on a strided subsample; the best
        start by log-likelihood is iterated on all data until the mean log-likelihood changes by
        less than `tol` or `num_iters` iterations ran. (A single median or k-means split lands
        inside the big component when the classes are imbalanced, e.g. 95%/5%, and EM then stays
        in a worse local optimum.)

        M-step: weighted method of moments (alpha = m(m(1-m)/s^2 - 1), beta = alpha(1-m)/m), then
        `newton_steps` Newton steps on the weighted Beta log-likelihood. We take the Newton steps by
        default because the moment estimate does not maximise the EM objective, so with moments
        alone EM is not guaranteed to increase the likelihood, and the maximum-likelihood estimate
        is the more efficient one. The Beta log-likelihood is concave in (alpha, beta) and the
        moment estimate is a close start, so a few steps reach float32 precision; their cost does
        not depend on N (they use the sufficient statistics mean log c and mean log(1 - c)). On
        our synthetic mixtures the two M-steps give fits of nearly equal likelihood;
        `newton_steps=0` gives the reference's moments-only M-step.

        E-step: the component log-densities come from TFP's `tfd.Beta`, evaluated per component on
        [P] arrays. (`MixtureSameFamily.posterior_marginal` gives the same numbers in a [P, 2]
        layout, which XLA:CPU handles several times slower because of the size-2 minor axis.)

        `reference=True` reproduces the authors' fit: hard label responsibilities, weights fixed at
        0.5/0.5, method of moments only; `prior` and `newton_steps` are ignored. One difference:
        the reference floors the label responsibilities at 1e-4 before normalising, which leaks a
        ~5e-4 weight of each class into the other component; here they are exactly hard.

        Data are flattened, clipped to [1e-4, 1 - 1e-4] and padded to the next power of two (at
        least 1024) with a validity mask, so different sizes share compiled programs. Masked-out
        and non-finite confidences are ignored.

        Args:
          confidence: float[N] (any shape, flattened) shallow confidences in [0, 1].
          agree: bool[N] labels (shallow argmax == deep argmax), or None for an unsupervised fit.
          mask: bool[N], True for points to use; None uses all.
          reference: fit the reference way (requires `agree`).
          num_iters: maximum EM iterations (unsupervised).
          tol: convergence tolerance on the change of the mean log-likelihood (unsupervised).
          prior: Dirichlet pseudo-count per component for the weights (>= 0).
          newton_steps: Newton steps after the moment estimate in every M-step (0: moments only).
          min_points: fewer valid points than this is TOO_FEW_POINTS.
          previous: mixture to return when the data are degenerate; None: `BetaMixture.default()`.

        Returns:
          FitResult with the fitted mixture (or `previous` when status is not OK).
        """
        if reference and agree is None:
            raise InputError("reference=True needs agree labels: the reference fit is supervised")
        for name, value, lowest in (("num_iters", num_iters, 1), ("min_points", min_points, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                raise InputError(f"{name} must be an int >= {lowest}, got {value!r}")
        if isinstance(newton_steps, bool) or not isinstance(newton_steps, int) or newton_steps < 0:
            raise InputError(f"newton_steps must be an int >= 0, got {newton_steps!r}")
        if not (math.isfinite(prior) and prior >= 0):
            raise InputError(f"prior must be finite and >= 0, got {prior!r}")
        if not (math.isfinite(tol) and tol >= 0):
            raise InputError(f"tol must be finite and >= 0, got {tol!r}")
        x, labels, valid = prepare_points(confidence, agree, mask)
        previous = cls.default() if previous is None else previous
        return fit_jit(
            x, labels, valid, previous.replace(reference=reference),
            num_iters, tol, prior, min_points,
            supervised=agree is not None, reference=reference,
            newton_steps=0 if reference else newton_steps,
        )  # fmt: skip

    @classmethod
    def fit(cls, confidence, agree=None, *, reference: bool = False, **kwargs) -> BetaMixture:
        """Fits the mixture; on degenerate data warns (`FitWarning`) and returns the previous one.

        Same arguments as `fit_with_status`, which also returns the status.

        Args:
          confidence: float[N] shallow confidences in [0, 1].
          agree: bool[N] agreement labels, or None for an unsupervised fit.
          reference: fit the reference way (requires `agree`).
          **kwargs: see `fit_with_status`.

        Returns:
          The fitted BetaMixture, or `previous` (default: `BetaMixture.default()`) when the fit
          failed.
        """
        result = cls.fit_with_status(confidence, agree, reference=reference, **kwargs)
        status = result.fit_status
        if status != FitStatus.OK:
            warnings.warn(
                f"Beta mixture fit kept the previous mixture: {status.name}: {status.message}",
                FitWarning,
                stacklevel=2,
            )
        return result.mixture


@flax.struct.dataclass
class FitResult:
    """Output of `BetaMixture.fit_with_status`.

    Attributes:
      mixture: the fitted mixture, or the previous one when `status` is not OK.
      status: int32[], a `FitStatus` code.
      num_points: int32[], valid data points used.
      num_iters: int32[], EM iterations run (1 for a supervised fit).
      converged: bool[], whether EM met the tolerance (True for a supervised fit).
      log_likelihood: float32[], mean log-likelihood of the data under the fitted mixture (0 when
        status is not OK: never NaN).
    """

    mixture: BetaMixture
    status: jax.Array
    num_points: jax.Array
    num_iters: jax.Array
    converged: jax.Array
    log_likelihood: jax.Array

    @property
    def ok(self) -> jax.Array:
        """bool[], True when the fit succeeded (usable in `if` on concrete values)."""
        return self.status == FitStatus.OK

    @property
    def fit_status(self) -> FitStatus:
        """The status as a `FitStatus` (host-level: needs a concrete value)."""
        return FitStatus(int(self.status))

    @property
    def message(self) -> str:
        """Human-readable explanation of the status (host-level)."""
        return self.fit_status.message


# -------------------------------------------------------------------------------------------------
# Jitted core.


def _clip(x: jax.Array) -> jax.Array:
    return jnp.clip(x, CLIP_EPS, 1.0 - CLIP_EPS)


# Jitted because TFP run eagerly dispatches (and compiles) dozens of small ops per call.
@jax.jit
def _pdf_impl(mixture: BetaMixture, x: jax.Array) -> jax.Array:
    return jnp.exp(mixture.distribution.log_prob(_clip(x)))


@jax.jit
def _posterior_impl(mixture: BetaMixture, x: jax.Array) -> jax.Array:
    logits = mixture.distribution.posterior_marginal(_clip(x)).logits  # [..., 2]
    # With two classes the posterior is a sigmoid of the log-odds (stabler than a softmax).
    return jax.nn.sigmoid(logits[..., 1] - logits[..., 0])


@jax.jit
def weighted_component_pdfs(mixture: BetaMixture, x: jax.Array) -> jax.Array:
    """w_k p_k(x): float32[..., 2] for x: float32[...]."""
    log_p = mixture.distribution.components_distribution.log_prob(_clip(x)[..., None])
    return jnp.exp(log_p) * mixture.weights


def _check_level(name: str, value) -> None:
    if isinstance(value, float | int) and not 0.0 < value < 1.0:
        raise InputError(f"{name} must be in (0, 1), got {value!r}")


def _bucket(n: int) -> int:
    """Padded size for n points: the next power of two, at least MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length())


def prepare_points(confidence, agree, mask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flattens, checks and pads host data. Returns float32[P], bool[P], bool[P] (valid)."""
    x = np.asarray(confidence, dtype=np.float32).reshape(-1)
    arrays = [x]
    for name, value in (("agree", agree), ("mask", mask)):
        if value is None:
            arrays.append(np.ones(x.shape, bool) if name == "mask" else np.zeros(x.shape, bool))
            continue
        value = np.asarray(value)
        if value.size != x.size:
            raise InputError(
                f"{name} must have as many elements as confidence ({x.size}), got shape "
                f"{value.shape}"
            )
        arrays.append(value.reshape(-1).astype(bool))
    size = _bucket(x.size)
    padded = []
    for value, fill in zip(arrays, (0.5, False, False), strict=True):
        out = np.full(size, fill, dtype=value.dtype)
        out[: value.size] = value
        padded.append(out)
    return tuple(padded)


class _Stats(NamedTuple):
    """Weighted sufficient statistics of both components (each float32[2])."""

    count: jax.Array
    mean: jax.Array
    var: jax.Array
    mean_log: jax.Array  # weighted mean of log c
    mean_log1m: jax.Array  # weighted mean of log(1 - c)


def _stats(x, log_x, log1m_x, weight, r1) -> _Stats:
    """Statistics of x: float32[P] under responsibilities (weight - r1, r1), each float32[P].

    The reductions run per component over [P] vectors: XLA:CPU is slow on a [P, 2] layout.
    """
    rows = []
    for r in (weight - r1, r1):
        count = r.sum()
        denom = jnp.maximum(count, 1e-30)
        mean = (r * x).sum() / denom
        # Two passes: one-pass E[x^2] - m^2 loses the small variances the zero-variance check needs.
        var = (r * jnp.square(x - mean)).sum() / denom
        rows.append((count, mean, var, (r * log_x).sum() / denom, (r * log1m_x).sum() / denom))
    return _Stats(*(jnp.stack(column) for column in zip(*rows, strict=True)))


def _moments(s: _Stats) -> tuple[jax.Array, jax.Array]:
    """Method-of-moments Beta parameters float32[2] each, clamped to finite values."""
    m = _clip(s.mean)
    kappa = m * (1.0 - m) / jnp.maximum(s.var, 1e-30) - 1.0  # alpha + beta
    kappa = jnp.clip(kappa, 2 * MIN_PARAM, MAX_CONCENTRATION)
    return jnp.maximum(m * kappa, MIN_PARAM), jnp.maximum((1.0 - m) * kappa, MIN_PARAM)


def _trigamma(x: jax.Array) -> jax.Array:
    """psi'(x) for x > 0: six recurrence steps, then the asymptotic series (error < 1e-9).

    `jax.scipy.special.polygamma` is exact too but compiles several times slower, and the fit
    traces it at several sites.
    """
    shift = sum(1.0 / jnp.square(x + k) for k in range(6))
    z = x + 6.0
    iz2 = 1.0 / jnp.square(z)
    series = (1.0 + (0.5 + (1 / 6 + (-1 / 30 + (1 / 42 - iz2 / 30) * iz2) * iz2) / z) / z) / z
    return shift + series


def _newton(a, b, s: _Stats, steps: int) -> tuple[jax.Array, jax.Array]:
    """Newton steps on the per-point Beta log-likelihood, both components at once (float32[2]).

    Objective per component: (a-1) E[log c] + (b-1) E[log(1-c)] - log B(a, b), concave in (a, b).
    """

    def step(_, ab):
        a, b = ab
        psi_ab, tri_ab = digamma(a + b), _trigamma(a + b)
        grad_a = s.mean_log - digamma(a) + psi_ab
        grad_b = s.mean_log1m - digamma(b) + psi_ab
        tri_a, tri_b = _trigamma(a), _trigamma(b)
        # Hessian [[tri_ab - tri_a, tri_ab], [tri_ab, tri_ab - tri_b]] is negative definite;
        # its determinant is tri_a * tri_b - tri_ab * (tri_a + tri_b) > 0.
        det = tri_a * tri_b - tri_ab * (tri_a + tri_b)
        step_a = ((tri_ab - tri_b) * grad_a - tri_ab * grad_b) / det
        step_b = ((tri_ab - tri_a) * grad_b - tri_ab * grad_a) / det
        # Damping: at most a factor 4 per step, so no step can leave the positive quadrant.
        new_a = jnp.clip(a - step_a, a / 4, a * 4)
        new_b = jnp.clip(b - step_b, b / 4, b * 4)
        ok = jnp.isfinite(new_a) & jnp.isfinite(new_b)
        return jnp.where(ok, new_a, a), jnp.where(ok, new_b, b)

    a, b = jax.lax.fori_loop(0, steps, step, (a, b))
    scale = jnp.minimum(1.0, MAX_CONCENTRATION / (a + b))
    return jnp.maximum(a * scale, MIN_PARAM), jnp.maximum(b * scale, MIN_PARAM)


def _m_step(x, log_x, log1m_x, weight, r1, prior, *, reference: bool, newton_steps: int):
    """Mixture from agree-responsibilities r1: float32[P] (weight - r1 for the other component).

    Returns:
      (BetaMixture, _Stats of both components).
    """
    stats = _stats(x, log_x, log1m_x, weight, r1)
    alpha, beta = _moments(stats)
    if newton_steps:
        alpha, beta = _newton(alpha, beta, stats, newton_steps)
    if reference:
        weights = jnp.full((2,), 0.5, jnp.float32)
    else:
        weights = (stats.count + prior) / jnp.maximum(stats.count.sum() + 2 * prior, 1e-30)
    return BetaMixture(weights=weights, alpha=alpha, beta=beta, reference=reference), stats


def _e_step(mixture: BetaMixture, x, weight) -> tuple[jax.Array, jax.Array]:
    """Agree responsibilities float32[P] (0 at padding) and the mean log-likelihood float32[]."""
    log_w = jnp.log(mixture.weights)
    lp0 = tfd.Beta(mixture.alpha[0], mixture.beta[0]).log_prob(x) + log_w[0]
    lp1 = tfd.Beta(mixture.alpha[1], mixture.beta[1]).log_prob(x) + log_w[1]
    log_odds = lp1 - lp0
    # log(p0 + p1) = lp0 + softplus(lp1 - lp0): one transcendental instead of a logsumexp.
    log_lik = (weight * (lp0 + jax.nn.softplus(log_odds))).sum() / jnp.maximum(weight.sum(), 1.0)
    return weight * jax.nn.sigmoid(log_odds), log_lik


def _run_em(mixture, stats, x, log_x, log1m_x, weight, prior, num_iters, tol, newton_steps):
    """EM iterations from `mixture` until |delta mean log-likelihood| <= tol or num_iters.

    Returns:
      (mixture, its _Stats, iterations run int32[], converged bool[], mean log-likelihood float32[]
      at the last E-step, i.e. of the mixture one M-step before the returned one).
    """
    m_step = functools.partial(_m_step, reference=False, newton_steps=newton_steps)

    def cond(carry):
        it, _, _, prev_ll, ll = carry
        return (it < num_iters) & (jnp.abs(ll - prev_ll) > tol)

    def body(carry):
        it, mixture, _, _, ll = carry
        r1, new_ll = _e_step(mixture, x, weight)
        mixture, stats = m_step(x, log_x, log1m_x, weight, r1, prior)
        return it + 1, mixture, stats, ll, new_ll

    # Two distinct sentinels force at least two iterations. The log-likelihood is carried out of
    # the loop rather than recomputed: every traced E-step adds seconds of XLA compile time.
    init = (jnp.int32(0), mixture, stats, as_f32(-jnp.inf), as_f32(jnp.finfo(jnp.float32).min))
    it, mixture, stats, prev_ll, ll = jax.lax.while_loop(cond, body, init)
    return mixture, stats, it, jnp.abs(ll - prev_ll) <= tol, ll


def _initial_mixture(x, log_x, log1m_x, weight, prior, newton_steps):
    """Best of several quantile splits after a short EM run on a strided subsample."""
    stride = max(1, x.shape[0] // INIT_SUBSAMPLE)
    xs, ls, l1s, ws = (v[::stride] for v in (x, log_x, log1m_x, weight))
    # Quantiles of the valid subsample: invalid points sort to the end.
    order = jnp.sort(jnp.where(ws > 0, xs, jnp.inf))
    last = jnp.maximum(ws.sum() - 1, 0)
    q = jnp.asarray(INIT_QUANTILES, jnp.float32)
    cuts = order[jnp.floor(q * last).astype(jnp.int32)]  # [len(INIT_QUANTILES)]

    def start(cut):
        mixture, stats = _m_step(
            xs, ls, l1s, ws, ws * (xs > cut), prior, reference=False, newton_steps=newton_steps
        )
        mixture, _, _, _, ll = _run_em(
            mixture, stats, xs, ls, l1s, ws, prior, INIT_ITERS, 0.0, newton_steps
        )
        return mixture, jnp.where(jnp.isfinite(ll), ll, -jnp.inf)

    mixtures, lls = jax.vmap(start)(cuts)
    best = jnp.argmax(lls)
    return jax.tree.map(lambda v: v[best], mixtures)


def _reorder(mixture: BetaMixture) -> BetaMixture:
    """Swaps components so that index 1 has the larger mean (the "agree" component)."""
    swap = mixture.means[0] > mixture.means[1]
    return jax.tree.map(lambda v: jnp.where(swap, v[::-1], v), mixture)


def _fit_core(
    x, agree, valid, previous, num_iters, tol, prior, min_points, *, supervised, reference,
    newton_steps,
) -> FitResult:  # fmt: skip
    """The whole fit on padded arrays x: float32[P], agree: bool[P], valid: bool[P]."""
    valid = valid & jnp.isfinite(x)
    weight = valid.astype(jnp.float32)
    x = jnp.where(valid, _clip(x), 0.5)  # padding gets a harmless in-range value
    log_x, log1m_x = jnp.log(x), jnp.log1p(-x)
    n = weight.sum()
    if supervised:
        r1 = weight * agree
        mixture, stats = _m_step(
            x, log_x, log1m_x, weight, r1, prior, reference=reference, newton_steps=newton_steps
        )
        _, log_lik = _e_step(mixture, x, weight)
        num_run, converged = jnp.int32(1), jnp.bool_(True)
    else:
        mixture = _initial_mixture(x, log_x, log1m_x, weight, prior, newton_steps)
        # Stats of the start only seed the carry; the loop runs at least twice.
        stats = _stats(x, log_x, log1m_x, weight, weight * 0.5)
        mixture, stats, num_run, converged, log_lik = _run_em(
            mixture, stats, x, log_x, log1m_x, weight, prior, num_iters, tol, newton_steps
        )
    mixture = _reorder(mixture)

    # A variance that would need alpha + beta > MAX_CONCENTRATION counts as zero.
    m = _clip(stats.mean)
    zero_var = jnp.any(stats.var * (MAX_CONCENTRATION + 1.0) <= m * (1.0 - m))

    leaves = jax.tree.leaves(mixture)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in leaves])) & jnp.isfinite(log_lik)
    # Later conditions take precedence: the most basic problem is the one reported.
    status = jnp.int32(FitStatus.OK)
    status = jnp.where(finite, status, FitStatus.NON_FINITE)
    if not supervised:
        collapsed = jnp.any(stats.count < 2)
        status = jnp.where(collapsed, FitStatus.COLLAPSED, status)
    status = jnp.where(zero_var, FitStatus.ZERO_VARIANCE, status)
    if supervised:
        status = jnp.where(stats.count[1] == 0, FitStatus.NONE_AGREE, status)
        status = jnp.where(stats.count[0] == 0, FitStatus.ALL_AGREE, status)
    status = jnp.where(n < min_points, FitStatus.TOO_FEW_POINTS, status)
    status = jnp.where(n == 0, FitStatus.EMPTY, status).astype(jnp.int32)

    ok = status == FitStatus.OK
    mixture = jax.tree.map(lambda new, old: jnp.where(ok, new, old), mixture, previous)
    return FitResult(
        mixture=mixture,
        status=status,
        num_points=n.astype(jnp.int32),
        num_iters=jnp.asarray(num_run, jnp.int32),
        converged=converged,
        log_likelihood=jnp.where(ok, log_lik, 0.0),
    )


_STATIC = ("supervised", "reference", "newton_steps")
fit_jit = jax.jit(_fit_core, static_argnames=_STATIC)


@functools.partial(jax.jit, static_argnames=("grid", "refine"))
def threshold_impl(mixture, zeta, low, high, fallback, *, grid: int, refine: bool):
    points = jnp.linspace(as_f32(low), as_f32(high), grid, dtype=jnp.float32)  # [G]
    above = mixture.posterior(points) > zeta  # [G]
    found = above.any()
    first = jnp.argmax(above)
    value = points[first]
    if refine:
        # Invariant: posterior(lo) <= zeta < posterior(hi), except when the first grid point is
        # already above zeta (lo == hi == low, nothing to refine).
        def bisect(_, bounds):
            lo, hi = bounds
            mid = 0.5 * (lo + hi)
            up = mixture.posterior(mid) > zeta
            return jnp.where(up, lo, mid), jnp.where(up, mid, hi)

        lo = points[jnp.maximum(first - 1, 0)]
        _, value = jax.lax.fori_loop(0, BISECTION_STEPS, bisect, (lo, value))
    value = jnp.where(found, value, as_f32(fallback))
    return ThresholdResult(value=value.astype(jnp.float32), found=found)
