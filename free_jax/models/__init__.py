"""Models: the T5 family as pure functions, and the `Model` handle that carries one.

Owns: `T5Config` (`config`), the network (`t5`: encoder, decoder block ranges, exit head;
`layers`: the blocks both encoders share; `longt5`: LongT5's local and transient-global encoder),
the decoder KV cache (`kv_cache`), int8 decoder weights for decoding (`quantize`), in-place
conditionals the network and the loops share (`inplace`), the "meta" exit classifier
(`exit_classifier`), and `Model` with teacher-forced `forward` (`model`).

May import: `free_jax.errors` only. Everything else in free_jax builds on this package.
"""

from free_jax.models.config import T5Config
from free_jax.models.model import Model, forward

__all__ = ["Model", "T5Config", "forward"]
