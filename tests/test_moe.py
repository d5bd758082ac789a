"""Expert-parallel MoE layer on 8 simulated CPU devices; router-trace model training."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pipesched.kernels import grouped_matmul

from pipesched.moe import (
    ExpertPlan,
    Language,
    TransformerConfig,
    expert_mesh,
    expert_parallel_moe,
    held_out_tokens,
    init_moe_params,
    measured_loads,
    moe_reference,
    routing_traces,
    train_trace_model,
)
from pipesched.placement import Placement, PlacementInstance, batch_loads, placement_cost, validate_placement

MODEL_DIM, HIDDEN = 8, 12  # 12 splits evenly over 1, 2, 3, 4 and 6 replicas
PALLAS = functools.partial(grouped_matmul, interpret=True)


def _layer(num_experts, devices, slots, num_tokens, top_k, batch_size, seed=0, **kwargs):
    params = init_moe_params(jax.random.key(seed), MODEL_DIM, HIDDEN, num_experts)
    x = jax.random.normal(jax.random.key(seed + 1), (num_tokens, MODEL_DIM))
    plan = ExpertPlan.from_devices(devices, num_experts, slots, HIDDEN)
    out = expert_parallel_moe(params, x, plan=plan, mesh=expert_mesh(len(devices)), top_k=top_k,
                              batch_size=batch_size, **kwargs)
    return params, x, plan, out


def _routed_instance(out, num_experts, num_devices, slots, batch_size):
    trace = [tuple(int(e) for e in token) for token in np.asarray(out.routing.experts)]
    return PlacementInstance(num_experts, num_devices, slots, batch_size, trace)


REPLICATED = [[0, 1, 2], [3, 4, 0], [5, 0, 6], [7, 3, 1]]  # expert 0 three times, 1 and 3 twice


@pytest.mark.parametrize("matmul", [None, PALLAS], ids=["ragged_dot", "pallas"])
def test_equals_dense_reference_with_replicas(matmul):
    params, x, _, out = _layer(8, REPLICATED, 3, 32, 2, 4, matmul=matmul)
    assert int(out.dropped) == 0
    np.testing.assert_allclose(out.y, moe_reference(params, x, 2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("matmul", [None, PALLAS], ids=["ragged_dot", "pallas"])
def test_gradients_equal_dense_reference_gradients(matmul):
    params, x, plan, _ = _layer(8, REPLICATED, 3, 32, 2, 4)
    cotangent = jax.random.normal(jax.random.key(2), x.shape)
    mesh = expert_mesh(len(REPLICATED))

    def layer(p, tokens):
        out = expert_parallel_moe(p, tokens, plan=plan, mesh=mesh, top_k=2, batch_size=4, matmul=matmul)
        return jnp.sum(out.y * cotangent)

    got = jax.grad(layer, argnums=(0, 1))(params, x)
    want = jax.grad(lambda p, tokens: jnp.sum(moe_reference(p, tokens, 2) * cotangent), argnums=(0, 1))(params, x)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch_size", [1, 7, 100])
def test_measured_loads_reproduce_the_placement_cost(batch_size):
    _, _, plan, out = _layer(8, REPLICATED, 3, 32, 2, batch_size)
    instance = _routed_instance(out, 8, 4, 3, batch_size)
    measured = measured_loads(out, plan)
    np.testing.assert_allclose(measured, batch_loads(instance, REPLICATED), rtol=0, atol=1e-12)
    placement = Placement.from_devices(instance, REPLICATED, lower_bound=None, status="feasible", solver="test",
                                       solve_time_s=0.0)
    assert validate_placement(placement) == pytest.approx(measured.max(axis=1).mean(), abs=1e-12)
    assert out.rows.shape == measured.shape and np.all(np.asarray(out.rows) >= np.ceil(measured - 1e-9))


@st.composite
def placements(draw):
    num_devices = draw(st.sampled_from([2, 4]))
    slots = draw(st.integers(1, 3))
    num_experts = draw(st.integers(2, num_devices * slots))
    order = draw(st.permutations(range(num_devices * slots)))
    extra = draw(st.lists(st.integers(0, num_experts - 1), min_size=num_devices * slots - num_experts,
                          max_size=num_devices * slots - num_experts))
    devices = [[] for _ in range(num_devices)]
    for slot, e in zip(order, list(range(num_experts)) + extra, strict=True):
        if e not in devices[slot // slots]:
            devices[slot // slots].append(e)
    top_k = draw(st.integers(1, min(3, num_experts)))
    return num_experts, devices, slots, top_k


@settings(max_examples=3)
@given(setup=placements(), batch_size=st.sampled_from([1, 3, 16]), seed=st.integers(0, 100))
def test_random_placements_match_reference_and_cost(setup, batch_size, seed):
    num_experts, devices, slots, top_k = setup
    params, x, plan, out = _layer(num_experts, devices, slots, 16, top_k, batch_size, seed=seed)
    np.testing.assert_allclose(out.y, moe_reference(params, x, top_k), atol=1e-5, rtol=0)
    instance = _routed_instance(out, num_experts, len(devices), slots, batch_size)
    assert measured_loads(out, plan).max(axis=1).mean() == pytest.approx(placement_cost(instance, devices), abs=1e-12)


def test_small_capacity_drops_rows_and_reports_them():
    params, x, _, out = _layer(8, REPLICATED, 3, 32, 2, 4, capacity=2)
    assert int(out.dropped) > 0
    assert float(jnp.abs(out.y - moe_reference(params, x, 2)).max()) > 1e-3


def test_plan_errors_say_what_to_do():
    with pytest.raises(ValueError, match="divisible by every replica count"):
        ExpertPlan.from_devices([[0], [0], [1], [0], [0], [0]], 2, 1, HIDDEN)
    with pytest.raises(ValueError, match="on no device"):
        ExpertPlan.from_devices([[0], [0]], 2, 1, HIDDEN)
    plan = ExpertPlan.from_devices([[0], [1]], 2, 1, HIDDEN)
    params = init_moe_params(jax.random.key(0), MODEL_DIM, HIDDEN, 2)
    with pytest.raises(ValueError, match="axis 'expert' of size 2"):
        expert_parallel_moe(params, jnp.ones((8, MODEL_DIM)), plan=plan, mesh=expert_mesh(4), top_k=1, batch_size=1)


def test_synthetic_language_is_seeded_and_arithmetic_is_correct():
    language = Language(modulus=7)
    tokens = language.sample(40, 12, seed=3)
    np.testing.assert_array_equal(tokens, language.sample(40, 12, seed=3))
    assert tokens.min() >= 0 and tokens.max() < language.vocab_size
    sums = [row for row in tokens if row[1] == language.plus]
    assert sums and all((row[0] + row[2]) % 7 == row[4] and row[3] == language.equals for row in sums)


def test_tiny_model_trains_and_records_one_valid_trace_per_layer():
    language = Language(modulus=5, num_words=6, num_symbols=4)
    config = TransformerConfig(vocab_size=language.vocab_size, max_length=8, model_dim=16, hidden_dim=16,
                               num_heads=2, num_layers=2, num_experts=4, top_k=2)
    trained = train_trace_model(config, language, steps=30, batch=16, learning_rate=1e-2, progress=False)
    assert np.mean(trained.losses[-5:]) < trained.losses[0] - 0.5
    tokens = held_out_tokens(trained, 6)
    instances = routing_traces(trained.model, tokens, num_devices=2, slots_per_device=2, name="tiny")
    assert [inst.name for inst in instances] == ["tiny_layer0", "tiny_layer1"]
    for instance in instances:
        assert len(instance.trace) == tokens.size and {len(t) for t in instance.trace} == {2}
        assert PlacementInstance.from_dict(instance.to_dict()) == instance
    # The recorded routing is the routing of the layer's own parameters: the mesh layer reproduces it.
    layer = trained.model.blocks[0].moe
    x = jax.random.normal(jax.random.key(0), (8, config.model_dim))
    plan = ExpertPlan.from_devices([[0, 1], [2, 3]], 4, 2, config.hidden_dim)
    out = expert_parallel_moe(layer.params(), x, plan=plan, mesh=expert_mesh(2), top_k=2, batch_size=1)
    np.testing.assert_allclose(out.y, layer(x)[0], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(out.routing.experts, layer(x)[1])
