"""Grouped matrix multiplication in Pallas (megablox-style), with `jax.lax.ragged_dot` as reference.

``lhs`` holds tokens sorted by group (expert): rows ``[offset[g], offset[g] + group_sizes[g])``
belong to group g and are multiplied by ``rhs[g]``; rows past ``sum(group_sizes)`` give zeros,
as in ``ragged_dot``.

The grid is (row tiles, output-feature tiles). Unlike megablox, which revisits an output tile once
per group crossing it (TPU keeps the tile resident between consecutive grid steps), each program
here owns its output tile and loops over the groups that intersect its rows, keeping the rows of
each group with a mask. Output tiles are written exactly once, so programs are independent and the
kernel needs no scalar prefetch: it lowers with Triton on GPU and runs in interpret mode anywhere.
Empty groups are skipped; a tile past the last grouped row writes zeros.

Differentiable in lhs and rhs (a custom VJP, megablox's gmm/tgmm pair): d lhs is this kernel on
d out and the transposed rhs; d rhs[g] = lhs[rows of g]^T @ d out[rows of g] is a second kernel,
`transposed_grouped_matmul`, whose programs each own one (group, k tile, n tile) of the (E, k, n)
result and loop over the row tiles of their group.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton


class Tiling(NamedTuple):
    """Tile sizes over tokens (m), contracted features (k) and output features (n); compiled,
    also Triton's warps per program and software-pipelining stages (None: Triton's default)."""

    m: int = 64
    k: int = 64
    n: int = 64
    warps: int | None = None
    stages: int | None = None


DEFAULT_TILING = Tiling()


def compiled_backend() -> bool:
    """Whether the default backend compiles this kernel (GPU, through Triton)."""
    return jax.default_backend() == "gpu"


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _fit(tile: int, size: int, minimum: int) -> int:
    """The tile, shrunk to the power of two covering `size` when `size` is smaller."""
    return max(minimum, min(tile, pl.next_power_of_2(size)))


def _offsets(group_sizes: jax.Array) -> jax.Array:
    """(E+1,) int32: group g owns rows offsets[g] to offsets[g + 1] - 1."""
    return jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(group_sizes).astype(jnp.int32)])


def _tile_groups(group_sizes: jax.Array, tm: int, num_tiles: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Group offsets (E+1,) and, per row tile, the first and last group owning one of its rows."""
    offsets = _offsets(group_sizes)
    ends = offsets[1:]
    first_row = jnp.arange(num_tiles, dtype=jnp.int32) * tm
    last_row = jnp.minimum(first_row + tm, ends[-1]) - 1
    first = jnp.searchsorted(ends, first_row, side="right").astype(jnp.int32)
    last = jnp.searchsorted(ends, last_row, side="right").astype(jnp.int32)
    return offsets, first, jnp.where(last_row >= first_row, last, first - 1)


def _whole(shape: tuple[int, ...]) -> pl.BlockSpec:
    """The whole array in every program (small int32 metadata, read a scalar at a time)."""
    return pl.BlockSpec(shape, lambda *program: (0,) * len(shape))


def _kernel(offsets_ref, first_ref, last_ref, lhs_ref, rhs_ref, out_ref, *, tm: int, tk: int,
            k_tiles: int, precision: jax.lax.Precision):
    tile = pl.program_id(0)
    rows = tile * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
    zeros = jnp.zeros(out_ref.shape, jnp.float32)

    def group_product(g):
        def k_step(kk, acc):
            x = lhs_ref[:, pl.ds(kk * tk, tk)]
            w = rhs_ref[g, pl.ds(kk * tk, tk), :]
            return acc + jnp.dot(x, w, preferred_element_type=jnp.float32, precision=precision)

        return jax.lax.fori_loop(0, k_tiles, k_step, zeros)

    def add_group(g, acc):
        start, end = offsets_ref[g], offsets_ref[g + 1]
        return jax.lax.cond(
            end > start,
            lambda: jnp.where((rows >= start) & (rows < end), group_product(g), acc),
            lambda: acc,
        )

    acc = jax.lax.fori_loop(first_ref[tile], last_ref[tile] + 1, add_group, zeros)
    out_ref[...] = acc.astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("tiling", "interpret", "preferred_element_type", "precision"))
def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
                   tiling: Tiling = DEFAULT_TILING, interpret: bool | None = None,
                   preferred_element_type: jnp.dtype | None = None,
                   precision: jax.lax.Precision = jax.lax.Precision.HIGHEST) -> jax.Array:
    """``out[rows of group g] = lhs[rows of group g] @ rhs[g]`` for lhs (m, k), rhs (E, k, n).

    `group_sizes` (E,) int32 must sum to at most m. `interpret=None` compiles on GPU and interprets
    elsewhere. Same result as ``jax.lax.ragged_dot(lhs, rhs, group_sizes)``, gradients included.
    `precision` of the float32 products: HIGHEST is IEEE float32 on GPU, DEFAULT lets Triton use
    TF32 (faster, about 1e-3 relative error); bfloat16 inputs are multiplied exactly either way.
    """
    if lhs.ndim != 2 or rhs.ndim != 3 or lhs.shape[1] != rhs.shape[1]:
        raise ValueError(f"grouped_matmul: expected lhs (m, k) and rhs (E, k, n), got {lhs.shape} and {rhs.shape}")
    if group_sizes.shape != (rhs.shape[0],):
        raise ValueError(f"grouped_matmul: group_sizes must have shape ({rhs.shape[0]},), got {group_sizes.shape}")
    options = _Options.resolve(tiling, interpret, precision)
    out_dtype = preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype)
    return _differentiable(options, jnp.dtype(out_dtype), lhs, rhs, group_sizes.astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("tiling", "interpret", "preferred_element_type", "precision"))
def transposed_grouped_matmul(lhs: jax.Array, dout: jax.Array, group_sizes: jax.Array, *,
                              tiling: Tiling = DEFAULT_TILING, interpret: bool | None = None,
                              preferred_element_type: jnp.dtype | None = None,
                              precision: jax.lax.Precision = jax.lax.Precision.HIGHEST) -> jax.Array:
    """``out[g] = lhs[rows of group g]^T @ dout[rows of group g]`` for lhs (m, k), dout (m, n): the
    (E, k, n) gradient of `grouped_matmul` in rhs. Empty groups give zeros."""
    if lhs.ndim != 2 or dout.ndim != 2 or lhs.shape[0] != dout.shape[0]:
        raise ValueError(f"transposed_grouped_matmul: expected lhs (m, k) and dout (m, n), got {lhs.shape} and "
                         f"{dout.shape}")
    if group_sizes.ndim != 1:
        raise ValueError(f"transposed_grouped_matmul: group_sizes must be 1-D, got shape {group_sizes.shape}")
    options = _Options.resolve(tiling, interpret, precision)
    out_dtype = preferred_element_type or jnp.result_type(lhs.dtype, dout.dtype)
    return _transposed(options, jnp.dtype(out_dtype), lhs, dout, group_sizes.astype(jnp.int32))


class _Options(NamedTuple):
    tiling: Tiling
    interpret: bool
    precision: jax.lax.Precision

    @classmethod
    def resolve(cls, tiling: Tiling, interpret: bool | None, precision: jax.lax.Precision) -> _Options:
        """`interpret=None`: compile on GPU, interpret elsewhere."""
        return cls(tiling, not compiled_backend() if interpret is None else interpret, precision)

    def tiles(self, *sizes: int) -> list[int]:
        """Tiles (m, k, n order) fitted to the sizes; Triton's dot needs tiles of at least 16."""
        minimum = 1 if self.interpret else 16
        return [_fit(tile, size, minimum) for tile, size in zip(self.tiling[:3], sizes)]

    def compiler_params(self):
        return None if self.interpret else pl_triton.CompilerParams(num_warps=self.tiling.warps,
                                                                    num_stages=self.tiling.stages)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _differentiable(options: _Options, out_dtype: jnp.dtype, lhs: jax.Array, rhs: jax.Array,
                    group_sizes: jax.Array) -> jax.Array:
    return _forward(options, out_dtype, lhs, rhs, group_sizes)


def _differentiable_fwd(options, out_dtype, lhs, rhs, group_sizes):
    return _forward(options, out_dtype, lhs, rhs, group_sizes), (lhs, rhs, group_sizes)


def _differentiable_bwd(options, out_dtype, residuals, dout):
    """Rows past the groups had zero outputs, so they get zero gradients from both products. The
    cotangent is cast to the operands' dtype, as megablox does: bfloat16 operands keep bfloat16
    products (accumulated in float32) in the backward pass too."""
    lhs, rhs, group_sizes = residuals
    dout = dout.astype(jnp.promote_types(lhs.dtype, rhs.dtype))
    dlhs = _forward(options, lhs.dtype, dout, jnp.swapaxes(rhs, 1, 2), group_sizes)
    drhs = _transposed(options, rhs.dtype, lhs, dout, group_sizes)
    return dlhs, drhs, None


_differentiable.defvjp(_differentiable_fwd, _differentiable_bwd)


def _forward(options: _Options, out_dtype: jnp.dtype, lhs: jax.Array, rhs: jax.Array,
             group_sizes: jax.Array) -> jax.Array:
    (m, k), n = lhs.shape, rhs.shape[2]
    tm, tk, tn = options.tiles(m, k, n)
    mp, kp, np_ = _round_up(m, tm), _round_up(k, tk), _round_up(n, tn)
    lhs = jnp.pad(lhs, ((0, mp - m), (0, kp - k)))
    rhs = jnp.pad(rhs, ((0, 0), (0, kp - k), (0, np_ - n)))
    num_groups = rhs.shape[0]
    offsets, first, last = _tile_groups(group_sizes, tm, mp // tm)
    out = pl.pallas_call(
        functools.partial(_kernel, tm=tm, tk=tk, k_tiles=kp // tk, precision=options.precision),
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        grid=(mp // tm, np_ // tn),
        in_specs=[
            _whole((num_groups + 1,)),
            _whole((mp // tm,)),
            _whole((mp // tm,)),
            pl.BlockSpec((tm, kp), lambda i, j: (i, 0)),
            pl.BlockSpec((num_groups, kp, tn), lambda i, j: (0, 0, j)),
        ],
        out_specs=pl.BlockSpec((tm, tn), lambda i, j: (i, j)),
        interpret=options.interpret,
        compiler_params=options.compiler_params(),
        name="grouped_matmul",
    )(offsets, first, last, lhs, rhs)
    return out[:m, :n]


def _transposed_kernel(offsets_ref, lhs_ref, dout_ref, out_ref, *, tm: int, precision: jax.lax.Precision):
    g = pl.program_id(0)
    start, end = offsets_ref[g], offsets_ref[g + 1]

    def row_tile(t, acc):
        rows = t * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
        x = jnp.where((rows >= start) & (rows < end), lhs_ref[pl.ds(t * tm, tm), :], 0)
        dy = dout_ref[pl.ds(t * tm, tm), :]
        common = jnp.promote_types(x.dtype, dy.dtype)  # (Triton multiplies equal types only)
        return acc + jax.lax.dot_general(x.astype(common), dy.astype(common), (((0,), (0,)), ((), ())),
                                         precision=precision, preferred_element_type=jnp.float32)

    zeros = jnp.zeros(out_ref.shape, jnp.float32)
    acc = jax.lax.fori_loop(start // tm, jnp.where(end > start, (end - 1) // tm + 1, 0), row_tile, zeros)
    out_ref[...] = acc.astype(out_ref.dtype)


def _transposed(options: _Options, out_dtype: jnp.dtype, lhs: jax.Array, dout: jax.Array,
                group_sizes: jax.Array) -> jax.Array:
    (m, k), n, num_groups = lhs.shape, dout.shape[1], group_sizes.shape[0]
    tm, tk, tn = options.tiles(m, k, n)
    mp, kp, np_ = _round_up(m, tm), _round_up(k, tk), _round_up(n, tn)
    lhs = jnp.pad(lhs, ((0, mp - m), (0, kp - k)))
    dout = jnp.pad(dout, ((0, mp - m), (0, np_ - n)))
    out = pl.pallas_call(
        functools.partial(_transposed_kernel, tm=tm, precision=options.precision),
        out_shape=jax.ShapeDtypeStruct((num_groups, kp, np_), out_dtype),
        grid=(num_groups, kp // tk, np_ // tn),
        in_specs=[
            _whole((num_groups + 1,)),
            pl.BlockSpec((mp, tk), lambda g, i, j: (0, i)),
            pl.BlockSpec((mp, tn), lambda g, i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((pl.squeezed, tk, tn), lambda g, i, j: (g, i, j)),
        interpret=options.interpret,
        compiler_params=options.compiler_params(),
        name="transposed_grouped_matmul",
    )(_offsets(group_sizes), lhs, dout)
    return out[:, :k, :n]


def grouped_matmul_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
                             precision: jax.lax.Precision = jax.lax.Precision.HIGHEST) -> jax.Array:
    """The reference: ``jax.lax.ragged_dot`` (float32 products at HIGHEST precision by default)."""
    return jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32), precision=precision,
                              preferred_element_type=jnp.result_type(lhs.dtype, rhs.dtype))
