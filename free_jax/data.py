"""Input pipeline: tasks, loading, cached tokenisation, static-shape batches, exact resume.

Three steps, each usable on its own:

1. `get_task(name)` names a task of the paper (SAMSum, CNN/DailyMail, SQuAD, Multi-News,
   BIGPATENT, IWSLT2017 De-En) or the embedded demo's (`acl_punct`, `free_jax.demo_data`): where
   its text lives, its prefix, its lengths and its metric.
2. `load_examples(task, tokenizer, split=..., data_files=...)` reads a split from local
   JSON / JSONL / CSV files (or the Hugging Face Hub when a network exists), tokenises it
   (prefix, truncation, EOS) and caches the token ids on disk.
3. `TrainBatches(examples, global_batch_size, seed=...)` turns them into fixed-shape batches in a
   deterministic order: `batch_at(step)` is a pure function of (seed, step), so a resumed run sees
   exactly the batches an uninterrupted one would. `eval_batches(examples, batch_size)` walks a
   split in order and keeps the reference strings.

The batch contract (a dict of NumPy arrays; shapes fixed per configuration so jitted steps never
recompile; axis legend in `free_jax.config`):

    input_ids          int32[B, S]    prefix + source tokens + EOS, then pad
    attention_mask     int32[B, S]    1 on real source tokens
    decoder_input_ids  int32[B, T]    decoder start token (the pad id, 0, for T5), then labels
                                      shifted right by one
    labels             int32[B, T]    target tokens + EOS, then pad
    loss_mask          float32[B, T]  1 on real target tokens, EOS included

Padding rows (the last partial batch when `drop_remainder=False`, an eval split's tail) are all
pad with zero masks: they add nothing to a loss normalised by `loss_mask.sum()`.

Static shapes: by default every batch is padded to the task's maximum lengths (one compiled
shape). `source_buckets` / `target_buckets` add a few smaller shapes: each batch takes the
smallest bucket its longest row fits, so short batches cost less compute, at the price of one
compilation per (source, target) bucket pair used. Batches are shuffled, not grouped by length,
so a batch of B random rows usually holds one long row and large buckets dominate; buckets pay
off for small batches (eval at batch size 1) and for datasets with a long-tailed length
distribution.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from free_jax import demo_data, metrics
from free_jax.errors import ConfigError, DataError

# A field of a raw row: a column name, a dotted path into nested fields ("translation.de",
# "answers.text.0"), or a function of the whole row.
FieldSpec = str | Callable[[Mapping[str, Any]], Any]

# Bump when the cached arrays' layout or the tokenisation rule changes.
_CACHE_VERSION = 2  # 2: the demo task's source keeps its case
_LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv"}
_ENCODE_CHUNK = 1000
BATCH_KEYS = ("input_ids", "attention_mask", "decoder_input_ids", "labels", "loss_mask")


# ---------------------------------------------------------------------------- tasks


def squad_source(row: Mapping[str, Any]) -> str:
    """SQuAD's encoder input as the reference scripts build it: `question: Q context: C`."""
    return " ".join(["question:", row["question"].lstrip(), "context:", row["context"].lstrip()])


def squad_first_answer(row: Mapping[str, Any]) -> str:
    """SQuAD's training target: the first gold answer ("" when there is none)."""
    texts = row["answers"]["text"]
    return texts[0] if len(texts) > 0 else ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Task:
    """A sequence-to-sequence task: where its text is and how it becomes model inputs.

    Attributes:
      name: registry key, also used in cache file names.
      source: the encoder text's field (see `FieldSpec`).
      target: the decoder target's field; must resolve to a string.
      references: what evaluation compares against, a string or a list of strings (several gold
        answers); default: `target`.
      prefix: prepended to the source text (`"summarize: "`); empty for SQuAD, whose source
        already carries `question:` and `context:`.
      max_source_length: S, encoder tokens including EOS; longer sources are truncated.
      max_target_length: T, decoder tokens including EOS.
      metric: the headline metric's name in `free_jax.metrics.compute`.
      extra_metrics: more metrics the evaluation reports beside it (each with its family).
      hub_path, hub_config: the Hugging Face Hub dataset (`datasets.load_dataset(hub_path,
        hub_config)`), used when no local files are given; None: local files only.
      drop_empty: drop rows whose source or target is empty or missing (as the reference scripts
        do); otherwise such a row is an error.
      data_dir: a directory of `{split}.jsonl` files shipped with the package, read when no
        `data_files` are given (the demo task's); None: the hub.
    """

    name: str
    source: FieldSpec
    target: FieldSpec
    references: FieldSpec | None = None
    prefix: str = ""
    max_source_length: int = 512
    max_target_length: int = 128
    metric: str = "rougeL"
    extra_metrics: tuple[str, ...] = ()
    hub_path: str | None = None
    hub_config: str | None = None
    drop_empty: bool = True
    data_dir: str | None = None

    def __post_init__(self) -> None:
        for field in ("max_source_length", "max_target_length"):
            value = getattr(self, field)
            # Room for at least one token and EOS.
            if not isinstance(value, int) or isinstance(value, bool) or value < 2:
                raise ConfigError(f"Task {self.name!r}: {field}={value!r}; must be an int >= 2.")
        for field in ("source", "target", "references"):
            value = getattr(self, field)
            if field == "references" and value is None:
                continue
            if not (callable(value) or (isinstance(value, str) and value)):
                raise ConfigError(
                    f"Task {self.name!r}: {field}={value!r}; must be a field name, a dotted path "
                    "such as 'translation.de', or a function of the row."
                )
        for metric in (self.metric, *self.extra_metrics):
            if metric not in metrics.METRICS:
                raise ConfigError(
                    f"Task {self.name!r}: metric={metric!r}; valid: {metrics.METRICS}."
                )

    @property
    def reference_field(self) -> FieldSpec:
        return self.target if self.references is None else self.references


_SUMMARIZE = "summarize: "

# Hub names are those of the paper's reference scripts (or their current parquet mirrors); they
# are untested here, where no network exists.
TASKS: Mapping[str, Task] = {
    t.name: t
    for t in (
        Task(
            name="samsum",
            source="dialogue",
            target="summary",
            prefix=_SUMMARIZE,
            hub_path="knkarthick/samsum",
        ),
        Task(
            name="cnn_dailymail",
            source="article",
            target="highlights",
            prefix=_SUMMARIZE,
            hub_path="abisee/cnn_dailymail",
            hub_config="3.0.0",
        ),
        Task(
            name="squad",
            source=squad_source,
            target=squad_first_answer,
            references="answers.text",
            metric="squad_f1",
            hub_path="rajpurkar/squad",
        ),
        # The LongT5 tasks: 2048 source and 512 target tokens.
        Task(
            name="multi_news",
            source="document",
            target="summary",
            prefix=_SUMMARIZE,
            max_source_length=2048,
            max_target_length=512,
            hub_path="alexfabbri/multi_news",
        ),
        Task(
            name="big_patent",
            source="description",
            target="abstract",
            prefix=_SUMMARIZE,
            max_source_length=2048,
            max_target_length=512,
            hub_path="NortheasternUniversity/big_patent",
            hub_config="e",
        ),
        Task(
            name="iwslt2017_de_en",
            source="translation.de",
            target="translation.en",
            prefix="translate German to English: ",
            metric="sacrebleu",
            hub_path="IWSLT/iwslt2017",
            hub_config="iwslt2017-de-en",
        ),
        # The embedded demo's task (free_jax.demo_data): punctuation
        # restoration of sentences of ACL papers, its splits shipped in free_jax/assets/demo.
        # Scored by punctuation F1: BLEU, which counts the copied words too, gives copying the
        # input 85 (demo_data's docstring has the numbers).
        Task(
            name=demo_data.TASK_NAME,
            source=demo_data.demo_source,
            target="text",
            prefix=demo_data.PREFIX,
            max_source_length=demo_data.MAX_SOURCE_LENGTH,
            max_target_length=demo_data.MAX_TARGET_LENGTH,
            metric="punct_f1",
            extra_metrics=("sacrebleu",),
            data_dir=str(demo_data.ASSETS),
        ),
    )
}


def get_task(name: str | Task, **overrides: Any) -> Task:
    """A registered task, with any field replaced: `get_task("samsum", max_source_length=256)`."""
    if isinstance(name, Task):
        task = name
    elif name in TASKS:
        task = TASKS[name]
    else:
        raise ConfigError(f"unknown task {name!r}; registered: {sorted(TASKS)}.")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(Task)})
    if unknown:
        fields = [f.name for f in dataclasses.fields(Task)]
        raise ConfigError(f"get_task: unknown Task fields {unknown}; valid: {fields}.")
    return dataclasses.replace(task, **overrides) if overrides else task


# ---------------------------------------------------------------------------- examples


@dataclasses.dataclass(frozen=True, eq=False)
class Examples:
    """One tokenised split: ragged token ids (EOS appended, truncated to the task's lengths).

    Example i's source ids are `source_tokens[source_offsets[i]:source_offsets[i + 1]]`.

    Attributes:
      task: the task (its lengths bound every example).
      split: the split's name ("train", "validation", ...).
      source_tokens: int32[sum of source lengths], all examples' encoder ids, concatenated.
      source_offsets: int64[N + 1].
      target_tokens: int32[sum of target lengths].
      target_offsets: int64[N + 1].
      references: N references as raw text (a string, or a tuple of strings for several gold
        answers), untruncated.
      row_ids: int64[N], each example's row in the raw split (rows may have been dropped).
      pad_id, eos_id: the tokenizer's special ids.
      num_dropped: raw rows dropped for an empty source or target.
      from_cache: True when the ids were read from the cache rather than tokenised.
      cache_key: the hash the cache file is named by ("" when caching is off).
    """

    task: Task
    split: str
    source_tokens: np.ndarray
    source_offsets: np.ndarray
    target_tokens: np.ndarray
    target_offsets: np.ndarray
    references: tuple[str | tuple[str, ...], ...]
    row_ids: np.ndarray
    pad_id: int
    eos_id: int
    num_dropped: int = 0
    from_cache: bool = False
    cache_key: str = ""

    def __len__(self) -> int:
        return len(self.row_ids)

    def source_ids(self, i: int) -> np.ndarray:
        """int32[<= S]: example i's encoder ids, EOS included."""
        return self.source_tokens[self.source_offsets[i] : self.source_offsets[i + 1]]

    def target_ids(self, i: int) -> np.ndarray:
        """int32[<= T]: example i's target ids, EOS included."""
        return self.target_tokens[self.target_offsets[i] : self.target_offsets[i + 1]]

    def select(self, indices: Sequence[int]) -> Examples:
        """The examples at `indices`, in that order (e.g. a sample spread over the split)."""
        indices = np.asarray(indices, np.int64).reshape(-1)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise DataError(
                f"example indices must lie in [0, {len(self)}) for this {len(self)}-example "
                f"split; got {indices.min()}..{indices.max()}."
            )

        def gather(tokens, offsets):
            parts = [tokens[offsets[i] : offsets[i + 1]] for i in indices]
            lengths = np.array([len(x) for x in parts], np.int64)
            joined = np.concatenate(parts) if parts else tokens[:0]
            return joined, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

        source_tokens, source_offsets = gather(self.source_tokens, self.source_offsets)
        target_tokens, target_offsets = gather(self.target_tokens, self.target_offsets)
        return dataclasses.replace(
            self,
            source_tokens=source_tokens,
            source_offsets=source_offsets,
            target_tokens=target_tokens,
            target_offsets=target_offsets,
            references=tuple(self.references[i] for i in indices),
            row_ids=self.row_ids[indices],
        )

    @property
    def source_lengths(self) -> np.ndarray:
        """int64[N]."""
        return np.diff(self.source_offsets)

    @property
    def target_lengths(self) -> np.ndarray:
        """int64[N]."""
        return np.diff(self.target_offsets)


def default_cache_dir() -> Path:
    """`$FREE_JAX_CACHE/data`, else `~/.cache/free_jax/data`."""
    root = os.environ.get("FREE_JAX_CACHE") or Path.home() / ".cache" / "free_jax"
    return Path(root) / "data"


def load_examples(
    task: str | Task,
    tokenizer: Any,
    *,
    split: str = "train",
    data_files: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> Examples:
    """Reads, tokenises and caches one split of a task.

    Each example's source is `prefix + source text`, tokenised without the tokenizer's own special
    tokens, truncated to `max_source_length - 1` tokens and ended with EOS; the target likewise
    with `max_target_length`. For T5 tokenizers this equals `tokenizer(text, max_length=...,
    truncation=True)`.

    Args:
      task: a registered task's name or a `Task` (see `get_task` to override fields).
      tokenizer: any `transformers` tokenizer with `eos_token_id` and `pad_token_id`.
      split: the split to read from the hub, and the label of local files.
      data_files: local `.json` (a list of records, or SQuAD's official nested file),
        `.jsonl` or `.csv` files holding this split; None: the task's shipped `data_dir` when
        it has one, else download `task.hub_path` (needs a network).
      cache_dir: where token ids (and `datasets`' Arrow files) are cached; default
        `default_cache_dir()`.
      use_cache: read and write the token-id cache. The cache key covers the tokenizer's full
        vocabulary and normaliser, the task's fields, prefix and lengths, and the files' paths,
        sizes and modification times. A field given as a function is keyed by its module, name
        and bytecode: values it closes over are not, so pass `use_cache=False` while editing one.

    Returns:
      The split's `Examples`.

    Raises:
      DataError: a file is missing or unreadable, a field is missing, or the hub is unreachable.
      ConfigError: the tokenizer lacks an EOS or pad id.
    """
    task = get_task(task)
    eos_id, pad_id = _special_ids(tokenizer)
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if data_files is None and task.data_dir is not None:
        data_files = _shipped_file(task, split)
    files = None if data_files is None else _check_files(data_files)

    if files is not None:
        fingerprint = json.dumps([_file_fingerprint(f) for f in files])
        dataset = None
    else:
        dataset = _load_hub(task, split, cache_root)
        fingerprint = getattr(dataset, "_fingerprint", None)
        use_cache = use_cache and fingerprint is not None

    key = ""
    if use_cache:
        key = _cache_key(task, split, tokenizer, fingerprint, eos_id, pad_id)
        cache_file = cache_root / f"{task.name}-{_safe(split)}-{key[:20]}.npz"
        cached = _read_cache(cache_file, task, split, key, pad_id, eos_id)
        if cached is not None:
            return cached

    if dataset is None:
        dataset, origin = _load_local(files, cache_root), ", ".join(map(str, files))
    else:
        origin = f"hub dataset {task.hub_path!r} split {split!r}"
    sources, targets, references, row_ids, dropped = _extract(task, dataset, origin)
    source_ids = _encode(tokenizer, [task.prefix + s for s in sources], task.max_source_length)
    target_ids = _encode(tokenizer, targets, task.max_target_length)
    src_tokens, src_offsets = _ragged(source_ids, eos_id)
    tgt_tokens, tgt_offsets = _ragged(target_ids, eos_id)
    examples = Examples(
        task=task,
        split=split,
        source_tokens=src_tokens,
        source_offsets=src_offsets,
        target_tokens=tgt_tokens,
        target_offsets=tgt_offsets,
        references=tuple(references),
        row_ids=np.asarray(row_ids, np.int64),
        pad_id=pad_id,
        eos_id=eos_id,
        num_dropped=dropped,
        cache_key=key,
    )
    if use_cache:
        try:
            _write_cache(cache_file, examples)
        except OSError as e:  # a read-only or full disk costs speed, not the run
            warnings.warn(f"could not write the token cache {cache_file}: {e}", stacklevel=2)
    return examples


def _special_ids(tokenizer: Any) -> tuple[int, int]:
    eos_id = getattr(tokenizer, "eos_token_id", None)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if eos_id is None or pad_id is None:
        raise ConfigError(
            f"the tokenizer ({type(tokenizer).__name__}) has eos_token_id={eos_id!r} and "
            f"pad_token_id={pad_id!r}; both are needed (set tokenizer.pad_token = ...)."
        )
    return int(eos_id), int(pad_id)


def _shipped_file(task: Task, split: str) -> Path:
    path = Path(task.data_dir) / f"{split}.jsonl"
    if not path.is_file():
        shipped = sorted(p.stem for p in Path(task.data_dir).glob("*.jsonl"))
        raise DataError(
            f"task {task.name!r} ships the splits {shipped} in {task.data_dir}, not {split!r}; "
            "pass data_files=... for other data."
        )
    return path


def _check_files(data_files: Any) -> list[Path]:
    if isinstance(data_files, str | os.PathLike):
        data_files = [data_files]
    files = [Path(f).expanduser() for f in data_files]
    if not files:
        raise DataError("data_files is empty; pass one or more .json, .jsonl or .csv files.")
    for f in files:
        if not f.is_file():
            what = "is a directory, not a file" if f.is_dir() else "does not exist"
            raise DataError(f"data file {str(f)!r} {what}.")
        if f.suffix.lower() not in _LOCAL_FORMATS:
            raise DataError(
                f"data file {str(f)!r} has suffix {f.suffix!r}; supported: "
                f"{sorted(_LOCAL_FORMATS)}."
            )
    kinds = {_LOCAL_FORMATS[f.suffix.lower()] for f in files}
    if len(kinds) > 1:
        raise DataError(f"data_files mixes formats {sorted(kinds)}; pass files of one format.")
    return files


def _file_fingerprint(f: Path) -> list[Any]:
    stat = f.stat()
    return [str(f.resolve()), stat.st_size, stat.st_mtime_ns]


# ---------------------------------------------------------------------------- reading


def _load_local(files: list[Path], cache_root: Path) -> Any:
    import datasets

    kind = _LOCAL_FORMATS[files[0].suffix.lower()]
    try:
        dataset = datasets.load_dataset(
            kind,
            data_files=[str(f) for f in files],
            split="train",
            cache_dir=str(cache_root / "hf_datasets"),
        )
    except Exception as e:  # noqa: BLE001 - any parser failure becomes one clear message
        raise DataError(
            f"could not read {', '.join(map(str, files))} as {kind.upper()}: {_first_line(e)}"
        ) from e
    if "data" in dataset.column_names and _is_squad_official(dataset):
        return _flatten_squad(dataset)
    return dataset


def _is_squad_official(dataset: Any) -> bool:
    # SQuAD's own files: {"version": ..., "data": [{"title", "paragraphs": [{"context", "qas"}]}]}.
    if len(dataset) == 0:
        return False
    data = dataset[0]["data"]
    return isinstance(data, list) and bool(data) and "paragraphs" in (data[0] or {})


def _flatten_squad(dataset: Any) -> list[dict[str, Any]]:
    rows = []
    for record in dataset:
        for article in record["data"]:
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    answers = qa.get("answers") or []
                    rows.append(
                        {
                            "id": qa.get("id"),
                            "title": article.get("title"),
                            "context": paragraph["context"],
                            "question": qa["question"],
                            "answers": {
                                "text": [a["text"] for a in answers],
                                "answer_start": [a["answer_start"] for a in answers],
                            },
                        }
                    )
    return rows


def _load_hub(task: Task, split: str, cache_root: Path) -> Any:
    if task.hub_path is None:
        raise DataError(
            f"task {task.name!r} has no hub dataset; pass its local files with data_files=..."
        )
    import datasets

    where = task.hub_path + (f" (config {task.hub_config!r})" if task.hub_config else "")
    local_hint = (
        f"To use local files, download the split where a network exists, e.g. "
        f"datasets.load_dataset({task.hub_path!r}, {task.hub_config!r}, split={split!r})"
        f".to_json('{task.name}-{split}.jsonl'), copy it here and pass "
        f"load_examples({task.name!r}, tokenizer, split={split!r}, "
        f"data_files='{task.name}-{split}.jsonl'); .json, .jsonl and .csv files work, with the "
        f"fields source={_describe(task.source)}, target={_describe(task.target)}."
    )
    try:
        return datasets.load_dataset(
            task.hub_path,
            task.hub_config,
            split=split,
            cache_dir=str(cache_root / "hf_datasets"),
        )
    except Exception as e:  # noqa: BLE001 - every failure mode gets a clear message
        from datasets.exceptions import DatasetNotFoundError

        cause = f"({_first_line(e)})"
        if isinstance(e, ConnectionError):
            raise DataError(
                f"task {task.name!r}: the Hugging Face Hub dataset {where} is not in the local "
                f"cache and no network is reachable (or HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is "
                f"set). {local_hint} {cause}"
            ) from e
        if isinstance(e, DatasetNotFoundError):
            raise DataError(
                f"task {task.name!r}: the Hugging Face Hub has no dataset {where} (or it is "
                f"private or gated). {local_hint} {cause}"
            ) from e
        raise DataError(
            f"task {task.name!r}: split {split!r} of the Hugging Face Hub dataset {where} could "
            f"not be loaded. {local_hint} {cause}"
        ) from e


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"


def _describe(spec: FieldSpec) -> str:
    return repr(spec) if isinstance(spec, str) else f"{getattr(spec, '__name__', spec)}(row)"


class _MissingField(Exception):
    def __init__(self, path: str, present: Sequence[str]):
        super().__init__(path)
        self.path, self.present = path, list(present)


def _resolve(row: Mapping[str, Any], spec: FieldSpec) -> Any:
    if callable(spec):
        try:
            return spec(row)
        except KeyError as e:
            raise _MissingField(str(e.args[0]) if e.args else "?", list(row)) from e
    if spec in row:  # a flat column may itself contain dots ("translation.de" in a CSV)
        return row[spec]
    value: Any = row
    walked = []
    for part in spec.split("."):
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, list | tuple) and part.lstrip("-").isdigit():
            if not -len(value) <= int(part) < len(value):
                raise _MissingField(
                    ".".join([*walked, part]), [f"{len(value)} list items"] if value else []
                )
            value = value[int(part)]
        else:
            present = list(value) if isinstance(value, Mapping) else [type(value).__name__]
            raise _MissingField(".".join([*walked, part]), present)
        walked.append(part)
    return value


def _text(value: Any, what: str, origin: str, row: int) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(
            f"{origin}: row {row}: the {what} field is a {type(value).__name__} "
            f"({str(value)[:80]!r}), not text; point the task's {what} at a string field."
        )
    return value


def _extract(
    task: Task, dataset: Any, origin: str
) -> tuple[list[str], list[str], list[Any], list[int], int]:
    """Source texts, target texts, references and raw row ids, with empty rows dropped."""
    columns = list(dataset.column_names) if hasattr(dataset, "column_names") else None
    if columns is None and dataset:
        columns = list(dataset[0])
    for what, spec in (
        ("source", task.source),
        ("target", task.target),
        ("references", task.reference_field),
    ):
        # Fail before reading any row when a plain or dotted field's top-level column is absent.
        if isinstance(spec, str) and columns is not None:
            head = spec if spec in columns else spec.split(".")[0]
            if head not in columns:
                raise DataError(
                    f"{origin}: the {what} field {spec!r} of task {task.name!r} is missing; "
                    f"fields present: {columns}. Pass get_task({task.name!r}, {what}=...) with "
                    "one of them (a dotted path such as 'translation.de' reaches nested fields)."
                )
    sources, targets, references, row_ids = [], [], [], []
    dropped = 0
    for i, row in enumerate(dataset):
        values = {}
        for what, spec in (
            ("source", task.source),
            ("target", task.target),
            ("references", task.reference_field),
        ):
            try:
                values[what] = _resolve(row, spec)
            except _MissingField as e:
                raise DataError(
                    f"{origin}: row {i}: the {what} field {_describe(spec)} of task "
                    f"{task.name!r} is missing ({e.path!r} not found; present there: "
                    f"{e.present})."
                ) from None
            except Exception as e:  # noqa: BLE001 - a user's field function failed on this row
                raise DataError(
                    f"{origin}: row {i}: the {what} field {_describe(spec)} of task "
                    f"{task.name!r} raised {_first_line(e)}; fields present: {list(row)}."
                ) from e
        source = _text(values["source"], "source", origin, i)
        target = _text(values["target"], "target", origin, i)
        if not source.strip() or not target.strip():
            if task.drop_empty:
                dropped += 1
                continue
            raise DataError(
                f"{origin}: row {i} has an empty {'source' if not source.strip() else 'target'}; "
                f"task {task.name!r} has drop_empty=False."
            )
        reference = values["references"]
        if isinstance(reference, list | tuple):
            reference = tuple(_text(r, "references", origin, i) for r in reference)
        else:
            reference = _text(reference, "references", origin, i)
        sources.append(source)
        targets.append(target)
        references.append(reference)
        row_ids.append(i)
    if not sources:
        raise DataError(
            f"{origin}: no usable rows ({dropped} dropped for an empty source or target)."
        )
    return sources, targets, references, row_ids, dropped


# ---------------------------------------------------------------------------- tokenising


def _encode(tokenizer: Any, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids of each text, without special tokens, truncated to `max_length - 1`."""
    from tqdm.auto import tqdm

    out: list[list[int]] = []
    chunks = range(0, len(texts), _ENCODE_CHUNK)
    for start in tqdm(chunks, desc="tokenising", leave=False, disable=len(chunks) < 20):
        encoded = tokenizer(
            texts[start : start + _ENCODE_CHUNK],
            add_special_tokens=False,
            truncation=True,
            max_length=max_length - 1,
        )
        out.extend(encoded["input_ids"])
    return out


def _ragged(sequences: list[list[int]], eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Concatenates `sequence + [eos]` for each sequence: (int32[total], int64[N + 1])."""
    lengths = np.fromiter((len(s) + 1 for s in sequences), np.int64, len(sequences))
    offsets = np.zeros(len(sequences) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.full(offsets[-1], eos_id, np.int32)
    for s, start in zip(sequences, offsets[:-1], strict=True):
        tokens[start : start + len(s)] = s
    return tokens, offsets


# ---------------------------------------------------------------------------- cache


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything that decides a tokenizer's ids: model, vocabulary, normaliser.

    Fast (Rust) tokenizers hash their full serialisation; SentencePiece-backed ones their model
    proto; any other the sorted vocabulary. The class name and added tokens are always included.
    """
    h = hashlib.sha256(type(tokenizer).__qualname__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    sp_model = getattr(tokenizer, "sp_model", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        # Truncation and padding settings change as the tokenizer is called; the ids do not.
        state.pop("truncation", None)
        state.pop("padding", None)
        h.update(json.dumps(state, sort_keys=True).encode())
    elif sp_model is not None:
        h.update(sp_model.serialized_model_proto())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    added = getattr(tokenizer, "get_added_vocab", dict)()
    h.update(json.dumps(sorted(added.items())).encode())
    return h.hexdigest()


def _spec_key(spec: FieldSpec | None) -> Any:
    if spec is None or isinstance(spec, str):
        return spec
    code = getattr(spec, "__code__", None)
    body = hashlib.sha256(code.co_code + repr(code.co_consts).encode()).hexdigest() if code else ""
    if not body:
        try:
            body = hashlib.sha256(inspect.getsource(spec).encode()).hexdigest()
        except (OSError, TypeError):
            body = repr(spec)
    return [getattr(spec, "__module__", ""), getattr(spec, "__qualname__", repr(spec)), body]


def _cache_key(
    task: Task, split: str, tokenizer: Any, fingerprint: str, eos_id: int, pad_id: int
) -> str:
    parts = {
        "version": _CACHE_VERSION,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "eos_id": eos_id,
        "pad_id": pad_id,
        "split": split,
        "data": fingerprint,
        "source": _spec_key(task.source),
        "target": _spec_key(task.target),
        "references": _spec_key(task.reference_field),
        "prefix": task.prefix,
        "max_source_length": task.max_source_length,
        "max_target_length": task.max_target_length,
        "drop_empty": task.drop_empty,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[:40]


def _write_cache(file: Path, examples: Examples) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "key": examples.cache_key,
        "references": [list(r) if isinstance(r, tuple) else r for r in examples.references],
        "num_dropped": examples.num_dropped,
    }
    # Written under a temporary name and renamed, so concurrent processes never read half a file.
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=file.stem, suffix=".tmp.npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                source_tokens=examples.source_tokens,
                source_offsets=examples.source_offsets,
                target_tokens=examples.target_tokens,
                target_offsets=examples.target_offsets,
                row_ids=examples.row_ids,
                meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
            )
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        os.replace(tmp, file)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read_cache(
    file: Path, task: Task, split: str, key: str, pad_id: int, eos_id: int
) -> Examples | None:
    if not file.is_file():
        return None
    try:
        with np.load(file, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes())
            arrays = {k: z[k] for k in z.files if k != "meta"}
    except (OSError, ValueError, KeyError, EOFError):
        return None  # unreadable: tokenise again and overwrite it
    if meta.get("key") != key:
        return None
    return Examples(
        task=task,
        split=split,
        references=tuple(tuple(r) if isinstance(r, list) else r for r in meta["references"]),
        pad_id=pad_id,
        eos_id=eos_id,
        num_dropped=meta["num_dropped"],
        from_cache=True,
        cache_key=key,
        **arrays,
    )


# ---------------------------------------------------------------------------- batches


def make_batch(
    examples: Examples,
    indices: np.ndarray,
    *,
    source_length: int,
    target_length: int,
    decoder_start_id: int | None = None,
) -> dict[str, np.ndarray]:
    """The contract batch of the given examples; index -1 is an empty (all-pad) row.

    Args:
      examples: the split.
      indices: int[B] example indices.
      source_length: S; at least every example's source length.
      target_length: T; at least every example's target length.
      decoder_start_id: the decoder's first input; default the pad id (T5's convention).

    Returns:
      The five arrays of the batch contract (module docstring).
    """
    start = examples.pad_id if decoder_start_id is None else decoder_start_id
    b = len(indices)
    input_ids = np.full((b, source_length), examples.pad_id, np.int32)
    labels = np.full((b, target_length), examples.pad_id, np.int32)
    src_len = np.zeros(b, np.int64)
    tgt_len = np.zeros(b, np.int64)
    for row, i in enumerate(indices):
        if i < 0:
            continue
        src, tgt = examples.source_ids(i), examples.target_ids(i)
        if len(src) > source_length or len(tgt) > target_length:
            raise ConfigError(
                f"example {i} has {len(src)} source / {len(tgt)} target tokens; the batch shape "
                f"is ({source_length}, {target_length}). Lengths must be at least the task's "
                f"({examples.task.max_source_length}, {examples.task.max_target_length})."
            )
        input_ids[row, : len(src)] = src
        labels[row, : len(tgt)] = tgt
        src_len[row], tgt_len[row] = len(src), len(tgt)
    decoder_input_ids = np.empty_like(labels)
    decoder_input_ids[:, 0] = start
    decoder_input_ids[:, 1:] = labels[:, :-1]
    return {
        "input_ids": input_ids,
        "attention_mask": (np.arange(source_length) < src_len[:, None]).astype(np.int32),
        "decoder_input_ids": decoder_input_ids,
        "labels": labels,
        "loss_mask": (np.arange(target_length) < tgt_len[:, None]).astype(np.float32),
    }


def _buckets(buckets: Sequence[int] | None, maximum: int, name: str) -> tuple[int, ...]:
    if buckets is None:
        return (maximum,)
    values = sorted(set(buckets))
    bad = [v for v in values if not isinstance(v, int | np.integer) or not 1 <= v <= maximum]
    if bad:
        raise ConfigError(f"{name}={list(buckets)}: {bad} not in [1, {maximum}] (the task's max).")
    # The task maximum is always a bucket, so every example fits one.
    return tuple(dict.fromkeys([*map(int, values), maximum]))


def _check_processes(batch_size: int, process_index: int, process_count: int) -> None:
    if not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise ConfigError(f"batch size {batch_size!r}; must be a positive int.")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ConfigError(
            f"process_index={process_index}, process_count={process_count}; need "
            "0 <= process_index < process_count."
        )
    if batch_size % process_count:
        raise ConfigError(
            f"the global batch size {batch_size} is not divisible by process_count="
            f"{process_count}; each process takes an equal share of rows."
        )


class _Shaper:
    """Chooses a batch's (S, T) from the lengths of all its global rows."""

    def __init__(self, examples: Examples, source_buckets: Any, target_buckets: Any):
        task = examples.task
        self.source = _buckets(source_buckets, task.max_source_length, "source_buckets")
        self.target = _buckets(target_buckets, task.max_target_length, "target_buckets")
        self.src_len = examples.source_lengths
        self.tgt_len = examples.target_lengths

    def shape(self, global_indices: np.ndarray) -> tuple[int, int]:
        real = global_indices[global_indices >= 0]
        need_s = int(self.src_len[real].max(initial=1))
        need_t = int(self.tgt_len[real].max(initial=1))
        return (
            next(s for s in self.source if s >= need_s),
            next(t for t in self.target if t >= need_t),
        )

    def shapes(self) -> list[tuple[int, int]]:
        return [(s, t) for s in self.source for t in self.target]


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 (wrap-around arithmetic)."""
    x = np.asarray(x, np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """int64[n]: the order of epoch `epoch`, a pure function of (n, seed, epoch).

    Built from a fixed integer hash rather than `np.random.Generator.permutation`, whose streams
    NumPy does not promise to keep across versions: a run resumed after an upgrade must still see
    the same batches.
    """
    key = _mix64(_mix64(np.uint64(seed)) ^ np.uint64(epoch))
    keys = _mix64(np.arange(n, dtype=np.uint64) ^ key)  # distinct, since _mix64 is a bijection
    return np.argsort(keys, kind="stable")


class TrainBatches:
    """Fixed-shape training batches in a deterministic order: exact resume, multi-host slices.

    The global batch of step s is rows `[p * B, (p + 1) * B)` of epoch `s // steps_per_epoch`'s
    permutation (`epoch_permutation(N, seed, epoch)`), p = `s % steps_per_epoch`. Nothing is
    carried between steps, so `batch_at(s)` equals the s-th batch of an uninterrupted
    `iterate()`, and a restart only needs the step. Each process computes the same global rows
    and shape and keeps its slice: rows `[i * B / P, (i + 1) * B / P)` for process i of P.

    Args:
      examples: the tokenised split.
      global_batch_size: B, rows per step over all processes.
      seed: fixes every epoch's order.
      drop_remainder: each epoch has `N // B` steps and the last `N % B` examples of its order
        wait for a later epoch's luck; False: `ceil(N / B)` steps, the last batch padded with
        empty rows (zero masks).
      shuffle: False keeps the split's order in every epoch.
      source_buckets, target_buckets: extra, smaller S and T shapes (module docstring); the
        task's maximum lengths are always included. Default: the maximum lengths only.
      group_by_length: 0 (off) or G > 1: each epoch's permutation is cut into windows of G
        batches, each window is sorted by the longer of source and target length and cut into
        batches, and the epoch's batches are shuffled. Rows of a batch then have similar
        lengths, so with buckets most batches take a small shape (56% of the padded tokens
        on the demo task), while the order stays a pure function of (seed, epoch).
      process_index, process_count: this process and the number of processes
        (`jax.process_index()`, `jax.process_count()`).
      decoder_start_id: the decoder's first input; default the pad id.
    """

    def __init__(
        self,
        examples: Examples,
        global_batch_size: int,
        *,
        seed: int = 0,
        drop_remainder: bool = True,
        shuffle: bool = True,
        source_buckets: Sequence[int] | None = None,
        target_buckets: Sequence[int] | None = None,
        group_by_length: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        decoder_start_id: int | None = None,
    ):
        _check_processes(global_batch_size, process_index, process_count)
        if not isinstance(seed, int | np.integer) or not 0 <= seed < 2**64:
            raise ConfigError(f"seed={seed!r}; must be an int in [0, 2**64).")
        if not isinstance(group_by_length, int | np.integer) or not (
            group_by_length == 0 or group_by_length >= 2
        ):
            raise ConfigError(
                f"group_by_length={group_by_length!r}; must be 0 (off) or an int >= 2 (batches "
                "per sorted window)."
            )
        n = len(examples)
        if drop_remainder and n < global_batch_size:
            raise ConfigError(
                f"the split has {n} examples, fewer than one batch of {global_batch_size}; "
                "lower the batch size or pass drop_remainder=False."
            )
        self.examples = examples
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.drop_remainder = drop_remainder
        self.shuffle = shuffle
        self.process_index = process_index
        self.process_count = process_count
        self.decoder_start_id = decoder_start_id
        self.group_by_length = int(group_by_length)
        self.steps_per_epoch = (
            n // self.global_batch_size if drop_remainder else -(-n // self.global_batch_size)
        )
        self._shaper = _Shaper(examples, source_buckets, target_buckets)
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, permutation), the last used

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.process_count

    def shapes(self) -> list[tuple[int, int]]:
        """Every (S, T) a batch can have: compile these ahead of time to avoid mid-run stalls."""
        return self._shaper.shapes()

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            n = len(self.examples)
            order = epoch_permutation(n, self.seed, epoch) if self.shuffle else np.arange(n)
            if self.group_by_length:
                order = self._grouped(order, epoch)
            self._order = (epoch, order)
        return self._order[1]

    def _grouped(self, order: np.ndarray, epoch: int) -> np.ndarray:
        """`order` with rows sorted by length inside windows, then whole batches shuffled."""
        b = self.global_batch_size
        used = len(order) // b * b
        head, tail = order[:used], order[used:]  # the remainder: dropped, or the last batch
        window = self.group_by_length * b
        # The longer side decides a batch's buckets, so sort by it.
        lengths = np.maximum(self.examples.source_lengths, self.examples.target_lengths)
        parts = [
            chunk[np.argsort(lengths[chunk], kind="stable")]
            for chunk in np.split(head, range(window, len(head), window))
        ]
        batches = np.concatenate(parts).reshape(-1, b) if len(head) else head.reshape(0, b)
        if self.shuffle:
            # A second hash stream (the bit-flipped seed): batch order independent of row order.
            batches = batches[epoch_permutation(len(batches), self.seed ^ (2**63), epoch)]
        return np.concatenate([batches.reshape(-1), tail])

    def global_indices(self, step: int) -> np.ndarray:
        """int64[B]: the examples of step `step`'s global batch; -1 marks an empty row."""
        if not isinstance(step, int | np.integer) or step < 0:
            raise ConfigError(f"step={step!r}; must be an int >= 0.")
        epoch, position = divmod(int(step), self.steps_per_epoch)
        b = self.global_batch_size
        rows = self._permutation(epoch)[position * b : (position + 1) * b]
        return np.concatenate([rows, np.full(b - len(rows), -1, np.int64)])

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of step `step`'s batch: the contract arrays, [B / P, ...]."""
        rows = self.global_indices(step)
        source_length, target_length = self._shaper.shape(rows)
        local = self.local_batch_size
        mine = rows[self.process_index * local : (self.process_index + 1) * local]
        return make_batch(
            self.examples,
            mine,
            source_length=source_length,
            target_length=target_length,
            decoder_start_id=self.decoder_start_id,
        )

    def iterate(
        self, start_step: int = 0, num_steps: int | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        """The batches of steps `start_step`, `start_step + 1`, ...: `num_steps`, or forever."""
        step = start_step
        while num_steps is None or step < start_step + num_steps:
            yield self.batch_at(step)
            step += 1

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self.iterate()


@dataclasses.dataclass(frozen=True)
class EvalBatch:
    """One eval batch: this process's contract arrays and the references of its real rows.

    Attributes:
      arrays: the batch contract's arrays, [B / P, ...].
      example_ids: int64[B / P], each row's index in the split; -1 for an empty padding row.
      references: the references of the rows with `example_ids >= 0`, in row order.
    """

    arrays: dict[str, np.ndarray]
    example_ids: np.ndarray
    references: tuple[str | tuple[str, ...], ...]


def eval_batches(
    examples: Examples,
    batch_size: int,
    *,
    max_examples: int | None = None,
    source_buckets: Sequence[int] | None = None,
    target_buckets: Sequence[int] | None = None,
    process_index: int = 0,
    process_count: int = 1,
    decoder_start_id: int | None = None,
) -> Iterator[EvalBatch]:
    """A split in its own order, in fixed-shape batches; the last one is padded with empty rows.

    Args:
      examples: the tokenised split.
      batch_size: rows per global batch (1 for the paper's latency measurements).
      max_examples: stop after the first this many examples; default all.
      source_buckets, target_buckets, process_index, process_count, decoder_start_id: as in
        `TrainBatches`.
    """
    _check_processes(batch_size, process_index, process_count)
    n = len(examples) if max_examples is None else min(max_examples, len(examples))
    shaper = _Shaper(examples, source_buckets, target_buckets)
    local = batch_size // process_count
    for start in range(0, n, batch_size):
        rows = np.arange(start, start + batch_size, dtype=np.int64)
        rows[rows >= n] = -1
        source_length, target_length = shaper.shape(rows)
        mine = rows[process_index * local : (process_index + 1) * local]
        yield EvalBatch(
            arrays=make_batch(
                examples,
                mine,
                source_length=source_length,
                target_length=target_length,
                decoder_start_id=decoder_start_id,
            ),
            example_ids=mine,
            references=tuple(examples.references[i] for i in mine if i >= 0),
        )


# ---------------------------------------------------------------------------- trainer hook


def make_batch_source(
    data: Any, *, split: str, seed: int, batch_size: int, tokenizer: Any
) -> Callable[[int], Iterator[dict[str, np.ndarray]]]:
    """The trainer's entry point (`free_jax.training.inputs.source_for`) into this pipeline.

    Args:
      data: a `free_jax.training.config.DataConfig`: `task` (a registered task), `dataset` (local
        `.json`/`.jsonl`/`.csv` file(s), comma-separated, or None for the task's shipped files or
        its hub dataset), `prefix` (replaces the task's when given), `source_length` and
        `target_length` (the static S and T), `train_split` / `eval_split`, and for the training
        split `length_buckets` and `group_by_length` (`TrainBatches`).
      split: the split to read.
      seed: fixes the order of training batches (evaluation batches keep the split's order).
      batch_size: global rows per batch.
      tokenizer: the model's tokenizer.

    Returns:
      `source(start_step) -> iterator` of global batches; the batch at step s depends only on
      (seed, s), so resumed runs see what uninterrupted ones would.
    """
    if tokenizer is None:
        raise ConfigError(
            f"data.task={data.task!r} needs a tokenizer; the model (model.name or its checkpoint) "
            "has none."
        )
    overrides: dict[str, Any] = dict(
        max_source_length=data.source_length, max_target_length=data.target_length
    )
    if data.prefix:
        overrides["prefix"] = data.prefix
    task = get_task(data.task, **overrides)
    files = None
    if data.dataset:
        files = [part.strip() for part in str(data.dataset).split(",") if part.strip()]
    examples = load_examples(task, tokenizer, split=split, data_files=files)
    training = split == data.train_split
    buckets = tuple(data.length_buckets) or None  # None: the task's maximum lengths only
    batches = TrainBatches(
        examples,
        batch_size,
        seed=seed,
        shuffle=training,
        drop_remainder=training,
        source_buckets=buckets,
        target_buckets=buckets,
        group_by_length=data.group_by_length if training else 0,
    )

    def source(start_step: int) -> Iterator[dict[str, np.ndarray]]:
        return batches.iterate(start_step)

    return source
