"""Looking at a pipeline schedule: text grid, Gantt chart with memory, Perfetto trace, PyTorch CSV."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pipesched._common import FormatError, atomic_target, write_json
from pipesched.pipeline._model import PipelineSchedule
from pipesched.pipeline._validate import memory_timeline

OP_COLORS = {"F": "#4C78A8", "B": "#F58518", "W": "#54A24B", "R": "#B279A2", "RW": "#E45756"}
OP_NAMES = {"F": "forward", "B": "backward", "W": "weight grad", "R": "recompute",
            "RW": "backward-pass recompute"}
OP_HATCH = {"RW": "//"}  # RW drawn distinctly from R even where colours are hard to tell apart


def format_grid(schedule: PipelineSchedule, max_columns: int = 120) -> str:
    """Devices x time as text, one cell per time quantum, each cell the running action.

    The quantum is the largest one that keeps every op boundary exact when durations are integers
    (their gcd), widened if needed so that the grid fits in `max_columns` cells.
    """
    if not schedule.ops:
        return f"(no ops: status {schedule.status})"
    quantum = _quantum(schedule, max_columns)
    columns = math.ceil(schedule.makespan / quantum - 1e-9)
    width = max(len(op.name) for op in schedule.ops)
    lines = ["      " + "".join(f"{int(c * quantum):<{width + 1}}" if c % 5 == 0 else " " * (width + 1)
                                for c in range(columns))]
    for d in range(schedule.instance.num_devices):
        cells = ["." * width] * columns
        for op in schedule.ops_of_device(d):
            first, last = round(op.start / quantum), math.ceil(op.end / quantum - 1e-9)
            for c in range(first, max(last, first + 1 if op.end > op.start else first)):
                if c < columns:
                    cells[c] = f"{op.name:<{width}}"
        lines.append(f"dev {d:<2}" + " ".join(cells))
    lines.append(f"makespan {schedule.makespan:g}  lower bound {schedule.lower_bound}  "
                 f"status {schedule.status}  solver {schedule.solver}  (1 cell = {quantum:g})")
    return "\n".join(lines)


def _quantum(schedule: PipelineSchedule, max_columns: int) -> float:
    values = [v for op in schedule.ops for v in (op.start, op.end)]
    if all(float(v).is_integer() for v in values):
        g = 0
        for v in values:
            g = math.gcd(g, int(v))
        quantum = float(g or 1)
    else:
        quantum = schedule.makespan / max_columns
    return max(quantum, schedule.makespan / max_columns)


def gantt(schedule: PipelineSchedule, path: str | Path, *, title: str | None = None) -> Path:
    """A Gantt chart (one row per device, ops coloured by kind, microbatch numbers on the bars)
    above the memory curve of every device, with the memory limits dashed. PNG or PDF by suffix."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend (inline in Jupyter) is left alone
    from matplotlib.patches import Patch

    instance = schedule.instance
    P = instance.num_devices
    fig = Figure(figsize=(12, 1.2 + 0.5 * P + 2.5))
    ax, mem_ax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [max(P, 2), 3]})
    for op in schedule.ops:
        d = schedule.device_of(op)
        ax.barh(d, op.end - op.start, left=op.start, height=0.8, color=OP_COLORS[op.op],
                edgecolor="black", linewidth=0.4, hatch=OP_HATCH.get(op.op))
        if op.end - op.start >= 0.012 * max(schedule.makespan, 1e-12):
            ax.text((op.start + op.end) / 2, d, str(op.microbatch), ha="center", va="center", fontsize=7,
                    color="white")
    ax.set_yticks(range(P), [f"device {d}" for d in range(P)])
    ax.invert_yaxis()
    used = sorted({op.op for op in schedule.ops}, key=list(OP_COLORS).index)
    ax.legend(handles=[Patch(facecolor=OP_COLORS[k], hatch=OP_HATCH.get(k), label=OP_NAMES[k]) for k in used],
              loc="lower right",
              bbox_to_anchor=(1.0, 1.0), fontsize=8, ncols=len(used) or 1, frameon=False)
    ax.set_title(title or f"{instance.name or 'pipeline'}: {schedule.solver}, makespan {schedule.makespan:g}, "
                 f"lower bound {schedule.lower_bound}, {schedule.status}", loc="left", fontsize=10)

    timeline = memory_timeline(instance, schedule.ops)
    end = max(schedule.makespan, 1e-9)
    for d in range(P):
        times, levels = [0.0, *timeline.times[d], end], [0.0, *timeline.levels[d], timeline.levels[d][-1]
                                                      if timeline.levels[d] else 0.0]
        line, = mem_ax.step(times, levels, where="post", label=f"device {d}")
        if instance.limit(d) is not None:
            mem_ax.axhline(instance.limit(d), color=line.get_color(), linestyle="--", linewidth=0.8)
    mem_ax.set_ylabel("activation memory")
    mem_ax.set_xlabel("time")
    mem_ax.legend(fontsize=7, ncols=min(P, 8), loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    path = Path(path)
    with atomic_target(path) as temp:  # the suffix is kept, so savefig still picks PNG or PDF by it
        fig.savefig(temp, dpi=120)
    return path


def chrome_trace(schedule: PipelineSchedule, *, time_unit_us: float = 1.0) -> dict[str, Any]:
    """Trace Event Format (Chrome / Perfetto): one track per device, memory as counter tracks.

    One schedule time unit is `time_unit_us` microseconds on the trace's clock.
    """
    events: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": 0, "tid": 0,
         "args": {"name": f"pipesched {schedule.solver}"}},
    ]
    for d in range(schedule.instance.num_devices):
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": d, "args": {"name": f"device {d}"}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": d, "args": {"sort_index": d}})
    for op in schedule.ops:
        events.append({
            "name": op.name, "cat": OP_NAMES[op.op], "ph": "X", "pid": 0, "tid": schedule.device_of(op),
            "ts": op.start * time_unit_us, "dur": (op.end - op.start) * time_unit_us,
            "args": {"op": op.op, "stage": op.stage, "microbatch": op.microbatch,
                     **({"option": op.option} if op.op == "R" else {})},
        })
    timeline = memory_timeline(schedule.instance, schedule.ops)
    for d, (times, levels) in enumerate(zip(timeline.times, timeline.levels)):
        for t, level in zip(times, levels):
            events.append({"name": f"memory device {d}", "ph": "C", "pid": 0, "ts": t * time_unit_us,
                           "args": {"activation": level}})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"makespan": schedule.makespan, "lower_bound": schedule.lower_bound,
                          "status": schedule.status, "solver": schedule.solver}}


def save_chrome_trace(schedule: PipelineSchedule, path: str | Path) -> Path:
    """Write `chrome_trace` to `path` as JSON, atomically (`write_json`)."""
    write_json(chrome_trace(schedule), path)
    return Path(path)


def torch_csv(schedule: PipelineSchedule) -> str:
    """formats.md 1.3: PyTorch pipelining's compute-only CSV, one row per rank."""
    if schedule.rematerialized or schedule.backward_recomputed:
        kinds = "R and RW" if schedule.rematerialized and schedule.backward_recomputed else \
            "R" if schedule.rematerialized else "RW"
        raise FormatError(f"export torch: this schedule recomputes ({kinds} ops), which PyTorch's pipelining "
                          "runtime cannot express; solve without allow_remat to export it")
    split = schedule.instance.split_backward
    rows = []
    for d in range(schedule.instance.num_devices):
        ops = sorted(schedule.ops_of_device(d), key=lambda o: (o.start, o.end, o.stage, o.microbatch))
        rows.append(",".join(f"{op.stage}{'I' if split and op.op == 'B' else op.op}{op.microbatch}" for op in ops))
    return "".join(row + "\n" for row in rows)
