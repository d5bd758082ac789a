"""Ctrl-C during `pipesched solve ... --out`: exit 130, one stderr line, a complete result file."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import uniform

from pipesched import load, validate
from pipesched.placement import synthetic_traces
from pipesched.remat import RematInstance
from pipesched.solvers import solve_remat

INTERRUPT_AFTER_S = 4.0  # past start-up and the warm starts, well inside the 60 s CP-SAT search


def interrupted_solve(kind: str, instance: Path, out: Path) -> subprocess.CompletedProcess:
    """Run `pipesched solve KIND INSTANCE --solver cpsat --time-limit 60 --out OUT`, send SIGINT."""
    command = [sys.executable, "-c", "import sys; from pipesched.cli import main; sys.exit(main())", "solve", kind, str(instance), "--solver", "cpsat",
               "--time-limit", "60", "--quiet", "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(INTERRUPT_AFTER_S)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=30)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def large_pipeline(tmp_path: Path) -> Path:
    path = tmp_path / "pipeline.json"
    uniform(8, 128, split=True, remat=True, memory_limit=4).save(path)
    return path


def large_placement(tmp_path: Path) -> Path:
    path = tmp_path / "placement.json"
    synthetic_traces(64, 8, 9, 4, 4000, exponents=(1.0,), seed=0)[0].save(path)
    return path


CASES = {
    "remat": lambda tmp_path, shared: shared / "remat" / "random_layered_n250_b60.json",
    "pipeline": lambda tmp_path, shared: large_pipeline(tmp_path),
    "placement": lambda tmp_path, shared: large_placement(tmp_path),
}


@pytest.mark.parametrize(("kind", "old_file"), [("remat", False), ("remat", True), ("pipeline", True),
                                               ("placement", False)])
def test_sigint_writes_the_best_result_so_far_and_exits_130(kind, old_file, tmp_path, instances_dir):
    instance = CASES[kind](tmp_path, instances_dir)
    out = tmp_path / "result.json"
    if old_file:
        out.write_text('{"format": "an older result"}\n')
    run = interrupted_solve(kind, instance, out)
    assert run.returncode == 130, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"interrupted: wrote best result so far to {out}"), run.stderr
    result = load(out)
    validate(result)
    assert result.status in ("feasible", "unknown", "optimal")
    assert result.solve_time_s < 30
    assert {p.name for p in tmp_path.iterdir()} <= {out.name, instance.name}  # no temp file left behind


def test_a_library_caller_gets_the_interrupted_result(instances_dir):
    """Ctrl-C in the middle of `solve_remat`: a Result marked interrupted, long before the limit."""
    instance = RematInstance.load(instances_dir / "remat" / "random_layered_n250_b60.json")
    timer = threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    started = time.perf_counter()
    result = solve_remat(instance, "cpsat", time_limit=60)
    timer.join()
    assert result.interrupted and time.perf_counter() - started < 10
    assert result.status in ("feasible", "unknown") and result.lower_bound >= instance.total_cost
