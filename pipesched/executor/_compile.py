"""Compile a plan into ONE jitted SPMD program over a mesh with a `pipe` axis (jax.shard_map).

Each device scans over the ticks of its row of the action table; a tick runs one `lax.switch`
branch (idle, or F / Fr / B / W / R of a stage kind) and then moves the tick's output to the
neighbour devices with one `lax.ppermute` per device shift. Values live in fixed slot pools:
`hidden` (stage inputs in transit or kept for R, gradients waiting for B, plus a trash slot),
per kind `residual` (VJP residuals from F or R until B) and `stash` (op inputs and output
gradients from F/R and B until W). Parameters of the stages of one kind are stacked per device.
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


class Carry(NamedTuple):
    hidden: jax.Array  # [hidden_slots + 1, *hidden_shape]
    residual: tuple  # per kind: list of [slots, ...] pools, one per stored residual leaf
    stash: tuple  # per kind: (inputs pools, tap-gradient pools) as nnx.State of [slots, ...]
    grads: tuple  # per kind: nnx.State of [local stages, ...]
    loss: jax.Array


def make_mesh(num_devices: int, devices=None) -> Mesh:
    devices = jax.devices()[:num_devices] if devices is None else devices
    if len(devices) < num_devices:
        raise ValueError(f"need {num_devices} devices, JAX sees {len(jax.devices())}: on CPU set "
                         f"jax.config.update('jax_num_cpu_devices', {num_devices}) before using JAX")
    return Mesh(np.asarray(devices[:num_devices]), (AXIS,))


def stack_params(plan: Plan, model: StagedModel, params: tuple[nnx.State, ...]) -> tuple[nnx.State, ...]:
    """Per kind, the parameters of each device's stages stacked as [P, local stages, ...] (zero padded)."""
    stacked = []
    for c, per_device in enumerate(plan.local):
        template = params[plan.kind_of.index(c)]
        rows = [[params[s] for s in stages] + [jax.tree.map(jnp.zeros_like, template)] *
                (plan.local_count(c) - len(stages)) for stages in per_device]
        stacked.append(jax.tree.map(lambda *leaves: jnp.stack(leaves).reshape(
            plan.num_devices, plan.local_count(c), *leaves[0].shape), *[p for row in rows for p in row]))
    return tuple(stacked)


def unstack(plan: Plan, stacked: tuple[nnx.State, ...]) -> tuple[nnx.State, ...]:
    """Inverse of stack_params: per stage its slice."""
    out = []
    for s, c in enumerate(plan.kind_of):
        d = next(d for d, stages in enumerate(plan.local[c]) if s in stages)
        j = plan.local[c][d].index(s)
        out.append(jax.tree.map(lambda a: a[d, j], stacked[c]))
    return tuple(out)


class PipelineProgram(NamedTuple):
    """The compiled pipeline: `grads(stacked_params, batch) -> (loss, stacked_grads)`, jitted."""

    plan: Plan
    mesh: Mesh
    grads: Callable
    param_sharding: NamedSharding
    replicated: NamedSharding


def build_program(plan: Plan, model: StagedModel, batch_shapes: Batch, mesh: Mesh) -> PipelineProgram:
    """Build the SPMD program of `plan` for `model` (stages of a kind share one structure)."""
    kinds = [StageKind.of(model, plan.kind_of.index(c)) for c in range(len(plan.kinds))]
    split = plan.split_backward
    hidden = jax.ShapeDtypeStruct(model.hidden_shape, jnp.float32)
    x0 = jax.ShapeDtypeStruct(batch_shapes.inputs.shape[1:], batch_shapes.inputs.dtype)
    y0 = jax.ShapeDtypeStruct(batch_shapes.targets.shape[1:], batch_shapes.targets.dtype)
    layouts = [residual_layout(k, model.params[plan.kind_of.index(c)], hidden, x0, y0, split)
               for c, k in enumerate(kinds)]
    def idle(carry, row, x, y, params):
        return carry, jnp.zeros(hidden.shape, hidden.dtype)

    branches = [idle]
    for c, kind in enumerate(kinds):
        last = plan.kinds[c][1]
        branches += [_branch(op, c, kind, layouts[c], last, split, plan.num_microbatches, hidden)
                     if split or op != "W" else idle for op in OPS]
    table = jnp.asarray(plan.table)
    P_ = plan.num_devices

    def per_device(params, table, inputs, targets):
        params = jax.tree.map(lambda a: a[0], params)
        carry = Carry(
            hidden=jnp.zeros((plan.hidden_slots + 1, *hidden.shape), hidden.dtype),
            residual=tuple([jnp.zeros((max(1, n), *a.shape), a.dtype) for a in lay.stored]
                           for n, lay in zip(plan.residual_slots, layouts)),
            stash=tuple((_pool(kinds[c].inputs, n), _pool(kinds[c].taps, n)) if split else ()
                        for c, n in enumerate(plan.stash_slots)),
            grads=tuple(jax.tree.map(jnp.zeros_like, p) for p in params),
            loss=jnp.zeros((), jnp.float32))

        def tick(carry, row):
            m = row[MICROBATCH]
            carry, out = lax.switch(row[BRANCH], branches, carry, row, inputs[m], targets[m], params)
            buf = carry.hidden.at[row[OUT]].set(out)
            for i, shift in enumerate(plan.shifts):
                received = lax.ppermute(out, AXIS, [(d, (d + shift) % P_) for d in range(P_)])
                buf = buf.at[row[OUT + 1 + i]].set(received)
            return carry._replace(hidden=buf), None

        carry, _ = lax.scan(tick, carry, table[0])
        return lax.psum(carry.loss, AXIS), jax.tree.map(lambda a: a[None], carry.grads)

    sharded, replicated = NamedSharding(mesh, P(AXIS)), NamedSharding(mesh, P())
    program = jax.shard_map(per_device, mesh=mesh, in_specs=(P(AXIS), P(AXIS), P(), P()),
                            out_specs=(P(), P(AXIS)), check_vma=False)
    table = jax.device_put(table, sharded)

    @jax.jit
    def grads(params, batch: Batch):
        return program(params, table, batch.inputs, batch.targets)

    return PipelineProgram(plan, mesh, grads, sharded, replicated)


def _pool(template: nnx.State, slots: int) -> nnx.State:
    return jax.tree.map(lambda a: jnp.zeros((max(1, slots), *a.shape), a.dtype), template)


def _read(pool, slot):
    return jax.tree.map(lambda a: a[slot], pool)


def _write(pool, slot, value):
    return jax.tree.map(lambda a, v: a.at[slot].set(v), pool, value)


def _branch(op: str, c: int, kind: StageKind, layout: ResidualLayout, last: bool, split: bool, M: int,
            hidden: jax.ShapeDtypeStruct) -> Callable:
    """The lax.switch branch running `op` of a stage of kind c."""
    zeros = jnp.zeros(hidden.shape, hidden.dtype)

    def replace(tup, value):
        return tup[:c] + (value,) + tup[c + 1:]

    def run(carry: Carry, row, x, y, params):
        p = jax.tree.map(lambda a: a[row[LOCAL]], params[c])
        h = carry.hidden[row[IN]]
        if op == "Fr":
            out = forward(kind, p, h, x, y)
            return _emit(carry, out, last, M, zeros)
        if op in ("F", "R"):
            if split:
                out, vjp_fn, inputs = input_vjp(kind, p, h, x, y)
                stash_in, stash_g = carry.stash[c]
                carry = carry._replace(stash=replace(carry.stash, (_write(stash_in, row[STASH], inputs), stash_g)))
            else:
                out, vjp_fn = full_vjp(kind, p, h, x, y)
            stored = split_residuals(vjp_fn, p)[1]
            carry = carry._replace(residual=replace(carry.residual, _write(carry.residual[c], row[RES], stored)))
            return _emit(carry, out, last, M, zeros) if op == "F" else (carry, zeros)
        if op == "B":
            vjp_fn = join_residuals(layout, _read(carry.residual[c], row[RES]), p)
            g = jnp.asarray(1.0 / M, jnp.float32) if last else h
            if split:
                dh, dtaps = vjp_fn(g)
                stash_in, stash_g = carry.stash[c]
                carry = carry._replace(stash=replace(carry.stash, (stash_in, _write(stash_g, row[STASH], dtaps))))
            else:
                dp, dh = vjp_fn(g)
                carry = _accumulate(carry, c, row[LOCAL], dp)
            return carry, dh
        # W
        stash_in, stash_g = carry.stash[c]
        dp = weight_grad(kind, p, _read(stash_in, row[STASH]), _read(stash_g, row[STASH]))
        return _accumulate(carry, c, row[LOCAL], dp), zeros

    return run


def _emit(carry: Carry, out: jax.Array, last: bool, M: int, zeros: jax.Array):
    """A forward's output: the loss (last stage) is summed, a hidden state is sent on."""
    if last:
        return carry._replace(loss=carry.loss + out / M), zeros
    return carry, out


def _accumulate(carry: Carry, c: int, j, dp: nnx.State) -> Carry:
    grads = jax.tree.map(lambda a, g: a.at[j].add(g), carry.grads[c], dp)
    return carry._replace(grads=carry.grads[:c] + (grads,) + carry.grads[c + 1:])
