"""Pipeline remat benchmark (issue 16): the memory sweep with remat options and backward-pass
recompute, and the multi-wave gap table.

    python experiments/bench_pipeline_remat.py [--quick] [--time-limit S] [--gap-time-limit S]

Order: the gap table, the P = 8 / 16 rows, the sweep, ZB-H1 with RW vs R only.

Memory sweep: P in {4, 8}, M in {16, 32} (quick: P = 4, M = 8), split backward, one stage per
device, remat allowed with two options per stage ("keep block inputs only": checkpoint 0.1 of the
activation, R = F; "keep attention outputs": checkpoint 0.4, R = 0.6 F) and RW = 0.6 F keeping
0.1 of the activation between B and RW (wgrad_stash 0.5). Stage costs "uniform" (F = B = W = 10,
activation 1) or "transformer" (an embedding on the first stage, the LM head and its logits on
the last: `transformer_stages`). Memory limits: the least feasible (one microbatch, every stage
rematerialized), then 1.5, 2, 3, P/2, P, 1.5P, 2P activations per device and unlimited. Methods:
every named schedule of the placement with its optimal remat for that order (`solve_pipeline(...,
order=name)`, CP-SAT), greedy, and CP-SAT with a free order. Each makespan is divided by the best
proven bound of the instance.

Multi-wave gap table: the interleaved / V rows of experiments/results/bench_pipeline.json with
k <= 2 and M >= 32, as they were before this benchmark first ran ("before", kept in the results),
and again with today's bounds and solvers ("after": greedy, CP-SAT at --gap-time-limit); each
change is attributed to the bound (new bound / old bound) and to the schedule (old best / new best).

Multi-wave rows at P = 8 and 16 (not in bench_pipeline.json): greedy against the combinatorial
bounds.

ZB-H1 under tight memory: at the P = 4, M = 16 sweep limits ZB-H1 exceeds on its own, its order
with optimal remat when RW is allowed and with R only (CP-SAT, twice the sweep's time limit).

Resumable: rows already in experiments/results/bench_pipeline_remat.json are skipped. Writes
bench_pipeline_remat.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

from pipesched.solvers import solve_pipeline
from tqdm.auto import tqdm

from pipesched._common import atomic_write, read_results, write_json
from pipesched.pipeline import PipelineInstance, RematOption, Stage, zoo
from pipesched.pipeline.bounds import bounds, min_memory_need

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import family_instance  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BEFORE = RESULTS / "bench_pipeline.json"
OPTIONS = ((0.1, 1.0), (0.4, 0.6))  # (checkpoint / activation, R / F): block inputs only, attention outputs
RW_SHARE, STASH, WGRAD_CHECKPOINT = 0.6, 0.5, 0.1
NAMED = ("gpipe", "1f1b", "zb-h1", "zb-h2")


# --------------------------------------------------------------------------------------------
# Instances


def remat_stage(device: int, F: float, activation: float) -> Stage:
    """A split-backward stage (B = W = F) with the two remat options and RW of the module doc."""
    return Stage(device=device, F=F, B=F, W=F, activation=activation, wgrad_stash=STASH * activation,
                 remat_options=tuple(RematOption(c * activation, r * F) for c, r in OPTIONS),
                 RW=RW_SHARE * F, wgrad_checkpoint=WGRAD_CHECKPOINT * activation)


def transformer_stages(P: int) -> list[Stage]:
    """Equal blocks on every stage (F = 10, activation 1); the first also embeds (+1 F), the last
    also runs the LM head (+4 F) and keeps its logits (+0.5 activation)."""
    return [remat_stage(d, 10 + (1 if d == 0 else 0) + (4 if d == P - 1 else 0), 1 + (0.5 if d == P - 1 else 0))
            for d in range(P)]


def sweep_instance(P: int, M: int, costs: str, limit: float | None) -> PipelineInstance:
    stages = transformer_stages(P) if costs == "transformer" else [remat_stage(d, 10, 1) for d in range(P)]
    name = f"remat-P{P}-M{M}-{costs}-" + ("unlimited" if limit is None else f"L{limit:g}")
    return PipelineInstance(P, M, tuple(stages), split_backward=True, allow_remat=True,
                            memory_limit=limit, name=name)


def sweep_limits(P: int, M: int, costs: str) -> list[float | None]:
    """The least feasible limit, then multiples of one stage's activation, then unlimited."""
    probe = sweep_instance(P, M, costs, None)
    least = max(min_memory_need(probe, d) for d in range(P))
    activation = max(st.activation for st in probe.stages)
    steps = sorted({1.5, 2, 3, P / 2, P, 1.5 * P, 2 * P})
    return [least, *(k * activation for k in steps if k * activation > least), None]


def sweep_methods(instance: PipelineInstance) -> list[str]:
    """The one-stage-per-device named orders (+remat; interleaved 1F1B and looped BFS with one
    chunk repeat 1F1B and GPipe), greedy and CP-SAT."""
    return [f"{n}+remat" for n in NAMED if zoo.supports(n, instance)] + ["greedy", "cpsat"]


def run_sweep_method(instance: PipelineInstance, method: str, time_limit: float) -> dict:
    """One sweep row: makespan, the instance's bound (and the order's), what remat it used."""
    if method.endswith("+remat"):
        result = solve_pipeline(instance, "cpsat", order=method.removesuffix("+remat"), time_limit=time_limit)
    else:
        result = solve_pipeline(instance, method, time_limit=time_limit)
    schedule, feasible = result.schedule, result.status in ("optimal", "feasible")
    options = [0] * max(len(st.options) for st in instance.stages)
    for op in schedule.ops:
        if op.op == "R":
            options[op.option] += 1
    b = bounds(instance)
    return {"instance": instance.name, "method": method, "P": instance.num_devices,
            "M": instance.num_microbatches, "memory_limit": instance.limit(0),
            "makespan": result.objective if feasible else None, "lower_bound": result.lower_bound,
            "order_lower_bound": schedule.order_lower_bound, "status": result.status,
            "solve_time_s": result.solve_time, "R_per_option": options,
            "RW": sum(op.op == "RW" for op in schedule.ops), "binding_bound": b.binding,
            "combinatorial_bound": b.best}


def run_rw_row(instance: PipelineInstance, time_limit: float) -> dict:
    """ZB-H1's order with its optimal remat, with RW allowed and with R only (RW keys dropped)."""
    r_only = instance.replace(stages=tuple(dataclasses.replace(st, RW=None) for st in instance.stages))
    row = {"instance": instance.name, "memory_limit": instance.limit(0)}
    for label, inst in (("rw", instance), ("r_only", r_only)):
        result = solve_pipeline(inst, "cpsat", order="zb-h1", time_limit=time_limit)
        feasible = result.status in ("optimal", "feasible")
        row[label] = {"makespan": result.objective if feasible else None, "status": result.status,
                      "order_lower_bound": result.schedule.order_lower_bound,
                      "RW": sum(op.op == "RW" for op in result.schedule.ops)}
    return row


def rw_instances(quick: bool) -> list[PipelineInstance]:
    """The P = 4 sweep instances (M = 16; quick: 8) whose limit ZB-H1 exceeds without remat."""
    M = 8 if quick else 16
    out = [sweep_instance(4, M, costs, limit) for costs in ("uniform", "transformer")
           for limit in sweep_limits(4, M, costs)[:-1]]
    return [i for i in out if not zoo.zoo_schedule(i, "zb-h1").fits_memory]


# --------------------------------------------------------------------------------------------
# Multi-wave gap table


def multi_wave_before(path: Path = BEFORE) -> list[dict]:
    """Per multi-wave row (interleaved / V, k <= 2, M >= 32) of bench_pipeline.json: its best
    makespan and best proven bound over every method, as stored there."""
    rows = read_results(path, {"rows": []}).get("rows", [])
    out: dict[str, dict] = {}
    for r in rows:
        parts = r["instance"].split("-")
        if not r["instance"].startswith("gen-") or parts[4] not in ("interleaved", "v"):
            continue
        if int(parts[-1].removeprefix("k")) > 2 or r["M"] < 32:
            continue
        entry = out.setdefault(r["instance"], {"instance": r["instance"], "best": None, "bound": 0.0})
        if r["makespan"] is not None and r["status"] in ("optimal", "feasible"):
            entry["best"] = r["makespan"] if entry["best"] is None else min(entry["best"], r["makespan"])
        if r["lower_bound"] is not None:
            entry["bound"] = max(entry["bound"], r["lower_bound"])
    return [e for e in out.values() if e["best"] is not None and e["bound"] > 0]


def instance_of(name: str) -> PipelineInstance:
    """Rebuild a bench_pipeline family instance from its name gen-P{P}-M{M}-{costs}-{layout}-{split}-k{k}."""
    _, P, M, costs, layout, split, k = name.split("-")
    return family_instance(int(P[1:]), int(M[1:]), int(k[1:]), costs, layout, split == "split")


def run_gap_row(before: dict, time_limit: float) -> dict:
    instance = instance_of(before["instance"])
    b = bounds(instance)
    greedy = solve_pipeline(instance, "greedy", time_limit=time_limit)
    cpsat = solve_pipeline(instance, "cpsat", time_limit=time_limit)
    best = min(greedy.objective, cpsat.objective)
    bound = max(before["bound"], b.best, cpsat.lower_bound)
    return {**before, "after_best": best, "after_bound": bound, "greedy": greedy.objective,
            "cpsat": cpsat.objective, "cpsat_bound": cpsat.lower_bound, "combinatorial_bound": b.best,
            "binding_bound": b.binding if b.best >= cpsat.lower_bound else "cpsat",
            "bound_gain": bound / before["bound"], "schedule_gain": before["best"] / best,
            "time_limit_s": time_limit}


def wider_instances() -> list[PipelineInstance]:
    """The multi-wave family rows bench_pipeline.json lacks: P = 8 and 16, M in {32, 64}, k <= 2."""
    return [family_instance(P, M, k, costs, layout, split) for P in (8, 16) for M in (32, 64) for k in (1, 2)
            for costs in ("uniform", "heterogeneous") for layout, split in (("interleaved", False), ("v", True))]


def run_wider_row(instance: PipelineInstance, time_limit: float) -> dict:
    """Greedy (paced schedules included) against the combinatorial bounds, no CP-SAT."""
    b = bounds(instance)
    greedy = solve_pipeline(instance, "greedy", time_limit=time_limit)
    return {"instance": instance.name, "greedy": greedy.objective, "bound": b.best, "binding_bound": b.binding,
            "greedy_s": greedy.solve_time}


# --------------------------------------------------------------------------------------------
# Report


def geomean(values: list[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def best_bound(rows: list[dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in rows:
        out[r["instance"]] = max(out.get(r["instance"], 0.0), r["lower_bound"] or 0.0, r["combinatorial_bound"])
    return out


def winners(rows: list[dict]) -> dict[str, str]:
    """Per sweep instance, the named schedule (with its optimal remat) of least makespan."""
    out: dict[str, tuple[float, str]] = {}
    for r in rows:
        if r["method"].endswith("+remat") and r["makespan"] is not None:
            if r["instance"] not in out or r["makespan"] < out[r["instance"]][0]:
                out[r["instance"]] = (r["makespan"], r["method"])
    return {k: v[1] for k, v in out.items()}


def sweep_lines(rows: list[dict]) -> list[str]:
    bound, win = best_bound(rows), winners(rows)
    present = {r["method"] for r in rows}
    methods = [m for m in (*(f"{n}+remat" for n in NAMED), "greedy", "cpsat") if m in present]
    header = ["instance", "limit", "best bound", "binding", *methods, "best named", "R per option / RW (cpsat)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    by_key = {(r["instance"], r["method"]): r for r in rows}
    for name in dict.fromkeys(r["instance"] for r in rows):
        first = next(r for r in rows if r["instance"] == name)
        cpsat = by_key.get((name, "cpsat"))
        binding = first["binding_bound"] if not cpsat or cpsat["lower_bound"] <= first["combinatorial_bound"] else "cpsat"

        def cell(method: str) -> str:
            r = by_key.get((name, method))
            if r is None or r["makespan"] is None:
                return "" if r is None else r["status"]
            return f"{r['makespan'] / bound[name]:.3f}" + ("*" if r["status"] == "optimal" else "")

        lines.append("| " + " | ".join([
            name, "none" if first["memory_limit"] is None else f"{first['memory_limit']:g}", f"{bound[name]:g}",
            binding, *map(cell, methods), win.get(name, ""),
            f"{cpsat['R_per_option']} / {cpsat['RW']}" if cpsat else ""]) + " |")
    return lines


def gap_lines(rows: list[dict]) -> list[str]:
    header = ["instance", "best before", "bound before", "ratio before", "best after", "bound after",
              "ratio after", "bound gain", "schedule gain", "binding after"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["instance"], f"{r['best']:g}", f"{r['bound']:g}", f"{r['best'] / r['bound']:.3f}",
            f"{r['after_best']:g}", f"{r['after_bound']:g}", f"{r['after_best'] / r['after_bound']:.3f}",
            f"{r['bound_gain']:.3f}", f"{r['schedule_gain']:.3f}", r["binding_bound"]]) + " |")
    wide = [r for r in rows if r["best"] / r["bound"] >= 1.2]
    for label, chosen in (("all multi-wave rows", rows), ("rows with ratio before >= 1.2", wide)):
        if chosen:
            lines.append(f"\n{label} ({len(chosen)}): geometric mean best / bound "
                         f"{geomean([r['best'] / r['bound'] for r in chosen]):.3f} before, "
                         f"{geomean([r['after_best'] / r['after_bound'] for r in chosen]):.3f} after "
                         f"(bound gain {geomean([r['bound_gain'] for r in chosen]):.3f}, schedule gain "
                         f"{geomean([r['schedule_gain'] for r in chosen]):.3f})")
    return lines


def rw_lines(rows: list[dict]) -> list[str]:
    lines = ["| instance | limit | with RW | RW ops | order bound | R only | order bound |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        def show(x: dict) -> str:
            return "none found" if x["makespan"] is None else f"{x['makespan']:g}"
        lines.append(f"| {r['instance']} | {r['memory_limit']:g} | {show(r['rw'])} | {r['rw']['RW']} | "
                     f"{r['rw']['order_lower_bound']:g} | {show(r['r_only'])} | {r['r_only']['order_lower_bound']:g} |")
    return lines


def wider_lines(rows: list[dict]) -> list[str]:
    lines = ["| instance | greedy | bound | ratio | binding | greedy s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['instance']} | {r['greedy']:g} | {r['bound']:g} | {r['greedy'] / r['bound']:.3f} | "
              f"{r['binding_bound']} | {r['greedy_s']:.1f} |" for r in rows]
    for P in (8, 16):
        chosen = [r["greedy"] / r["bound"] for r in rows if r["instance"].startswith(f"gen-P{P}-")]
        if chosen:
            lines.append(f"\nP = {P} ({len(chosen)} rows): geometric mean greedy / bound {geomean(chosen):.3f}")
    return lines


def write_markdown(results: dict, path: Path) -> None:
    text = ["# Pipeline remat benchmark", "",
            "## Memory sweep", "",
            "Makespan / best proven bound of the instance (* proven optimal); `name+remat`: the named",
            "schedule's order with its optimal remat (CP-SAT, order fixed); binding: the bound that gives",
            "the best bound; best named: the named order of least makespan at that limit.", "",
            *sweep_lines(results["sweep"]), "",
            "## ZB-H1 under tight memory: optimal remat with RW vs R only", "",
            "`--fix-order zb-h1` at the limits ZB-H1 exceeds on its own ('none found': no schedule keeping",
            "the order within the time limit).", "", *rw_lines(results["rw"]), "",
            "## Multi-wave gap table", "", *gap_lines(results["gap"]), "",
            "## Multi-wave rows at P = 8 and 16 (greedy alone, combinatorial bounds)", "",
            "The same family at the P that bench_pipeline.json does not hold; no CP-SAT (it could only",
            "improve both columns).", "", *wider_lines(results["wider"])]
    atomic_write(path, "\n".join(text) + "\n")


# --------------------------------------------------------------------------------------------
# Driver


def sweep_cases(quick: bool) -> list[tuple[int, int, str]]:
    return [(P, M, costs) for P in ((4,) if quick else (4, 8)) for M in ((8,) if quick else (16, 32))
            for costs in ("uniform", "transformer")]


def run_sweep(results: dict, quick: bool, time_limit: float, save) -> None:
    done = {(r["instance"], r["method"]) for r in results["sweep"]}
    todo = [(i, m) for P, M, costs in sweep_cases(quick) for limit in sweep_limits(P, M, costs)
            for i in [sweep_instance(P, M, costs, limit)] for m in sweep_methods(i) if (i.name, m) not in done]
    for instance, method in tqdm(todo, desc="memory sweep", unit="run"):
        results["sweep"].append(run_sweep_method(instance, method, time_limit))
        save(results)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="P=4, M=8 sweep at 2 s, no gap table")
    parser.add_argument("--time-limit", type=float, default=None, help="CP-SAT seconds per sweep run (default 5)")
    parser.add_argument("--gap-time-limit", type=float, default=30.0, help="CP-SAT seconds per gap-table row")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_pipeline_remat.json")
    args = parser.parse_args(argv)
    time_limit = args.time_limit or (2.0 if args.quick else 5.0)
    results = read_results(args.out, {"sweep": [], "gap": [], "before": [], "rw": [], "wider": []},
                           valid=lambda r: {"sweep", "gap", "before", "rw", "wider"} <= set(r))

    def save(results: dict) -> None:
        write_json(results, args.out)
        write_markdown(results, args.out.with_suffix(".md"))

    if not args.quick:
        if not results["before"]:  # the state of bench_pipeline.json before this benchmark first ran
            results["before"] = multi_wave_before()
        done = {r["instance"] for r in results["gap"]}
        for before in tqdm([b for b in results["before"] if b["instance"] not in done], desc="gap table", unit="row"):
            results["gap"].append(run_gap_row(before, args.gap_time_limit))
            save(results)
        done = {r["instance"] for r in results["wider"]}
        for instance in tqdm([i for i in wider_instances() if i.name not in done], desc="P = 8, 16", unit="row"):
            results["wider"].append(run_wider_row(instance, args.gap_time_limit))
            save(results)
    run_sweep(results, args.quick, time_limit, save)
    done = {r["instance"] for r in results["rw"]}
    for instance in tqdm([i for i in rw_instances(args.quick) if i.name not in done], desc="zb-h1 RW vs R", unit="limit"):
        results["rw"].append(run_rw_row(instance, 2 * time_limit))
        save(results)
    save(results)
    print("\n".join(gap_lines(results["gap"])[-2:]))
    return results


if __name__ == "__main__":
    main()
