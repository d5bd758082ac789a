"""The executor under `jax.distributed`: N processes of D CPU devices each on localhost, gloo
collectives. The same compiled program runs over the global mesh of N*D devices.

`distributed_grads` writes the schedule to a temporary folder, starts one worker process per
rank (`python -m pipesched.executor._distributed ...`), waits for them under `supervise` (which
kills the others and raises `ProcessFailure` as soon as one dies or the time is up, so nothing
hangs) and returns rank 0's loss and per-stage gradients.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipesched._common import atomic_target
from pipesched.executor._models import ModelConfig
from pipesched.pipeline import PipelineSchedule


class ProcessFailure(RuntimeError):
    """A worker process died, failed or ran out of time; the others were killed."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_commands(schedule_path: Path, config: ModelConfig, out_path: Path, *, num_processes: int,
                    devices_per_process: int, port: int, seed: int = 0) -> list[list[str]]:
    """The command line of every rank."""
    return [[sys.executable, "-m", "pipesched.executor._distributed", "--schedule", str(schedule_path),
             "--config", json.dumps(dataclasses.asdict(config)), "--out", str(out_path), "--seed", str(seed),
             "--process-id", str(rank), "--num-processes", str(num_processes),
             "--devices-per-process", str(devices_per_process), "--port", str(port)]
            for rank in range(num_processes)]


def supervise(commands: Sequence[Sequence[str]], timeout_s: float, log_dir: Path) -> None:
    """Run the commands together; return when all exit 0. If one exits non-zero or `timeout_s`
    passes, kill the rest and raise ProcessFailure with the failing process's last output."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # workers set their own device count
    env["JAX_PLATFORMS"] = "cpu"
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(open(Path(log_dir) / f"rank{rank}.log", "w+")) for rank in range(len(commands))]
        procs = [subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, env=env)
                 for cmd, log in zip(commands, logs)]
        stack.callback(_stop, procs)
        deadline = time.monotonic() + timeout_s
        while True:
            codes = [p.poll() for p in procs]
            failed = next((rank for rank, code in enumerate(codes) if code not in (None, 0)), None)
            if failed is not None:
                raise ProcessFailure(f"process {failed} of {len(procs)} exited with code {codes[failed]}; "
                                     f"the others were stopped. Its output ends:\n{_tail(logs[failed])}")
            if all(code == 0 for code in codes):
                return
            if time.monotonic() > deadline:
                raise ProcessFailure(f"processes still running after {timeout_s:g} s were stopped; "
                                     f"raise timeout_s if the machine is slow. Rank 0 output ends:\n{_tail(logs[0])}")
            time.sleep(0.1)


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _tail(log, chars: int = 2000) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-chars:]


def distributed_grads(schedule: PipelineSchedule, model: ModelConfig, *, num_processes: int = 2,
                      devices_per_process: int = 4, seed: int = 0, timeout_s: float = 300.0
                      ) -> tuple[float, list[list[np.ndarray]]]:
    """Loss and per-stage gradient leaves of `schedule` run by `num_processes` processes of
    `devices_per_process` CPU devices each (the schedule needs at most their product devices)."""
    if schedule.instance.num_devices > num_processes * devices_per_process:
        raise ValueError(f"the schedule needs {schedule.instance.num_devices} devices; "
                         f"{num_processes} x {devices_per_process} give fewer")
    with tempfile.TemporaryDirectory(prefix="pipesched-dist-") as tmp:
        folder = Path(tmp)
        schedule.save(folder / "schedule.json")
        commands = worker_commands(folder / "schedule.json", model, folder / "grads.npz", num_processes=num_processes,
                                   devices_per_process=devices_per_process, port=free_port(), seed=seed)
        supervise(commands, timeout_s, folder)
        with np.load(folder / "grads.npz") as data:
            return float(data["loss"]), _stage_leaves(data, schedule.instance.num_stages)


def _stage_leaves(data, num_stages: int) -> list[list[np.ndarray]]:
    return [[data[f"{s}:{i}"] for i in range(sum(k.startswith(f"{s}:") for k in data.files))]
            for s in range(num_stages)]


def _worker(args: argparse.Namespace) -> None:
    """One rank: join the job, compile and run the schedule, rank 0 saves loss and gradients."""
    import jax
    from jax.experimental import multihost_utils

    from pipesched.executor._compile import unstack
    from pipesched.executor._run import compile_pipeline

    jax.config.update("jax_num_cpu_devices", args.devices_per_process)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{args.port}", args.num_processes, args.process_id,
                               initialization_timeout=120)
    schedule = PipelineSchedule.load(args.schedule)
    pipeline = compile_pipeline(schedule, ModelConfig(**json.loads(args.config)), seed=args.seed)
    loss, grads = pipeline.program.grads(pipeline.params, pipeline.batch)
    grads = multihost_utils.process_allgather(grads, tiled=True)
    loss = float(loss.addressable_data(0))  # replicated on every device
    if args.process_id == 0:
        per_stage = unstack(pipeline.program.plan, grads)
        arrays = {f"{s}:{i}": np.asarray(a) for s, g in enumerate(per_stage) for i, a in enumerate(jax.tree.leaves(g))}
        with atomic_target(args.out) as temp, open(temp, "wb") as f:  # never a partial file to read
            np.savez(f, loss=loss, **arrays)
    jax.distributed.shutdown()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one rank of a distributed pipesched executor run")
    parser.add_argument("--schedule", required=True)
    parser.add_argument("--config", required=True, help="ModelConfig fields as JSON")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--devices-per-process", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    _worker(parser.parse_args(argv))


if __name__ == "__main__":
    main()
