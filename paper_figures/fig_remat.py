"""Remat: overhead versus budget, per solver, with the proven lower bound (Checkmate graphs).

Reads experiments/results/bench_remat.json when it holds the Checkmate graphs; otherwise solves
them itself (quick: CP-SAT 5 s per instance, else 60 s). The y axis is cost / no-remat cost; the
dashed line is the best proven lower bound over all solvers; budgets proven infeasible are marked.
A solver without a point at a budget found no schedule that fits (checkpoint-all never fits below
the reference peak).
"""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure
from pipesched.solvers import solve_remat

from pipesched._common import atomic_target
from pipesched.remat import RematInstance

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "experiments" / "results" / "bench_remat.json"
INSTANCES = ROOT.parent / "shared" / "instances" / "remat"
GRAPHS = ("VGG16", "VGG19", "fcn_8_vgg")
FRACTIONS = (0.9, 0.8, 0.7, 0.6)
SOLVERS = ("checkpoint-all", "sqrt-n", "chen-greedy", "greedy", "cpsat")
MARKERS = dict(zip(SOLVERS, "os^Dx"))


def bench_rows(path: Path = BENCH) -> list[dict]:
    rows = json.loads(path.read_text()) if path.exists() else []
    return [r for r in rows if r["kind"] == "graph" and r["graph"] in GRAPHS and r["solver"] in SOLVERS]


def solved_rows(quick: bool) -> list[dict]:
    limit = 5.0 if quick else 60.0
    rows = []
    for graph in GRAPHS:
        for fraction in FRACTIONS:
            instance = RematInstance.load(INSTANCES / f"{graph}_b{round(100 * fraction)}.json")
            for solver in SOLVERS:
                result = solve_remat(instance, solver, time_limit=limit)
                found = result.status in ("optimal", "feasible")
                rows.append({"graph": graph, "budget_fraction": fraction, "solver": solver,
                             "status": result.status,
                             "overhead": result.objective / instance.total_cost if found else None,
                             "bound_overhead": result.lower_bound / instance.total_cost})
    return rows


def plot(rows: list[dict], path: Path) -> Path:
    fig = Figure(figsize=(4 * len(GRAPHS), 3.6))
    axes = fig.subplots(1, len(GRAPHS), squeeze=False)[0]
    for ax, graph in zip(axes, GRAPHS):
        mine = [r for r in rows if r["graph"] == graph]
        fractions = sorted({r["budget_fraction"] for r in mine}, reverse=True)
        for solver in SOLVERS:
            points = [(r["budget_fraction"], r["overhead"]) for r in mine
                      if r["solver"] == solver and r["overhead"] is not None]
            if points:
                xs, ys = zip(*sorted(points, reverse=True))
                ax.plot(xs, ys, marker=MARKERS[solver], label=solver, alpha=0.85)
        infeasible = [f for f in fractions if any(r["budget_fraction"] == f and r["status"] == "infeasible"
                                                  for r in mine)]
        feasible = [f for f in fractions if f not in infeasible]
        bound = [max(r["bound_overhead"] for r in mine if r["budget_fraction"] == f and r["bound_overhead"])
                 for f in feasible]
        if feasible:
            ax.plot(feasible, bound, "k--", marker="_", markersize=14, label="lower bound")
        for f in infeasible:
            ax.axvspan(f - 0.02, f + 0.02, color="0.85")
            ax.text(f, 0.5, "infeasible (proven)", rotation=90, ha="center", va="center", fontsize=7,
                    transform=ax.get_xaxis_transform())
        ax.invert_xaxis()
        ax.set_title(graph)
        ax.set_xlabel("budget / reference peak")
        ax.set_ylabel("cost / no-remat cost")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_target(path) as temp:  # temp file + fsync + os.replace: never a partial figure
        fig.savefig(temp, dpi=150)
    return path


def make_figures(out_dir: Path, quick: bool) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = bench_rows()
    if {(r["graph"], r["solver"]) for r in rows} < {(g, s) for g in GRAPHS for s in SOLVERS}:
        rows = solved_rows(quick)
    return [plot(rows, out_dir / "remat_overhead_vs_budget.png")]


if __name__ == "__main__":
    import sys

    print(make_figures(ROOT / "paper_figures" / "out", quick="--quick" in sys.argv))
