"""Remat on a flax GPT: the schedule's predicted memory versus the compiled program's.

Reads experiments/results/bench_remat_jax.json (experiments/bench_remat_jax.py); without it,
solves and compiles a 2-block GPT itself (greedy schedules, budgets 1.0 to 0.6 of the reference
peak). Left: measured against predicted total memory, one point per schedule, with the +-15%
band. Right: memory against the budget for the explicit remat (predicted and measured), plain
`jax.grad`, and, when benchmarked, the JAX-native `checkpoint_name` policy, which XLA:CPU undoes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
from matplotlib.figure import Figure
from pipesched.solvers import solve_remat

from pipesched._common import atomic_target
from pipesched.remat import GPTConfig, compiled_memory, gpt_problem, memory_report, remat_instance_from_jax

BENCH = Path(__file__).resolve().parents[1] / "experiments" / "results" / "bench_remat_jax.json"
QUICK_FRACTIONS = (1.0, 0.9, 0.8, 0.7, 0.6)
TOLERANCE = 0.15
MIB = 2 ** 20


def measured_rows() -> list[dict]:
    """Greedy schedules of a 2-block GPT at falling budgets, with their compiled memory."""
    problem = gpt_problem(GPTConfig(vocab=128, seq_len=64, width=64, heads=4, depth=2), batch=4)
    instance = remat_instance_from_jax(problem.loss_fn, *problem.args, name="gpt-d2")
    plain = compiled_memory(jax.grad(problem.loss_fn), *problem.args)
    rows = [{"model": instance.name, "nodes": len(instance.nodes), "fraction": 1.0, "solver": "plain-jax-grad",
             "mode": "none",
             "predicted_total": instance.reference_peak + plain.argument + plain.output - plain.alias,
             "measured_total": plain.total}]
    for fraction in QUICK_FRACTIONS:
        sized = instance.with_budget(math.ceil(fraction * instance.reference_peak))
        report = memory_report(problem.loss_fn, problem.args, solve_remat(sized, "greedy", time_limit=5).schedule)
        rows.append({"model": instance.name, "nodes": len(instance.nodes), "fraction": fraction, "solver": "greedy",
                     "mode": "explicit",
                     "predicted_total": report.predicted_total, "measured_total": report.measured.total})
    return rows


def bench_rows(path: Path = BENCH) -> list[dict]:
    rows = json.loads(path.read_text()) if path.exists() else []
    return [r for r in rows if "measured_total" in r]


def plot(rows: list[dict], path: Path) -> Path:
    model = max(rows, key=lambda r: r["nodes"])["model"]  # the largest graph benchmarked
    rows = [r for r in rows if r["model"] == model]
    fig = Figure(figsize=(10, 4))
    scatter, sweep = fig.subplots(1, 2)

    explicit = [r for r in rows if r["mode"] == "explicit"]
    top = 1.05 * max(max(r["predicted_total"], r["measured_total"]) for r in rows) / MIB
    scatter.fill_between([0, top], [0, (1 - TOLERANCE) * top], [0, (1 + TOLERANCE) * top], color="0.9",
                         label=f"±{TOLERANCE:.0%}")
    scatter.plot([0, top], [0, top], "k--", lw=1, label="measured = predicted")
    for solver in sorted({r["solver"] for r in explicit}):
        mine = [r for r in explicit if r["solver"] == solver]
        scatter.plot([r["predicted_total"] / MIB for r in mine], [r["measured_total"] / MIB for r in mine],
                     "o", fillstyle="none", label=solver)
    lowest = 0.9 * min(min(r["predicted_total"], r["measured_total"]) for r in explicit) / MIB
    scatter.set_xlim(lowest, top)
    scatter.set_ylim(lowest, top)
    scatter.set_xlabel("predicted: schedule peak + fixed (MiB)")
    scatter.set_ylabel("measured: XLA memory_analysis (MiB)")
    scatter.set_title(f"{model}: every remat schedule", fontsize=9)
    scatter.legend(fontsize=7)

    solver = "cpsat" if any(r["solver"] == "cpsat" for r in explicit) else "greedy"
    for mode, style, label in (("explicit", "-", f"{solver}, pipesched.remat.apply"),
                               ("policy", ":", f"{solver}, checkpoint_name + policy")):
        mine = sorted((r for r in rows if r["solver"] == solver and r["mode"] == mode), key=lambda r: -r["fraction"])
        if mine:
            x = [r["fraction"] for r in mine]
            sweep.plot(x, [r["measured_total"] / MIB for r in mine], "o" + style, label=f"measured: {label}")
            if mode == "explicit":
                sweep.plot(x, [r["predicted_total"] / MIB for r in mine], "kx--", label="predicted")
    for r in rows:
        if r["solver"] == "plain-jax-grad":
            sweep.axhline(r["measured_total"] / MIB, color="C3", lw=1, label="plain jax.grad")
    sweep.invert_xaxis()
    sweep.set_xlabel("budget / reference peak")
    sweep.set_ylabel("total memory (MiB)")
    sweep.set_title("memory falls with the budget", fontsize=9)
    sweep.legend(fontsize=7)
    fig.tight_layout()
    with atomic_target(path) as temp:  # temp file + fsync + os.replace: never a partial figure
        fig.savefig(temp, dpi=150)
    return path


def make_figures(out_dir: Path, quick: bool) -> list[Path]:
    """The figure from the benchmark rows, else from a quick sweep (under a minute either way)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = bench_rows() or measured_rows()
    return [plot(rows, out_dir / "remat_memory.png")]
