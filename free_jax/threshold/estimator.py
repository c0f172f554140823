"""The online estimator: refits the mixture on the agreement data decoding produces, on a
schedule, and hands out the current threshold (`ThresholdConfig`, `ThresholdEstimator`)."""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import numpy as np

from free_jax.errors import ConfigError, InputError
from free_jax.threshold.beta_mixture import (
    DEFAULT_GRID,
    NEWTON_STEPS,
    NUM_ITERS,
    REFERENCE_GRID,
    TOL,
    BetaMixture,
    FitStatus,
    as_f32,
    fit_jit,
    prepare_points,
    threshold_impl,
)

# -------------------------------------------------------------------------------------------------
# Online estimator.

_SCHEDULES = ("every", "reference")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ThresholdConfig:
    """Configuration of the online `ThresholdEstimator`.

    Attributes:
      zeta: posterior level in (0, 1) that P(agree | c) must exceed (paper: 0.4).
      low, high: threshold search interval, 0 <= low < high <= 1 (reference: 0.3, 0.9).
      initial: threshold before the first successful fit, and whenever a fit finds no crossing
        (reference: 0.9). A fit on degenerate data keeps the current threshold instead.
      schedule: "reference" refits after every input, on all data so far, for the first
        `freeze_after` inputs, then freezes (the authors' code); "every" refits after every
        `period` inputs, for the whole stream (the paper's description).
      period: for "every": an int number of inputs, or a float in (0, 1]: that fraction of
        `expected_inputs` (paper: 0.03), rounded, at least 1.
      expected_inputs: stream length, needed when `period` is a fraction.
      freeze_after: for "reference": number of inputs after which the threshold freezes (300).
      reference: fit the reference way (hard labels, 0.5/0.5 weights, moments, 10-point grid).
      supervised: use the agree labels (FREE has them); False fits by unsupervised EM.
      min_points: fits on fewer valid points are skipped (status TOO_FEW_POINTS), >= 2.
      window: keep only the most recent `window` points (a ring buffer: bounded memory, and the
        fit follows a drifting stream); None keeps everything (growth by doubling).
      prior: Dirichlet pseudo-count per component for the mixture weights.
      grid: threshold grid size; None: 10 with `reference`, else 241 followed by bisection.
    """

    zeta: float = 0.4
    low: float = 0.3
    high: float = 0.9
    initial: float = 0.9
    schedule: str = "reference"
    period: int | float = 0.03
    expected_inputs: int | None = None
    freeze_after: int = 300
    reference: bool = False
    supervised: bool = True
    min_points: int = 10
    window: int | None = None
    prior: float = 1.0
    grid: int | None = None

    def __post_init__(self):
        def fail(name: str, valid: str) -> None:
            raise ConfigError(
                f"ThresholdConfig.{name} must be {valid}, got {getattr(self, name)!r}"
            )

        def is_real(v) -> bool:
            return isinstance(v, float | int) and not isinstance(v, bool) and math.isfinite(v)

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not (is_real(self.zeta) and 0 < self.zeta < 1):
            fail("zeta", "a number in (0, 1)")
        for name in ("low", "high", "initial"):
            if not (is_real(getattr(self, name)) and 0 <= getattr(self, name) <= 1):
                fail(name, "a number in [0, 1]")
        if not self.low < self.high:
            raise ConfigError(
                f"ThresholdConfig needs low < high, got low={self.low!r}, high={self.high!r}"
            )
        if self.schedule not in _SCHEDULES:
            fail("schedule", f"one of {_SCHEDULES}")
        if is_int(self.period):
            if self.period < 1:
                fail("period", "an int >= 1 (inputs) or a float in (0, 1] (fraction of the stream)")
        elif not (is_real(self.period) and 0 < self.period <= 1):
            fail("period", "an int >= 1 (inputs) or a float in (0, 1] (fraction of the stream)")
        if self.expected_inputs is not None and not (
            is_int(self.expected_inputs) and self.expected_inputs >= 1
        ):
            fail("expected_inputs", "None or an int >= 1")
        if self.schedule == "every" and not is_int(self.period) and self.expected_inputs is None:
            raise ConfigError(
                f"ThresholdConfig.period={self.period!r} is a fraction of the stream, so "
                "expected_inputs must be set (or give period as an int number of inputs)"
            )
        if not (is_int(self.freeze_after) and self.freeze_after >= 0):
            fail("freeze_after", "an int >= 0")
        if not isinstance(self.reference, bool):
            fail("reference", "a bool")
        if not isinstance(self.supervised, bool):
            fail("supervised", "a bool")
        if self.reference and not self.supervised:
            raise ConfigError(
                "ThresholdConfig.reference=True needs supervised=True: the reference fit uses the "
                "agree labels"
            )
        if not (is_int(self.min_points) and self.min_points >= 2):
            fail("min_points", "an int >= 2")
        if self.window is not None and not (is_int(self.window) and self.window >= self.min_points):
            fail("window", f"None or an int >= min_points ({self.min_points})")
        if not (is_real(self.prior) and self.prior >= 0):
            fail("prior", "a finite number >= 0")
        if self.grid is not None and not (is_int(self.grid) and self.grid >= 2):
            fail("grid", "None or an int >= 2")

    @classmethod
    def reference_preset(cls, **overrides) -> ThresholdConfig:
        """The authors' estimator: reference fit and schedule (refit per input, freeze at 300)."""
        return cls(**{"schedule": "reference", "reference": True, **overrides})

    @property
    def refit_period(self) -> int:
        """For the "every" schedule: refit after every this many inputs."""
        if isinstance(self.period, int):
            return self.period
        return max(1, round(self.period * (self.expected_inputs or 0)))


class RefitRecord(NamedTuple):
    """One refit of a `ThresholdEstimator`.

    Attributes:
      input_index: number of inputs seen when the refit ran (1-based).
      num_points: valid data points the fit used.
      status: the fit's `FitStatus`.
      threshold: the threshold in effect after the refit.
      found: whether the fitted posterior crossed zeta in [low, high].
    """

    input_index: int
    num_points: int
    status: FitStatus
    threshold: float
    found: bool


class ThresholdEstimator:
    """Online ATE: collects (confidence, agree) pairs per input and refits on a schedule.

    Usage, once per decoded input::

        est = ThresholdEstimator(ThresholdConfig())
        for batch in stream:
            out = decode(batch, threshold=est.threshold)  # float32[] array: no recompile
            est.update(out.confidence, out.agree, mask=out.mask)

    The threshold after each `update` is recorded in `history`. A fit on degenerate data (see
    `FitStatus`) keeps the current threshold; a fit that finds no crossing sets `config.initial`.
    Memory: with `config.window` the buffers are a fixed ring of that many points; without it they
    hold every valid point seen (float32 + bool, 5 bytes a point, grown by doubling).
    """

    def __init__(self, config: ThresholdConfig | None = None):
        self.config = ThresholdConfig() if config is None else config
        capacity = self.config.window or 4096
        self._conf = np.empty(capacity, np.float32)
        self._agree = np.empty(capacity, bool)
        self._size = 0  # valid points held
        self._next = 0  # ring-buffer write position (window mode)
        self._history = np.empty(256, np.float32)
        self._num_inputs = 0
        self._threshold_value = float(self.config.initial)
        self._threshold = as_f32(self._threshold_value)
        self._mixture: BetaMixture | None = None
        self._refits: list[RefitRecord] = []

    @property
    def threshold(self) -> jax.Array:
        """float32[] array: the current exit threshold (pass it to compiled decoding)."""
        return self._threshold

    @property
    def history(self) -> np.ndarray:
        """float32[num_inputs]: the threshold in effect after each `update` (a copy)."""
        return self._history[: self._num_inputs].copy()

    @property
    def refits(self) -> tuple[RefitRecord, ...]:
        """Every refit so far, in order."""
        return tuple(self._refits)

    @property
    def mixture(self) -> BetaMixture | None:
        """The last successfully fitted mixture, or None."""
        return self._mixture

    @property
    def status(self) -> FitStatus | None:
        """Status of the last refit, or None before the first."""
        return self._refits[-1].status if self._refits else None

    @property
    def num_inputs(self) -> int:
        """Number of `update` calls so far."""
        return self._num_inputs

    @property
    def num_points(self) -> int:
        """Valid data points currently held."""
        return self._size

    @property
    def frozen(self) -> bool:
        """True once the "reference" schedule stopped refitting."""
        return self.config.schedule == "reference" and self._num_inputs >= self.config.freeze_after

    def data(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of held points: confidence float32[n], agree bool[n] (unordered if windowed)."""
        return self._conf[: self._size].copy(), self._agree[: self._size].copy()

    def refit_due(self, input_index: int) -> bool:
        """Whether the schedule refits after input number `input_index` (1-based)."""
        if self.config.schedule == "reference":
            return input_index <= self.config.freeze_after
        return input_index % self.config.refit_period == 0

    def update(self, confidence, agree, mask=None) -> bool:
        """Adds one input's data points and refits if the schedule says so.

        Args:
          confidence: float[N] (any shape, flattened) shallow confidences of this input's tokens.
          agree: bool[N], shallow argmax == deep argmax.
          mask: bool[N], True for real data points (e.g. not padding); None: all.

        Returns:
          True when a refit ran.
        """
        conf = np.asarray(confidence, dtype=np.float32).reshape(-1)
        labels = np.asarray(agree)
        if labels.size != conf.size:
            raise InputError(
                f"agree must have as many elements as confidence ({conf.size}), got shape "
                f"{labels.shape}"
            )
        keep = np.isfinite(conf)
        if mask is not None:
            mask = np.asarray(mask)
            if mask.size != conf.size:
                raise InputError(
                    f"mask must have as many elements as confidence ({conf.size}), got shape "
                    f"{mask.shape}"
                )
            keep &= mask.reshape(-1).astype(bool)
        self._append(conf[keep], labels.reshape(-1).astype(bool)[keep])
        self._num_inputs += 1
        due = self.refit_due(self._num_inputs)
        if due:
            self.refit()
        if self._num_inputs > self._history.size:
            self._history = np.concatenate([self._history, np.empty_like(self._history)])
        self._history[self._num_inputs - 1] = self._threshold_value
        return due

    def refit(self) -> RefitRecord:
        """Fits on the held data now (whatever the schedule) and updates the threshold."""
        cfg = self.config
        x, labels, valid = prepare_points(
            self._conf[: self._size], self._agree[: self._size] if cfg.supervised else None, None
        )
        previous = BetaMixture.default() if self._mixture is None else self._mixture
        grid = cfg.grid or (REFERENCE_GRID if cfg.reference else DEFAULT_GRID)
        result = fit_jit(
            x, labels, valid, previous.replace(reference=cfg.reference),
            NUM_ITERS, TOL, cfg.prior, cfg.min_points,
            supervised=cfg.supervised, reference=cfg.reference,
            newton_steps=0 if cfg.reference else NEWTON_STEPS,
        )  # fmt: skip
        # A separate jitted call: the threshold search does not depend on the bucket size, so it
        # compiles once rather than once per bucket.
        thr = threshold_impl(
            result.mixture, cfg.zeta, cfg.low, cfg.high, cfg.initial,
            grid=grid, refine=not cfg.reference,
        )  # fmt: skip
        status = result.fit_status
        found = status == FitStatus.OK and bool(thr.found)
        if status == FitStatus.OK:
            self._mixture = result.mixture
            # No crossing: the fallback (config.initial) is already in thr.value.
            self._set_threshold(float(thr.value))
        record = RefitRecord(
            self._num_inputs, int(result.num_points), status, self._threshold_value, found
        )
        self._refits.append(record)
        return record

    def _set_threshold(self, value: float) -> None:
        if value != self._threshold_value:
            self._threshold_value = value
            self._threshold = as_f32(value)

    def _append(self, conf: np.ndarray, agree: np.ndarray) -> None:
        k = conf.size
        window = self.config.window
        if window is not None:
            if k >= window:
                conf, agree, k = conf[-window:], agree[-window:], window
            # Order does not matter to the fit, so a ring buffer suffices.
            idx = (self._next + np.arange(k)) % window
            self._conf[idx], self._agree[idx] = conf, agree
            self._next = (self._next + k) % window
            self._size = min(self._size + k, window)
            return
        needed = self._size + k
        if needed > self._conf.size:
            capacity = max(needed, 2 * self._conf.size)
            for name in ("_conf", "_agree"):
                old = getattr(self, name)
                new = np.empty(capacity, old.dtype)
                new[: self._size] = old[: self._size]
                setattr(self, name, new)
        self._conf[self._size : needed], self._agree[self._size : needed] = conf, agree
        self._size = needed
