"""Examples: a split read from local files or the hub, tokenised once and cached on disk
(`load_examples`)."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from free_jax.data.tasks import FieldSpec, Task, get_task
from free_jax.errors import ConfigError, DataError

# ---------------------------------------------------------------------------- examples

# Bump when the cached arrays' layout or the tokenisation rule changes.
_CACHE_VERSION = 2  # 2: the demo task's source keeps its case
_LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv"}
_ENCODE_CHUNK = 1000


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
