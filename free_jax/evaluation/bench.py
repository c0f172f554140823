"""`free-jax bench`: decoding methods side by side over batch sizes, on the same inputs.

    result = run_bench(model, inputs, default_cases(model), batch_sizes=(1, 8, 32))
    print(format_bench(result))
    plot_bench(result, "bench_out/speedup_vs_batch.png")

For each batch size the inputs are cut into batches of that size (in order; the last may be
smaller), and every batch is decoded by every case in turn, so a change in the machine's load
touches all cases alike. Each shape is compiled in an untimed warm-up; a batch's time is the
median of `repeats` calls of `free_jax.decode` (which returns host arrays, so a call has finished
when it returns), and a case's time is the sum over batches. Per case and batch size it reports:

* ms per generated token and the speed-up over full decoding at that batch size;
* exit rate, deep passes per generated token, and rows and positions per deep pass (FREE passes
  serve only the rows that need the deep blocks, each over its pending positions);
* the weight-bytes ideal: the speed-up the case would have if every loop step cost the bytes of
  the weights it reads (a shallow step: blocks [0, L_s) and the head; a deep pass: blocks
  [L_s, L) and the head; a full step: all blocks and the head), and the measured speed-up as a
  fraction of it: what the loop, the passes' extra positions and the machine take;
* XLA's peak memory of the case's decode program (temporaries and outputs, for the batch size's
  first batch; the weights are arguments and not counted);
* quality (the task's metric, and its share of the full model's) when the inputs have references,
  and for exact mode whether every output equals full decoding.

It also probes the host before and after (`probe_host`): on a shared machine the load of other
tenants moves the results, and not all cases alike. On a 2-core cloud VM, full decoding of the
demo model took 18-20 ms per sentence in quiet hours and 31-38 ms in busy ones, while FREE's
shallow steps, which reread 2 MiB of weights rather than stream 10, slowed far less: the same
command gave FREE 1.93x over full decoding in one phase and 2.71x in the other. The probe's
numbers say which phase a table comes from, and whether the phase changed during the run. On a
virtual machine the run's CPU steal (the share of CPU time the hypervisor gave other tenants,
from Linux's `/proc/stat`) says why: on that VM `top` showed 50% steal in a busy phase.

A batch size whose largest program does not fit in the memory available (the device's limit, or
the host's available memory on a CPU) is refused with an `InputError` before anything runs.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from free_jax.data import metrics
from free_jax.decoding import SOURCE_BUCKET, decode, free_settings
from free_jax.decoding import methods as decode_methods
from free_jax.decoding.api import encode_source
from free_jax.decoding.methods.base import DecodeCall, DecodeOptions, default_exit_layer
from free_jax.decoding.methods.free import check_shallow_head
from free_jax.decoding.xla_options import decode_jit
from free_jax.errors import InputError
from free_jax.models import quantize
from free_jax.models.model import Model

PLOT_FILE = "speedup_vs_batch.png"


@dataclasses.dataclass(frozen=True)
class BenchCase:
    """One decoding configuration: a label and its `free_jax.decode` keyword arguments."""

    label: str
    kwargs: tuple[tuple[str, Any], ...]

    @classmethod
    def make(cls, label: str, **kwargs: Any) -> BenchCase:
        return cls(label, tuple(kwargs.items()))

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.kwargs)

    @property
    def method(self) -> str:
        return self.options.get("method", "full")


@dataclasses.dataclass(frozen=True)
class BenchInputs:
    """What every case decodes: source ids (one int array per example, unpadded), and the
    references and metric that score the outputs (None: speed only)."""

    sources: list[np.ndarray]
    max_new_tokens: int
    min_new_tokens: int = 0
    references: list[Any] | None = None
    metric: str | None = None
    pad_id: int = 0
    description: str = ""


@dataclasses.dataclass
class BenchRow:
    """One case at one batch size (times in seconds)."""

    label: str
    method: str
    batch_size: int
    seconds: float
    tokens: int
    steps: int
    exited: int
    passes: int
    pass_rows: int
    pass_positions: int
    bytes_read: float | None  # decoder weight bytes the loop steps read (None: CALM)
    peak_bytes: int | None
    quality: float | None = None
    equals_full: bool | None = None
    speedup: float = 1.0
    ideal: float | None = None  # the weight-bytes ideal speed-up
    quality_share: float | None = None

    @property
    def ms_per_token(self) -> float:
        return 1e3 * self.seconds / max(self.tokens, 1)

    @property
    def exit_rate(self) -> float:
        return self.exited / max(self.tokens, 1)

    @property
    def of_ideal(self) -> float | None:
        return None if not self.ideal else self.speedup / self.ideal

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(ms_per_token=self.ms_per_token, exit_rate=self.exit_rate, of_ideal=self.of_ideal)
        return out


@dataclasses.dataclass
class BenchResult:
    model: str
    inputs: str
    num_examples: int
    metric: str | None
    repeats: int
    rows: list[BenchRow]
    environment: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["rows"] = [r.to_dict() for r in self.rows]
        return out


def default_cases(
    model: Model,
    *,
    exit_layer: int | None = None,
    threshold: float | None = None,
    max_wait: int = 4,
    shallow_head: str | None = None,
) -> list[BenchCase]:
    """Full, static, CALM, and FREE (default mode, draft waiting, exact mode), all exiting at the
    same layer and threshold: the model's saved FREE settings unless given. `shallow_head` is
    `decode`'s, for the FREE cases (their labels say "int8 head")."""
    saved = free_settings(model)
    layer = exit_layer if exit_layer is not None else saved.get("exit_layer")
    layer = layer if layer is not None else default_exit_layer(model.config)
    thr = threshold if threshold is not None else float(saved.get("threshold", 0.9))
    free = dict(method="free", exit_layer=layer, threshold=thr)
    check_shallow_head(shallow_head)
    head = ""
    if shallow_head is not None:
        free["shallow_head"] = shallow_head
        head = f" {shallow_head.split('-')[0]} head"
    return [
        BenchCase.make("full", method="full"),
        BenchCase.make(f"static Ls={layer}", method="static", exit_layer=layer),
        BenchCase.make(f"calm thr={thr:.2f}", method="calm", exit_layer=layer, threshold=thr),
        BenchCase.make(f"free thr={thr:.2f}{head}", **free),
        BenchCase.make(
            f"free draft w={max_wait}{head}", **free, max_wait=max_wait, wait_mode="draft"
        ),
        BenchCase.make(f"free exact{head}", **free, mode="exact"),
    ]


def threshold_for_exit_rate(
    model: Model,
    inputs: BenchInputs,
    target: float,
    *,
    exit_layer: int | None = None,
    rows: int = 8,
    iterations: int = 10,
) -> float:
    """The FREE threshold whose exit rate over all of `inputs` (decoded `rows` at a time) is
    closest to `target`, by bisection (the threshold is traced: one compilation per shape).

    Over every input, not a sample: a random model's exits come in whole rows (its greedy
    output soon repeats itself), and the threshold closest to 80% on the first 8 of 16
    t5-base-shaped inputs made the 16 exit 56% of their tokens (`free-jax bench --model
    random:t5-base --max-examples 16 --exit-rate 0.8`)."""
    batches = _batches(inputs, rows)
    lengths = dict(max_new_tokens=inputs.max_new_tokens, min_new_tokens=inputs.min_new_tokens)
    lo, hi, best = 0.0, 1.0, (2.0, 0.5)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        exited = emitted = 0
        for ids, mask in batches:
            out = decode(
                model,
                ids,
                attention_mask=mask,
                method="free",
                exit_layer=exit_layer,
                threshold=mid,
                **lengths,
            )
            exited += int(out.exited.sum())
            emitted += int(out.lengths.sum())
        rate = exited / max(emitted, 1)
        best = min(best, (abs(rate - target), mid))
        lo, hi = (lo, mid) if rate < target else (mid, hi)
    return best[1]


def _batches(inputs: BenchInputs, batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The sources in order, `batch_size` rows per batch, padded to a multiple of decode's
    source bucket (so the encoder's cost follows the batch's longest source)."""
    out = []
    for start in range(0, len(inputs.sources), batch_size):
        rows = inputs.sources[start : start + batch_size]
        width = -(-max(len(s) for s in rows) // SOURCE_BUCKET) * SOURCE_BUCKET
        ids = np.full((len(rows), width), inputs.pad_id, np.int32)
        mask = np.zeros_like(ids)
        for j, s in enumerate(rows):
            ids[j, : len(s)], mask[j, : len(s)] = s, 1
        out.append((ids, mask))
    return out


#: Decoder weights a benchmark can decode with: as stored, bf16 (`Model.astype`: weights and
#: activations), or int8 (`Model.quantize`'s modes).
DECODE_WEIGHTS = ("f32", "bf16", *quantize.MODES)


def with_decode_weights(model: Model, weights: str) -> Model:
    """`model` decoding with `weights`, one of `DECODE_WEIGHTS` ("f32": as it is)."""
    if weights not in DECODE_WEIGHTS:
        raise InputError(f"weights={weights!r} is invalid: one of {', '.join(DECODE_WEIGHTS)}.")
    if weights == "f32":
        return model
    if weights == "bf16":
        return model.astype(jnp.bfloat16)
    return model.quantize(weights)


def decoder_weights(model: Model, start: int, stop: int, head: bool = True) -> list[jax.Array]:
    """The decode-layout arrays one loop step reads for blocks [start, stop), and the final norm
    and LM head: cross-attention K/V projections run once per input and are left out."""
    params = model.decode_params
    decoder = params["decoder"]
    leaves = []
    for block in decoder["blocks"][start:stop]:
        cross = {k: v for k, v in block["cross_attn"].items() if k not in ("k", "v")}
        leaves += jax.tree.leaves({**block, "cross_attn": cross})
    if head:
        leaves += [decoder["final_norm"], params.get("lm_head", params["shared"]["embedding"])]
    return leaves


def weight_bytes(model: Model, start: int, stop: int, head: bool = True) -> int:
    """Bytes of `decoder_weights`."""
    return sum(x.nbytes for x in decoder_weights(model, start, stop, head))


def program_bytes(
    model: Model,
    ids: np.ndarray,
    mask: np.ndarray,
    encoder_length: int,
    case,
    max_new_tokens: int,
    min_new_tokens: int,
) -> int | None:
    """XLA's temporary and output bytes of the decode program `decode(model, ids, **case)` runs
    (compiled ahead of time; None where the backend gives no memory analysis)."""
    options = case.options
    impl = decode_methods.get(options.pop("method", "full"))
    settings = impl.plan(model, DecodeOptions(**options), max_new_tokens)
    encoded = encode_source(
        model.params, ids, mask, config=model.config, length=max(encoder_length, ids.shape[1])
    )

    def program(params, encoder_output, encoder_mask):
        call = DecodeCall(
            model=model,
            params=params,
            encoder_output=encoder_output,
            encoder_mask=encoder_mask,
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
        )
        return impl.outputs(settings, impl.run(settings, call))

    # Compiled as the decode programs are (decode_jit: the same XLA options), so that its buffers
    # are those of the program that runs.
    compiled = decode_jit(program).lower(model.decode_params, *encoded).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes)


def available_bytes() -> int | None:
    """Memory a decode program may take: the device's limit less what is in use, or on a CPU
    the host's available memory (None when neither is known)."""
    device = jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@dataclasses.dataclass(frozen=True)
class HostProbe:
    """How fast this host runs three fixed workloads now (`probe_host`).

    Attributes:
      read_gb_s: the read rate of a jitted sum over a 64 MiB array, larger than the caches
        (a sum reads at about half the rate of matrix-vector products: compare probes with
        each other, not with the memory's nominal bandwidth).
      reread_gb_s: the same over an 8 MiB array read 8 times in one program, about what a
        small model's decode steps get when its weights stay in the last-level cache that
        other tenants share.
      product_us: one [1, 512] x [512, 512] float32 product, in a chain of 64 over two
        alternating 1 MiB matrices: a decode step's typical operation.
    """

    read_gb_s: float
    reread_gb_s: float
    product_us: float

    def changed(self, other: HostProbe, tolerance: float = 0.2) -> bool:
        """Whether any measurement differs from `other`'s by more than `tolerance` (relative)."""
        pairs = zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True)
        return any(abs(a - b) > tolerance * max(a, b) for a, b in pairs)

    def describe(self) -> str:
        return (
            f"{self.read_gb_s:.1f} GB/s read, {self.reread_gb_s:.1f} GB/s reread, "
            f"{self.product_us:.1f} us per 1 MiB product"
        )


@jax.jit
def _probe_read(x):
    return jnp.sum(x)


@jax.jit
def _probe_reread(x):  # `a * 0` makes each pass depend on the last, so none is hoisted
    return jax.lax.fori_loop(0, 8, lambda i, a: a + jnp.sum(x + a * 0), jnp.float32(0))


@jax.jit
def _probe_products(x, kernels):
    for i in range(64):
        x = jnp.tanh(x @ kernels[i % 2])
    return x


def probe_host(rounds: int = 7) -> HostProbe:
    """Times `HostProbe`'s three workloads (medians over `rounds`, after a first call that
    compiles them once per process): about a second on a CPU."""

    def median_seconds(fn, *args) -> float:
        jax.block_until_ready(fn(*args))
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    big = jnp.ones((16 * 2**20,), jnp.float32)
    small = jnp.ones((2 * 2**20,), jnp.float32)
    kernels = jax.random.normal(jax.random.key(0), (2, 512, 512), jnp.float32) / 512**0.5
    return HostProbe(
        read_gb_s=big.nbytes / median_seconds(_probe_read, big) / 1e9,
        reread_gb_s=8 * small.nbytes / median_seconds(_probe_reread, small) / 1e9,
        product_us=median_seconds(_probe_products, jnp.ones((1, 512)), kernels) / 64 * 1e6,
    )


def cpu_ticks(path: str = "/proc/stat") -> tuple[int, int] | None:
    """(steal, total): the CPU time, in clock ticks since boot and summed over CPUs, that the
    hypervisor gave other tenants while this machine's CPUs had work, and all CPU time, from
    Linux's `/proc/stat`; None where that file or its steal column is missing."""
    try:
        with open(path) as f:
            fields = f.readline().split()
    except OSError:
        return None
    # cpu user nice system idle iowait irq softirq steal [guest guest_nice]: guest time is
    # counted in user time already.
    if len(fields) < 9 or fields[0] != "cpu" or not all(x.isdigit() for x in fields[1:9]):
        return None
    ticks = [int(x) for x in fields[1:9]]
    return ticks[7], sum(ticks)


def steal_share(start: tuple[int, int] | None, end: tuple[int, int] | None) -> float | None:
    """The share of CPU time stolen between two `cpu_ticks` readings (None without both, or
    when no tick passed)."""
    if start is None or end is None or end[1] <= start[1]:
        return None
    return (end[0] - start[0]) / (end[1] - start[1])


def check_batch_sizes(batch_sizes: Sequence[Any], num_examples: int) -> list[int]:
    sizes = []
    for b in batch_sizes:
        if isinstance(b, bool) or not isinstance(b, int | np.integer) or b < 1:
            raise InputError(f"batch size {b!r} is invalid: batch sizes are integers >= 1.")
        if b > num_examples:
            raise InputError(
                f"batch size {b} is larger than the {num_examples} inputs; pass at most "
                f"{num_examples}, or more inputs (--max-examples)."
            )
        sizes.append(int(b))
    return sizes


def run_bench(
    model: Model,
    inputs: BenchInputs,
    cases: Sequence[BenchCase],
    *,
    batch_sizes: Sequence[int] = (1, 8, 32),
    repeats: int = 1,
    progress: bool = True,
    memory_limit: int | None = None,
    memory: bool = True,
    model_name: str = "",
    probe: bool = True,
) -> BenchResult:
    """Decodes `inputs` with every case at every batch size; see the module docstring.

    Args:
      cases: the configurations; the first "full" case is every speed-up's denominator (one is
        added first when missing).
      repeats: calls per batch and case; the median is kept.
      memory_limit: bytes a decode program may take (default `available_bytes()`); a batch size
        whose largest program would take more is refused before anything is decoded.
      memory: measure the programs' peak memory (and check it against the limit); it compiles
        each program once more, ahead of time.
      probe: run `probe_host` before the first batch size and after the last, and keep both
        in `BenchResult.environment` ("host_before", "host_after"), with the share of CPU
        time stolen in between ("cpu_steal", `cpu_ticks`; None off Linux).
    """
    from tqdm.auto import tqdm

    if not inputs.sources:
        raise InputError("no inputs to benchmark.")
    sizes = check_batch_sizes(batch_sizes, len(inputs.sources))
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise InputError(f"repeats={repeats!r} is invalid: an integer >= 1.")
    cases = list(cases)
    if not any(c.method == "full" for c in cases):
        cases.insert(0, BenchCase.make("full", method="full"))
    full_case = next(c for c in cases if c.method == "full")
    longest = max(len(s) for s in inputs.sources)
    encoder_length = -(-longest // SOURCE_BUCKET) * SOURCE_BUCKET
    lengths = dict(max_new_tokens=inputs.max_new_tokens, min_new_tokens=inputs.min_new_tokens)
    limit = memory_limit if memory_limit is not None else available_bytes()
    L = model.config.num_decoder_layers

    def bytes_per_step_and_pass(case: BenchCase) -> tuple[int, int] | None:
        """Weight bytes of one loop step and of one deep pass (None: CALM, whose depth varies
        per token)."""
        if case.method == "full":
            return weight_bytes(model, 0, L), 0
        layer = case.options.get("exit_layer")
        if case.method == "static":
            return weight_bytes(model, 0, layer), 0
        if case.method == "free":
            return weight_bytes(model, 0, layer), weight_bytes(model, layer, L)
        return None

    costs = {case: bytes_per_step_and_pass(case) for case in cases}
    ticks_before = cpu_ticks() if probe else None
    host_before = probe_host() if probe else None

    rows: list[BenchRow] = []
    for B in sizes:
        batches = _batches(inputs, B)
        ids0, mask0 = batches[0]
        peaks: dict[BenchCase, int | None] = dict.fromkeys(cases)
        for case in tqdm(
            cases if memory else [], desc=f"batch {B}: memory", disable=not progress, unit="case"
        ):
            peaks[case] = program_bytes(model, ids0, mask0, encoder_length, case, **lengths)
        known = [p for p in peaks.values() if p is not None]
        if limit is not None and known and max(known) > limit:
            worst = max(peaks, key=lambda c: peaks[c] or 0)
            raise InputError(
                f"batch size {B} is too large for this machine's memory: the {worst.label!r} "
                f"decode program needs {max(known) / 2**20:.0f} MiB besides the weights, and "
                f"{limit / 2**20:.0f} MiB are available; use smaller batch sizes."
            )

        def call(case: BenchCase, ids: np.ndarray, mask: np.ndarray):
            return decode(
                model,
                ids,
                attention_mask=mask,
                encoder_length=encoder_length,
                **lengths,
                **case.options,
            )

        seen_shapes = set()
        for ids, mask in batches:  # compile every shape, untimed
            if ids.shape not in seen_shapes:
                seen_shapes.add(ids.shape)
                for case in cases:
                    call(case, ids, mask)
        seconds = dict.fromkeys(cases, 0.0)
        outputs: dict[BenchCase, list[Any]] = {c: [] for c in cases}
        bar = tqdm(batches, desc=f"batch {B}: decoding", disable=not progress, unit="batch")
        for ids, mask in bar:
            for case in cases:
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    out = call(case, ids, mask)
                    times.append(time.perf_counter() - start)
                seconds[case] += statistics.median(times)
                outputs[case].append(out)
        full_tokens = [
            o.tokens[i, : o.lengths[i]] for o in outputs[full_case] for i in range(len(o.lengths))
        ]
        for case in cases:
            outs = outputs[case]
            texts = [t for o in outs for t in (o.texts or [])]
            quality = None
            if inputs.references is not None and inputs.metric and texts:
                quality = metrics.compute(inputs.metric, texts, inputs.references)[inputs.metric]
            equals_full = None
            if case.options.get("mode") == "exact":
                mine = [o.tokens[i, : o.lengths[i]] for o in outs for i in range(len(o.lengths))]
                equals_full = all(
                    np.array_equal(a, b) for a, b in zip(mine, full_tokens, strict=True)
                )
            cost = costs[case]
            read = None
            if cost is not None:
                read = sum(o.steps * cost[0] + o.num_deep_passes * cost[1] for o in outs)
            rows.append(
                BenchRow(
                    label=case.label,
                    method=case.method,
                    batch_size=B,
                    seconds=seconds[case],
                    tokens=sum(int(o.lengths.sum()) for o in outs),
                    steps=sum(int(o.steps) for o in outs),
                    exited=sum(int(o.exited.sum()) for o in outs),
                    passes=sum(int(o.num_deep_passes) for o in outs),
                    pass_rows=sum(int(o.deep_pass_rows.sum()) for o in outs),
                    pass_positions=sum(int(o.deep_pass_tokens.sum()) for o in outs),
                    bytes_read=read,
                    peak_bytes=peaks[case],
                    quality=quality,
                    equals_full=equals_full,
                )
            )
        _compare_with_full([r for r in rows if r.batch_size == B])
    host = {}
    if host_before is not None:
        host = {
            "host_before": host_before,
            "host_after": probe_host(),
            "cpu_steal": steal_share(ticks_before, cpu_ticks()),
        }
    return BenchResult(
        model=model_name,
        inputs=inputs.description,
        num_examples=len(inputs.sources),
        metric=inputs.metric,
        repeats=repeats,
        rows=rows,
        environment={
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "device": str(jax.devices()[0].device_kind),
            "timing": "wall time of free_jax.decode per batch after a warm-up, summed over "
            "batches; median over repeats",
            **host,
        },
    )


def _compare_with_full(rows: list[BenchRow]) -> None:
    """Speed-ups, ideals (from bytes read) and quality shares against the full row."""
    full = next(r for r in rows if r.method == "full")
    for r in rows:
        r.speedup = full.seconds / r.seconds if r.seconds > 0 else float("nan")
        if r.bytes_read and full.bytes_read:
            r.ideal = full.bytes_read / r.bytes_read
        if r.quality is not None and full.quality:
            r.quality_share = r.quality / full.quality


def format_bench(result: BenchResult) -> str:
    """A Markdown table, one line per case and batch size."""
    lines = [
        f"# {result.model}: {result.inputs}, {result.num_examples} inputs, median of "
        f"{result.repeats} per batch; {result.environment['backend']} "
        f"({result.environment['device']})",
        "",
        "| batch | method | ms/token | speed-up | ideal | of ideal | exit rate | deep passes "
        "/ token | rows / pass | positions / pass | peak MiB | "
        + (f"{result.metric} | of full |" if result.metric else "== full |"),
        "|---" * (13 if result.metric else 12) + "|",
    ]
    before, after = (result.environment.get(k) for k in ("host_before", "host_after"))
    if before is not None and after is not None:
        note = f"host before: {before.describe()}; after: {after.describe()}"
        steal = result.environment.get("cpu_steal")
        if steal is not None:
            note += f"; CPU time stolen by the hypervisor during the run: {steal:.0%}"
        if after.changed(before):
            note += (
                ". The host's speed changed by more than 20% during the run: compare "
                "speed-ups within a batch size, not across batch sizes or runs"
            )
        lines[1:1] = ["", note + "."]
    for r in result.rows:
        per_pass = r.passes if r.passes else None
        cells = [
            str(r.batch_size),
            r.label,
            f"{r.ms_per_token:.2f}",
            f"{r.speedup:.2f}x",
            f"{r.ideal:.2f}x" if r.ideal else "-",
            f"{r.of_ideal:.0%}" if r.of_ideal else "-",
            f"{r.exit_rate:.1%}",
            f"{r.passes / max(r.tokens, 1):.3f}",
            f"{r.pass_rows / per_pass:.1f}" if per_pass else "-",
            f"{r.pass_positions / per_pass:.1f}" if per_pass else "-",
            f"{r.peak_bytes / 2**20:.1f}" if r.peak_bytes is not None else "-",
        ]
        if result.metric:
            cells += [
                f"{r.quality:.2f}" if r.quality is not None else "-",
                f"{r.quality_share:.2%}" if r.quality_share is not None else "-",
            ]
        else:
            cells.append({None: "-", True: "yes", False: "NO"}[r.equals_full])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_bench(result: BenchResult, path: str | Path) -> Path:
    """Speed-up over full decoding against batch size, one line per case (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    labels = list(dict.fromkeys(r.label for r in result.rows))
    for label in labels:
        mine = [r for r in result.rows if r.label == label]
        ax.plot([r.batch_size for r in mine], [r.speedup for r in mine], marker="o", label=label)
    sizes = sorted({r.batch_size for r in result.rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("batch size")
    ax.set_ylabel("speed-up over full decoding")
    ax.set_title(f"{result.model}: {result.inputs}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
