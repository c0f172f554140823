"""Training configuration: one frozen dataclass per concern, presets as code, dotted overrides.

`TrainConfig` gathers the sections (`ModelSpec`, `DataConfig`, `ObjectiveConfig`, `OptimConfig`,
`MeshConfig`, `CheckpointConfig`, `DistributedConfig`); each validates itself in `__post_init__`
and names the offending value and what would be valid. Presets live in `configs/NAME.py` as a
`get_config() -> TrainConfig` function; `load_config(path, overrides)` reads one and applies
command-line overrides such as `optim.learning_rate=3e-4` or `steps=200`.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from free_jax.errors import ConfigError
from free_jax.models.config import T5Config

OBJECTIVES = ("free", "calm", "meta")
KD_MODES = ("dyna", "last", "unif", "none")
OPTIMIZERS = ("adafactor", "adamw")
SCHEDULES = ("constant", "warmup", "linear", "cosine")
COMPUTE_DTYPES = ("float32", "bfloat16")
BEST_MODES = ("min", "max")


def supported_model_types() -> tuple[str, ...]:
    """The model families this build can load and train: those `T5Config` accepts.

    LongT5 ("longt5") joins when free_jax's model supports it; its presets fail until then.
    """
    from free_jax.models import config as model_config

    return tuple(model_config._MODEL_TYPES)


def _positive_int(owner: str, name: str, value: Any, *, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{owner}.{name} must be an integer >= {minimum}, got {value!r}.")


def _choice(owner: str, name: str, value: Any, valid: Sequence[Any]) -> None:
    if value not in valid:
        raise ConfigError(f"{owner}.{name}={value!r} is not known; valid: {tuple(valid)}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Which model to train.

    Attributes:
      name: a checkpoint directory or Hugging Face hub name for `free_jax.load`; None builds a
        random model from `arch` (toy runs, tests, benchmarks).
      model_type: the family ("t5", "mt5", "longt5").
      arch: the architecture of a random model (required when `name` is None).
      init_seed: seed of the random model and of a fresh exit classifier.
      tokenizer: a tokenizer directory for a random model that trains on text (the demo's is
        `free_jax/assets/demo/tokenizer`); a checkpoint brings its own.
    """

    name: str | None = None
    model_type: str = "t5"
    arch: T5Config | None = None
    init_seed: int = 0
    tokenizer: str | None = None

    def __post_init__(self):
        if self.name is None and self.arch is None:
            raise ConfigError(
                "ModelSpec needs either name (a checkpoint directory or hub name) or arch (a "
                "T5Config for a randomly initialised model)."
            )
        if self.arch is not None and self.arch.model_type != self.model_type:
            raise ConfigError(
                f"ModelSpec.model_type={self.model_type!r} but arch.model_type="
                f"{self.arch.model_type!r}; they must agree."
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """The task and the static batch shapes (every batch has exactly these shapes).

    Attributes:
      task: a toy task ("copy", "reverse", "sort": `free_jax.testing.toy_batch`, no files
        needed) or a task of the input pipeline `free_jax.data` (e.g. "samsum", "cnn_dailymail",
        "squad", "iwslt2017", "multi_news", "big_patent").
      dataset: hub name or local path of the data (pipeline tasks), None for the task's default.
      prefix: text prepended to every source (e.g. "summarize: ").
      source_length: S, tokens per source (padded/truncated).
      target_length: T, tokens per target (padded/truncated).
      batch_size: B, global examples per training step (all processes together).
      eval_batch_size: examples per evaluation batch.
      num_eval_batches: evaluation batches per evaluation.
      num_symbols: toy tasks: distinct symbols.
      min_length: toy tasks: shortest row.
      train_split, eval_split: pipeline tasks: dataset splits.
      length_buckets: pipeline tasks: smaller padded lengths a batch may take, for sources and
        targets alike (`free_jax.data.TrainBatches`' buckets); () pads every batch to
        source_length / target_length. Each (S, T) pair used compiles once.
      group_by_length: pipeline tasks: 0, or batches per length-sorted window
        (`TrainBatches(group_by_length=...)`), so batches fit small buckets.
    """

    task: str = "copy"
    dataset: str | None = None
    prefix: str = ""
    source_length: int = 16
    target_length: int = 16
    batch_size: int = 32
    eval_batch_size: int = 32
    num_eval_batches: int = 2
    num_symbols: int = 16
    min_length: int = 2
    train_split: str = "train"
    eval_split: str = "validation"
    length_buckets: tuple[int, ...] = ()
    group_by_length: int = 0

    def __post_init__(self):
        for name in (
            "source_length",
            "target_length",
            "batch_size",
            "eval_batch_size",
            "num_symbols",
            "min_length",
        ):
            _positive_int("DataConfig", name, getattr(self, name))
        _positive_int("DataConfig", "num_eval_batches", self.num_eval_batches, minimum=0)
        if not isinstance(self.task, str) or not self.task:
            raise ConfigError(f"DataConfig.task must be a non-empty string, got {self.task!r}.")
        if not (
            self.group_by_length == 0
            or (isinstance(self.group_by_length, int) and self.group_by_length >= 2)
        ):
            raise ConfigError(
                f"DataConfig.group_by_length={self.group_by_length!r}; must be 0 (off) or an "
                "int >= 2 (batches per length-sorted window)."
            )
        longest = min(self.source_length, self.target_length)
        bad = [b for b in self.length_buckets if not isinstance(b, int) or not 1 <= b <= longest]
        if bad:
            raise ConfigError(
                f"DataConfig.length_buckets={self.length_buckets!r}: {bad} not in [1, {longest}] "
                "(min of source_length and target_length)."
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ObjectiveConfig:
    """What to optimise (see `free_jax.training.losses`).

    Attributes:
      kind: "free" (shallow-deep CE + alpha * KD), "calm" (weighted CE over all exits) or "meta"
        (the exit classifier, backbone frozen).
      exit_layer: L_s, the shallow exit ("free", "meta").
      kd: "dyna" (the paper's), "last", "unif" or "none".
      alpha: weight of the KD term.
      meta_balance: the exit-classifier loss's class balancing (`losses.BALANCE_MODES`).
    """

    kind: str = "free"
    exit_layer: int = 2
    kd: str = "dyna"
    alpha: float = 0.5
    meta_balance: str = "logit_adjust"

    def __post_init__(self):
        from free_jax.training.losses import BALANCE_MODES

        _choice("ObjectiveConfig", "kind", self.kind, OBJECTIVES)
        _choice("ObjectiveConfig", "kd", self.kd, KD_MODES)
        _choice("ObjectiveConfig", "meta_balance", self.meta_balance, BALANCE_MODES)
        _positive_int("ObjectiveConfig", "exit_layer", self.exit_layer)
        if (
            not isinstance(self.alpha, int | float)
            or isinstance(self.alpha, bool)
            or self.alpha < 0
        ):
            raise ConfigError(f"ObjectiveConfig.alpha must be a number >= 0, got {self.alpha!r}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """Optimiser and learning-rate schedule.

    Attributes:
      optimizer: "adafactor" (the paper's; as Hugging Face's `Adafactor(scale_parameter=False,
        relative_step=False)`) or "adamw".
      learning_rate: peak learning rate (paper: 1e-4).
      schedule: "constant"; "warmup" (linear warmup, then constant); "linear" or "cosine"
        (linear warmup, then decay to `final_lr_fraction * learning_rate` at the last step).
      warmup_steps: steps of linear warmup from 0 ("warmup", "linear", "cosine").
      final_lr_fraction: end of the decay, as a fraction of the peak.
      clip_norm: clip gradients to this global norm; 0 disables clipping.
      weight_decay: AdamW's decoupled weight decay.
      b1, b2, eps: AdamW's moments and epsilon.
      grad_accum_steps: split each batch into this many micro-batches, summed into one update
        (the batch size must divide evenly).
    """

    optimizer: str = "adafactor"
    learning_rate: float = 1e-4
    schedule: str = "constant"
    warmup_steps: int = 0
    final_lr_fraction: float = 0.0
    clip_norm: float = 1.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_accum_steps: int = 1

    def __post_init__(self):
        _choice("OptimConfig", "optimizer", self.optimizer, OPTIMIZERS)
        _choice("OptimConfig", "schedule", self.schedule, SCHEDULES)
        _positive_int("OptimConfig", "warmup_steps", self.warmup_steps, minimum=0)
        _positive_int("OptimConfig", "grad_accum_steps", self.grad_accum_steps)
        if not self.learning_rate > 0:
            raise ConfigError(f"OptimConfig.learning_rate must be > 0, got {self.learning_rate!r}.")
        if self.schedule == "warmup" and self.warmup_steps == 0:
            raise ConfigError("OptimConfig.schedule='warmup' needs warmup_steps >= 1.")
        if self.schedule == "constant" and self.warmup_steps:
            raise ConfigError(
                f"OptimConfig.schedule='constant' has no warmup, but warmup_steps="
                f"{self.warmup_steps}; use schedule='warmup' for a warmup then a constant rate."
            )
        if not 0.0 <= self.final_lr_fraction <= 1.0:
            raise ConfigError(
                f"OptimConfig.final_lr_fraction must be in [0, 1], got {self.final_lr_fraction!r}."
            )
        for name in ("clip_norm", "weight_decay", "eps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"OptimConfig.{name} must be >= 0, got {getattr(self, name)!r}.")
        for name in ("b1", "b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(
                    f"OptimConfig.{name} must be in [0, 1), got {getattr(self, name)}."
                )


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """The device mesh: axes `data` (pure data parallelism) and `fsdp` (parameters sharded).

    Batches are split over both axes; parameters and optimizer state are sharded over `fsdp`
    and replicated over `data`. One of the two sizes may be -1: all remaining devices.

    Attributes:
      data, fsdp: axis sizes; their product must be the number of devices.
      min_shard_size: arrays with fewer elements than this are replicated (sharding tiny
        vectors costs more in communication than it saves in memory).
    """

    data: int = -1
    fsdp: int = 1
    min_shard_size: int = 2**16

    def __post_init__(self):
        for name in ("data", "fsdp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
                raise ConfigError(
                    f"MeshConfig.{name} must be -1 or an integer >= 1, got {value!r}."
                )
        if self.data == -1 and self.fsdp == -1:
            raise ConfigError("MeshConfig: at most one of data and fsdp may be -1.")
        _positive_int("MeshConfig", "min_shard_size", self.min_shard_size)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Orbax checkpoints of the whole training state, under `TrainConfig.output_dir`.

    Attributes:
      every: save every this many steps (0: only at the end and after evaluations).
      keep: keep the latest this many (besides the best one).
      best_metric: evaluation metric that ranks checkpoints ("eval/loss", "eval/rougeL", ...);
        the best checkpoint is kept whatever its age. None disables.
      best_mode: "min" or "max" for `best_metric`.
      resume: resume from the latest good checkpoint in the directory, if any.
      async_save: write checkpoints in the background while training continues.
    """

    every: int = 100
    keep: int = 3
    best_metric: str | None = "eval/loss"
    best_mode: str = "min"
    resume: bool = True
    async_save: bool = True

    def __post_init__(self):
        _positive_int("CheckpointConfig", "every", self.every, minimum=0)
        _positive_int("CheckpointConfig", "keep", self.keep)
        _choice("CheckpointConfig", "best_mode", self.best_mode, BEST_MODES)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistributedConfig:
    """Multi-host start-up (`jax.distributed.initialize`), opt-in.

    Enabled by `enabled=True`, a `coordinator_address`, or the environment variable
    `FREE_JAX_DISTRIBUTED=1` (the other fields may also come from `JAX_COORDINATOR_ADDRESS`,
    `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`, or be detected by JAX on TPU pods and SLURM).
    """

    enabled: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Periodic evaluation.

    Attributes:
      every: evaluate every this many steps (0: only at the end).
      decode: also greedy-decode the evaluation sources and score them with the task metric
        (when a metric function is given to `train`).
      max_decode_batches: evaluation batches to decode (decoding is much slower than the loss).
    """

    every: int = 100
    decode: bool = False
    max_decode_batches: int = 1

    def __post_init__(self):
        _positive_int("EvalConfig", "every", self.every, minimum=0)
        _positive_int("EvalConfig", "max_decode_batches", self.max_decode_batches, minimum=0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """What to write after the last step, under `TrainConfig.output_dir`.

    Attributes:
      free_jax: a `free_jax.save` checkpoint in `final/` with FREE metadata.
      hf: a Hugging Face directory in `hf/` (`free_jax.export_hf`).
      confidence, threshold, buffer_capacity: the FREE decoding settings recorded in the
        metadata (`free_jax.decode`'s defaults for the model); a `buffer_capacity` of None
        means no bound (see `free_jax.decode`).
    """

    free_jax: bool = True
    hf: bool = True
    confidence: str = "softmax_diff"
    threshold: float = 0.9
    buffer_capacity: int | None = None

    def __post_init__(self):
        if self.buffer_capacity is not None:
            _positive_int("ExportConfig", "buffer_capacity", self.buffer_capacity)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything a training run needs.

    Attributes:
      model, data, objective, optim, mesh, checkpoint, eval, export, distributed: the sections.
      steps: optimizer steps in the run (a resumed run continues up to this total).
      seed: seed of the data order and the training RNG.
      compute_dtype: "float32" or "bfloat16" activations (parameters stay float32).
      output_dir: where checkpoints, metrics and exports go.
      log_every: write metrics every this many steps.
      progress: show a tqdm progress bar.
    """

    model: ModelSpec
    data: DataConfig = DataConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    optim: OptimConfig = OptimConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    export: ExportConfig = ExportConfig()
    distributed: DistributedConfig = DistributedConfig()
    steps: int = 1000
    seed: int = 0
    compute_dtype: str = "float32"
    output_dir: str = "runs/default"
    log_every: int = 10
    progress: bool = True

    def __post_init__(self):
        _positive_int("TrainConfig", "steps", self.steps)
        _positive_int("TrainConfig", "log_every", self.log_every)
        _choice("TrainConfig", "compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        supported = supported_model_types()
        if self.model.model_type not in supported:
            raise ConfigError(
                f"model.model_type={self.model.model_type!r} is not supported by this free_jax "
                f"build (it trains {supported}); "
                + (
                    "LongT5 is being added in its own module and its presets will run once it "
                    "lands."
                    if self.model.model_type == "longt5"
                    else "use a T5-family checkpoint."
                )
            )
        accum = self.optim.grad_accum_steps
        if self.data.batch_size % accum:
            raise ConfigError(
                f"data.batch_size={self.data.batch_size} is not divisible by "
                f"optim.grad_accum_steps={accum}."
            )
        arch = self.model.arch
        if arch is not None and self.objective.kind != "calm":
            L = arch.num_decoder_layers
            if not self.objective.exit_layer < L:
                raise ConfigError(
                    f"objective.exit_layer={self.objective.exit_layer} must be below the "
                    f"decoder's {L} blocks (the shallow exit is in [1, {L - 1}])."
                )

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dictionary (nested sections as dictionaries)."""
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------- overrides


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse_value(text: str, annotation: Any, key: str) -> Any:
    """Parses `text` for a field of type `annotation` (int, float, bool, str, Optional[...])."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        candidates = [a for a in args if a is not type(None)]
        errors = []
        for candidate in candidates:
            try:
                return _parse_value(text, candidate, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"override {key}={text!r}: " + " / ".join(errors))
    if annotation is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"override {key}={text!r}: expected true or false.")
    if annotation is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"override {key}={text!r}: expected an integer.") from None
    if annotation is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"override {key}={text!r}: expected a number.") from None
    if annotation is str:
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            return ast.literal_eval(text)
        return text
    raise ConfigError(
        f"override {key}: fields of type {annotation} cannot be set from the command line."
    )


def _override(obj: Any, path: list[str], text: str, key: str) -> Any:
    hints = _field_types(type(obj))
    name = path[0]
    if name not in hints:
        valid = sorted(f.name for f in dataclasses.fields(obj))
        raise ConfigError(
            f"override {key}: {type(obj).__name__} has no field {name!r}; valid: {valid}."
        )
    if len(path) == 1:
        value = _parse_value(text, hints[name], key)
    else:
        current = getattr(obj, name)
        if not dataclasses.is_dataclass(current):
            prefix = key.rsplit(".", len(path) - 1)[0]  # the dotted key up to this field
            what = (
                "None in this config (set that section in the preset)"
                if current is None
                else f"a value of type {type(current).__name__}, not a config section"
            )
            raise ConfigError(f"override {key}: {prefix} is {what}.")
        value = _override(current, path[1:], text, key)
    return dataclasses.replace(obj, **{name: value})


def apply_overrides(config: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """Applies `key=value` overrides with dotted keys, e.g. `optim.learning_rate=3e-4`.

    Values are parsed by the field's type: integers, numbers, `true`/`false`, `none` for optional
    fields, strings as they are. Every changed section is validated again.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. steps=100).")
        key, text = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key.")
        config = _override(config, key.split("."), text.strip(), key)
    return config


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> TrainConfig:
    """Loads a preset (`configs/NAME.py` defining `get_config()`), then applies overrides."""
    path = Path(path)
    if not path.is_file():
        presets = Path(__file__).resolve().parents[2] / "configs"
        hint = ""
        if presets.is_dir():
            names = sorted(p.stem for p in presets.glob("*.py") if not p.stem.startswith("_"))
            hint = f" Presets in {presets}: {names}."
        raise ConfigError(f"config file {str(path)!r} does not exist.{hint}")
    spec = importlib.util.spec_from_file_location(f"free_jax_preset_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    get_config = getattr(module, "get_config", None)
    if get_config is None:
        raise ConfigError(f"{path} defines no get_config() function returning a TrainConfig.")
    config = get_config()
    if not isinstance(config, TrainConfig):
        raise ConfigError(
            f"{path}: get_config() returned {type(config).__name__}, not TrainConfig."
        )
    return apply_overrides(config, overrides)
