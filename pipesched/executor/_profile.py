"""Profiler: time F, B, W, R (of every remat option) and RW of every stage on the current devices
and measure the bytes each microbatch keeps, producing a pipeline instance (durations in
microseconds, memory in bytes).

Two ways to time an op. Alone (`stage_times`): the op's own jitted function. In the program
(`program_stage_times`, the default): the op as the compiled pipeline runs it, one lock-step tick
of a calibration program for the same placement, with the tick's slot reads and writes, the zero
outputs of the pools it does not write, the gradient accumulation and the neighbour exchange. The
executed form predicts a lock-step program from the latter: a tick lasts as long as its slowest
action, and every action's duration already holds the fixed cost of a tick (the idle tick, reported
by `program_tick_times`), which is several times an op of a few ms on a CPU."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pipesched.executor._compile import AXIS, build_program, make_mesh, stack_params
from pipesched.executor._models import REMAT_OPTIONS, ModelConfig, StagedModel, make_batch, make_model
from pipesched.executor._plan import BRANCH, CHECKPOINT, GRADS, IN, LOCAL, OUT, RES, STASH, Plan, make_plan
from pipesched.executor._stage_ops import (
    StageKind,
    backward,
    checkpoint_forward,
    forward_residuals,
    op_inputs,
    recompute,
    stage_layout,
    weight_grad,
)
from pipesched.pipeline import Action, PipelineInstance, Stage, simulate
from pipesched.pipeline._model import RematOption


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
    """Bytes per microbatch of one stage kind under the executor's storage: VJP residuals, the W
    stash (op inputs and op output gradients, split backward), the stage input, the checkpoint of
    every remat option (option 0: the stage input) and what a backward-pass recompute keeps
    between B and RW (the op output gradients and the stage input)."""

    def __init__(self, model: StagedModel, stage: int, split: bool):
        kind = StageKind.of(model, stage)
        batch = make_batch(model.config, 1)
        hidden = jax.ShapeDtypeStruct(model.hidden_shape, jnp.float32)
        layout = stage_layout(kind, model.params[stage], hidden, batch.inputs[0], batch.targets[0], split)
        self.residual = nbytes(layout.stored)
        taps = nbytes(kind.taps) if split else 0
        self.stash = nbytes(kind.inputs) + taps if split else 0
        self.hidden = 0 if stage == 0 else nbytes(hidden)
        self.checkpoints = (min(self.hidden, self.activation),) + tuple(nbytes(c) for c in layout.checkpoints[1:])
        self.wgrad_checkpoint = min(taps + self.hidden, self.stash) if split else 0

    @property
    def activation(self) -> int:
        return self.residual + self.stash


def stage_times(model: StagedModel, stage: int, split: bool, repeats: int = 5) -> dict[str, float]:
    """Seconds of F, B, W, R (`R:k`: of remat option k > 0) and, split, RW of one stage on one
    microbatch (default device)."""
    kind, params = StageKind.of(model, stage), model.params[stage]
    batch = make_batch(model.config, 1)
    x, y = batch.inputs[0], batch.targets[0]
    h = jnp.ones(model.hidden_shape, jnp.float32)
    layout = stage_layout(kind, params, jax.ShapeDtypeStruct(h.shape, h.dtype), x, y, split)

    def fwd(p, h):
        out, kept = forward_residuals(kind, p, h, x, y, split)
        return out, [a for k in kept for a in k.residuals], [a for k in kept for a in k.inputs]

    out, stored, inputs = jax.jit(fwd)(params, h)
    g = jnp.ones_like(out)
    bwd = jax.jit(lambda p, stored: backward(kind, layout, stored, p, g, split))
    times = {"F": median_time(jax.jit(fwd), params, h, repeats=repeats),
             "B": median_time(bwd, params, stored, repeats=repeats)}
    times["R"] = times["F"]
    for k in range(1, len(kind.options)):
        saved = jax.jit(lambda p, h, k=k: checkpoint_forward(kind, k, p, h, x, y, split)[1])(params, h)
        again = jax.jit(lambda p, h, saved, k=k: recompute(kind, k, layout, p, h, x, y, saved, split))
        times[f"R:{k}"] = median_time(again, params, h, saved, repeats=repeats)
    times["W"] = 0.0
    if split:
        dtaps = bwd(params, stored)[1]
        wgrad = jax.jit(lambda p, inputs, dtaps: weight_grad(kind, p, inputs, dtaps))
        inputs = jax.tree.unflatten(jax.tree.structure(kind.inputs), inputs)
        times["W"] = median_time(wgrad, params, inputs, dtaps, repeats=repeats)
        times["RW"] = median_time(jax.jit(lambda p, h: op_inputs(kind, p, h, x, y)), params, h, repeats=repeats)
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


def tick_times(program, params, batch, ticks: int = 6, repeats: int = 3,
               rows: dict[int, np.ndarray] | None = None) -> dict[int, float]:
    """Seconds of one tick of every branch the plan's table uses (idle included), measured in the
    compiled program itself: all devices run that branch in lock step, with the program's slot
    traffic and neighbour exchanges. Runs of `ticks` and 2 * `ticks` ticks are timed in pairs and
    the median difference is taken, so the fixed cost of launching the program cancels out.
    `rows` (branch -> one table row) times those rows instead of the table's own."""
    table = program.plan.table
    if rows is None:
        rows = {b: table[tuple(np.argwhere(table[:, :, BRANCH] == b)[0])] for b in np.unique(table[:, :, BRANCH])}
    times = {}
    for branch, row in rows.items():
        short, long = (jax.device_put(np.broadcast_to(row, (table.shape[0], n, table.shape[2])).copy(),
                                      program.param_sharding) for n in (ticks, 2 * ticks))
        jax.block_until_ready((program.with_table(params, batch, short), program.with_table(params, batch, long)))
        extra = [_seconds(program.with_table, params, batch, long) - _seconds(program.with_table, params, batch, short)
                 for _ in range(repeats)]  # in pairs: a change of the machine's load hits both runs of a pair
        times[int(branch)] = max(float(np.median(extra)), 0.0) / ticks
    return times


def _seconds(fn: Callable, *args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def calibration_plan(placement: Sequence[int], split_backward: bool, num_options: int = 1,
                     backward_recompute: bool = False) -> Plan:
    """The plan of one microbatch run stage by stage: the program it compiles to has every branch
    and exchange of the programs of this placement (with `num_options` remat options and, split,
    RW when `backward_recompute`), with the fewest slots."""
    num_devices = max(placement) + 1
    options = ((0, 1),) * num_options if num_options > 1 else None
    stages = tuple(Stage(d, 1, 1, int(split_backward), 1, wgrad_stash=int(split_backward), remat_options=options,
                         RW=1 if backward_recompute else None) for d in placement)
    instance = PipelineInstance(num_devices, 1, stages, split_backward=split_backward,
                                allow_remat=num_options > 1 or backward_recompute)
    order = [[Action(s, "F", 0) for s in mine] + [Action(s, "B", 0) for s in reversed(mine)]
             + [Action(s, "W", 0) for s in mine if split_backward] for mine in instance.stages_of_device]
    return make_plan(simulate(instance, order).schedule)


def calibration_rows(plan: Plan) -> dict[int, np.ndarray]:
    """Per branch of the program (idle, and every op of `plan.ops` of every stage kind), a table
    row running it on the first local stage with slot 0 of every pool, keeping nothing."""
    rows = {}
    for c in range(len(plan.kinds)):
        for op in plan.ops:
            if op == "W" and not plan.split_backward:
                continue
            row = np.zeros(plan.table.shape[2], np.int32)
            row[[BRANCH, LOCAL, IN, RES, STASH, GRADS, CHECKPOINT]] = plan.branch_index(c, op), 0, 0, 0, 0, 0, 0
            row[OUT:] = plan.hidden_slots  # the trash slot
            rows[int(row[BRANCH])] = row
    idle = np.zeros(plan.table.shape[2], np.int32)
    idle[OUT:] = plan.hidden_slots
    return {0: idle, **rows}


def program_tick_times(config: ModelConfig, placement: Sequence[int], split_backward: bool, *, ticks: int = 6,
                       repeats: int = 3, seed: int = 0, num_options: int = 1, backward_recompute: bool = False
                       ) -> tuple[Plan, dict[int, float]]:
    """Seconds of one lock-step tick of each branch (`tick_times`) in the calibration program of
    `placement` (`calibration_plan`): the plan, and branch -> seconds (branch 0: the idle tick)."""
    plan = calibration_plan(placement, split_backward, num_options, backward_recompute)
    model = make_model(config, len(placement), seed)
    batch = make_batch(config, 1, seed)
    program = build_program(plan, model, batch, make_mesh(plan.num_devices))
    params = jax.device_put(stack_params(plan, model, model.params), program.param_sharding)
    batch = jax.device_put(batch, program.batch_sharding)
    return plan, tick_times(program, params, batch, ticks, repeats, rows=calibration_rows(plan))


def program_stage_times(config: ModelConfig, placement: Sequence[int], split_backward: bool, *, ticks: int = 6,
                        repeats: int = 3, num_options: int = 1, backward_recompute: bool = False
                        ) -> list[dict[str, float]]:
    """Per stage, seconds of F, B, W, R and the ops of the calibration plan's other branches (`R:k`
    of remat option k, RW) as ticks of the compiled program (`program_tick_times`): each includes
    the fixed cost of a tick, so the executed form's ticks last as the program's."""
    plan, times = program_tick_times(config, placement, split_backward, ticks=ticks, repeats=repeats,
                                     num_options=num_options, backward_recompute=backward_recompute)
    ops = ("F", "B", "W", "R") + tuple(op for op in plan.ops if op == "RW" or op.startswith("R:"))
    return [{op: times[plan.branch_index(c, op)] if split_backward or op != "W" else 0.0 for op in ops}
            for c in plan.kind_of]


def tick_prediction(plan, times: dict[int, float]) -> float:
    """Seconds of the lock-step program: every tick lasts as long as its slowest device's branch."""
    return float(sum(max(times[int(b)] for b in plan.table[:, t, BRANCH]) for t in range(plan.ticks)))


def profile_instance(config: ModelConfig, placement: Sequence[int], num_microbatches: int, *,
                     split_backward: bool = False, allow_remat: bool = False, remat_options: bool = False,
                     backward_recompute: bool = False, memory_limit: float | None = None, repeats: int = 5,
                     name: str | None = None, in_program: bool = True) -> PipelineInstance:
    """Measure the model cut into len(placement) stages and return its pipeline instance.

    Durations are integer microseconds (at least 1), memory integer bytes: activation = VJP
    residuals (+ the W stash when split), wgrad_stash = op inputs and output gradients kept for W,
    checkpoint = the stage input a rematerialized microbatch keeps. `memory_limit` is in bytes.
    `remat_options`: every stage gets the model's remat options (`REMAT_OPTIONS`, formats.md 1.4),
    each with its measured checkpoint bytes and recompute time; `backward_recompute` (split
    backward only): the measured RW and its wgrad_checkpoint. Either implies `allow_remat`.
    Stages of one kind (first / middle / last) share a structure, so each kind is timed once.
    `in_program` times the ops as ticks of the compiled program (`program_stage_times`); the
    neighbour exchange is part of every tick there, so `comm` is 0. Otherwise each op is timed
    alone (`stage_times`) and `comm` is one exchange of a hidden state (`comm_time`).
    """
    if backward_recompute and not split_backward:
        raise ValueError("backward_recompute needs split_backward: RW rebuilds what W needs")
    num_devices = max(placement) + 1
    model = make_model(config, len(placement))
    num_options = len(REMAT_OPTIONS[config.name]) if remat_options else 1
    if in_program:
        times = program_stage_times(config, placement, split_backward, repeats=repeats, num_options=num_options,
                                    backward_recompute=backward_recompute)
        comm = 0
    else:
        alone = {}
        times = [_memo(alone, model.kind(s), lambda s=s: stage_times(model, s, split_backward, repeats))
                 for s in range(len(placement))]
        comm = max(1, round(comm_time(model, num_devices, repeats) * 1e6)) if num_devices > 1 else 0
    memory = {}
    stages = []
    for s, device in enumerate(placement):
        mem = _memo(memory, model.kind(s), lambda s=s: StageMemory(model, s, split_backward))
        us = {op: max(1, round(t * 1e6)) for op, t in times[s].items()}
        options = tuple(RematOption(c, us[f"R:{k}" if k else "R"]) for k, c in enumerate(mem.checkpoints)
                        ) if remat_options else None
        stages.append(Stage(device=device, F=us["F"], B=us["B"], W=us["W"] if split_backward else 0,
                            activation=mem.activation, wgrad_stash=mem.stash, R=us["R"],
                            checkpoint=mem.checkpoints[0], remat_options=options,
                            RW=us["RW"] if backward_recompute else None,
                            wgrad_checkpoint=mem.wgrad_checkpoint if backward_recompute else 0))
    allow_remat = allow_remat or remat_options or backward_recompute
    return PipelineInstance(num_devices, num_microbatches, tuple(stages), comm=comm, memory_limit=memory_limit,
                            split_backward=split_backward, allow_remat=allow_remat,
                            name=name or f"{config.name}-P{num_devices}-S{len(placement)}-M{num_microbatches}")


def _memo(cache: dict, key, make: Callable):
    """cache[key], made on first use."""
    if key not in cache:
        cache[key] = make()
    return cache[key]
