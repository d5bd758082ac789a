"""Profiler: time F, B, W, R of every stage on the current devices and measure the bytes each
microbatch keeps, producing a pipeline instance (durations in microseconds, memory in bytes)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pipesched.executor._compile import AXIS, make_mesh
from pipesched.executor._models import ModelConfig, StagedModel, make_batch, make_model
from pipesched.executor._plan import BRANCH
from pipesched.executor._stage_ops import (
    StageKind,
    full_vjp,
    input_vjp,
    join_residuals,
    residual_layout,
    split_residuals,
    weight_grad,
)
from pipesched.pipeline import PipelineInstance, Stage


def nbytes(tree) -> int:
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


def median_time(fn: Callable, *args, repeats: int = 5) -> float:
    """Median wall time (seconds) of a compiled call, after one warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


class StageMemory:
    """Bytes per microbatch of one stage kind under the executor's storage."""

    def __init__(self, model: StagedModel, stage: int, split: bool):
        kind = StageKind.of(model, stage)
        batch = make_batch(model.config, 1)
        hidden = jax.ShapeDtypeStruct(model.hidden_shape, jnp.float32)
        layout = residual_layout(kind, model.params[stage], hidden, batch.inputs[0], batch.targets[0], split)
        self.residual = nbytes(layout.stored)
        self.stash = nbytes((kind.inputs, kind.taps)) if split else 0
        self.hidden = 0 if stage == 0 else nbytes(hidden)

    @property
    def activation(self) -> int:
        return self.residual + self.stash


def stage_times(model: StagedModel, stage: int, split: bool, repeats: int = 5) -> dict[str, float]:
    """Seconds of F, B, W, R of one stage on one microbatch (default device)."""
    kind, params = StageKind.of(model, stage), model.params[stage]
    batch = make_batch(model.config, 1)
    x, y = batch.inputs[0], batch.targets[0]
    h = jnp.ones(model.hidden_shape, jnp.float32)
    layout = residual_layout(kind, params, jax.ShapeDtypeStruct(h.shape, h.dtype), x, y, split)

    def fwd(p, h):
        out, vjp_fn, *inputs = input_vjp(kind, p, h, x, y) if split else full_vjp(kind, p, h, x, y)
        return out, split_residuals(vjp_fn, p)[1], inputs

    out, stored, inputs = jax.jit(fwd)(params, h)
    g = jnp.ones_like(out)
    bwd = jax.jit(lambda p, stored: join_residuals(layout, stored, p)(g))
    times = {"F": median_time(jax.jit(fwd), params, h, repeats=repeats),
             "B": median_time(bwd, params, stored, repeats=repeats)}
    times["R"] = times["F"]
    if split:
        dtaps = bwd(params, stored)[1]
        wgrad = jax.jit(lambda p, inputs, dtaps: weight_grad(kind, p, inputs, dtaps))
        times["W"] = median_time(wgrad, params, inputs[0], dtaps, repeats=repeats)
    else:
        times["W"] = 0.0
    return times


def comm_time(model: StagedModel, num_devices: int, repeats: int = 5) -> float:
    """Seconds of one neighbour exchange of a hidden state over the `pipe` axis."""
    if num_devices < 2:
        return 0.0
    mesh = make_mesh(num_devices)
    perm = [(d, (d + 1) % num_devices) for d in range(num_devices)]
    send = jax.jit(jax.shard_map(lambda a: lax.ppermute(a, AXIS, perm), mesh=mesh,
                                 in_specs=jax.sharding.PartitionSpec(AXIS),
                                 out_specs=jax.sharding.PartitionSpec(AXIS)))
    return median_time(send, jnp.zeros((num_devices, *model.hidden_shape)), repeats=repeats)


def tick_times(program, params, batch, ticks: int = 6, repeats: int = 3) -> dict[int, float]:
    """Seconds of one tick of every branch the plan's table uses (idle included), measured in the
    compiled program itself: all devices run that branch in lock step, with the program's slot
    traffic and neighbour exchanges. Runs of `ticks` and 2 * `ticks` ticks are timed and
    subtracted, so the fixed cost of launching the program cancels out."""
    table = program.plan.table
    times = {}
    for branch in np.unique(table[:, :, BRANCH]).tolist():
        device, tick = np.argwhere(table[:, :, BRANCH] == branch)[0]
        runs = []
        for n in (ticks, 2 * ticks):
            repeated = np.broadcast_to(table[device, tick], (table.shape[0], n, table.shape[2])).copy()
            sharded = jax.device_put(repeated, program.param_sharding)
            runs.append(median_time(program.with_table, params, batch, sharded, repeats=repeats))
        times[branch] = max(runs[1] - runs[0], 0.0) / ticks
    return times


def tick_prediction(plan, times: dict[int, float]) -> float:
    """Seconds of the lock-step program: every tick lasts as long as its slowest device's branch."""
    return float(sum(max(times[int(b)] for b in plan.table[:, t, BRANCH]) for t in range(plan.ticks)))


def profile_instance(config: ModelConfig, placement: Sequence[int], num_microbatches: int, *,
                     split_backward: bool = False, allow_remat: bool = False,
                     memory_limit: float | None = None, repeats: int = 5, name: str | None = None
                     ) -> PipelineInstance:
    """Measure the model cut into len(placement) stages and return its pipeline instance.

    Durations are integer microseconds (at least 1), memory integer bytes: activation = VJP
    residuals (+ the W stash when split), wgrad_stash = op inputs and output gradients kept for W,
    checkpoint = the stage input a rematerialized microbatch keeps. `memory_limit` is in bytes.
    Stages of one kind (first / middle / last) share a structure, so each kind is timed once.
    """
    num_devices = max(placement) + 1
    model = make_model(config, len(placement))
    measured: dict[tuple[bool, bool], tuple[dict[str, float], StageMemory]] = {}
    stages = []
    for s, device in enumerate(placement):
        kind = model.kind(s)
        if kind not in measured:
            measured[kind] = (stage_times(model, s, split_backward, repeats), StageMemory(model, s, split_backward))
        times, memory = measured[kind]
        us = {op: max(1, round(t * 1e6)) for op, t in times.items()}
        stages.append(Stage(device=device, F=us["F"], B=us["B"], W=us["W"] if split_backward else 0,
                            activation=memory.activation, wgrad_stash=memory.stash, R=us["R"],
                            checkpoint=min(memory.hidden, memory.activation)))
    comm = max(1, round(comm_time(model, num_devices, repeats) * 1e6)) if num_devices > 1 else 0
    return PipelineInstance(num_devices, num_microbatches, tuple(stages), comm=comm, memory_limit=memory_limit,
                            split_backward=split_backward, allow_remat=allow_remat,
                            name=name or f"{config.name}-P{num_devices}-S{len(placement)}-M{num_microbatches}")
