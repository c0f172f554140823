"""Orbax checkpoints of the whole training state, with resume that survives damaged steps.

Each step directory holds two items: `state` (step, parameters, optimizer state, RNG; sharded
arrays, restored straight into the current mesh's shardings, which may differ from the saving
run's) and `meta` (JSON: the step, the data position, the config, the metrics). The manager
keeps the latest `keep` steps and, when a best metric is configured, the best step by that
metric whatever its age.

Orbax writes each save into a temporary directory and renames it when complete, so a run killed
mid-save leaves no step directory that looks finished; those temporary directories are removed
when the manager starts. A step directory that is nevertheless unreadable (files lost or
truncated, a copy interrupted) is skipped on resume, with a logged message naming it, in favour
of the newest earlier one that restores, and moved aside to `<output_dir>/checkpoints_bad/` so
that the resumed run can save that step again.
"""

from __future__ import annotations

import collections
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from free_jax.errors import ConfigError
from free_jax.training.config import CheckpointConfig

log = logging.getLogger("free_jax.training")


def _signature(tree: Any) -> collections.Counter:
    """The multiset of (shape, dtype) of a state's arrays (or of their saved metadata)."""
    return collections.Counter(
        (tuple(x.shape), str(np.dtype(x.dtype))) for x in jax.tree.leaves(tree)
    )


class TrainCheckpoints:
    """The checkpoint directory of one training run (`<output_dir>/checkpoints`)."""

    def __init__(self, output_dir: str | Path, config: CheckpointConfig):
        self.config = config
        self.directory = Path(output_dir).absolute() / "checkpoints"
        self.bad_directory = Path(output_dir).absolute() / "checkpoints_bad"
        policy: Any = policies.LatestN(n=config.keep)
        best_options = {}
        if config.best_metric is not None:
            name = config.best_metric
            policy = policies.AnyPreservationPolicy(
                policies=[
                    policy,
                    policies.BestN(
                        get_metric_fn=lambda metrics: metrics[name],
                        reverse=config.best_mode == "min",
                        n=1,
                        keep_checkpoints_without_metrics=False,
                    ),
                ]
            )
            # best_fn only makes orbax store the metrics; the policy above decides what is kept.
            best_options = dict(best_fn=lambda metrics: metrics[name], best_mode=config.best_mode)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            **best_options,
            enable_async_checkpointing=config.async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_names=("state", "meta"),
            options=options,
            # Explicit handlers let item_metadata read a step's array shapes before restoring.
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(
        self, step: int, state: Any, meta: dict[str, Any], metrics: dict[str, float] | None = None
    ) -> None:
        """Saves `state` at `step` (asynchronously when configured); every process calls it."""
        if step in self.manager.all_steps():
            return  # already saved (e.g. the final step was also a periodic one)
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            metrics=metrics,
            force=True,
        )

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict[str, Any]] | None:
        """Restores the newest readable step into `abstract_state`'s shapes and shardings.

        Returns:
          `(state, meta)`, or None when there is no readable checkpoint.
        """
        self.manager.reload()
        expected = _signature(abstract_state)
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                saved = _signature(self.manager.item_metadata(step)["state"])
            except Exception:  # noqa: BLE001 - unreadable metadata: a damaged step, below
                saved = None
            if saved is not None and saved != expected:
                # Readable but different: another model or optimizer wrote it. Not damage, so
                # nothing is moved; resuming would silently discard the run.
                raise ConfigError(
                    f"checkpoint step {step} in {self.directory} holds a training state of a "
                    f"different shape ({sum(saved.values())} arrays; this configuration has "
                    f"{sum(expected.values())}): another model, optimizer or objective wrote it. "
                    f"Use a new output_dir for this configuration."
                )
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        meta=ocp.args.JsonRestore(),
                    ),
                )
                meta = dict(restored["meta"])
                if int(meta.get("step", -1)) != step:
                    raise ValueError(f"its metadata names step {meta.get('step')!r}")
            except Exception as e:  # noqa: BLE001 - orbax raises many types for damaged files
                reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
                log.warning(
                    "checkpoint step %d in %s is unreadable (%s); skipping it for the previous "
                    "good checkpoint and moving it to %s",
                    step,
                    self.directory / str(step),
                    reason,
                    self.bad_directory,
                )
                self._quarantine(step)
                continue
            log.info("resuming from checkpoint step %d in %s", step, self.directory)
            return restored["state"], meta
        return None

    def _quarantine(self, step: int) -> None:
        if jax.process_index() == 0:
            source = self.directory / str(step)
            if source.exists():
                self.bad_directory.mkdir(parents=True, exist_ok=True)
                shutil.move(str(source), self.bad_directory / f"{step}-{int(time.time())}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"free_jax_quarantine_{step}")
        self.manager.reload()

    def best_step(self) -> int | None:
        """The step with the best `best_metric` among the kept checkpoints, if any has one."""
        name = self.config.best_metric
        if name is None:
            return None
        scored = []
        for step in self.manager.all_steps():
            metrics = self.manager.metrics(step)
            if metrics and name in metrics:
                scored.append((float(metrics[name]), step))
        if not scored:
            return None
        pick = min if self.config.best_mode == "min" else max
        return pick(scored)[1]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
