"""Pipeline schedules: makespan / lower bound versus memory limit, for every method.

One uniform (F=B=W) and one heterogeneous instance, split backward, one stage per device; the
memory limit runs from 1 to 2P activations per device. Every zoo schedule that fits the limit,
greedy and CP-SAT (a few seconds per point in quick mode) are timed, and each makespan is divided
by the best proven lower bound at that limit (CP-SAT's or the combinatorial one), so 1 is optimal.
Rows are computed with experiments/bench_pipeline.py's `run_method`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from bench_pipeline import family_instance, methods, run_method

from pipesched._common import atomic_target
from pipesched.pipeline.zoo import ZOO

MARKERS = "osD^v<>pXh*P"
COLORS = {"greedy": "tab:blue", "cpsat": "black"}


Series = dict[str, list[tuple[int, float, bool]]]


def sweep(P: int, M: int, costs: str, time_limit: float) -> Series:
    """Per method, (k activations, makespan / best proven bound, proven optimal) for k = 1..2P,
    at the limits where the method has a schedule that fits."""
    series: Series = {}
    for k in tqdm(range(1, 2 * P + 1), desc=f"{costs} P={P} M={M}", unit="limit", leave=False):
        instance = family_instance(P, M, k, costs, "linear", split=True)
        rows = [run_method(instance, m, time_limit) for m in methods(instance, time_limit)]
        bound = max(r["lower_bound"] for r in rows if r["lower_bound"] is not None)
        for r in rows:
            name = "cpsat" if r["method"].startswith("cpsat") else r["method"]
            if r["makespan"] is not None:
                series.setdefault(name, []).append((k, r["makespan"] / bound, r["status"] == "optimal"))
    return series


def plot(panels: list[tuple[str, Series]], P: int, path: Path) -> Path:
    """Side-by-side panels; methods are nudged sideways so equal values stay visible; hollow
    markers: not proven optimal."""
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.8), sharey=True)
    found = {n for _, series in panels for n in series}
    names = [n for n in (*ZOO, "greedy", "cpsat") if n in found]
    for ax, (title, series) in zip(axes, panels):
        for i, name in enumerate(names):
            points = series.get(name, [])
            if not points:
                continue
            solver = name in ("greedy", "cpsat")
            nudge = 0.05 * (i - (len(names) - 1) / 2)
            xs = [k + nudge for k, _, _ in points]
            ys = [y for _, y, _ in points]
            color, marker = COLORS.get(name, f"C{i + 2}"), MARKERS[i % len(MARKERS)]
            size = 8 if solver else 6
            ax.plot(xs, ys, color=color, label=name, linewidth=2.2 if solver else 1.1,
                    linestyle="-" if solver else "--", marker=marker, markersize=size, markerfacecolor="white")
            proven = [(x, y) for x, (_, y, optimal) in zip(xs, points) if optimal]
            if proven:
                ax.plot(*zip(*proven), linestyle="none", marker=marker, markersize=size, color=color)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axvline(P, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(title)
        ax.set_xlabel(f"memory limit per device (activations; dotted: 1F1B peak = {P})")
        ax.set_xticks(range(1, 2 * P + 1, max(1, P // 4)))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("makespan / best proven lower bound")
    legend = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend([legend[n] for n in names], names, loc="lower center", ncol=min(len(names), 8), frameon=False)
    fig.suptitle("Pipeline schedules under a memory limit (split backward). Missing point: does not fit; "
                 "hollow: not proven optimal", fontsize=11)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    with atomic_target(path) as temp:  # temp file + fsync + os.replace: never a partial figure
        fig.savefig(temp, dpi=150)
    plt.close(fig)
    return path


def make_figures(out_dir: Path, quick: bool) -> list[Path]:
    P, M, time_limit = (4, 8, 3.0) if quick else (8, 16, 20.0)
    panels = [(f"uniform F=B=W, P={P}, M={M}", sweep(P, M, "uniform", time_limit)),
              (f"heterogeneous stages, P={P}, M={M}", sweep(P, M, "heterogeneous", time_limit))]
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return [plot(panels, P, Path(out_dir) / "pipeline_memory_sweep.png")]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    args = parser.parse_args()
    print(*make_figures(args.out, args.quick), sep="\n")
