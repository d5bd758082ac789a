"""Programs, the earliest-start simulator, the views and the CLI."""

import json

import pytest
from helpers import hand_1f1b, uniform
from hypothesis import given
from hypothesis import strategies as st

from pipesched import FormatError
from pipesched.cli import main
from pipesched.pipeline import (
    Action,
    DeadlockError,
    chrome_trace,
    format_grid,
    format_program_csv,
    gantt,
    parse_program_csv,
    program_of,
    simulate,
    torch_csv,
    validate_pipeline,
)


@given(st.integers(1, 6), st.integers(1, 12), st.integers(1, 9), st.integers(1, 9))
def test_1f1b_textbook_makespan(P, M, F, B):
    instance = uniform(P, M, F=F, B=B)
    result = simulate(instance, hand_1f1b(instance))
    assert result.schedule.makespan == (M + P - 1) * (F + B)
    assert result.memory.peaks[0] == min(P, M)
    validate_pipeline(result.schedule)


def test_simulate_honours_comm_delays_and_reports_memory_overflow():
    instance = uniform(2, 2, comm=3, memory_limit=1)
    result = simulate(instance, hand_1f1b(instance))
    # 0F0 [0,10], 1F0 [13,23], 1B0 [23,43], 0B0 [46,66] ...
    ops = {op.name: op for op in result.schedule.ops}
    assert ops["1F0"].start == 13 and ops["0B0"].start == 46
    assert not result.fits_memory  # device 0 holds 2 activations before 0B0


def test_deadlock_names_the_blocked_actions():
    instance = uniform(2, 2)
    program = [["0F0", "0B0", "0F1", "0B1"], ["1F1", "1F0", "1B0", "1B1"]]
    with pytest.raises(DeadlockError) as info:
        simulate(instance, program)
    blocked = {(b.device, str(b.action)): b.waiting_for for b in info.value.blocked}
    assert blocked == {(0, "0B0"): ("1B0",), (1, "1F1"): ("0F1",)}
    assert "device 0 at 0B0 waits for 1B0" in str(info.value)


@pytest.mark.parametrize("program, message", [
    ([["0F0", "0B0"], ["1F0"]], "action 1B0 is missing"),
    ([["0F0", "0B0", "0F0"], ["1F0", "1B0"]], "duplicate action"),
    ([["0F0", "0B0", "1F0"], ["1B0"]], "stage 1 runs on device 1"),
    ([["0F0", "0B0", "0W0"], ["1F0", "1B0"]], "W needs split_backward"),
    ([["0F0", "0B0"]], "expected 2 device rows"),
])
def test_bad_programs_are_refused(program, message):
    with pytest.raises(FormatError, match=message):
        simulate(uniform(2, 1), program)


def test_program_csv_roundtrip_and_pytorch_I():
    instance = uniform(3, 4, split=True)
    schedule = simulate(instance, hand_1f1b(instance)).schedule
    program = program_of(schedule)
    assert parse_program_csv(format_program_csv(program)) == program
    exported = torch_csv(schedule)
    assert "0I0" in exported and "0B0" not in exported  # PyTorch writes split input-grad as I
    assert parse_program_csv(exported) == program  # and I reads back as B
    assert simulate(instance, parse_program_csv(exported)).schedule.makespan == schedule.makespan


def test_export_refuses_remat():
    instance = uniform(2, 2, remat=True)
    schedule = simulate(instance, hand_1f1b(instance, remat=frozenset({(0, 0)}))).schedule
    with pytest.raises(FormatError, match="R ops"):
        torch_csv(schedule)


def test_grid_and_trace():
    instance = uniform(2, 2)
    schedule = simulate(instance, hand_1f1b(instance)).schedule
    grid = format_grid(schedule)
    assert grid.splitlines()[1].startswith("dev 0 ") and "0F0" in grid and "makespan 90" in grid
    trace = chrome_trace(schedule)
    slices = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(slices) == len(schedule.ops)
    assert all({"name", "ts", "dur", "pid", "tid"} <= e.keys() for e in slices)
    assert {e["tid"] for e in slices} == {0, 1}
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"}
    assert names == {"device 0", "device 1"}
    json.dumps(trace)  # serialisable


def test_gantt_png(tmp_path):
    instance = uniform(3, 4, split=True, memory_limit=3)
    schedule = simulate(instance, hand_1f1b(instance)).schedule
    path = gantt(schedule, tmp_path / "g.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000


# ---------------------------------------------------------------------------------------------
# CLI


@pytest.fixture
def files(tmp_path):
    instance = uniform(2, 3, split=True)
    instance.save(tmp_path / "instance.json")
    (tmp_path / "program.csv").write_text(format_program_csv(tuple(map(tuple, hand_1f1b(instance)))))
    return tmp_path


def test_cli_simulate_show_export_validate(files, capsys):
    out = files / "schedule.json"
    assert main(["simulate", str(files / "instance.json"), str(files / "program.csv"), "--out", str(out)]) == 0
    assert main(["show", str(out), "--png", str(files / "s.png"), "--trace", str(files / "t.json")]) == 0
    assert (files / "s.png").stat().st_size > 10_000
    assert json.loads((files / "t.json").read_text())["traceEvents"]
    assert main(["export", "torch", str(out), str(files / "o.csv")]) == 0
    assert (files / "o.csv").read_text().splitlines()[0].startswith("0F0,0F1,0I0,0W0")  # one warm-up forward
    assert main(["validate", str(out), str(files / "instance.json")]) == 0
    assert capsys.readouterr().out.count("OK ") == 2


def test_cli_validate_invalid_schedule_exit_1(files, capsys):
    out = files / "schedule.json"
    main(["simulate", str(files / "instance.json"), str(files / "program.csv"), "--out", str(out)])
    d = json.loads(out.read_text())
    d["makespan"] += 1
    out.write_text(json.dumps(d))
    assert main(["validate", str(out)]) == 1
    err = capsys.readouterr().err
    assert "1.2 rule 6" in err and err.startswith(f"error: {out}: invalid:")


@pytest.mark.parametrize("content", ['{"format": "pipesched.pipeline-instance/1", "num_dev',
                                     '{"format": "nope/1"}', "[1, 2]"])
def test_cli_malformed_exit_2(tmp_path, capsys, content):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    assert main(["validate", str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(f"error: {bad}: ")
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err


def test_cli_simulate_deadlock_exit_1(files, capsys):
    (files / "dead.csv").write_text("0B0,0F0,0W0,0F1,0B1,0W1,0F2,0B2,0W2\n1F0,1B0,1W0,1F1,1B1,1W1,1F2,1B2,1W2\n")
    assert main(["simulate", str(files / "instance.json"), str(files / "dead.csv")]) == 1
    assert "deadlock: device 0 at 0B0 waits for" in capsys.readouterr().err


def test_cli_bad_program_exit_2(files, capsys):
    (files / "bad.csv").write_text("0F0,0X1\n")
    assert main(["simulate", str(files / "instance.json"), str(files / "bad.csv")]) == 2
    assert "row 0 column 1" in capsys.readouterr().err


def test_action_parse():
    assert Action.parse("12W3") == Action(12, "W", 3) and str(Action(2, "F", 0)) == "2F0"
