"""MoE parameters, the top-k router and the dense single-device reference layer."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# float32 products in full precision everywhere (GPUs would otherwise use TF32, about 1e-3 off).
HIGHEST = jax.lax.Precision.HIGHEST


class MoeParams(NamedTuple):
    """One MoE feed-forward layer: router (d, E), experts' up (E, d, h) and down (E, h, d) weights.

    An expert computes ``relu(x @ up[e]) @ down[e]``: a sum over its h hidden units, which is what
    lets replicas of an expert each compute a slice of them (see `ExpertPlan`).
    """

    router: jax.Array
    up: jax.Array
    down: jax.Array

    @property
    def num_experts(self) -> int:
        return self.router.shape[1]


def init_moe_params(key: jax.Array, model_dim: int, hidden_dim: int, num_experts: int) -> MoeParams:
    """Scaled normal initialisation (outputs of order one for inputs of order one)."""
    k_router, k_up, k_down = jax.random.split(key, 3)
    return MoeParams(
        router=jax.random.normal(k_router, (model_dim, num_experts)) / jnp.sqrt(model_dim),
        up=jax.random.normal(k_up, (num_experts, model_dim, hidden_dim)) / jnp.sqrt(model_dim),
        down=jax.random.normal(k_down, (num_experts, hidden_dim, model_dim)) / jnp.sqrt(hidden_dim),
    )


class Routing(NamedTuple):
    """Per token: its top-k experts (T, k), distinct, best first, and their gates (T, k), summing to 1."""

    experts: jax.Array
    gates: jax.Array


def route(router: jax.Array, x: jax.Array, top_k: int) -> Routing:
    """Top-k of the router logits, gates = softmax over the k chosen logits (Mixtral style)."""
    logits = jnp.matmul(x, router, precision=HIGHEST)
    top_logits, experts = jax.lax.top_k(logits, top_k)
    return Routing(experts.astype(jnp.int32), jax.nn.softmax(top_logits, axis=-1))


def expert_ffn(x: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    """One expert on rows x (n, d): relu(x @ up) @ down."""
    return jnp.matmul(jax.nn.relu(jnp.matmul(x, up, precision=HIGHEST)), down, precision=HIGHEST)


def gate_matrix(routing: Routing, num_experts: int) -> jax.Array:
    """(T, E) gates, zero for experts a token did not choose."""
    return jnp.einsum("tk,tke->te", routing.gates, jax.nn.one_hot(routing.experts, num_experts), precision=HIGHEST)


def dense_moe(params: MoeParams, x: jax.Array, routing: Routing) -> jax.Array:
    """Every expert on every token, weighted by the (sparse) gates: simple, and cheap for small E."""
    gates = gate_matrix(routing, params.num_experts)
    outputs = jax.vmap(expert_ffn, in_axes=(None, 0, 0))(x, params.up, params.down)  # (E, T, d)
    return jnp.einsum("te,etd->td", gates, outputs, precision=HIGHEST)


def moe_reference(params: MoeParams, x: jax.Array, top_k: int) -> jax.Array:
    """The dense single-device MoE layer, the reference of `expert_parallel_moe`."""
    return dense_moe(params, x, route(params.router, x, top_k))
