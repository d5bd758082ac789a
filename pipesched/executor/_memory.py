"""Predicted per-device memory of a compiled pipeline: the buffers the gradient program holds.

`compiled_memory_bytes` reads the program's `memory_analysis()`: arguments + outputs + temporaries
(nothing is aliased). On the CPU backend (gpt-tiny and the MLP, P = 2 and 4, read from XLA's buffer
assignment) they hold:

- arguments: the device's stacked parameters and the inputs and targets of all M microbatches
  (each `pipe` device gets the whole batch of its `data` shard; the action table is a constant);
- outputs: the device's parameter gradients and the loss (plus an 8-byte pointer per output leaf);
- temporaries: the scan carry (the slot pools and the gradient accumulators) and the working
  memory of one tick: the values its `lax.switch` branch returns, and the branch's intermediates.

The prediction adds up these terms (`memory_terms`); the activation term is the larger of the
schedule's own peak (formats.md rule 5, `byte_instance`) and the pools the program allocates (an
SPMD program gives every device the pools of the busiest one, each slot as large as the largest
stage kind's values). A branch's intermediates (the unpacked residuals it packs into a slot, the
stage's working values) are not predicted: XLA reuses their memory, and they leave the prediction
2-9% low on gpt-tiny (0-4% high on the MLP, where XLA shares some tick values).

The optimizer state is not held by the gradient program (the update is jitted apart,
`train_step_fn`); it is reported on its own (`optimizer_state_bytes`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax
import numpy as np

from pipesched.executor._compile import slot_bytes
from pipesched.executor._profile import StageMemory, nbytes
from pipesched.pipeline import PipelineInstance, memory_timeline

if TYPE_CHECKING:
    from pipesched.executor._run import Pipeline

LOSS_BYTES = 4  # the float32 loss


def device_bytes(tree) -> int:
    """Bytes one device holds of the sharded arrays of `tree` (one shard of each leaf)."""
    return sum(int(np.prod(a.sharding.shard_shape(a.shape))) * a.dtype.itemsize for a in jax.tree.leaves(tree))


def byte_instance(pipeline: Pipeline) -> PipelineInstance:
    """The schedule's instance with activation, stash and checkpoint sizes in the model's bytes."""
    inst = pipeline.schedule.instance
    stages = []
    for s, st in enumerate(inst.stages):
        mem = StageMemory(pipeline.model, s, inst.split_backward)
        stages.append(dataclasses.replace(st, activation=mem.activation, wgrad_stash=mem.stash,
                                          checkpoint=min(mem.hidden, mem.activation)))
    return inst.replace(stages=tuple(stages), memory_limit=None)


def activation_peaks(pipeline: Pipeline) -> tuple[float, ...]:
    """Per device, the schedule's activation peak in bytes (formats.md rule 5)."""
    return memory_timeline(byte_instance(pipeline), pipeline.schedule.ops).peaks


def pool_bytes(pipeline: Pipeline) -> int:
    """Bytes of the program's slot pools on every device (hidden, residual, stash), trash slots included."""
    plan = pipeline.program.plan
    size = slot_bytes(plan, pipeline.model)
    return ((plan.hidden_slots + 1) * size["hidden"] + (max(plan.residual_slots) + 1) * size["residual"]
            + (max(plan.stash_slots, default=0) + 1) * size["stash"])


def tick_value_bytes(pipeline: Pipeline) -> int:
    """Bytes a tick's branch returns (`Emit`): the value sent on, one slot of each pool, one
    stage's parameter gradient of every stage kind, and the loss."""
    plan, model = pipeline.program.plan, pipeline.model
    size = slot_bytes(plan, model)
    grads = sum(nbytes(model.params[plan.kind_of.index(c)]) for c in range(len(plan.kinds)))
    return size["hidden"] + size["residual"] + size["stash"] + grads + LOSS_BYTES


def memory_terms(pipeline: Pipeline) -> list[dict[str, int]]:
    """Per `pipe` device of one pipeline copy, the bytes of each buffer the program holds and
    their `total`, the predicted peak: max(`activations`, `slot_pools`) + the other terms."""
    params = device_bytes(pipeline.params)
    shared = {
        "slot_pools": pool_bytes(pipeline),
        "parameters": params,  # argument
        "microbatches": device_bytes(pipeline.batch),  # argument: inputs and targets
        "gradients": params + LOSS_BYTES,  # output
        "gradient_accumulators": params,  # scan carry
        "tick_values": tick_value_bytes(pipeline),
    }
    rows = []
    for peak in activation_peaks(pipeline):
        row = {"activations": int(peak), **shared}
        fixed = sum(v for k, v in shared.items() if k != "slot_pools")
        rows.append({**row, "total": max(row["activations"], row["slot_pools"]) + fixed})
    return rows
