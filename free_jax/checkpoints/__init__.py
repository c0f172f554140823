"""Checkpoints: reading and writing models in every format a user has.

Owns: `load` (`loading`: dispatch by what a path or hub name holds), Hugging Face directories and
their weight formats (`hf`; readers for Flax msgpack in `flax_msgpack` and for PyTorch
pickles without torch in `torch_pickle`), the name and layout mapping to free_jax's parameter pytree
(`hf_names`), hub downloads (`hub`), and free_jax's own orbax format (`orbax_format`).

May import: `free_jax.models` and `free_jax.errors`; never decoding, data, evaluation or cli.
"""

from free_jax.checkpoints.hf import export_hf, read_hf_config, read_hf_weights
from free_jax.checkpoints.loading import load
from free_jax.checkpoints.orbax_format import read_metadata, save

__all__ = ["export_hf", "load", "read_hf_config", "read_hf_weights", "read_metadata", "save"]
