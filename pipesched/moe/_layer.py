"""Expert-parallel MoE layer over a mesh axis "expert" that runs a placement, replicas included.

Tokens are sharded over the G devices of the axis. Each device routes its tokens, sends every
(token, chosen expert, replica) row to the device of that replica's slot with `jax.lax.all_to_all`
(a fixed per-destination capacity: static shapes), runs the rows it received through its slots
with a grouped matmul (rows sorted by slot), sends the results back and combines them with the
gates. Replica j of an expert computes the j-th slice of its hidden units (see `ExpertPlan`), so
the partial outputs of the replicas sum to the expert's output.

The receiving device also measures its work per batch of b consecutive tokens: the rows it ran,
weighted by the share of their expert its slot computes: it counts the hidden units it ran per
row, an integer, and width / h = 1/r(e) exactly. That is the device load of formats.md 3.2, so
`measured_loads` reproduces ``batch_loads`` of the routed tokens and its mean batch maximum is the
placement's cost.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from pipesched.kernels import compiled_backend, grouped_matmul, grouped_matmul_reference
from pipesched.moe._plan import ExpertPlan
from pipesched.moe._routing import MoeParams, Routing, route

AXIS = "expert"
GroupedMatmul = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


class MoeOutput(NamedTuple):
    """The layer's output (T, d), its routing, and what each device did per batch of b tokens.

    ``work[i, d]``: hidden units x rows device d ran in batch i (`measured_loads` divides by h);
    ``rows[i, d]``: rows (token copies) device d ran in batch i; ``dropped``: rows over capacity.
    """

    y: jax.Array
    routing: Routing
    work: jax.Array
    rows: jax.Array
    dropped: jax.Array


def expert_mesh(num_devices: int) -> Mesh:
    """A 1-D mesh with axis "expert" over the first `num_devices` devices."""
    devices = jax.devices()
    if num_devices > len(devices):
        raise ValueError(f"a mesh of {num_devices} devices needs {num_devices} JAX devices, found {len(devices)} "
                         f"(on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={num_devices})")
    return Mesh(np.array(devices[:num_devices]), (AXIS,))


def default_matmul() -> GroupedMatmul:
    """The Pallas kernel where the backend compiles it (GPU), else `jax.lax.ragged_dot`."""
    return grouped_matmul if compiled_backend() else grouped_matmul_reference


def slot_weights(params: MoeParams, plan: ExpertPlan) -> tuple[jax.Array, jax.Array]:
    """Per slot, its slice of its expert's weights: up (S, d, W) and down (S, W, d), zero-padded."""
    index, mask = plan.hidden_index()
    experts = np.maximum(plan.slot_expert, 0)[:, None]
    mask = jnp.asarray(mask & (plan.slot_expert >= 0)[:, None], params.up.dtype)
    up = params.up[experts, :, index] * mask[..., None]  # (S, W, d)
    down = params.down[experts, index, :] * mask[..., None]  # (S, W, d)
    return jnp.swapaxes(up, 1, 2), down


def _batch_index(token: jax.Array, num_tokens: int, batch_size: int) -> jax.Array:
    """formats.md 3.2 batches of consecutive b tokens; an incomplete last one (unless T < b) gets
    the out-of-range index T // b, which the scatter into the batches then drops."""
    return jnp.zeros_like(token) if num_tokens < batch_size else token // batch_size


def _device_step(x, experts, gates, up, down, *, plan: ExpertPlan, num_tokens: int, batch_size: int,
                 capacity: int, num_batches: int, matmul: GroupedMatmul):
    """The per-device program: dispatch, run the local slots, return, combine, measure."""
    G, C = plan.num_devices, plan.slots_per_device
    local_tokens, top_k = experts.shape
    me = jax.lax.axis_index(AXIS)

    # Dispatch: one row per (token, chosen expert, replica), placed at (destination, position).
    slots = jnp.asarray(plan.replica_slots)[experts].reshape(-1)  # (N,)
    row_token = jnp.repeat(jnp.arange(local_tokens), top_k * plan.replica_slots.shape[1])
    dest = jnp.where(slots >= 0, slots // C, G)
    per_dest = jax.nn.one_hot(dest, G, dtype=jnp.int32)
    position = ((jnp.cumsum(per_dest, axis=0) - per_dest) * per_dest).sum(axis=1)
    sent = (slots >= 0) & (position < capacity)
    dropped = jnp.sum((slots >= 0) & ~sent)
    buffer_row = jnp.where(sent, dest * capacity + position, G * capacity)

    def send(values, fill):
        buffer = jnp.full((G * capacity,) + values.shape[1:], fill, values.dtype)
        return jax.lax.all_to_all(buffer.at[buffer_row].set(values, mode="drop"), AXIS, 0, 0, tiled=True)

    recv_x = send(x[row_token], 0)
    recv_slot = send(jnp.where(slots >= 0, slots % C, -1), -1)
    recv_token = send(me * local_tokens + row_token, -1)

    # Run the received rows through the local slots, sorted by slot; invalid rows sort last and,
    # lying past the sum of the group sizes, come out as zeros.
    valid = recv_slot >= 0
    order = jnp.argsort(jnp.where(valid, recv_slot, C), stable=True)
    group_sizes = jnp.bincount(jnp.where(valid, recv_slot, C), length=C + 1)[:C].astype(jnp.int32)
    hidden = jax.nn.relu(matmul(recv_x[order], up, group_sizes))
    out_sorted = matmul(hidden, down, group_sizes)
    result = jnp.zeros_like(out_sorted).at[order].set(out_sorted)

    # Return and combine with the gates.
    back = jax.lax.all_to_all(result, AXIS, 0, 0, tiled=True)
    back = jnp.concatenate([back, jnp.zeros_like(back[:1])])[buffer_row]
    row_gate = jnp.repeat(gates.reshape(-1), plan.replica_slots.shape[1])
    y = (back * row_gate[:, None]).reshape(local_tokens, -1, x.shape[1]).sum(axis=1)

    # Measure this device's work per batch.
    width = jnp.asarray(plan.slot_width)[me * C + jnp.maximum(recv_slot, 0)]
    batch = jnp.where(valid, _batch_index(recv_token, num_tokens, batch_size), num_batches)
    work = jnp.zeros(num_batches, jnp.int32).at[batch].add(jnp.where(valid, width, 0), mode="drop")
    rows = jnp.zeros(num_batches, jnp.int32).at[batch].add(valid.astype(jnp.int32), mode="drop")
    return y, work[None], rows[None], jax.lax.psum(dropped, AXIS)


@functools.partial(jax.jit, static_argnames=("plan", "mesh", "top_k", "batch_size", "capacity", "matmul"))
def expert_parallel_moe(params: MoeParams, x: jax.Array, *, plan: ExpertPlan, mesh: Mesh, top_k: int,
                        batch_size: int, capacity: int | None = None,
                        matmul: GroupedMatmul | None = None) -> MoeOutput:
    """The MoE layer on `mesh` (axis "expert", one device per placement device) for tokens x (T, d).

    `capacity`: rows a device may send to each other device; None = the no-drop bound
    (local tokens x min(k, C)). `matmul`: grouped matmul (lhs, rhs, group_sizes) -> out,
    default `default_matmul()`. `batch_size` is formats.md's b, for the measured loads.
    """
    G = plan.num_devices
    if mesh.shape.get(AXIS) != G:
        raise ValueError(f"the mesh needs an axis {AXIS!r} of size {G} (the placement's devices), "
                         f"got {dict(mesh.shape)}")
    num_tokens = x.shape[0]
    if num_tokens % G:
        raise ValueError(f"{num_tokens} tokens do not shard over {G} devices: pass a multiple of {G}")
    local_tokens = num_tokens // G
    capacity = capacity or local_tokens * min(top_k, plan.slots_per_device)
    num_batches = max(1, num_tokens // batch_size)
    routing = route(params.router, x, top_k)
    up, down = slot_weights(params, plan)
    step = functools.partial(_device_step, plan=plan, num_tokens=num_tokens, batch_size=batch_size,
                             capacity=capacity, num_batches=num_batches, matmul=matmul or default_matmul())
    sharded = P(AXIS)
    # check_vma=False: pallas_call outputs carry no varying-manual-axes annotation.
    y, work, rows, dropped = jax.shard_map(
        step, mesh=mesh, in_specs=(sharded,) * 5, out_specs=(sharded, sharded, sharded, P()), check_vma=False,
    )(x, routing.experts, routing.gates, up, down)
    return MoeOutput(y, routing, work.T, rows.T, dropped)


def measured_loads(output: MoeOutput, plan: ExpertPlan) -> np.ndarray:
    """(num_batches, G) float64 device loads measured by the layer: work / hidden_dim (formats.md 3.2)."""
    return np.asarray(output.work, np.float64) / plan.hidden_dim
