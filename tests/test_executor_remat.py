"""Executor with formats.md 1.4: R ops of several remat options and backward-pass recompute (RW)
give the reference gradients, RW lowers the compiled memory as predicted, the profiler measures them."""

from __future__ import annotations

from collections import Counter

import pytest

from pipesched.executor import (
    REMAT_OPTIONS,
    ModelConfig,
    StageMemory,
    compile_pipeline,
    compiled_memory_bytes,
    gradient_error,
    make_model,
    make_plan,
    memory_terms,
    profile_instance,
)
from pipesched.pipeline import Action, PipelineInstance, PipelineSchedule, Stage, simulate

MLP = ModelConfig("mlp", microbatch=2, width=8)
TOL = 1e-5


def _instance(P: int, M: int) -> PipelineInstance:
    """Stage d on device d, split backward, two remat options and RW (the executor measures the
    memory in the model's bytes, `byte_instance`)."""
    stages = [Stage(d, 10, 20, 10, 4, wgrad_stash=2, checkpoint=1, remat_options=((1, 10), (2, 6)), RW=5,
                    wgrad_checkpoint=1) for d in range(P)]
    return PipelineInstance(P, M, stages, split_backward=True, allow_remat=True)


def _deferred_w(instance: PipelineInstance, remat: dict[tuple[int, int], int], rw: bool) -> PipelineSchedule:
    """1F1B with every W deferred to the end of its device (the W stashes pile up), R of option
    remat[(s, m)] right before its B, and, when `rw`, RW right before every W."""
    P, M = instance.num_devices, instance.num_microbatches
    rows = []
    for d in range(P):
        warmup = min(P - 1 - d, M)
        row = [Action(d, "F", m) for m in range(warmup)]
        for m in range(M):
            row += [Action(d, "F", warmup + m)] * (warmup + m < M)
            row += [Action(d, "R", m, remat[(d, m)])] if (d, m) in remat else []
            row.append(Action(d, "B", m))
        for m in range(M):
            row += [Action(d, "RW", m)] * rw + [Action(d, "W", m)]
        rows.append(row)
    return simulate(instance, rows).schedule


def _remat(P: int) -> dict[tuple[int, int], int]:
    """Options 1 and 0 on the first and the last stage."""
    return {(0, 0): 1, (0, 1): 0, (P - 1, 1): 0, (P - 1, 2): 1}


def test_plan_slots_follow_the_backward_recompute_memory_model():
    """With RW the op inputs are held from F to B and again from RW to W (one at a time here), the
    output gradients from F to W; a checkpoint of option 1 from Fr to R."""
    inst = _instance(2, 4)
    with_rw, without = (make_plan(_deferred_w(inst, {(0, 0): 1, (1, 1): 0}, rw)) for rw in (True, False))
    assert (with_rw.stash_slots, without.stash_slots) == ((2, 1), (4, 4))  # the 1F1B in-flight pairs vs all
    assert with_rw.grad_slots == without.grad_slots == (4, 4)
    assert with_rw.checkpoint_slots == (1, 0) and with_rw.residual_slots == (2, 1)
    assert with_rw.hidden_slots > without.hidden_slots  # stage 1 keeps its inputs until RW
    assert {"RW", "Fr:1", "R:1"} <= set(with_rw.ops)


def test_a_remat_option_the_model_lacks_is_refused():
    inst = _instance(2, 2)
    with pytest.raises(ValueError, match=r"remat option 1 on a stage of kind \(first, last\) = \(False, True\): "
                                         r"model 'mlp' has the remat options input "):
        compile_pipeline(_deferred_w(inst, {(1, 0): 1}, rw=False), MLP)


@pytest.mark.parametrize("P, M", [(2, 4), (4, 8)])
def test_two_remat_options_and_rw_give_the_reference_gradients_and_the_predicted_memory(P, M):
    """gpt-tiny: R of options 0 and 1 and RW everywhere; the same order without RW. RW saves the op
    inputs of the microbatches waiting for W: the compiled memory falls as `memory_terms` predicts."""
    inst = _instance(P, M)
    schedules = {rw: _deferred_w(inst, _remat(P), rw) for rw in (True, False)}
    ops = Counter((op.op, op.option) for op in schedules[True].ops)
    assert ops[("RW", 0)] == P * M and ops[("R", 0)] == ops[("R", 1)] == 2
    assert not schedules[False].backward_recomputed
    measured, predicted = {}, {}
    for rw, schedule in schedules.items():
        pipeline = compile_pipeline(schedule, "gpt-tiny")
        loss, ref_loss, error = gradient_error(pipeline)
        assert abs(loss - ref_loss) <= TOL and error <= TOL, (rw, loss, ref_loss, error)
        measured[rw] = compiled_memory_bytes(pipeline)
        predicted[rw] = max(row["total"] for row in memory_terms(pipeline))
    saved, predicted_saving = measured[False] - measured[True], predicted[False] - predicted[True]
    assert saved > 0 and abs(saved - predicted_saving) <= 0.15 * predicted_saving, (measured, predicted)


def test_profile_measures_every_remat_option_and_rw():
    model = make_model(ModelConfig("gpt-tiny"), 2)
    gpt = profile_instance(ModelConfig("gpt-tiny"), (0, 1), 4, split_backward=True, remat_options=True,
                           backward_recompute=True, repeats=1, in_program=False)
    assert gpt.allow_remat and len(REMAT_OPTIONS["gpt-tiny"]) == 2
    for s, st in enumerate(gpt.stages):
        mem = StageMemory(model, s, split=True)
        assert [o.checkpoint for o in st.options] == list(mem.checkpoints) == [mem.hidden, mem.checkpoints[1]]
        assert st.checkpoint < st.options[1].checkpoint < st.activation  # attention kept: the MLPs are not
        assert st.wgrad_checkpoint == mem.wgrad_checkpoint < st.wgrad_stash and min(st.RW, st.options[1].R) >= 1
    mlp = profile_instance(MLP, (0, 1), 4, split_backward=True, remat_options=True, backward_recompute=True,
                           repeats=1)  # in the program: its calibration program has the RW branch
    assert all(len(st.options) == 1 and st.RW >= 1 and st.wgrad_checkpoint <= st.wgrad_stash for st in mlp.stages)
