"""Name and layout mapping between Hugging Face T5-family state dicts and free_jax param pytrees.

Hugging Face stores `torch.nn.Linear` weights as `[out, in]`; free_jax kernels are `[in, out]`.
The relative-attention table lives in block 0 there and at the stack level here (every segment
of the decoder needs it, not only the one that contains block 0).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np

from free_jax.errors import CheckpointError
from free_jax.models.config import T5Config
from free_jax.models.t5 import Params, param_shapes

# Tensors Hugging Face may save that carry no information of their own.
_REDUNDANT = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
# The encoder self-attention module's name, by `T5Config.encoder_attention_type`.
_ENCODER_ATTENTION = {
    "full": "SelfAttention",
    "local": "LocalSelfAttention",
    "transient-global": "TransientGlobalSelfAttention",
}


def _entries(config: T5Config, has_lm_head: bool) -> Iterator[tuple[str, tuple, bool]]:
    """Yields (HF name, free_jax path, transpose) for every parameter of the model."""
    yield "shared.weight", ("shared", "embedding"), False
    if has_lm_head:
        yield "lm_head.weight", ("lm_head",), True
    ffn = ("wi_0", "wi_1", "wo") if config.is_gated_act else ("wi", "wo")
    for stack, n_blocks in (("encoder", config.num_layers), ("decoder", config.num_decoder_layers)):
        sa = (
            "SelfAttention"
            if stack == "decoder"
            else _ENCODER_ATTENTION[config.encoder_attention_type]
        )
        global_tokens = stack == "encoder" and config.encoder_attention_type == "transient-global"
        yield (
            f"{stack}.block.0.layer.0.{sa}.relative_attention_bias.weight",
            (stack, "rel_bias"),
            False,
        )
        if global_tokens:
            yield (
                f"{stack}.block.0.layer.0.{sa}.global_relative_attention_bias.weight",
                (stack, "global_rel_bias"),
                False,
            )
        yield f"{stack}.final_layer_norm.weight", (stack, "final_norm"), False
        for i in range(n_blocks):
            hf = f"{stack}.block.{i}.layer"
            ours = (stack, "blocks", i)
            for m in "qkvo":
                yield f"{hf}.0.{sa}.{m}.weight", (*ours, "self_attn", m), True
            if global_tokens:
                yield (
                    f"{hf}.0.{sa}.global_input_layer_norm.weight",
                    (*ours, "self_attn", "global_norm"),
                    False,
                )
            yield f"{hf}.0.layer_norm.weight", (*ours, "self_attn_norm"), False
            ff = 1
            if stack == "decoder":
                for m in "qkvo":
                    yield f"{hf}.1.EncDecAttention.{m}.weight", (*ours, "cross_attn", m), True
                yield f"{hf}.1.layer_norm.weight", (*ours, "cross_attn_norm"), False
                ff = 2
            for m in ffn:
                yield f"{hf}.{ff}.DenseReluDense.{m}.weight", (*ours, "ffn", m), True
            yield f"{hf}.{ff}.layer_norm.weight", (*ours, "ffn_norm"), False


def _get(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: Any, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def hf_to_params(
    config: T5Config, state: Mapping[str, np.ndarray], *, source: str = "checkpoint"
) -> tuple[Params, T5Config]:
    """Converts a Hugging Face T5 state dict (NumPy arrays) to a free_jax parameter pytree.

    The head is untied exactly when the state has an `lm_head.weight` that is not the embedding.
    Shapes are checked against the config; a mismatch or a missing tensor names the tensor.

    Args:
      config: the model configuration; `tie_word_embeddings` is overridden by the weights.
      state: HF tensor name -> array.
      source: where the state came from, for error messages.

    Returns:
      A tuple (params, config), the config's `tie_word_embeddings` set from the weights.
    """
    if "shared.weight" not in state:
        # Some exporters keep only a stack's copy of the tied embedding. Resolve the alias before
        # deciding about the head, or a tied `lm_head.weight` would look like a separate head.
        for alias in _REDUNDANT:
            if alias in state:
                state = {**state, "shared.weight": state[alias]}
                break
    has_lm_head = "lm_head.weight" in state and not (
        "shared.weight" in state and np.array_equal(state["lm_head.weight"], state["shared.weight"])
    )
    config = config.replace(tie_word_embeddings=not has_lm_head)
    shapes = param_shapes(config)
    params = jax.tree.map(lambda _: None, shapes, is_leaf=lambda x: hasattr(x, "shape"))
    missing = []
    used = set()
    for name, path, transpose in _entries(config, has_lm_head):
        if name not in state:
            missing.append(name)
            continue
        used.add(name)
        array = np.asarray(state[name])
        if transpose:
            array = array.T
        expected = tuple(_get(shapes, path).shape)
        if tuple(array.shape) != expected:
            got = tuple(array.T.shape) if transpose else tuple(array.shape)
            want = tuple(reversed(expected)) if transpose else expected
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {got}, but the config expects {want} "
                f"(d_model={config.d_model}, d_kv={config.d_kv}, num_heads={config.num_heads}, "
                f"d_ff={config.d_ff}, vocab_size={config.vocab_size})."
            )
        _set(params, path, array)
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(
            f"{source}: {len(missing)} tensor(s) the config requires are missing: {shown}{more}."
        )
    extra = sorted(
        set(state)
        - used
        - set(_REDUNDANT)
        - {
            "lm_head.weight",
            "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",
        }
    )
    if extra:
        import warnings

        warnings.warn(
            f"{source}: ignoring {len(extra)} tensor(s) a T5 model does not use, e.g. {extra[:3]}.",
            stacklevel=2,
        )
    return params, config


def params_to_hf(config: T5Config, params: Params) -> dict[str, np.ndarray]:
    """Converts a free_jax parameter pytree to a Hugging Face T5 state dict (NumPy, contiguous)."""
    has_lm_head = "lm_head" in params
    state = {}
    for name, path, transpose in _entries(config, has_lm_head):
        array = np.asarray(jax.device_get(_get(params, path)))
        state[name] = np.ascontiguousarray(array.T if transpose else array)
    return state
