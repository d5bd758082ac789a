"""Acceptance matrix of the executor: every zoo schedule on every shape it supports, and greedy and
CP-SAT schedules with split backward and remat, on P in {2, 4, 8}: pipelined loss and every
parameter gradient equal the single-device reference (max abs error <= 1e-5, fp32), and the
predicted peak memory of a training step is within 15% of the compiled programs'."""

from __future__ import annotations

import functools

import jax
import numpy as np
import optax
import pytest
from executor_matrix import DEVICES, SHAPES, Case, Refusal, ops_used, solver_matrix, zoo_instance, zoo_matrix

from pipesched._common import FormatError
from pipesched.executor import (
    ModelConfig,
    compile_pipeline,
    compiled_step_memory_bytes,
    device_bytes,
    init_optimizer,
    make_batch,
    make_model,
    memory_terms,
    reference_grads,
    unstack,
)
from pipesched.pipeline import PipelineSchedule
from pipesched.pipeline.zoo import ZOO, zoo_schedule

MLP = ModelConfig("mlp", microbatch=2, width=8)
TOL = 1e-5
MEMORY_TOL = 0.15  # predicted / compiled peak memory of a training step, minus 1
ZOO_CASES, REFUSALS = zoo_matrix()
SOLVER_CASES = solver_matrix()


@functools.cache
def _reference(num_stages: int, num_microbatches: int) -> tuple[float, list[np.ndarray]]:
    """Single-device loss and gradient leaves (per stage, in order) of the MLP cut into num_stages."""
    model = make_model(MLP, num_stages, seed=0)
    loss, grads = reference_grads(model, model.params, make_batch(MLP, num_microbatches, seed=0))
    return float(loss), [np.asarray(a) for a in jax.tree.leaves(grads)]


def _assert_equals_reference(schedule: PipelineSchedule) -> None:
    pipeline = compile_pipeline(schedule, MLP)
    loss, grads = pipeline.program.grads(pipeline.params, pipeline.batch)
    grads = jax.tree.leaves(unstack(pipeline.program.plan, jax.device_get(grads)))
    ref_loss, ref_grads = _reference(schedule.instance.num_stages, schedule.instance.num_microbatches)
    assert abs(float(loss) - ref_loss) <= TOL
    assert len(grads) == len(ref_grads)
    assert max(float(np.max(np.abs(np.asarray(a) - b))) for a, b in zip(grads, ref_grads)) <= TOL
    optimizer = optax.adam(1e-3)
    opt_state = init_optimizer(pipeline, optimizer)
    compiled = compiled_step_memory_bytes(pipeline, optimizer, opt_state)
    predicted = [row["total"] for row in memory_terms(pipeline, device_bytes(opt_state))]
    assert all(abs(p / compiled - 1) <= MEMORY_TOL for p in predicted), (compiled, predicted)


def _ids(items: list[Case] | list[Refusal]) -> list[str]:
    return [item.id for item in items]


@pytest.mark.parametrize("case", ZOO_CASES, ids=_ids(ZOO_CASES))
def test_zoo_schedule_gradients_equal_reference(case: Case):
    schedule = case.build()
    assert ops_used(schedule) == ("FBW" if SHAPES[case.shape].split_backward else "FB")
    _assert_equals_reference(schedule)


@pytest.mark.parametrize("case", SOLVER_CASES, ids=_ids(SOLVER_CASES))
def test_solver_schedule_with_remat_gradients_equal_reference(case: Case):
    schedule = case.build()
    assert ops_used(schedule) == ("FBWR" if SHAPES[case.shape].split_backward else "FBR")  # the limit calls for R
    _assert_equals_reference(schedule)


def test_matrix_runs_every_zoo_schedule_on_every_device_count():
    covered = {(case.source, case.num_devices) for case in ZOO_CASES}
    assert covered == {(name, P) for name in ZOO for P in DEVICES}
    assert {case.shape for case in ZOO_CASES} == set(SHAPES)


@pytest.mark.parametrize("refusal", REFUSALS, ids=_ids(REFUSALS))
def test_unsupported_shape_is_refused_with_its_reason(refusal: Refusal):
    """Listed, not skipped: the zoo refuses the shape up front and says what it needs."""
    assert refusal.reason.startswith(f"{refusal.name}: needs ")
    with pytest.raises(FormatError, match="needs"):
        zoo_schedule(zoo_instance(refusal.shape, refusal.num_devices), refusal.name)
