"""Int8 decoder weights for decoding: per-output-channel scales, two ways to multiply.

`Model.quantize` (off by default) replaces the decode-layout kernels of every decoder block (the
self- and cross-attention projections, the feed-forward kernels) and the LM head with
`Int8Weight`s: int8 values `q` [in, out] and one float32 scale per output column, `w ~ q * scale`
with `scale = max|w[:, j]| / 127` (symmetric, round to nearest). Norms, the relative-position bias
tables, the embedding (read by lookup) and the encoder keep their dtype: the encoder and the
embedding run once per input, the decoder's kernels once per generated token.

The product `x @ w` is written in the network as it is for a float kernel (`Int8Weight`
implements `__rmatmul__`), computed one of two ways:

- `"int8"`, weight-only: `(x @ q.astype(x.dtype)) * scale`. Activations keep their precision.
  Where the compiler fuses the int8-to-float conversion into the product (accelerators), each
  step reads a quarter of the f32 weight bytes. XLA's CPU backend (jax 0.10) does not: it
  converts each kernel to float32 and then multiplies, slower than float32 weights
  (`benchmarks/bench_decode.py --weights`). Left alone, it would also hoist the conversions out
  of the decode loop and hold a float32 copy of every kernel for the whole call (t5-small: 159
  MiB of temporaries instead of 2.6); the conversion takes a (never true) data dependence on
  the activations so that it stays inside the step, one kernel at a time.
- `"int8-dynamic"`: each row of `x` is also quantized, at run time, to int8 with its own scale
  (`max|x_row| / 127`), and the product is an int8 x int8 -> int32 `dot`, rescaled by both
  scales. This is the product XLA's CPU backend does fast (about twice the float32 rate at these
  shapes); it rounds the activations too, so its quality delta is larger. A single row is padded
  to two: XLA CPU's int8 product at one row falls to the slow path as well.

Quantized models decode (`free_jax.decode`, every method); their `params` stay float, so
training, `forward` and `save` use the float weights.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

from free_jax.errors import InputError

Array = jax.Array

#: The ways `Model.quantize` can multiply by int8 weights (see the module docstring).
MODES = ("int8", "int8-dynamic")

#: Decoder-block kernels that are quantized, by their key in the decode layout (both the fused
#: and the unfused layouts of `t5.fuse_for_decoding`).
KERNEL_KEYS = frozenset({"qkv", "q", "k", "v", "o", "wi_fused", "wi", "wi_0", "wi_1", "wo"})

_QMAX = 127.0


@flax.struct.dataclass
class Int8Weight:
    """A [in, out] kernel as int8 values and float32 per-column scales; `x @ w` multiplies.

    Attributes:
      q: int8[in, out].
      scale: float32[out], so that the kernel is `q * scale`.
      dynamic: quantize the activations too (the `"int8-dynamic"` mode).
    """

    q: Array
    scale: Array
    dynamic: bool = flax.struct.field(pytree_node=False, default=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    @property
    def ndim(self) -> int:
        return self.q.ndim

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes

    def __getitem__(self, index: Any) -> Int8Weight:
        """Column slices (`w[:, a:b]`), as CALM's state copying takes K/V out of a fused QKV."""
        if not (isinstance(index, tuple) and len(index) == 2 and index[0] == slice(None)):
            raise TypeError(f"Int8Weight supports column slices w[:, cols], not {index!r}.")
        return Int8Weight(self.q[index], self.scale[index[1]], self.dynamic)

    def dequantize(self, dtype: Any = jnp.float32) -> Array:
        return (self.q.astype(jnp.float32) * self.scale).astype(dtype)

    def matmul(self, x: Array, out_dtype: Any = None) -> Array:
        """`x @ w` for x [..., in]; the result in `out_dtype` (default x's dtype)."""
        out_dtype = out_dtype or x.dtype
        if not self.dynamic:
            # `x > inf` is always false: it keeps the conversion in the step (module docstring).
            q = self.q + (x.reshape(-1)[0] > jnp.inf).astype(jnp.int8)
            y = jnp.dot(x, q.astype(x.dtype), preferred_element_type=jnp.float32)
            return (y * self.scale).astype(out_dtype)
        lead, d = x.shape[:-1], x.shape[-1]
        rows = x.reshape(-1, d).astype(jnp.float32)
        row_scale = jnp.max(jnp.abs(rows), axis=-1, keepdims=True) / _QMAX
        row_scale = jnp.where(row_scale > 0, row_scale, 1.0)  # an all-zero row stays zero
        xq = jnp.round(rows / row_scale).astype(jnp.int8)
        n = xq.shape[0]
        if n == 1:  # XLA CPU's int8 product is slow at one row, fast at two
            xq = jnp.pad(xq, ((0, 1), (0, 0)))
        y = jax.lax.dot(xq, self.q, preferred_element_type=jnp.int32)[:n]
        y = y.astype(jnp.float32) * row_scale * self.scale
        return y.reshape(*lead, -1).astype(out_dtype)

    def __rmatmul__(self, x: Array) -> Array:
        return self.matmul(x)


def quantize_kernel(w: Array, dynamic: bool = False) -> Int8Weight:
    """Symmetric per-output-column int8 quantization of a [in, out] kernel."""
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D kernel [in, out], got shape {w.shape}.")
    w32 = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w32), axis=0) / _QMAX
    scale = jnp.where(scale > 0, scale, 1.0)  # an all-zero column stays zero
    q = jnp.clip(jnp.round(w32 / scale), -_QMAX, _QMAX).astype(jnp.int8)
    return Int8Weight(q, scale.astype(jnp.float32), dynamic)


def check_mode(mode: Any) -> str:
    if mode not in MODES:
        raise InputError(f"quantization={mode!r} is invalid: one of {', '.join(MODES)}.")
    return mode


def quantize_decode_params(params: dict[str, Any], mode: str) -> dict[str, Any]:
    """Decode-layout params (`t5.fuse_for_decoding`) with the decoder blocks' kernels and the LM
    head as `Int8Weight`s; every other array is shared, not copied."""
    dynamic = check_mode(mode) == "int8-dynamic"

    def sublayer(p: dict[str, Any]) -> dict[str, Any]:
        return {
            k: quantize_kernel(v, dynamic) if k in KERNEL_KEYS and v.ndim == 2 else v
            for k, v in p.items()
        }

    blocks = [
        {k: sublayer(v) if isinstance(v, dict) else v for k, v in block.items()}
        for block in params["decoder"]["blocks"]
    ]
    out = {**params, "decoder": {**params["decoder"], "blocks": blocks}}
    out["lm_head"] = quantize_kernel(params["lm_head"], dynamic)
    return out


def is_quantized(params: Any) -> bool:
    """Whether a parameter tree holds `Int8Weight`s."""
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, Int8Weight))
    return any(isinstance(x, Int8Weight) for x in leaves)
