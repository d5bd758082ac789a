"""Executor under jax.distributed: 2 processes x 4 CPU devices (gloo on localhost) give the
single-process result; a dead or stuck process fails the run promptly instead of hanging it."""

from __future__ import annotations

import sys
import time

import jax
import numpy as np
import pytest

from pipesched.executor import (
    ModelConfig,
    ProcessFailure,
    compile_pipeline,
    distributed_grads,
    free_port,
    supervise,
    unstack,
    worker_commands,
)
from pipesched.pipeline.zoo import uniform_instance, zoo_schedule

MLP = ModelConfig("mlp", microbatch=2, width=8)


def test_two_processes_match_the_single_process_run():
    schedule = zoo_schedule(uniform_instance(8, 8, 4, 8, W=4, split_backward=True), "zb-h1").schedule
    loss, grads = distributed_grads(schedule, MLP, num_processes=2, devices_per_process=4, timeout_s=240)
    pipeline = compile_pipeline(schedule, MLP)
    single_loss, single = pipeline.program.grads(pipeline.params, pipeline.batch)
    single = [jax.tree.leaves(g) for g in unstack(pipeline.program.plan, jax.device_get(single))]
    assert abs(loss - float(single_loss)) <= 1e-6
    assert [len(g) for g in grads] == [len(g) for g in single]
    assert max(float(np.max(np.abs(a - b))) for ga, gb in zip(grads, single) for a, b in zip(ga, gb)) <= 1e-6


def test_a_dead_process_stops_the_others(tmp_path):
    """Rank 0 is a real worker (it waits for rank 1 to join the job); rank 1 dies at once."""
    zoo_schedule(uniform_instance(8, 8, 4, 8), "1f1b").schedule.save(tmp_path / "schedule.json")
    ranks = worker_commands(tmp_path / "schedule.json", MLP, tmp_path / "grads.npz", num_processes=2,
                            devices_per_process=4, port=free_port())
    dying = [sys.executable, "-c", "import sys; print('rank 1 gives up'); sys.exit(3)"]
    start = time.monotonic()
    with pytest.raises(ProcessFailure, match="process 1 of 2 exited with code 3(.|\n)*rank 1 gives up"):
        supervise([ranks[0], dying], timeout_s=60, log_dir=tmp_path)
    assert time.monotonic() - start < 30
    assert not (tmp_path / "grads.npz").exists()


def test_a_stuck_run_times_out(tmp_path):
    start = time.monotonic()
    with pytest.raises(ProcessFailure, match="still running after 1 s"):
        supervise([[sys.executable, "-c", "import time; time.sleep(120)"]], timeout_s=1, log_dir=tmp_path)
    assert time.monotonic() - start < 30
