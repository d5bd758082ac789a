"""Lower bounds of pipesched.pipeline.bounds against exact optima (CP-SAT run without any bound),
and the memory bounds on the placements they were made for."""

import math

from hypothesis import given, settings
from hypothesis import strategies as st
from pipesched.solvers._interrupt import Deadline
from pipesched.solvers._pipeline_cpsat import solve_cpsat
from test_pipeline_solvers import small_instances

from pipesched._common import approx_le
from pipesched.pipeline import PipelineInstance, Stage, simulate
from pipesched.pipeline.bounds import (
    bounds,
    forward_head,
    memory_bound,
    min_memory_need,
    remat_memory_bound,
    round_trip,
)
from pipesched.pipeline.zoo import interleaved_placement, uniform_instance, v_placement


def exact_optimum(instance) -> float | None:
    """The optimum proven by CP-SAT given no lower bound (None: infeasible or not proven)."""
    outcome = solve_cpsat(instance, hint=None, lower_bound=0.0, deadline=Deadline(60), workers=2)
    if not outcome.proven_optimal:
        return None
    result = simulate(instance, outcome.program)
    assert result.fits_memory
    return result.schedule.makespan


@settings(max_examples=40, deadline=None)
@given(small_instances(max_devices=3, max_stages=4, max_microbatches=4), st.booleans())
def test_every_bound_is_at_most_the_exact_optimum(instance, remat):
    """P <= 3, M <= 4, remat options and RW drawn (formats.md 1.4): every bound <= optimum."""
    if remat and all(st.F > 0 for st in instance.stages):
        instance = instance.replace(allow_remat=True)
    optimum = exact_optimum(instance)
    if optimum is None:
        return
    for name, value in bounds(instance)._asdict().items():
        assert approx_le(value, optimum), (name, value, optimum)


durations = st.sampled_from([1, 2, 3, 4, 1.5])


@st.composite
def multi_wave_instances(draw):
    """Linear, V-shape or interleaved placements on P <= 3 devices, M <= 4, a memory limit from
    the least need up to two more activations, with or without remat (options and RW drawn)."""
    P = draw(st.integers(1, 3))
    placement = draw(st.sampled_from([tuple(range(P)), v_placement(P), interleaved_placement(P, 2)]))
    split, remat = draw(st.booleans()), draw(st.booleans())
    stages = []
    for d in placement:
        act = draw(st.integers(1, 3))
        stash = draw(st.integers(0, act)) if split else 0
        keys = {}
        if remat:
            keys["remat_options"] = tuple((draw(st.integers(0, act)), draw(durations))
                                          for _ in range(draw(st.integers(1, 2))))
            if split and draw(st.booleans()):
                keys.update(RW=draw(durations), wgrad_checkpoint=draw(st.integers(0, stash)))
        stages.append(Stage(device=d, F=draw(durations), B=draw(durations), W=draw(durations), activation=act,
                            wgrad_stash=stash, **keys))
    instance = PipelineInstance(P, draw(st.integers(2, 4)), tuple(stages), comm=draw(st.sampled_from([0, 1])),
                                split_backward=split, allow_remat=remat)
    need = max(min_memory_need(instance, d) for d in range(P))
    return instance.replace(memory_limit=need + draw(st.integers(0, 6)))


@settings(max_examples=30, deadline=None)
@given(multi_wave_instances())
def test_memory_bounds_hold_on_multi_wave_placements_with_tight_memory(instance):
    """The memory bounds (nested, energetic, remat trade-off) <= the exact optimum."""
    optimum = exact_optimum(instance)
    if optimum is None:
        return
    for name, value in bounds(instance)._asdict().items():
        assert approx_le(value, optimum), (name, value, optimum)


def test_binding_names_the_largest_bound():
    instance = uniform_instance(4, 16, 5, 10, placement=interleaved_placement(4, 2), memory_limit=1)
    b = bounds(instance)
    assert getattr(b, b.binding) == b.best == max(b)
    assert b.binding == "memory"


def _uniform(placement, P, M, split, k):
    """The benchmark's uniform family: F = B (= W) split, B = 2F fused, k activations per device."""
    instance = uniform_instance(P, M, 10, 10 if split else 20, 10 if split else 0, split_backward=split,
                                placement=placement, memory_limit=k)
    return instance


def test_nested_memory_bound_on_interleaved_and_v_placements():
    """At one microbatch of memory per device, the microbatch that holds both of a device's
    stages excludes every other: consecutive microbatches start >= round_trip(inner) + the
    longer of the forward and backward chains between the stages apart (bounds.memory_bound)."""
    for placement, split in ((interleaved_placement(4, 2), False), (v_placement(4), True)):
        M = 16
        instance = _uniform(placement, 4, M, split, 1)
        inner = max(s for s, d in enumerate(placement) if d == 0)
        st = instance.stages
        pre = forward_head(instance, inner)
        post = sum(st[j].B for j in range(inner))
        tail = st[0].W if split else 0
        expected = pre + (M - 1) * (round_trip(instance, inner) + max(pre, post)) + round_trip(instance, inner) + tail
        assert memory_bound(instance) >= expected - 1e-9
        # one stage at a time (the interval-chain bound) proves much less on these placements
        chain = max(forward_head(instance, s) + math.ceil(M / 2) * round_trip(instance, s) for s in range(8))
        assert memory_bound(instance) > 1.15 * chain


def test_remat_memory_bound_prices_the_recompute():
    """Remat allowed, one activation of memory: the bound trades recompute work against round
    trips, lies between the no-remat chain bound and the remat-free device load, and stays
    below what CP-SAT proves optimal."""
    instance = uniform_instance(2, 4, 2, 4, memory_limit=1.5, allow_remat=True)
    value = remat_memory_bound(instance)
    b = bounds(instance)
    assert value > max(b.device_load, b.critical_path)
    no_remat = memory_bound(instance.replace(allow_remat=False))
    assert value < no_remat
    optimum = exact_optimum(instance)
    assert optimum is not None and approx_le(value, optimum)
