"""The four stage operations as pure JAX functions, and storage of VJP residuals in fixed slots.

- F: forward, keeping the residuals of the backward (`full_vjp`, or `input_vjp` when split);
- B: the whole backward (`vjp_fn(g) -> (dparams, dh)`) or, split, the input gradient and the tap
  gradients (`vjp_fn(g) -> (dh, dtaps)`);
- W: the weight gradient from the recorded op inputs and tap gradients (`weight_grad`);
- R: F again from the stage input, keeping residuals.
A VJP closure is a pytree whose leaves are its residuals; leaves that are parameters are not
stored (they are re-bound from the live parameters), the others go to a slot of a residual pool.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from pipesched.executor._models import Affine, Input, StagedModel


class StageKind(NamedTuple):
    """The structure shared by the stages of one kind (first / middle / last)."""

    graph: nnx.GraphDef
    taps: nnx.State
    inputs: nnx.State

    @classmethod
    def of(cls, model: StagedModel, stage: int) -> StageKind:
        return cls(model.graphs[stage], model.taps[stage], model.inputs[stage])

    def module(self, params: nnx.State, taps: nnx.State | None = None, inputs: nnx.State | None = None):
        return nnx.merge(self.graph, params, self.taps if taps is None else taps,
                         self.inputs if inputs is None else inputs, copy=True)


def forward(kind: StageKind, params: nnx.State, h, x, y) -> jax.Array:
    return kind.module(params)(h, x, y)


def full_vjp(kind: StageKind, params: nnx.State, h, x, y) -> tuple[jax.Array, Callable]:
    """Output and the VJP to (dparams, dh)."""
    return jax.vjp(lambda p, h: kind.module(p)(h, x, y), params, h)


def input_vjp(kind: StageKind, params: nnx.State, h, x, y) -> tuple[jax.Array, Callable, nnx.State]:
    """Output, the VJP to (dh, dtaps) with the parameters held constant, and the op inputs."""
    def run(h, taps):
        module = kind.module(params, taps)
        return module(h, x, y), nnx.state(module, Input)
    out, vjp_fn, inputs = jax.vjp(run, h, kind.taps, has_aux=True)
    return out, vjp_fn, inputs


def weight_grad(kind: StageKind, params: nnx.State, inputs: nnx.State, dtaps: nnx.State) -> nnx.State:
    """Parameter gradient of a stage from its op inputs and output gradients: each op is linear
    in its parameters, so this is one transposed op per parameter (x^T dy for a matmul)."""
    def outputs(p):
        module = kind.module(p, inputs=inputs)
        return [m.op(m.input[...]) for _, m in nnx.iter_graph(module) if isinstance(m, Affine)]
    grads = [m.tap[...] for _, m in nnx.iter_graph(kind.module(params, taps=dtaps)) if isinstance(m, Affine)]
    return jax.vjp(outputs, params)[1](grads)[0]


class ResidualLayout(NamedTuple):
    """Where each leaf of a VJP closure comes from: a parameter leaf (index >= 0) or storage (-1)."""

    treedef: Any
    sources: tuple[int, ...]
    stored: tuple[jax.ShapeDtypeStruct, ...]


def split_residuals(vjp_fn: Callable, params: nnx.State) -> tuple[ResidualLayout, list[jax.Array]]:
    leaves, treedef = jax.tree.flatten(vjp_fn)
    index = {id(leaf): i for i, leaf in enumerate(jax.tree.leaves(params))}
    sources = tuple(index.get(id(leaf), -1) for leaf in leaves)
    stored = [leaf for leaf, src in zip(leaves, sources) if src < 0]
    shapes = tuple(jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)) for a in stored)
    return ResidualLayout(treedef, sources, shapes), stored


def join_residuals(layout: ResidualLayout, stored: list[jax.Array], params: nnx.State) -> Callable:
    param_leaves, it = jax.tree.leaves(params), iter(stored)
    leaves = [param_leaves[src] if src >= 0 else next(it) for src in layout.sources]
    return jax.tree.unflatten(layout.treedef, leaves)


def residual_layout(kind: StageKind, params: nnx.State, hidden: jax.ShapeDtypeStruct, x, y, split: bool
                    ) -> ResidualLayout:
    """Trace F once (abstractly) to learn the residual structure of this stage kind."""
    found = []

    def trace(p, h, x, y):
        vjp_fn = input_vjp(kind, p, h, x, y)[1] if split else full_vjp(kind, p, h, x, y)[1]
        found.append(split_residuals(vjp_fn, p)[0])
        return 0

    jax.eval_shape(trace, params, hidden, x, y)
    return found[0]
