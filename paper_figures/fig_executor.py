"""Executor: predicted versus measured step time and memory for several schedules and memory limits,
and the pipelined gpt-tiny loss curve against the unpipelined one.

Reads experiments/results/bench_executor.json when present (written by
`python experiments/bench_executor.py`); otherwise runs that benchmark with --quick into a
temporary file, in a subprocess because it sets its own 2-device, single-threaded CPU flags.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from pipesched._common import atomic_target

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results" / "bench_executor.json"
BENCH = REPO / "experiments" / "bench_executor.py"
MIB = 2**20


def load_results(quick: bool) -> dict:
    """The benchmark's results: the stored file, or a fresh run (quick or full) into a temporary file."""
    if RESULTS.exists():
        return json.loads(RESULTS.read_text())
    with tempfile.TemporaryDirectory(prefix="fig-executor-") as tmp:
        out = Path(tmp) / "bench_executor.json"
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        subprocess.run([sys.executable, str(BENCH), "--out", str(out), *(["--quick"] if quick else [])],
                       check=True, env=env, timeout=600 if quick else None)
        return json.loads(out.read_text())


PREDICTIONS = (("predicted_makespan_s", "schedule's makespan (profiled ops)", "x"),
               ("predicted_executed_s", "executed lock-step form (profiled ops)", "o"),
               ("predicted_ticks_s", "executed form (tick costs measured in the program)", "^"))


def time_figure(rows: list[dict], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    top = 1.1e3 * max(r[key] for r in rows for key in (*(k for k, _, _ in PREDICTIONS), "measured_median_s")
                      if key in r)
    ax.plot([0, top], [0, top], color="gray", lw=1, label="measured = predicted")
    ax.fill_between([0, top], [0, top / 1.25], [0, top / 0.75], color="gray", alpha=0.15,
                    label="prediction within 25%")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(rows):
        color = colors[i % len(colors)]
        y = r["measured_median_s"] * 1e3
        xs = [r[key] * 1e3 for key, _, _ in PREDICTIONS if key in r]
        ax.plot(xs, [y] * len(xs), color=color, lw=0.6)
        for key, _, marker in PREDICTIONS:
            if key in r:
                ax.scatter(r[key] * 1e3, y, marker=marker, color=color, zorder=3)
        ax.annotate(r["name"], (xs[-1], y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for _, label, marker in PREDICTIONS:
        ax.scatter([], [], marker=marker, color="black", label=label)
    ax.set(xlim=(0, top), ylim=(0, top), xlabel="predicted step time (ms)", ylabel="measured median step time (ms)",
           title="Pipelined forward/backward, 2-device CPU mesh")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_target(path) as temp:  # temp file + fsync + os.replace: never a partial figure
        fig.savefig(temp, dpi=150)
    plt.close(fig)
    return path


def memory_figure(rows: list[dict], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = [r["name"] for r in rows]
    x = range(len(rows))
    width = 0.27
    ax.bar([i - width for i in x], [r["compiled_memory_bytes"] / MIB for r in rows], width, label="compiled (measured)")
    ax.bar(x, [r["pool_bytes"] / MIB for r in rows], width, label="slot pools of the plan")
    ax.bar([i + width for i in x], [max(r["predicted_peak_memory_bytes"]) / MIB for r in rows], width,
           label="schedule's peak (memory model)")
    ax.set_xticks(list(x), names, rotation=35, ha="right", fontsize=7)
    ax.set(ylabel="MiB per device", title="Memory per device: compiled program vs the schedule's prediction")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_target(path) as temp:  # temp file + fsync + os.replace: never a partial figure
        fig.savefig(temp, dpi=150)
    plt.close(fig)
    return path


def loss_figure(row: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = range(1, row["steps"] + 1)
    ax.plot(steps, row["unpipelined"], label="unpipelined (1 device)", lw=3, alpha=0.5)
    ax.plot(steps, row["pipelined"], "--", label=f"pipelined: {row['name']}")
    diff = ax.twinx()
    diff.semilogy(steps, [max(abs(a - b), 1e-12) for a, b in zip(row["pipelined"], row["unpipelined"])],
                  color="tab:red", lw=0.8)
    diff.set_ylabel("|difference|", color="tab:red")
    ax.set(xlabel="Adam step", ylabel="loss",
           title=f"gpt-tiny loss curves (max |diff| {row['max_abs_difference']:.1e})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_target(path) as temp:  # temp file + fsync + os.replace: never a partial figure
        fig.savefig(temp, dpi=150)
    plt.close(fig)
    return path


def make_figures(out_dir: Path, quick: bool) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = load_results(quick)
    paths = [time_figure(results["timing"], out_dir / "executor_step_time.png"),
             memory_figure(results["timing"], out_dir / "executor_memory.png")]
    paths += [loss_figure(row, out_dir / "executor_loss_curve.png") for row in results["loss"][:1]]
    return paths


if __name__ == "__main__":
    print(make_figures(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "paper_figures" / "out", quick=True))
