"""Executor: pipelined loss and gradients equal the single-device reference; plans; memory."""

from __future__ import annotations

import dataclasses
import json

import jax
import optax
import pytest
from helpers import hand_1f1b, uniform

from pipesched import ValidationError
from pipesched.cli import main
from pipesched.executor import (
    ModelConfig,
    byte_instance,
    compile_pipeline,
    compiled_memory_bytes,
    compiled_step_memory_bytes,
    device_bytes,
    gradient_error,
    init_optimizer,
    loss_curves,
    make_plan,
    memory_terms,
    profile_instance,
    run,
    slot_bytes,
    tick_prediction,
    tick_times,
    train_step_fn,
)
from pipesched.executor._plan import BRANCH, OPS
from pipesched.executor._profile import calibration_plan, calibration_rows
from pipesched.pipeline import Action, PipelineSchedule, simulate, validate_pipeline
from pipesched.pipeline.zoo import uniform_instance, zoo_schedule
from pipesched.solvers import solve_pipeline

MLP = ModelConfig("mlp", microbatch=2, width=8)
TOL = 1e-5


def _zoo(name: str, P: int, M: int, **kw) -> PipelineSchedule:
    return zoo_schedule(uniform_instance(P, M, 4, 8, **kw), name).schedule


def test_hand_written_remat_schedule_gradients_equal_reference():
    """1F1B with split backward and three rematerialized microbatches, written by hand (the full
    matrix of zoo, greedy and CP-SAT schedules is in test_executor_matrix.py)."""
    instance = uniform(2, 3, split=True, remat=True)
    schedule = simulate(instance, hand_1f1b(instance, remat=frozenset({(0, 0), (0, 2), (1, 1)}))).schedule
    assert {op.op for op in schedule.ops} == {"F", "B", "W", "R"}
    loss, ref_loss, error = gradient_error(compile_pipeline(schedule, MLP))
    assert abs(loss - ref_loss) <= TOL
    assert error <= TOL


@pytest.fixture(scope="module")
def gpt_remat():
    """gpt-tiny on 2 devices, 1F1B with two rematerialized microbatches, one of remat option 0
    (keep the stage input), one of option 1 (keep the attention), compiled once."""
    inst = uniform(2, 2, remat=True)
    inst = inst.replace(stages=tuple(dataclasses.replace(st, remat_options=((st.checkpoint, st.R), (0.5, st.R / 2)))
                                     for st in inst.stages))
    rows = [[a._replace(option=1) if a == Action(1, "R", 0) else a for a in row]
            for row in hand_1f1b(inst, remat=frozenset({(0, 1), (1, 0)}))]
    return compile_pipeline(simulate(inst, rows).schedule, "gpt-tiny")


def test_gpt_tiny_remat_gradients_equal_reference(gpt_remat):
    assert {(op.op, op.option) for op in gpt_remat.schedule.ops if op.op == "R"} == {("R", 0), ("R", 1)}
    loss, ref_loss, error = gradient_error(gpt_remat)
    assert abs(loss - ref_loss) <= TOL and error <= TOL


def test_gpt_tiny_training_follows_the_unpipelined_loss_curve(gpt_remat):
    pipelined, unpipelined = loss_curves(gpt_remat, steps=5, learning_rate=1e-2)
    assert unpipelined[-1] < unpipelined[0]  # it learns
    assert max(abs(a - b) for a, b in zip(pipelined, unpipelined)) <= 1e-4


def test_invalid_schedule_is_refused_before_compiling():
    schedule = _zoo("1f1b", 2, 2)
    first = schedule.ops[0]
    broken = dataclasses.replace(schedule, ops=(dataclasses.replace(first, end=first.end + 1),) + schedule.ops[1:])
    with pytest.raises(ValidationError, match="rule 2"):
        make_plan(broken)
    empty = PipelineSchedule.empty(schedule.instance, status="unknown", lower_bound=None, solver="x", solve_time_s=0)
    with pytest.raises(ValueError, match="no ops"):
        make_plan(empty)


def test_plan_slots_follow_the_schedule_and_executed_form_is_valid():
    schedule = _zoo("1f1b", 4, 6)
    plan = make_plan(schedule)
    assert plan.residual_slots == (4, 3, 2, 1)  # per device: 1F1B keeps P - d microbatches live
    validate_pipeline(plan.executed)
    assert plan.executed.makespan >= schedule.makespan - 1e-9
    gpipe = make_plan(_zoo("gpipe", 4, 6))
    assert gpipe.residual_slots == (6, 6, 6, 6)


def _warmup_first(instance, warmups: tuple[int, ...]) -> PipelineSchedule:
    """Stage d on device d runs warmups[d] forwards, then one forward / one backward."""
    M, rows = instance.num_microbatches, []
    for d, w in enumerate(warmups):
        row = [Action(d, "F", m) for m in range(w)]
        for m in range(M):
            row += [Action(d, "F", w + m)] * (w + m < M) + [Action(d, "B", m)]
        rows.append(row)
    return simulate(instance, rows).schedule


def test_compiled_memory_grows_by_the_activation_bytes_per_slot():
    """Same model, batch and tick count; 3 more live microbatches on the busiest device. A slot
    holds the largest stage's activation (the pools of an SPMD program have one shape)."""
    inst = uniform(2, 6)
    small = compile_pipeline(_warmup_first(inst, (2, 1)), MLP)
    large = compile_pipeline(_warmup_first(inst, (5, 4)), MLP)
    assert small.program.plan.ticks == large.program.plan.ticks
    assert (small.program.plan.residual_slots, large.program.plan.residual_slots) == ((3, 2), (6, 5))
    activation = max(byte_instance(small).stages[s].activation for s in range(2))
    assert slot_bytes(small.program.plan, small.model)["residual"] == activation
    measured = compiled_memory_bytes(large) - compiled_memory_bytes(small)
    assert abs(measured - 3 * activation) <= 0.1 * 3 * activation


def test_tick_prediction_sums_the_slowest_branch_of_each_tick():
    plan = make_plan(_zoo("1f1b", 2, 2))
    times = {int(b): float(b) for b in set(plan.table[:, :, BRANCH].ravel())}  # branch b lasts b seconds
    expected = sum(max(plan.table[:, t, BRANCH]) for t in range(plan.ticks))
    assert tick_prediction(plan, times) == expected


def test_tick_times_cover_every_branch_the_program_runs():
    pipeline = compile_pipeline(_zoo("1f1b", 2, 2), MLP)
    times = tick_times(pipeline.program, pipeline.params, pipeline.batch, ticks=2, repeats=1)
    assert set(times) == set(pipeline.program.plan.table[:, :, BRANCH].ravel().tolist())
    assert all(t >= 0 for t in times.values())


def test_calibration_program_has_every_branch_of_the_placement():
    plan = calibration_plan((0, 1, 1, 0), split_backward=True)  # V shape: first, middle and last kinds
    assert plan.num_microbatches == 1 and plan.residual_slots == (2, 2)  # two stages live per device
    expected = {0} | {plan.branch_index(c, op) for c in range(3) for op in OPS}
    assert set(calibration_rows(plan)) == expected
    fused = calibration_plan((0, 1), split_backward=False)
    assert set(calibration_rows(fused)) == {0} | {fused.branch_index(c, op) for c in range(2) for op in OPS
                                                  if op != "W"}
    remat = calibration_plan((0, 1), split_backward=True, num_options=2, backward_recompute=True)
    assert remat.ops == (*OPS, "RW", "Fr:1", "R:1")  # RW, then Fr and R of remat option 1
    assert set(calibration_rows(remat)) == {0} | {remat.branch_index(c, op) for c in range(2) for op in remat.ops}


def test_profile_in_program_times_every_op_as_a_tick():
    instance = profile_instance(MLP, (0, 1), 4, split_backward=True, repeats=1)
    assert instance.comm == 0  # the exchange is part of every tick
    assert instance.num_microbatches == 4 and [st.device for st in instance.stages] == [0, 1]
    assert all(min(st.F, st.B, st.W, st.R) >= 1 for st in instance.stages)
    assert all(st.activation > 0 and st.wgrad_stash > 0 for st in instance.stages)


@pytest.mark.parametrize("data_parallel", [1, 2])
def test_run_report_has_the_format_keys(data_parallel):
    report = run(_zoo("1f1b", 2, 2), model=MLP, steps=2, warmup=1, data_parallel=data_parallel)
    for key in ("schedule", "backend", "devices", "mesh", "steps", "loss", "reference_loss", "max_abs_grad_error",
                "step_time_s", "predicted_step_time_s", "peak_memory_bytes", "predicted_peak_memory_bytes"):
        assert key in report
    assert report["mesh"] == {"data": data_parallel, "pipe": 2} and len(report["step_time_s"]) == 2
    assert report["devices"] == len(report["peak_memory_bytes"]) == len(report["predicted_peak_memory_bytes"]) \
        == 2 * data_parallel
    assert report["max_abs_grad_error"] <= TOL
    assert report["predicted_executed_step_time_s"] >= report["predicted_step_time_s"] - 1e-12
    activations = report["predicted_activation_peak_bytes"]
    assert len(activations) == report["devices"] and len(report["predicted_memory_terms"]) == 2
    assert all(p > a > 0 for p, a in zip(report["predicted_peak_memory_bytes"], activations))
    assert jax.default_backend() == report["backend"]


def test_train_step_keeps_optimizer_state_shardings():
    """The optimizer state comes back from a step sharded as it went in, so the second step reuses
    the first step's compiled update instead of recompiling it."""
    pipeline = compile_pipeline(_zoo("1f1b", 2, 2), MLP)
    optimizer = optax.adam(1e-3)
    opt_state = init_optimizer(pipeline, optimizer)
    _, stepped, _ = train_step_fn(pipeline, optimizer)(pipeline.params, opt_state, pipeline.batch)
    assert jax.tree.map(lambda a: a.sharding, stepped) == jax.tree.map(lambda a: a.sharding, opt_state)


@pytest.mark.parametrize("name, P, D", [("1f1b", 2, 2), ("zb-h1", 4, 2), ("1f1b", 2, 4)])
def test_data_parallel_copies_equal_the_whole_batch_reference(name, P, D):
    split = name == "zb-h1"
    schedule = _zoo(name, P, 4, W=4 if split else 0, split_backward=split, wgrad_stash=1 if split else 0)
    pipeline = compile_pipeline(schedule, MLP, data_parallel=D)
    assert dict(pipeline.program.mesh.shape) == {"data": D, "pipe": P}
    assert pipeline.batch.inputs.shape[1] == D * MLP.microbatch
    loss, ref_loss, error = gradient_error(pipeline)
    assert abs(loss - ref_loss) <= TOL and error <= TOL
    single = compile_pipeline(schedule, MLP)  # one copy on D times less data: another loss
    assert abs(gradient_error(single)[0] - loss) > 1e-4


def test_data_parallel_needs_enough_devices():
    with pytest.raises(ValueError, match=r"need 16 devices \(2 x 8\)"):
        compile_pipeline(_zoo("1f1b", 8, 8), MLP, data_parallel=2)


@pytest.mark.parametrize("model", ["mlp", "gpt-tiny"])
@pytest.mark.parametrize("P", [2, 4])
@pytest.mark.parametrize("name, split", [("1f1b", False), ("greedy", True)])
def test_predicted_memory_is_within_15_percent_of_the_compiled_programs(model, P, name, split):
    instance = uniform_instance(P, 2 * P, 4, 8, W=4 if split else 0, split_backward=split, wgrad_stash=int(split))
    schedule = solve_pipeline(instance, name).schedule
    pipeline = compile_pipeline(schedule, model)
    optimizer = optax.adam(1e-3)
    opt_state = init_optimizer(pipeline, optimizer)
    terms = memory_terms(pipeline, device_bytes(opt_state))
    gradient_program = compiled_memory_bytes(pipeline)  # one SPMD program: the same on every device
    step = compiled_step_memory_bytes(pipeline, optimizer, opt_state)
    assert all(abs(row["total"] / step - 1) <= 0.15 for row in terms), (step, terms)
    assert all(abs((row["gradient_program"] - row["optimizer_state"]) / gradient_program - 1) <= 0.15
               for row in terms), (gradient_program, terms)
    assert all(row["slot_pools"] >= row["activations"] for row in terms)  # pools sized by the busiest device
    assert all(row["optimizer_state"] >= 2 * row["parameters"] for row in terms)  # Adam: two moments


@pytest.mark.parametrize("solver", ["zb-h1", "zb-v"])
def test_cli_run_builds_the_instance_the_named_schedule_needs(tmp_path, solver):
    """zb-h1 and zb-v get split backward (and zb-v the V placement) without being told."""
    out = tmp_path / "report.json"
    assert main(["run", "--model", "mlp", "--devices", "4", "--solver", solver, "--steps", "1",
                 "--time-limit", "2", "--report", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["max_abs_grad_error"] <= TOL and len(report["activation_slots"]) == 4
    assert report["schedule"] == solver and report["mesh"] == {"data": 1, "pipe": 4}


def test_cli_run_refuses_a_typed_contradiction_in_one_line(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["run", "--model", "mlp", "--devices", "4", "--solver", "zb-h1", "--no-split-backward",
                 "--report", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --no-split-backward: zb-h1 needs split_backward=True")
    assert not out.exists()
