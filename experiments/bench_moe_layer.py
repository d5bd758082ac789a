"""The MoE layer on a mesh against the placement model: output and per-device loads.

    python experiments/bench_moe_layer.py [--quick]

For each configuration (E experts, G devices with C slots, top-k), the router (skewed towards a
Zipf-popular set of experts) routes T tokens; each solver places the experts for that routed trace
at batch size b; the expert-parallel layer then runs the placement on 8 simulated CPU devices and
its measured per-device loads are compared with formats.md 3.2's (`batch_loads`, `placement_cost`)
on the same batches, and its output with the dense single-device reference. Resumable; writes
experiments/results/bench_moe_layer.json and .md.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from pipesched.solvers import solve_placement
from tqdm.auto import tqdm

from pipesched._common import atomic_write, read_results, write_json
from pipesched.moe import (
    ExpertPlan,
    expert_mesh,
    expert_parallel_moe,
    init_moe_params,
    measured_loads,
    moe_reference,
)
from pipesched.placement import PlacementInstance, batch_loads, validate_placement

RESULTS = Path(__file__).resolve().parent / "results"
MODEL_DIM, HIDDEN = 16, 840  # 840 = lcm(1..8): any replica count up to 8 devices splits it evenly
CONFIGS = [(8, 4, 3, 2), (16, 8, 3, 2), (16, 4, 5, 4)]  # (E, G, C, k); all with spare slots
SOLVERS = ("round-robin", "eplb", "greedy")
BATCH_SIZES = (1, 8, 64, None)  # None: the whole trace


def skewed_layer(num_experts: int, num_tokens: int, seed: int):
    """Random layer whose router prefers a Zipf-popular ranking of experts (feature 0 carries log p)."""
    params = init_moe_params(jax.random.key(seed), MODEL_DIM, HIDDEN, num_experts)
    popularity = 1.0 / np.random.default_rng(seed).permutation(np.arange(1, num_experts + 1))
    params = params._replace(router=params.router.at[0].set(jnp.log(popularity) / 3.0))
    x = jax.random.normal(jax.random.key(seed + 1), (num_tokens, MODEL_DIM)).at[:, 0].set(3.0)
    return params, x


def bench_row(config, solver: str, batch_size: int | None, num_tokens: int, time_limit: float) -> dict:
    E, G, C, k = config
    params, x = skewed_layer(E, num_tokens, seed=E * 100 + G)
    b = batch_size or num_tokens
    routed = expert_parallel_moe(params, x, plan=ExpertPlan.from_devices([list(range(E))], E, E, HIDDEN),
                                 mesh=expert_mesh(1), top_k=k, batch_size=b).routing
    trace = [tuple(int(e) for e in token) for token in np.asarray(routed.experts)]
    instance = PlacementInstance(E, G, C, b, trace, name=f"skewed_e{E}_g{G}_c{C}_k{k}")
    result = solve_placement(instance, solver=solver, time_limit=time_limit)
    placement_cost = validate_placement(result.schedule)
    plan = ExpertPlan.from_placement(result.schedule, HIDDEN)
    start = time.perf_counter()
    out = jax.block_until_ready(expert_parallel_moe(params, x, plan=plan, mesh=expert_mesh(G), top_k=k, batch_size=b))
    run_s = time.perf_counter() - start
    loads = measured_loads(out, plan)
    return {"E": E, "G": G, "C": C, "k": k, "solver": solver, "b": batch_size or "whole", "tokens": num_tokens,
            "replicas": sum(len(d) for d in result.schedule.devices) - E,
            "placement_cost": placement_cost, "measured_cost": float(loads.max(axis=1).mean()),
            "max_load_error": float(np.abs(loads - batch_loads(instance, result.schedule.devices)).max()),
            "max_output_error": float(jnp.abs(out.y - moe_reference(params, x, k)).max()),
            "dropped": int(out.dropped), "same_routing": bool(np.array_equal(out.routing.experts, routed.experts)),
            "first_run_s": run_s}


def row_key(row: dict) -> tuple:
    return row["E"], row["G"], row["C"], row["k"], row["solver"], row["b"], row["tokens"]


def write_markdown(rows: list[dict], path: Path) -> None:
    header = ("| E | G | C | k | solver | b | replicas | placement cost | measured cost | max load error | "
              "max output error | dropped |")
    lines = [header, "|" + "---|" * 12]
    lines += [f"| {r['E']} | {r['G']} | {r['C']} | {r['k']} | {r['solver']} | {r['b']} | {r['replicas']} | "
              f"{r['placement_cost']:.6f} | {r['measured_cost']:.6f} | {r['max_load_error']:.1e} | "
              f"{r['max_output_error']:.1e} | {r['dropped']} |" for r in rows]
    worst_load = max(r["max_load_error"] for r in rows)
    worst_out = max(r["max_output_error"] for r in rows)
    atomic_write(path, f"{len(rows)} runs: worst |measured - predicted load| = {worst_load:.1e}, "
                    f"worst |layer - dense reference| = {worst_out:.1e} (fp32).\n\n" + "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one configuration, 256 tokens")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--time-limit", type=float, default=5.0, help="seconds per placement solve")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_moe_layer.json")
    args = parser.parse_args(argv)
    configs, tokens = (CONFIGS[:1], 256) if args.quick else (CONFIGS, args.tokens)
    rows = read_results(args.out, [], valid=lambda rows: all(len(row_key(r)) == 7 for r in rows))
    done = {row_key(r) for r in rows}
    jobs = [(c, s, b) for c in configs for s in SOLVERS for b in BATCH_SIZES
            if (*c, s, b or "whole", tokens) not in done]
    for config, solver, batch_size in tqdm(jobs, desc="MoE layer vs placement"):
        rows.append(bench_row(config, solver, batch_size, tokens, args.time_limit))
        write_json(rows, args.out)  # after every row: a killed run loses at most the row in flight
    write_markdown(rows, args.out.with_suffix(".md"))
    print(args.out.with_suffix(".md").read_text())
    return rows


if __name__ == "__main__":
    main()
