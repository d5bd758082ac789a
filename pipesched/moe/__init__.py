"""Mixture-of-Experts on a mesh: router, dense reference, expert-parallel layer honouring a placement."""

from pipesched.moe._language import Language
from pipesched.moe._layer import (
    AXIS,
    MoeOutput,
    default_matmul,
    expert_mesh,
    expert_parallel_moe,
    measured_loads,
    slot_weights,
)
from pipesched.moe._plan import ExpertPlan
from pipesched.moe._routing import (
    MoeParams,
    Routing,
    dense_moe,
    expert_ffn,
    gate_matrix,
    init_moe_params,
    moe_reference,
    route,
)
from pipesched.moe._trace_model import TrainedModel, held_out_tokens, routing_traces, train_trace_model
from pipesched.moe._transformer import MoeTransformer, TransformerConfig, language_model_loss

__all__ = [
    "AXIS", "ExpertPlan", "Language", "MoeOutput", "MoeParams", "MoeTransformer", "Routing", "TrainedModel",
    "TransformerConfig", "default_matmul", "dense_moe", "expert_ffn", "expert_mesh", "expert_parallel_moe",
    "gate_matrix", "held_out_tokens", "init_moe_params", "language_model_loss", "measured_loads",
    "moe_reference", "route", "routing_traces", "slot_weights", "train_trace_model",
]
