"""FREE's training losses as pure functions, and the objectives the trainer optimises.

The building blocks take arrays, not models, so each is checked against an independent NumPy
implementation (`tests/test_losses.py`):

* `cross_entropy`: the masked token mean of the next-token cross-entropy.
* `shallowdeep_ce`: `(L_s * CE_shallow + L * CE_deep) / (L_s + L)`, both exits weighted by depth.
* `weighted_ce`: CALM's `sum_i i * CE_i / sum_i i` over all L exits.
* `mse_cost_matrix`, `dynamic_layer_mapping`, `kd_dyna`, `kd_unif`, `kd_last`: layerwise
  distillation of the shallow blocks' states from evenly spaced deep ones (`teacher_layers`).
* `meta_classifier_loss`: the exit classifier's class-balanced cross-entropy on "the shallow
  arg-max equals the deep one".

The objectives (`free_objective`, `calm_objective`, `meta_objective`) run the teacher-forced
model once with every decoder block's state and compose the blocks above; they return
`(loss, aux)` with `aux` a dict of float32 scalars (plus `kd_mapping`), ready for logging.

Shapes follow the legend in `free_jax.models.config`; L_s is the shallow exit (`exit_layer`), Lt the
number of distillation teachers (= L_s). Every mean over tokens counts only tokens whose
`loss_mask` is 1, and is 0 (not NaN) for a batch without any.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from free_jax.errors import ConfigError
from free_jax.models import exit_classifier, t5
from free_jax.models.config import T5Config

Array = jax.Array
Params = dict[str, Any]
Batch = dict[str, Array]

KD_MODES = ("dyna", "last", "unif")
BALANCE_MODES = ("logit_adjust", "reweight", "none")

_F32 = jnp.float32


# ---------------------------------------------------------------------------- cross-entropy


def masked_mean(values: Array, mask: Array) -> Array:
    """Mean of `values` [B, T] over positions where `mask` [B, T] is nonzero; 0 if none are."""
    mask = mask.astype(_F32)
    return jnp.sum(values.astype(_F32) * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def token_cross_entropy(logits: Array, labels: Array) -> Array:
    """float32[B, T] next-token cross-entropy of logits [B, T, V] against labels int[B, T]."""
    logp = jax.nn.log_softmax(logits.astype(_F32), axis=-1)
    return -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]


def cross_entropy(logits: Array, labels: Array, loss_mask: Array) -> Array:
    """Masked token mean of the cross-entropy: logits [B, T, V], labels/loss_mask [B, T]."""
    return masked_mean(token_cross_entropy(logits, labels), loss_mask)


def shallowdeep_ce(
    shallow_logits: Array,
    deep_logits: Array,
    labels: Array,
    loss_mask: Array,
    *,
    exit_layer: int,
    num_layers: int,
) -> tuple[Array, Array, Array]:
    """FREE's shallow-deep cross-entropy, each exit weighted by its depth.

    Args:
      shallow_logits, deep_logits: [B, T, V] at the exits after blocks L_s and L.
      labels: int[B, T]; loss_mask: [B, T].
      exit_layer: L_s; num_layers: L.

    Returns:
      `(loss, ce_shallow, ce_deep)`, loss = `(L_s * ce_shallow + L * ce_deep) / (L_s + L)`.
    """
    ce_shallow = cross_entropy(shallow_logits, labels, loss_mask)
    ce_deep = cross_entropy(deep_logits, labels, loss_mask)
    loss = (exit_layer * ce_shallow + num_layers * ce_deep) / (exit_layer + num_layers)
    return loss, ce_shallow, ce_deep


def weighted_ce(exit_ces: Sequence[Array]) -> Array:
    """CALM's depth-weighted loss `sum_i i * CE_i / sum_i i` over exits i = 1..L.

    Args:
      exit_ces: L scalar cross-entropies, the exit after block 1 first (each from
        `cross_entropy`, so that callers can compute one exit's logits at a time).
    """
    weights = jnp.arange(1, len(exit_ces) + 1, dtype=_F32)
    return jnp.sum(weights * jnp.stack(exit_ces)) / jnp.sum(weights)


# ---------------------------------------------------------------------------- distillation


def teacher_layers(exit_layer: int, num_layers: int) -> tuple[int, ...]:
    """0-based deep blocks whose outputs teach the L_s shallow blocks.

    L_s blocks evenly spaced over the L, ending with the last: block `floor((i + 1) * L / L_s)`
    (1-based) for i in [0, L_s). For 6 of 24 these are blocks 4, 8, ..., 24 (the paper's); for
    3 of 12, blocks 4, 8, 12. Strictly increasing whenever L_s <= L.
    """
    if not 1 <= exit_layer <= num_layers:
        raise ConfigError(f"exit_layer={exit_layer} must be in [1, num_layers={num_layers}].")
    return tuple(((i + 1) * num_layers) // exit_layer - 1 for i in range(exit_layer))


def mse_cost_matrix(
    teachers: Sequence[Array], students: Sequence[Array], loss_mask: Array
) -> Array:
    """Masked mean squared errors between every teacher and every student state.

    Args:
      teachers: Lt states [B, T, D]; students: Ls states [B, T, D].
      loss_mask: [B, T]; only real target tokens count.

    Returns:
      float32[Lt, Ls], `M[t, s]` = mean over real tokens and the D features of
      `(teacher_t - student_s) ** 2`.
    """
    mask = loss_mask.astype(_F32)
    denom = jnp.maximum(jnp.sum(mask), 1.0) * teachers[0].shape[-1]
    rows = []
    for t in teachers:
        t = t.astype(_F32)
        # Differences, not |t|^2 + |s|^2 - 2 t.s: a student equal to its teacher (blocks that are
        # both, e.g. block 4 of 24 with L_s = 6) must cost exactly 0, not rounding noise.
        rows.append(
            jnp.stack(
                [
                    jnp.sum(jnp.square(t - s.astype(_F32)) * mask[..., None]) / denom
                    for s in students
                ]
            )
        )
    return jnp.stack(rows)


def dynamic_layer_mapping(costs: Array) -> Array:
    """FREE's dynamic teacher-to-student mapping from a cost matrix.

    From the last teacher down, each teacher takes its lowest-cost student strictly below the
    previous teacher's pick (the last teacher may take any student). When the previous pick is
    student 0 there is nothing below it, and the remaining teachers keep student 0. The mapping
    is therefore non-decreasing in the teacher index, and strictly increasing above its zeros.

    Args:
      costs: float[Lt, Ls].

    Returns:
      int32[Lt], the student of each teacher.
    """
    Lt, Ls = costs.shape
    students = jnp.arange(Ls, dtype=jnp.int32)
    previous = jnp.asarray(Ls, jnp.int32)  # the last teacher may pick any student
    picks = []
    for t in range(Lt - 1, -1, -1):
        allowed = students < previous
        best = jnp.argmin(jnp.where(allowed, costs[t], jnp.inf)).astype(jnp.int32)
        previous = jnp.where(jnp.any(allowed), best, previous)
        picks.append(previous)
    return jnp.stack(picks[::-1])


def kd_dyna(
    teachers: Sequence[Array], students: Sequence[Array], loss_mask: Array
) -> tuple[Array, Array]:
    """KD with dynamic layer mapping: mean cost of the matched pairs, and the mapping.

    Teachers must already be gradient-stopped; the mapping itself carries no gradient.

    Returns:
      `(loss, mapping)`, mapping int32[Lt] as `dynamic_layer_mapping`.
    """
    costs = mse_cost_matrix(teachers, students, loss_mask)
    mapping = dynamic_layer_mapping(jax.lax.stop_gradient(costs))
    matched = costs[jnp.arange(costs.shape[0]), mapping]
    return jnp.mean(matched), mapping


def kd_unif(teachers: Sequence[Array], students: Sequence[Array], loss_mask: Array) -> Array:
    """KD with the fixed pairing teacher i <-> student i (Lt == Ls): mean of their costs."""
    if len(teachers) != len(students):
        raise ValueError(f"kd_unif pairs {len(teachers)} teachers with {len(students)} students.")
    return jnp.mean(
        jnp.stack(
            [
                mse_cost_matrix([t], [s], loss_mask)[0, 0]
                for t, s in zip(teachers, students, strict=True)
            ]
        )
    )


def kd_last(teacher: Array, student: Array, loss_mask: Array) -> Array:
    """KD of the last shallow state from the last deep state: their masked MSE."""
    return mse_cost_matrix([teacher], [student], loss_mask)[0, 0]


# ---------------------------------------------------------------------------- exit classifier


def meta_classifier_loss(
    classifier: Params,
    normed_states: Array,
    shallow_logits: Array,
    deep_logits: Array,
    loss_mask: Array,
    *,
    balance: str = "logit_adjust",
) -> tuple[Array, dict[str, Array]]:
    """The exit classifier's loss: class-balanced cross-entropy on "exiting here is safe".

    Labels are 1 where the shallow exit's arg-max equals the deep exit's. The classes are
    usually far from balanced, so the loss corrects for the batch's class prior p (over real
    tokens, clipped to [1e-6, 1 - 1e-6]):

    * "logit_adjust" (the reference code's): cross-entropy of `logits + log p`, so the head's
      own logits learn the balanced (prior-free) odds;
    * "reweight": each token weighted by `1 / (2 * p[label])`, the two classes then weigh equally;
    * "none": plain cross-entropy.

    Args:
      classifier: the `exit_classifier` parameters (see `free_jax.models.exit_classifier`).
      normed_states: [B, T, D] shallow-exit states after the decoder's final norm.
      shallow_logits, deep_logits: [B, T, V] at the shallow and deep exits.
      loss_mask: [B, T].
      balance: one of `BALANCE_MODES`.

    Returns:
      `(loss, aux)` with aux `meta_positive_rate` (fraction of safe tokens) and `meta_accuracy`
      (of the head's own arg-max).
    """
    if balance not in BALANCE_MODES:
        raise ConfigError(f"balance={balance!r} is not known; valid: {BALANCE_MODES}.")
    mask = loss_mask.astype(_F32)
    labels = (jnp.argmax(shallow_logits, -1) == jnp.argmax(deep_logits, -1)).astype(jnp.int32)
    logits = exit_classifier.exit_classifier_logits(classifier, normed_states)  # [B, T, 2]
    pos = jnp.clip(masked_mean(labels, mask), 1e-6, 1 - 1e-6)
    prior = jnp.stack([1.0 - pos, pos])  # [2]
    if balance == "logit_adjust":
        ce = token_cross_entropy(logits + jnp.log(prior), labels)
        loss = masked_mean(ce, mask)
    else:
        ce = token_cross_entropy(logits, labels)
        if balance == "reweight":
            weight = 0.5 / prior[labels]  # [B, T]
            loss = jnp.sum(ce * weight * mask) / jnp.maximum(jnp.sum(mask), 1.0)
        else:
            loss = masked_mean(ce, mask)
    accuracy = masked_mean(jnp.argmax(logits, -1) == labels, mask)
    return loss, {"meta_positive_rate": pos, "meta_accuracy": accuracy}


# ---------------------------------------------------------------------------- objectives


def _check_objective(config: T5Config, exit_layer: int, *, deep_needed: bool = True) -> None:
    L = config.num_decoder_layers
    high = L - 1 if deep_needed else L
    if (
        isinstance(exit_layer, bool)
        or not isinstance(exit_layer, int)
        or not 1 <= exit_layer <= high
    ):
        raise ConfigError(
            f"exit_layer={exit_layer!r} must be an int in [1, {high}] for a decoder of {L} blocks."
        )


def _decoder_states(
    params: Params, config: T5Config, batch: Batch, compute_dtype: Any
) -> tuple[Params, tuple[Array, ...]]:
    """Runs the teacher-forced model; returns the (cast) params and all L block states."""
    if compute_dtype is not None:
        params = t5.cast_params(params, compute_dtype)
    out = t5.forward(
        params,
        config,
        batch["input_ids"],
        batch["decoder_input_ids"],
        batch["attention_mask"],
        return_block_states=True,
    )
    return params, out.block_states


def _accuracy(logits: Array, labels: Array, mask: Array) -> Array:
    return masked_mean(jnp.argmax(logits, -1) == labels, mask)


def free_objective(
    params: Params,
    config: T5Config,
    batch: Batch,
    *,
    exit_layer: int,
    kd: str | None = "dyna",
    alpha: float = 0.5,
    compute_dtype: Any = None,
) -> tuple[Array, dict[str, Array]]:
    """FREE's training objective: shallow-deep cross-entropy plus `alpha` times layerwise KD.

    Args:
      params: the model parameters (an `exit_classifier` entry, if any, is ignored).
      config: the architecture.
      batch: the batch contract of `free_jax.training`.
      exit_layer: L_s, in [1, L - 1].
      kd: "dyna" (the paper's), "last", "unif", or None for the cross-entropy alone.
      alpha: weight of the KD term.
      compute_dtype: cast the parameters (and so the activations) to this dtype for the pass,
        e.g. `jnp.bfloat16`; gradients flow back to the parameters' own dtype.

    Returns:
      `(loss, aux)`: aux holds float32 scalars `loss`, `ce`, `ce_shallow`, `ce_deep`, `kd`,
      `acc_shallow`, `acc_deep`, `agreement` (shallow arg-max == deep arg-max), `tokens`, and
      `kd_mapping` int32[L_s] (the student of each teacher; `dynamic_layer_mapping` for "dyna",
      `arange(L_s)` for "unif", -1 except the last for "last", all -1 without KD).
    """
    _check_objective(config, exit_layer)
    if kd is not None and kd not in KD_MODES:
        raise ConfigError(f"kd={kd!r} is not known; valid: {KD_MODES} or None.")
    L = config.num_decoder_layers
    labels, mask = batch["labels"], batch["loss_mask"]
    params, states = _decoder_states(params, config, batch, compute_dtype)
    shallow_logits = t5.exit_head(params, config, states[exit_layer - 1])
    deep_logits = t5.exit_head(params, config, states[L - 1])
    ce, ce_shallow, ce_deep = shallowdeep_ce(
        shallow_logits, deep_logits, labels, mask, exit_layer=exit_layer, num_layers=L
    )

    def normed(i: int) -> Array:
        return exit_classifier.normalised_exit_state(params, config, states[i])

    mapping = jnp.full((exit_layer,), -1, jnp.int32)
    kd_loss = jnp.zeros((), _F32)
    if kd == "last":
        kd_loss = kd_last(jax.lax.stop_gradient(normed(L - 1)), normed(exit_layer - 1), mask)
        mapping = mapping.at[-1].set(exit_layer - 1)
    elif kd is not None:
        teachers = [jax.lax.stop_gradient(normed(i)) for i in teacher_layers(exit_layer, L)]
        students = [normed(i) for i in range(exit_layer)]
        if kd == "dyna":
            kd_loss, mapping = kd_dyna(teachers, students, mask)
        else:
            kd_loss = kd_unif(teachers, students, mask)
            mapping = jnp.arange(exit_layer, dtype=jnp.int32)
    loss = ce + alpha * kd_loss if kd is not None else ce
    aux = {
        "loss": loss,
        "ce": ce,
        "ce_shallow": ce_shallow,
        "ce_deep": ce_deep,
        "kd": kd_loss,
        "acc_shallow": _accuracy(shallow_logits, labels, mask),
        "acc_deep": _accuracy(deep_logits, labels, mask),
        "agreement": masked_mean(
            jnp.argmax(shallow_logits, -1) == jnp.argmax(deep_logits, -1), mask
        ),
        "tokens": jnp.sum(mask.astype(_F32)),
        "kd_mapping": mapping,
    }
    return loss, aux


def calm_objective(
    params: Params, config: T5Config, batch: Batch, *, compute_dtype: Any = None
) -> tuple[Array, dict[str, Array]]:
    """The CALM baseline's objective: `weighted_ce` over all L exits.

    Each exit's logits are recomputed in the backward pass rather than stored (L copies of
    [B, T, V] would dominate memory at T5-large sizes).

    Returns:
      `(loss, aux)`: aux holds `loss`, `ce_shallow` (exit 1), `ce_deep` (exit L), `acc_deep`,
      `tokens`.
    """
    labels, mask = batch["labels"], batch["loss_mask"]
    params, states = _decoder_states(params, config, batch, compute_dtype)

    @jax.checkpoint
    def exit_ce(p: Params, h: Array) -> Array:
        return cross_entropy(t5.exit_head(p, config, h), labels, mask)

    ces = [exit_ce(params, h) for h in states]
    loss = weighted_ce(ces)
    deep_logits = t5.exit_head(params, config, states[-1])
    aux = {
        "loss": loss,
        "ce_shallow": ces[0],
        "ce_deep": ces[-1],
        "acc_deep": _accuracy(deep_logits, labels, mask),
        "tokens": jnp.sum(mask.astype(_F32)),
    }
    return loss, aux


def meta_objective(
    params: Params,
    config: T5Config,
    batch: Batch,
    *,
    exit_layer: int,
    balance: str = "logit_adjust",
    compute_dtype: Any = None,
) -> tuple[Array, dict[str, Array]]:
    """The exit classifier's objective at the shallow exit, the backbone frozen.

    Args:
      params: model parameters with an `exit_classifier` entry (`init_exit_classifier`). Only
        that entry receives gradients: the backbone's are stopped.
      exit_layer: L_s, in [1, L - 1].

    Returns:
      `(loss, aux)`: aux holds `loss`, `meta_positive_rate`, `meta_accuracy`, `tokens`.
    """
    _check_objective(config, exit_layer)
    if exit_classifier.KEY not in params:
        raise ConfigError(
            f"meta_objective needs params[{exit_classifier.KEY!r}]; add one with "
            f"free_jax.models.exit_classifier.init_exit_classifier."
        )
    classifier = params[exit_classifier.KEY]
    backbone = jax.lax.stop_gradient({k: v for k, v in params.items() if k != exit_classifier.KEY})
    backbone, states = _decoder_states(backbone, config, batch, compute_dtype)
    L = config.num_decoder_layers
    shallow = states[exit_layer - 1]
    loss, aux = meta_classifier_loss(
        classifier,
        exit_classifier.normalised_exit_state(backbone, config, shallow),
        t5.exit_head(backbone, config, shallow),
        t5.exit_head(backbone, config, states[L - 1]),
        batch["loss_mask"],
        balance=balance,
    )
    return loss, {"loss": loss, **aux, "tokens": jnp.sum(batch["loss_mask"].astype(_F32))}
