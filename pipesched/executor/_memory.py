"""Predicted per-device memory of a compiled pipeline: the buffers the gradient program holds.

`compiled_memory_bytes` reads the program's `memory_analysis()`: arguments + outputs + temporaries
(nothing is aliased). On the CPU backend (gpt-tiny and the MLP, P = 2 and 4, read from XLA's buffer
assignment) they hold:

- arguments: the device's stacked parameters and the inputs and targets of all M microbatches
  (each `pipe` device gets the whole batch of its `data` shard);
- outputs: the device's parameter gradients and the loss (plus an 8-byte pointer per output leaf);
- temporaries: the device's row of the action table (sliced out of the program's constant), the
  scan carry (the slot pools and the gradient accumulators) and the working memory of one tick:
  the values its `lax.switch` branch returns, and the branch's intermediates (branches share it).

The prediction adds up these terms (`memory_terms`); the activation term is the larger of the
schedule's own peak (formats.md rule 5, `byte_instance`) and the pools the program allocates (an
SPMD program gives every device the pools of the busiest one, each slot as large as the largest
stage kind's values). A branch's intermediates (the unpacked residuals it packs into a slot, the
stage's working values) are not predicted: XLA reuses their memory, and they leave the step's
prediction 2-8% low on gpt-tiny and 3-14% low on the executor matrix's width-8 MLP, where they are a
large share (2-4% high on the default MLP, where XLA shares some tick values).

A training step runs two programs (`train_step_fn`): the gradient program, while the optimizer
state waits in device memory, then the optimizer update (arguments: parameters, optimizer state and
gradients; outputs: the new parameters and state), while the microbatches wait. The step's peak is
the larger of the two (`compiled_step_memory_bytes` measures it the same way); the update's few
temporaries (68 bytes for Adam here) are not predicted.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax
import numpy as np

from pipesched.executor._compile import slot_bytes
from pipesched.executor._profile import StageMemory, nbytes
from pipesched.pipeline import PipelineInstance, memory_timeline
from pipesched.pipeline._model import RematOption

if TYPE_CHECKING:
    from pipesched.executor._run import Pipeline

LOSS_BYTES = 4  # the float32 loss


def device_bytes(tree) -> int:
    """Bytes one device holds of the sharded arrays of `tree` (one shard of each leaf)."""
    return sum(int(np.prod(a.sharding.shard_shape(a.shape))) * a.dtype.itemsize for a in jax.tree.leaves(tree))


def byte_instance(pipeline: Pipeline) -> PipelineInstance:
    """The schedule's instance with activation, stash and checkpoint sizes in the model's bytes:
    also those of its remat options (the model's, in order) and its wgrad checkpoints (1.4)."""
    inst = pipeline.schedule.instance
    stages = []
    for s, st in enumerate(inst.stages):
        mem = StageMemory(pipeline.model, s, inst.split_backward)
        options = None if st.remat_options is None else tuple(
            RematOption(c, option.R) for c, option in zip(mem.checkpoints, st.remat_options))
        stages.append(dataclasses.replace(st, activation=mem.activation, wgrad_stash=mem.stash,
                                          checkpoint=mem.checkpoints[0], remat_options=options,
                                          wgrad_checkpoint=mem.wgrad_checkpoint if st.RW is not None else 0))
    return inst.replace(stages=tuple(stages), memory_limit=None)


def activation_peaks(pipeline: Pipeline) -> tuple[float, ...]:
    """Per device, the schedule's activation peak in bytes (formats.md rule 5)."""
    return memory_timeline(byte_instance(pipeline), pipeline.schedule.ops).peaks


def pool_bytes(pipeline: Pipeline) -> int:
    """Bytes of the program's slot pools on every device (hidden, residual, checkpoint, the two W
    stash pools), trash slots included."""
    plan = pipeline.program.plan
    size = slot_bytes(plan, pipeline.model)
    slots = {"hidden": plan.hidden_slots, "residual": max(plan.residual_slots),
             "checkpoint": max(plan.checkpoint_slots), "stash_inputs": max(plan.stash_slots, default=0),
             "stash_grads": max(plan.grad_slots, default=0)}
    return sum((n + 1) * size[pool] for pool, n in slots.items())


def tick_value_bytes(pipeline: Pipeline) -> int:
    """Bytes a tick's branch returns (`Emit`): the value sent on, one slot of each pool, one
    stage's parameter gradient of every stage kind, and the loss."""
    plan, model = pipeline.program.plan, pipeline.model
    size = slot_bytes(plan, model)
    grads = sum(nbytes(model.params[plan.kind_of.index(c)]) for c in range(len(plan.kinds)))
    return size["hidden"] + size["residual"] + size["checkpoint"] + size["stash"] + grads + LOSS_BYTES


def table_row_bytes(pipeline: Pipeline) -> int:
    """Bytes of a device's row of the action table (ticks x columns, int32): a constant of the
    program that each device slices out into a temporary."""
    table = pipeline.program.plan.table
    return int(np.prod(table.shape[1:])) * table.itemsize


def memory_terms(pipeline: Pipeline, optimizer_state_bytes: int = 0) -> list[dict[str, int]]:
    """Per `pipe` device of one pipeline copy, the bytes of each buffer a training step holds and
    their `total`, the predicted peak: the larger of `gradient_program` (max(`activations`,
    `slot_pools`) + the other terms) and `optimizer_update` (module docstring)."""
    params = device_bytes(pipeline.params)
    microbatches = device_bytes(pipeline.batch)
    shared = {
        "slot_pools": pool_bytes(pipeline),
        "parameters": params,  # argument
        "microbatches": microbatches,  # argument: inputs and targets
        "gradients": params + LOSS_BYTES,  # output
        "gradient_accumulators": params,  # scan carry
        "tick_values": tick_value_bytes(pipeline),
        "action_table": table_row_bytes(pipeline),
        "optimizer_state": optimizer_state_bytes,  # resident while the gradients are computed
    }
    fixed = sum(v for k, v in shared.items() if k != "slot_pools")
    # arguments params, state, gradients; outputs new params and state; the microbatches and loss wait
    update = 2 * (params + optimizer_state_bytes) + params + microbatches + LOSS_BYTES
    rows = []
    for peak in activation_peaks(pipeline):
        gradient = max(int(peak), shared["slot_pools"]) + fixed
        rows.append({"activations": int(peak), **shared, "gradient_program": gradient, "optimizer_update": update,
                     "total": max(gradient, update)})
    return rows
