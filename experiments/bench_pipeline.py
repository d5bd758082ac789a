"""Benchmark every pipeline method: makespan / lower bound, status and solve time.

    python experiments/bench_pipeline.py [--quick] [--time-limit S]

Order: the public instances, the greedy P=64, M=512 timing, then the generated family.
Instances: every public pipeline instance (shared/instances/pipeline, found via PIPESCHED_SHARED or
../shared beside the repository) and a generated family: P in {4, 8, 16}, M in {8, 32, 64}, memory
limits of k activations per device for k in {1, P/2, P, 2P}, uniform and heterogeneous stage costs,
on a linear placement (split and unsplit backward), an interleaved one (2 chunks, unsplit) and a
V one (split). Methods: every zoo schedule that supports the instance ("does not fit" when it
exceeds the memory limit), greedy, and CP-SAT (30 s, 2 workers). --quick: the public set and the
P=4, M=8 family members with k in {1, P, 2P}, CP-SAT at 5 s. Also the greedy solve time at
P=64, M=512 (median of 3 runs).

Resumable: rows already in experiments/results/bench_pipeline.json (same instance and method;
CP-SAT's method name carries its time limit) are skipped. Writes bench_pipeline.json and .md.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

from pipesched.solvers import MemoryLimitError, solve_pipeline
from tqdm.auto import tqdm

from pipesched._common import atomic_write, read_results, write_json
from pipesched.pipeline import PipelineInstance, zoo

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"
SHARED = Path(os.environ.get("PIPESCHED_SHARED", REPO.parent / "shared"))
LAYOUTS = (("linear", False), ("linear", True), ("interleaved", False), ("v", True))
TOLERANCE = 1e-6


# --------------------------------------------------------------------------------------------
# Instances


def with_activation_limit(instance: PipelineInstance, k: float) -> PipelineInstance:
    """Memory limit of k activations per device: k times the activations of its stages."""
    per_device = tuple(k * sum(instance.stages[s].activation for s in stages)
                       for stages in instance.stages_of_device)
    return instance.replace(memory_limit=per_device)


def placement_of(layout: str, num_devices: int) -> tuple[int, ...]:
    return {"linear": zoo.linear_placement, "v": zoo.v_placement,
            "interleaved": lambda p: zoo.interleaved_placement(p, 2)}[layout](num_devices)


def family_instance(P: int, M: int, k: int, costs: str, layout: str, split: bool) -> PipelineInstance:
    """One generated instance; uniform costs are F=B=W=10 split, F=10, B=20 fused."""
    name = f"gen-P{P}-M{M}-{costs}-{layout}-{'split' if split else 'fused'}-k{k}"
    placement = placement_of(layout, P)
    if costs == "uniform":
        instance = zoo.uniform_instance(P, M, 10, 10 if split else 20, 10 if split else 0,
                                        split_backward=split, placement=placement, name=name)
    else:
        instance = zoo.heterogeneous_instance(P, M, seed=1000 * P + M, split_backward=split,
                                              placement=placement, name=name)
    return with_activation_limit(instance, k)


def family(quick: bool) -> Iterator[PipelineInstance]:
    for P in (4,) if quick else (4, 8, 16):
        for M in (8,) if quick else (8, 32, 64):
            for k in sorted({1, P, 2 * P} if quick else {1, P // 2, P, 2 * P}):
                for costs in ("uniform", "heterogeneous"):
                    for layout, split in LAYOUTS:
                        yield family_instance(P, M, k, costs, layout, split)


def public_instances() -> list[PipelineInstance]:
    files = sorted((SHARED / "instances" / "pipeline").glob("*.json"))
    if not files:
        raise SystemExit(f"no public pipeline instances under {SHARED}: set PIPESCHED_SHARED to shared/")
    return [PipelineInstance.load(f).replace(name=f.stem) for f in files]


# --------------------------------------------------------------------------------------------
# One (instance, method) row


def methods(instance: PipelineInstance, time_limit: float) -> list[str]:
    """The zoo schedules that support the instance, greedy, and CP-SAT at `time_limit`."""
    return [n for n in zoo.ZOO if zoo.supports(n, instance)] + ["greedy", cpsat_method(time_limit)]


def cpsat_method(time_limit: float) -> str:
    return f"cpsat-{time_limit:g}s"


def run_method(instance: PipelineInstance, method: str, time_limit: float, workers: int = 2) -> dict:
    """Solve with `method` (a zoo name, "greedy" or "cpsat-<T>s"); makespan None when no schedule."""
    solver = "cpsat" if method.startswith("cpsat") else method
    t0 = time.perf_counter()
    try:
        result = solve_pipeline(instance, solver, time_limit=time_limit, workers=workers)
    except MemoryLimitError as err:
        return {"method": method, "makespan": None, "lower_bound": None, "status": "does not fit",
                "solve_time_s": time.perf_counter() - t0, "note": str(err)}
    feasible = result.status in ("optimal", "feasible")
    return {"method": method, "makespan": result.objective if feasible else None,
            "lower_bound": result.lower_bound, "status": result.status,
            "solve_time_s": result.solve_time, "note": ""}


def describe(instance: PipelineInstance) -> dict:
    limits = {instance.limit(d) for d in range(instance.num_devices)}
    return {"instance": instance.name, "P": instance.num_devices, "M": instance.num_microbatches,
            "stages": instance.num_stages, "split": instance.split_backward, "remat": instance.allow_remat,
            "memory_limit": None if limits == {None} else max(limits)}


# --------------------------------------------------------------------------------------------
# Summary


def best_bounds(rows: list[dict]) -> dict[str, float]:
    """Per instance, the largest proven lower bound any method reported."""
    out: dict[str, float] = {}
    for r in rows:
        if r["lower_bound"] is not None:
            out[r["instance"]] = max(out.get(r["instance"], 0.0), r["lower_bound"])
    return out


def ratio(row: dict, bound: float | None) -> float | None:
    if row["makespan"] is None or not bound:
        return None
    return row["makespan"] / bound


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def anomalies(rows: list[dict]) -> list[str]:
    """Rows below a proven bound, or CP-SAT worse than a schedule it was warm-started from."""
    bound = best_bounds(rows)
    out = [f"BUG {r['instance']} {r['method']}: makespan {r['makespan']:g} < proven lower bound "
           f"{bound[r['instance']]:g}" for r in rows
           if r["makespan"] is not None and r["makespan"] < bound[r["instance"]] * (1 - TOLERANCE)]
    by_instance: dict[str, list[dict]] = {}
    for r in rows:
        by_instance.setdefault(r["instance"], []).append(r)
    for name, group in by_instance.items():
        others = [r["makespan"] for r in group if not r["method"].startswith("cpsat") and r["makespan"] is not None]
        for r in group:
            if r["method"].startswith("cpsat") and r["makespan"] is not None and others \
                    and r["makespan"] > min(others) * (1 + TOLERANCE):
                out.append(f"BUG {name} {r['method']}: {r['makespan']:g} worse than its warm start {min(others):g}")
    return out


def summary(rows: list[dict], public: list[str], cpsat: str) -> list[str]:
    bound = best_bounds(rows)
    lines = []
    for method in (cpsat, "greedy"):
        chosen = [r for r in rows if r["method"] == method and r["instance"] in public and r["makespan"] is not None]
        own = geomean([r["makespan"] / r["lower_bound"] for r in chosen])
        best = geomean([ratio(r, bound[r["instance"]]) for r in chosen])
        lines.append(f"public set, {method}: geometric mean of makespan / lower bound = {own:.4f} "
                     f"(own bound), {best:.4f} (best proven bound), over {len(chosen)} instances")
    small = [r for r in rows if r["method"] == cpsat and r["instance"] in public and r["P"] * r["M"] <= 32]
    proven = sum(r["status"] == "optimal" for r in small)
    lines.append(f"public set, {cpsat}: {proven} of {len(small)} instances with P*M <= 32 proven optimal")
    return lines


def cell(row: dict | None, bound: float | None) -> str:
    if row is None:
        return ""
    if row["makespan"] is None:
        return row["status"]
    mark = "*" if row["status"] == "optimal" else ""
    return f"{ratio(row, bound):.3f}{mark}"


def write_markdown(results: dict, path: Path, public: list[str], cpsat: str) -> None:
    rows = results["rows"]
    bound = best_bounds(rows)
    method_names = [n for n in (*zoo.ZOO, "greedy", cpsat) if any(r["method"] == n for r in rows)]
    by_key = {(r["instance"], r["method"]): r for r in rows}
    instances = list(dict.fromkeys(r["instance"] for r in rows))
    header = ["instance", "P", "M", "S", "split", "max limit", "best LB", *method_names, "greedy s", f"{cpsat} s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in instances:
        info = next(r for r in rows if r["instance"] == name)
        greedy, solver = by_key.get((name, "greedy")), by_key.get((name, cpsat))
        lines.append("| " + " | ".join([
            name, str(info["P"]), str(info["M"]), str(info["stages"]), "yes" if info["split"] else "no",
            "none" if info["memory_limit"] is None else f"{info['memory_limit']:g}",
            f"{bound[name]:g}" if name in bound else "",
            *(cell(by_key.get((name, m)), bound.get(name)) for m in method_names),
            f"{greedy['solve_time_s']:.2f}" if greedy else "", f"{solver['solve_time_s']:.2f}" if solver else "",
        ]) + " |")
    scaling = [f"- {s['instance']}: greedy median {s['median_s']:.2f} s solve time, {s['median_wall_s']:.2f} s "
               f"with validation, over {len(s['times_s'])} runs (makespan {s['makespan']:g}, lower bound "
               f"{s['lower_bound']:g})" for s in results["scaling"]]
    text = ["Makespan / best proven lower bound of the instance (* = proven optimal); 'does not fit': the",
            "named schedule exceeds the memory limit; max limit = largest per-device memory limit.", "",
            *lines, "", "Greedy at scale:", "", *scaling, "", "Summary:", "",
            *(f"- {s}" for s in summary(rows, public, cpsat)), *(f"- {a}" for a in anomalies(rows))]
    atomic_write(path, "\n".join(text) + "\n")


# --------------------------------------------------------------------------------------------
# Driver


def scaling_name(P: int, M: int, split: bool) -> str:
    return f"uniform-P{P}-M{M}-{'split' if split else 'fused'}-k{P}"


def greedy_scaling(P: int, M: int, split: bool, runs: int) -> dict:
    """Greedy on a uniform P x M instance under the 1F1B memory limit (P activations)."""
    instance = with_activation_limit(zoo.uniform_instance(P, M, 10, 10 if split else 20, 10 if split else 0,
                                                          split_backward=split), P)
    results, walls = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        results.append(solve_pipeline(instance, "greedy"))
        walls.append(time.perf_counter() - t0)
    times = [r.solve_time for r in results]
    return {"instance": scaling_name(P, M, split), "times_s": times, "median_s": statistics.median(times),
            "median_wall_s": statistics.median(walls), "makespan": results[0].objective,
            "lower_bound": results[0].lower_bound}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="public set + P=4, M=8 family, CP-SAT at 5 s")
    parser.add_argument("--time-limit", type=float, default=None, help="CP-SAT seconds (default 30, quick 5)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_pipeline.json")
    args = parser.parse_args(argv)
    time_limit = args.time_limit or (5.0 if args.quick else 30.0)
    public = public_instances()
    names, cpsat = [i.name for i in public], cpsat_method(time_limit)

    def save(results: dict) -> None:
        """Both files after every row, so an interrupted run leaves a consistent table."""
        write_json(results, args.out)
        write_markdown(results, args.out.with_suffix(".md"), names, cpsat)

    def pending(instances: list[PipelineInstance]) -> list[tuple[PipelineInstance, str]]:
        done = {(r["instance"], r["method"]) for r in results["rows"]}
        return [(i, m) for i in instances for m in methods(i, time_limit) if (i.name, m) not in done]

    results = read_results(args.out, {"rows": [], "scaling": []},
                           valid=lambda r: all("instance" in row and "method" in row for row in r["rows"])
                           and all("instance" in s for s in r["scaling"]))
    for instance, method in tqdm(pending(public), desc="public instances", unit="run"):
        results["rows"].append(describe(instance) | run_method(instance, method, time_limit, args.workers))
        save(results)
    scaled = {s["instance"] for s in results["scaling"]}
    for split in tqdm((False, True), desc="greedy P=64, M=512", unit="instance"):
        if scaling_name(64, 512, split) not in scaled:
            results["scaling"].append(greedy_scaling(64, 512, split, runs=3))
            save(results)
    for instance, method in tqdm(pending(list(family(args.quick))), desc="generated family", unit="run"):
        results["rows"].append(describe(instance) | run_method(instance, method, time_limit, args.workers))
        save(results)
    save(results)
    text = args.out.with_suffix(".md").read_text()
    print(text[text.index("Greedy at scale:"):])
    return results


if __name__ == "__main__":
    main()
