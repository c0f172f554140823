"""Tasks: where a task's text lives, its prefix, lengths and metric (`get_task`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from free_jax.data import demo, metrics
from free_jax.errors import ConfigError

# A field of a raw row: a column name, a dotted path into nested fields ("translation.de",
# "answers.text.0"), or a function of the whole row.
FieldSpec = str | Callable[[Mapping[str, Any]], Any]


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
      metric: the headline metric's name in `free_jax.data.metrics.compute`.
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
        # The embedded demo's task (free_jax.data.demo): punctuation
        # restoration of sentences of ACL papers, its splits shipped in free_jax/assets/demo.
        # Scored by punctuation F1: BLEU, which counts the copied words too, gives copying the
        # input 85 (demo_data's docstring has the numbers).
        Task(
            name=demo.TASK_NAME,
            source=demo.demo_source,
            target="text",
            prefix=demo.PREFIX,
            max_source_length=demo.MAX_SOURCE_LENGTH,
            max_target_length=demo.MAX_TARGET_LENGTH,
            metric="punct_f1",
            extra_metrics=("sacrebleu",),
            data_dir=str(demo.ASSETS),
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
