"""The XLA settings decoding programs are compiled with, scoped to those programs.

A decode step at batch 1 to 32 is a chain of small operations: matrix-vector products, a
softmax over a few dozen cached positions, reductions over 128 to 768 features. XLA's CPU
backend hands some of them (matrix products and the reductions and element-wise operations
around them) to YNNPACK, as "YNN fusions". On a 2-core AMD EPYC virtual machine each such call
cost 40 to 70 us under the profiler whatever its size, where XLA's own kernel for the same
operation takes 2 to 8 us; FREE's deep passes, which run the deep blocks over a few positions,
were made of them. Measured there, side by side (`benchmarks/bench_decode.py --xla-option`
for t5-small; for the demo, both versions of the programs compiled in one process and run
interleaved over 100 test sentences, 3 rounds):

- t5-small shape, full decoding: 1.04x faster at batch 1, 1.30x at batch 8;
- demo model, batch 1: FREE at its saved threshold 1.67x -> 1.98x over full decoding (each
  over its own full decoding), exact mode 1.04x -> 1.33x; tokens identical.

So every decode program (the encoder call and each method's loop) is compiled without YNN
fusions on the CPU backend. The option goes to that program's compilation only
(`jax.jit(..., compiler_options=...)`): a user's own jitted code, training and the process's
XLA flags are untouched. On other backends the programs compile with no extra options.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

#: XLA options for decoding programs on the CPU backend. The YNN fusion types name the kinds of
#: operations XLA may give YNNPACK; convolutions only (a T5 has none) keeps every matrix
#: product, reduction and element-wise operation in XLA's own kernels.
CPU_COMPILER_OPTIONS: dict[str, str] = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
}


class DecodeJit:
    """`jax.jit(fun, **jit_kwargs)`, compiled with `CPU_COMPILER_OPTIONS` on the CPU backend.

    Holds two jitted versions of `fun` and calls the one for `jax.default_backend()`, so that
    options meant for XLA's CPU compiler never reach another backend's. (Telling a nested call
    apart before calling would mean walking the parameters' pytree on every call: 60 us on the
    demo model, a whole decode call being about 7 ms.)
    """

    def __init__(self, fun: Callable, **jit_kwargs: Any):
        functools.update_wrapper(self, fun)
        self._cpu = jax.jit(fun, compiler_options=CPU_COMPILER_OPTIONS, **jit_kwargs)
        self._other = jax.jit(fun, **jit_kwargs)

    def _jitted(self):
        return self._cpu if jax.default_backend() == "cpu" else self._other

    def __call__(self, *args, **kwargs):
        jitted = self._jitted()
        try:
            return jitted(*args, **kwargs)
        except ValueError as error:
            # JAX takes compiler options only on a top-level jit. Called inside another traced
            # program (a mesh decode, a benchmark's wrapper), this is part of that program,
            # compiled with that program's options (the refused attempt costs one more trace,
            # at that program's trace time only).
            if jitted is self._other or "top-level" not in str(error):
                raise
            return self._other(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self._jitted().lower(*args, **kwargs)

    def _cache_size(self) -> int:
        """Programs compiled so far (both versions), as `jax.jit`'s own `_cache_size`."""
        return self._cpu._cache_size() + self._other._cache_size()


def decode_jit(fun: Callable | None = None, **jit_kwargs: Any):
    """Decorator: `jax.jit` for a decoding program, with the decoding XLA options on CPU.

    Used as `@decode_jit` or `@decode_jit(static_argnames=(...))`.
    """
    if fun is None:
        return functools.partial(decode_jit, **jit_kwargs)
    return DecodeJit(fun, **jit_kwargs)
