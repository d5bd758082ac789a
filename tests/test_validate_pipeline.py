"""formats.md 1.2: each numbered rule, broken on its own in an otherwise valid schedule."""

import dataclasses

import pytest
from helpers import hand_1f1b, uniform

from pipesched import ValidationError
from pipesched.pipeline import Op, PipelineSchedule, memory_timeline, simulate, validate_pipeline


@pytest.fixture
def valid() -> PipelineSchedule:
    """Split backward and remat of microbatch 1 on every stage: every op kind and memory event."""
    instance = uniform(3, 4, split=True, remat=True, activation=4)
    remat = frozenset((s, 1) for s in range(3))
    schedule = simulate(instance, hand_1f1b(instance, remat=remat)).schedule
    peaks = memory_timeline(instance, schedule.ops).peaks
    schedule = dataclasses.replace(schedule, instance=instance.replace(memory_limit=max(peaks)),
                                   lower_bound=schedule.makespan / 2)
    validate_pipeline(schedule)
    return schedule


def replace_op(schedule: PipelineSchedule, name: str, **changes) -> PipelineSchedule:
    ops = [dataclasses.replace(op, **changes) if op.name == name else op for op in schedule.ops]
    return dataclasses.replace(schedule, ops=tuple(ops))


def expect(schedule: PipelineSchedule, rule: int, op: str | None = None) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        validate_pipeline(schedule)
    assert info.value.rule == f"1.2 rule {rule}", str(info.value)
    if op is not None:
        assert info.value.op == op and op in str(info.value)
    return info.value


def test_valid_schedule_reports_makespan_and_peaks(valid):
    report = validate_pipeline(valid)
    assert report.makespan == valid.makespan
    assert max(report.peak_memory) == valid.instance.memory_limit


@pytest.mark.parametrize("case", ["missing", "duplicate", "W unsplit", "R not allowed"])
def test_rule1_op_set(valid, case):
    ops = list(valid.ops)
    if case == "missing":
        ops = [op for op in ops if op.name != "2B3"]
        broken, name = dataclasses.replace(valid, ops=tuple(ops)), "2B3"
    elif case == "duplicate":
        extra = next(op for op in ops if op.name == "0F0")
        broken, name = dataclasses.replace(valid, ops=tuple(ops + [extra])), "0F0"
    elif case == "W unsplit":
        broken, name = dataclasses.replace(valid, instance=valid.instance.replace(split_backward=False)), None
    else:
        broken, name = dataclasses.replace(valid, instance=valid.instance.replace(allow_remat=False)), None
    expect(broken, 1, name)


def test_rule2_duration(valid):
    op = next(op for op in valid.ops if op.name == "1F2")
    expect(replace_op(valid, "1F2", end=op.end - 1), 2, "1F2")


def test_rule2_negative_start():
    instance = uniform(1, 1)
    ops = (Op(-5, 5, "F", 0, 0), Op(5, 25, "B", 0, 0))
    expect(PipelineSchedule.from_ops(instance, ops, lower_bound=None, status="feasible", solver="t",
                                     solve_time_s=0), 2, "0F0")


@pytest.mark.parametrize("name, needs", [("1F0", "0F0"), ("2B0", "2F0"), ("1B0", "2B0"), ("0W1", "0B1"),
                                         ("0R1", "0F1"), ("0B1", "0R1")])
def test_rule3_dependencies(valid, name, needs):
    """Start one op a time unit before the op it needs ends (rule 3 is checked before rule 4)."""
    op = next(o for o in valid.ops if o.name == name)
    start = next(o for o in valid.ops if o.name == needs).end - 1
    expect(replace_op(valid, name, start=start, end=start + op.end - op.start), 3, name)


def test_rule3_comm_delay():
    instance = uniform(2, 1, comm=3)
    ops = (Op(0, 10, "F", 0, 0), Op(12, 22, "F", 1, 0), Op(22, 42, "B", 1, 0), Op(45, 65, "B", 0, 0))
    expect(PipelineSchedule.from_ops(instance, ops, lower_bound=None, status="feasible", solver="t",
                                     solve_time_s=0), 3, "1F0")


def test_rule4_overlap(valid):
    """0F1 has no input to wait for: starting it one unit early overlaps only 0F0."""
    op = next(o for o in valid.ops if o.name == "0F1")
    expect(replace_op(valid, "0F1", start=op.start - 1, end=op.end - 1), 4, "0F1")


def test_rule4_zero_length_inside_another_op():
    instance = uniform(1, 1, F=0)
    ops = (Op(0, 0, "F", 0, 0), Op(0, 20, "B", 0, 0))
    ok = PipelineSchedule.from_ops(instance, ops, lower_bound=None, status="feasible", solver="t", solve_time_s=0)
    validate_pipeline(ok)  # touching at t=0 is fine
    instance2 = uniform(2, 1, F=0)
    ops2 = (Op(0, 0, "F", 0, 0), Op(0, 0, "F", 1, 0), Op(0, 20, "B", 1, 0), Op(20, 40, "B", 0, 0),)
    validate_pipeline(PipelineSchedule.from_ops(instance2, ops2, lower_bound=None, status="feasible", solver="t",
                                                solve_time_s=0))


def test_rule5_memory_limit(valid):
    broken = dataclasses.replace(valid, instance=valid.instance.replace(memory_limit=valid.instance.memory_limit - 1))
    expect(broken, 5)


def test_rule5_decreases_before_increases():
    """B(0) ends exactly when F(1) starts: at memory limit 1 this fits only if the free comes first."""
    instance = uniform(1, 2, memory_limit=1)
    ops = (Op(0, 10, "F", 0, 0), Op(10, 30, "B", 0, 0), Op(30, 40, "F", 0, 1), Op(40, 60, "B", 0, 1))
    schedule = PipelineSchedule.from_ops(instance, ops, lower_bound=60, status="optimal", solver="t", solve_time_s=0)
    assert validate_pipeline(schedule).peak_memory == (1,)


def test_rule5_remat_and_wgrad_stash_accounting():
    """activation 4, checkpoint 1, wgrad_stash 2: F+4, F end -3 (remat), R +3, B end -2, W end -2."""
    instance = uniform(1, 1, split=True, remat=True, activation=4)  # stash 2, checkpoint 1
    ops = (Op(0, 10, "F", 0, 0), Op(10, 20, "R", 0, 0), Op(20, 40, "B", 0, 0), Op(40, 50, "W", 0, 0))
    timeline = memory_timeline(instance, ops)
    assert timeline.times[0] == (0, 10, 40, 50)
    assert timeline.levels[0] == (4, 4, 2, 0)  # at t=10: -3 then +3


@pytest.mark.parametrize("case", ["makespan", "bound above", "optimal without proof", "infeasible with ops"])
def test_rule6_result_claims(valid, case):
    if case == "makespan":
        broken = dataclasses.replace(valid, makespan=valid.makespan + 1)
    elif case == "bound above":
        broken = dataclasses.replace(valid, lower_bound=valid.makespan + 1)
    elif case == "optimal without proof":
        broken = dataclasses.replace(valid, status="optimal")
    else:
        broken = dataclasses.replace(valid, status="infeasible")
    expect(broken, 6)


def test_infeasible_result_without_ops_is_valid(valid):
    result = PipelineSchedule.empty(valid.instance, status="infeasible", lower_bound=None, solver="t", solve_time_s=0)
    assert validate_pipeline(result).makespan == 0
