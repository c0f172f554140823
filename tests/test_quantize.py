"""Int8 decoder weights (`Model.quantize`): the products' error bounds, and decoding's invariants
with quantized weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import free_jax
from free_jax import testing
from free_jax.errors import InputError
from free_jax.models import quantize
from free_jax.models.quantize import Int8Weight

T = 10


def _kernel(seed=0, shape=(48, 20)):
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero column
    w[:, 5] *= 50.0  # a column with a much larger range than the others
    return jnp.asarray(w)


def test_kernels_round_to_the_nearest_step_of_their_own_column():
    w = _kernel()
    qw = quantize.quantize_kernel(w)
    q, scale = np.asarray(qw.q), np.asarray(qw.scale)
    assert q.dtype == np.int8 and scale.shape == (w.shape[1],)
    assert np.abs(q).max() <= 127
    nonzero = np.abs(np.asarray(w)).max(axis=0) > 0
    np.testing.assert_array_equal(np.abs(q).max(axis=0)[nonzero], 127)  # each column's full range
    error = np.abs(np.asarray(w) - np.asarray(qw.dequantize()))
    assert np.all(error <= scale[None, :] * (0.5 + 1e-5))
    np.testing.assert_array_equal(np.asarray(qw.dequantize())[:, 3], 0.0)
    assert qw.nbytes == w.size + 4 * w.shape[1]


def test_weight_only_product_is_the_product_with_the_dequantized_kernel():
    w = _kernel()
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 48)), jnp.float32)
    qw = quantize.quantize_kernel(w)
    out = x @ qw  # dispatches to Int8Weight.__rmatmul__
    assert out.shape == (2, 3, 20) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, x @ qw.dequantize(), rtol=1e-5, atol=1e-5)
    # Inside jit too (the decode loops trace it), and at bf16 activations.
    np.testing.assert_allclose(jax.jit(lambda x, w: x @ w)(x, qw), out, rtol=1e-6, atol=1e-6)
    assert (x.astype(jnp.bfloat16) @ qw).dtype == jnp.bfloat16


def test_dynamic_product_error_stays_within_the_activation_rounding_bound():
    rng = np.random.default_rng(2)
    w = _kernel()
    x = rng.standard_normal((5, 48)).astype(np.float32)
    x[1] *= 1e3  # rows of very different ranges get scales of their own
    x[2] = 0.0
    qw = quantize.quantize_kernel(w, dynamic=True)
    deq = np.asarray(qw.dequantize())
    out = np.asarray(jnp.asarray(x) @ qw)
    # Each activation is off by at most half its row's step; the kernel is the dequantized one.
    row_step = np.abs(x).max(axis=1, keepdims=True) / 127
    bound = 0.5 * row_step * np.abs(deq).sum(axis=0)[None, :]
    exact = x.astype(np.float64) @ deq.astype(np.float64)
    assert np.all(np.abs(out - exact) <= bound * (1 + 1e-4) + 1e-5)
    np.testing.assert_array_equal(out[2], 0.0)
    # A row alone (padded to two for XLA CPU's int8 product) equals that row within a batch.
    for i in range(len(x)):
        np.testing.assert_array_equal(np.asarray(jnp.asarray(x[i : i + 1]) @ qw), out[i : i + 1])


def test_column_slices_multiply_like_the_same_columns_of_the_whole_product():
    x = jnp.asarray(np.random.default_rng(3).standard_normal((4, 48)), jnp.float32)
    for dynamic in (False, True):
        qw = quantize.quantize_kernel(_kernel(), dynamic=dynamic)
        np.testing.assert_allclose(x @ qw[:, 8:], (x @ qw)[:, 8:], rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="column slices"):
        qw[1:, :]


@pytest.fixture(scope="module")
def model():
    return testing.tiny_model("v1.1", seed=3)


@pytest.fixture(scope="module")
def batch():
    ids = testing.random_ids((4, 9), seed=4)
    mask = (np.arange(9)[None, :] < np.array([9, 7, 4, 2])[:, None]).astype(np.int32)
    return np.where(mask == 1, ids, 0), mask


def test_quantize_replaces_decoder_kernels_and_head_only(model):
    fused = model.decode_params
    qparams = model.quantize("int8-dynamic").decode_params
    assert quantize.is_quantized(qparams) and not quantize.is_quantized(fused)
    for block, qblock in zip(fused["decoder"]["blocks"], qparams["decoder"]["blocks"], strict=True):
        for sub in ("self_attn", "cross_attn", "ffn"):
            for key, value in block[sub].items():
                quantized = isinstance(qblock[sub][key], Int8Weight)
                assert quantized == (key in quantize.KERNEL_KEYS), (sub, key)
                if quantized:
                    assert qblock[sub][key].dynamic and qblock[sub][key].shape == value.shape
        assert qblock["ffn_norm"] is block["ffn_norm"]
    assert isinstance(qparams["lm_head"], Int8Weight)
    # The encoder stays in float (fused the same way, by the quantized model's own decode_params).
    int8 = lambda x: isinstance(x, Int8Weight)  # noqa: E731
    encoder = [jax.tree.leaves(p["encoder"], is_leaf=int8) for p in (qparams, fused)]
    assert len(encoder[0]) == len(encoder[1])
    for q, f in zip(*encoder, strict=True):
        assert not isinstance(q, Int8Weight) and q.dtype == f.dtype
        np.testing.assert_array_equal(np.asarray(q), np.asarray(f))
    assert qparams["decoder"]["rel_bias"] is fused["decoder"]["rel_bias"]
    assert model.quantize(None).quantization is None
    assert not quantize.is_quantized(model.params)  # training and save keep the float weights


@pytest.mark.parametrize("mode", ["int8", pytest.param("int8-dynamic", marks=pytest.mark.slow)])
def test_decoding_invariants_hold_with_int8_weights(model, batch, mode):
    """Weight-only int8 keeps every invariant float weights have. int8-dynamic rounds the
    activations, which can turn a last-bit float difference between a one-position step and a
    many-position deep pass (or between batch sizes) into a different int8 value, so for it
    they hold up to such flips; on this model there are none."""
    ids, mask = batch
    if mode == "int8":  # two rows, one row count: half the programs (gathered rows: test_free)
        ids, mask = ids[1:3], mask[1:3]
    qmodel = model.quantize(mode)

    def decode(**kw):
        kw = dict(method="full", max_new_tokens=T) | kw
        return free_jax.decode(qmodel, ids, attention_mask=mask, **kw)

    full = decode()
    # Exact mode and a never-exiting FREE equal full decoding of the same weights.
    for out in (
        decode(method="free", exit_layer=2, threshold=0.3, mode="exact"),
        decode(method="free", exit_layer=2, threshold=1.0),
    ):
        np.testing.assert_array_equal(out.tokens, full.tokens)
        np.testing.assert_array_equal(out.lengths, full.lengths)
    free = decode(method="free", exit_layer=2, threshold=0.3)
    assert 0 < free.exit_rate < 1
    # A batch decodes as each row alone (int8-dynamic rounds each row on its own scale; the
    # weight-only products are float products, as without quantization).
    for i in range(len(ids) if mode == "int8-dynamic" else 0):
        alone = free_jax.decode(
            qmodel,
            ids[i : i + 1],
            attention_mask=mask[i : i + 1],
            method="free",
            exit_layer=2,
            threshold=0.3,
            max_new_tokens=T,
        )
        np.testing.assert_array_equal(alone.tokens[0], free.tokens[i])


# Slow: another decode program; the column slices CALM's state copying takes are tested on
# their own (test_column_slices_multiply_like_the_same_columns_of_the_whole_product).
@pytest.mark.slow
def test_calm_with_int8_weights(model, batch):
    ids, mask = batch
    qmodel = model.quantize("int8")

    def decode(**kw):
        kw = dict(method="calm", exit_layer=2, calm_tau=None, max_new_tokens=T) | kw
        return free_jax.decode(qmodel, ids, attention_mask=mask, **kw)

    full = decode(method="full")
    never = decode(threshold=1.0)
    np.testing.assert_array_equal(never.tokens, full.tokens)
    np.testing.assert_array_equal(never.lengths, full.lengths)
    # CALM exiting at every token copies its state into the skipped blocks' K/V (column slices
    # of the fused int8 QKV) and emits the shallow model's tokens, as FREE does when all exit.
    always = decode(threshold=0.0)
    shallow = decode(method="free", threshold=0.0)
    assert always.exit_rate == 1.0 == shallow.exit_rate
    np.testing.assert_array_equal(always.tokens, shallow.tokens)


def test_int8_decoding_tracks_float_decoding_on_the_demo_model():
    from free_jax import data
    from free_jax.data import demo

    model = free_jax.load(demo.MODEL_DIR)
    examples = data.load_examples(demo.TASK_NAME, model.tokenizer, split="validation")
    examples = examples.select(range(24))
    ids = np.zeros((24, 64), np.int32)
    for i in range(24):
        source = examples.source_ids(i)
        ids[i, : len(source)] = source
    mask = (ids != 0).astype(np.int32)
    kw = dict(attention_mask=mask, max_new_tokens=64)
    reference = free_jax.decode(model, ids, **kw).texts
    for mode in quantize.MODES:
        texts = free_jax.decode(model.quantize(mode), ids, **kw).texts
        assert np.mean([a == b for a, b in zip(texts, reference, strict=True)]) >= 0.9, mode


def test_bad_quantization_settings_are_refused(model):
    with pytest.raises(InputError, match="'int4'.*int8, int8-dynamic"):
        model.quantize("int4")
    from free_jax.evaluation import bench

    with pytest.raises(
        InputError, match="weights='fp8' is invalid: one of f32, bf16, int8, int8-d"
    ):
        bench.with_decode_weights(model, "fp8")
    assert bench.with_decode_weights(model, "f32") is model
    assert bench.with_decode_weights(model, "int8-dynamic").quantization == "int8-dynamic"
    mesh = jax.make_mesh((1,), ("data",))
    with pytest.raises(InputError, match="not supported on a mesh"):
        model.quantize("int8").shard(mesh)
