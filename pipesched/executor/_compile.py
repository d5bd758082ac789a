"""Compile a plan into ONE jitted SPMD program over a (`data`, `pipe`) mesh (jax.shard_map).

Along `pipe` the devices run the schedule; along `data` whole copies of the pipeline run on
disjoint shards of every microbatch (data parallelism on top), and the loss and gradients are
averaged over `data` at the end (a mean of equal-size shard means is the whole batch's mean).

Each device scans over the ticks of its row of the action table; a tick runs one `lax.switch`
branch (idle, or F / Fr / B / W / R of a stage kind) and then moves the tick's output to the
neighbour devices with one `lax.ppermute` per device shift. Values live in fixed slot pools, each
with a trash slot: `hidden` (stage inputs in transit or kept for R, gradients waiting for B),
`residual` (VJP residuals from F or R until B) and `stash` (op inputs and output gradients from
F/R and B until W). Parameters of the stages of one kind are stacked per device.

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

from pipesched.executor._models import Batch, StagedModel, make_batch
from pipesched.executor._plan import BRANCH, IN, LOCAL, MICROBATCH, OPS, OUT, RES, STASH, Plan
from pipesched.executor._stage_ops import (
    ResidualLayout,
    StageKind,
    forward,
    full_vjp,
    input_vjp,
    join_residuals,
    residual_layout,
    split_residuals,
    weight_grad,
)

AXIS = "pipe"
DATA = "data"
Leaves = list  # the leaves of a pytree, in jax.tree.leaves order


class Flat(NamedTuple):
    """How a list of arrays of one stage kind packs into a flat float32 vector (one slot of a pool):
    float32 as is, other 4-byte types bit-cast, smaller types converted exactly."""

    shapes: tuple[jax.ShapeDtypeStruct, ...]

    @property
    def size(self) -> int:
        return sum(int(np.prod(a.shape)) for a in self.shapes)

    def pack(self, leaves: Leaves, length: int) -> jax.Array:
        parts = [_to_f32(a).ravel() for a in leaves]
        return jnp.pad(jnp.concatenate(parts), (0, length - self.size)) if parts else jnp.zeros(length, jnp.float32)

    def unpack(self, flat: jax.Array) -> Leaves:
        leaves, offset = [], 0
        for a in self.shapes:
            n = int(np.prod(a.shape))
            leaves.append(_from_f32(flat[offset:offset + n].reshape(a.shape), a.dtype))
            offset += n
        return leaves


def _to_f32(a: jax.Array) -> jax.Array:
    if a.dtype == jnp.float32:
        return a
    if jnp.dtype(a.dtype).itemsize == 4:
        return lax.bitcast_convert_type(a, jnp.float32)
    return a.astype(jnp.float32)


def _from_f32(a: jax.Array, dtype) -> jax.Array:
    if dtype == jnp.float32:
        return a
    if jnp.dtype(dtype).itemsize == 4:
        return lax.bitcast_convert_type(a, dtype)
    return a.astype(dtype)


class Carry(NamedTuple):
    """The scan state of one device. Pools are [slots + 1, ...]; the last slot is the trash slot
    that writes of a tick with nothing to keep go to."""

    hidden: jax.Array  # [hidden_slots + 1, *hidden_shape]
    residual: jax.Array  # [residual slots + 1, largest packed VJP residuals of a stage kind]
    stash_inputs: jax.Array  # [stash slots + 1, largest packed op inputs] (split backward)
    stash_grads: jax.Array  # [stash slots + 1, largest packed op output gradients] (split backward)
    grads: tuple[Leaves, ...]  # per kind: parameter gradients, [local stages, ...] per leaf
    loss: jax.Array


class Emit(NamedTuple):
    """What a branch produces: packed slot values (zeros when it keeps none) and, per kind, a
    parameter gradient (zeros for the kinds it does not run)."""

    out: jax.Array  # the hidden state or input gradient sent on
    loss: jax.Array
    residual: jax.Array
    stash_inputs: jax.Array
    stash_grads: jax.Array
    grads: tuple[Leaves, ...]


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


class _Layout(NamedTuple):
    """Per kind the packing of each pool's values; the pools' slot lengths; parameter shapes."""

    hidden: jax.ShapeDtypeStruct
    residual: tuple[Flat, ...]
    stash_inputs: tuple[Flat, ...]
    stash_grads: tuple[Flat, ...]
    params: tuple[Leaves, ...]

    def length(self, pool: str) -> int:
        return max(1, max(flat.size for flat in getattr(self, pool)))

    def zero_grads(self) -> tuple[Leaves, ...]:
        return tuple([_zeros(a) for a in kind] for kind in self.params)


def _zeros(a) -> jax.Array:
    return jnp.zeros(a.shape, a.dtype)


def _layout(plan: Plan, model: StagedModel, kinds: list[StageKind], residuals: list[ResidualLayout]) -> _Layout:
    def flat(tree) -> Flat:
        return Flat(tuple(jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)) for a in jax.tree.leaves(tree)))
    split = plan.split_backward
    return _Layout(
        hidden=jax.ShapeDtypeStruct(model.hidden_shape, jnp.float32),
        residual=tuple(flat(list(r.stored)) for r in residuals),
        stash_inputs=tuple(flat(k.inputs if split else []) for k in kinds),
        stash_grads=tuple(flat(k.taps if split else []) for k in kinds),
        params=tuple(jax.tree.leaves(model.params[plan.kind_of.index(c)]) for c in range(len(kinds))))


def slot_bytes(plan: Plan, model: StagedModel) -> dict[str, int]:
    """Bytes of one slot of each pool of the program built for `plan`."""
    kinds = [StageKind.of(model, plan.kind_of.index(c)) for c in range(len(plan.kinds))]
    layout = _layout(plan, model, kinds, _residual_layouts(plan, model, kinds))
    return {"hidden": int(np.prod(layout.hidden.shape)) * 4, "residual": 4 * layout.length("residual"),
            "stash": 4 * (layout.length("stash_inputs") + layout.length("stash_grads")) if plan.split_backward else 0}


def _residual_layouts(plan: Plan, model: StagedModel, kinds: list[StageKind], batch_shapes: Batch | None = None
                      ) -> list[ResidualLayout]:
    batch = make_batch(model.config, 1) if batch_shapes is None else batch_shapes
    hidden = jax.ShapeDtypeStruct(model.hidden_shape, jnp.float32)
    x0 = jax.ShapeDtypeStruct(batch.inputs.shape[1:], batch.inputs.dtype)
    y0 = jax.ShapeDtypeStruct(batch.targets.shape[1:], batch.targets.dtype)
    return [residual_layout(k, model.params[plan.kind_of.index(c)], hidden, x0, y0, plan.split_backward)
            for c, k in enumerate(kinds)]


def build_program(plan: Plan, model: StagedModel, batch_shapes: Batch, mesh: Mesh) -> PipelineProgram:
    """Build the SPMD program of `plan` for `model` (stages of a kind share one structure) over
    `mesh` (`make_mesh`); `batch_shapes` is the whole batch, each microbatch cut into
    mesh.shape["data"] shards of the model's microbatch size."""
    kinds = [StageKind.of(model, plan.kind_of.index(c)) for c in range(len(plan.kinds))]
    split = plan.split_backward
    residuals = _residual_layouts(plan, model, kinds, _shard_shapes(batch_shapes, mesh.shape[DATA]))
    layout = _layout(plan, model, kinds, residuals)
    param_trees = [jax.tree.structure(model.params[plan.kind_of.index(c)]) for c in range(len(kinds))]

    branches, writers = [_idle(layout)], [-np.ones(4, np.int32)]
    for c, kind in enumerate(kinds):
        for op in OPS:
            branches.append(_branch(op, c, kind, residuals[c], param_trees[c], plan.kinds[c][1], split,
                                    plan.num_microbatches, layout) if split or op != "W" else _idle(layout))
            writers.append(_writer(op, c, split))
    writer_table = np.stack(writers)  # [branch, (residual, stash inputs, stash grads, grads)] -> kind or -1
    P_ = plan.num_devices
    residual_trash, stash_trash = max(plan.residual_slots), max(plan.stash_slots, default=0)

    def per_device(params, table, inputs, targets):
        params = tuple(jax.tree.leaves(jax.tree.map(lambda a: a[0], p)) for p in params)
        carry = Carry(
            hidden=jnp.zeros((plan.hidden_slots + 1, *layout.hidden.shape), jnp.float32),
            residual=jnp.zeros((residual_trash + 1, layout.length("residual")), jnp.float32),
            stash_inputs=jnp.zeros((stash_trash + 1, layout.length("stash_inputs")), jnp.float32),
            stash_grads=jnp.zeros((stash_trash + 1, layout.length("stash_grads")), jnp.float32),
            grads=tuple([jnp.zeros_like(a) for a in kind] for kind in params),  # [local stages, ...]
            loss=jnp.zeros((), jnp.float32))
        writes = jnp.asarray(writer_table)

        def tick(carry: Carry, row):
            emit = lax.switch(row[BRANCH], [_reading(b) for b in branches], carry.hidden, inputs, targets, params,
                              carry.residual, carry.stash_inputs, carry.stash_grads, row)
            writer = writes[row[BRANCH]]
            carry = Carry(
                hidden=_send(carry.hidden, emit.out, row, plan.shifts, P_),
                residual=_put(carry.residual, jnp.where(writer[0] >= 0, row[RES], residual_trash), emit.residual),
                stash_inputs=_put(carry.stash_inputs, jnp.where(writer[1] >= 0, row[STASH], stash_trash),
                                  emit.stash_inputs),
                stash_grads=_put(carry.stash_grads, jnp.where(writer[2] >= 0, row[STASH], stash_trash),
                                 emit.stash_grads),
                grads=tuple(_accumulate(carry.grads[c], row[LOCAL], emit.grads[c], writer[3] == c)
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
    def read(hidden, inputs, targets, params, residual, stash_inputs, stash_grads, row) -> Emit:
        m, stash = row[MICROBATCH], row[STASH]
        return run(hidden[row[IN]], inputs[m], targets[m], params, residual[row[RES]], stash_inputs[stash],
                   stash_grads[stash], row)
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


def _writer(op: str, c: int, split: bool) -> np.ndarray:
    """Per branch, the kind whose (residual, stash inputs, stash grads, grads) it writes, or -1."""
    keeps = op in ("F", "R")
    accumulates = op == "W" or (op == "B" and not split)
    return np.array([c if keeps else -1, c if keeps and split else -1, c if op == "B" and split else -1,
                     c if accumulates else -1], np.int32)


def _idle(layout: _Layout) -> Callable:
    def run(h, x, y, params, residual, stash_inputs, stash_grads, row) -> Emit:
        return _emit(layout)
    return run


def _emit(layout: _Layout, c: int | None = None, out=None, loss=None, residual: Leaves | None = None,
          stash_inputs: Leaves | None = None, stash_grads: Leaves | None = None, grads: Leaves | None = None) -> Emit:
    """An Emit with the given values of kind c, packed, and zeros elsewhere."""
    def packed(pool: str, leaves: Leaves | None) -> jax.Array:
        length = layout.length(pool)
        return jnp.zeros(length, jnp.float32) if leaves is None else getattr(layout, pool)[c].pack(leaves, length)
    zero_grads = layout.zero_grads()
    if grads is not None:
        zero_grads = zero_grads[:c] + (grads,) + zero_grads[c + 1:]
    return Emit(_zeros(layout.hidden) if out is None else out,
                jnp.zeros((), jnp.float32) if loss is None else loss,
                packed("residual", residual), packed("stash_inputs", stash_inputs), packed("stash_grads", stash_grads),
                zero_grads)


def _branch(op: str, c: int, kind: StageKind, residual_layout: ResidualLayout, param_tree, last: bool, split: bool,
            M: int, layout: _Layout) -> Callable:
    """The lax.switch branch running `op` of a stage of kind c."""
    leaves = jax.tree.leaves

    def sent(out) -> dict:
        """A forward's output: the last stage's loss is averaged, a hidden state is sent on."""
        return {"loss": out / M} if last else {"out": out}

    def run(h, x, y, params, residual, stash_inputs, stash_grads, row) -> Emit:
        p = jax.tree.unflatten(param_tree, [a[row[LOCAL]] for a in params[c]])
        if op == "Fr":
            return _emit(layout, c, **sent(forward(kind, p, h, x, y)))
        if op in ("F", "R"):
            stash = {}
            if split:
                out, vjp_fn, inputs = input_vjp(kind, p, h, x, y)
                stash = {"stash_inputs": leaves(inputs)}
            else:
                out, vjp_fn = full_vjp(kind, p, h, x, y)
            stored = split_residuals(vjp_fn, p)[1]
            return _emit(layout, c, residual=stored, **stash, **(sent(out) if op == "F" else {}))
        if op == "B":
            stored = layout.residual[c].unpack(residual)
            vjp_fn = join_residuals(residual_layout, stored, p)
            g = jnp.asarray(1.0 / M, jnp.float32) if last else h
            if split:
                dh, dtaps = vjp_fn(g)
                return _emit(layout, c, out=dh, stash_grads=leaves(dtaps))
            dp, dh = vjp_fn(g)
            return _emit(layout, c, out=dh, grads=leaves(dp))
        inputs = jax.tree.unflatten(jax.tree.structure(kind.inputs), layout.stash_inputs[c].unpack(stash_inputs))
        dtaps = jax.tree.unflatten(jax.tree.structure(kind.taps), layout.stash_grads[c].unpack(stash_grads))
        return _emit(layout, c, grads=leaves(weight_grad(kind, p, inputs, dtaps)))

    return run
