"""Synchronized parallel decoding (SPD): FREE's shallow-deep greedy loop, apart from the network.

The loop sees the model only through two callables, so its logic is tested with scripted
confidences and no weights:

* `shallow_fn(cache, tokens int32[B], active bool[B]) -> (logits [B, V], hidden [B, D],
  confidence float32[B], cache)` runs the shallow blocks `[0, L_s)` over one position per row (at
  the row's own position; inactive rows write nothing) and scores its exit.
* `deep_fn(cache, queries [B, Q, D], num_new int32[B]) -> (hidden [B, Q, D], cache)` runs the
  deep blocks `[L_s, L)` over the first `num_new[b]` of Q queued shallow states per row. With
  `row_buckets`, it is also called as `deep_fn(cache, queries [R, Q, D], num_new int32[R],
  rows int32[R])` for R < B distinct rows in ascending order (those taking part, and idle rows
  with `num_new` 0 to make up R), and must then run and update those rows of the cache only.
* `head_fn(hidden [B, ..., D]) -> logits [B, ..., V]`, the exit head after the deep blocks. It is
  separate because it is costly (a [D, V] product per position): the default mode needs it only
  at each row's current token, unless the pending tokens' agreement data are asked for.
* `truncate_fn(cache, lengths int32[B]) -> cache`, which rolls every layer back to at most
  `lengths` (exact mode only).
* optionally `prepare_fn(cache) -> cache`, run once at the start of every deep pass (T5 computes
  the deep blocks' cross-attention K/V there, on the first pass, rather than for every input).

Per step, every unfinished row runs the shallow blocks once. A row whose confidence is strictly
above the threshold *exits*: it emits the shallow argmax and queues its shallow state in a pending
buffer of capacity K, leaving the deep KV cache behind. When any row does not exit, one deep pass
serves every such row: the deep blocks run once over `[pending..., current]`, which writes the deep
KV for all of them (exactly what the full model computes, since the pending tokens ran the real
shallow blocks) and clears the buffer. Its cost follows the longest queue, not K: the pass is one of
a few static query-block sizes chosen at run time, and (with `row_buckets`) over only the rows
that take part, gathered into one of a few static row counts. With `chunk_positions`, a pass
wider than that runs as successive deep calls over windows of its slots, in order, which bounds
its temporary memory. A full buffer forces a deep pass; a capacity of T (`free_jax.decode`'s
default) never fills, as the paper's unbounded buffer.

Shallow steps run in a tight inner loop (decide, then act with masked updates), which stops at
the step that needs a deep pass; that pass is the loop's only conditional.

Modes (what the deep pass does with the pending tokens' deep predictions):

* "default" (the paper): pending tokens keep their shallow tokens; the current token emits the deep
  prediction. Only rows that need the deep model take part, so a row's output never depends on the
  other rows of its batch.
* "rollback" (the reference code's option): as "default", but a deep pass also checks the
  pending tokens of the rows taking part: at the first one whose deep prediction differs from it
  and whose deep probability falls short of the deep argmax's by more than `rollback_margin`, the
  row is rolled back: that token is replaced by the deep prediction and the rest are discarded.
  Tokens still pending when a row ends are not checked.
* "exact": pending tokens are drafts that the deep pass verifies. The first draft that differs from
  the deep prediction is replaced by it and the rest are discarded (the row and its caches roll
  back), so the output equals full-model greedy decoding for any threshold. Every unfinished row
  takes part in every deep pass (verifying early is free and exact), an EOS draft never exits, and
  the last position always goes deep, so nothing unverified is emitted.

Waiting (`max_wait > 0`, any mode): in a batch, some row needs the deep model at almost every
step when exits are not in lockstep, so the naive rule takes a deep pass nearly every step. With
`max_wait`, a row that needs the deep model holds its current shallow state and *waits* (takes no
steps) while the other rows advance; the pass runs when a waiting row has waited `max_wait` steps
or no row can advance, and then serves every waiting row at once. Waiting changes when passes
happen, never what a row emits. Two ways to wait (`wait_mode`):

* "hold": the row stalls: it holds its current token and takes no steps until the pass.
* "draft": the row does not stall. It emits its shallow argmax as a *draft*, queues the state
  flagged for verification, and keeps decoding from the draft; the pass (at the latest `max_wait`
  steps after the row's oldest draft) verifies the drafts like exact mode does: the first one the
  deep prediction disagrees with is replaced by it and everything after is discarded. Since the deep
  prediction of a draft's position depends only on the accepted prefix, the output is the same as
  without waiting; the buffer rule ("K exits in a row force the next token deep") counts exits
  since the row's last deep-decided token, as without waiting, and the buffer itself holds up to
  K + max_wait + 1 states. A row taking part in a pass only to verify keeps its current decision
  (an exit stays an exit, now flushed), and a row never finishes with an unverified draft. Not
  with "rollback", whose output depends on which pending tokens passes see.

Every deep pass also yields calibration data for the threshold estimator: for each token it saw,
whether the shallow and deep argmaxes agree, next to the token's shallow confidence.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from free_jax.decoding.search import eos_ban, greedy_token, suppress_eos
from free_jax.models.inplace import run_if

Array = jax.Array
MODES = ("default", "exact", "rollback")
WAIT_MODES = ("hold", "draft")

ShallowFn = Callable[[Any, Array, Array], tuple[Array, Array, Array, Any]]
DeepFn = Callable[[Any, Array, Array], tuple[Array, Any]]
HeadFn = Callable[[Array], Array]
TruncateFn = Callable[[Any, Array], Any]


@flax.struct.dataclass
class SpdState:
    """Loop carry of `spd_search`. Shapes: B rows, T = max_new_tokens, K = buffer capacity,
    D = hidden width, P = most deep passes the loop can take.

    Attributes:
      step: int32[] loop iterations so far.
      position: int32[B] tokens emitted and kept; the position of the row's next input token.
      last_token: int32[B] the row's next input token.
      pending_hidden: [B, S, D] shallow states of the row's exited tokens, oldest first, in
        `_Loop.query_slots` S >= K + 1 slots: a default-mode pass writes its rows' current
        states after them and reads the buffers as its queries.
      pending_count: int32[B] how many of them are real; the deep cache lags by this much.
      pending_draft: bool[B, K] the pending token is an unverified draft ("draft" waiting).
      free_run: int32[B] exits since the row's last deep-decided token ("draft" waiting: the
        count the buffer rule applies to; otherwise it equals `pending_count`).
      tokens: int32[B, T] emitted tokens, padding beyond `position`.
      exited: bool[B, T] the token was emitted from the shallow exit.
      confidence: float32[B, T] the shallow confidence that decided each token.
      agree: int8[B, T] 1 / 0 when a deep pass saw the token and the shallow argmax agreed / did
        not agree with the deep one; -1 when no deep pass saw it (or, without
        `record_agreement`, when it was a pending token).
      done: bool[B] the row emitted EOS or filled T tokens (monotonic).
      waiting: bool[B] the row needs the deep model and holds its current token for a pass
        ("hold" waiting).
      waited: int32[B] steps the row has waited ("hold") or has had drafts ("draft").
      held_hidden: [B, D] a waiting row's current shallow state. held_token: int32[B] its
        shallow argmax.
      num_deep_passes: int32[] deep passes taken.
      pass_tokens: int32[P] positions each deep pass processed, summed over rows.
      pass_width: int32[P] the longest row's positions in each pass (what sets its query block).
      pass_rows: int32[P] rows taking part in each pass.
      cache: the callables' state (for T5, a `DecoderCache`).
    """

    step: Array
    position: Array
    last_token: Array
    pending_hidden: Array
    pending_count: Array
    pending_draft: Array
    free_run: Array
    tokens: Array
    exited: Array
    confidence: Array
    agree: Array
    done: Array
    waiting: Array
    waited: Array
    held_hidden: Array
    held_token: Array
    num_deep_passes: Array
    pass_tokens: Array
    pass_width: Array
    pass_rows: Array
    cache: Any


@flax.struct.dataclass
class SpdResult:
    """Output of `spd_search` (see `SpdState` for the fields; `cache` is None where a caller
    dropped it, as `free_jax.decoding.free_decode` does unless asked to keep it)."""

    tokens: Array
    lengths: Array
    exited: Array
    confidence: Array
    agree: Array
    steps: Array
    num_deep_passes: Array
    pass_tokens: Array
    pass_width: Array
    pass_rows: Array
    cache: Any


@flax.struct.dataclass
class _Decision:
    """One step's shallow outcome, between deciding it and acting on it (see `spd_search`).

    Attributes:
      hidden: [B, D] each row's current shallow state (a waiting row's held one).
      shallow_token: int32[B] its shallow argmax (a waiting row's held token).
      exits: bool[B] the row exits at this step.
      needs_deep: bool[B] the row is active and does not exit.
      has_drafts: bool[B] the row has unverified drafts ("draft" waiting).
      waited: int32[B] the row's wait count after this step.
      go: bool[] a deep pass is due at this step.
    """

    hidden: Array
    shallow_token: Array
    exits: Array
    needs_deep: Array
    has_drafts: Array
    waited: Array
    go: Array

    @classmethod
    def empty(cls, batch: int, hidden: int, dtype: Any) -> _Decision:
        no = jnp.zeros((batch,), bool)
        return cls(
            hidden=jnp.zeros((batch, hidden), dtype),
            shallow_token=jnp.zeros((batch,), jnp.int32),
            exits=no,
            needs_deep=no,
            has_drafts=no,
            waited=jnp.zeros((batch,), jnp.int32),
            go=jnp.zeros((), bool),
        )


def query_buckets(capacity: int) -> tuple[int, ...]:
    """Static deep-pass sizes for a buffer of `capacity`: powers of two, then capacity + 1."""
    sizes, q = [], 1
    while q < capacity + 1:
        sizes.append(q)
        q *= 2
    sizes.append(capacity + 1)
    return tuple(sizes)


def row_buckets(batch: int) -> tuple[int, ...]:
    """Static row counts of a deep pass at batch size `batch`: 2, 8, 32, ... below the batch,
    then the batch. A pass gathers the rows taking part (padded with idle rows to the smallest
    count that holds them), so its cost follows them, not the batch: at the demo's threshold
    1.1-2.2 rows take part in a pass at batch 8-32. Few counts, because each (rows, query size)
    pair is one more compiled copy of the deep blocks. No single-row pass: XLA turns its
    one-row cache write into a dynamic-update-slice that copies the whole deep cache (demo,
    batch 8: FREE at 0.61-0.63x of full decoding with a 1-row pass, 1.09-1.18x with 2 rows,
    0.79-0.84x without gathering)."""
    sizes, r = [], 2
    while r < batch:
        sizes.append(r)
        r *= 4
    return (*sizes, batch)


def drafts(max_wait: int, wait_mode: str) -> bool:
    """Rows needing the deep model go on from shallow drafts ("draft" waiting, `max_wait > 0`)."""
    return wait_mode == "draft" and max_wait > 0


def head_at_every_position(mode: str, record_agreement: bool, drafting: bool) -> bool:
    """A deep pass runs the deep exit head at every position it sees (to verify or roll back
    pending tokens, check drafts, or record their agreement), not only at each row's current
    token."""
    return mode in ("exact", "rollback") or drafting or record_agreement


def chunk_positions(batch: int, every_position: bool = False) -> int:
    """Most query positions (rows x query size) one deep call runs at batch size `batch`, where
    a pass needs the deep head at `every_position` (exact and rollback modes, drafts, agreement
    data) or only at the current token: for the latter 8 at batch 1 and 32 above (a pass over
    the smallest row count, 2, then takes up to 16 positions per row in one call), else 16. A
    wider pass runs in windows (`spd_search`'s `chunk_positions`), which bounds its temporaries.

    Demo model, XLA's temporary and output bytes over full decoding's: one call over a whole
    pass (64 buffer slots) 1.50x at batch 1 and 1.49x at 8 and 32; in windows of 16 positions
    (and each layer's rows gathered in turn, see `t5.decoder_blocks`) 1.07x at batch 8 and 32.
    At batch 1 the demo's caches are so small (1 MiB) that a window of 16 takes 1.16x (8:
    1.10x; 4 or fewer: 1.07x, the pending buffer and the pass's queries); since the default
    mode's passes read the buffers in place (`_Loop.deep`), 1.13x (8: 1.07x; 4: 1.04x).
    Windows of 8 cost exact mode at batch 1 a tenth of its speed-up (whole test split,
    1.71-1.77x -> 1.54x: its passes span 17 positions on average), the default mode little:
    whole test split, three interleaved rounds, FREE at 2.27x with windows of 8 and 2.39x with
    16 (a round's difference ranged from -13% to +6%), because its passes span 10 positions on
    average. A window of 2 to 16 positions costs about the same on a CPU (demo, 7 deep blocks
    in a loop: 1 position 0.6-1.0 ms, 2 to 16 positions 2.8-3.9 ms, 32 4.0 ms): XLA's CPU
    matrix products with more than one row go to Eigen, which packs the weights at every call.

    In the default mode above batch 1, passes take 1.1-1.4 rows over 12-15 positions: windows
    of 32 run most of them in one call of 2 rows x 16 (16: two calls of 2 x 8), for 1.068x ->
    1.080x of full decoding's memory at batch 8 (1.034x -> 1.040x with the in-place reads);
    demo, 512 test sentences at batch 8, decode only, medians of 7 interleaved rounds: 1.93x
    -> 2.02x."""
    if every_position:
        return 16
    return 8 if batch == 1 else 32


def buffer_size(capacity: int, max_wait: int = 0, wait_mode: str = "hold") -> int:
    """Pending states a row's buffer holds: K, plus room for drafts and the exits after them
    with "draft" waiting."""
    return capacity + max_wait + 1 if drafts(max_wait, wait_mode) else capacity


def max_loop_steps(max_new_tokens: int, capacity: int, mode: str, max_wait: int = 0) -> int:
    """An upper bound on loop iterations. Default mode emits one token per row per step, but for
    waits of at most `max_wait` steps; with verification each deep pass keeps at least one new
    token, and passes come at least every K + 1 steps."""
    steps = max_new_tokens * (max_wait + 1)
    return steps if mode == "default" else steps * (capacity + 1)


def _take(x: Array, index: Array) -> Array:
    """x[b, index[b, j]] for x [B, T] and index [B, J] (clipped into range)."""
    return jnp.take_along_axis(x, jnp.clip(index, 0, x.shape[1] - 1), axis=1)


def _put(x: Array, index: Array, values: Array, where: Array) -> Array:
    """x[b, index[b, j], ...] = values[b, j, ...] where `where[b, j]`; other entries untouched."""
    B, J = index.shape
    target = jnp.where(where, index, x.shape[1])  # out of range: dropped
    rows = jnp.broadcast_to(jnp.arange(B)[:, None], (B, J))
    return x.at[rows, target].set(values.astype(x.dtype), mode="drop")


def spd_search(
    shallow_fn: ShallowFn,
    deep_fn: DeepFn,
    head_fn: HeadFn,
    truncate_fn: TruncateFn,
    cache: Any,
    threshold: Array,
    *,
    batch_size: int,
    hidden_size: int,
    hidden_dtype: Any,
    max_new_tokens: int,
    buffer_capacity: int,
    start_id: int,
    eos_id: int,
    pad_id: int,
    mode: str = "default",
    min_new_tokens: int = 0,
    buckets: Sequence[int] | None = None,
    record_agreement: bool = False,
    rollback_margin: float = 0.0,
    max_wait: int = 0,
    wait_mode: str = "hold",
    prepare_fn: Callable[[Any], Any] | None = None,
    row_buckets: Sequence[int] | None = None,
    chunk_positions: int | None = None,
) -> SpdResult:
    """FREE's synchronized parallel greedy decoding in one `lax.while_loop`.

    Args:
      shallow_fn, deep_fn, head_fn, truncate_fn: the model, see the module docstring.
      cache: their initial state.
      threshold: float32[] (traced: a new value does not recompile); a token exits when its
        confidence is strictly greater.
      batch_size, hidden_size, hidden_dtype: B, D and the dtype of the shallow states.
      max_new_tokens: T. buffer_capacity: K >= 1; K >= T means no bound (no pass is forced).
      start_id, eos_id, pad_id: decoder start, end and padding ids.
      mode: "default" or "exact" (see the module docstring).
      min_new_tokens: EOS is suppressed at positions below this.
      buckets: deep-pass query sizes (default: `query_buckets` up to the widest possible pass,
        min(K, T - 1) + 1); the last must be at least that. With `chunk_positions`, passes use
        the smallest and the window (`_Loop.query_sizes`).
      record_agreement: in default mode, also run the deep exit head on pending tokens to record
        their shallow/deep agreement (the threshold estimator's data). The other modes always do.
      rollback_margin: "rollback" mode's bound, in [0, 1]: a disagreeing pending token is rolled
        back when p_deep(deep argmax) - p_deep(token) exceeds it.
      max_wait: steps a row needing the deep model may wait for others (0: never; see the module
        docstring).
      wait_mode: "hold" or "draft", how a row waits (see the module docstring).
      prepare_fn: run on the cache before each deep pass (see the module docstring).
      row_buckets: static row counts a deep pass may run at (rising, the last `batch_size`);
        default `(batch_size,)`: every pass runs all rows (see `row_buckets`).
      chunk_positions: most query positions (rows x query size) one deep call runs; a wider
        pass runs as successive calls over windows of its slots. It bounds a pass's temporary
        memory (default None: no bound, one call per pass).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; valid: {MODES}.")
    if wait_mode not in WAIT_MODES:
        raise ValueError(f"wait_mode={wait_mode!r}; valid: {WAIT_MODES}.")
    if wait_mode == "draft" and mode == "rollback":
        # Rollback checks whatever pending tokens a pass sees, so its output depends on pass
        # timing, which drafting changes; "hold" keeps it.
        raise ValueError("wait_mode='draft' works with modes 'default' and 'exact' only.")
    T = max_new_tokens
    # Drafts and the exits after them share the buffer with the exits before them. Pending
    # tokens are emitted ones, so a row that still runs (position < T) holds at most T - 1 of
    # them: a larger capacity means no bound at all, and the buffer is not made larger than
    # that (T - 1 slots, so that a pass's queries, those and the current one, fill T slots:
    # on the demo model at batch 1 a 64-slot buffer made the queries 72 slots, whole windows
    # of 8, and FREE's memory 1.102x of full decoding's; with 63, 1.098x).
    K = min(buffer_size(buffer_capacity, max_wait, wait_mode), max(T - 1, 1))
    # A pass covers the pending tokens (none when T = 1) and the current one.
    widest = min(K, T - 1) + 1
    buckets = tuple(buckets or query_buckets(widest - 1))
    if buckets[-1] < widest:
        raise ValueError(f"the largest deep-pass size {buckets[-1]} is below {widest}.")
    rows = tuple(row_buckets or (batch_size,))
    if rows[0] < 1 or rows[-1] != batch_size or list(rows) != sorted(set(rows)):
        raise ValueError(f"row_buckets={rows} must rise from >= 1 to the batch, {batch_size}.")
    if chunk_positions is not None and chunk_positions < 1:
        raise ValueError(f"chunk_positions={chunk_positions} must be >= 1 (or None).")
    loop = _Loop(
        shallow_fn=shallow_fn,
        deep_fn=deep_fn,
        head_fn=head_fn,
        truncate_fn=truncate_fn,
        prepare_fn=prepare_fn,
        threshold=jnp.asarray(threshold, jnp.float32),
        B=batch_size,
        T=T,
        D=hidden_size,
        K=K,
        K_rule=buffer_capacity,
        hidden_dtype=hidden_dtype,
        buckets=buckets,
        row_buckets=rows,
        chunk_positions=chunk_positions,
        max_steps=max_loop_steps(T, K, mode, max_wait),
        start_id=start_id,
        eos_id=eos_id,
        pad_id=pad_id,
        min_new_tokens=min_new_tokens,
        mode=mode,
        record_agreement=record_agreement,
        rollback_margin=rollback_margin,
        max_wait=max_wait,
        drafting=drafts(max_wait, wait_mode),
    )
    final = jax.lax.while_loop(loop.running, loop.body, loop.initial_state(cache))
    return SpdResult(
        tokens=final.tokens,
        lengths=final.position,
        exited=final.exited,
        confidence=final.confidence,
        agree=final.agree,
        steps=final.step,
        num_deep_passes=final.num_deep_passes,
        pass_tokens=final.pass_tokens,
        pass_width=final.pass_width,
        pass_rows=final.pass_rows,
        cache=final.cache,
    )


@dataclasses.dataclass(frozen=True)
class _Loop:
    """The SPD loop's fixed parts (the model callables, static sizes and rules) and its steps.

    The skeleton: `body` runs `shallow_steps` (`decide`, then `wait`, while no deep pass is
    due), then `deep` at the step that needs one. A deep pass builds its `pass_queries`, runs at
    the smallest fitting size (`run_deep`), and then either `flush`es (default mode) or
    `verify`s (exact, rollback, draft waiting). `push` and `emit` are the buffer's and the
    output's masked updates. Sizes: B rows, T output positions, D hidden, K buffer slots;
    `K_rule` is the exits-in-a-row limit (the caller's buffer capacity).
    """

    shallow_fn: ShallowFn
    deep_fn: DeepFn
    head_fn: HeadFn
    truncate_fn: TruncateFn
    prepare_fn: Callable[[Any], Any] | None
    threshold: Array  # float32[]
    B: int
    T: int
    D: int
    K: int
    K_rule: int
    hidden_dtype: Any
    buckets: tuple[int, ...]
    row_buckets: tuple[int, ...]
    chunk_positions: int | None
    max_steps: int
    start_id: int
    eos_id: int
    pad_id: int
    min_new_tokens: int
    mode: str
    record_agreement: bool
    rollback_margin: float
    max_wait: int
    drafting: bool

    @property
    def exact(self) -> bool:
        return self.mode == "exact"

    @property
    def verifies(self) -> bool:
        """Deep passes check pending tokens (exact, rollback, draft waiting)."""
        return self.mode in ("exact", "rollback") or self.drafting

    @property
    def every_position(self) -> bool:
        """Deep passes run the exit head at every position (see `head_at_every_position`)."""
        return head_at_every_position(self.mode, self.record_agreement, self.drafting)

    @property
    def slots(self) -> Array:
        return jnp.arange(self.K + 1, dtype=jnp.int32)  # [K+1] pending slots, then the current

    def initial_state(self, cache: Any) -> SpdState:
        B, T, K, D = self.B, self.T, self.K, self.D
        return SpdState(
            step=jnp.zeros((), jnp.int32),
            position=jnp.zeros((B,), jnp.int32),
            last_token=jnp.full((B,), self.start_id, jnp.int32),
            pending_hidden=jnp.zeros((B, self.query_slots, D), self.hidden_dtype),
            pending_count=jnp.zeros((B,), jnp.int32),
            pending_draft=jnp.zeros((B, K), bool),
            free_run=jnp.zeros((B,), jnp.int32),
            tokens=jnp.full((B, T), self.pad_id, jnp.int32),
            exited=jnp.zeros((B, T), bool),
            confidence=jnp.zeros((B, T), jnp.float32),
            agree=jnp.full((B, T), -1, jnp.int8),
            done=jnp.zeros((B,), bool),
            waiting=jnp.zeros((B,), bool),
            waited=jnp.zeros((B,), jnp.int32),
            held_hidden=jnp.zeros((B, D), self.hidden_dtype),
            held_token=jnp.zeros((B,), jnp.int32),
            num_deep_passes=jnp.zeros((), jnp.int32),
            pass_tokens=jnp.zeros((self.max_steps,), jnp.int32),
            pass_width=jnp.zeros((self.max_steps,), jnp.int32),
            pass_rows=jnp.zeros((self.max_steps,), jnp.int32),
            cache=cache,
        )

    # ------------------------------------------------------------------------ loop skeleton

    def running(self, s: SpdState) -> Array:
        return (s.step < self.max_steps) & ~jnp.all(s.done)

    def body(self, s: SpdState) -> SpdState:
        s, d = self.shallow_steps(s)
        return run_if(d.go, lambda s: self.deep(s, d), s)

    def shallow_steps(self, s: SpdState) -> tuple[SpdState, _Decision]:
        """Steps while no deep pass is due, in one tight loop (no conditionals per step); stops
        at the step that needs one, with its decision, or when decoding is over."""

        def body(c):
            s, d = self.decide(c[0])
            return self.wait(s, d, ~d.go), d

        empty = _Decision.empty(self.B, self.D, self.hidden_dtype)
        return jax.lax.while_loop(lambda c: self.running(c[0]) & ~c[1].go, body, (s, empty))

    # ------------------------------------------------------------------------ shallow step

    def decide(self, s: SpdState) -> tuple[SpdState, _Decision]:
        """Runs the shallow blocks for every stepping row and decides the step: who exits, and
        whether a deep pass is due (`go`). Records the confidences and the shallow cache."""
        T, K = self.T, self.K
        active = ~s.done
        stepping = active & ~s.waiting  # waiting rows hold their token and take no step
        logits, hidden, conf, cache = self.shallow_fn(s.cache, s.last_token, stepping)
        shallow_token = greedy_token(logits, self._eos_ban(s.position))  # [B]
        run_length = s.free_run if self.drafting else s.pending_count
        exits = (conf > self.threshold) & (run_length < self.K_rule) & stepping
        if self.exact:  # never leave an unverified EOS or last token behind
            exits &= (shallow_token != self.eos_id) & (s.position < T - 1)
        hidden = jnp.where(s.waiting[:, None], s.held_hidden, hidden.astype(self.hidden_dtype))
        shallow_token = jnp.where(s.waiting, s.held_token, shallow_token)
        needs_deep = active & ~exits
        # The decision is recorded at the current position whatever follows.
        here = s.position[:, None]  # [B, 1]
        confidence = _put(s.confidence, here, conf[:, None], stepping[:, None])
        s = s.replace(cache=cache, confidence=confidence)
        has_drafts = jnp.zeros_like(exits)
        if self.drafting:
            has_drafts = jnp.any(s.pending_draft, axis=1) & active
            waited = jnp.where(has_drafts, s.waited + 1, 0)
            finishing = (shallow_token == self.eos_id) | (s.position >= T - 1)
            room = s.pending_count < K
            can_draft = room & ~finishing
            # A pass is due when a draft is old enough, a deep-decided token cannot be drafted,
            # or a row with drafts would finish or overflow with them unverified.
            go = (
                jnp.any(has_drafts & (waited >= self.max_wait))
                | jnp.any(needs_deep & ~can_draft)
                | jnp.any(has_drafts & exits & (finishing | ~room))
            )
        elif self.max_wait > 0:
            waited = jnp.where(s.waiting, s.waited + 1, 0)
            stuck = ~jnp.any(exits)  # no row can advance without the deep model
            go = stuck | jnp.any(needs_deep & (waited >= self.max_wait))
        else:
            waited = s.waited
            go = jnp.any(needs_deep)
        decision = _Decision(
            hidden=hidden,
            shallow_token=shallow_token,
            exits=exits,
            needs_deep=needs_deep,
            has_drafts=has_drafts,
            waited=waited,
            go=go,
        )
        return s, decision

    def wait(self, s: SpdState, d: _Decision, enabled: Array) -> SpdState:
        """A step without a deep pass: exiting rows emit their shallow tokens; with waiting,
        the others wait or draft. Changes nothing unless `enabled` (a scalar)."""
        active = ~s.done & enabled
        if self.drafting:
            t = self.push(s, d.hidden, active, draft=d.needs_deep)
            t = self.emit(t, d.shallow_token, active, exited=d.exits)
            free_run = jnp.where(d.exits, s.free_run + 1, jnp.where(active, 0, s.free_run))
            return t.replace(
                waited=jnp.where(enabled, d.waited, s.waited),
                free_run=jnp.where(enabled, free_run, s.free_run),
                step=t.step + enabled.astype(jnp.int32),
            )
        exits = d.exits & enabled
        t = self.push(s, d.hidden, exits)
        t = self.emit(t, d.shallow_token, exits, exited=jnp.ones_like(exits))
        t = t.replace(step=t.step + enabled.astype(jnp.int32))
        if self.max_wait == 0:
            return t
        holds = d.needs_deep & enabled
        return t.replace(
            waiting=jnp.where(enabled, d.needs_deep, s.waiting),
            waited=jnp.where(enabled, d.waited, s.waited),
            held_hidden=jnp.where(holds[:, None], d.hidden, s.held_hidden),
            held_token=jnp.where(holds, d.shallow_token, s.held_token),
        )

    # ------------------------------------------------------------------------ buffer, output

    def emit(self, s: SpdState, token: Array, where: Array, exited: Array) -> SpdState:
        """Emits `token` at each row's position where `where`; advances those rows."""
        here = s.position[:, None]
        done = s.done | (where & ((token == self.eos_id) | (s.position + 1 >= self.T)))
        return s.replace(
            tokens=_put(s.tokens, here, token[:, None], where[:, None]),
            exited=_put(s.exited, here, exited[:, None], where[:, None]),
            position=s.position + where.astype(jnp.int32),
            last_token=jnp.where(where, token, s.last_token),
            done=done,
        )

    def push(self, s: SpdState, hidden: Array, where: Array, draft: Array | None = None):
        """Queues the current shallow state of rows `where` in their pending buffers (flagged
        as unverified drafts where `draft`)."""
        slot = s.pending_count[:, None]  # [B, 1]
        flags = s.pending_draft
        if draft is not None:
            flags = _put(flags, slot, draft[:, None], where[:, None])
        return s.replace(
            pending_hidden=self.queued(s, hidden, where),
            pending_count=s.pending_count + where.astype(jnp.int32),
            pending_draft=flags,
        )

    def queued(self, s: SpdState, hidden: Array, where: Array) -> Array:
        """The pending buffers with the current shallow state of rows `where` at their next
        slot (the counts unchanged)."""
        # A scatter of one state per row, not a select over the whole [B, K, D] buffer, which
        # rewrote all of it at every step.
        return _put(s.pending_hidden, s.pending_count[:, None], hidden[:, None, :], where[:, None])

    # ------------------------------------------------------------------------ deep pass

    def deep(self, s: SpdState, d: _Decision) -> SpdState:
        """A step with a deep pass over the rows that take part."""
        active = ~s.done
        takes_part = active if self.exact else d.needs_deep | d.has_drafts  # [B]
        count = s.pending_count
        num_new = jnp.where(takes_part, count + 1, 0)  # [B]
        if not self.verifies:
            # Every row queues its current state now: the rows in the pass, whose buffers are
            # then their queries as they stand and are flushed after it, and the rows outside it
            # that exit (`flush` counts those). Writing before the pass reads, in place, spares
            # a copy of the buffers as queries, and two more for the pass that a write after
            # the read made XLA take (demo model, decode program's peak memory over full
            # decoding's: batch 1 1.098x -> 1.068x, 8 1.070x -> 1.040x, 32 1.063x -> 1.033x).
            s = s.replace(pending_hidden=self.queued(s, d.hidden, d.exits | takes_part))
        queries, positions, drafts = self.pass_queries(s, d)
        deep_tokens, margin, cache, width = self.run_deep(s, queries, positions, drafts, num_new)
        seen = self.slots[None, :] < num_new[:, None]  # [B, K+1]
        if not self.every_position:
            seen &= self.slots[None, :] == count[:, None]
        agree = _put(s.agree, positions, (drafts == deep_tokens).astype(jnp.int8), seen)
        s = s.replace(
            cache=cache,
            agree=agree,
            num_deep_passes=s.num_deep_passes + 1,
            pass_tokens=s.pass_tokens.at[s.num_deep_passes].set(jnp.sum(num_new)),
            pass_width=s.pass_width.at[s.num_deep_passes].set(width),
            pass_rows=s.pass_rows.at[s.num_deep_passes].set(jnp.sum(takes_part, dtype=jnp.int32)),
        )
        if self.verifies:
            s = self.verify(s, d, takes_part, deep_tokens, margin, drafts, first=positions[:, 0])
        else:
            current_deep = jnp.take_along_axis(deep_tokens, count[:, None], axis=1)[:, 0]
            s = self.flush(s, d, takes_part, current_deep)
        s = s.replace(waited=jnp.zeros_like(d.waited))
        return s if self.drafting else s.replace(waiting=jnp.zeros_like(s.waiting))

    def pass_queries(self, s: SpdState, d: _Decision) -> tuple[Array, Array, Array]:
        """The pass's queries [B, S, D] (pending states, then the current one at slot `count`,
        then padding to `query_slots`), their positions int32[B, K+1] and shallow tokens
        int32[B, K+1] (emitted pending tokens, then the current shallow argmax). In default
        mode the buffers hold the current states already (`deep`) and are the queries."""
        count = s.pending_count
        at_count = jnp.arange(self.query_slots)[None, :] == count[:, None]  # [B, S]
        queries = s.pending_hidden
        if self.verifies:
            current = d.hidden[:, None, :].astype(self.hidden_dtype)
            queries = jnp.where(at_count[..., None], current, queries)
        first = s.position - count  # [B] position of the first pending token
        positions = first[:, None] + self.slots[None, :]
        drafts = jnp.where(
            at_count[:, : self.K + 1], d.shallow_token[:, None], _take(s.tokens, positions)
        )
        return queries, positions, drafts

    @property
    def query_slots(self) -> int:
        """S, the slots of a pass's queries: K pending states and the current one, rounded up
        to whole windows where a pass may run in windows (see `run_deep`)."""
        slots = self.K + 1
        for r in self.row_buckets:
            q = self.query_sizes(r)[-1]
            if q < self.buckets[-1]:
                slots = max(slots, -(-(self.K + 1) // q) * q)
        return slots

    def run_deep(self, s, queries, positions, drafts, num_new):
        """Runs the deep blocks over the rows taking part (`num_new > 0`), at the smallest
        static row count (`row_buckets`) and query size (`buckets`) that hold them: fewer rows
        than the batch are gathered (those taking part, made up with idle ones, in ascending
        order), and only their results are put back. In-place conditionals, one per row count
        with one per query size inside it: a `lax.switch` would copy the caches. A pass wider
        than a row count's largest query size (`chunk_positions`) runs as successive deep calls
        over consecutive slot windows, in order, so each window attends to the K/V the earlier
        ones wrote, as one wide call would.

        Returns (deep tokens int32[B, K+1] (padding where not computed), rollback margins
        float32[B, K+1], the cache, the pass width)."""
        B, K = self.B, self.K
        count = s.pending_count
        no_margin = jnp.zeros((B, K + 1), jnp.float32)
        no_tokens = jnp.full((B, K + 1), self.pad_id, jnp.int32)
        taking_part = num_new > 0
        order = jnp.argsort(~taking_part, stable=True).astype(jnp.int32)
        width = jnp.max(num_new)

        def run(r: int, q: int, cache, windowed: bool):
            rows = None if r == B else jnp.sort(order[:r])  # ascending: cache writes stay sorted

            def pick(x):  # [B, ...] -> the pass's rows
                return x if rows is None else x[rows]

            def put(into, part):  # the pass's rows -> [B, ...]
                return part if rows is None else into.at[rows].set(part, unique_indices=True)

            # Slots in whole windows: the last window of a windowed pass may overhang (the
            # queries have room for it, `query_slots`).
            span = -(-(K + 1) // q) * q if windowed else K + 1
            pass_queries = pick(queries)  # [r, S, D]
            pass_positions = jnp.pad(pick(positions), ((0, 0), (0, span - (K + 1))))
            pass_new, pass_count = pick(num_new), pick(count)

            def window(j, carry):  # deep blocks over slots [j q, (j + 1) q)
                cache, tokens, margin, current = carry
                start = j * q
                block = jax.lax.dynamic_slice_in_dim(pass_queries, start, q, axis=1)
                new = jnp.clip(pass_new - start, 0, q)
                args = (block, new) if rows is None else (block, new, rows)
                hidden, cache = self.deep_fn(cache, *args)  # [r, q, D]
                if self.every_position:
                    at = jax.lax.dynamic_slice_in_dim(pass_positions, start, q, axis=1)
                    logits = self.head_fn(hidden)
                    tokens = jax.lax.dynamic_update_slice_in_dim(
                        tokens, greedy_token(logits, self._eos_ban(at)), start, axis=1
                    )
                    if self.mode == "rollback":  # p_deep(argmax) - p_deep(draft), per slot
                        logits = self._suppress_eos(logits, at)
                        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
                        drafted = jax.lax.dynamic_slice_in_dim(pick(drafts), start, q, axis=1)
                        drafted = jnp.take_along_axis(probs, drafted[..., None], axis=-1)
                        gap = jnp.max(probs, axis=-1) - drafted[..., 0]
                        margin = jax.lax.dynamic_update_slice_in_dim(margin, gap, start, axis=1)
                else:  # only the current token's deep state is used
                    local = pass_count - start
                    inside = (local >= 0) & (local < q)
                    at = jnp.clip(local, 0, q - 1)[:, None, None]
                    here = jnp.take_along_axis(hidden, at, axis=1)[:, 0]  # [r, D]
                    current = jnp.where(inside[:, None], here, current)
                return cache, tokens, margin, current

            carry = (
                cache,
                jnp.full((r, span), self.pad_id, jnp.int32),
                jnp.zeros((r, span), jnp.float32),
                jnp.zeros((r, self.D), queries.dtype),
            )
            if windowed:  # windows up to the widest row's last slot
                carry = jax.lax.fori_loop(0, (width + q - 1) // q, window, carry)
            else:
                carry = window(0, carry)
            cache, tokens, margin, current = carry
            if self.every_position:
                tokens = put(no_tokens, tokens[:, : K + 1])
                if self.mode == "rollback":
                    return tokens, put(no_margin, margin[:, : K + 1]), cache
                return tokens, no_margin, cache
            # One head row per row: the current token's.
            logits = self.head_fn(current)
            token = greedy_token(logits, self._eos_ban(pick(s.position)))
            token = put(jnp.zeros((B,), jnp.int32), token)
            tokens = jnp.where(self.slots[None, :] == count[:, None], token[:, None], self.pad_id)
            return tokens, no_margin, cache

        num_rows = jnp.sum(taking_part, dtype=jnp.int32)
        rows_bucket = jnp.searchsorted(
            jnp.asarray(self.row_buckets, jnp.int32), num_rows, side="left"
        )
        cache = s.cache if self.prepare_fn is None else self.prepare_fn(s.cache)
        out = (no_tokens, no_margin, cache)

        # A conditional per row count, and in it one per query size: one flat chain of
        # (rows x sizes) conditionals made XLA keep another copy of the caches (temporary
        # memory 16.3 -> 32.9 MiB at batch 8 on the demo model; nested: 19.7 MiB).
        def sized(c, r: int):
            sizes = self.query_sizes(r)
            bucket = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), width, side="left")
            bucket = jnp.minimum(bucket, len(sizes) - 1)  # wider: the largest, in windows
            for j, q in enumerate(sizes):
                windowed = q == sizes[-1] and q < self.buckets[-1]
                c = run_if(bucket == j, lambda c, q=q, w=windowed: run(r, q, c[2], w), c)
            return c

        for i, r in enumerate(self.row_buckets):
            out = run_if(rows_bucket == i, lambda c, r=r: sized(c, r), out)
        return (*out, width)

    def query_sizes(self, rows: int) -> tuple[int, ...]:
        """The query sizes of a pass over `rows` rows: `buckets`, or with `chunk_positions` the
        smallest bucket and the window, the largest size at which one deep call runs at most
        `chunk_positions` positions (at least one per row).

        Sizes between the two would save little and cost much: each is one more compiled copy
        of the deep blocks, while a call over 2 to 16 positions costs about the same as one
        over the window on a CPU (`chunk_positions`), and on an accelerator, where reading the
        weights dominates a call this small, too. Demo model, XLA's default optimisation level,
        time to trace and compile the default-mode loop with every power of two up to the
        window, then with 1 and the window alone: 14 s -> 10 s at batch 1, 27 s -> 15.5 s at 8,
        31 s -> 20 s at 32 (exact mode 17 -> 11 s, 22 -> 17 s, 29 -> 22.5 s); decoding 100 test
        sentences at batch 1 and 256 at batch 8 took as long, to within the host's noise (new
        over old time, medians of 5 interleaved rounds: 0.98 and 1.00 at batch 1 in default
        and exact modes, 0.96 and 1.03 at batch 8; 256 at batch 32, 3 rounds: 1.01 and 1.02),
        with the same tokens.

        One position stays a size for several rows too, although over 2 rows or more it is a
        matrix product like the window's: in a model of real size a CPU call's time follows its
        positions (the products are compute-bound), and a pass of one position per row run at
        the window would do 4 to 16 times the arithmetic it needs (batch 8). t5-base shape,
        random weights, batch 8, 16 sources, 32 new tokens, 54% exits (where such passes are
        common), three interleaved rounds: the window alone for 2 rows or more took 1.33x,
        1.42x and 1.32x the time of these two sizes' (every power of two up to the window:
        1.04x, 1.04x, 1.34x; at 70% exits, 32 sources: 1.06x, 0.96x, 1.31x). On the demo
        model the window alone changed nothing measurable and cut compile time by a third at
        batch 8 and 32."""
        if self.chunk_positions is None:
            return self.buckets
        cap = 1
        while cap * 2 * rows <= self.chunk_positions:
            cap *= 2
        window = min(self.buckets[-1], cap)
        return tuple(sorted({min(self.buckets[0], window), window}))

    def flush(self, s: SpdState, d: _Decision, takes_part: Array, current_deep: Array):
        """Default mode: rows in the pass flush their buffer and emit the deep token; the
        others exit (their states are in the buffers already, see `deep`)."""
        active = ~s.done
        count = jnp.where(takes_part, 0, s.pending_count) + d.exits.astype(jnp.int32)
        s = s.replace(pending_count=count)
        token = jnp.where(takes_part, current_deep, d.shallow_token)
        s = self.emit(s, token, active, exited=~takes_part)
        return s.replace(step=s.step + 1)

    def verify(self, s, d: _Decision, takes_part, deep_tokens, margin, drafts, *, first):
        """Keeps each row's drafts up to the first rejected one, which the deep token replaces;
        discards what followed and rolls the row (and its caches) back."""
        T, slots = self.T, self.slots
        active = ~s.done
        count = s.pending_count
        # The current token's own decision: deep, or (a row verifying drafts) a flushed exit.
        current_is_deep = takes_part if self.exact else d.needs_deep
        wrong = (drafts != deep_tokens) & (slots[None, :] < count[:, None])
        wrong &= takes_part[:, None]
        checked = jnp.pad(s.pending_draft, ((0, 0), (0, 1)))  # [B, K+1] "draft" waiting's drafts
        if self.mode == "rollback":
            checked |= margin > self.rollback_margin
        if not self.exact:
            wrong &= checked
        rejected = jnp.any(wrong, axis=1)  # [B]
        keep = jnp.where(rejected, jnp.argmax(wrong, axis=1), count)  # slot of the new token
        fix_at = first + keep  # [B] position that receives it
        token = jnp.take_along_axis(deep_tokens, keep[:, None], axis=1)[:, 0]
        # Nothing rejected and the current token exits (verifying rows only): it stays shallow.
        kept_exit = ~rejected & ~current_is_deep
        token = jnp.where(kept_exit, d.shallow_token, token)
        # Clear everything after it (discarded drafts), write it, and roll the row back.
        later = jnp.arange(T)[None, :] > fix_at[:, None]
        clear = later & takes_part[:, None]
        s = s.replace(
            tokens=jnp.where(clear, self.pad_id, s.tokens),
            exited=s.exited & ~clear,
            agree=jnp.where(clear, jnp.int8(-1), s.agree),
            confidence=jnp.where(clear, 0.0, s.confidence),
            pending_count=jnp.where(takes_part, 0, s.pending_count),
            pending_draft=s.pending_draft & ~takes_part[:, None],
            position=jnp.where(takes_part, fix_at, s.position),
        )
        s = self.emit(s, token, takes_part, exited=kept_exit)
        # A replaced token was decided deep: the buffer rule's count starts again after it.
        free_run = jnp.where(d.exits, s.free_run + 1, jnp.where(active, 0, s.free_run))
        s = s.replace(free_run=jnp.where(takes_part & rejected, 0, free_run))
        # Rows outside the pass (rollback mode only) exit as in the default mode.
        bystanders = active & ~takes_part
        s = self.push(s, d.hidden, bystanders)
        s = self.emit(s, d.shallow_token, bystanders, exited=jnp.ones_like(bystanders))
        return s.replace(cache=self.truncate_fn(s.cache, s.position), step=s.step + 1)

    def _eos_ban(self, position: Array) -> tuple[int, Array] | None:
        return eos_ban(position, eos_id=self.eos_id, min_new_tokens=self.min_new_tokens)

    def _suppress_eos(self, logits: Array, position: Array) -> Array:
        return suppress_eos(
            logits, position, eos_id=self.eos_id, min_new_tokens=self.min_new_tokens
        )
