"""Optimal remat for a given order (issue 16 item 3): solve_pipeline(..., order=) and --fix-order."""

import json

import pytest
from hypothesis import given, settings
from pipesched.solvers import order_infeasibility_proof, solve_pipeline
from pipesched.solvers._pipeline_fixed_order import order_candidates, order_memory_needs
from test_pipeline_bounds import multi_wave_instances

from pipesched._common import FormatError, approx_le
from pipesched.cli import main
from pipesched.pipeline import PipelineInstance, RematOption, Stage, format_program_csv, validate_pipeline, zoo
from pipesched.pipeline.bounds import min_memory_need


def tight_instance(P: int = 4, M: int = 8, rw: bool = True) -> PipelineInstance:
    """Uniform split stages with two remat options and (optionally) a cheap RW; memory limit at
    60% of the way from the one-microbatch minimum to what ZB-H1 needs without remat."""
    stages = tuple(Stage(device=d, F=4, B=4, W=4, activation=4, wgrad_stash=2,
                         remat_options=(RematOption(0, 4), RematOption(2, 3)),
                         RW=1 if rw else None, wgrad_checkpoint=0) for d in range(P))
    free = PipelineInstance(P, M, stages, split_backward=True, allow_remat=True)
    need = max(min_memory_need(free, d) for d in range(P))
    peak = max(zoo.zoo_schedule(free, "zb-h1").memory.peaks)
    return free.replace(memory_limit=need + 0.6 * (peak - need))


def fb_order(schedule) -> list[list[tuple[str, int, int]]]:
    """Per device, its F/B/W ops in start order (R and RW left out)."""
    rows = [[] for _ in range(schedule.instance.num_devices)]
    for op in sorted(schedule.ops, key=lambda o: (o.start, o.end)):
        if op.op in ("F", "B", "W"):
            rows[schedule.device_of(op)].append((op.op, op.stage, op.microbatch))
    return rows


def test_zb_h1_under_tight_memory_fits_by_rw_and_beats_r_only():
    instance = tight_instance()
    assert not zoo.zoo_schedule(instance, "zb-h1").fits_memory
    with_rw = solve_pipeline(instance, "cpsat", order="zb-h1", time_limit=20)
    r_only = solve_pipeline(tight_instance(rw=False), "cpsat", order="zb-h1", time_limit=20)
    validate_pipeline(with_rw.schedule)
    assert any(op.op == "RW" for op in with_rw.schedule.ops)
    assert with_rw.status in ("feasible", "optimal")
    if r_only.status in ("feasible", "optimal"):
        assert approx_le(with_rw.objective, r_only.objective)
    # the order is kept: zb-h1's F/B/W sequence on every device
    named = zoo.zoo_schedule(instance.replace(memory_limit=None), "zb-h1").schedule
    assert fb_order(with_rw.schedule) == fb_order(named)
    s = with_rw.schedule
    assert approx_le(s.lower_bound, s.order_lower_bound) and approx_le(s.order_lower_bound, s.makespan)


def test_order_from_a_program_csv_and_a_schedule_file_match_the_name(tmp_path):
    instance = tight_instance(P=2, M=4)
    program = zoo.ZOO["1f1b"](instance)
    csv = tmp_path / "order.csv"
    csv.write_text(format_program_csv(program))
    by_name = solve_pipeline(instance, "greedy", order="1f1b")
    by_csv = solve_pipeline(instance, "greedy", order=csv)
    saved = tmp_path / "order.json"
    by_name.schedule.save(saved)
    by_file = solve_pipeline(instance, "greedy", order=saved)
    assert by_name.objective == by_csv.objective == by_file.objective
    for result in (by_name, by_csv, by_file):
        validate_pipeline(result.schedule)


def test_an_order_that_does_not_cover_the_instance_is_refused():
    with pytest.raises(FormatError, match="fix-order"):
        solve_pipeline(tight_instance(P=2, M=4), "cpsat", order=[["0F0", "0B0"], ["1F0", "1B0"]])


def test_cli_fix_order_writes_a_valid_schedule_with_its_order_bound(tmp_path, capsys):
    path = tmp_path / "instance.json"
    tight_instance(P=2, M=4).save(path)
    out = tmp_path / "schedule.json"
    code = main(["solve", "pipeline", str(path), "--solver", "cpsat", "--fix-order", "zb-h1", "--time-limit", "5",
                 "--quiet", "--out", str(out)])
    assert code == 0
    assert "lower bound" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["solver"].endswith("order=zb-h1") and data["order_lower_bound"] <= data["makespan"]
    assert main(["validate", str(out)]) == 0


def test_cli_fix_order_unknown_name_is_one_line_exit_2(tmp_path, capsys):
    path = tmp_path / "instance.json"
    tight_instance(P=2, M=4).save(path)
    code = main(["solve", "pipeline", str(path), "--fix-order", "no-such-order.csv", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no-such-order.csv" in err


def placement_for(name: str, P: int) -> tuple[int, ...]:
    if name in ("interleaved-1f1b", "looped-bfs"):
        return zoo.interleaved_placement(P, 2)
    if name in ("zb-v", "v-half", "v-min", "dualpipe-v", "hanayo"):
        return zoo.v_placement(P)
    return zoo.linear_placement(P)


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_every_named_schedule_is_a_fixed_order_made_to_fit_by_remat(name):
    """Each zoo name under a limit it exceeds on its own: the order is kept and fits by remat."""
    P, M = 2, 4
    stages = tuple(Stage(device=d, F=2, B=2, W=2, activation=4, wgrad_stash=2,
                         remat_options=(RematOption(0, 2), RematOption(2, 1)), RW=1)
                   for d in placement_for(name, P))
    free = PipelineInstance(P, M, stages, split_backward=True, allow_remat=True)
    named = zoo.zoo_schedule(free, name)
    need = max(min_memory_need(free, d) for d in range(P))
    instance = free.replace(memory_limit=need + 0.5 * (max(named.memory.peaks) - need))
    assert not zoo.zoo_schedule(instance, name).fits_memory
    result = solve_pipeline(instance, "cpsat", order=name, time_limit=5)
    assert result.status in ("feasible", "optimal"), result.status
    validate_pipeline(result.schedule)
    assert fb_order(result.schedule) == fb_order(named.schedule)


def test_greedy_fits_gpipe_by_rematerializing_the_last_stage_too():
    """GPipe keeps every microbatch of the last stage between its F and B: only remat there fits
    the limit, and the order heuristics (greedy = no CP-SAT) must find it."""
    stages = tuple(Stage(device=d, F=2, B=2, W=2, activation=4 if d == 2 else 1,
                         remat_options=(RematOption(0, 2),)) for d in range(3))
    instance = PipelineInstance(3, 6, stages, split_backward=True, allow_remat=True, memory_limit=8)
    assert not zoo.zoo_schedule(instance, "gpipe").fits_memory
    result = solve_pipeline(instance, "greedy", order="gpipe")
    assert result.status in ("feasible", "optimal")
    validate_pipeline(result.schedule)
    assert any(op.op == "R" and op.stage == 2 for op in result.schedule.ops)


@settings(max_examples=30, deadline=None)
@given(multi_wave_instances())
def test_order_memory_need_is_below_every_schedule_that_keeps_the_order(instance):
    """order_memory_needs is a lower bound on the peak of every schedule keeping the order: here
    every fitting heuristic and the CP-SAT optimum for 1F1B-like orders of the placement."""
    for name in zoo.ZOO:
        if not zoo.supports(name, instance):
            continue
        program = zoo.ZOO[name](instance)
        needs = order_memory_needs(instance, program)
        free = instance.replace(memory_limit=None)
        for candidate in [zoo.zoo_schedule(free, name), *order_candidates(instance, program, name)]:
            peaks = candidate.memory.peaks
            assert all(approx_le(need, peak) for need, peak in zip(needs, peaks)), (name, needs, peaks)


def test_an_order_that_cannot_fit_is_refused_at_once_with_its_need(tmp_path, capsys):
    """Just above the one-microbatch minimum, ZB-H1's warm-up alone keeps more than fits."""
    stages = tuple(Stage(device=d, F=4, B=4, W=4, activation=4, wgrad_stash=2,
                         remat_options=(RematOption(1, 4), RematOption(2, 3)), RW=1) for d in range(4))
    instance = PipelineInstance(4, 8, stages, split_backward=True, allow_remat=True)
    need = max(min_memory_need(instance, d) for d in range(instance.num_devices))
    instance = instance.replace(memory_limit=need + 0.5)  # ZB-H1 keeps 3 checkpoints of 1 beside an F
    proof = order_infeasibility_proof(instance, "zb-h1")
    assert proof is not None and "device 0" in proof
    result = solve_pipeline(instance, "cpsat", order="zb-h1", time_limit=30)
    assert result.status == "unknown" and result.solve_time < 5
    path = tmp_path / "i.json"
    instance.save(path)
    assert main(["solve", "pipeline", str(path), "--fix-order", "zb-h1", "--quiet"]) == 0
    assert "needs at least" in capsys.readouterr().out
    assert solve_pipeline(instance, "cpsat", time_limit=5).status in ("feasible", "optimal")
