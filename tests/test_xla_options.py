"""The XLA options decoding programs compile with stay on those programs."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from free_jax import decoding, testing
from free_jax.decoding import xla_options

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu", reason="the options are for XLA's CPU compiler"
)


def _user_program(a, b):
    return jnp.tanh(a @ b).sum(-1)


def _count_ynn_fusions(hlo: str) -> int:
    return len(re.findall(r"%ynn_fusion[.\d]* = ", hlo))


def _ynn_fusions(jitted, *args) -> int:
    return _count_ynn_fusions(jitted.lower(*args).compile().as_text())


def test_decode_programs_compile_without_ynn_fusions_and_user_programs_keep_them():
    a, b = jnp.ones((16, 128)), jnp.ones((128, 1024))
    flags_before = os.environ.get("XLA_FLAGS")
    user_before = _ynn_fusions(jax.jit(_user_program), a, b)
    # XLA's default gives this product to YNNPACK; if that ever changes, so may the option.
    assert user_before > 0

    model = testing.tiny_model(seed=0)
    ids = np.array([[5, 6, 7, 1]], np.int32)
    output = decoding.decode(model, ids, max_new_tokens=4, method="full")
    assert output.tokens.shape == (1, 4)
    encoded = decoding.encode_source(
        model.params, ids, np.ones_like(ids), config=model.config, length=4
    )
    decode_program = decoding.greedy_full.lower(
        model.decode_params, *encoded, config=model.config, max_new_tokens=4
    )
    assert _count_ynn_fusions(decode_program.compile().as_text()) == 0
    # The same product in a decode program: no YNN fusion either.
    assert _ynn_fusions(xla_options.decode_jit(_user_program), a, b) == 0

    # A user's program compiled after decoding is compiled as before it, and nothing global moved.
    assert _ynn_fusions(jax.jit(lambda a, b: _user_program(a, b) + 0), a, b) == user_before
    assert os.environ.get("XLA_FLAGS") == flags_before


def test_decode_jit_counts_the_programs_it_compiled():
    double = xla_options.decode_jit(lambda x: 2 * x)
    before = double._cache_size()
    np.testing.assert_array_equal(double(jnp.arange(3)), [0, 2, 4])
    double(jnp.arange(3))
    assert double._cache_size() == before + 1


def test_a_decode_program_inside_another_jitted_program_is_part_of_it():
    double = xla_options.decode_jit(lambda x: 2 * x)
    outer = jax.jit(lambda x: double(x) + 1)  # JAX refuses compiler options on a nested jit
    np.testing.assert_array_equal(outer(jnp.arange(3)), [1, 3, 5])
    with pytest.raises(TypeError, match="unsupported operand"):
        xla_options.decode_jit(lambda x: x + "a")(jnp.arange(3))  # other errors still surface
