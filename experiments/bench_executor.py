"""Benchmark the JAX executor against the schedules' predictions on a 2-device CPU mesh.

    python experiments/bench_executor.py [--quick] [--out PATH]

1. Step time: the MLP (ops of >= 5 ms in full mode) is profiled (`profile_instance`) into a P=2,
   M=8 pipeline instance, fused and split backward, with the ops timed as ticks of a calibration
   program (the default, `in_program=True`) and, for comparison, alone (`in_program=False`); zoo
   schedules, greedy and CP-SAT (solved on the in-program profile) at several memory limits (k
   activations per device, remat allowed) are compiled and their pipelined forward/backward program
   is timed in interleaved rounds (median per schedule). Predictions: the schedule's own makespan
   and its executed (lock-step) form with the profiled op durations (in program, and alone), and,
   as a diagnostic that is not a prediction, the executed form with tick costs measured in the
   timed program itself (`tick_times`). Checks: median within 25% of a prediction, and the ranking
   of schedules by predicted time against the measured ranking (every pair whose predictions
   differ by > 5%).
2. Memory: per schedule, the compiled program's per-device bytes (`memory_analysis()`) against the
   bytes of its slot pools (residual + stash + hidden slots times their sizes) and the schedule's
   own predicted peak; the growth of compiled memory per pool byte relative to the smallest schedule.
3. Loss curve: 100 Adam steps of gpt-tiny, pipelined (1F1B with remat) and unpipelined.

Each device runs single-threaded (XLA CPU flags below), so two devices use the machine's two cores.
Resumable: rows already in the JSON (same section and name) are skipped. Writes
experiments/results/bench_executor.json and .md.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=2 --xla_cpu_multi_thread_eigen=false "
                           "intra_op_parallelism_threads=1")

import argparse
import dataclasses
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import jax
from pipesched.solvers import MemoryLimitError, solve_pipeline
from tqdm.auto import tqdm

from pipesched._common import atomic_write, read_results, write_json
from pipesched.executor import (
    ModelConfig,
    byte_instance,
    compile_pipeline,
    compiled_memory_bytes,
    loss_curves,
    predicted_times,
    profile_instance,
    slot_bytes,
    tick_prediction,
    tick_times,
)
from pipesched.pipeline import PipelineInstance, PipelineSchedule, memory_timeline
from pipesched.pipeline.zoo import uniform_instance

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"
P, M = 2, 8
FULL = ModelConfig("mlp", microbatch=512, width=1024, layers=1)
QUICK = ModelConfig("mlp", microbatch=256, width=128, layers=1)
RANK_MARGIN = 0.05  # predictions closer than this are a tie for the ranking check


# --------------------------------------------------------------------------------------------
# Schedules


def with_limit(instance: PipelineInstance, k: float | None) -> PipelineInstance:
    """Memory limit of k activations per device (None: no limit)."""
    if k is None:
        return instance.replace(memory_limit=None)
    return instance.replace(memory_limit=tuple(k * sum(instance.stages[s].activation for s in stages)
                                               for stages in instance.stages_of_device))


def schedule_specs(quick: bool) -> list[tuple[bool, str, float | None]]:
    """(split backward, solver, k activations per device or None)."""
    specs = [(False, "gpipe", None), (False, "1f1b", None), (False, "greedy", 1), (False, "cpsat", 1),
             (True, "zb-h1", None), (True, "greedy", 2), (True, "cpsat", None)]
    if quick:
        return [(False, "gpipe", None), (False, "1f1b", None), (False, "greedy", 1), (True, "zb-h1", None)]
    return specs + [(False, "greedy", 2), (True, "zb-h2", None), (True, "cpsat", 1)]


def spec_name(split: bool, solver: str, k: float | None) -> str:
    return f"{solver}-{'split' if split else 'fused'}" + ("" if k is None else f"-k{k:g}")


def solve(instance: PipelineInstance, solver: str, k: float | None, time_limit: float) -> PipelineSchedule:
    result = solve_pipeline(with_limit(instance, k), solver, time_limit=time_limit)
    if result.status not in ("optimal", "feasible"):
        raise MemoryLimitError(f"{solver}: no schedule fits k={k} ({result.status})")
    return result.schedule


# --------------------------------------------------------------------------------------------
# Measurements


def median_time(fn, args, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return times


def pool_bytes(pipeline) -> int:
    """Bytes of the program's slot pools on one device, trash slots included."""
    plan = pipeline.program.plan
    size = slot_bytes(plan, pipeline.model)
    return ((plan.hidden_slots + 1) * size["hidden"] + (max(plan.residual_slots) + 1) * size["residual"]
            + (max(plan.stash_slots, default=0) + 1) * size["stash"])


def timing_rows(config: ModelConfig, quick: bool, done: set[str], time_limit: float,
                rounds: int) -> Iterator[dict]:
    """Profile, solve, compile and time every pending schedule (interleaved rounds), then yield
    their rows one by one (the timing rounds interleave every schedule, so no row is done before
    the last round)."""
    specs = [s for s in schedule_specs(quick) if spec_name(*s) not in done]
    if not specs:
        return
    splits = sorted({s[0] for s in specs})
    profiled = {split: profile_instance(config, (0, 1), M, split_backward=split, allow_remat=True, repeats=5)
                for split in tqdm(splits, desc="profile ops in program")}
    alone = {split: profile_instance(config, (0, 1), M, split_backward=split, allow_remat=True, repeats=7,
                                     in_program=False) for split in splits}
    compiled = {}
    for split, solver, k in tqdm(specs, desc="compile schedules", unit="schedule"):
        try:
            schedule = solve(profiled[split], solver, k, time_limit)
        except MemoryLimitError as err:
            tqdm.write(f"skip {spec_name(split, solver, k)}: {err}")
            continue
        pipeline = compile_pipeline(schedule, config)
        jax.block_until_ready(pipeline.program.grads(pipeline.params, pipeline.batch))
        ticks = tick_times(pipeline.program, pipeline.params, pipeline.batch, ticks=4, repeats=2)
        compiled[spec_name(split, solver, k)] = (schedule, pipeline, profiled[split], alone[split], k, ticks)
    times: dict[str, list[float]] = {name: [] for name in compiled}
    for _ in tqdm(range(rounds), desc="timing rounds", unit="round"):
        for name, (_, pipeline, *_) in compiled.items():
            times[name] += median_time(pipeline.program.grads, (pipeline.params, pipeline.batch), 2)
    for name, (schedule, pipeline, timing, timing_alone, k, ticks) in compiled.items():
        makespan, executed = predicted_times(schedule, timing)
        makespan_alone, executed_alone = predicted_times(schedule, timing_alone)
        stages = timing.stages
        yield {
            "name": name, "split": schedule.instance.split_backward, "solver": schedule.solver,
            "memory_limit_activations": k,
            "rematerialized": len(schedule.rematerialized),
            "op_ms": {op: [getattr(st, op) / 1e3 for st in stages] for op in ("F", "B", "W")},
            "op_alone_ms": {op: [getattr(st, op) / 1e3 for st in timing_alone.stages] for op in ("F", "B", "W")},
            "comm_alone_ms": max(timing_alone.comm_after(s) for s in range(timing.num_stages - 1)) / 1e3,
            "predicted_makespan_s": makespan * 1e-6, "predicted_executed_s": executed * 1e-6,
            "predicted_makespan_alone_s": makespan_alone * 1e-6, "predicted_executed_alone_s": executed_alone * 1e-6,
            "predicted_ticks_s": tick_prediction(pipeline.program.plan, ticks),
            "tick_ms": {str(b): t * 1e3 for b, t in ticks.items()},
            "measured_median_s": statistics.median(times[name]), "measured_s": times[name],
            "ticks": pipeline.program.plan.ticks, "residual_slots": list(pipeline.program.plan.residual_slots),
            "stash_slots": list(pipeline.program.plan.stash_slots), "hidden_slots": pipeline.program.plan.hidden_slots,
            "compiled_memory_bytes": compiled_memory_bytes(pipeline), "pool_bytes": pool_bytes(pipeline),
            "predicted_peak_memory_bytes": list(memory_timeline(byte_instance(pipeline), schedule.ops).peaks),
        }


def loss_row(steps: int) -> dict:
    """gpt-tiny trained pipelined (greedy's schedule at 1 activation per device: it rematerializes)
    and unpipelined, from the same initial parameters on the same batch."""
    instance = with_limit(uniform_instance(P, 4, 1, 2, allow_remat=True), 1)
    schedule = solve_pipeline(instance, "greedy").schedule
    pipeline = compile_pipeline(schedule, "gpt-tiny")
    pipelined, unpipelined = loss_curves(pipeline, steps, learning_rate=1e-2, progress=True)
    return {"name": f"gpt-tiny-greedy-k1 ({len(schedule.rematerialized)} remat)", "steps": steps,
            "pipelined": pipelined, "unpipelined": unpipelined,
            "max_abs_difference": max(abs(a - b) for a, b in zip(pipelined, unpipelined))}


# --------------------------------------------------------------------------------------------
# Summary


def ranking_pairs(rows: list[dict], key: str) -> tuple[int, int]:
    """(pairs ordered alike by the prediction `key` and the measured time, pairs compared): pairs
    whose predictions differ by more than RANK_MARGIN."""
    agree = total = 0
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            pa, pb = a[key], b[key]
            if abs(pa - pb) <= RANK_MARGIN * min(pa, pb):
                continue
            total += 1
            agree += (pa < pb) == (a["measured_median_s"] < b["measured_median_s"])
    return agree, total


PREDICTIONS = {"predicted_executed_s": "executed form, ops profiled in the program (the prediction)",
               "predicted_executed_alone_s": "executed form, ops profiled alone",
               "predicted_ticks_s": "executed form, tick costs measured in the timed program (diagnostic)"}
METHOD = "ops profiled in program"  # results of another method are measured again


def summary(results: dict) -> list[str]:
    rows = results["timing"]
    lines = []
    if rows:
        smallest = min(min(r["op_alone_ms"]["F"]) for r in rows)
        idle = statistics.median(r["tick_ms"]["0"] for r in rows if "0" in r["tick_ms"])
        lines.append(f"smallest F alone: {smallest:.1f} ms; median idle tick of the timed programs: {idle:.1f} ms")
        for key, what in PREDICTIONS.items():
            errors = [r["measured_median_s"] / r[key] - 1 for r in rows]
            within = sum(abs(e) <= 0.25 for e in errors)
            agree, total = ranking_pairs(rows, key)
            lines.append(f"{what}: {within} of {len(rows)} schedules within 25% (median error "
                         f"{statistics.median(errors):+.1%}, worst {max(errors, key=abs):+.1%}); ranking: {agree} of "
                         f"{total} pairs (> {RANK_MARGIN:.0%} apart) ordered alike")
        for split in sorted({r["split"] for r in rows}):
            same = [r for r in rows if r["split"] == split]  # one program structure: differences are slots
            base = min(same, key=lambda r: r["pool_bytes"])
            slopes = [(r["compiled_memory_bytes"] - base["compiled_memory_bytes"])
                      / (r["pool_bytes"] - base["pool_bytes"]) for r in same if r["pool_bytes"] != base["pool_bytes"]]
            if slopes:
                lines.append(f"memory ({'split' if split else 'fused'} backward): compiled bytes grow by "
                             f"{min(slopes):.3f}..{max(slopes):.3f} per slot-pool byte against {base['name']} "
                             f"(1 = the schedule's slots are the program's memory)")
    for r in results["loss"]:
        lines.append(f"loss curve {r['name']}: {r['steps']} steps, max |pipelined - unpipelined| = "
                     f"{r['max_abs_difference']:.2e} (loss {r['unpipelined'][0]:.4f} -> {r['unpipelined'][-1]:.4f})")
    return lines


def write_markdown(results: dict, path: Path) -> None:
    header = ["schedule", "remat", "ticks", "slots res/stash/hidden", "pred. makespan ms", "pred. executed ms",
              "pred. executed (ops alone) ms", "pred. ticks ms", "measured ms", "compiled MiB", "pools MiB",
              "schedule peak MiB"]
    lines = ["# Executor benchmark", "", f"backend {results['backend']}, {P} devices, M={M}, model {results['model']}, "
             f"1-min load average {results.get('load_average_1min')} (before, after timing; 2 cores)",
             "", *[f"- {line}" for line in summary(results)], "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results["timing"]:
        slots = f"{max(r['residual_slots'])}/{max(r['stash_slots'])}/{r['hidden_slots']}"
        cells = [r["name"], str(r["rematerialized"]), str(r["ticks"]), slots,
                 *(f"{r[k] * 1e3:.1f}" for k in ("predicted_makespan_s", "predicted_executed_s",
                                                 "predicted_executed_alone_s", "predicted_ticks_s",
                                                 "measured_median_s")),
                 *(f"{v / 2**20:.2f}" for v in (r["compiled_memory_bytes"], r["pool_bytes"],
                                                max(r["predicted_peak_memory_bytes"])))]
        lines.append("| " + " | ".join(cells) + " |")
    atomic_write(path, "\n".join(lines) + "\n")


def same_setup(results: dict, config: ModelConfig) -> bool:
    """Whether saved results are of this model and method (others are measured again)."""
    return results.get("model") == dataclasses.asdict(config) and results.get("method") == METHOD


def resumable(results: dict, config: ModelConfig) -> bool:
    """Saved results of this setup hold the lists main() appends to (any other setup is replaced)."""
    return not same_setup(results, config) or (
        isinstance(results["timing"], list) and isinstance(results["loss"], list)
        and all(isinstance(r, dict) and "name" in r for r in results["timing"]))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller model, fewer schedules and steps")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_executor.json")
    parser.add_argument("--time-limit", type=float, default=10.0, help="CP-SAT seconds per schedule")
    args = parser.parse_args(argv)
    config = QUICK if args.quick else FULL
    results = read_results(args.out, {}, valid=lambda r: resumable(r, config))
    if not same_setup(results, config):
        results = {"model": dataclasses.asdict(config), "method": METHOD, "timing": [], "loss": []}
    results["backend"] = jax.default_backend()
    done = {r["name"] for r in results["timing"]}
    load_before = os.getloadavg()[0]
    results["load_average_1min"] = None
    for row in timing_rows(config, args.quick, done, args.time_limit, rounds=3 if args.quick else 5):
        if results["load_average_1min"] is None:  # the first row comes once every timing round has run
            results["load_average_1min"] = [load_before, os.getloadavg()[0]]  # before, after timing (shared machine)
        results["timing"].append(row)
        write_json(results, args.out)  # after every row: a killed run keeps the rows already written
    if results["load_average_1min"] is None:
        results["load_average_1min"] = [load_before, os.getloadavg()[0]]
    write_json(results, args.out)
    if not results["loss"]:
        results["loss"].append(loss_row(20 if args.quick else 100))
        write_json(results, args.out)
    write_markdown(results, args.out.with_suffix(".md"))
    print("\n".join(summary(results)))
    return results


if __name__ == "__main__":
    main()
