"""Compile a plan into ONE jitted SPMD program over a mesh with a `pipe` axis (jax.shard_map).

Each device scans over the ticks of its row of the action table; a tick runs one `lax.switch`
branch (idle, or F / Fr / B / W / R of a stage kind) and then moves the tick's output to the
neighbour devices with one `lax.ppermute` per device shift. Values live in fixed slot pools:
`hidden` (stage inputs in transit or kept for R, gradients waiting for B, plus a trash slot),
per kind `residual` (VJP residuals from F or R until B) and `stash` (op inputs and output
gradients from F/R and B until W). Parameters of the stages of one kind are stacked per device.

The pools never enter the switch: a tick reads the slots it needs, the branch returns new values
(zeros where it has none), and the pools are updated in place after the switch, each write masked
by what the branch produces. A pool threaded through `lax.switch` would be copied by XLA (its
conditional does not alias operands to results), doubling the memory of every slot.
"""

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

from pipesched.executor._models import Batch, StagedModel
from pipesched.executor._plan import BRANCH, IN, LOCAL, MICROBATCH, OPS, OUT, RES, STASH, Plan
from pipesched.executor._stage_ops import (ResidualLayout, StageKind, forward, full_vjp, input_vjp,
                                            join_residuals, residual_layout, split_residuals, weight_grad)

AXIS = "pipe"
Leaves = list  # the leaves of a pytree, in jax.tree.leaves order


class Carry(NamedTuple):
    """The scan state of one device; every pool is a list of arrays with a leading slot axis."""

    hidden: jax.Array  # [hidden_slots + 1, *hidden_shape]
    residual: tuple[Leaves, ...]  # per kind: one pool per stored VJP residual
    stash_inputs: tuple[Leaves, ...]  # per kind: one pool per op input (split backward)
    stash_grads: tuple[Leaves, ...]  # per kind: one pool per op output gradient (split backward)
    grads: tuple[Leaves, ...]  # per kind: parameter gradients, [local stages, ...] per leaf
    loss: jax.Array


class Emit(NamedTuple):
    """What a branch produces; per kind, zeros for the kinds it does not run."""

    out: jax.Array  # the hidden state or input gradient sent on
    loss: jax.Array
    residual: tuple[Leaves, ...]
    stash_inputs: tuple[Leaves, ...]
    stash_grads: tuple[Leaves, ...]
    grads: tuple[Leaves, ...]


class Reads(NamedTuple):
    """The slots a tick reads, per kind (residuals for B, stash for W)."""

    residual: tuple[Leaves, ...]
    stash_inputs: tuple[Leaves, ...]
    stash_grads: tuple[Leaves, ...]


def make_mesh(num_devices: int, devices=None) -> Mesh:
    devices = jax.devices()[:num_devices] if devices is None else devices
    if len(devices) < num_devices:
        raise ValueError(f"need {num_devices} devices, JAX sees {len(jax.devices())}: on CPU set "
                         f"jax.config.update('jax_num_cpu_devices', {num_devices}) before using JAX")
    return Mesh(np.asarray(devices[:num_devices]), (AXIS,))


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
    """The compiled pipeline: `grads(stacked_params, batch) -> (loss, stacked_grads)`, jitted."""

    plan: Plan
    mesh: Mesh
    grads: Callable
    param_sharding: NamedSharding
    replicated: NamedSharding


class _Shapes(NamedTuple):
    """Per kind, the shapes of one slot of each pool and of one stage's parameters."""

    hidden: jax.ShapeDtypeStruct
    residual: tuple[Leaves, ...]
    stash_inputs: tuple[Leaves, ...]
    stash_grads: tuple[Leaves, ...]
    grads: tuple[Leaves, ...]

    def zeros(self, field: str) -> list[Leaves]:
        return [[_zeros(a) for a in kind] for kind in getattr(self, field)]


def _zeros(a) -> jax.Array:
    return jnp.zeros(a.shape, a.dtype)


def _shapes(plan: Plan, model: StagedModel, kinds: list[StageKind], layouts: list[ResidualLayout]) -> _Shapes:
    split = plan.split_backward
    leaves = jax.tree.leaves
    return _Shapes(
        hidden=jax.ShapeDtypeStruct(model.hidden_shape, jnp.float32),
        residual=tuple(list(lay.stored) for lay in layouts),
        stash_inputs=tuple(leaves(k.inputs) if split else [] for k in kinds),
        stash_grads=tuple(leaves(k.taps) if split else [] for k in kinds),
        grads=tuple(leaves(model.params[plan.kind_of.index(c)]) for c in range(len(kinds))))


def build_program(plan: Plan, model: StagedModel, batch_shapes: Batch, mesh: Mesh) -> PipelineProgram:
    """Build the SPMD program of `plan` for `model` (stages of a kind share one structure)."""
    kinds = [StageKind.of(model, plan.kind_of.index(c)) for c in range(len(plan.kinds))]
    split = plan.split_backward
    hidden = jax.ShapeDtypeStruct(model.hidden_shape, jnp.float32)
    x0 = jax.ShapeDtypeStruct(batch_shapes.inputs.shape[1:], batch_shapes.inputs.dtype)
    y0 = jax.ShapeDtypeStruct(batch_shapes.targets.shape[1:], batch_shapes.targets.dtype)
    layouts = [residual_layout(k, model.params[plan.kind_of.index(c)], hidden, x0, y0, split)
               for c, k in enumerate(kinds)]
    shapes = _shapes(plan, model, kinds, layouts)
    param_trees = [jax.tree.structure(model.params[plan.kind_of.index(c)]) for c in range(len(kinds))]

    branches, writers = [_idle(shapes)], [-np.ones(4, np.int32)]
    for c, kind in enumerate(kinds):
        for op in OPS:
            branches.append(_branch(op, c, kind, layouts[c], param_trees[c], plan.kinds[c][1], split,
                                    plan.num_microbatches, shapes) if split or op != "W" else _idle(shapes))
            writers.append(_writer(op, c, split))
    writer_table = np.stack(writers)  # [branch, (residual, stash inputs, stash grads, grads)] -> kind or -1
    P_ = plan.num_devices
    num_kinds = len(kinds)

    def per_device(params, table, inputs, targets):
        params = tuple(jax.tree.leaves(jax.tree.map(lambda a: a[0], p)) for p in params)
        carry = Carry(
            hidden=jnp.zeros((plan.hidden_slots + 1, *hidden.shape), hidden.dtype),
            residual=tuple(_pools(shapes.residual[c], plan.residual_slots[c]) for c in range(num_kinds)),
            stash_inputs=tuple(_pools(shapes.stash_inputs[c], plan.stash_slots[c]) for c in range(num_kinds)),
            stash_grads=tuple(_pools(shapes.stash_grads[c], plan.stash_slots[c]) for c in range(num_kinds)),
            grads=tuple([jnp.zeros_like(a) for a in p] for p in params),
            loss=jnp.zeros((), jnp.float32))
        writes = jnp.asarray(writer_table)

        def tick(carry: Carry, row):
            m = row[MICROBATCH]
            reads = Reads(tuple(_read(pool, row[RES]) for pool in carry.residual),
                          tuple(_read(pool, row[STASH]) for pool in carry.stash_inputs),
                          tuple(_read(pool, row[STASH]) for pool in carry.stash_grads))
            emit = lax.switch(row[BRANCH], branches, carry.hidden[row[IN]], inputs[m], targets[m], params,
                              reads, row[LOCAL])
            writer = writes[row[BRANCH]]
            carry = Carry(
                hidden=_send(carry.hidden, emit.out, row, plan.shifts, P_),
                residual=tuple(_write(carry.residual[c], row[RES], emit.residual[c], writer[0] == c)
                               for c in range(num_kinds)),
                stash_inputs=tuple(_write(carry.stash_inputs[c], row[STASH], emit.stash_inputs[c], writer[1] == c)
                                   for c in range(num_kinds)),
                stash_grads=tuple(_write(carry.stash_grads[c], row[STASH], emit.stash_grads[c], writer[2] == c)
                                  for c in range(num_kinds)),
                grads=tuple(_accumulate(carry.grads[c], row[LOCAL], emit.grads[c], writer[3] == c)
                            for c in range(num_kinds)),
                loss=carry.loss + emit.loss)
            return carry, None

        carry, _ = lax.scan(tick, carry, table[0])
        grads = tuple(jax.tree.unflatten(tree, [a[None] for a in g]) for tree, g in zip(param_trees, carry.grads))
        return lax.psum(carry.loss, AXIS), grads

    sharded, replicated = NamedSharding(mesh, P(AXIS)), NamedSharding(mesh, P())
    program = jax.shard_map(per_device, mesh=mesh, in_specs=(P(AXIS), P(AXIS), P(), P()),
                            out_specs=(P(), P(AXIS)), check_vma=False)

    @jax.jit
    def grads(params, batch: Batch):
        return program(params, plan.table, batch.inputs, batch.targets)  # the table is a constant

    return PipelineProgram(plan, mesh, grads, sharded, replicated)


def _pools(shapes: Leaves, slots: int) -> Leaves:
    return [jnp.zeros((max(1, slots), *a.shape), a.dtype) for a in shapes]


def _read(pool: Leaves, slot) -> Leaves:
    return [lax.dynamic_index_in_dim(a, slot, keepdims=False) for a in pool]


def _write(pool: Leaves, slot, values: Leaves, enabled) -> Leaves:
    """Write `values` to `slot` when `enabled` (in place: the slot keeps its value otherwise)."""
    return [lax.dynamic_update_index_in_dim(a, jnp.where(enabled, v, a[slot]), slot, 0) for a, v in zip(pool, values)]


def _accumulate(grads: Leaves, local, values: Leaves, enabled) -> Leaves:
    return [lax.dynamic_update_index_in_dim(a, a[local] + jnp.where(enabled, v, 0), local, 0)
            for a, v in zip(grads, values)]


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


def _idle(shapes: _Shapes) -> Callable:
    def run(h, x, y, params, reads, local) -> Emit:
        return _emit(shapes)
    return run


def _emit(shapes: _Shapes, c: int | None = None, out=None, loss=None, **fields) -> Emit:
    """An Emit with the given fields of kind c and zeros elsewhere."""
    def per_kind(name):
        values = shapes.zeros(name)
        if name in fields:
            values[c] = fields[name]
        return tuple(values)
    return Emit(_zeros(shapes.hidden) if out is None else out,
                jnp.zeros((), jnp.float32) if loss is None else loss,
                per_kind("residual"), per_kind("stash_inputs"), per_kind("stash_grads"), per_kind("grads"))


def _branch(op: str, c: int, kind: StageKind, layout: ResidualLayout, param_tree, last: bool, split: bool, M: int,
            shapes: _Shapes) -> Callable:
    """The lax.switch branch running `op` of a stage of kind c."""
    leaves = jax.tree.leaves

    def sent(out) -> dict:
        """A forward's output: the last stage's loss is averaged, a hidden state is sent on."""
        return {"loss": out / M} if last else {"out": out}

    def run(h, x, y, params, reads: Reads, local) -> Emit:
        p = jax.tree.unflatten(param_tree, [a[local] for a in params[c]])
        if op == "Fr":
            return _emit(shapes, c, **sent(forward(kind, p, h, x, y)))
        if op in ("F", "R"):
            stash = {}
            if split:
                out, vjp_fn, inputs = input_vjp(kind, p, h, x, y)
                stash = {"stash_inputs": leaves(inputs)}
            else:
                out, vjp_fn = full_vjp(kind, p, h, x, y)
            stored = split_residuals(vjp_fn, p)[1]
            return _emit(shapes, c, residual=stored, **stash, **(sent(out) if op == "F" else {}))
        if op == "B":
            vjp_fn = join_residuals(layout, reads.residual[c], p)
            g = jnp.asarray(1.0 / M, jnp.float32) if last else h
            if split:
                dh, dtaps = vjp_fn(g)
                return _emit(shapes, c, out=dh, stash_grads=leaves(dtaps))
            dp, dh = vjp_fn(g)
            return _emit(shapes, c, out=dh, grads=leaves(dp))
        inputs = jax.tree.unflatten(jax.tree.structure(kind.inputs), reads.stash_inputs[c])
        dtaps = jax.tree.unflatten(jax.tree.structure(kind.taps), reads.stash_grads[c])
        return _emit(shapes, c, grads=leaves(weight_grad(kind, p, inputs, dtaps)))

    return run
