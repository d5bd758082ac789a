"""Start-up: commands import only what they need (times are in experiments/bench_startup.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import INSTANCES

HEAVY = ("jax", "flax", "optax", "ortools", "matplotlib")


def imported_by(argv: list[str]) -> set[str]:
    """The heavy modules loaded by running `pipesched ARGV` in a fresh interpreter."""
    code = ("import sys, contextlib, io\nfrom pipesched.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    try: main({argv!r})\n    except SystemExit: pass\n"
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return {m for m in out.stdout.strip().split(",") if m}


@pytest.fixture(scope="module")
def schedule(tmp_path_factory) -> str:
    from pipesched.pipeline import PipelineInstance
    from pipesched.pipeline.zoo import zoo_schedule

    path = tmp_path_factory.mktemp("startup") / "schedule.json"
    zoo_schedule(PipelineInstance.load(INSTANCES / "pipeline" / "p02_1f1b_memory.json"), "1f1b").schedule.save(path)
    return str(path)


def test_reading_commands_import_no_jax_ortools_or_matplotlib(schedule, tmp_path):
    instance = str(INSTANCES / "pipeline" / "p02_1f1b_memory.json")
    for argv in (["--help"], ["validate", instance, schedule], ["show", schedule],
                 ["export", "torch", schedule, str(tmp_path / "o.csv")]):
        assert imported_by(argv) == set(), argv


@pytest.mark.parametrize("kind,name", [("pipeline", "pipeline/p02_1f1b_memory.json"),
                                       ("remat", "remat/chain_n10_k2.json"),
                                       ("placement", "placement/eplb_readme_layer0.json")])
def test_solve_imports_no_jax(kind, name, tmp_path):
    out = tmp_path / "r.json"
    loaded = imported_by(["solve", kind, str(INSTANCES / name), "--solver", "greedy", "--quiet", "--out", str(out)])
    assert "jax" not in loaded and "flax" not in loaded and "ortools" in loaded
    assert json.loads(out.read_text())["status"] in ("optimal", "feasible")


def test_jax_names_still_load_on_use():
    import pipesched.remat as remat

    assert callable(remat.remat_instance_from_jax) and "remat_instance_from_jax" in dir(remat)
    with pytest.raises(AttributeError):
        remat.no_such_name  # noqa: B018


def test_run_refuses_a_bad_schedule_before_starting_jax(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'{"format": "pipesched.pipeline-schedule/1", "instance": ')
    code = ("import sys\nfrom pipesched.cli import main\n"
            f"rc = main(['run', '--model', 'mlp', '--devices', '2', '--schedule', {str(bad)!r}, '--report', 'r.json'])\n"
            "print(rc, 'jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.stdout.split() == ["2", "False"], out
    assert out.stderr.startswith(f"error: {bad}: invalid JSON") and out.stderr.count("\n") == 1
