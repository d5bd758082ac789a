"""Compile a plan into ONE jitted SPMD program over a (`data`, `pipe`) mesh (jax.shard_map).

Along `pipe` the devices run the schedule; along `data` whole copies of the pipeline run on
disjoint shards of every microbatch (data parallelism on top), and the loss and gradients are
averaged over `data` at the end (a mean of equal-size shard means is the whole batch's mean).

Each device scans over the ticks of its row of the action table; a tick runs one `lax.switch`
branch (idle, or an op of a stage kind: `Plan.ops`, `_branches`) and then moves the tick's output
to the neighbour devices with one `lax.ppermute` per device shift. Values live in fixed slot pools,
each with a trash slot: `hidden` (stage inputs in transit or kept for R or RW, gradients waiting for
B), `residual` (VJP residuals from F or R until B), `checkpoint` (what Fr of a remat option k > 0
keeps until R) and the W stash, split backward: `stash_inputs` (op inputs from F/R until W, or
until B and again from RW until W) and `stash_grads` (op output gradients until W). Parameters of
the stages of one kind are stacked per device.

A device's pools hold the packed values (flat float32) of all its stages, so a pool has as many
slots as the device's peak number of live microbatches, each as large as the largest stage kind's
values. The switch gets the pools, reads the slots of its tick inside the branch (a slot read before
the switch would be copied every tick, used or not) and returns the packed values to keep; the pools
are updated in place after the switch (the write goes to the trash slot when there is nothing to
keep). A pool updated inside `lax.switch` would be copied by XLA (its conditional does not alias
operands to results), doubling the memory of every slot."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pipesched.executor._branches import POOLS, Emit, Layout, applies, branch, idle, make_layout, writer
from pipesched.executor._models import Batch, StagedModel, make_batch
from pipesched.executor._plan import BRANCH, CHECKPOINT, GRADS, IN, LOCAL, MICROBATCH, OUT, RES, STASH, Plan, op_option
from pipesched.executor._stage_ops import Leaves, StageKind, StageLayout, stage_layout

AXIS = "pipe"
DATA = "data"
class Carry(NamedTuple):
    """The scan state of one device. Pools are [slots + 1, ...]; the last slot is the trash slot
    that writes of a tick with nothing to keep go to."""

    hidden: jax.Array  # [hidden_slots + 1, *hidden_shape]
    residual: jax.Array  # [residual slots + 1, largest packed VJP residuals of a stage kind]
    checkpoint: jax.Array  # [checkpoint slots + 1, largest packed checkpoint of a remat option k > 0]
    stash_inputs: jax.Array  # [stash slots + 1, largest packed op inputs] (split backward)
    stash_grads: jax.Array  # [grad slots + 1, largest packed op output gradients] (split backward)
    grads: tuple[Leaves, ...]  # per kind: parameter gradients, [local stages, ...] per leaf
    loss: jax.Array


def make_mesh(num_devices: int, devices=None, data_parallel: int = 1) -> Mesh:
    """A `data_parallel` x `num_devices` mesh (`data`, `pipe`) of the first devices of `devices`."""
    if data_parallel < 1:
        raise ValueError(f"data_parallel must be >= 1, got {data_parallel}")
    total = num_devices * data_parallel
    devices = jax.devices() if devices is None else devices
    if len(devices) < total:
        raise ValueError(f"need {total} devices ({data_parallel} x {num_devices}), {len(devices)} available: on CPU "
                         f"set jax.config.update('jax_num_cpu_devices', {total}) before using JAX")
    return Mesh(np.asarray(devices[:total]).reshape(data_parallel, num_devices), (DATA, AXIS))


def stack_params(plan: Plan, model: StagedModel, params: tuple[nnx.State, ...]) -> tuple[nnx.State, ...]:
    """Per kind, the parameters of each device's stages stacked as [P, local stages, ...] (zero padded)."""
    host = jax.device_get(params)  # stacked on the host: no per-op compilation

    def stack(c: int, per_device: tuple[tuple[int, ...], ...]) -> nnx.State:
        padding = jax.tree.map(np.zeros_like, host[plan.kind_of.index(c)])
        rows = [[host[s] for s in stages] + [padding] * (plan.local_count(c) - len(stages)) for stages in per_device]
        shape = (plan.num_devices, plan.local_count(c))
        return jax.tree.map(lambda *leaves: np.stack(leaves).reshape(*shape, *leaves[0].shape),
                            *[p for row in rows for p in row])
    return tuple(stack(c, per_device) for c, per_device in enumerate(plan.local))


def unstack(plan: Plan, stacked: tuple[nnx.State, ...]) -> tuple[nnx.State, ...]:
    """Inverse of stack_params: per stage its slice."""
    def stage(s: int, c: int) -> nnx.State:
        d = next(d for d, stages in enumerate(plan.local[c]) if s in stages)
        j = plan.local[c][d].index(s)
        return jax.tree.map(lambda a: a[d, j], stacked[c])
    return tuple(stage(s, c) for s, c in enumerate(plan.kind_of))


class PipelineProgram(NamedTuple):
    """The compiled pipeline: `grads(stacked_params, batch) -> (loss, stacked_grads)`, jitted;
    `with_table(stacked_params, batch, table)` runs the same ticks from another action table of
    the plan's columns (used to time single actions in the program's own machinery)."""

    plan: Plan
    mesh: Mesh
    grads: Callable
    param_sharding: NamedSharding
    batch_sharding: NamedSharding
    with_table: Callable


def _kinds(plan: Plan, model: StagedModel) -> list[StageKind]:
    return [StageKind.of(model, plan.kind_of.index(c)) for c in range(len(plan.kinds))]


def _stage_layouts(plan: Plan, model: StagedModel, kinds: list[StageKind], batch_shapes: Batch | None = None
                   ) -> list[StageLayout]:
    batch = make_batch(model.config, 1) if batch_shapes is None else batch_shapes
    hidden = jax.ShapeDtypeStruct(model.hidden_shape, jnp.float32)
    x0 = jax.ShapeDtypeStruct(batch.inputs.shape[1:], batch.inputs.dtype)
    y0 = jax.ShapeDtypeStruct(batch.targets.shape[1:], batch.targets.dtype)
    return [stage_layout(k, model.params[plan.kind_of.index(c)], hidden, x0, y0, plan.split_backward)
            for c, k in enumerate(kinds)]


def _layout(plan: Plan, model: StagedModel, kinds: list[StageKind], stages: list[StageLayout]) -> Layout:
    params = [model.params[plan.kind_of.index(c)] for c in range(len(kinds))]
    return make_layout(model.hidden_shape, kinds, stages, params, plan.split_backward)


def slot_bytes(plan: Plan, model: StagedModel) -> dict[str, int]:
    """Bytes of one slot of each pool of the program built for `plan` (`stash`: both W stash pools)."""
    kinds = _kinds(plan, model)
    layout = _layout(plan, model, kinds, _stage_layouts(plan, model, kinds))
    split = plan.split_backward
    size = {"hidden": int(np.prod(layout.hidden.shape)) * 4, "residual": 4 * layout.length("residual"),
            "checkpoint": 4 * layout.length("checkpoint"),
            "stash_inputs": 4 * layout.length("stash_inputs") if split else 0,
            "stash_grads": 4 * layout.length("stash_grads") if split else 0}
    return {**size, "stash": size["stash_inputs"] + size["stash_grads"]}


def _check_options(plan: Plan, kinds: list[StageKind], model: StagedModel) -> None:
    """ValueError if the table runs a branch the model lacks: a remat option it does not define."""
    for b in np.unique(plan.table[:, :, BRANCH]):
        c, op = divmod(int(b) - 1, len(plan.ops))
        if b and not applies(plan.ops[op], kinds[c], plan.split_backward):
            raise ValueError(f"the schedule uses remat option {op_option(plan.ops[op])[1]} on a stage of kind "
                             f"(first, last) = {plan.kinds[c]}: model {model.config.name!r} has the remat options "
                             f"{', '.join(kinds[c].options)} (REMAT_OPTIONS)")


def build_program(plan: Plan, model: StagedModel, batch_shapes: Batch, mesh: Mesh) -> PipelineProgram:
    """Build the SPMD program of `plan` for `model` (stages of a kind share one structure) over
    `mesh` (`make_mesh`); `batch_shapes` is the whole batch, each microbatch cut into
    mesh.shape["data"] shards of the model's microbatch size."""
    kinds = _kinds(plan, model)
    _check_options(plan, kinds, model)
    split = plan.split_backward
    stages = _stage_layouts(plan, model, kinds, _shard_shapes(batch_shapes, mesh.shape[DATA]))
    layout = _layout(plan, model, kinds, stages)
    param_trees = [jax.tree.structure(model.params[plan.kind_of.index(c)]) for c in range(len(kinds))]

    branches, writers = [idle(layout)], [-np.ones(len(POOLS) + 1, np.int32)]
    for c, kind in enumerate(kinds):
        for op in plan.ops:
            branches.append(branch(op, c, kind, stages[c], param_trees[c], plan.kinds[c][1], split,
                                   plan.num_microbatches, layout) if applies(op, kind, split) else idle(layout))
            writers.append(writer(op, c, split))
    writer_table = np.stack(writers)  # [branch, (POOLS..., grads)] -> kind or -1
    P_ = plan.num_devices
    slots = {"residual": (max(plan.residual_slots), RES), "checkpoint": (max(plan.checkpoint_slots), CHECKPOINT),
             "stash_inputs": (max(plan.stash_slots, default=0), STASH),
             "stash_grads": (max(plan.grad_slots, default=0), GRADS)}  # pool -> (trash slot, table column)

    def per_device(params, table, inputs, targets):
        params = tuple(jax.tree.leaves(jax.tree.map(lambda a: a[0], p)) for p in params)
        carry = Carry(
            hidden=jnp.zeros((plan.hidden_slots + 1, *layout.hidden.shape), jnp.float32),
            **{pool: jnp.zeros((trash + 1, layout.length(pool)), jnp.float32) for pool, (trash, _) in slots.items()},
            grads=tuple([jnp.zeros_like(a) for a in kind] for kind in params),  # [local stages, ...]
            loss=jnp.zeros((), jnp.float32))
        writes = jnp.asarray(writer_table)

        def tick(carry: Carry, row):
            emit = lax.switch(row[BRANCH], [_reading(b) for b in branches], carry.hidden, inputs, targets, params,
                              *(getattr(carry, pool) for pool in POOLS), row)
            writer = writes[row[BRANCH]]
            kept = {pool: _put(getattr(carry, pool), jnp.where(writer[i] >= 0, row[slots[pool][1]], slots[pool][0]),
                               getattr(emit, pool)) for i, pool in enumerate(POOLS)}
            carry = Carry(
                hidden=_send(carry.hidden, emit.out, row, plan.shifts, P_), **kept,
                grads=tuple(_accumulate(carry.grads[c], row[LOCAL], emit.grads[c], writer[len(POOLS)] == c)
                            for c in range(len(kinds))),
                loss=carry.loss + emit.loss)
            return carry, None

        carry, _ = lax.scan(tick, carry, table[0])
        grads = tuple(jax.tree.unflatten(tree, [lax.pmean(a, DATA)[None] for a in g])
                      for tree, g in zip(param_trees, carry.grads))
        return lax.pmean(lax.psum(carry.loss, AXIS), DATA), grads

    shards = P(None, DATA)  # [microbatch, sample, ...]: each replica its samples of every microbatch
    program = jax.shard_map(per_device, mesh=mesh, in_specs=(P(AXIS), P(AXIS), shards, shards),
                            out_specs=(P(), P(AXIS)), check_vma=False)

    @jax.jit
    def grads(params, batch: Batch):
        return program(params, plan.table, batch.inputs, batch.targets)  # the table is a constant

    @jax.jit
    def with_table(params, batch: Batch, table):
        return program(params, table, batch.inputs, batch.targets)

    return PipelineProgram(plan, mesh, grads, NamedSharding(mesh, P(AXIS)), NamedSharding(mesh, shards), with_table)


def _shard_shapes(batch: Batch, data_parallel: int) -> Batch:
    """The shapes of one `data` replica's part of `batch`."""
    def shard(a):
        if a.shape[1] % data_parallel:
            raise ValueError(f"a microbatch of {a.shape[1]} samples does not split into {data_parallel} data shards")
        return jax.ShapeDtypeStruct((a.shape[0], a.shape[1] // data_parallel, *a.shape[2:]), a.dtype)
    return Batch(shard(batch.inputs), shard(batch.targets))


def _reading(run: Callable) -> Callable:
    """The branch reads its slots inside the switch: a slot read before it would be copied every
    tick, whether the branch uses it or not."""
    def read(hidden, inputs, targets, params, residual, checkpoint, stash_inputs, stash_grads, row) -> Emit:
        m = row[MICROBATCH]
        return run(hidden[row[IN]], inputs[m], targets[m], params, residual[row[RES]], checkpoint[row[CHECKPOINT]],
                   stash_inputs[row[STASH]], stash_grads[row[GRADS]], row)
    return read


def _put(pool: jax.Array, slot, value: jax.Array) -> jax.Array:
    return lax.dynamic_update_index_in_dim(pool, value, slot, 0)


def _accumulate(grads: Leaves, local, values: Leaves, enabled) -> Leaves:
    return [a.at[local].add(jnp.where(enabled, v, 0)) for a, v in zip(grads, values)]


def _send(hidden: jax.Array, out: jax.Array, row, shifts: tuple[int, ...], num_devices: int) -> jax.Array:
    """Keep the tick's output locally (slot OUT) and send it along each device shift."""
    hidden = hidden.at[row[OUT]].set(out)
    for i, shift in enumerate(shifts):
        received = lax.ppermute(out, AXIS, [(d, (d + shift) % num_devices) for d in range(num_devices)])
        hidden = hidden.at[row[OUT + 1 + i]].set(received)
    return hidden
