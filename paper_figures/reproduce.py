"""Reproduce every paper figure into paper_figures/out/.

    python paper_figures/reproduce.py --quick     # minutes on 2 CPU cores
    python paper_figures/reproduce.py             # the full sweeps

JAX runs on a simulated 8-device CPU mesh unless real accelerators are present. Each figure module
(`fig_*.py` beside this file) exposes `make_figures(out_dir, quick) -> list[Path]`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

FIGURE_MODULES = ["fig_pipeline", "fig_pipeline_remat", "fig_remat", "fig_remat_memory", "fig_placement", "fig_executor"]


def default_shared() -> Path:
    return Path(os.environ.get("PIPESCHED_SHARED", HERE.parent.parent / "shared"))


def validate_public_instances(shared: Path) -> int:
    import pipesched

    files = sorted((shared / "instances").glob("*/*.json"))
    if not files:
        raise SystemExit(f"no public instances under {shared / 'instances'}: set PIPESCHED_SHARED")
    for f in files:
        pipesched.validate(pipesched.load(f))
    return len(files)


def one_f_one_b_figure(shared: Path, out: Path) -> list[Path]:
    """1F1B on the public instance whose memory limit is the classic 1F1B peak."""
    from pipesched.pipeline import PipelineInstance, gantt, save_chrome_trace, validate_pipeline
    from pipesched.pipeline.zoo import zoo_schedule

    instance = PipelineInstance.load(shared / "instances" / "pipeline" / "p02_1f1b_memory.json")
    result = zoo_schedule(instance, "1f1b")
    validate_pipeline(result.schedule)
    return [gantt(result.schedule, out / "1f1b_p02.png"),
            save_chrome_trace(result.schedule, out / "1f1b_p02.trace.json")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short sweeps (minutes on 2 cores)")
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("--shared", type=Path, default=default_shared(), help="the shared/ folder")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    import jax
    from tqdm import tqdm

    print(f"JAX backend {jax.default_backend()} with {jax.device_count()} devices; output in {args.out}")
    steps = [("validate public instances", lambda: tqdm.write(f"{validate_public_instances(args.shared)} files valid")),
             ("1F1B on p02_1f1b_memory", lambda: one_f_one_b_figure(args.shared, args.out))]
    for name in FIGURE_MODULES:
        steps.append((name, lambda name=name: importlib.import_module(name).make_figures(args.out, args.quick)))
    t0 = time.perf_counter()
    for title, step in tqdm(steps, desc="figures", unit="step"):
        t = time.perf_counter()
        written = step() or []
        tqdm.write(f"{title}: {time.perf_counter() - t:.1f} s" + "".join(f"\n  wrote {p}" for p in written))
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
