"""formats.md 1.4 (remat options, backward-pass recompute RW): reading, named validation rules,
memory accounting, program CSV, simulation, views and the torch export refusal."""

import json

import pytest
from pipesched.solvers import solve_pipeline

from pipesched._common import FormatError, ValidationError
from pipesched.cli import main
from pipesched.pipeline import (
    Op,
    PipelineInstance,
    PipelineSchedule,
    RematOption,
    Stage,
    chrome_trace,
    format_program_csv,
    gantt,
    memory_timeline,
    parse_program_csv,
    simulate,
    torch_csv,
    validate_pipeline,
)


def instance(**overrides) -> PipelineInstance:
    stage = dict(device=0, F=2, B=2, W=2, activation=10, wgrad_stash=6,
                 remat_options=(RematOption(1, 2), RematOption(4, 1)), RW=1, wgrad_checkpoint=2)
    stage.update(overrides)
    return PipelineInstance(1, 1, (Stage(**stage),), split_backward=True, allow_remat=True)


def ops(*items) -> tuple[Op, ...]:
    return tuple(Op(start, end, op, 0, 0, option) for op, start, end, option in items)


def schedule(inst, items) -> PipelineSchedule:
    return PipelineSchedule.from_ops(inst, list(ops(*items)), lower_bound=None, status="feasible", solver="t",
                                     solve_time_s=0)


FULL = (("F", 0, 2, 0), ("R", 2, 3, 1), ("B", 3, 5, 0), ("RW", 5, 6, 0), ("W", 6, 8, 0))


def test_memory_follows_the_option_and_rw_rules():
    """F +10; F end -(10-4) (option 1 keeps 4); R +6; B end -(10-2) (RW: keeps wgrad_checkpoint
    2); RW start +(6-2); W end -6: the peak is 10 and every step is exactly the 1.4 amount."""
    inst = instance()
    timeline = memory_timeline(inst, ops(*FULL))
    assert timeline.peaks == (10,)
    report = validate_pipeline(schedule(inst, FULL))
    assert report.makespan == 8


@pytest.mark.parametrize("items, rule", [
    ((("F", 0, 2, 0), ("R", 2, 4, 1), ("B", 4, 6, 0), ("RW", 6, 7, 0), ("W", 7, 9, 0)), "rule 2"),  # option 1 R=1
    ((("F", 0, 2, 0), ("B", 2, 4, 0), ("W", 4, 6, 0), ("RW", 6, 7, 0)), "rule 3"),  # W before its RW
    ((("F", 0, 2, 0), ("B", 2, 4, 0), ("RW", 3, 4, 0), ("W", 4, 6, 0)), "rule 3"),  # RW before B ends
])
def test_broken_1_4_rules_are_named(items, rule):
    with pytest.raises(ValidationError, match=rule):
        validate_pipeline(schedule(instance(), items))


def test_rw_needs_the_stage_rw_duration():
    with pytest.raises(ValidationError, match="1.4"):
        validate_pipeline(schedule(instance(RW=None), (("F", 0, 2, 0), ("B", 2, 4, 0), ("RW", 4, 5, 0),
                                                       ("W", 5, 7, 0))))


def test_unknown_option_index_is_refused_by_key():
    with pytest.raises(FormatError, match=r"ops\[1\].option"):
        schedule(instance(), (("F", 0, 2, 0), ("R", 2, 3, 2), ("B", 3, 5, 0), ("W", 5, 7, 0)))


@pytest.mark.parametrize("stage, key", [
    ({"remat_options": [{"checkpoint": 11, "R": 1}]}, "remat_options[0].checkpoint"),
    ({"remat_options": [{"checkpoint": 1}]}, "remat_options[0]"),
    ({"remat_options": []}, "remat_options"),
    ({"wgrad_checkpoint": 7}, "wgrad_checkpoint"),
    ({"RW": -1}, "RW"),
])
def test_bad_1_4_keys_are_named(tmp_path, capsys, stage, key):
    data = instance().to_dict()
    data["stages"][0].update(stage)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and key in err and "bad.json" in err


def test_round_trip_keeps_the_1_4_keys_and_files_without_them_are_unchanged(tmp_path):
    inst = instance()
    saved = schedule(inst, FULL)
    path = tmp_path / "s.json"
    saved.save(path)
    loaded = PipelineSchedule.load(path)
    assert loaded == saved
    data = json.loads(path.read_text())
    assert data["instance"]["stages"][0]["remat_options"] == [{"checkpoint": 1, "R": 2}, {"checkpoint": 4, "R": 1}]
    assert [op.get("option", 0) for op in data["ops"] if op["op"] == "R"] == [1]
    plain = PipelineInstance(1, 1, (Stage(device=0, F=2, B=2, W=2, activation=10),), split_backward=True)
    keys = set(plain.to_dict()["stages"][0])
    assert not keys & {"remat_options", "RW", "wgrad_checkpoint"}


def test_program_csv_writes_options_and_rw():
    rows = parse_program_csv("0F0,0R0:1,0B0,0RW0,0W0\n")
    assert format_program_csv(rows).strip() == "0F0,0R0:1,0B0,0RW0,0W0"
    result = simulate(instance(), rows)
    assert [(o.op, o.option) for o in result.schedule.ops] == [("F", 0), ("R", 1), ("B", 0), ("RW", 0), ("W", 0)]
    assert result.schedule.makespan == 8 and result.fits_memory


def test_views_draw_rw_and_torch_export_refuses_it(tmp_path):
    s = schedule(instance(), FULL)
    trace = chrome_trace(s)
    assert any(e.get("args", {}).get("op") == "RW" for e in trace["traceEvents"])
    assert gantt(s, tmp_path / "g.png").stat().st_size > 0
    only_rw = schedule(instance(), (("F", 0, 2, 0), ("B", 2, 4, 0), ("RW", 4, 5, 0), ("W", 5, 7, 0)))
    with pytest.raises(FormatError, match="RW"):
        torch_csv(only_rw)


def test_solvers_choose_options_and_rw_under_tight_memory():
    """With limit 10 the pair cannot keep its stash and a second microbatch: solvers must remat."""
    stages = tuple(Stage(device=0, F=2, B=2, W=2, activation=10, wgrad_stash=6,
                         remat_options=(RematOption(1, 2), RematOption(4, 1)), RW=1, wgrad_checkpoint=2)
                   for _ in range(1))
    inst = PipelineInstance(1, 3, stages, split_backward=True, allow_remat=True, memory_limit=12)
    for solver in ("greedy", "cpsat"):
        result = solve_pipeline(inst, solver, time_limit=5)
        validate_pipeline(result.schedule)
        assert result.status in ("feasible", "optimal")
