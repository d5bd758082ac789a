"""Start-up time of the CLI: how long each command takes to answer, as a user runs it.

    python experiments/bench_startup.py [--repeats 5] [--fresh]

Runs each command `--repeats` times as a new process (the installed `pipesched` script of this
interpreter's environment, so imports are paid every time) and records every wall time and the
median, plus which heavy libraries the command imported (JAX, flax, OR-Tools, matplotlib). The
first run of a command is kept too: it is the one closest to a cold start. Writes
experiments/results/bench_startup.json (commands already measured are skipped unless --fresh, so an
interrupted run resumes) and bench_startup.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm.auto import tqdm

from pipesched._common import atomic_write, read_results, write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
SHARED = Path(os.environ.get("PIPESCHED_SHARED", ROOT.parent / "shared"))
HEAVY = ("jax", "flax", "ortools", "matplotlib")
TARGET_S = 1.0  # issue 15: --help, validate, show and export answer in under a second (median)


def commands(instance: Path, schedule: Path, out: Path) -> dict[str, list[str]]:
    return {
        "--help": ["--help"],
        "validate": ["validate", str(instance)],
        "show": ["show", str(schedule)],
        "export": ["export", "torch", str(schedule), str(out)],
        "solve --help": ["solve", "--help"],
        "solve pipeline (greedy)": ["solve", "pipeline", str(instance), "--solver", "greedy", "--quiet"],
    }


def imported(argv: list[str]) -> list[str]:
    """The heavy libraries a command imports (run in process, so the modules can be listed)."""
    code = ("import sys, contextlib, io\nfrom pipesched.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    try: main({argv!r})\n    except SystemExit: pass\n"
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return [m for m in out.strip().split(",") if m]


def measure(argv: list[str], repeats: int) -> dict:
    script = Path(sys.executable).with_name("pipesched")
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([str(script), *argv], capture_output=True, check=True)
        times.append(time.perf_counter() - started)
    return {"times_s": times, "median_s": statistics.median(times), "first_s": times[0],
            "imports": imported(argv)}


def markdown(rows: dict[str, dict]) -> str:
    lines = [f"CLI start-up: wall time of a new process per command, median of {{n}} runs "
             f"(target < {TARGET_S:g} s for --help, validate, show, export).", "",
             "| command | median s | first run s | heavy imports |", "|---|---|---|---|"]
    for name, row in rows.items():
        lines.append(f"| `pipesched {name}` | {row['median_s']:.3f} | {row['first_s']:.3f} | "
                     f"{', '.join(row['imports']) or '-'} |")
    n = {len(r["times_s"]) for r in rows.values()}
    return "\n".join(lines).replace("{n}", "/".join(map(str, sorted(n)))) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fresh", action="store_true", help="measure every command again")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_startup.json")
    args = parser.parse_args(argv)

    rows: dict[str, dict] = {} if args.fresh else read_results(args.out, {})
    instance = SHARED / "instances" / "pipeline" / "p02_1f1b_memory.json"
    with tempfile.TemporaryDirectory() as tmp:
        schedule = Path(tmp) / "schedule.json"
        subprocess.run([str(Path(sys.executable).with_name("pipesched")), "solve", "pipeline", str(instance),
                        "--solver", "1f1b", "--quiet", "--out", str(schedule)], capture_output=True, check=True)
        todo = {k: v for k, v in commands(instance, schedule, Path(tmp) / "out.csv").items() if k not in rows}
        for name, command in tqdm(todo.items(), desc="bench startup"):
            rows[name] = measure(command, args.repeats)
            write_json(rows, args.out)
    atomic_write(args.out.with_suffix(".md"), markdown(rows))
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
