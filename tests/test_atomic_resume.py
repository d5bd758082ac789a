"""Atomic writes everywhere a file is produced, and benchmarks that resume after `kill -9` or from a
results file cut mid-write (issue 15, item 2)."""

from __future__ import annotations

import ast
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import hand_1f1b, uniform

from pipesched._common import atomic_target, atomic_write, read_results
from pipesched.cli import main
from pipesched.pipeline import gantt, save_chrome_trace, simulate

REPO = Path(__file__).resolve().parents[1]
BENCH_REMAT = REPO / "experiments" / "bench_remat.py"
PNG = b"\x89PNG\r\n\x1a\n"


def listing(folder: Path) -> list[str]:
    """Every name in `folder`, hidden temp files included."""
    return sorted(p.name for p in folder.iterdir())


def remat_bench(out: Path, layers: list[int], repeats: int) -> list[str]:
    """bench_remat.py on random chains only (chain DP, no graph, no CP-SAT): one row per length."""
    empty = out.parent / "no-graphs"
    empty.mkdir(exist_ok=True)
    return [sys.executable, str(BENCH_REMAT), "--out", str(out), "--instances", str(empty),
            "--small-chains", "0", "--repeats", str(repeats), "--chain-layers", *map(str, layers)]


def bench_env() -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "TQDM_DISABLE": "1"}


# --------------------------------------------------------------------------------------------
# A real benchmark, killed mid-run and restarted


def test_bench_killed_mid_run_keeps_complete_rows_and_resumes_without_recomputing(tmp_path):
    out = tmp_path / "bench_remat.json"
    layers = [280 + i for i in range(6)]  # ~0.1-0.3 s per chain-DP run; 3 runs per row
    log = tmp_path / "first-run.log"
    with log.open("wb") as sink:  # a file, not a pipe: a full pipe would stall the benchmark
        proc = subprocess.Popen(remat_bench(out, layers, repeats=3), cwd=REPO, env=bench_env(),
                                stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline, reads = time.monotonic() + 90, 0
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists():
                rows = json.loads(out.read_bytes())  # every read, mid-run, is complete JSON
                reads += 1
                if rows:
                    break
            time.sleep(0.01)
        assert proc.poll() is None, f"the benchmark ended before it could be killed: {log.read_text()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert reads >= 1
    before = json.loads(out.read_bytes())  # complete, valid JSON after the kill
    assert isinstance(before, list) and 1 <= len(before) < len(layers)
    assert [r["instance"] for r in before] == [f"chain_random_l{n}" for n in layers[:len(before)]]
    assert not (tmp_path / "bench_remat.md").exists()  # it really was stopped before the end

    done = subprocess.run(remat_bench(out, layers, repeats=3), cwd=REPO, env=bench_env(), capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "warning" not in done.stderr  # the killed run's file was complete: nothing set aside
    after = json.loads(out.read_bytes())
    assert sorted(r["instance"] for r in after) == sorted(f"chain_random_l{n}" for n in layers)  # each once
    # The rows from before the kill are kept as they were (measured times included): not recomputed.
    assert after[:len(before)] == before
    assert all(len(r["times_s"]) == 3 for r in after)
    report = (tmp_path / "bench_remat.md").read_text()
    assert all(report.count(f"| {r['layers']} | {r['status']} |") == 1 for r in after)  # every row, once
    assert not list(tmp_path.glob("*.corrupt*"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bench_remat.md.")]  # md: no temp left


def test_bench_rebuilds_a_results_file_cut_mid_write(tmp_path):
    out = tmp_path / "bench_remat.json"
    old = json.dumps([{"kind": "chain-dp", "instance": "chain_random_l10", "layers": 10, "times_s": [0.1]}] * 3,
                     indent=1)
    cut = old[: len(old) // 2].encode()  # what a non-atomic writer leaves when killed mid-write
    out.write_bytes(cut)
    done = subprocess.run(remat_bench(out, [10, 20], repeats=1), cwd=REPO, env=bench_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    warnings = [line for line in done.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "not valid JSON" in warnings[0] and "bench_remat.json.corrupt" in warnings[0]
    assert (tmp_path / "bench_remat.json.corrupt").read_bytes() == cut  # moved aside untouched
    rows = json.loads(out.read_bytes())
    assert [r["instance"] for r in rows] == ["chain_random_l10", "chain_random_l20"]  # rebuilt in full


# --------------------------------------------------------------------------------------------
# read_results


def test_read_results_resumes_a_valid_file_and_sets_aside_anything_else(tmp_path, capsys):
    path = tmp_path / "r.json"
    default: list = []
    fresh = read_results(path, default)
    assert fresh == [] and fresh is not default  # no file: a fresh copy of the default
    path.write_text('[{"a": 1}]\n')
    assert read_results(path, []) == [{"a": 1}] and path.read_text() == '[{"a": 1}]\n'
    assert capsys.readouterr().err == ""

    bad = {"truncated": b'[{"a": 1}, {"a"', "empty": b"", "not utf-8": b"\xff\xfe[]",
           "object for rows": b'{"a": 1}', "row not an object": b"[1, 2]"}
    for n, data in enumerate(bad.values()):
        path.write_bytes(data)
        assert read_results(path, []) == []
        assert not path.exists()
        aside = tmp_path / ("r.json.corrupt" + (f".{n}" if n else ""))  # an earlier one is never overwritten
        assert aside.read_bytes() == data
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"warning: {path}: ") and aside.name in err

    shape = {"rows": [], "scaling": []}
    path.write_text('{"rows": [{"x": 1}]}')  # a key missing
    assert read_results(path, shape) == shape
    path.write_text('{"rows": [], "scaling": {}}')  # a key of another type
    assert read_results(path, shape) == shape
    path.write_text('{"rows": [{"x": 1}], "scaling": [], "extra": 3}')
    assert read_results(path, shape) == {"rows": [{"x": 1}], "scaling": [], "extra": 3}
    assert read_results(path, shape, valid=lambda r: all("x" in row for row in r["rows"]))["extra"] == 3
    path.write_text('{"rows": [{"y": 1}], "scaling": []}')
    assert read_results(path, shape, valid=lambda r: all(row["x"] for row in r["rows"])) == shape  # KeyError: bad
    capsys.readouterr()

    (tmp_path / "folder.json").mkdir()
    with pytest.raises(OSError):  # no half-written file: not set aside
        read_results(tmp_path / "folder.json", [])
    assert (tmp_path / "folder.json").is_dir()


def test_a_writer_killed_inside_atomic_target_leaves_the_last_complete_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_text('[{"row": 1}]\n')
    code = ("import os, sys\nfrom pipesched._common import atomic_target\n"
            "with atomic_target(sys.argv[1]) as temp:\n"
            "    f = open(temp, 'w'); f.write('[{\"row\": 1}, {\"ro'); f.flush()\n"
            "    os._exit(9)  # killed mid-write: no cleanup runs\n")
    assert subprocess.run([sys.executable, "-c", code, str(path)], timeout=60).returncode == 9
    assert path.read_text() == '[{"row": 1}]\n'
    assert read_results(path, []) == [{"row": 1}]  # resumes from the last complete state


# --------------------------------------------------------------------------------------------
# atomic_write / atomic_target


def test_atomic_target_keeps_the_old_file_when_the_writer_raises(tmp_path):
    path = tmp_path / "out.png"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="midway"):
        with atomic_target(path) as temp:
            assert temp.parent == tmp_path and temp.suffix == ".png" and temp != path
            temp.write_bytes(b"half of a new fi")
            raise RuntimeError("midway")
    assert path.read_bytes() == b"old" and listing(tmp_path) == ["out.png"]

    new = tmp_path / "sub" / "new.json"  # no old file: none is left after a failure, nor a temp file
    with pytest.raises(RuntimeError):
        with atomic_target(new) as temp:
            temp.write_text("{")
            raise RuntimeError
    assert listing(tmp_path / "sub") == []

    with atomic_target(path) as temp:
        temp.write_bytes(b"new")
    assert path.read_bytes() == b"new" and listing(tmp_path) == ["out.png", "sub"]


def partial_write_bytes(monkeypatch) -> None:
    """Path.write_bytes writes half of its data, then fails as a full disk would."""
    real = Path.write_bytes

    def write_half(self, data):
        real(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", write_half)


def test_atomic_write_keeps_the_old_file_when_the_write_fails_midway(tmp_path, monkeypatch):
    path = tmp_path / "table.md"
    atomic_write(path, "old table\n")
    assert path.read_text() == "old table\n"
    atomic_write(path, b"bytes too\n")
    assert path.read_bytes() == b"bytes too\n"
    partial_write_bytes(monkeypatch)
    with pytest.raises(OSError, match="No space"):
        atomic_write(path, "a new table that does not fit\n" * 100)
    assert path.read_bytes() == b"bytes too\n" and listing(tmp_path) == ["table.md"]


# --------------------------------------------------------------------------------------------
# The package's own writers go through it


@pytest.fixture
def schedule():
    instance = uniform(2, 3, split=True)
    return simulate(instance, hand_1f1b(instance)).schedule


@pytest.fixture
def replaced(monkeypatch):
    """The destinations of every os.replace call."""
    calls: list[Path] = []
    real = os.replace

    def spy(src, dst):
        calls.append(Path(dst))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    return calls


def test_gantt_writes_atomically_and_keeps_the_old_chart_if_savefig_fails(tmp_path, schedule, replaced,
                                                                          monkeypatch):
    import matplotlib.figure
    import matplotlib.pyplot as plt

    path = gantt(schedule, tmp_path / "g.png")
    assert path.read_bytes()[:8] == PNG and replaced == [path] and listing(tmp_path) == ["g.png"]
    old = path.read_bytes()
    figures = plt.get_fignums()

    def broken_savefig(self, fname, **kwargs):
        Path(fname).write_bytes(PNG + b"half a chart")
        raise RuntimeError("savefig failed midway")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken_savefig)
    with pytest.raises(RuntimeError, match="midway"):
        gantt(schedule, path)
    assert path.read_bytes() == old and listing(tmp_path) == ["g.png"]
    assert plt.get_fignums() == figures  # the figure is closed all the same
    with pytest.raises(RuntimeError):
        gantt(schedule, tmp_path / "new.pdf")
    assert listing(tmp_path) == ["g.png"]


def test_chrome_trace_writes_atomically(tmp_path, schedule, replaced, monkeypatch):
    path = save_chrome_trace(schedule, tmp_path / "t.trace.json")
    assert replaced == [path] and json.loads(path.read_text())["traceEvents"]
    old = path.read_bytes()
    partial_write_bytes(monkeypatch)
    with pytest.raises(OSError):
        save_chrome_trace(schedule, path)
    assert path.read_bytes() == old and listing(tmp_path) == ["t.trace.json"]


def test_export_torch_writes_atomically(tmp_path, schedule, replaced, monkeypatch):
    schedule.save(tmp_path / "schedule.json")
    out = tmp_path / "o.csv"
    replaced.clear()
    assert main(["export", "torch", str(tmp_path / "schedule.json"), str(out)]) == 0
    assert replaced == [out] and out.read_text().splitlines()[0].startswith("0F0,")
    old = out.read_bytes()
    partial_write_bytes(monkeypatch)
    with pytest.raises(OSError):
        main(["export", "torch", str(tmp_path / "schedule.json"), str(out)])
    assert out.read_bytes() == old and listing(tmp_path) == ["o.csv", "schedule.json"]


# --------------------------------------------------------------------------------------------
# No writer left behind


SCRIPTS = sorted([*(REPO / "experiments").glob("*.py"), *(REPO / "paper_figures").glob("*.py"),
                  REPO / "pipesched" / "pipeline" / "_view.py", REPO / "pipesched" / "cli.py",
                  REPO / "pipesched" / "executor" / "_distributed.py"])
WRITERS = ("write_text", "write_bytes", "dump", "savez", "savez_compressed", "savetxt", "to_csv")
LIVE_LOGS = {"_distributed.py"}  # workers' stdout, streamed into rank<i>.log of a temporary folder


def direct_writes(script: Path) -> list[str]:
    """Calls in `script` that write a file other than through atomic_target / atomic_write /
    write_json: write_text, json.dump, np.save*, open(..., "w"), savefig onto anything but the
    temporary path of an atomic_target; and, in experiments/, a results file read back with
    json.loads instead of read_results."""
    problems = []
    for node in ast.walk(ast.parse(script.read_text())):
        if not isinstance(node, ast.Call):
            continue
        func, first = ast.unparse(node.func), ast.unparse(node.args[0]) if node.args else ""
        name, where = func.rsplit(".", 1)[-1], f"{script.name}:{node.lineno}: {ast.unparse(node)[:60]}"
        if (name in WRITERS or func == "np.save") and first != "f":
            problems.append(where)  # np.savez(f, ...) writes to the open temp file of an atomic_target
        if name == "savefig" and first != "temp":
            problems.append(where)
        if func == "open" and len(node.args) > 1 and any(c in ast.unparse(node.args[1]) for c in "wax") \
                and first != "temp" and script.name not in LIVE_LOGS:
            problems.append(where)
        if script.parent.name == "experiments" and func == "json.loads" and "out" in first and "read_text" in first:
            problems.append(where)
    return problems


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_no_direct_file_writes(script):
    assert not direct_writes(script)


def test_the_write_check_finds_direct_writes(tmp_path):
    bad = tmp_path / "experiments" / "bad.py"
    bad.parent.mkdir()
    bad.write_text("args.out.write_text(text)\nfig.savefig(path)\nopen(p, 'w')\nnp.savez(out, a=1)\n"
                   "rows = json.loads(args.out.read_text())\nwrite_json(rows, args.out)\n")
    assert [p.split(":")[1] for p in direct_writes(bad)] == ["1", "2", "3", "4", "5"]
