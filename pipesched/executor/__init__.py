"""JAX executor: compile a pipeline schedule into one SPMD program over a `pipe` mesh and run it."""

from pipesched.executor._compile import (
                                         AXIS,
                                         PipelineProgram,
                                         build_program,
                                         make_mesh,
                                         slot_bytes,
                                         stack_params,
                                         unstack,
)
from pipesched.executor._distributed import ProcessFailure, distributed_grads, free_port, supervise, worker_commands
from pipesched.executor._memory import activation_peaks, byte_instance, device_bytes, memory_terms, pool_bytes
from pipesched.executor._models import (
                                         MODELS,
                                         REMAT_OPTIONS,
                                         Batch,
                                         ModelConfig,
                                         StagedModel,
                                         make_batch,
                                         make_model,
                                         reference_grads,
                                         reference_loss,
)
from pipesched.executor._plan import Plan, executed_form, make_plan, tick_schedule
from pipesched.executor._profile import (
                                         StageMemory,
                                         profile_instance,
                                         program_stage_times,
                                         program_tick_times,
                                         stage_times,
                                         tick_prediction,
                                         tick_times,
)
from pipesched.executor._run import (
                                         REPORT_FORMAT,
                                         Pipeline,
                                         compile_pipeline,
                                         compiled_memory_bytes,
                                         compiled_step_memory_bytes,
                                         gradient_error,
                                         init_optimizer,
                                         loss_curves,
                                         predicted_times,
                                         run,
                                         optimizer_update_fn,
                                         train_step_fn,
)

__all__ = [
    "AXIS", "MODELS", "REMAT_OPTIONS", "REPORT_FORMAT", "Batch", "ModelConfig", "Pipeline", "PipelineProgram", "Plan",
    "ProcessFailure", "StageMemory", "StagedModel", "activation_peaks", "build_program", "byte_instance",
    "compile_pipeline", "compiled_memory_bytes", "compiled_step_memory_bytes", "device_bytes", "distributed_grads", "executed_form", "free_port",
    "gradient_error", "init_optimizer", "loss_curves", "make_batch", "make_mesh", "make_model", "make_plan",
    "memory_terms", "pool_bytes", "predicted_times", "profile_instance",
    "program_stage_times", "program_tick_times", "reference_grads",
    "reference_loss", "run", "slot_bytes", "stack_params", "stage_times", "supervise", "tick_prediction",
    "optimizer_update_fn", "tick_schedule", "tick_times", "train_step_fn", "unstack", "worker_commands",
]
