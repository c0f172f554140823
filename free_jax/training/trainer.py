"""The trainer: optimiser, jitted train and eval steps over a device mesh, the training loop.

    result = train(config)                                  # sources from config.data
    result = train(config, train_source=..., eval_source=..., metric_fn=rouge)

One step consumes one global batch (`free_jax.training` describes the contract); with gradient
accumulation the batch is split into micro-batches whose gradients are summed, each weighted by
its share of the batch's target tokens, so the update equals the one of the whole batch (except
for KD-dyna's mapping, chosen per micro-batch). Parameters are float32 masters; `compute_dtype`
bfloat16 casts them for the forward and backward passes only.

The loop logs JSON lines (`<output_dir>/metrics.jsonl`, and TensorBoard when `tensorboardX` or
`tensorboard` is installed), evaluates periodically, checkpoints (`free_jax.training.
checkpoints`), stops with `TrainingDivergedError` at the first non-finite loss or gradient
(keeping the last good checkpoint), and at the end exports a `free_jax.save` checkpoint with
FREE metadata and a Hugging Face directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from free_jax.errors import ConfigError, InputError
from free_jax.models import exit_classifier
from free_jax.models.config import T5Config
from free_jax.models.model import Model
from free_jax.training import checkpoints, inputs, losses, sharding
from free_jax.training.config import OptimConfig, TrainConfig

log = logging.getLogger("free_jax.training")

Params = dict[str, Any]
Batch = dict[str, Any]
MetricFn = Callable[[Sequence[str], Sequence[str]], dict[str, float]]


class TrainingDivergedError(RuntimeError):
    """The loss or the gradient norm became NaN or infinite; the run stopped."""


@flax.struct.dataclass
class TrainState:
    """Everything a step changes; checkpointed whole for an exact resume.

    Attributes:
      step: int32[], optimizer steps taken (also the position in the batch stream).
      params: float32 parameters (an `exit_classifier` entry for the "meta" objective).
      opt_state: the optimizer state.
      rng: uint32[2], the training RNG, split once per step (for stochastic regularisers).
    """

    step: jax.Array
    params: Params
    opt_state: Any
    rng: jax.Array


@dataclasses.dataclass
class TrainResult:
    """What `train` returns.

    Attributes:
      params: final parameters as NumPy arrays (on every process).
      model: the final `Model` (config, those parameters, the tokenizer if any).
      step: the last step.
      history: every logged record (dicts with "step", "split" and the metrics).
      best_step: the kept checkpoint with the best `checkpoint.best_metric`, if any.
      output_dir: the run directory; `final/` and `hf/` hold the exports when written.
    """

    params: Params
    model: Model
    step: int
    history: list[dict[str, Any]]
    best_step: int | None
    output_dir: Path


# ---------------------------------------------------------------------------- optimiser


def make_schedule(optim: OptimConfig, total_steps: int) -> optax.Schedule:
    """The learning rate as a function of the step."""
    peak, warmup = optim.learning_rate, optim.warmup_steps
    if optim.schedule == "constant":
        return optax.constant_schedule(peak)
    if optim.schedule == "warmup":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup]
        )
    end = peak * optim.final_lr_fraction
    decay_steps = max(total_steps - warmup, 1)
    if optim.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=optim.final_lr_fraction)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def trainable_labels(params: Params, objective_kind: str) -> Params:
    """ "train" or "frozen" per top-level entry: the meta objective trains the classifier only."""

    def label(key: str) -> str:
        is_head = key == exit_classifier.KEY
        return "train" if is_head == (objective_kind == "meta") else "frozen"

    return {k: jax.tree.map(lambda _, k=k: label(k), v) for k, v in params.items()}


def make_optimizer(optim: OptimConfig, total_steps: int, labels: Params):
    """`(optax transformation, schedule)`: clipping + Adafactor/AdamW on the trainable entries."""
    schedule = make_schedule(optim, total_steps)
    if optim.optimizer == "adafactor":
        # Hugging Face's Adafactor(scale_parameter=False, relative_step=False, warmup_init=False)
        # as the reference recipe uses it: no parameter-scale multiplier, update clipping at 1.
        inner = optax.adafactor(
            learning_rate=schedule, multiply_by_parameter_scale=False, clipping_threshold=1.0
        )
    else:
        inner = optax.adamw(
            schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay
        )
    if optim.clip_norm > 0:
        inner = optax.chain(optax.clip_by_global_norm(optim.clip_norm), inner)
    tx = optax.multi_transform({"train": inner, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule


# ---------------------------------------------------------------------------- objective


def make_objective(config: TrainConfig, model_config: T5Config):
    """`objective(params, batch) -> (loss, aux)` for the configured loss."""
    obj = config.objective
    dtype = jnp.bfloat16 if config.compute_dtype == "bfloat16" else None
    if obj.kind == "free":
        kd = None if obj.kd == "none" else obj.kd

        def objective(params, batch):
            return losses.free_objective(
                params,
                model_config,
                batch,
                exit_layer=obj.exit_layer,
                kd=kd,
                alpha=obj.alpha,
                compute_dtype=dtype,
            )

    elif obj.kind == "calm":

        def objective(params, batch):
            return losses.calm_objective(params, model_config, batch, compute_dtype=dtype)

    else:

        def objective(params, batch):
            return losses.meta_objective(
                params,
                model_config,
                batch,
                exit_layer=obj.exit_layer,
                balance=obj.meta_balance,
                compute_dtype=dtype,
            )

    return objective


def _split_micro(batch: Batch, accum: int) -> Batch:
    """[B, ...] -> [A, B/A, ...], micro-batch k = rows k, k + A, k + 2A, ...

    Interleaved rather than contiguous: every device's block of rows then holds an equal share
    of every micro-batch, so no micro-batch is left to a few devices.
    """

    def split(x):
        return jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def _is_scalar_metric(key: str) -> bool:
    return key != "kd_mapping"


def make_train_step(objective, tx, schedule, accum: int):
    """`train_step(state, batch) -> (state, metrics)`, to be jitted."""

    def grads_of(params, batch):
        (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(params, batch)
        return grads, aux

    def train_step(state: TrainState, batch: Batch):
        if accum == 1:
            grads, aux = grads_of(state.params, batch)
        else:
            micro = _split_micro(batch, accum)
            tokens = jnp.sum(micro["loss_mask"].astype(jnp.float32), axis=(1, 2))  # [A]
            total = jnp.sum(tokens)
            weights = jnp.where(total > 0, tokens / jnp.maximum(total, 1.0), 1.0 / accum)

            def weighted(grads, aux, w):
                grads = jax.tree.map(lambda g: w * g, grads)
                return grads, {k: w * v if _is_scalar_metric(k) else v for k, v in aux.items()}

            def body(carry, xs):
                grads_acc, aux_acc = carry
                grads, aux = weighted(*grads_of(state.params, xs[0]), xs[1])
                grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
                aux_acc = {k: aux_acc[k] + v if _is_scalar_metric(k) else v for k, v in aux.items()}
                return (grads_acc, aux_acc), None

            first = jax.tree.map(lambda x: x[0], micro)
            init = weighted(*grads_of(state.params, first), weights[0])
            rest = jax.tree.map(lambda x: x[1:], (micro, weights))
            (grads, aux), _ = jax.lax.scan(body, init, rest)
            aux["tokens"] = total
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        rng, _ = jax.random.split(state.rng)
        metrics = {**aux, "grad_norm": grad_norm, "learning_rate": schedule(state.step)}
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
        return new_state, metrics

    return train_step


# ---------------------------------------------------------------------------- metrics writer


class MetricsWriter:
    """JSON lines in `<dir>/metrics.jsonl`, plus TensorBoard events when a writer is installed.

    Only process 0 writes. A resumed run appends, so steps after its last checkpoint appear
    twice (the second record is the one the final model saw).
    """

    def __init__(self, directory: Path, enabled: bool):
        self.enabled = enabled
        self.file = None
        self.tb = None
        if not enabled:
            return
        directory.mkdir(parents=True, exist_ok=True)
        self.file = open(directory / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        self.tb = _tensorboard_writer(directory / "tensorboard")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record, sort_keys=True) + "\n")
        self.file.flush()
        if self.tb is not None:
            prefix = record["split"]
            for key, value in record.items():
                if isinstance(value, int | float) and key != "step":
                    self.tb.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _tensorboard_writer(directory: Path):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
    return SummaryWriter(str(directory))


# ---------------------------------------------------------------------------- the trainer


def _fetch(tree: Any) -> Any:
    """Host copies of replicated outputs (works for multi-process arrays too)."""

    def leaf(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            x = x.addressable_shards[0].data
        return np.asarray(x)

    return jax.tree.map(leaf, tree)


class Trainer:
    """One training run: the mesh, the model, the jitted steps, checkpoints and the loop."""

    def __init__(self, config: TrainConfig, *, model: Model | None = None):
        self.config = config
        sharding.maybe_initialize_distributed(config.distributed)
        self.primary = jax.process_index() == 0
        self.mesh = sharding.make_mesh(config.mesh)
        sharding.check_batch_divides(config.data.batch_size, self.mesh)
        if config.data.num_eval_batches:
            sharding.check_batch_divides(
                config.data.eval_batch_size, self.mesh, "data.eval_batch_size"
            )
        self.model = model if model is not None else self._build_model()
        self.model_config = self.model.config
        self._check_objective_fits()
        self.output_dir = Path(config.output_dir).absolute()
        self.objective = make_objective(config, self.model_config)
        self._params0 = self._initial_params()
        self.labels = trainable_labels(self._params0, config.objective.kind)
        self.tx, self.schedule = make_optimizer(config.optim, config.steps, self.labels)
        self.state_shardings = self._state_shardings()
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        replicated = sharding.replicated(self.mesh)
        self._train_step = jax.jit(
            make_train_step(self.objective, self.tx, self.schedule, config.optim.grad_accum_steps),
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, replicated),
            donate_argnums=(0,),
        )
        self._eval_step = jax.jit(
            lambda params, batch: self.objective(params, batch)[1],
            in_shardings=(self.state_shardings.params, self.batch_sharding),
            out_shardings=replicated,
        )

    # ------------------------------------------------------------------ set-up

    def _build_model(self) -> Model:
        spec = self.config.model
        if spec.name is not None:
            from free_jax.checkpoints import load

            model = load(spec.name)
            if model.dtype != jnp.float32:
                model = model.astype(jnp.float32)  # float32 master weights
            return model
        tokenizer = None
        if spec.tokenizer is not None:
            if not Path(spec.tokenizer).is_dir():
                raise ConfigError(
                    f"model.tokenizer={spec.tokenizer!r} is not a directory; give a saved "
                    "tokenizer's directory (e.g. free_jax/assets/demo/tokenizer)."
                )
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer)
        return Model.random(spec.arch, spec.init_seed, tokenizer=tokenizer)

    def _check_objective_fits(self) -> None:
        obj, L = self.config.objective, self.model_config.num_decoder_layers
        if obj.kind != "calm" and not 1 <= obj.exit_layer < L:
            raise ConfigError(
                f"objective.exit_layer={obj.exit_layer} must be in [1, {L - 1}] for this model's "
                f"{L} decoder blocks."
            )

    def _initial_params(self) -> Params:
        """The model's parameters, plus a fresh exit classifier for the meta objective."""
        params = dict(self.model.params)
        if self.config.objective.kind == "meta" and exit_classifier.KEY not in params:
            key = jax.random.key(self.config.model.init_seed + 1)
            params[exit_classifier.KEY] = exit_classifier.init_exit_classifier(
                self.model_config, key
            )
        return params

    def _abstract_state(self) -> TrainState:
        params = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype),
            self._params0,
        )
        return jax.eval_shape(
            lambda p: TrainState(
                step=jnp.zeros((), jnp.int32),
                params=p,
                opt_state=self.tx.init(p),
                rng=jax.random.PRNGKey(0),
            ),
            params,
        )

    def _state_shardings(self) -> TrainState:
        abstract = self._abstract_state()
        shardings = sharding.tree_shardings(abstract, self.mesh, self.config.mesh.min_shard_size)
        replicated = sharding.replicated(self.mesh)
        return shardings.replace(step=replicated, rng=replicated)

    def init_state(self) -> TrainState:
        """A fresh state on the mesh: the model's parameters, a new optimizer state, the RNG."""
        params = sharding.put_global(self._params0, self.state_shardings.params)
        opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings.opt_state)(params)
        rng = jax.random.PRNGKey(self.config.seed)
        step = jnp.zeros((), jnp.int32)
        host = {"step": np.asarray(step), "rng": np.asarray(rng)}
        placed = sharding.put_global(
            host, {"step": self.state_shardings.step, "rng": self.state_shardings.rng}
        )
        return TrainState(
            step=placed["step"], params=params, opt_state=opt_state, rng=placed["rng"]
        )

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of the state: the restore target."""
        return jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            self._abstract_state(),
            self.state_shardings,
        )

    # ------------------------------------------------------------------ steps

    def _device_batch(self, batch: Batch, batch_size: int) -> Batch:
        data = self.config.data
        checked = inputs.check_batch(
            batch, batch_size, data.source_length, data.target_length, data.length_buckets
        )
        rows = sharding.process_rows(batch_size)
        local = {k: v[rows] for k, v in checked.items()}
        return sharding.global_batch(local, self.batch_sharding, batch_size)

    def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Any]]:
        """One optimizer step on a global host batch; returns host metrics."""
        device_batch = self._device_batch(batch, self.config.data.batch_size)
        state, metrics = self._train_step(state, device_batch)
        return state, _fetch(metrics)

    def evaluate(self, params: Params, eval_source: inputs.BatchSource) -> dict[str, float]:
        """Token-weighted means of the objective's metrics over the evaluation batches."""
        data = self.config.data
        sums: dict[str, float] = {}
        total = 0.0
        for batch in _take(eval_source(0), data.num_eval_batches):
            aux = _fetch(self._eval_step(params, self._device_batch(batch, data.eval_batch_size)))
            tokens = float(aux["tokens"])
            total += tokens
            for key, value in aux.items():
                if _is_scalar_metric(key) and key != "tokens":
                    sums[key] = sums.get(key, 0.0) + float(value) * tokens
        return {f"eval/{k}": v / max(total, 1.0) for k, v in sums.items()}

    def decode_metrics(
        self, params: Params, eval_source: inputs.BatchSource, metric_fn: MetricFn
    ) -> dict[str, float]:
        """Greedy-decodes evaluation sources and scores them with `metric_fn(preds, refs)`.

        In one process the decoding runs on the training mesh's devices (`decode(mesh=...)`,
        `sharding.decode_mesh`): the parameters are re-laid-out once per call, rows split over
        every device, not gathered to the host. Across processes (each feeding its own rows)
        the parameters are gathered and every process decodes its rows on its own.
        """
        from free_jax.decoding import decode

        mesh = None
        if jax.process_count() == 1:
            mesh = sharding.decode_mesh(self.mesh, self.model_config)
            model = dataclasses.replace(self.model, params=params).shard(mesh)
        else:
            model = dataclasses.replace(self.model, params=sharding.to_host(params))
        predictions, references = [], []
        data = self.config.data
        for batch in _take(eval_source(0), self.config.eval.max_decode_batches):
            out = decode(
                model,
                np.asarray(batch["input_ids"]),
                attention_mask=np.asarray(batch["attention_mask"]),
                max_new_tokens=data.target_length,
                mesh=mesh,
            )
            for i in range(out.tokens.shape[0]):
                predictions.append(
                    out.texts[i]
                    if out.texts is not None
                    else _detokenize(out.tokens[i, : out.lengths[i]], model, self.model_config)
                )
                mask = np.asarray(batch["loss_mask"][i]) > 0
                label = np.asarray(batch["labels"][i])[mask]
                references.append(_detokenize(label, model, self.model_config))
        return {f"eval/{k}": float(v) for k, v in metric_fn(predictions, references).items()}

    # ------------------------------------------------------------------ the loop

    def fit(
        self,
        train_source: inputs.BatchSource | Iterable[Batch] | None = None,
        eval_source: inputs.BatchSource | Iterable[Batch] | None = None,
        metric_fn: MetricFn | None = None,
    ) -> TrainResult:
        """Trains to `config.steps`, resuming from the latest good checkpoint if there is one."""
        config = self.config
        ckpt = checkpoints.TrainCheckpoints(self.output_dir, config.checkpoint)
        writer = MetricsWriter(self.output_dir, enabled=self.primary)
        history: list[dict[str, Any]] = []
        try:
            state, start = self._restore_or_init(ckpt)
            if train_source is None:
                train_source = inputs.source_for(
                    config.data,
                    split=config.data.train_split,
                    seed=config.seed,
                    batch_size=config.data.batch_size,
                    tokenizer=self.model.tokenizer,
                )
            if eval_source is None and config.data.num_eval_batches:
                eval_source = inputs.source_for(
                    config.data,
                    split=config.data.eval_split,
                    seed=config.seed,
                    batch_size=config.data.eval_batch_size,
                    tokenizer=self.model.tokenizer,
                )
            train_source = inputs.as_source(train_source)
            eval_source = None if eval_source is None else inputs.as_source(eval_source)
            state = self._loop(
                state, start, train_source, eval_source, metric_fn, ckpt, writer, history
            )
            ckpt.wait()
            params = sharding.to_host(state.params)
            final_model = dataclasses.replace(self.model, params=params)
            self._export(final_model)
            return TrainResult(
                params=params,
                model=final_model,
                step=int(_fetch(state.step)),
                history=history,
                best_step=ckpt.best_step(),
                output_dir=self.output_dir,
            )
        finally:
            ckpt.close()
            writer.close()

    def _restore_or_init(self, ckpt: checkpoints.TrainCheckpoints) -> tuple[TrainState, int]:
        if self.config.checkpoint.resume:
            restored = ckpt.restore_latest(self.abstract_state())
            if restored is not None:
                state, meta = restored
                return state, int(meta["data_position"])
        elif ckpt.steps():
            raise ConfigError(
                f"{ckpt.directory} already holds checkpoints {ckpt.steps()} and "
                f"checkpoint.resume is false; choose a new output_dir or resume."
            )
        return self.init_state(), 0

    def _loop(self, state, start, train_source, eval_source, metric_fn, ckpt, writer, history):
        config = self.config
        steps = config.steps
        if start >= steps:
            log.info("checkpoint step %d already reaches steps=%d; nothing to train", start, steps)
            return state
        progress = _progress(start, steps, enabled=config.progress and self.primary)
        window: list[dict[str, Any]] = []
        batches = iter(train_source(start))
        last_log_time, last_log_step = time.perf_counter(), start
        data_tokens = 0.0
        last_good = ckpt.steps()[-1] if ckpt.steps() else None
        try:
            for step in range(start, steps):
                try:
                    batch = next(batches)
                except StopIteration:
                    raise InputError(
                        f"the training batch source ended after {step - start} batches (from "
                        f"step {start}); it must yield at least steps - start = {steps - start}."
                    ) from None
                state, metrics = self.train_step(state, batch)
                done = step + 1
                loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    where = (
                        f"the last good checkpoint, step {last_good}, is kept in {ckpt.directory}"
                        if last_good is not None
                        else "no checkpoint had been saved yet"
                    )
                    raise TrainingDivergedError(
                        f"training diverged at step {done}: loss={loss}, grad_norm={grad_norm}. "
                        f"Stopping; {where}. Lower optim.learning_rate, check the data at this "
                        f"step, or use compute_dtype=float32."
                    )
                data_tokens += float(np.sum(batch["attention_mask"])) + float(metrics["tokens"])
                window.append(metrics)
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.4f}", refresh=False)
                if done % config.log_every == 0 or done == steps:
                    now = time.perf_counter()
                    record = _mean_record(window)
                    record.update(
                        step=done,
                        split="train",
                        kd_mapping=np.asarray(metrics.get("kd_mapping", [])).tolist(),
                        tokens_per_s=data_tokens / max(now - last_log_time, 1e-9),
                        steps_per_s=(done - last_log_step) / max(now - last_log_time, 1e-9),
                    )
                    history.append(record)
                    writer.write(record)
                    window, data_tokens = [], 0.0
                    last_log_time, last_log_step = now, done
                eval_metrics = None
                every = config.eval.every
                if eval_source is not None and ((every and done % every == 0) or done == steps):
                    eval_metrics = self.evaluate(state.params, eval_source)
                    if metric_fn is not None and config.eval.decode:
                        eval_metrics.update(
                            self.decode_metrics(state.params, eval_source, metric_fn)
                        )
                    record = {"step": done, "split": "eval", **eval_metrics}
                    history.append(record)
                    writer.write(record)
                    last_log_time = time.perf_counter()  # evaluation time is not training time
                every = config.checkpoint.every
                if (every and done % every == 0) or eval_metrics is not None or done == steps:
                    meta = {
                        "step": done,
                        "data_position": done,
                        "config": _jsonable(config.to_dict()),
                        "metrics": eval_metrics or {},
                    }
                    best = config.checkpoint.best_metric
                    ranked = eval_metrics if eval_metrics and best in eval_metrics else None
                    ckpt.save(done, state, meta, metrics=ranked)
                    last_good = done
        finally:
            progress.close()
        return state

    # ------------------------------------------------------------------ export

    def _export(self, model: Model) -> None:
        from free_jax.checkpoints import export_hf, save

        if not self.primary:
            return
        export = self.config.export
        obj = self.config.objective
        # "free" holds the settings `free_jax.decode` takes as its defaults for this model.
        metadata = {
            "free": {
                "exit_layer": obj.exit_layer,
                "confidence": "meta" if obj.kind == "meta" else export.confidence,
                "threshold": export.threshold,
                "buffer_capacity": export.buffer_capacity,
            },
            "training": {"objective": obj.kind, "kd": obj.kd, "steps": self.config.steps},
        }
        model = dataclasses.replace(model, metadata=metadata)
        if export.free_jax:
            final = self.output_dir / "final"
            if final.exists():
                import shutil

                shutil.rmtree(final)  # a re-run of a finished run rewrites its export
            save(model, final, metadata=metadata)
        if export.hf:
            export_hf(model, self.output_dir / "hf")
        log.info("exported the final model to %s", self.output_dir)


def _progress(start: int, total: int, *, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, desc="train", unit="step")


def _take(iterator, n: int):
    for i, item in enumerate(iterator):
        if i >= n:
            return
        yield item


def _mean_record(window: list[dict[str, Any]]) -> dict[str, Any]:
    record = {}
    for key in window[0]:
        if _is_scalar_metric(key):
            record[key] = float(np.mean([float(m[key]) for m in window]))
    return record


def _ids_text(ids: np.ndarray, config: T5Config) -> str:
    return " ".join(str(int(i)) for i in ids if int(i) not in (config.pad_token_id,))


def _detokenize(ids: np.ndarray, model: Model, config: T5Config) -> str:
    if model.tokenizer is not None:
        return model.tokenizer.decode(ids.tolist(), skip_special_tokens=True)
    ids = ids[ids != config.eos_token_id]
    return _ids_text(ids, config)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def train(
    config: TrainConfig,
    *,
    train_source: inputs.BatchSource | Iterable[Batch] | None = None,
    eval_source: inputs.BatchSource | Iterable[Batch] | None = None,
    metric_fn: MetricFn | None = None,
    model: Model | None = None,
) -> TrainResult:
    """Runs (or resumes) the training `config` describes.

    Args:
      config: the run.
      train_source, eval_source: batch sources (`free_jax.training.inputs`); default: built
        from `config.data`.
      metric_fn: the task metric, `metric_fn(predictions, references) -> {name: value}` over
        decoded texts, used when `config.eval.decode` is set.
      model: start from this model instead of `config.model`.
    """
    return Trainer(config, model=model).fit(train_source, eval_source, metric_fn)


__all__ = [
    "TrainResult",
    "TrainState",
    "Trainer",
    "TrainingDivergedError",
    "make_optimizer",
    "make_schedule",
    "train",
]
