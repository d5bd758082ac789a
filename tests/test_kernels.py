"""The Pallas grouped matmul equals jax.lax.ragged_dot, gradients included: compiled on GPU, in
interpret mode elsewhere."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pipesched.kernels import (
    Tiling,
    compiled_backend,
    grouped_matmul,
    grouped_matmul_reference,
    transposed_grouped_matmul,
)

TILING = Tiling(m=8, k=8, n=8)  # compiled, tiles grow to Triton's minimum of 16
INTERPRET = not compiled_backend()


def _operands(rng, group_sizes, m, k, n, dtype=jnp.float32):
    lhs = jnp.asarray(rng.normal(size=(m, k)), dtype)
    rhs = jnp.asarray(rng.normal(size=(len(group_sizes), k, n)), dtype)
    return lhs, rhs, jnp.asarray(group_sizes, jnp.int32)


# random problems: group sizes (empty groups included), rows past the groups, feature sizes, seed
RANDOM_PROBLEMS = given(
    group_sizes=st.lists(st.integers(0, 12), min_size=1, max_size=6),
    spare_rows=st.integers(0, 9),
    k=st.integers(1, 20),
    n=st.integers(1, 20),
    seed=st.integers(0, 2**16),
)


@settings(max_examples=10)
@RANDOM_PROBLEMS
def test_equals_ragged_dot_on_random_group_sizes(group_sizes, spare_rows, k, n, seed):
    m = max(1, sum(group_sizes) + spare_rows)
    lhs, rhs, sizes = _operands(np.random.default_rng(seed), group_sizes, m, k, n)
    out = grouped_matmul(lhs, rhs, sizes, tiling=TILING, interpret=INTERPRET)
    np.testing.assert_allclose(out, grouped_matmul_reference(lhs, rhs, sizes), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group_sizes", [[0, 0, 16, 0], [0, 0, 0, 0], [5, 0, 0, 11], [16, 0, 0, 0], [0, 0, 0, 16]])
def test_empty_groups_at_every_position(group_sizes):
    lhs, rhs, sizes = _operands(np.random.default_rng(1), group_sizes, 16, 12, 10)
    out = grouped_matmul(lhs, rhs, sizes, tiling=TILING, interpret=INTERPRET)
    np.testing.assert_allclose(out, grouped_matmul_reference(lhs, rhs, sizes), rtol=1e-5, atol=1e-5)


def test_rows_past_the_groups_are_zero_and_bfloat16_inputs_accumulate_in_float32():
    lhs, rhs, sizes = _operands(np.random.default_rng(2), [3, 0, 4], 13, 16, 16, jnp.bfloat16)
    out = grouped_matmul(lhs, rhs, sizes, tiling=TILING, interpret=INTERPRET, preferred_element_type=jnp.float32)
    assert out.dtype == jnp.float32
    assert not np.any(np.asarray(out[7:]))
    rows_rhs = jnp.asarray(rhs, jnp.float32)[jnp.array([0, 0, 0, 2, 2, 2, 2])]
    expected = jnp.einsum("mk,mkn->mn", jnp.asarray(lhs[:7], jnp.float32), rows_rhs)
    np.testing.assert_allclose(out[:7], expected, rtol=1e-5, atol=1e-4)


@settings(max_examples=5)
@RANDOM_PROBLEMS
def test_gradients_equal_ragged_dot_gradients(group_sizes, spare_rows, k, n, seed):
    rng = np.random.default_rng(seed)
    m = max(1, sum(group_sizes) + spare_rows)
    lhs, rhs, sizes = _operands(rng, group_sizes, m, k, n)
    cotangent = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)

    def gradients(matmul, **kwargs):
        return jax.grad(lambda a, b: jnp.sum(matmul(a, b, sizes, **kwargs) * cotangent), argnums=(0, 1))(lhs, rhs)

    for got, want in zip(gradients(grouped_matmul, tiling=TILING, interpret=INTERPRET),
                         gradients(grouped_matmul_reference)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bfloat16_gradients_of_float32_outputs_stay_close_to_ragged_dot():
    rng = np.random.default_rng(5)
    lhs, rhs, sizes = _operands(rng, [5, 0, 9, 2], 20, 16, 16, jnp.bfloat16)
    cotangent = jnp.asarray(rng.normal(size=(20, 16)), jnp.float32)

    def gradients(matmul, **kwargs):
        loss = lambda a, b: jnp.sum(matmul(a, b, sizes, **kwargs).astype(jnp.float32) * cotangent)  # noqa: E731
        return jax.grad(loss, argnums=(0, 1))(lhs, rhs)

    got = gradients(grouped_matmul, tiling=TILING, interpret=INTERPRET, preferred_element_type=jnp.float32)
    for g, want in zip(got, gradients(grouped_matmul_reference)):
        assert g.dtype == jnp.bfloat16
        scale = float(jnp.abs(want.astype(jnp.float32)).max())
        np.testing.assert_allclose(g.astype(jnp.float32), want.astype(jnp.float32), atol=2e-2 * scale, rtol=0)


def test_transposed_product_accumulates_bfloat16_in_float32_and_zeroes_empty_groups():
    rng = np.random.default_rng(4)
    lhs = jnp.asarray(rng.normal(size=(13, 16)), jnp.bfloat16)
    dout = jnp.asarray(rng.normal(size=(13, 16)), jnp.bfloat16)
    sizes = jnp.array([3, 0, 4, 0], jnp.int32)  # rows 7-12 belong to no group
    out = transposed_grouped_matmul(lhs, dout, sizes, tiling=TILING, interpret=INTERPRET,
                                    preferred_element_type=jnp.float32)
    assert out.shape == (4, 16, 16) and out.dtype == jnp.float32
    assert not np.any(np.asarray(out[1])) and not np.any(np.asarray(out[3]))
    wide_lhs, wide_dout = jnp.asarray(lhs, jnp.float32), jnp.asarray(dout, jnp.float32)
    np.testing.assert_allclose(out[0], wide_lhs[:3].T @ wide_dout[:3], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out[2], wide_lhs[3:7].T @ wide_dout[3:7], rtol=1e-5, atol=1e-4)


def test_rejects_mismatched_shapes():
    lhs, rhs, sizes = _operands(np.random.default_rng(3), [2, 2], 4, 3, 5)
    with pytest.raises(ValueError, match="group_sizes must have shape"):
        grouped_matmul(lhs, rhs, sizes[:1], interpret=INTERPRET)
