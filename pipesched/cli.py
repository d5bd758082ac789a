"""`pipesched` command line. Exit codes: 0 ok, 1 invalid schedule or deadlock, 2 bad input."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pipesched._common import FormatError, PipeschedError, ValidationError
from pipesched._io import load, validate
from pipesched.pipeline import (
    PipelineInstance,
    PipelineSchedule,
    format_grid,
    gantt,
    load_program,
    save_chrome_trace,
    simulate,
    torch_csv,
)

EXIT_INVALID, EXIT_BAD_INPUT = 1, 2


def _error(message: object) -> None:
    """One `error:` line on stderr (a newline inside a file name or value is folded)."""
    print("error: " + " ".join(str(message).splitlines()), file=sys.stderr)


def _validate(args: argparse.Namespace) -> int:
    """OK lines on stdout; one `error:` line per bad file on stderr, as every command prints them."""
    code = 0
    for path in args.files:
        try:
            check = validate(load(path))
            print(f"OK {path}: {check.kind}: {check.summary}")
        except FormatError as e:
            _error(e)
            code = EXIT_BAD_INPUT
        except ValidationError as e:
            _error(f"{path}: invalid: {e}")
            code = max(code, EXIT_INVALID)
    return code


def _load_schedule(path: str) -> PipelineSchedule:
    schedule = load(path)
    if not isinstance(schedule, PipelineSchedule):
        raise FormatError(f"{path}: format: expected a pipeline schedule, got {type(schedule).__name__}")
    return schedule


def _show_outputs(schedule: PipelineSchedule, args: argparse.Namespace) -> None:
    print(format_grid(schedule, args.width))
    if args.png:
        print(f"wrote {gantt(schedule, args.png)}")
    if args.trace:
        print(f"wrote {save_chrome_trace(schedule, args.trace)} (open it in ui.perfetto.dev)")


def _show(args: argparse.Namespace) -> int:
    schedule = _load_schedule(args.schedule)
    validate(schedule)
    _show_outputs(schedule, args)
    return 0


def _simulate(args: argparse.Namespace) -> int:
    instance = PipelineInstance.load(args.instance)
    result = simulate(instance, load_program(args.program))
    _show_outputs(result.schedule, args)
    peaks = ", ".join(f"{p:g}" for p in result.memory.peaks)
    print(f"peak memory per device [{peaks}]; "
          + ("fits the memory limit" if result.fits_memory else "EXCEEDS the memory limit"))
    if args.out:
        result.schedule.save(args.out)
        print(f"wrote {args.out}")
    return 0 if result.fits_memory else EXIT_INVALID


def _export(args: argparse.Namespace) -> int:
    schedule = _load_schedule(args.schedule)
    validate(schedule)
    from pipesched._common import atomic_write  # temp file + fsync + os.replace: never a partial CSV

    atomic_write(Path(args.out), torch_csv(schedule))
    print(f"wrote {args.out}")
    return 0


SOLVE_KINDS = ("pipeline", "remat", "placement")


def _solve(args: argparse.Namespace) -> int:
    from pipesched import solvers

    solve: Callable = getattr(solvers, f"solve_{args.kind}")
    instance = load(args.instance)
    expected = {"pipeline": "PipelineInstance", "remat": "RematInstance", "placement": "PlacementInstance"}
    if type(instance).__name__ != expected[args.kind]:
        raise FormatError(f"{args.instance}: format: expected a {args.kind} instance, got {type(instance).__name__}")
    extra = {}
    if args.fix_order is not None:
        if args.kind != "pipeline":
            raise FormatError("--fix-order: only pipeline instances have an order to fix")
        extra["order"] = args.fix_order
    result = solve(instance, solver=args.solver, time_limit=args.time_limit, workers=args.workers,
                   seed=args.seed, progress=not args.quiet, **extra)
    check = validate(result.schedule)
    print(f"{args.kind} {result.schedule.solver if extra else args.solver}: {check.summary} "
          f"({result.solve_time:.2f} s)")
    if extra and result.order_lower_bound is not None:
        print(f"order {args.fix_order}: lower bound {result.order_lower_bound:g} for every schedule keeping it")
    if extra and result.status == "unknown" and not result.interrupted:
        proof = solvers.order_infeasibility_proof(instance, args.fix_order)
        print(f"order {args.fix_order}: " + (f"no schedule keeping it fits the memory limit: {proof}" if proof else
                                             "no schedule keeping it fits the memory limit within the time limit"))
    if result.status == "infeasible" and args.kind == "pipeline":
        print(f"infeasible: {solvers.infeasibility_proof(instance)}")
    if args.out:
        result.schedule.save(args.out)  # atomic: an old file is replaced only by a complete one
        if not result.interrupted:
            print(f"wrote {args.out}")
    if result.interrupted:  # Ctrl-C: the solver stopped and returned its best result so far
        bound = "none" if result.lower_bound is None else f"{result.lower_bound:g}"
        objective = {"pipeline": "makespan", "remat": "cost", "placement": "cost"}[args.kind]
        found = f", {objective} {result.objective:g}" if result.status in ("optimal", "feasible") else ""
        print(f"interrupted: {'wrote best result so far to ' + args.out if args.out else 'best result so far'} "
              f"({result.status}{found}, bound {bound})", file=sys.stderr)
        return 130  # 128 + SIGINT, as shells report a Ctrl-C
    return 0


def _placement_for(solver: str, devices: int, microbatches: int, split_backward: bool | None
                   ) -> tuple[tuple[int, ...], bool]:
    """(stage placement, split_backward) of the instance `solver` runs on. A zoo schedule gets the
    first of the V, interleaved (2 chunks) and linear placements it can be built on (`zoo.supports`),
    with `split_backward` as given, or fused when None and it allows, else split; the other solvers
    get one stage per device. A given `split_backward` the schedule cannot run with is an error."""
    from pipesched.pipeline import zoo

    if solver not in zoo.ZOO:
        return zoo.linear_placement(devices), bool(split_backward)
    placements = (zoo.v_placement(devices), zoo.interleaved_placement(devices, 2), zoo.linear_placement(devices))
    for split in (False, True) if split_backward is None else (split_backward, not split_backward):
        for placement in placements:
            shape = zoo.uniform_instance(devices, microbatches, 1, 1, int(split), placement=placement,
                                         split_backward=split)
            if not zoo.supports(solver, shape):
                continue
            if split_backward is not None and split != split_backward:
                flag = "--split-backward" if split_backward else "--no-split-backward"
                raise FormatError(f"{flag}: {solver} needs split_backward={split}; got P={devices}, "
                                  f"placement {list(placement)}; drop the flag")
            return placement, split
    return zoo.linear_placement(devices), bool(split_backward)  # none fits: solving says why


def _run(args: argparse.Namespace) -> int:
    import contextlib

    if args.devices < 1:
        raise FormatError(f"--devices: must be >= 1, got {args.devices}")
    if args.data_parallel < 1:
        raise FormatError(f"--data-parallel: must be >= 1, got {args.data_parallel}")
    if args.schedule:  # a bad schedule file is refused before JAX starts
        schedule = _load_schedule(args.schedule)
        validate(schedule)
        if schedule.instance.num_devices != args.devices:
            raise FormatError(f"{args.schedule}: instance.num_devices: the schedule is for "
                              f"{schedule.instance.num_devices} devices, --devices is {args.devices}")
    import jax

    with contextlib.suppress(RuntimeError):  # CPU only, before the backend starts (a started one keeps its devices)
        jax.config.update("jax_num_cpu_devices", args.devices * args.data_parallel)
    from pipesched import executor
    from pipesched._common import write_json
    from pipesched.solvers import solve_pipeline

    config = executor.ModelConfig(args.model)
    if args.schedule:
        inst = schedule.instance
        timing = executor.profile_instance(config, [st.device for st in inst.stages], inst.num_microbatches,
                                           split_backward=inst.split_backward, allow_remat=inst.allow_remat,
                                           remat_options=any(st.remat_options is not None for st in inst.stages),
                                           backward_recompute=bool(schedule.backward_recomputed))
        name = args.schedule
    else:
        microbatches = args.microbatches or 2 * args.devices
        placement, split = _placement_for(args.solver, args.devices, microbatches, args.split_backward)
        timing = executor.profile_instance(config, placement, microbatches, split_backward=split,
                                           allow_remat=args.allow_remat)
        if args.memory_limit is not None:
            timing = timing.replace(memory_limit=tuple(
                args.memory_limit * sum(timing.stages[s].activation for s in stages)
                for stages in timing.stages_of_device))
        result = solve_pipeline(timing, args.solver, time_limit=args.time_limit, progress=True)
        if result.status == "infeasible":
            from pipesched.solvers import infeasibility_proof

            raise FormatError(f"--memory-limit: infeasible: {infeasibility_proof(timing)}")
        schedule, name = result.schedule, args.solver
        print(f"solved {timing.name} with {args.solver}: makespan {result.objective:g} us, "
              f"lower bound {result.lower_bound:g} us, {result.status}")
    report = executor.run(schedule, model=config, steps=args.steps, timing=timing, schedule_name=name,
                          data_parallel=args.data_parallel, progress=True)
    write_json(report, args.report)
    times = sorted(report["step_time_s"])
    median = times[len(times) // 2] if times else float("nan")
    print(f"loss {report['loss']:.6f} (reference {report['reference_loss']:.6f}), max |grad error| "
          f"{report['max_abs_grad_error']:.2e}; median step {median * 1e3:.2f} ms, predicted "
          f"{report['predicted_step_time_s'] * 1e3:.2f} ms; wrote {args.report}")
    return 0


def _solver_help() -> str:
    from pipesched.solvers import PIPELINE_SOLVERS, PLACEMENT_SOLVERS, REMAT_SOLVERS

    return (f"pipeline: {', '.join(PIPELINE_SOLVERS)}; remat: {', '.join(REMAT_SOLVERS)}; "
            f"placement: {', '.join(PLACEMENT_SOLVERS)} (default greedy)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipesched", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="validate instance / schedule / placement files of any kind")
    p.add_argument("files", nargs="+")
    p.set_defaults(run=_validate)

    def view_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--png", help="write a Gantt chart with memory curves (.png or .pdf)")
        p.add_argument("--trace", help="write a Chrome/Perfetto trace JSON")
        p.add_argument("--width", type=int, default=120, help="max columns of the text grid")

    p = sub.add_parser("show", help="print a pipeline schedule as a grid; optional chart and trace")
    p.add_argument("schedule")
    view_options(p)
    p.set_defaults(run=_show)

    p = sub.add_parser("simulate", help="time a per-device program (CSV, one row per device)")
    p.add_argument("instance")
    p.add_argument("program")
    p.add_argument("--out", help="write the timed schedule (formats.md 1.2)")
    view_options(p)
    p.set_defaults(run=_simulate)

    p = sub.add_parser("export", help="export a schedule to another tool's format")
    p.add_argument("target", choices=["torch"], help="torch: torch.distributed.pipelining compute-only CSV")
    p.add_argument("schedule")
    p.add_argument("out")
    p.set_defaults(run=_export)

    p = sub.add_parser("solve", help="solve a pipeline, remat or placement instance")
    p.add_argument("kind", choices=SOLVE_KINDS)
    p.add_argument("instance")
    p.add_argument("--solver", default="greedy", help=_solver_help())
    p.add_argument("--time-limit", type=float, default=30.0, help="seconds (CP-SAT and other anytime solvers)")
    p.add_argument("--workers", type=int, default=2, help="CP-SAT search workers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the result file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--fix-order", metavar="ORDER",
                   help="pipeline: keep this per-device order (a named schedule such as zb-h1, a program CSV "
                        "or a schedule JSON) and choose only the remat and the timing")
    p.set_defaults(run=_solve)

    p = sub.add_parser("run", help="run a pipeline schedule with the JAX executor; write a run report")
    p.add_argument("--model", choices=["gpt-tiny", "mlp"], default="gpt-tiny")
    p.add_argument("--devices", type=int, required=True, help="pipeline devices P (P host devices on CPU)")
    p.add_argument("--data-parallel", type=int, default=1,
                   help="D copies of the pipeline on shards of the data (D x P devices)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--schedule", help="a pipeline schedule file for P devices")
    source.add_argument("--solver", help="profile the model, solve with this solver, run the result")
    p.add_argument("--memory-limit", type=float, help="with --solver: activations per device (K microbatches)")
    p.add_argument("--microbatches", type=int, help="with --solver: M (default 2P)")
    p.add_argument("--split-backward", action=argparse.BooleanOptionalAction,
                   help="with --solver: split B and W, or not (default: what the solver's schedule needs)")
    p.add_argument("--allow-remat", action="store_true", help="with --solver: allow recomputation")
    p.add_argument("--time-limit", type=float, default=10.0, help="with --solver: seconds")
    p.add_argument("--steps", type=int, default=10, help="timed training steps")
    p.add_argument("--report", required=True, help="run report to write (formats.md section 4)")
    p.set_defaults(run=_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # file names and ids that are not valid text still print
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except PipeschedError as e:  # exit 2 for bad input, 1 for a failed check (each class says)
        _error(e)
        return e.exit_code
    except KeyboardInterrupt:  # (a solver's Ctrl-C returns its best result: `_solve`)
        print("interrupted: nothing written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `pipesched ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
