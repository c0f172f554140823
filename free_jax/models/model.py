"""`Model` (a config, its parameters, maybe a tokenizer) and teacher-forced `forward`."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from free_jax.errors import InputError
from free_jax.models import quantize, t5
from free_jax.models.config import T5Config


@dataclasses.dataclass(frozen=True)
class Model:
    """A loaded or freshly built model.

    Attributes:
      config: the architecture.
      params: the parameter pytree (layout in `free_jax.models.t5`).
      tokenizer: a `transformers` tokenizer, or None when the checkpoint has none.
      metadata: what the checkpoint was saved with besides the weights (`free_jax.save`'s
        `metadata`); under "free", the FREE settings training chose (`exit_layer`,
        `confidence`, `threshold`), which `free_jax.decode` uses as its defaults.
    """

    config: T5Config
    params: t5.Params
    tokenizer: Any = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    quantization: str | None = None

    @functools.cached_property
    def decode_params(self) -> t5.Params:
        """`params` in decode layout (`t5.fuse_for_decoding`), made on first use and kept,
        so that decoding does not rearrange the weights on every call; with `quantization`,
        the decoder's kernels and LM head in int8 (`free_jax.models.quantize`).

        The fused kernels are new arrays: they cost as much memory again as the encoder's and
        decoder's self-attention Q/K/V and gated feed-forward input kernels (and, with a tied
        head, the embedding); the decoder's take a quarter of that in int8 (the encoder stays
        in float). `release_decode_params` frees them.
        """
        fused = t5.fuse_for_decoding(self.params)
        if self.quantization is None:
            return fused
        return quantize.quantize_decode_params(fused, self.quantization)

    @functools.cached_property
    def int8_exit_head(self) -> quantize.Int8Weight:
        """The LM head FREE's shallow exit uses with `decode(..., shallow_head="int8-dynamic")`:
        `decode_params`' head in int8 (per-column scales; activations rounded to int8 per row,
        so that the product is XLA CPU's fast int8 one). Made on first use and kept: a quarter
        of the head's float32 bytes again. `release_decode_params` frees it."""
        # Made eagerly even when first asked for inside a trace (a method's `run` under `jit`):
        # a traced copy would be cached here and leak out of that trace.
        with jax.ensure_compile_time_eval():
            head = self.decode_params["lm_head"]
            if isinstance(head, quantize.Int8Weight):  # the model decodes in int8 already
                return head.replace(dynamic=True)
            return quantize.quantize_kernel(head, dynamic=True)

    def quantize(self, mode: str | None = "int8") -> Model:
        """The same model decoding with int8 decoder weights (per-output-channel scales).

        `mode` is `"int8"` (weight-only: activations keep their precision) or `"int8-dynamic"`
        (activations rounded to int8 per row at run time, so that the products are int8 x int8,
        the fast ones on XLA's CPU backend); None decodes with the float weights again. See
        `free_jax.models.quantize` for what is quantized and what each mode costs. Only decoding
        uses the int8 weights: `params`, `forward`, training and `save` keep the float ones.

        Raises:
          InputError: an unknown `mode`.
        """
        if mode is not None:
            quantize.check_mode(mode)
        return dataclasses.replace(self, quantization=mode)

    def release_decode_params(self) -> None:
        """Drops the cached `decode_params` and `int8_exit_head` (the next decode makes them
        again)."""
        self.__dict__.pop("decode_params", None)
        self.__dict__.pop("int8_exit_head", None)

    def shard(self, mesh: Any) -> Model:
        """The model with its parameters (and `decode_params`) placed on a decoding mesh.

        `mesh` is a `jax.sharding.Mesh` with a `data` axis, over which the parameters are
        replicated, and optionally a `model` axis, over which they are split for tensor
        parallelism (`free_jax.models.partition`: heads, `d_ff` and the vocabulary; GSPMD adds
        the reductions), so that each device holds about 1/N of the weights. Parameters in any
        other layout (e.g. FSDP-sharded by training) are re-laid-out here, once, and the
        decode-layout weights are made directly in their sharded layout; call it once and decode
        many batches with the result. A model already placed so is returned as it is (its cached
        `decode_params` kept).

        Raises:
          InputError: `mesh` has no `data` axis or other axes, or its `model` axis does not
            divide `num_heads`, `d_ff` or `vocab_size`.
        """
        from free_jax.models import partition

        if self.quantization is not None:
            raise InputError(
                f"quantization={self.quantization!r} is not supported on a mesh: shard the "
                "float model (`model.quantize(None).shard(mesh)`)."
            )
        mesh = partition.check_mesh(mesh)
        shardings = partition.param_shardings(self.params, self.config, mesh)
        if partition.is_placed(self.params, shardings):
            return self
        model = dataclasses.replace(self, params=partition.place(self.params, shardings))
        size = partition.model_axis_size(mesh)
        # Split over `model`, the decoder's kernels stay unfused (see `t5.UNFUSED_KEY`).
        fuse = functools.partial(t5.fuse_for_decoding, fuse_blocks=size == 1)
        abstract = jax.eval_shape(fuse, model.params)
        fused_shardings = jax.tree.map(
            lambda spec: jax.sharding.NamedSharding(mesh, spec),
            partition.param_specs(abstract, size),
        )
        fused = jax.jit(fuse, out_shardings=fused_shardings)(model.params)
        model.__dict__["decode_params"] = fused  # what the cached property would make, laid out
        return model

    @property
    def dtype(self) -> Any:
        """The dtype of the parameters, which activations follow."""
        return self.params["shared"]["embedding"].dtype

    def astype(self, dtype: Any) -> Model:
        """The same model with floating-point parameters cast to `dtype`."""
        return dataclasses.replace(self, params=t5.cast_params(self.params, dtype))

    @classmethod
    def random(
        cls, config: T5Config, seed: int = 0, *, dtype: Any = jnp.float32, tokenizer: Any = None
    ) -> Model:
        """A randomly initialised model (for tests, benchmarks and demos)."""
        params = t5.init_params(config, jax.random.key(seed), dtype)
        return cls(config=config, params=params, tokenizer=tokenizer)


def check_token_ids(name: str, ids: Any, vocab_size: int) -> np.ndarray:
    """Validates a 2-D array of token ids on the host; returns it as int32 NumPy."""
    array = np.asarray(ids)
    if array.ndim != 2:
        raise InputError(
            f"{name} must be a 2-D integer array [batch, length], got shape {array.shape}"
            + (" (add a batch axis: ids[None])" if array.ndim == 1 else "")
            + "."
        )
    if not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"{name} must hold integer token ids, got dtype {array.dtype}.")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InputError(f"{name} is empty (shape {array.shape}); give at least one token per row.")
    low, high = int(array.min()), int(array.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise InputError(
            f"{name} holds token id {bad}, outside the model's vocabulary [0, {vocab_size})."
        )
    return array.astype(np.int32)


def check_exit_layer(exit_layer: int | None, config: T5Config) -> int:
    L = config.num_decoder_layers
    if exit_layer is None:
        return L
    if isinstance(exit_layer, bool) or not isinstance(exit_layer, int | np.integer):
        raise InputError(f"exit_layer must be an int in [1, {L}], got {exit_layer!r}.")
    if not 1 <= exit_layer <= L:
        raise InputError(
            f"exit_layer={exit_layer} is outside [1, {L}] (the model has {L} decoder blocks)."
        )
    return int(exit_layer)


@functools.partial(jax.jit, static_argnames=("config", "exit_layer"))
def _forward_logits(params, input_ids, decoder_input_ids, attention_mask, *, config, exit_layer):
    out = t5.forward(
        params, config, input_ids, decoder_input_ids, attention_mask, exit_layer=exit_layer
    )
    return out.logits


def forward(
    model: Model,
    input_ids: Any,
    decoder_input_ids: Any,
    *,
    attention_mask: Any = None,
    exit_layer: int | None = None,
) -> jax.Array:
    """Teacher-forced logits read at the exit after decoder block `exit_layer`.

    Args:
      model: the model.
      input_ids: int[B, S] source token ids.
      decoder_input_ids: int[B, T] decoder inputs (the start token, then the target shifted right).
      attention_mask: [B, S], nonzero for real source tokens; default all ones.
      exit_layer: decoder blocks to run before the shared exit head, in [1, L]; default L.

    Returns:
      float32[B, T, V] logits.
    """
    config = model.config
    input_ids = check_token_ids("input_ids", input_ids, config.vocab_size)
    decoder_input_ids = check_token_ids("decoder_input_ids", decoder_input_ids, config.vocab_size)
    if decoder_input_ids.shape[0] != input_ids.shape[0]:
        raise InputError(
            f"decoder_input_ids has batch {decoder_input_ids.shape[0]} but input_ids has "
            f"batch {input_ids.shape[0]}; they must match."
        )
    if attention_mask is None:
        attention_mask = np.ones_like(input_ids)
    attention_mask = np.asarray(attention_mask)
    if attention_mask.shape != input_ids.shape:
        raise InputError(
            f"attention_mask has shape {attention_mask.shape}; it must match input_ids "
            f"{input_ids.shape}."
        )
    exit_layer = check_exit_layer(exit_layer, config)
    return _forward_logits(
        model.params,
        input_ids,
        decoder_input_ids,
        attention_mask.astype(np.int32),
        config=config,
        exit_layer=exit_layer,
    )
