"""Expert placement: cost versus batch size per strategy, with the proven bound.

Reads experiments/results/bench_placement.json for traces benchmarked at every batch size; without
such rows it solves a correlated synthetic trace (E = 16, G = 4, k = 2, with and without spare
slots) itself. The y axis is cost / mean device load (b * k / G), the max/mean imbalance that EPLB
reports: 1 is perfect balance; the dashed line is the best proven lower bound.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure
from pipesched.solvers import solve_placement

from pipesched._common import atomic_target
from pipesched.placement import synthetic_traces

BENCH = Path(__file__).resolve().parents[1] / "experiments" / "results" / "bench_placement.json"
BATCH_SIZES = (1, 2, 4, 8, 64, 0)  # 0 = the whole trace
SOLVERS = ("round-robin", "random", "eplb", "coactivation", "local-search", "cpsat")
MARKERS = dict(zip(SOLVERS, "osD^vx"))


def bench_traces(path: Path = BENCH) -> dict[str, list[dict]]:
    """Rows of the benchmarked traces that have every batch size, by trace."""
    rows = json.loads(path.read_text()) if path.exists() else []
    by_trace: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_trace[r["trace"]].append(r)
    return {t: rs for t, rs in by_trace.items()
            if {r["b"] for r in rs} >= set(BATCH_SIZES) and len({r["solver"] for r in rs}) >= 3}


def solved_traces(quick: bool) -> dict[str, list[dict]]:
    """Solve two synthetic traces at every batch size (quick: shorter trace and limits)."""
    tokens, cpsat_limit = (256, 2.0) if quick else (1024, 20.0)
    traces = {}
    for spare in (0, 1):
        (instance,) = synthetic_traces(16, 4, 4 + spare, 2, tokens, exponents=(1.0,), name="synthetic")
        traces[instance.name] = [
            {"b": b, "solver": solver, "k": 2, "G": 4, "tokens": tokens, "cost": result.objective,
             "lower_bound": result.lower_bound}
            for b in BATCH_SIZES for solver in SOLVERS
            for result in [solve_placement(instance.with_batch_size(b or tokens), solver,
                                           time_limit=cpsat_limit if solver == "cpsat" else 0.5)]
        ]
    return traces


def plot(trace: str, rows: list[dict], path: Path) -> Path:
    k, G, tokens = rows[0]["k"], rows[0]["G"], rows[0]["tokens"]
    sizes = [b for b in BATCH_SIZES if any(r["b"] == b for r in rows)]
    x = list(range(len(sizes)))

    def mean_load(b: int) -> float:
        return (b or tokens) * k / G

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for solver in SOLVERS:
        cost = {r["b"]: r["cost"] for r in rows if r["solver"] == solver}
        if cost:
            ax.plot(x, [cost[b] / mean_load(b) for b in sizes], marker=MARKERS[solver], fillstyle="none",
                    label=solver)
    bound = [max(r["lower_bound"] for r in rows if r["b"] == b) / mean_load(b) for b in sizes]
    ax.plot(x, bound, "k--", label="lower bound")
    ax.set_xticks(x, [str(b) if b else f"whole\n({tokens})" for b in sizes])
    ax.set_xlabel("batch size b (tokens)")
    ax.set_ylabel("cost / mean device load")
    ax.set_title(trace, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_target(path) as temp:  # temp file + fsync + os.replace: never a partial figure
        fig.savefig(temp, dpi=150)
    return path


def make_figures(out_dir: Path, quick: bool) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    traces = bench_traces() or solved_traces(quick)
    return [plot(trace, rows, out_dir / f"placement_cost_vs_batch_{trace}.png")
            for trace, rows in sorted(traces.items())]


if __name__ == "__main__":
    print(make_figures(Path(__file__).resolve().parent / "out", quick=True))
