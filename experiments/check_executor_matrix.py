"""Check the executor's acceptance matrix and record it: every zoo schedule on every instance shape
it supports, and greedy and CP-SAT schedules with split backward and remat, on P in {2, 4, 8} CPU
devices; pipelined loss and every parameter gradient against the single-device reference.

    python experiments/check_executor_matrix.py [--quick] [--out PATH]

The matrix (tests/executor_matrix.py) is the one tests/test_executor_matrix.py runs. Per case:
ops used, loss error, max gradient error, solve, compile and check times, pass (<= 1e-5). Zoo
schedules that refuse a shape are listed with the zoo's reason. --quick: P = 2 only. Resumable:
cases already in the JSON are skipped. Writes experiments/results/executor_matrix.json and .md.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
from tqdm.auto import tqdm

from pipesched._common import atomic_write, read_results, write_json
from pipesched.executor import ModelConfig, compile_pipeline, gradient_error
from pipesched.pipeline.zoo import ZOO

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from executor_matrix import DEVICES, Case, ops_used, solver_matrix, zoo_matrix  # noqa: E402

RESULTS = REPO / "experiments" / "results"
MLP = ModelConfig("mlp", microbatch=2, width=8)
TOL = 1e-5


def check(case: Case) -> dict:
    """Solve (or build) the case's schedule, compile it and compare it with the reference."""
    t0 = time.perf_counter()
    schedule = case.build()
    t1 = time.perf_counter()
    pipeline = compile_pipeline(schedule, MLP)
    pipeline.program.grads.lower(pipeline.params, pipeline.batch).compile()  # cached for the check's call
    t2 = time.perf_counter()
    loss, ref_loss, error = gradient_error(pipeline)
    t3 = time.perf_counter()
    inst = schedule.instance
    return {"case": case.id, "source": case.source, "shape": case.shape, "P": case.num_devices,
            "stages": inst.num_stages, "microbatches": inst.num_microbatches, "ops": ops_used(schedule),
            "ticks": pipeline.program.plan.ticks, "loss_error": abs(loss - ref_loss), "max_grad_error": error,
            "solve_s": t1 - t0, "compile_s": t2 - t1, "check_s": t3 - t2,
            "pass": abs(loss - ref_loss) <= TOL and error <= TOL}


def markdown(rows: list[dict], refusals: list[dict]) -> str:
    passed = sum(r["pass"] for r in rows)
    lines = [
        "# Executor acceptance matrix",
        "",
        f"Model: MLP (microbatch {MLP.microbatch}, width {MLP.width}), fp32, backend {jax.default_backend()}. "
        f"Pass: |loss - reference| <= {TOL:g} and max |grad - reference grad| <= {TOL:g}.",
        "",
        f"- cases: {len(rows)}, passed: {passed}, failed: {len(rows) - passed}",
        f"- max loss error: {max(r['loss_error'] for r in rows):.2e}; "
        f"max gradient error: {max(r['max_grad_error'] for r in rows):.2e}",
        f"- zoo schedules with no supported shape at some P: {', '.join(_unbuilt(rows)) or 'none'}",
        f"- per case, median: solve {statistics.median(r['solve_s'] for r in rows):.2f} s, "
        f"compile {statistics.median(r['compile_s'] for r in rows):.2f} s, "
        f"check {statistics.median(r['check_s'] for r in rows):.2f} s; total "
        f"{sum(r['solve_s'] + r['compile_s'] + r['check_s'] for r in rows):.0f} s",
        "",
        "| case | P | stages | M | ops | ticks | loss error | max grad error | solve s | compile s | check s | pass |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['case']} | {r['P']} | {r['stages']} | {r['microbatches']} | {r['ops']} | {r['ticks']} | "
              f"{r['loss_error']:.1e} | {r['max_grad_error']:.1e} | {r['solve_s']:.2f} | {r['compile_s']:.2f} | "
              f"{r['check_s']:.2f} | {'yes' if r['pass'] else 'NO'} |" for r in rows]
    lines += ["", "## Zoo schedules that refuse a shape (zoo `supports` is False)", "",
              "The zoo's reason, without its `got ...` part (the JSON has it whole).", "",
              "| schedule | shape | P | reason |", "|---|---|---|---|"]
    lines += [f"| {name} | {shape} | {', '.join(map(str, ps))} | {reason} |"
              for (name, shape, reason), ps in _grouped(refusals).items()]
    return "\n".join(lines) + "\n"


def _unbuilt(rows: list[dict]) -> list[str]:
    """Each `name-P` of the zoo with no case in `rows`."""
    built = {(r["source"], r["P"]) for r in rows}
    return [f"{name}-P{P}" for name in ZOO for P in sorted({r["P"] for r in rows}) if (name, P) not in built]


def _grouped(refusals: list[dict]) -> dict[tuple[str, str, str], list[int]]:
    """The device counts of each (schedule, shape, reason); reasons compared without their `; got ...` tail."""
    groups: dict[tuple[str, str, str], list[int]] = {}
    for r in refusals:
        groups.setdefault((r["name"], r["shape"], r["reason"].split("; got ")[0]), []).append(r["P"])
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", 
                        help="check P = 2 only (rows of other P already in the JSON are kept)")
    parser.add_argument("--out", type=Path, default=RESULTS / "executor_matrix.json")
    args = parser.parse_args()
    cases, refusals = zoo_matrix(DEVICES)
    cases += solver_matrix(DEVICES)
    todo = [c for c in cases if not args.quick or c.num_devices == 2]
    done = read_results(args.out, {"cases": [], "refused": []},
                        valid=lambda r: all("case" in row for row in r["cases"]))["cases"]
    rows = {r["case"]: r for r in done}
    refused = [{"name": r.name, "shape": r.shape, "P": r.num_devices, "reason": r.reason} for r in refusals]
    for case in tqdm([c for c in todo if c.id not in rows], desc="executor matrix"):
        rows[case.id] = check(case)
        write_json({"cases": list(rows.values()), "refused": refused}, args.out)  # after every case
    ordered = [rows[c.id] for c in cases if c.id in rows]
    write_json({"cases": ordered, "refused": refused}, args.out)
    atomic_write(args.out.with_suffix(".md"), markdown(ordered, refused))
    failed = [r["case"] for r in ordered if not r["pass"]]
    print(f"{len(ordered) - len(failed)}/{len(ordered)} cases pass; "
          f"max grad error {max(r['max_grad_error'] for r in ordered):.2e}")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
