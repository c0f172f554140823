"""The synchronized-parallel-decoding loop alone, driven by a scripted position-only "model".

The scripted model predicts from positions, not from input tokens: at position t of row b the
shallow exit says S[b, t] with confidence C[b, t] and the deep model says D[b, t]. Full greedy
decoding is then simply D, and the outputs of FREE's rules can be computed by hand per row; the
scripted cache also checks that every deep pass receives the right pending states, in order, at
the right positions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from free_jax.decoding import spd

V, EOS, PAD, START = 8, 1, 0, 0


def scripted(S, C, D):
    """(shallow_fn, deep_fn, head_fn, truncate_fn, cache) for scripted tables [B, T].

    Hidden states are [position, shallow token, row]: the deep "blocks" pass them through and the
    deep head reads D at the row and position.
    """
    S, C, D = (jnp.asarray(x) for x in (S, C, D))
    B, T = S.shape
    cache = dict(
        shallow_len=jnp.zeros((B,), jnp.int32),
        deep_len=jnp.zeros((B,), jnp.int32),
        deep_seen=jnp.zeros((B, T), jnp.int32),  # deep passes that saw each position
        in_order=jnp.ones((), bool),  # every query sat at deep_len + j, in order
        largest_pass=jnp.zeros((), jnp.int32),  # widest query block of a deep call
        largest_call=jnp.zeros((), jnp.int32),  # most positions (rows x queries) of a call
    )
    rows = jnp.arange(B)

    def shallow_fn(cache, tokens, active):
        pos = jnp.minimum(cache["shallow_len"], T - 1)
        logits = jax.nn.one_hot(S[rows, pos], V) * 10.0
        hidden = jnp.stack([pos, S[rows, pos], rows], -1).astype(jnp.float32)
        cache = {**cache, "shallow_len": cache["shallow_len"] + active.astype(jnp.int32)}
        return logits, hidden, C[rows, pos], cache

    def deep_fn(cache, queries, num_new, part=None):
        # `part`: the rows a compacted pass runs over (ascending); default all of them.
        part = rows if part is None else part
        Q = queries.shape[1]
        qpos = queries[..., 0].astype(jnp.int32)  # [R, Q]
        valid = jnp.arange(Q)[None, :] < num_new[:, None]
        expected = cache["deep_len"][part][:, None] + jnp.arange(Q)[None, :]
        in_order = cache["in_order"] & jnp.all(jnp.where(valid, qpos == expected, True))
        seen = cache["deep_seen"].at[part[:, None], jnp.where(valid, qpos, T)].add(1, mode="drop")
        cache = {
            **cache,
            "deep_len": cache["deep_len"].at[part].add(num_new),
            "deep_seen": seen,
            "in_order": in_order,
            "largest_pass": jnp.maximum(cache["largest_pass"], Q),
            "largest_call": jnp.maximum(cache["largest_call"], Q * part.shape[0]),
        }
        return queries, cache

    def head_fn(hidden):  # [R, ..., 3] for any R rows (a compacted pass gathers some)
        pos = jnp.clip(hidden[..., 0].astype(jnp.int32), 0, T - 1)
        row = hidden[..., 2].astype(jnp.int32)
        return jax.nn.one_hot(D[row, pos], V) * 10.0

    def truncate_fn(cache, lengths):
        return {
            **cache,
            "shallow_len": jnp.minimum(cache["shallow_len"], lengths),
            "deep_len": jnp.minimum(cache["deep_len"], lengths),
        }

    return shallow_fn, deep_fn, head_fn, truncate_fn, cache


@functools.partial(
    jax.jit,
    static_argnames=(
        "K",
        "mode",
        "record_agreement",
        "margin",
        "max_wait",
        "wait_mode",
        "row_buckets",
        "chunk_positions",
    ),
)
def run(
    S,
    C,
    D,
    threshold,
    *,
    K,
    mode,
    record_agreement=True,
    margin=0.0,
    max_wait=0,
    wait_mode="hold",
    row_buckets=None,
    chunk_positions=None,
):
    shallow_fn, deep_fn, head_fn, truncate_fn, cache = scripted(S, C, D)
    B, T = S.shape
    return spd.spd_search(
        shallow_fn,
        deep_fn,
        head_fn,
        truncate_fn,
        cache,
        threshold,
        batch_size=B,
        hidden_size=3,
        hidden_dtype=jnp.float32,
        max_new_tokens=T,
        buffer_capacity=K,
        start_id=START,
        eos_id=EOS,
        pad_id=PAD,
        mode=mode,
        record_agreement=record_agreement,
        rollback_margin=margin,
        max_wait=max_wait,
        wait_mode=wait_mode,
        row_buckets=row_buckets,
        chunk_positions=chunk_positions,
    )


def reference_default(S, C, D, threshold, K):
    """FREE's default rules for one row, by hand: (tokens, exited, deep passes)."""
    out, exited, pending = [], [], 0
    for t in range(len(S)):
        if C[t] > threshold and pending < K:
            out.append(S[t])
            exited.append(True)
            pending += 1
        else:
            out.append(D[t])
            exited.append(False)
            pending = 0
        if out[-1] == EOS:
            break
    return out, exited


def reference_rollback(S, C, D, threshold, K):
    """The rollback rules for one row, by hand (any disagreement rolls back: margin 0)."""
    out, exited, pending, pos = {}, {}, [], 0
    while pos < len(S):
        t = pos
        if C[t] > threshold and len(pending) < K:
            out[t], exited[t] = S[t], True
            pending.append(t)
            pos += 1
            if S[t] == EOS:
                break
            continue
        bad = [j for j in pending if out[j] != D[j]]
        pending = []
        if bad:
            j = bad[0]
            out = {i: v for i, v in out.items() if i < j}
            exited = {i: v for i, v in exited.items() if i < j}
            t = j
        out[t], exited[t] = D[t], False
        pos = t + 1
        if D[t] == EOS:
            break
    n = len(out)
    return [out[i] for i in range(n)], [exited[i] for i in range(n)]


def reference_full(D):
    out = []
    for token in D:
        out.append(token)
        if token == EOS:
            break
    return out


def tables(seed, B=3, T=12, agree=0.7, eos=0.05):
    rng = np.random.default_rng(seed)
    D = rng.integers(2, V, (B, T))
    D = np.where(rng.random((B, T)) < eos, EOS, D)
    S = np.where(rng.random((B, T)) < agree, D, rng.integers(1, V, (B, T)))
    C = rng.random((B, T)).astype(np.float32)
    return S.astype(np.int32), C, D.astype(np.int32)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    threshold=st.floats(0.0, 1.0),
    K=st.sampled_from([1, 2, 3, 8]),
    record_agreement=st.booleans(),
)
def test_default_mode_follows_the_rules_row_by_row(seed, threshold, K, record_agreement):
    S, C, D = tables(seed)
    result = run(
        S, C, D, np.float32(threshold), K=K, mode="default", record_agreement=record_agreement
    )
    B, T = S.shape
    for b in range(B):
        tokens, exited = reference_default(S[b], C[b], D[b], np.float32(threshold), K)
        n = len(tokens)
        assert int(result.lengths[b]) == n
        np.testing.assert_array_equal(np.asarray(result.tokens[b, :n]), tokens)
        np.testing.assert_array_equal(np.asarray(result.tokens[b, n:]), PAD)
        np.testing.assert_array_equal(np.asarray(result.exited[b, :n]), exited)
        np.testing.assert_allclose(np.asarray(result.confidence[b, :n]), C[b, :n])
    cache = result.cache
    assert bool(cache["in_order"])
    # Each deep pass writes the deep cache up to the current token; tokens left pending at the
    # end were never needed by the deep model, and no position is processed twice.
    seen = np.asarray(cache["deep_seen"])
    assert seen.max() <= 1
    for b in range(B):
        n = int(result.lengths[b])
        exited = np.asarray(result.exited[b, :n])
        last_deep = np.flatnonzero(~exited).max() if (~exited).any() else -1
        np.testing.assert_array_equal(seen[b, : last_deep + 1], 1)
        np.testing.assert_array_equal(seen[b, last_deep + 1 :], 0)
        agree = np.asarray(result.agree[b])
        expected = (S[b, : last_deep + 1] == D[b, : last_deep + 1]).astype(int)
        if not record_agreement:  # only the tokens that went deep themselves
            expected = np.where(exited[: last_deep + 1], -1, expected)
        np.testing.assert_array_equal(agree[: last_deep + 1], expected)
        assert (agree[last_deep + 1 :] == -1).all()


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    threshold=st.floats(0.0, 1.0),
    K=st.sampled_from([1, 2, 5, 8]),
    agree=st.sampled_from([0.3, 0.9]),
)
def test_exact_mode_reproduces_full_greedy(seed, threshold, K, agree):
    S, C, D = tables(seed, agree=agree)
    result = run(S, C, D, np.float32(threshold), K=K, mode="exact")
    for b in range(S.shape[0]):
        expected = reference_full(D[b])
        n = len(expected)
        assert int(result.lengths[b]) == n
        np.testing.assert_array_equal(np.asarray(result.tokens[b, :n]), expected)
        np.testing.assert_array_equal(np.asarray(result.tokens[b, n:]), PAD)
        # A kept early exit is a verified draft: the shallow token equalled the deep one.
        kept = np.asarray(result.exited[b, :n])
        assert (S[b, :n][kept] == D[b, :n][kept]).all()
    assert bool(result.cache["in_order"])


def test_never_exiting_is_one_deep_pass_per_step_and_always_exiting_needs_none():
    S, C, D = tables(0, eos=0.0)
    S = np.where(S == EOS, 2, S)
    never = run(S, C, D, np.float32(1.0), K=4, mode="default")
    np.testing.assert_array_equal(np.asarray(never.tokens), D)
    assert int(never.num_deep_passes) == S.shape[1] and not np.asarray(never.exited).any()
    always = run(S, C * 0 + 1.0, D, np.float32(0.5), K=S.shape[1], mode="default")
    np.testing.assert_array_equal(np.asarray(always.tokens), S)
    assert int(always.num_deep_passes) == 0 and np.asarray(always.exited).all()


def test_full_buffer_forces_a_deep_pass_sized_by_the_queue():
    """K = 3 and every token confident: passes come every 4th token and process 4 positions."""
    S, C, D = tables(1, B=1, T=12, eos=0.0)
    result = run(S, np.ones_like(C), D, np.float32(0.5), K=3, mode="default")
    exited = np.asarray(result.exited[0])
    np.testing.assert_array_equal(exited, [True, True, True, False] * 3)
    assert int(result.num_deep_passes) == 3
    np.testing.assert_array_equal(np.asarray(result.pass_tokens[:3]), 4)
    assert int(result.cache["largest_pass"]) == 4


def test_deep_pass_cost_follows_the_longest_queue_not_the_capacity():
    """With K = 8 but queues of one, every pass uses the smallest query block."""
    S, C, D = tables(2, B=2, T=10, eos=0.0)
    C = np.tile(np.array([0.9, 0.1], np.float32), (2, 5))  # exit, deep, exit, deep, ...
    result = run(S, C, D, np.float32(0.5), K=8, mode="default")
    assert int(result.num_deep_passes) == 5
    assert int(result.cache["largest_pass"]) == 2  # bucket of size 2, not K + 1 = 9
    assert spd.query_buckets(8) == (1, 2, 4, 8, 9)


def test_windowed_passes_run_one_position_or_a_whole_window():
    """With windows, a pass has two sizes: one position, or the window (each size is a compiled
    copy of the deep blocks): queues of two run in a window of 8, and emit what size 2 emits."""
    S, C, D = tables(2, B=1, T=10, eos=0.0)
    alternating = np.tile(np.array([0.9, 0.1], np.float32), (1, 5))  # exit, deep, exit, ...
    sized = run(S, alternating, D, np.float32(0.5), K=16, mode="default")
    windowed = run(S, alternating, D, np.float32(0.5), K=16, mode="default", chunk_positions=8)
    assert int(sized.cache["largest_pass"]) == 2
    assert int(windowed.cache["largest_pass"]) == 8
    for field in ("tokens", "lengths", "exited", "num_deep_passes", "pass_tokens"):
        np.testing.assert_array_equal(
            np.asarray(getattr(windowed, field)), np.asarray(getattr(sized, field)), err_msg=field
        )
    never = np.zeros_like(alternating)  # every pass is the current token alone
    alone = run(S, never, D, np.float32(0.5), K=16, mode="default", chunk_positions=8)
    assert int(alone.num_deep_passes) > 0 and int(alone.cache["largest_pass"]) == 1


def test_rows_do_not_wait_for_each_other_in_default_mode():
    """A row that never exits forces a pass every step; the other row keeps exiting."""
    S, C, D = tables(3, B=2, T=8, eos=0.0)
    C = np.stack([np.zeros(8, np.float32), np.ones(8, np.float32)])
    result = run(S, C, D, np.float32(0.5), K=8, mode="default")
    np.testing.assert_array_equal(np.asarray(result.exited[0]), False)
    np.testing.assert_array_equal(np.asarray(result.exited[1]), True)
    np.testing.assert_array_equal(np.asarray(result.tokens[1]), S[1])
    assert int(result.num_deep_passes) == 8
    np.testing.assert_array_equal(np.asarray(result.pass_tokens[:8]), 1)  # row 1 never joins


def test_exact_mode_rolls_back_to_the_first_wrong_draft():
    S, C, D = tables(4, B=1, T=8, eos=0.0)
    S = D.copy()
    S[0, 2] = (D[0, 2] + 1) % V or 2  # the third draft is wrong
    C = np.ones_like(C)
    result = run(S, C, D, np.float32(0.5), K=4, mode="exact")
    np.testing.assert_array_equal(np.asarray(result.tokens[0]), D[0])
    # Drafts 0, 1 are kept, draft 2 is replaced by the deep token, draft 3 is discarded and redone.
    assert bool(result.exited[0, 0]) and bool(result.exited[0, 1])
    assert not bool(result.exited[0, 2])
    assert int(result.steps) > 8


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    threshold=st.floats(0.0, 1.0),
    K=st.sampled_from([1, 3, 8]),
    agree=st.sampled_from([0.3, 0.9]),
)
def test_rollback_mode_follows_the_rules_row_by_row(seed, threshold, K, agree):
    S, C, D = tables(seed, agree=agree)
    result = run(S, C, D, np.float32(threshold), K=K, mode="rollback", margin=0.0)
    for b in range(S.shape[0]):
        tokens, exited = reference_rollback(S[b], C[b], D[b], np.float32(threshold), K)
        n = len(tokens)
        assert int(result.lengths[b]) == n
        np.testing.assert_array_equal(np.asarray(result.tokens[b, :n]), tokens)
        np.testing.assert_array_equal(np.asarray(result.tokens[b, n:]), PAD)
        np.testing.assert_array_equal(np.asarray(result.exited[b, :n]), exited)
    assert bool(result.cache["in_order"])


def test_rollback_within_the_margin_is_the_default_mode():
    """Scripted deep probabilities differ by ~0.9997 at most: a margin of 1 never rolls back."""
    S, C, D = tables(5, agree=0.5)
    loose = run(S, C, D, np.float32(0.4), K=4, mode="rollback", margin=1.0)
    default = run(S, C, D, np.float32(0.4), K=4, mode="default")
    np.testing.assert_array_equal(np.asarray(loose.tokens), np.asarray(default.tokens))
    np.testing.assert_array_equal(np.asarray(loose.exited), np.asarray(default.exited))


@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    threshold=st.floats(0.0, 1.0),
    K=st.sampled_from([1, 4]),
    max_wait=st.sampled_from([1, 2, 5]),
    mode=st.sampled_from(["default", "exact", "rollback"]),
    wait_mode=st.sampled_from(spd.WAIT_MODES),
)
def test_waiting_changes_when_passes_run_not_what_rows_emit(
    seed, threshold, K, max_wait, mode, wait_mode
):
    if wait_mode == "draft" and mode == "rollback":
        mode = "default"  # not supported together (rollback's output follows pass timing)
    S, C, D = tables(seed, B=4)
    eager = run(S, C, D, np.float32(threshold), K=K, mode=mode)
    patient = run(
        S, C, D, np.float32(threshold), K=K, mode=mode, max_wait=max_wait, wait_mode=wait_mode
    )
    np.testing.assert_array_equal(np.asarray(patient.tokens), np.asarray(eager.tokens))
    np.testing.assert_array_equal(np.asarray(patient.lengths), np.asarray(eager.lengths))
    if mode == "default":  # exits do not depend on pass timing there
        np.testing.assert_array_equal(np.asarray(patient.exited), np.asarray(eager.exited))
        if wait_mode == "hold":  # drafts rejected cost extra passes
            assert int(patient.num_deep_passes) <= int(eager.num_deep_passes)
    assert bool(patient.cache["in_order"])


def test_waiting_rows_share_one_pass():
    """Rows needing the deep model at alternating steps: waiting halves the passes."""
    S, C, D = tables(6, B=2, T=8, eos=0.0)
    C = np.array([[0.9, 0.1] * 4, [0.1, 0.9] * 4], np.float32)
    eager = run(S, C, D, np.float32(0.5), K=8, mode="default")
    patient = run(S, C, D, np.float32(0.5), K=8, mode="default", max_wait=1)
    assert int(eager.num_deep_passes) == 8
    assert int(patient.num_deep_passes) < int(eager.num_deep_passes)
    np.testing.assert_array_equal(np.asarray(patient.tokens), np.asarray(eager.tokens))


@settings(max_examples=6, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    threshold=st.floats(0.0, 1.0),
    K=st.sampled_from([3, 8]),
    mode=st.sampled_from(spd.MODES),
    chunk=st.sampled_from([1, 2, 4]),
    record_agreement=st.booleans(),
)
def test_windowed_passes_over_gathered_rows_change_nothing(
    seed, threshold, K, mode, chunk, record_agreement
):
    """Passes over gathered rows (row counts 2 and 4) and in query windows of at most `chunk`
    positions per call emit what one wide call over every row emits, and every window's
    queries sit where the deep cache expects them, in order."""
    S, C, D = tables(seed, B=4)
    options = dict(K=K, mode=mode, record_agreement=record_agreement)
    wide = run(S, C, D, np.float32(threshold), **options)
    windowed = run(
        S, C, D, np.float32(threshold), **options, row_buckets=(2, 4), chunk_positions=chunk
    )
    for field in ("tokens", "lengths", "exited", "agree", "num_deep_passes", "pass_tokens"):
        np.testing.assert_array_equal(
            np.asarray(getattr(windowed, field)), np.asarray(getattr(wide, field)), err_msg=field
        )
    assert bool(windowed.cache["in_order"])
    np.testing.assert_array_equal(windowed.cache["deep_seen"], wide.cache["deep_seen"])
    # At most `chunk` positions per call, but always one per row (a 4-row pass at chunk 2).
    assert int(windowed.cache["largest_call"]) <= max(chunk, 4)
    if int(wide.cache["largest_pass"]) > chunk:
        assert int(windowed.cache["largest_pass"]) < int(wide.cache["largest_pass"])


def test_windows_bound_each_call_and_cover_a_wide_pass():
    """One row exits 7 times, then needs the deep model: an 8-position pass in windows of 2
    runs 4 calls in order and emits what one call emits."""
    S, C, D = tables(7, B=1, T=8, eos=0.0)
    C = np.array([[0.9] * 7 + [0.1]], np.float32)
    wide = run(S, C, D, np.float32(0.5), K=8, mode="exact")
    windowed = run(S, C, D, np.float32(0.5), K=8, mode="exact", chunk_positions=2)
    assert int(wide.cache["largest_pass"]) == 8
    assert int(windowed.cache["largest_pass"]) == 2
    assert bool(windowed.cache["in_order"])
    np.testing.assert_array_equal(np.asarray(windowed.tokens), np.asarray(wide.tokens))
    np.testing.assert_array_equal(np.asarray(windowed.tokens[0]), D[0])
