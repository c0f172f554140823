"""The published T5 v1.0 shapes that benchmarks build random models of.

One place for them, so that every benchmark's (and `free-jax bench`'s) "t5-small" or "t5-base" is
the same network: ReLU feed-forward, head tied to the embedding, decoder output rescaled (v1.0),
vocabulary 32128, heads of 64.
"""

from __future__ import annotations

from free_jax.models.config import T5Config

# name: (d_model, d_ff, blocks per stack, heads)
_SIZES = {
    "t5-small": (512, 2048, 6, 8),
    "t5-base": (768, 3072, 12, 12),
    "t5-large": (1024, 4096, 24, 16),
}
NAMES = tuple(_SIZES)


def t5_v1_0(name: str) -> T5Config:
    """The config of a T5 v1.0 checkpoint of the given size ("t5-small", "t5-base", "t5-large")."""
    if name not in _SIZES:
        raise ValueError(f"unknown T5 shape {name!r}; known: {', '.join(NAMES)}")
    d_model, d_ff, blocks, heads = _SIZES[name]
    return T5Config(
        vocab_size=32128,
        d_model=d_model,
        d_kv=64,
        d_ff=d_ff,
        num_layers=blocks,
        num_decoder_layers=blocks,
        num_heads=heads,
        dense_act_fn="relu",
        is_gated_act=False,
        tie_word_embeddings=True,
        scale_decoder_outputs=True,
    )
