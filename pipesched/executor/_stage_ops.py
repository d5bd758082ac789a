"""The stage operations as pure JAX functions, piece by piece, and storage of VJP residuals in slots.

A stage is a chain of pieces (`_models.Chain`), each with its own VJP, so that a remat option can
keep the residuals of some pieces and recompute the others (`REMAT_OPTIONS`):
- F: forward, keeping every piece's VJP residuals and, split, its op inputs (`forward_residuals`);
- Fr of option 0: forward only (`forward`); the stage input stays in its hidden slot for R;
- Fr of option k > 0: forward, keeping option k's checkpoint (`checkpoint_forward`): the residuals
  and op inputs of the kept pieces, and the input of every recomputed piece that follows a kept one;
- R: F again from the stage input (option 0), or what F keeps from option k's checkpoint,
  recomputing the pieces it does not keep (`recompute`): B then finds what F would have left;
- B: the pieces' VJPs in reverse (`backward`): (dh, dparams), or split (dh, dtaps);
- W: the weight gradient from the op inputs and tap gradients (`weight_grad`);
- RW: the op inputs again, from the stage input (`op_inputs`, backward-pass recompute).
A VJP closure is a pytree whose leaves are its residuals; leaves that are parameters are not
stored (they are re-bound from the live parameters), the others go to a slot of a residual pool.
The leaves of a stage's state (parameters, taps, op inputs) are its pieces' leaves in piece order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from pipesched.executor._models import REMAT_OPTIONS, Affine, Input, StagedModel, Tap

Leaves = list  # the leaves of a pytree, in jax.tree.leaves order


class StageKind(NamedTuple):
    """The structure shared by the stages of one kind (first / middle / last)."""

    graph: nnx.GraphDef
    taps: nnx.State
    inputs: nnx.State
    pieces: tuple[nnx.GraphDef, ...]  # the graph of each piece
    roles: tuple[str, ...]  # the role of each piece (`REMAT_OPTIONS`)
    first: bool  # the first stage: its first piece reads the microbatch, not `h`
    options: tuple[str, ...]  # the model's remat options

    @classmethod
    def of(cls, model: StagedModel, stage: int) -> StageKind:
        module = nnx.merge(model.graphs[stage], model.params[stage], model.taps[stage], model.inputs[stage], copy=True)
        return cls(model.graphs[stage], model.taps[stage], model.inputs[stage],
                   tuple(nnx.split(p, nnx.Param, Tap, Input)[0] for p in module.pieces),
                   tuple(p.role for p in module.pieces), stage == 0, REMAT_OPTIONS[model.config.name])

    def module(self, params: nnx.State, taps: nnx.State | None = None, inputs: nnx.State | None = None):
        return nnx.merge(self.graph, params, self.taps if taps is None else taps,
                         self.inputs if inputs is None else inputs, copy=True)

    def piece(self, i: int, params: nnx.State, taps: nnx.State | None = None):
        """Piece i with its `params` (and `taps`): parts of the stage's (`part`)."""
        return nnx.merge(self.pieces[i], params, part(self.taps, i) if taps is None else taps,
                         part(self.inputs, i), copy=True)

    def kept(self, option: int) -> tuple[bool, ...]:
        """Per piece, whether remat option `option` keeps its residuals (none for option 0)."""
        return tuple(role == self.options[option] for role in self.roles)

    def stored_inputs(self, option: int) -> tuple[bool, ...]:
        """Per piece, whether option k > 0 keeps its input: a recomputed piece after a kept one,
        or a recomputed first piece that reads the stage input."""
        kept = self.kept(option)
        return tuple(not kept[i] and (kept[i - 1] if i else not self.first) for i in range(len(kept)))


def part(state: nnx.State, i: int) -> nnx.State:
    """Piece i's part of a stage's state."""
    return state["pieces"][i]


def join(template: nnx.State, parts: list) -> nnx.State:
    """A stage's state from its pieces' parts (pytrees, in piece order), shaped as `template`."""
    return jax.tree.unflatten(jax.tree.structure(template), [a for p in parts for a in jax.tree.leaves(p)])


def forward(kind: StageKind, params: nnx.State, h, x, y) -> jax.Array:
    return kind.module(params)(h, x, y)


def piece_vjp(kind: StageKind, i: int, params: nnx.State, h, x, y, split: bool
              ) -> tuple[jax.Array, Callable, nnx.State | None]:
    """Output of piece i, its VJP and, split, its op inputs. The VJP maps the output gradient to
    (dparams_i, dh), or split to (dh, dtaps_i) with the parameters held constant."""
    if split:
        def run(h, taps):
            module = kind.piece(i, part(params, i), taps)
            return module(h, x, y), nnx.state(module, Input)
        return jax.vjp(run, h, part(kind.taps, i), has_aux=True)
    out, vjp_fn = jax.vjp(lambda p, h: kind.piece(i, p)(h, x, y), part(params, i), h)
    return out, vjp_fn, None


class Kept(NamedTuple):
    """What a piece leaves for the backward: its stored VJP residuals and its op inputs (split)."""

    residuals: Leaves
    inputs: Leaves


def _kept(vjp_fn: Callable, inputs: nnx.State | None, params: nnx.State) -> Kept:
    return Kept(split_residuals(vjp_fn, params)[1], jax.tree.leaves(inputs))


def forward_residuals(kind: StageKind, params: nnx.State, h, x, y, split: bool) -> tuple[jax.Array, list[Kept]]:
    """F (and R of option 0): the output and what every piece leaves for the backward."""
    kept = []
    for i in range(len(kind.pieces)):
        h, vjp_fn, inputs = piece_vjp(kind, i, params, h, x, y, split)
        kept.append(_kept(vjp_fn, inputs, params))
    return h, kept


def checkpoint_forward(kind: StageKind, option: int, params: nnx.State, h, x, y, split: bool
                       ) -> tuple[jax.Array, Leaves]:
    """Fr of option k > 0: the output, and the checkpoint: piece by piece, its input when
    `stored_inputs`, its residuals and op inputs when kept."""
    checkpoint = []
    for i, (keep, store) in enumerate(zip(kind.kept(option), kind.stored_inputs(option))):
        checkpoint += [h] if store else []
        if keep:
            h, vjp_fn, inputs = piece_vjp(kind, i, params, h, x, y, split)
            checkpoint += [*(kept := _kept(vjp_fn, inputs, params)).residuals, *kept.inputs]
        else:
            h = kind.piece(i, part(params, i))(h, x, y)
    return h, checkpoint


def recompute(kind: StageKind, option: int, layout: StageLayout, params: nnx.State, h, x, y,
              checkpoint: Leaves, split: bool) -> list[Kept]:
    """R of option k > 0: what F leaves for the backward, the kept pieces' part read from the
    checkpoint, the other pieces recomputed from their inputs."""
    stored: Iterator = iter(checkpoint)
    kept = []
    for i, (keep, store) in enumerate(zip(kind.kept(option), kind.stored_inputs(option))):
        h = next(stored) if store else h
        if keep:
            kept.append(Kept(_take(stored, len(layout.pieces[i].stored)), _take(stored, layout.inputs[i])))
        else:
            h, vjp_fn, inputs = piece_vjp(kind, i, params, h, x, y, split)
            kept.append(_kept(vjp_fn, inputs, params))
    return kept


def _take(it: Iterator, n: int) -> Leaves:
    return [next(it) for _ in range(n)]


def backward(kind: StageKind, layout: StageLayout, residuals: Leaves, params: nnx.State, g, split: bool
             ) -> tuple[jax.Array, nnx.State]:
    """B from the output gradient `g`: the input gradient and the parameter gradients, or split
    the tap gradients (the op output gradients W needs)."""
    stored: Iterator = iter(residuals)
    pieces = [_take(stored, len(piece.stored)) for piece in layout.pieces]
    grads = []
    for piece, leaves in reversed(list(zip(layout.pieces, pieces))):
        vjp_fn = join_residuals(piece, leaves, params)
        if split:
            g, grad = vjp_fn(g)
        else:
            grad, g = vjp_fn(g)
        grads.append(grad)
    return g, join(kind.taps if split else params, grads[::-1])


def op_inputs(kind: StageKind, params: nnx.State, h, x, y) -> nnx.State:
    """RW: the op inputs W needs, from the stage input (a forward without residuals)."""
    module = kind.module(params)
    module(h, x, y)
    return nnx.state(module, Input)


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
    return ResidualLayout(treedef, sources, _shapes(stored)), stored


def join_residuals(layout: ResidualLayout, stored: list[jax.Array], params: nnx.State) -> Callable:
    param_leaves, it = jax.tree.leaves(params), iter(stored)
    leaves = [param_leaves[src] if src >= 0 else next(it) for src in layout.sources]
    return jax.tree.unflatten(layout.treedef, leaves)


def _shapes(leaves) -> tuple[jax.ShapeDtypeStruct, ...]:
    return tuple(jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)) for a in leaves)


class StageLayout(NamedTuple):
    """The residual layout of every piece, the op-input leaves of every piece (0 unless split),
    and the leaves of every remat option's checkpoint (none for option 0: its hidden slot)."""

    pieces: tuple[ResidualLayout, ...]
    inputs: tuple[int, ...]
    checkpoints: tuple[tuple[jax.ShapeDtypeStruct, ...], ...]

    @property
    def stored(self) -> tuple[jax.ShapeDtypeStruct, ...]:
        """The leaves of the stage's residual slot: every piece's stored residuals, in order."""
        return tuple(a for piece in self.pieces for a in piece.stored)


def stage_layout(kind: StageKind, params: nnx.State, hidden: jax.ShapeDtypeStruct, x, y, split: bool) -> StageLayout:
    """Trace F and every Fr once (abstractly) to learn the storage of this stage kind."""
    found = []

    def trace(p, h, x, y):
        out = h
        for i in range(len(kind.pieces)):
            out, vjp_fn, _ = piece_vjp(kind, i, p, out, x, y, split)
            found.append(split_residuals(vjp_fn, p)[0])
        return [checkpoint_forward(kind, k, p, h, x, y, split)[1] for k in range(1, len(kind.options))]

    checkpoints = jax.eval_shape(trace, params, hidden, x, y)
    inputs = tuple(len(jax.tree.leaves(part(kind.inputs, i))) if split else 0 for i in range(len(kind.pieces)))
    return StageLayout(tuple(found), inputs, ((),) + tuple(_shapes(c) for c in checkpoints))
