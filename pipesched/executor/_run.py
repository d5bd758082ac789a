"""Run a pipeline schedule with the JAX executor and hold it against the reference and the
schedule's predictions (formats.md section 4 run report)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from pipesched.executor._compile import PipelineProgram, build_program, make_mesh, stack_params, unstack
from pipesched.executor._memory import device_bytes, memory_terms
from pipesched.executor._models import (
    Batch,
    ModelConfig,
    StagedModel,
    make_batch,
    make_model,
    reference_grads,
    reference_loss,
)
from pipesched.executor._plan import executed_form, make_plan, remat_options, tick_schedule
from pipesched.pipeline import PipelineInstance, PipelineSchedule, program_of, simulate

REPORT_FORMAT = "pipesched.run-report/1"


class Pipeline(NamedTuple):
    """A schedule compiled for a model: the program, the model, its data and sharded parameters."""

    schedule: PipelineSchedule
    program: PipelineProgram
    model: StagedModel
    batch: Batch
    params: tuple  # stacked per kind, sharded over `pipe`


def compile_pipeline(schedule: PipelineSchedule, model: str | ModelConfig = "gpt-tiny", *, seed: int = 0,
                     devices: Sequence[jax.Device] | None = None, data_parallel: int = 1) -> Pipeline:
    """Validate `schedule` (ValidationError if invalid) and compile it for `model` on a mesh of
    `data_parallel` copies of the schedule's P devices (the first of `devices`, default
    jax.devices()); each copy gets its own `model.microbatch` samples of every microbatch."""
    config = ModelConfig(name=model) if isinstance(model, str) else model
    plan = make_plan(schedule)
    staged = make_model(config, schedule.instance.num_stages, seed)
    whole = dataclasses.replace(config, microbatch=config.microbatch * data_parallel)
    batch = make_batch(whole, schedule.instance.num_microbatches, seed)
    program = build_program(plan, staged, batch, make_mesh(plan.num_devices, devices, data_parallel))
    params = jax.device_put(stack_params(plan, staged, staged.params), program.param_sharding)
    return Pipeline(schedule, program, staged, jax.device_put(batch, program.batch_sharding), params)


def gradient_error(pipeline: Pipeline) -> tuple[float, float, float]:
    """(pipelined loss, reference loss, max |grad - reference grad|) on the pipeline's batch."""
    loss, grads = pipeline.program.grads(pipeline.params, pipeline.batch)
    ref_loss, ref_grads = reference_grads(pipeline.model, pipeline.model.params, jax.device_get(pipeline.batch))
    grads = unstack(pipeline.program.plan, jax.device_get(grads))
    error = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)))
    return float(loss), float(ref_loss), error


def optimizer_update_fn(optimizer: optax.GradientTransformation):
    """The jitted (params, opt_state, grads) -> (params, opt_state) of one optimizer step."""
    @jax.jit
    def update(params, opt_state, grads):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state
    return update


def train_step_fn(pipeline: Pipeline, optimizer: optax.GradientTransformation):
    """(params, opt_state, batch) -> (params, opt_state, loss): the pipelined program, then a
    separately jitted optimizer update (so the program compiled for the gradients is reused)."""
    update = optimizer_update_fn(optimizer)

    def step(params, opt_state, batch):
        loss, grads = pipeline.program.grads(params, batch)
        return *update(params, opt_state, grads), loss
    return step


def init_optimizer(pipeline: Pipeline, optimizer: optax.GradientTransformation) -> optax.OptState:
    """`optimizer.init` on the pipeline's parameters, its scalar leaves (step counts) replicated
    on the program's mesh as the jitted update returns them (else the second step recompiles)."""
    replicated = NamedSharding(pipeline.program.mesh, P())
    return jax.tree.map(lambda a: jax.device_put(a, replicated) if a.ndim == 0 else a, optimizer.init(pipeline.params))


def loss_curves(pipeline: Pipeline, steps: int, learning_rate: float = 1e-3, progress: bool = False
                ) -> tuple[list[float], list[float]]:
    """Losses of `steps` Adam steps on the pipeline's batch: pipelined, and unpipelined on one device."""
    optimizer = optax.adam(learning_rate)
    pipelined = train_step_fn(pipeline, optimizer)

    @jax.jit
    def unpipelined(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: reference_loss(pipeline.model, p, batch))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    curves = []
    reference = pipeline.model.params
    for step, params, opt_state, batch in (
            (pipelined, pipeline.params, init_optimizer(pipeline, optimizer), pipeline.batch),
            (unpipelined, reference, optimizer.init(reference), jax.device_get(pipeline.batch))):
        losses = []
        for _ in tqdm(range(steps), desc="loss curve", disable=not progress):
            params, opt_state, loss = step(params, opt_state, batch)
            losses.append(float(loss))
        curves.append(losses)
    return curves[0], curves[1]


def _program_bytes(compiled) -> int:
    stats = compiled.memory_analysis()
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
               - stats.alias_size_in_bytes)


def compiled_memory_bytes(pipeline: Pipeline) -> int:
    """Per-device bytes of the compiled gradient program: arguments + outputs + temporaries
    (what they hold: `pipesched.executor._memory`)."""
    return _program_bytes(pipeline.program.grads.lower(pipeline.params, pipeline.batch).compile())


def compiled_step_memory_bytes(pipeline: Pipeline, optimizer: optax.GradientTransformation,
                               opt_state: optax.OptState) -> int:
    """Per-device peak of a training step from the compiled programs: the gradient program plus the
    optimizer state waiting beside it, or the optimizer update plus the microbatches and loss
    waiting beside it, whichever is larger (`pipesched.executor._memory`)."""
    program = pipeline.program.grads.lower(pipeline.params, pipeline.batch).compile()
    (loss, grads), shardings = program.out_info, program.output_shardings
    grads = jax.tree.map(lambda g, sharding: jax.ShapeDtypeStruct(g.shape, g.dtype, sharding=sharding),
                         grads, shardings[1])
    update = optimizer_update_fn(optimizer).lower(pipeline.params, opt_state, grads).compile()
    return max(_program_bytes(program) + device_bytes(opt_state),
               _program_bytes(update) + device_bytes(pipeline.batch) + loss.dtype.itemsize)


def predicted_times(schedule: PipelineSchedule, timing: PipelineInstance | None) -> tuple[float, float]:
    """(schedule makespan, executed-form makespan) with the durations of `timing` (same stages and
    placement, e.g. a profiled instance in microseconds) or of the schedule's own instance."""
    inst = schedule.instance if timing is None else timing.replace(
        num_microbatches=schedule.instance.num_microbatches, split_backward=schedule.instance.split_backward,
        allow_remat=schedule.instance.allow_remat, memory_limit=None)
    retimed = simulate(inst, program_of(schedule)).schedule
    executed = executed_form(inst, tick_schedule(schedule), schedule.solver, remat_options(schedule))
    return retimed.makespan, executed.makespan


def run(schedule: PipelineSchedule, *, model: str | ModelConfig = "gpt-tiny", steps: int = 10, warmup: int = 2,
        timing: PipelineInstance | None = None, time_unit_s: float = 1e-6, learning_rate: float = 1e-3,
        seed: int = 0, devices: Sequence[jax.Device] | None = None, data_parallel: int = 1,
        schedule_name: str | None = None, progress: bool = False) -> dict[str, Any]:
    """Compile and run `schedule`, returning a formats.md section 4 run report (a dict).

    The first step's loss and gradients are compared with the single-device reference; then
    `warmup` + `steps` Adam steps run and the last `steps` are timed. `timing` (e.g. from
    profile_instance, durations in units of `time_unit_s`) gives the predicted times; without it
    the schedule's own durations are used with the same unit. `data_parallel` runs that many
    copies of the pipeline on shards of the data (`compile_pipeline`); the predictions are those
    of one copy. The predicted memory is `memory_terms` (the buffers a training step holds, term
    by term, against `compiled_step_memory_bytes`); the schedule's own activation peak is kept
    as `predicted_activation_peak_bytes`.
    """
    pipeline = compile_pipeline(schedule, model, seed=seed, devices=devices, data_parallel=data_parallel)
    loss, ref_loss, error = gradient_error(pipeline)
    optimizer = optax.adam(learning_rate)
    step = train_step_fn(pipeline, optimizer)
    params, opt_state = pipeline.params, init_optimizer(pipeline, optimizer)
    memory = compiled_step_memory_bytes(pipeline, optimizer, opt_state)
    terms = memory_terms(pipeline, device_bytes(opt_state))
    times, losses = [], []
    for i in tqdm(range(warmup + steps), desc=f"run {schedule.solver}", disable=not progress):
        t0 = time.perf_counter()
        params, opt_state, step_loss = jax.block_until_ready(step(params, opt_state, pipeline.batch))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(step_loss))
    makespan, executed = predicted_times(schedule, timing)
    plan = pipeline.program.plan
    return {
        "format": REPORT_FORMAT,
        "schedule": schedule_name or schedule.solver,
        "backend": jax.default_backend(),
        "devices": plan.num_devices * data_parallel,
        "mesh": dict(pipeline.program.mesh.shape),
        "steps": steps,
        "loss": loss,
        "reference_loss": ref_loss,
        "max_abs_grad_error": error,
        "step_time_s": times,
        "predicted_step_time_s": makespan * time_unit_s,
        "predicted_executed_step_time_s": executed * time_unit_s,
        "executed_overhead": executed / makespan - 1 if makespan else 0.0,
        "peak_memory_bytes": [memory] * (plan.num_devices * data_parallel),
        "predicted_peak_memory_bytes": [row["total"] for row in terms] * data_parallel,  # mesh order: data-major
        "predicted_activation_peak_bytes": [row["activations"] for row in terms] * data_parallel,
        "predicted_memory_terms": terms,  # per pipe device of one copy: the buffers a step holds
        "activation_slots": list(plan.residual_slots),
        "ticks": plan.ticks,
        "train_losses": losses,
    }
