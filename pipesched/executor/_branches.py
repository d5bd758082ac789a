"""The `lax.switch` branches of the compiled program: one per (stage kind, op), each reading the
packed slot values of its tick and returning the packed values to keep (`Emit`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pipesched.executor._plan import LOCAL, op_option
from pipesched.executor._stage_ops import (
    Leaves,
    StageKind,
    StageLayout,
    backward,
    checkpoint_forward,
    forward,
    forward_residuals,
    op_inputs,
    recompute,
    weight_grad,
)

POOLS = ("residual", "checkpoint", "stash_inputs", "stash_grads")  # the slot pools a branch may write


class Flat(NamedTuple):
    """How a list of arrays of one stage kind packs into a flat float32 vector (one slot of a pool):
    float32 as is, other 4-byte types bit-cast, smaller types converted exactly."""

    shapes: tuple[jax.ShapeDtypeStruct, ...]

    @property
    def size(self) -> int:
        return sum(int(np.prod(a.shape)) for a in self.shapes)

    def pack(self, leaves: Leaves, length: int) -> jax.Array:
        parts = [_to_f32(a).ravel() for a in leaves]
        return jnp.pad(jnp.concatenate(parts), (0, length - self.size)) if parts else jnp.zeros(length, jnp.float32)

    def unpack(self, flat: jax.Array) -> Leaves:
        leaves, offset = [], 0
        for a in self.shapes:
            n = int(np.prod(a.shape))
            leaves.append(_from_f32(flat[offset:offset + n].reshape(a.shape), a.dtype))
            offset += n
        return leaves


def _to_f32(a: jax.Array) -> jax.Array:
    if a.dtype == jnp.float32:
        return a
    if jnp.dtype(a.dtype).itemsize == 4:
        return lax.bitcast_convert_type(a, jnp.float32)
    return a.astype(jnp.float32)


def _from_f32(a: jax.Array, dtype) -> jax.Array:
    if dtype == jnp.float32:
        return a
    if jnp.dtype(dtype).itemsize == 4:
        return lax.bitcast_convert_type(a, dtype)
    return a.astype(dtype)


class Emit(NamedTuple):
    """What a branch produces: packed slot values (zeros when it keeps none) and, per kind, a
    parameter gradient (zeros for the kinds it does not run)."""

    out: jax.Array  # the hidden state or input gradient sent on
    loss: jax.Array
    residual: jax.Array
    checkpoint: jax.Array
    stash_inputs: jax.Array
    stash_grads: jax.Array
    grads: tuple[Leaves, ...]


class Layout(NamedTuple):
    """Per kind the packing of each pool's values (per remat option for `checkpoint`); parameter shapes."""

    hidden: jax.ShapeDtypeStruct
    residual: tuple[Flat, ...]
    checkpoint: tuple[tuple[Flat, ...], ...]
    stash_inputs: tuple[Flat, ...]
    stash_grads: tuple[Flat, ...]
    params: tuple[Leaves, ...]

    def length(self, pool: str) -> int:
        """Floats in one slot of `pool`: its largest packed value over the kinds (and options)."""
        flats = getattr(self, pool)
        return max(1, max(f.size for f in (sum(flats, ()) if pool == "checkpoint" else flats)))

    def zero_grads(self) -> tuple[Leaves, ...]:
        return tuple([_zeros(a) for a in kind] for kind in self.params)


def _zeros(a) -> jax.Array:
    return jnp.zeros(a.shape, a.dtype)


def _flat(leaves) -> Flat:
    return Flat(tuple(jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)) for a in leaves))


def make_layout(hidden_shape: tuple[int, ...], kinds: list[StageKind], stages: list[StageLayout],
                params: list, split: bool) -> Layout:
    """The packing of every pool for `kinds` (their stage layouts and parameters)."""
    return Layout(
        hidden=jax.ShapeDtypeStruct(hidden_shape, jnp.float32),
        residual=tuple(_flat(st.stored) for st in stages),
        checkpoint=tuple(tuple(_flat(c) for c in st.checkpoints) for st in stages),
        stash_inputs=tuple(_flat(jax.tree.leaves(k.inputs) if split else []) for k in kinds),
        stash_grads=tuple(_flat(jax.tree.leaves(k.taps) if split else []) for k in kinds),
        params=tuple(jax.tree.leaves(p) for p in params))


def applies(op: str, kind: StageKind, split: bool) -> bool:
    """Whether a stage of `kind` can run branch `op` (W and RW need split backward, `R:k` the
    model's remat option k)."""
    base, option = op_option(op)
    return (split or base not in ("W", "RW")) and option < len(kind.options)


def writer(op: str, c: int, split: bool) -> np.ndarray:
    """Per branch, the kind whose (POOLS..., grads) it writes, or -1."""
    base, option = op_option(op)
    keeps = base in ("F", "R")
    writes = {"residual": keeps, "checkpoint": base == "Fr" and option > 0,
              "stash_inputs": split and (keeps or base == "RW"), "stash_grads": split and base == "B"}
    accumulates = base == "W" or (base == "B" and not split)
    return np.array([c if writes[pool] else -1 for pool in POOLS] + [c if accumulates else -1], np.int32)


def idle(layout: Layout) -> Callable:
    def run(h, x, y, params, residual, checkpoint, stash_inputs, stash_grads, row) -> Emit:
        return emit(layout)
    return run


def emit(layout: Layout, c: int | None = None, out=None, loss=None, grads: Leaves | None = None, option: int = 0,
         **pools: Leaves) -> Emit:
    """An Emit with the given values of kind c (`pools`: leaves per pool name; a checkpoint is
    remat option `option`'s), packed, and zeros elsewhere."""
    def packed(pool: str) -> jax.Array:
        length = layout.length(pool)
        if pool not in pools:
            return jnp.zeros(length, jnp.float32)
        flat = layout.checkpoint[c][option] if pool == "checkpoint" else getattr(layout, pool)[c]
        return flat.pack(pools[pool], length)
    zero_grads = layout.zero_grads()
    if grads is not None:
        zero_grads = zero_grads[:c] + (grads,) + zero_grads[c + 1:]
    return Emit(_zeros(layout.hidden) if out is None else out, jnp.zeros((), jnp.float32) if loss is None else loss,
                *(packed(pool) for pool in POOLS), zero_grads)


def branch(op: str, c: int, kind: StageKind, stage: StageLayout, param_tree, last: bool, split: bool, M: int,
           layout: Layout) -> Callable:
    """The lax.switch branch running `op` of a stage of kind c."""
    leaves = jax.tree.leaves
    base, option = op_option(op)

    def sent(out) -> dict:
        """A forward's output: the last stage's loss is averaged, a hidden state is sent on."""
        return {"loss": out / M} if last else {"out": out}

    def stored(pieces) -> dict:
        """What the pieces leave for the backward, by pool."""
        inputs = {"stash_inputs": [a for k in pieces for a in k.inputs]} if split else {}
        return {"residual": [a for k in pieces for a in k.residuals], **inputs}

    def run(h, x, y, params, residual, checkpoint, stash_inputs, stash_grads, row) -> Emit:
        p = jax.tree.unflatten(param_tree, [a[row[LOCAL]] for a in params[c]])
        if base == "Fr" and option == 0:
            return emit(layout, c, **sent(forward(kind, p, h, x, y)))
        if base == "Fr":
            out, saved = checkpoint_forward(kind, option, p, h, x, y, split)
            return emit(layout, c, checkpoint=saved, option=option, **sent(out))
        if base == "R" and option > 0:
            saved = layout.checkpoint[c][option].unpack(checkpoint)
            return emit(layout, c, **stored(recompute(kind, option, stage, p, h, x, y, saved, split)))
        if base in ("F", "R"):
            out, pieces = forward_residuals(kind, p, h, x, y, split)
            return emit(layout, c, **stored(pieces), **(sent(out) if base == "F" else {}))
        if base == "B":
            g = jnp.asarray(1.0 / M, jnp.float32) if last else h
            dh, grads = backward(kind, stage, layout.residual[c].unpack(residual), p, g, split)
            return emit(layout, c, out=dh, **({"stash_grads": leaves(grads)} if split else {"grads": leaves(grads)}))
        if base == "RW":
            return emit(layout, c, stash_inputs=leaves(op_inputs(kind, p, h, x, y)))
        inputs = jax.tree.unflatten(jax.tree.structure(kind.inputs), layout.stash_inputs[c].unpack(stash_inputs))
        dtaps = jax.tree.unflatten(jax.tree.structure(kind.taps), layout.stash_grads[c].unpack(stash_grads))
        return emit(layout, c, grads=leaves(weight_grad(kind, p, inputs, dtaps)))

    return run
