"""Pipeline remat: the memory sweep and its crossover (issue 16).

Remat options ("keep block inputs only", "keep attention outputs") and backward-pass recompute
(RW) allowed, split backward, one stage per device. For each memory limit, from the least feasible
(one microbatch, everything rematerialized) to unlimited, every named order is given its optimal
remat (CP-SAT with the order fixed) and greedy and CP-SAT schedule freely; each makespan is
divided by the best proven lower bound at that limit. The background shades the limits by the
named order that wins there: where the shade changes, the best schedule changes with memory.
Rows come from experiments/bench_pipeline_remat.py's results, or are computed with its
`run_sweep_method` when they are absent.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from bench_pipeline_remat import NAMED, RESULTS as RESULTS_DIR, run_sweep_method, sweep_instance, sweep_limits, sweep_methods

from pipesched._common import atomic_target, read_results

RESULTS = RESULTS_DIR / "bench_pipeline_remat.json"

COLORS = {name: f"C{i}" for i, name in enumerate(NAMED)} | {"greedy": "tab:blue", "cpsat": "black"}


def sweep(P: int, M: int, costs: str, time_limit: float) -> list[dict]:
    rows = []
    for limit in tqdm(sweep_limits(P, M, costs), desc=f"remat {costs} P={P} M={M}", unit="limit", leave=False):
        instance = sweep_instance(P, M, costs, limit)
        rows += [run_sweep_method(instance, m, time_limit) for m in sweep_methods(instance)]
    return rows


def _panel(ax, rows: list[dict], title: str) -> None:
    limits = sorted({r["memory_limit"] for r in rows}, key=lambda v: math.inf if v is None else v)
    x_of = {limit: i for i, limit in enumerate(limits)}
    bound = {}
    for r in rows:
        bound[r["instance"]] = max(bound.get(r["instance"], 0.0), r["lower_bound"] or 0.0, r["combinatorial_bound"])
    best: dict[float | None, tuple[float, str]] = {}
    for r in rows:
        name = r["method"].removesuffix("+remat")
        if r["method"].endswith("+remat") and r["makespan"] is not None:
            if r["memory_limit"] not in best or r["makespan"] < best[r["memory_limit"]][0]:
                best[r["memory_limit"]] = (r["makespan"], name)
    for limit, (_, name) in best.items():
        ax.axvspan(x_of[limit] - 0.5, x_of[limit] + 0.5, color=COLORS[name], alpha=0.12, linewidth=0)
    present = {r["method"] for r in rows}
    for method in (m for m in (*(f"{n}+remat" for n in NAMED), "greedy", "cpsat") if m in present):
        name = method.removesuffix("+remat")
        points = sorted((x_of[r["memory_limit"]], r["makespan"] / bound[r["instance"]]) for r in rows
                        if r["method"] == method and r["makespan"] is not None)
        if points:
            solver = name in ("greedy", "cpsat")
            ax.plot(*zip(*points), color=COLORS[name], marker="o" if solver else "s", label=method,
                    linewidth=2.2 if solver else 1.1, linestyle="-" if solver else "--", markerfacecolor="white")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(limits)), ["none" if v is None else f"{v:g}" for v in limits])
    ax.set_xlabel("memory limit per device (activations of one stage)")
    ax.set_title(title)
    ax.grid(alpha=0.3)


def plot(panels: list[tuple[str, list[dict]]], path: Path) -> Path:
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.8), sharey=True)
    for ax, (title, rows) in zip(axes, panels):
        _panel(ax, rows, title)
    axes[0].set_ylabel("makespan / best proven lower bound")
    legend = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=min(len(legend), 6), frameon=False)
    fig.suptitle("Remat options + RW: shade = the named order (with optimal remat) that wins at that limit",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    with atomic_target(path) as temp:
        fig.savefig(temp, dpi=150)
    plt.close(fig)
    return path


def stored(P: int, M: int, costs: str) -> list[dict]:
    """The benchmark's sweep rows of (P, M, costs), if it has them all (else [])."""
    results = read_results(RESULTS, {"sweep": []})
    names = {sweep_instance(P, M, costs, limit).name for limit in sweep_limits(P, M, costs)}
    rows = [r for r in results.get("sweep", []) if r["instance"] in names]
    return rows if {r["instance"] for r in rows} == names else []


def make_figures(out_dir: Path, quick: bool) -> list[Path]:
    """From experiments/results/bench_pipeline_remat.json when it has the sweep (P = 4, M = 16
    quick; P = 8, M = 16 full), else computed here (quick: P = 4, M = 8 at 1 s per CP-SAT run)."""
    P, M = (4, 16) if quick else (8, 16)
    panels = []
    for costs in ("uniform", "transformer"):
        rows = stored(P, M, costs)
        p, m = (P, M) if rows else ((4, 8) if quick else (P, M))
        panels.append((f"{costs} stages, P={p}, M={m}", rows or sweep(p, m, costs, 1.0 if quick else 10.0)))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return [plot(panels, Path(out_dir) / "pipeline_remat_crossover.png")]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    args = parser.parse_args()
    print(*make_figures(args.out, args.quick), sep="\n")
