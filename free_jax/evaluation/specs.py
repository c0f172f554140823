"""Method specifications: what the harness runs (`MethodSpec`, parsed from `free:0.8@2`-style
strings), and the default method list and threshold sweep."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from free_jax.decoding import default_exit_layer, free_settings
from free_jax.errors import InputError
from free_jax.models.model import Model

# ---------------------------------------------------------------------------- method specs

FAMILIES = ("full", "static", "calm", "free")
MODES = ("default", "exact", "rollback")
SPEC_SYNTAX = (
    "METHOD[:ARG...][@EXIT_LAYER] with METHOD one of full, static, calm, free; ARG a threshold "
    "(calm, free), 'adaptive', 'exact' or 'rollback' (free); e.g. full, static@2, calm:0.9, "
    "free:0.8@2, free:adaptive, free:exact"
)
DEFAULT_THRESHOLDS = (0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MethodSpec:
    """One decoding configuration to evaluate.

    Attributes:
      method: "full", "static", "calm" or "free".
      exit_layer: static: the exit; calm: the shallowest exit; free: L_s. None: the checkpoint's
        FREE metadata, else `default_exit_layer`.
      threshold: calm and free: the exit threshold; None: the checkpoint's, else 0.9.
      adaptive: free: FREE's adaptive threshold (`ThresholdEstimator`), starting from its
        configuration's initial threshold.
      mode: free: "default", "exact" or "rollback".
      options: more keyword arguments for `free_jax.decode` (confidence, buffer_capacity,
        calm_tau, max_wait, ...), as (name, value) pairs.
      label: the name in tables and plots; default derived from the fields.
    """

    method: str
    exit_layer: int | None = None
    threshold: float | None = None
    adaptive: bool = False
    mode: str = "default"
    options: tuple[tuple[str, Any], ...] = ()
    label: str = ""

    def __post_init__(self) -> None:
        if self.method not in FAMILIES:
            raise InputError(
                f"method {self.method!r} cannot be evaluated; valid: {FAMILIES} ({SPEC_SYNTAX})."
            )
        if self.mode not in MODES:
            raise InputError(f"mode={self.mode!r} is not known; valid: {MODES}.")
        if self.method != "free" and (self.adaptive or self.mode != "default"):
            raise InputError(f"adaptive thresholds and modes are for 'free', not {self.method!r}.")
        if self.method in ("full", "static") and self.threshold is not None:
            raise InputError(f"method {self.method!r} takes no threshold.")
        if self.method == "full" and self.exit_layer is not None:
            raise InputError("method 'full' takes no exit layer.")
        if self.adaptive and self.threshold is not None:
            raise InputError("an adaptive threshold cannot also be fixed; drop one of them.")

    @property
    def name(self) -> str:
        """`label`, else a description such as "free thr=0.80 Ls=2"."""
        if self.label:
            return self.label
        parts = [self.method]
        if self.mode != "default":
            parts.append(self.mode)
        if self.adaptive:
            parts.append("adaptive")
        if self.threshold is not None:
            parts.append(f"thr={self.threshold:.2f}")
        if self.exit_layer is not None:
            parts.append(f"Ls={self.exit_layer}")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["options"] = dict(self.options)
        out["label"] = self.name
        return out


def parse_method(text: str) -> MethodSpec:
    """A `MethodSpec` from its command-line form (`SPEC_SYNTAX`), e.g. "free:0.8@2"."""
    head, _, layer = text.strip().partition("@")
    method, *args = head.split(":")
    if method not in FAMILIES:
        raise InputError(
            f"unknown method {method!r} in {text!r}; valid: {FAMILIES}. {SPEC_SYNTAX}."
        )
    fields: dict[str, Any] = {"method": method}
    if layer:
        if not layer.isdigit():
            raise InputError(f"{text!r}: the exit layer after '@' must be an integer.")
        fields["exit_layer"] = int(layer)
    for arg in args:
        if arg == "adaptive":
            fields["adaptive"] = True
        elif arg in MODES:
            fields["mode"] = arg
        else:
            try:
                fields["threshold"] = float(arg)
            except ValueError:
                raise InputError(f"{text!r}: cannot read {arg!r}. {SPEC_SYNTAX}.") from None
    return MethodSpec(**fields)


def default_methods(model: Model, exit_layer: int | None = None) -> list[MethodSpec]:
    """The table of issue 6: full, static, CALM, FREE (fixed and adaptive threshold), FREE exact.

    Thresholds and the exit layer are the checkpoint's FREE metadata where it has them (see
    `free_jax.decode`); CALM uses the same exit layer and threshold as FREE.
    """
    saved = free_settings(model)
    layer = exit_layer if exit_layer is not None else saved.get("exit_layer")
    layer = layer if layer is not None else default_exit_layer(model.config)
    threshold = float(saved.get("threshold", 0.9))
    return [
        MethodSpec(method="full"),
        MethodSpec(method="static", exit_layer=layer),
        MethodSpec(method="calm", exit_layer=layer, threshold=threshold),
        MethodSpec(method="free", exit_layer=layer, threshold=threshold),
        MethodSpec(method="free", exit_layer=layer, adaptive=True),
        MethodSpec(method="free", exit_layer=layer, threshold=threshold, mode="exact"),
    ]


def default_sweep(
    model: Model,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    exit_layer: int | None = None,
    static_layers: Sequence[int] | None = None,
) -> list[MethodSpec]:
    """Curves: static exiting at `static_layers` (default every layer below the top; each is a
    compilation), CALM and FREE at each threshold (one compilation each)."""
    saved = free_settings(model)
    layer = exit_layer if exit_layer is not None else saved.get("exit_layer")
    layer = layer if layer is not None else default_exit_layer(model.config)
    if static_layers is None:
        static_layers = range(1, model.config.num_decoder_layers)
    specs = [MethodSpec(method="static", exit_layer=int(k)) for k in static_layers]
    for method in ("calm", "free"):
        specs += [
            MethodSpec(method=method, exit_layer=layer, threshold=float(t)) for t in thresholds
        ]
    return specs
