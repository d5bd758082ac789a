"""Check the GPU paths on one accelerator: compiled Pallas kernel, MoE layer, executor.

    python experiments/check_gpu.py [--out PATH]

Needs a GPU (`jax.default_backend() == "gpu"`); CPU runs are covered by the tests.
1. Kernel: the compiled grouped matmul against `jax.lax.ragged_dot` on random group sizes (empty
   groups, rows past the groups, sizes that are not multiples of the tiles), float32 and bfloat16;
   output and gradients in lhs and rhs (the custom VJP and its transposed kernel).
2. MoE layer: all experts on the one device of a 1-device "expert" mesh, with the compiled kernel
   (the default on GPU) and with `ragged_dot`: output against the dense reference, measured loads
   against formats.md 3.2's batch loads.
3. Executor: zoo schedules whose stages all sit on the one device (P=1 with 1 or 4 stages), run
   with `pipesched.executor.run`: loss and gradients against the single-device reference.
Writes a JSON report (default experiments/results/check_gpu.json) and prints a summary.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from pipesched.kernels import Tiling, compiled_backend, grouped_matmul, grouped_matmul_reference

from pipesched._common import write_json
from pipesched.executor import run
from pipesched.moe import ExpertPlan, expert_mesh, expert_parallel_moe, init_moe_params, measured_loads, moe_reference
from pipesched.pipeline.zoo import interleaved_placement, uniform_instance, zoo_schedule
from pipesched.placement import PlacementInstance, batch_loads

RESULTS = Path(__file__).resolve().parent / "results"
KERNEL_CASES = [  # (group sizes, spare rows, k, n)
    ([0, 0, 16, 0], 0, 12, 10), ([5, 0, 0, 11], 3, 32, 48), ([0] * 8, 5, 16, 16),
    ([100, 0, 37, 1, 0, 250, 3, 121], 19, 200, 136), ([64] * 16, 0, 128, 256), ([1000, 24, 0, 0], 0, 512, 1024),
]


def _relative_error(got: jax.Array, want: jax.Array) -> float:
    got, want = jnp.asarray(got, jnp.float32), jnp.asarray(want, jnp.float32)
    return float(jnp.abs(got - want).max() / max(1.0, float(jnp.abs(want).max())))


def kernel_rows(seed: int = 0) -> list[dict]:
    rows = []
    for i, (sizes, spare, k, n) in enumerate(KERNEL_CASES):
        rng = np.random.default_rng(seed + i)
        m = sum(sizes) + spare
        for dtype, tolerance in (("float32", 1e-5), ("bfloat16", 1e-2)):
            lhs = jnp.asarray(rng.normal(size=(m, k)), dtype)
            rhs = jnp.asarray(rng.normal(size=(len(sizes), k, n)) / np.sqrt(k), dtype)
            groups = jnp.asarray(sizes, jnp.int32)
            cotangent = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)

            def gradients(matmul):
                loss = lambda a, b: jnp.sum(matmul(a, b).astype(jnp.float32) * cotangent)  # noqa: E731
                return jax.grad(loss, argnums=(0, 1))(lhs, rhs)

            ref = grouped_matmul_reference(lhs, rhs, groups).astype(jnp.float32)
            ref_grads = gradients(lambda a, b: grouped_matmul_reference(a, b, groups))
            for tiling in (Tiling(16, 16, 16), Tiling(64, 64, 128)):
                kernel = lambda a, b: grouped_matmul(a, b, groups, tiling=tiling,  # noqa: E731
                                                     preferred_element_type=jnp.float32)
                out = kernel(lhs, rhs)
                error = _relative_error(out, ref)
                grad_error = max(_relative_error(g, r) for g, r in zip(gradients(kernel), ref_grads))
                tail_zero = not bool(jnp.any(out[sum(sizes):]))
                rows.append({"groups": sizes, "m": m, "k": k, "n": n, "dtype": dtype, "tiling": list(tiling),
                             "relative_error": error, "gradient_relative_error": grad_error, "tail_zero": tail_zero,
                             "ok": error <= tolerance and grad_error <= tolerance and tail_zero})
    return rows


def moe_rows(seed: int = 0) -> list[dict]:
    rows = []
    for num_experts, top_k, num_tokens, batch_size in ((8, 2, 256, 1), (16, 2, 512, 8), (16, 4, 1024, 64)):
        params = init_moe_params(jax.random.key(seed), 64, 256, num_experts)
        x = jax.random.normal(jax.random.key(seed + 1), (num_tokens, 64))
        devices = [list(range(num_experts))]
        plan = ExpertPlan.from_devices(devices, num_experts, num_experts, 256)
        reference = moe_reference(params, x, top_k)
        for name, matmul in (("pallas", grouped_matmul), ("ragged_dot", grouped_matmul_reference)):
            out = expert_parallel_moe(params, x, plan=plan, mesh=expert_mesh(1), top_k=top_k,
                                      batch_size=batch_size, matmul=matmul)
            trace = [tuple(int(e) for e in token) for token in np.asarray(out.routing.experts)]
            instance = PlacementInstance(num_experts, 1, num_experts, batch_size, trace)
            load_error = float(np.abs(measured_loads(out, plan) - batch_loads(instance, devices)).max())
            error = float(jnp.abs(out.y - reference).max())
            rows.append({"E": num_experts, "k": top_k, "tokens": num_tokens, "b": batch_size, "matmul": name,
                         "max_output_error": error, "max_load_error": load_error, "dropped": int(out.dropped),
                         "ok": error <= 1e-5 and load_error <= 1e-12 and int(out.dropped) == 0})
    return rows


def executor_rows() -> list[dict]:
    rows = []
    cases = [("gpipe", uniform_instance(1, 4, 1, 2)), ("1f1b", uniform_instance(1, 4, 1, 2)),
             ("interleaved-1f1b", uniform_instance(1, 4, 1, 2, placement=interleaved_placement(1, 4)))]
    for name, instance in cases:
        report = run(zoo_schedule(instance, name).schedule, steps=3, warmup=2)
        loss_error = abs(report["loss"] - report["reference_loss"])
        rows.append({"schedule": name, "stages": instance.num_stages, "loss_error": loss_error,
                     "grad_error": report["max_abs_grad_error"], "step_time_s": report["step_time_s"],
                     "peak_memory_bytes": report["peak_memory_bytes"],
                     "ok": loss_error <= 1e-4 and report["max_abs_grad_error"] <= 1e-4})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "check_gpu.json")
    args = parser.parse_args(argv)
    if not compiled_backend():
        raise SystemExit(f"check_gpu: needs a GPU backend, found {jax.default_backend()!r}")
    report = {"jax": jax.__version__, "device": str(jax.devices()[0].device_kind),
              "kernel": kernel_rows(), "moe_layer": moe_rows(), "executor": executor_rows()}
    report["ok"] = all(r["ok"] for part in ("kernel", "moe_layer", "executor") for r in report[part])
    write_json(report, args.out)
    for part in ("kernel", "moe_layer", "executor"):
        passed = sum(r["ok"] for r in report[part])
        print(f"{part}: {passed}/{len(report[part])} ok")
        for r in report[part]:
            print("  ", r)
    return report


if __name__ == "__main__":
    main()
