"""Remat graphs traced from JAX losses, and schedules applied back to them (issue 4, JAX side)."""

import math

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pipesched.solvers import solve_remat

from pipesched.remat import (
    GPTConfig,
    RematSchedule,
    apply,
    equation_flops,
    evaluate_steps,
    gpt_problem,
    kept_names,
    memory_report,
    mlp_problem,
    policy_kept,
    policy_schedule,
    realized_steps,
    remat_instance_from_jax,
    trace_loss,
    validate_remat,
)

TINY_GPT = GPTConfig(vocab=32, seq_len=16, width=16, heads=2, depth=2)
SMALL_GPT = GPTConfig(vocab=64, seq_len=32, width=32, heads=2, depth=2)


@pytest.fixture(scope="module")
def mlp():
    problem = mlp_problem(sizes=(8, 16, 16, 4), batch=4)
    return problem, remat_instance_from_jax(problem.loss_fn, *problem.args, name="mlp")


@pytest.fixture(scope="module")
def gpt():
    problem = gpt_problem(TINY_GPT, batch=2)
    return problem, remat_instance_from_jax(problem.loss_fn, *problem.args, name="gpt")


def relative_error(expected, actual) -> float:
    diff = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(actual)))
    norm = sum(float(jnp.sum(a ** 2)) for a in jax.tree.leaves(expected))
    return math.sqrt(diff / norm)


def default_schedule(instance):
    return RematSchedule.from_steps(instance, instance.default_steps(), lower_bound=instance.total_cost,
                                    status="optimal", solver="checkpoint-all", solve_time_s=0.0)


def forward_ids(instance):
    return [n.id for n in instance.nodes if not n.backward]


# ---- FLOP model ---------------------------------------------------------------------------------
def test_flops_of_a_matmul_and_an_elementwise_op():
    jaxpr = jax.make_jaxpr(lambda x, w: jnp.tanh(x @ w))(jnp.ones((3, 5)), jnp.ones((5, 7)))
    dot, tanh = jaxpr.eqns
    assert equation_flops(dot) == 2 * 3 * 5 * 7
    assert equation_flops(tanh) == 3 * 7


# ---- graphs -------------------------------------------------------------------------------------
def test_mlp_graph_is_a_valid_instance_whose_default_schedule_validates(mlp):
    _, instance = mlp
    forward = forward_ids(instance)
    assert forward == ["layer0.linear", "layer0.relu", "layer1.linear", "layer1.relu", "layer2.linear", "output"]
    nodes = {n.id: n for n in instance.nodes}
    assert nodes["layer0.linear"].memory == 4 * 16 * 4  # batch x width x 4 bytes
    assert nodes["layer1.linear"].cost == 2 * 4 * 16 * 16 + 4 * 16  # matmul + bias
    # the VJP of a dense layer reads its input, that of ReLU its input, both the incoming cotangent
    assert set(nodes["grad:layer1.linear"].deps) == {"grad:layer1.relu", "layer0.relu"}
    assert set(nodes["grad:layer1.relu"].deps) == {"grad:layer2.linear", "layer1.linear"}
    schedule = default_schedule(instance)
    assert validate_remat(schedule) == (instance.total_cost, instance.reference_peak)
    assert instance.budget == instance.reference_peak


def test_gpt_graph_is_a_valid_instance_whose_default_schedule_validates(gpt):
    _, instance = gpt
    nodes = {n.id: n for n in instance.nodes}
    batch, config = 2, TINY_GPT
    assert nodes["block0.probs"].memory == batch * config.heads * config.seq_len ** 2 * 4
    assert nodes["block1.qkv"].deps == ("block1.ln1",)
    assert set(nodes["block0.res1"].deps) == {"embed", "block0.attn"}
    # checkpointed softmax: its VJP recomputes the probabilities from the scores
    assert "block0.scores" in nodes["grad:block0.probs"].deps
    assert sum(n.backward for n in instance.nodes) == len(forward_ids(instance))
    assert validate_remat(default_schedule(instance)).cost == instance.total_cost


def test_equation_granularity_gives_a_finer_valid_graph(mlp):
    problem, by_names = mlp
    by_equations = remat_instance_from_jax(problem.loss_fn, *problem.args, granularity="equations")
    assert len(by_equations.nodes) > len(by_names.nodes)
    assert validate_remat(default_schedule(by_equations)).cost == by_equations.total_cost
    plain = jax.grad(problem.loss_fn)(*problem.args)
    kept = forward_ids(by_equations)[::2]
    remat = jax.grad(apply(problem.loss_fn, kept, granularity="equations"))(*problem.args)
    assert relative_error(plain, remat) <= 1e-6


def test_duplicate_checkpoint_names_are_rejected():
    def loss(x):
        x = jax.ad_checkpoint.checkpoint_name(jnp.sin(x), "h")
        return jnp.sum(jax.ad_checkpoint.checkpoint_name(jnp.cos(x), "h"))

    with pytest.raises(ValueError, match="'h' is used twice"):
        trace_loss(loss, jnp.ones(3))


# ---- realized schedules and JAX policies --------------------------------------------------------
@given(data=st.data())
def test_realized_steps_are_valid_for_any_kept_set(gpt, data):
    _, instance = gpt
    forward = forward_ids(instance)
    kept = data.draw(st.sets(st.sampled_from(forward)))
    cost, peak = evaluate_steps(instance, realized_steps(instance, kept), enforce_budget=False)
    assert cost >= instance.total_cost
    if kept == set(forward):
        assert (cost, peak) == (instance.total_cost, instance.reference_peak)


def test_jax_policies_as_schedules(gpt):
    problem, instance = gpt
    traced = trace_loss(problem.loss_fn, *problem.args)
    dots = policy_kept(traced, "dots_saveable")
    assert {"block0.qkv", "block1.qkv", "logits"} <= set(dots) and "block0.probs" not in dots
    assert policy_kept(traced, "nothing_saveable") == ()
    everything = policy_schedule(instance, traced, "everything_saveable")
    assert (everything.status, everything.cost) == ("optimal", instance.total_cost)
    for policy in ("nothing_saveable", "dots_saveable"):
        schedule = policy_schedule(instance, traced, policy)
        validate_remat(schedule)
        assert schedule.cost > instance.total_cost
    tight = policy_schedule(instance.with_budget(instance.reference_peak / 2), traced, "nothing_saveable")
    assert (tight.status, tight.steps) == ("unknown", ())


# ---- apply: gradients ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plain_gradients(mlp, gpt):
    return {name: jax.jit(jax.value_and_grad(problem.loss_fn))(*problem.args)
            for name, (problem, _) in (("mlp", mlp), ("gpt", gpt))}


def keep_variant(instance, variant):
    """What to keep: a greedy schedule at budget 0.7, every third block value, all or none."""
    forward = forward_ids(instance)
    if variant == "schedule":
        schedule = solve_remat(instance.with_budget(math.ceil(0.7 * instance.reference_peak)),
                               solver="greedy", time_limit=5).schedule
        validate_remat(schedule)
        assert set(kept_names(schedule)) < set(forward)  # something is recomputed
        return schedule
    return {"every-third": forward[::3], "all": forward, "none": []}[variant]


@pytest.mark.parametrize("model, mode, variant", [
    *[("mlp", "explicit", v) for v in ("schedule", "every-third", "all", "none")],
    ("mlp", "policy", "schedule"), ("gpt", "explicit", "schedule"), ("gpt", "explicit", "every-third"),
    ("gpt", "policy", "schedule"),
])
def test_remat_gradients_equal_plain_gradients(model, mode, variant, plain_gradients, request):
    problem, instance = request.getfixturevalue(model)
    plain_loss, plain = plain_gradients[model]
    remat_loss = apply(problem.loss_fn, keep_variant(instance, variant), mode=mode)
    loss, grads = jax.jit(jax.value_and_grad(remat_loss))(*problem.args)
    assert jnp.allclose(loss, plain_loss, rtol=1e-6)
    assert relative_error(plain, grads) <= 1e-6


def test_apply_rejects_a_schedule_of_another_graph(mlp):
    problem, _ = mlp
    with pytest.raises(ValueError, match="not blocks of the traced loss"):
        jax.grad(apply(problem.loss_fn, ["block0.qkv"]))(*problem.args)


# ---- apply: compiled memory ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_gpt_measurements():
    """Predicted peak and compiled memory of the small GPT at falling budgets (greedy schedules)."""
    problem = gpt_problem(SMALL_GPT, batch=2)
    instance = remat_instance_from_jax(problem.loss_fn, *problem.args, name="gpt")
    rows = []
    for fraction in (1.0, 0.8, 0.6):
        budget = math.ceil(fraction * instance.reference_peak)
        schedule = solve_remat(instance.with_budget(budget), solver="greedy", time_limit=5).schedule
        validate_remat(schedule)
        rows.append(memory_report(problem.loss_fn, problem.args, schedule))
    return rows


def test_compiled_memory_falls_as_the_budget_falls(small_gpt_measurements):
    temps = [report.measured.temp for report in small_gpt_measurements]
    peaks = [report.predicted_peak for report in small_gpt_measurements]
    assert peaks == sorted(peaks, reverse=True) and temps == sorted(temps, reverse=True)
    assert temps[-1] < 0.8 * temps[0]


def test_compiled_memory_is_within_15_percent_of_the_prediction(small_gpt_measurements):
    for report in small_gpt_measurements:
        assert abs(report.relative_gap) <= 0.15, report


def test_timed_nodes_keep_the_graph_and_give_positive_integer_costs(mlp):
    problem, by_flops = mlp
    timed = remat_instance_from_jax(problem.loss_fn, *problem.args, time_nodes=True)
    assert [(n.id, n.memory, n.deps) for n in timed.nodes] == [(n.id, n.memory, n.deps) for n in by_flops.nodes]
    assert all(isinstance(n.cost, int) and n.cost >= 1 for n in timed.nodes)
