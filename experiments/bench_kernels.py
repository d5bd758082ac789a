"""Benchmark the Pallas grouped matmul against jax.lax.ragged_dot, forward and backward.

    python experiments/bench_kernels.py [--quick] [--repeats 20]

On GPU the kernel is compiled (Triton), the sizes are MoE-sized and several tilings are tried
(the summary keeps the fastest per size); elsewhere it runs in interpret mode on tiny sizes (a
correctness smoke run, not a speed comparison). Group sizes are random
(multinomial over Zipf-skewed expert popularity, a quarter of the experts left empty). Resumable:
rows already in experiments/results/bench_kernels.json (same backend, size and pass) are skipped.
The backward pass is the gradient in lhs and rhs of sum(out * cotangent): the kernel's custom VJP
(the kernel again and the transposed kernel) against ragged_dot's own gradient.
Writes bench_kernels.json and bench_kernels.md with median times.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from pipesched.kernels import Tiling, compiled_backend, grouped_matmul, grouped_matmul_reference
from tqdm.auto import tqdm

from pipesched._common import atomic_write, read_results, write_json

RESULTS = Path(__file__).resolve().parent / "results"
GPU_SIZES = [(m, k, n, e) for m in (4096, 16384) for (k, n) in ((1024, 1024), (4096, 1024)) for e in (8, 64)]
TINY_SIZES = [(64, 32, 32, 4), (96, 48, 40, 8)]
GPU_TILINGS = [Tiling(64, 64, 128, 4, 3), Tiling(128, 64, 128, 4, 3), Tiling(128, 64, 128, 8, 3),
               Tiling(128, 32, 128, 4, 4), Tiling(64, 32, 64, 4, 4), Tiling(128, 64, 256, 8, 3)]


def group_sizes(rng: np.random.Generator, m: int, num_groups: int) -> np.ndarray:
    """Zipf-skewed sizes summing to m, with a quarter of the groups empty."""
    popularity = 1.0 / np.arange(1, num_groups + 1)
    popularity[rng.choice(num_groups, num_groups // 4, replace=False)] = 0
    return rng.multinomial(m, popularity / popularity.sum()).astype(np.int32)


def median_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_row(size: tuple[int, int, int, int], dtype: str, tiling: Tiling, repeats: int, seed: int,
              backward: bool) -> dict:
    m, k, n, num_groups = size
    rng = np.random.default_rng(seed)
    lhs = jnp.asarray(rng.normal(size=(m, k)), dtype)
    rhs = jnp.asarray(rng.normal(size=(num_groups, k, n)) / np.sqrt(k), dtype)
    sizes = jnp.asarray(group_sizes(rng, m, num_groups))
    cotangent = jnp.asarray(rng.normal(size=(m, n)), dtype)

    def timed(matmul):
        if not backward:
            return jax.jit(lambda a, b: matmul(a, b, sizes).astype(jnp.float32))
        loss = lambda a, b: jnp.sum(matmul(a, b, sizes).astype(jnp.float32) * cotangent)  # noqa: E731
        return jax.jit(lambda a, b: jnp.concatenate([g.astype(jnp.float32).ravel()
                                                     for g in jax.grad(loss, argnums=(0, 1))(a, b)]))

    kernel = timed(lambda a, b, g: grouped_matmul(a, b, g, tiling=tiling, preferred_element_type=jnp.float32))
    reference = timed(grouped_matmul_reference)
    out, ref = kernel(lhs, rhs), reference(lhs, rhs)
    kernel_s = median_seconds(lambda: kernel(lhs, rhs), repeats)
    reference_s = median_seconds(lambda: reference(lhs, rhs), repeats)
    flops = (6.0 if backward else 2.0) * m * k * n  # gradient: the forward product and two more
    return {"backend": jax.default_backend(), "compiled": compiled_backend(), "m": m, "k": k, "n": n,
            "groups": num_groups, "empty_groups": int((np.asarray(sizes) == 0).sum()), "dtype": dtype,
            "pass": "backward" if backward else "forward",
            "tiling": list(tiling), "kernel_s": kernel_s, "ragged_dot_s": reference_s,
            "speedup": reference_s / kernel_s, "kernel_tflops": flops / kernel_s / 1e12,
            "max_abs_error": float(jnp.abs(out - ref).max()), "max_abs_ref": float(jnp.abs(ref).max())}


def key(row: dict) -> tuple:
    return (row["backend"], row["m"], row["k"], row["n"], row["groups"], row["dtype"], row["pass"],
            tuple(row["tiling"]))


def write_markdown(rows: list[dict], path: Path) -> None:
    header = ("| backend | compiled | m | k | n | groups (empty) | dtype | pass | kernel ms | ragged_dot ms | "
              "speedup | kernel TFLOP/s | max abs err |")
    lines = [header, "|" + "---|" * 13]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['compiled']} | {r['m']} | {r['k']} | {r['n']} | {r['groups']} "
                     f"({r['empty_groups']}) | {r['dtype']} | {r['pass']} | {1e3 * r['kernel_s']:.3f} | "
                     f"{1e3 * r['ragged_dot_s']:.3f} | {r['speedup']:.2f} | {r['kernel_tflops']:.3f} | "
                     f"{r['max_abs_error']:.2e} |")
    best = {}
    for r in rows:
        size = (r["backend"], r["m"], r["k"], r["n"], r["groups"], r["dtype"], r["pass"])
        if size not in best or r["kernel_s"] < best[size]["kernel_s"]:
            best[size] = r
    summary = ["| backend | m | k | n | groups | dtype | pass | best tiling (m, k, n, warps, stages) | kernel ms | "
               "ragged_dot ms | speedup |", "|" + "---|" * 11]
    summary += [f"| {r['backend']} | {r['m']} | {r['k']} | {r['n']} | {r['groups']} | {r['dtype']} | "
                f"{r['pass']} | "
                f"{tuple(r['tiling'])} | {1e3 * r['kernel_s']:.3f} | {1e3 * r['ragged_dot_s']:.3f} | "
                f"{r['speedup']:.2f} |" for r in best.values()]
    atomic_write(path, "Median times (jax.block_until_ready); speedup = ragged_dot time / kernel time.\n\n"
                    "Fastest tiling per size:\n\n" + "\n".join(summary) + "\n\nEvery run:\n\n"
                    + "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dtype", default=None, help="default bfloat16 on GPU, float32 elsewhere")
    parser.add_argument("--tiling", type=int, nargs=5, default=None, metavar=("TM", "TK", "TN", "WARPS", "STAGES"),
                        help="one tiling (default: the GPU sweep on GPU, 64 64 128 elsewhere)")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_kernels.json")
    args = parser.parse_args(argv)

    compiled = compiled_backend()
    sizes = (GPU_SIZES[:2] if args.quick else GPU_SIZES) if compiled else TINY_SIZES[: 1 if args.quick else 2]
    dtype = args.dtype or ("bfloat16" if compiled else "float32")
    if args.tiling:
        tilings = [Tiling(*args.tiling)]
    else:
        tilings = (GPU_TILINGS[:2] if args.quick else GPU_TILINGS) if compiled else [Tiling(64, 64, 128)]
    repeats = 3 if args.quick else args.repeats
    rows = read_results(args.out, [], valid=lambda rows: all(key(r) for r in rows))
    done = {key(r) for r in rows}
    jobs = [(i, size, tiling, backward) for i, size in enumerate(sizes) for tiling in tilings
            for backward in (False, True)]
    for i, size, tiling, backward in tqdm(jobs, desc=f"grouped matmul on {jax.default_backend()}"):
        probe = {"backend": jax.default_backend(), "m": size[0], "k": size[1], "n": size[2], "groups": size[3],
                 "dtype": dtype, "pass": "backward" if backward else "forward", "tiling": list(tiling)}
        if key(probe) in done:
            continue
        rows.append(bench_row(size, dtype, tiling, repeats, seed=i, backward=backward))
        write_json(rows, args.out)  # after every row: a killed run loses at most the row in flight
    write_markdown(rows, args.out.with_suffix(".md"))
    print(args.out.with_suffix(".md").read_text())
    return rows


if __name__ == "__main__":
    main()
