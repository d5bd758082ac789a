"""Rematerialization (activation checkpointing) of a training graph: formats.md section 2.

The model, validator and chain helpers import no JAX. The JAX side (graphs traced from a loss,
schedules applied back to it, the tiny flax models) loads on first use of one of its names, so
that commands which only read and check files start fast.
"""

from pipesched._common import lazy_module_attributes
from pipesched.remat._chain import Chain, ChainLayout, chain_instance, chain_layout, make_chain
from pipesched.remat._model import (
    INSTANCE_FORMAT,
    SCHEDULE_FORMAT,
    RematEvaluation,
    RematInstance,
    RematNode,
    RematSchedule,
    evaluate_steps,
    validate_remat,
)

_JAX_NAMES = {
    # graphs traced from JAX, and schedules applied back to JAX
    "pipesched.remat._jax_apply": (
        "APPLY_MODES", "CompiledMemory", "MemoryReport", "apply", "compiled_memory", "memory_report"),
    "pipesched.remat._jax_graph": (
        "GRANULARITIES", "JAX_POLICIES", "TracedLoss", "equation_flops", "kept_names", "policy_kept",
        "policy_schedule", "realized_steps", "remat_instance_from_jax", "trace_loss"),
    # tiny flax NNX models with named activations
    "pipesched.remat._models": ("GPT", "MLP", "GPTConfig", "LossProblem", "gpt_problem", "mlp_problem"),
}
_MODULE_OF = {name: module for module, names in _JAX_NAMES.items() for name in names}

__all__ = [
    "Chain", "ChainLayout", "chain_instance", "chain_layout", "make_chain",
    "INSTANCE_FORMAT", "SCHEDULE_FORMAT", "RematEvaluation", "RematInstance", "RematNode",
    "RematSchedule", "evaluate_steps", "validate_remat", *_MODULE_OF,
]

__getattr__, __dir__ = lazy_module_attributes(globals(), _MODULE_OF)
