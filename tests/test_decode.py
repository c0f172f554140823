"""Invariants of the decoder cache and of greedy decoding, and `decode`'s input checks."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import free_jax
from free_jax import testing
from free_jax.decoding.search import greedy_search, greedy_token, top_two_logits
from free_jax.errors import InputError
from free_jax.models import t5
from free_jax.models.kv_cache import DecoderCache


@pytest.fixture(scope="module", params=["v1.0", "v1.1"])
def model(request):
    return testing.tiny_model(request.param, seed=3)


def _ragged_batch(seed=0, batch=4, width=14):
    ids = testing.random_ids((batch, width), seed)
    lengths = np.linspace(width, 3, batch).astype(int)
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int32)
    return np.where(mask == 1, ids, 0), mask


# ---------------------------------------------------------------------------- greedy invariants


def test_greedy_equals_argmax_of_teacher_forced_forward(model):
    ids, mask = _ragged_batch()
    out = free_jax.decode(model, ids, attention_mask=mask, max_new_tokens=10)
    start = np.full((ids.shape[0], 1), model.config.decoder_start_token_id, np.int32)
    dec = np.concatenate([start, out.tokens[:, :-1]], axis=1)
    logits = np.asarray(free_jax.forward(model, ids, dec, attention_mask=mask))
    argmax = logits.argmax(-1)
    for row, n in enumerate(out.lengths):
        np.testing.assert_array_equal(out.tokens[row, :n], argmax[row, :n])


def test_batch_equals_rows_decoded_alone(model):
    ids, mask = _ragged_batch(seed=1)
    batch = free_jax.decode(model, ids, attention_mask=mask, max_new_tokens=10)
    for row in range(ids.shape[0]):
        n = int(mask[row].sum())
        alone = free_jax.decode(model, ids[row : row + 1, :n], max_new_tokens=10)
        np.testing.assert_array_equal(alone.tokens[0], batch.tokens[row])
        assert alone.lengths[0] == batch.lengths[row]


def test_min_new_tokens_suppresses_eos_until_reached():
    model = testing.tiny_model("v1.1", seed=0)
    # An EOS-favouring head: without suppression every row stops at once.
    head = np.asarray(model.params["lm_head"]).copy()
    head[:, model.config.eos_token_id] += 10.0
    model = model.__class__(model.config, {**model.params, "lm_head": jnp.asarray(head)})
    ids, mask = _ragged_batch(seed=2)
    eager = free_jax.decode(model, ids, attention_mask=mask, max_new_tokens=8)
    np.testing.assert_array_equal(eager.lengths, 1)
    assert eager.steps == 1
    held = free_jax.decode(model, ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=5)
    eos = model.config.eos_token_id
    assert (held.lengths > 5).all() and (held.tokens[:, :5] != eos).all()
    # Beyond suppression it is still greedy: argmax of the teacher-forced logits, EOS masked
    # at the first five positions.
    start = np.zeros((ids.shape[0], 1), np.int32)
    dec = np.concatenate([start, held.tokens[:, :-1]], axis=1)
    logits = np.asarray(free_jax.forward(model, ids, dec, attention_mask=mask)).copy()
    logits[:, :5, eos] = -np.inf
    for row, n in enumerate(held.lengths):
        np.testing.assert_array_equal(held.tokens[row, :n], logits[row, :n].argmax(-1))
        assert (held.tokens[row, n:] == model.config.pad_token_id).all()


# ---------------------------------------------------------------------------- the cache


def _setup(model, batch=3, T=12):
    config = model.config
    ids, mask = _ragged_batch(seed=4, batch=batch)
    enc = t5.encode(model.params, config, jnp.asarray(ids), jnp.asarray(mask))
    cache = t5.init_decoder_cache(model.params, config, enc, jnp.asarray(mask), T)
    tokens = testing.random_ids((batch, T), seed=5)
    return config, cache, tokens


_blocks = jax.jit(t5.decoder_blocks, static_argnames=("config", "start", "stop"))
_forward = jax.jit(t5.forward, static_argnames=("config", "return_block_states"))


@functools.partial(jax.jit, static_argnames=("config", "start", "stop"))
def _run(params, config, cache, tokens, start, stop, num_new):
    """Embeds `tokens` [B, Q] and runs blocks [start, stop); returns (logits [B, Q, V], cache)."""
    x = t5.embed(params, jnp.asarray(tokens))
    out = t5.decoder_blocks(
        params, config, cache, x, start=start, stop=stop, num_new=jnp.asarray(num_new, jnp.int32)
    )
    return t5.exit_head(params, config, out.hidden), out.cache


def _single_steps(params, config, cache, tokens, counts):
    """Feeds row b's next counts[b] tokens one position per call (idle rows write nothing)."""
    B = tokens.shape[0]
    logits = np.zeros((B, max(counts), config.vocab_size), np.float32)
    consumed = np.zeros(B, int)
    for i in range(max(counts)):
        active = np.asarray(counts) > i
        offsets = np.asarray(cache.layers[0].length)
        column = tokens[np.arange(B), np.minimum(offsets, tokens.shape[1] - 1)][:, None]
        step_logits, cache = _run(
            params, config, cache, column, 0, config.num_decoder_layers, active.astype(np.int32)
        )
        logits[active, i] = np.asarray(step_logits)[active, 0]
        consumed += active
    return logits, cache


def _block(params, config, cache, tokens, counts):
    """Feeds row b's next counts[b] tokens in one call of Q = max(counts) positions."""
    B, Q = tokens.shape[0], max(counts)
    offsets = np.asarray(cache.layers[0].length)
    index = np.minimum(offsets[:, None] + np.arange(Q)[None, :], tokens.shape[1] - 1)
    block = tokens[np.arange(B)[:, None], index]
    logits, cache = _run(params, config, cache, block, 0, config.num_decoder_layers, counts)
    return np.asarray(logits), cache


def _assert_same_cache(a, b):
    for la, lb in zip(a.layers, b.layers, strict=True):
        np.testing.assert_array_equal(np.asarray(la.length), np.asarray(lb.length))
        np.testing.assert_allclose(np.asarray(la.k), np.asarray(lb.k), atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.asarray(la.v), np.asarray(lb.v), atol=1e-5, rtol=0)


def test_block_write_equals_single_steps_at_ragged_offsets(model):
    """Rows sit at different positions and take different numbers of new positions."""
    params = model.params
    config, cache, tokens = _setup(model)
    rounds = [[3, 1, 2], [4, 2, 0], [1, 4, 3]]  # new positions per row, per call
    single, blocked = cache, cache
    for counts in rounds:
        l_single, single = _single_steps(params, config, single, tokens, counts)
        l_block, blocked = _block(params, config, blocked, tokens, counts)
        _assert_same_cache(single, blocked)
        for row, n in enumerate(counts):
            np.testing.assert_allclose(l_block[row, :n], l_single[row, :n], atol=1e-4, rtol=0)


def test_shallow_steps_then_deep_block_equals_full_steps(model):
    """FREE's pattern: blocks [0, Ls) one position at a time, then [Ls, L) over all at once."""
    params = model.params
    config, cache, tokens = _setup(model, batch=2)
    L, Ls, k = config.num_decoder_layers, 2, 4
    # Reference: k full-depth single steps.
    l_full, full = _single_steps(params, config, cache, tokens, [k, k])
    # Shallow single steps keep their hidden states; the deep blocks then take all k at once.
    shallow_states = []
    split = cache
    for i in range(k):
        x = t5.embed(params, jnp.asarray(tokens[:, i : i + 1]))
        out = _blocks(params, config, split, x, start=0, stop=Ls)
        split = out.cache
        shallow_states.append(out.hidden)
    hidden = jnp.concatenate(shallow_states, axis=1)  # [B, k, D]
    deep = _blocks(params, config, split, hidden, start=Ls, stop=L)
    _assert_same_cache(full, deep.cache)
    logits = np.asarray(t5.exit_head(params, config, deep.hidden))
    np.testing.assert_allclose(logits, l_full[:, :k], atol=1e-4, rtol=0)


def test_exit_head_after_any_block_matches_forward_exit_layer(model):
    ids, mask = _ragged_batch(seed=6)
    dec = testing.random_ids((ids.shape[0], 5), seed=7)
    dec[:, 0] = 0
    out = _forward(
        model.params,
        model.config,
        jnp.asarray(ids),
        jnp.asarray(dec),
        jnp.asarray(mask),
        return_block_states=True,
    )
    for exit_layer in range(1, model.config.num_decoder_layers + 1):
        expected = t5.exit_head(model.params, model.config, out.block_states[exit_layer - 1])
        got = free_jax.forward(model, ids, dec, attention_mask=mask, exit_layer=exit_layer)
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5, rtol=1e-6)


# ---------------------------------------------------------------------------- the search loop


def test_greedy_search_with_scripted_logits():
    """The loop alone: EOS ends a row, later tokens are padding, steps stop when all are done."""
    V, eos, pad = 6, 1, 0
    script = np.array(
        [  # the token each row emits at each step
            [3, 4, 1, 5, 5],
            [2, 1, 5, 5, 5],
            [5, 5, 5, 5, 5],
        ]
    )
    logits_table = jax.nn.one_hot(script, V) * 10.0  # [B, steps, V]

    def step_fn(cache, tokens, step):
        calls = cache + 1
        return logits_table[:, step], calls

    result = greedy_search(
        step_fn,
        jnp.zeros((), jnp.int32),
        batch_size=3,
        max_new_tokens=4,
        start_id=0,
        eos_id=eos,
        pad_id=pad,
    )
    np.testing.assert_array_equal(
        np.asarray(result.tokens), [[3, 4, 1, 0], [2, 1, 0, 0], [5, 5, 5, 5]]
    )
    np.testing.assert_array_equal(np.asarray(result.lengths), [3, 2, 4])
    assert int(result.steps) == 4 and int(result.cache) == 4

    # Without the never-ending row the loop stops after the last EOS.
    result = greedy_search(
        lambda c, t, s: (logits_table[:2, s], c + 1),
        jnp.zeros((), jnp.int32),
        batch_size=2,
        max_new_tokens=5,
        start_id=0,
        eos_id=eos,
        pad_id=pad,
    )
    assert int(result.steps) == 3 and int(result.cache) == 3


def test_greedy_search_feeds_back_its_tokens():
    """Each step receives the previous step's argmax (the start id first)."""

    def step_fn(cache, tokens, step):
        logits = jax.nn.one_hot((tokens + 2) % 7, 7)
        return logits, cache.at[step].set(tokens[0])

    result = greedy_search(
        step_fn,
        jnp.zeros((5,), jnp.int32),
        batch_size=1,
        max_new_tokens=5,
        start_id=0,
        eos_id=1,
        pad_id=0,
    )
    # Fed 0, 2, 4, 6; the fourth step emits EOS (8 % 7 = 1) and the loop ends: slot 4 unused.
    np.testing.assert_array_equal(np.asarray(result.cache), [0, 2, 4, 6, 0])
    assert int(result.steps) == 4
    np.testing.assert_array_equal(np.asarray(result.tokens)[0], [2, 4, 6, 1, 0])


# ---------------------------------------------------------------------------- text and dtypes


def test_strings_decode_like_their_token_ids(tmp_path):
    tokenizer = testing.tiny_tokenizer(tmp_path)
    model = testing.tiny_model("v1.0", seed=1, tokenizer=tokenizer)
    texts = ["the deep blocks run once", "a token may leave early when it is confident"]
    out = free_jax.decode(model, texts, max_new_tokens=6)
    encoded = tokenizer(texts, padding=True, return_tensors="np")
    by_ids = free_jax.decode(
        model, encoded["input_ids"], attention_mask=encoded["attention_mask"], max_new_tokens=6
    )
    np.testing.assert_array_equal(out.tokens, by_ids.tokens)
    expected = tokenizer.batch_decode(
        [r[:n].tolist() for r, n in zip(out.tokens, out.lengths, strict=True)],
        skip_special_tokens=True,
    )
    assert out.texts == expected
    assert by_ids.texts == expected  # a tokenizer is there, so ids get texts too


def test_bfloat16_decoding_runs_in_bfloat16():
    model = testing.tiny_model("v1.1", seed=0).astype(jnp.bfloat16)
    assert model.dtype == jnp.bfloat16
    ids, mask = _ragged_batch()
    out = free_jax.decode(model, ids, attention_mask=mask, max_new_tokens=6)
    assert out.tokens.shape == (ids.shape[0], 6) and out.tokens.dtype == np.int32
    assert ((out.tokens >= 0) & (out.tokens < model.config.vocab_size)).all()


# ---------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def small():
    return testing.tiny_model("v1.1", seed=0)


@pytest.mark.parametrize(
    "inputs, message",
    [
        ([], "inputs is empty"),
        (np.zeros((0, 5), np.int32), "empty"),
        (np.zeros((2, 0), np.int32), "empty"),
        (np.array([5, 6, 7]), "add a batch axis"),
        (np.array([[5, 6, 500]]), "token id 500"),
        (np.array([[5.0, 6.0]]), "integer token ids"),
        (np.array([[0, 0, 0], [4, 5, 0]]), "row(s) [0] have no real tokens"),
        (["a string"], "need a tokenizer"),
    ],
)
def test_bad_inputs_raise_clear_errors(small, inputs, message):
    with pytest.raises(
        InputError,
        match=message.replace("(", r"\(")
        .replace(")", r"\)")
        .replace("[", r"\[")
        .replace("]", r"\]"),
    ):
        free_jax.decode(small, inputs, max_new_tokens=4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1, got 0"),
        (dict(max_new_tokens=-3), "got -3"),
        (dict(max_new_tokens=2.5), "got 2.5"),
        (dict(max_new_tokens=4, min_new_tokens=5), "min_new_tokens=5 exceeds max_new_tokens=4"),
        (dict(method="beam"), "method='beam' is not known"),
        (dict(attention_mask=np.ones((1, 3))), "attention_mask has shape"),
    ],
)
def test_bad_arguments_raise_clear_errors(small, kwargs, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        free_jax.decode(small, np.array([[5, 6, 7], [8, 9, 10]]), **kwargs)


def test_too_long_input_raises_or_truncates_with_warning():
    model = testing.tiny_model("v1.1", seed=0, max_source_length=8)
    ids = testing.random_ids((2, 12), seed=0)
    with pytest.raises(InputError, match="12 tokens, more than the model's max_source_length=8"):
        free_jax.decode(model, ids, max_new_tokens=3)
    with pytest.warns(UserWarning, match="truncating inputs from 12 to max_source_length=8"):
        cut = free_jax.decode(model, ids, max_new_tokens=3, truncate=True)
    np.testing.assert_array_equal(
        cut.tokens, free_jax.decode(model, ids[:, :8], max_new_tokens=3).tokens
    )


def test_padding_does_not_count_towards_the_length_limit():
    model = testing.tiny_model("v1.1", seed=0, max_source_length=8)
    ids = np.zeros((2, 12), np.int32)
    ids[0, :8] = testing.random_ids((1, 8), seed=1)
    ids[1, :3] = testing.random_ids((1, 3), seed=2)
    free_jax.decode(model, ids, max_new_tokens=2)  # 8 real tokens at most: accepted


def test_forward_rejects_bad_exit_layer(small):
    ids = np.array([[5, 6, 7]])
    for bad in (0, small.config.num_decoder_layers + 1, 1.5, True):
        with pytest.raises(InputError, match="exit_layer"):
            free_jax.forward(small, ids, ids, exit_layer=bad)


def test_decode_layout_computes_the_same_function(model):
    """`fuse_for_decoding` only rearranges weights: blocks and exit agree with the plain layout."""
    config, cache, tokens = _setup(model, batch=2)
    fused = t5.fuse_for_decoding(model.params)
    assert "qkv" in fused["decoder"]["blocks"][0]["self_attn"] and "lm_head" in fused
    counts = [3, 2]
    plain_logits, plain_cache = _run(
        model.params, config, cache, tokens[:, :3], 0, config.num_decoder_layers, counts
    )
    fused_logits, fused_cache = _run(
        fused, config, cache, tokens[:, :3], 0, config.num_decoder_layers, counts
    )
    np.testing.assert_allclose(np.asarray(fused_logits), np.asarray(plain_logits), atol=1e-5)
    _assert_same_cache(plain_cache, fused_cache)


@pytest.mark.parametrize("variant", ["v1.0", "v1.1", "local", "transient-global"])
def test_the_encoder_in_decode_layout_computes_the_same_function(variant):
    """`fuse_for_decoding` fuses the encoder blocks too (T5's and LongT5's: a transient-global
    block's global tokens take their keys and values from the fused kernel), and
    `decoding.encode_source` gives the same output from either layout."""
    from free_jax import decoding

    if variant.startswith("v1"):
        config = testing.tiny_config(variant)
    else:
        config = testing.tiny_longt5_config(variant)
    model = free_jax.Model.random(config, seed=4)
    fused = t5.fuse_for_decoding(model.params)
    block = fused["encoder"]["blocks"][0]
    assert "qkv" in block["self_attn"] and "q" not in block["self_attn"]
    assert ("wi_fused" in block["ffn"]) == config.is_gated_act
    ids = testing.random_ids((2, 40), seed=5, vocab_size=config.vocab_size)
    mask = np.ones_like(ids)
    mask[1, 31:] = 0
    plain = decoding.encode_source(model.params, ids, mask, config=config, length=48)
    fused_out = decoding.encode_source(fused, ids, mask, config=config, length=48)
    np.testing.assert_array_equal(np.asarray(fused_out[1]), np.asarray(plain[1]))
    real = np.asarray(plain[1], bool)
    np.testing.assert_allclose(
        np.asarray(fused_out[0])[real], np.asarray(plain[0])[real], rtol=1e-5, atol=1e-5
    )


def test_decode_params_are_made_once_and_decode_the_same(model):
    """`Model.decode_params` is the decode layout, made on first use and kept; fusing is a no-op
    for weights already in it; releasing them changes nothing but memory."""
    ids = testing.random_ids((2, 7), seed=3)
    first = free_jax.decode(model, ids, max_new_tokens=6)
    fused = model.decode_params
    assert model.decode_params is fused
    assert t5.is_decode_layout(fused) and not t5.is_decode_layout(model.params)
    assert (
        t5.fuse_for_decoding(fused)["decoder"]["blocks"][0]["self_attn"]["qkv"]
        is (fused["decoder"]["blocks"][0]["self_attn"]["qkv"])
    )
    model.release_decode_params()
    assert "decode_params" not in model.__dict__
    np.testing.assert_array_equal(
        free_jax.decode(model, ids, max_new_tokens=6).tokens, first.tokens
    )


def test_encoder_length_pads_without_changing_the_output_or_recompiling(model):
    """Sources of different lengths decoded with one `encoder_length` give the tokens they give
    at their own length, and share one compiled decode loop."""
    from free_jax import decoding

    short, long = testing.random_ids((2, 5), seed=4), testing.random_ids((2, 20), seed=5)
    free_jax.decode(model, short, max_new_tokens=5, encoder_length=48)
    compiled = decoding.greedy_full._cache_size()
    for ids in (short, long):
        padded = free_jax.decode(model, ids, max_new_tokens=5, encoder_length=48)
        own = free_jax.decode(model, ids, max_new_tokens=5)
        np.testing.assert_array_equal(padded.tokens, own.tokens)
    assert decoding.greedy_full._cache_size() == compiled + 2  # the two default lengths only
    with pytest.raises(InputError, match=r"encoder_length=16 is shorter than the source \(32 "):
        free_jax.decode(model, long, max_new_tokens=5, encoder_length=16)


def test_the_decoding_cores_return_the_cache_only_when_asked():
    """`keep_cache=False` (the default, what `decode` uses) drops the final cache from the jitted
    cores' outputs and changes nothing else; with `keep_cache=True` the full model's cache holds
    every emitted position of every block. (One layout: the cache does not depend on it.)"""
    from free_jax import decoding

    model = testing.tiny_model("v1.1", seed=3)

    ids, mask = _ragged_batch(seed=8, width=16)
    config = model.config
    encoded = decoding.encode_source(model.params, ids, mask, config=config, length=16)
    kw = dict(config=config, max_new_tokens=6)
    cores = {
        "full": lambda **k: decoding.greedy_full(model.params, *encoded, **kw, **k),
        "static": lambda **k: decoding.greedy_static(
            model.params, *encoded, exit_layer=1, **kw, **k
        ),
        "free": lambda **k: decoding.free_decode(
            model.params, *encoded, np.float32(0.5), exit_layer=1, **kw, **k
        ),
    }
    for name, core in cores.items():
        dropped, kept = core(), core(keep_cache=True)
        assert dropped.cache is None, name
        assert isinstance(kept.cache, DecoderCache), name
        np.testing.assert_array_equal(np.asarray(dropped.tokens), np.asarray(kept.tokens))
    full = cores["full"](keep_cache=True)
    for layer in full.cache.layers:
        # Every row steps until the whole batch is done, writing one position per step.
        np.testing.assert_array_equal(np.asarray(layer.length), [int(full.steps)] * len(ids))


def test_greedy_token_is_argmax_with_the_first_of_tied_maxima():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 50)).astype(np.float32)
    logits[1] = np.round(logits[1])  # many ties
    logits[2] = 0.0  # all tied: index 0
    logits[3, [7, 30]] = 9.0  # a tie at the maximum: the first
    logits[4, :40] = -np.inf  # a suppressed prefix, as suppress_eos makes
    np.testing.assert_array_equal(np.asarray(greedy_token(logits)), logits.argmax(-1))
    assert np.asarray(greedy_token(logits)).dtype == np.int32
    assert int(greedy_token(logits)[3]) == 7


# 50 = 2 blocks of 25, 97 is prime (no blocks), 2048 the demo's vocabulary, 32128 T5's.
@pytest.mark.parametrize("vocab", [50, 97, 2048, 32128])
def test_greedy_token_by_blocks_is_argmax_of_the_suppressed_logits(vocab):
    """`greedy_token` reads the vocabulary in blocks and forbids a banned token without writing
    suppressed logits; it must equal `argmax` of the suppressed logits, ties, -inf and a banned
    maximum included, for [B, V] and [B, Q, V] logits."""
    rng = np.random.default_rng(vocab)
    eos = 1
    logits = rng.normal(size=(9, vocab)).astype(np.float32)
    logits[0, eos] = 50.0  # the banned token is the maximum: the next one wins
    logits[1, eos] = 50.0  # ... but not banned in this row
    logits[2] = np.round(logits[2])  # many ties, across blocks
    logits[3, [eos, 5, vocab - 1]] = 9.0  # a tie with the banned token
    logits[4] = -np.inf  # nothing allowed: index 0, as argmax
    logits[5] = 0.0
    logits[6, [vocab - 2, vocab - 1]] = 20.0  # a tie in the last block
    logits[7, 2:] = -np.inf  # only the banned token and one other are finite
    logits[8, eos] = np.inf
    ban = np.array([True, False, True, True, True, True, False, True, True])
    suppressed = np.where(ban[:, None] & (np.arange(vocab) == eos), -np.inf, logits)
    got = np.asarray(greedy_token(jnp.asarray(logits), (eos, jnp.asarray(ban))))
    np.testing.assert_array_equal(got, suppressed.argmax(-1))
    np.testing.assert_array_equal(np.asarray(greedy_token(logits)), logits.argmax(-1))
    # Per-query masks, as the deep passes give them.
    queries = logits.reshape(3, 3, vocab)
    got = greedy_token(jnp.asarray(queries), (eos, jnp.asarray(ban.reshape(3, 3))))
    np.testing.assert_array_equal(np.asarray(got), suppressed.reshape(3, 3, vocab).argmax(-1))


@pytest.mark.parametrize("vocab", [50, 97, 2048])
def test_top_two_logits_are_the_two_largest_counting_ties(vocab):
    rng = np.random.default_rng(vocab + 1)
    logits = rng.normal(size=(6, vocab)).astype(np.float32)
    logits[1, [3, vocab - 1]] = 7.0  # tied maxima in different blocks: second == first
    logits[2, [3, 4]] = 7.0  # tied in one block
    logits[3] = np.round(logits[3] * 2)  # ties everywhere
    logits[4, 0] = 100.0  # a clear maximum at the first index
    first, second = (np.asarray(a) for a in top_two_logits(jnp.asarray(logits)))
    ordered = np.sort(logits, axis=-1)
    np.testing.assert_array_equal(first, ordered[:, -1])
    np.testing.assert_array_equal(second, ordered[:, -2])
    assert second[1] == first[1] and second[2] == first[2]


def test_fetch_brings_every_leaf_back_bit_for_bit():
    """`decode` fetches a method's outputs packed into one buffer: each leaf must come back with
    its dtype, shape and bytes (NaN and subnormal floats, bools, int8, scalars, empty arrays)."""
    from free_jax.decoding.api import fetch

    tree = {
        "tokens": jnp.asarray([[5, -1, 2**31 - 1]], jnp.int32),
        "confidence": jnp.asarray([0.25, np.nan, -np.inf, 1e-40], jnp.float32),
        "exited": jnp.asarray([[True, False, True]]),
        "agree": jnp.asarray([-1, 0, 1], jnp.int8),
        "steps": jnp.int32(7),
        "none": jnp.zeros((0, 3), jnp.float32),
        "half": jnp.asarray([1.5, -2.0, 3.0], jnp.bfloat16),
        "nested": [jnp.asarray([9], jnp.int32)],
    }
    got, want = fetch(tree), jax.device_get(tree)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert isinstance(g, np.ndarray) and g.dtype == w.dtype and g.shape == w.shape
        assert g.tobytes() == np.asarray(w).tobytes()
