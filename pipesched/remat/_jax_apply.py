"""Apply a remat schedule to the JAX loss its graph was traced from.

Two ways to realise "save the kept values, recompute the rest", both giving the same gradients:

* ``mode="explicit"`` (default): a `jax.custom_vjp`. Its forward rule runs the schedule's steps
  up to its first backward node and saves the block values resident there; its backward rule
  runs the remaining steps: a forward node is a recomputation of that block, ``grad:NAME`` the
  block's VJP (cotangents are summed per value). Given only names to keep, the steps are those
  of `realized_steps`: keep them, recompute the others once, just in time, depth-first.
  Recomputations and VJPs read their inputs through `_foil(x, token)`, a no-op for finite
  cotangents (x + 0 * token), the token taken from the latest cotangent. This dependency stops XLA
  from merging a recomputation with the forward computation (CSE) and from hoisting it before
  the backward reaches it: XLA:CPU drops `jax.checkpoint`'s optimization barriers, so there the
  JAX-native form below is undone and memory does not fall.
* ``mode="policy"``: the JAX-native form: every block is tagged with
  `checkpoint_name(value, block_name)` and the whole loss runs under
  ``jax.checkpoint(policy=save_only_these_names(*kept))``. Same gradients; on XLA:CPU the
  compiled memory does not fall (experiments/bench_remat_jax.md); where the compiler keeps the
  optimization barriers (GPU, TPU) it should, but that is not measured here.

Recomputations a schedule makes before its first backward node are not foiled: XLA may merge
them with the first computation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.extend import core as jcore

from pipesched.remat._jax_graph import GRAD_PREFIX, TracedLoss, kept_names, trace_loss
from pipesched.remat._model import RematSchedule

APPLY_MODES = ("explicit", "policy")


def apply(loss_fn: Callable[..., Any], schedule: RematSchedule | Iterable[str], *,
          granularity: str = "names", mode: str = "explicit") -> Callable[..., Any]:
    """`loss_fn` rewritten so that only the values `schedule` keeps are saved for the backward pass.

    `schedule` is a RematSchedule of a graph from `remat_instance_from_jax` with the same
    `granularity` (its kept values are the forward nodes computed exactly once), or the block
    names to keep. The result computes the same values as `loss_fn`; under `jax.grad` every
    other block value is recomputed. See the module docstring for `mode`.
    """
    if mode not in APPLY_MODES:
        raise ValueError(f"mode must be one of {APPLY_MODES}, got {mode!r}")
    steps = schedule.steps if isinstance(schedule, RematSchedule) else None
    kept = frozenset(kept_names(schedule) if steps is not None else schedule)

    @functools.wraps(loss_fn)
    def remat_loss(*args: Any) -> Any:
        traced = trace_loss(loss_fn, *args, granularity=granularity)
        unknown = kept - {b.name for b in traced.blocks}
        if unknown:
            raise ValueError(f"kept values {sorted(unknown)[:5]} are not blocks of the traced loss: "
                             f"build the schedule from remat_instance_from_jax(..., granularity={granularity!r})")
        if mode == "policy":
            run = _policy(traced, kept)
        else:
            run = _explicit(traced, _schedule_plan(traced, steps) if steps is not None
                            else _just_in_time_plan(traced, kept))
        return jax.tree.unflatten(traced.out_tree, run(jax.tree.leaves(args)))

    return remat_loss


# ---- JAX-native: names + policy -----------------------------------------------------------------
def _policy(traced: TracedLoss, kept: frozenset[str]) -> Callable[[list[Any]], list[Any]]:
    def run(flat_args: list[Any]) -> list[Any]:
        env = _inputs(traced, flat_args)
        for block in traced.blocks:
            values = jax.checkpoint(block.as_function())(*(env[v] for v in block.invars))
            env.update(zip(block.tagged, checkpoint_name(values, block.name)))
        return _outputs(traced, env)

    return jax.checkpoint(run, policy=jax.checkpoint_policies.save_only_these_names(*kept))


def _inputs(traced: TracedLoss, flat_args: Sequence[Any]) -> dict[jcore.Var, Any]:
    env: dict[jcore.Var, Any] = dict(zip(traced.jaxpr.jaxpr.constvars, traced.jaxpr.consts))
    env.update(zip(traced.jaxpr.jaxpr.invars, flat_args))
    return env


def _outputs(traced: TracedLoss, env: dict[jcore.Var, Any]) -> list[Any]:
    return [v.val if isinstance(v, jcore.Literal) else env[v] for v in traced.jaxpr.jaxpr.outvars]


# ---- explicit: custom_vjp following a plan ------------------------------------------------------
class _Step(NamedTuple):
    compute: bool  # False: free
    grad: bool  # True: the block's VJP, False: the block itself
    block: int


class _Plan(NamedTuple):
    """Steps run by the custom_vjp's forward (`prefix`) and backward (`backward`) rules."""

    prefix: tuple[_Step, ...]
    backward: tuple[_Step, ...]


def _schedule_plan(traced: TracedLoss, steps: Sequence[tuple[str, str]]) -> _Plan:
    """The schedule's own steps, split at its first backward step."""
    index = {block.name: b for b, block in enumerate(traced.blocks)}
    unknown = [n for _, n in steps if n.removeprefix(GRAD_PREFIX) not in index]
    if unknown:
        raise ValueError(f"schedule nodes {unknown[:3]} are not blocks of the traced loss: build the "
                         "schedule from remat_instance_from_jax with the same loss and granularity")
    plan = [_Step(kind == "compute", n.startswith(GRAD_PREFIX), index[n.removeprefix(GRAD_PREFIX)])
            for kind, n in steps]
    split = next((k for k, step in enumerate(plan) if step.grad), len(plan))
    return _Plan(tuple(plan[:split]), tuple(plan[split:]))


def _just_in_time_plan(traced: TracedLoss, kept: frozenset[str]) -> _Plan:
    """Forward: every block, keeping `kept`. Backward: each block's VJP in reverse order, after
    recomputing (depth-first, once) the inputs that were not kept (`realized_steps`)."""
    blocks = traced.blocks
    owner = _owners(traced)
    prefix = [_Step(True, False, b) for b in range(len(blocks))]
    prefix += [_Step(False, False, b) for b, block in enumerate(blocks) if block.name not in kept]
    resident = {b for b, block in enumerate(blocks) if block.name in kept}
    backward: list[_Step] = []

    def ensure(b: int) -> None:
        if b not in resident:
            for v in blocks[b].invars:
                if v in owner:
                    ensure(owner[v].block)
            backward.append(_Step(True, False, b))
            resident.add(b)

    for b in reversed(range(len(blocks))):
        for v in blocks[b].invars:
            if v in owner:
                ensure(owner[v].block)
        backward.append(_Step(True, True, b))
    return _Plan(tuple(prefix), tuple(backward))


class _Owner(NamedTuple):
    block: int
    position: int


def _owners(traced: TracedLoss) -> dict[jcore.Var, _Owner]:
    return {v: _Owner(b, k) for b, block in enumerate(traced.blocks) for k, v in enumerate(block.tagged)}


def _foil(x: Any, token: jax.Array) -> Any:
    """x + 0 * token: the same value, but XLA cannot prove it (0 * NaN is NaN), so no CSE."""
    if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
        return x
    return x + (0 * token).astype(jnp.result_type(x))


def _token(values: Sequence[Any]) -> jax.Array:
    first = next(c for c in values if jnp.issubdtype(jnp.result_type(c), jnp.inexact) and jnp.size(c))
    return jnp.ravel(first)[0]


def _zero_cotangent(var: jcore.Var) -> Any:
    if jnp.issubdtype(var.aval.dtype, jnp.inexact):
        return jnp.zeros(var.aval.shape, var.aval.dtype)
    return np.zeros(var.aval.shape, dtype=jax.dtypes.float0)


def _explicit(traced: TracedLoss, plan: _Plan) -> Callable[[list[Any]], list[Any]]:
    blocks, owner = traced.blocks, _owners(traced)
    functions = [block.as_function() for block in blocks]
    resident: set[int] = set()
    for step in plan.prefix:
        (resident.add if step.compute else resident.discard)(step.block)
    saved = sorted(resident)

    def lookup(env: dict[jcore.Var, Any], values: dict[int, list[Any]], var: jcore.Var) -> Any:
        if var not in owner:
            return env[var]
        b, k = owner[var]
        return values[b][k] if b in values else None

    def compute(env: dict[jcore.Var, Any], values: dict[int, list[Any]], b: int, token: Any = None) -> None:
        inputs = [lookup(env, values, v) for v in blocks[b].invars]
        if token is not None:
            inputs = [_foil(x, token) for x in inputs]
        values[b] = functions[b](*inputs)

    def forward(flat_args: list[Any]) -> tuple[list[Any], dict[int, list[Any]]]:
        env, values, results = _inputs(traced, flat_args), {}, {}
        for step in plan.prefix:
            if step.compute:
                compute(env, values, step.block)
                results.update(zip(blocks[step.block].tagged, values[step.block]))
            else:
                values.pop(step.block)
        outvars = traced.jaxpr.jaxpr.outvars
        if not all(isinstance(v, jcore.Literal) or v in results or v in env for v in outvars):
            results = _evaluate(traced, functions, env)  # the plan computes the loss only later
        return _outputs(traced, {**env, **results}), values

    @jax.custom_vjp
    def run(flat_args: list[Any]) -> list[Any]:
        return forward(flat_args)[0]

    def run_fwd(flat_args: list[Any]) -> tuple[list[Any], tuple[list[Any], list[list[Any]]]]:
        outputs, values = forward(flat_args)
        return outputs, (flat_args, [values[b] for b in saved])

    def run_bwd(residuals: tuple[list[Any], list[list[Any]]], out_cts: list[Any]) -> tuple[list[Any]]:
        flat_args, saved_values = residuals
        env = _inputs(traced, flat_args)
        values: dict[int, list[Any]] = dict(zip(saved, saved_values))
        cts: dict[jcore.Var, Any] = {}
        _accumulate(cts, traced.jaxpr.jaxpr.outvars, out_cts)
        token, done = _token(out_cts), set()
        for step in plan.backward:
            if not step.grad:
                if step.compute:
                    compute(env, values, step.block, token)
                else:
                    values.pop(step.block)
            elif step.compute and step.block not in done:  # a recomputed VJP is dead code: XLA drops it
                done.add(step.block)
                block = blocks[step.block]
                block_cts = [cts.pop(v, None) for v in block.tagged]
                if all(c is None for c in block_cts):
                    continue
                block_cts = [_zero_cotangent(v) if c is None else c for c, v in zip(block_cts, block.outvars)]
                token = _token(block_cts)
                inputs = [lookup(env, values, v) for v in block.invars]  # None: the VJP does not read it
                inputs = [jnp.zeros(v.aval.shape, v.aval.dtype) if x is None else _foil(x, token)
                          for x, v in zip(inputs, block.invars)]
                _, pullback = jax.vjp(functions[step.block], *inputs)
                input_cts = pullback(block_cts)
                _accumulate(cts, block.invars, input_cts)
                token = _token([*input_cts, token])
        return ([cts.get(v, _zero_cotangent(v)) for v in traced.jaxpr.jaxpr.invars],)

    run.defvjp(run_fwd, run_bwd)
    return run


def _accumulate(cts: dict[jcore.Var, Any], vars_: Sequence[Any], values: Sequence[Any]) -> None:
    for v, ct in zip(vars_, values):
        if not isinstance(v, jcore.Literal) and jnp.issubdtype(v.aval.dtype, jnp.inexact):
            cts[v] = cts[v] + ct if v in cts else ct


def _evaluate(traced: TracedLoss, functions: Sequence[Callable[..., Any]],
              env: dict[jcore.Var, Any]) -> dict[jcore.Var, Any]:
    """Plain evaluation of every block (no remat)."""
    env = dict(env)
    for block, fn in zip(traced.blocks, functions):
        env.update(zip(block.tagged, fn(*(env[v] for v in block.invars))))
    return env


# ---- measurement --------------------------------------------------------------------------------
class CompiledMemory(NamedTuple):
    """Bytes from `jax.jit(fn).lower(*args).compile().memory_analysis()`."""

    argument: int
    output: int
    alias: int
    temp: int

    @property
    def total(self) -> int:
        return self.argument + self.output - self.alias + self.temp


def compiled_memory(fn: Callable[..., Any], *args: Any) -> CompiledMemory:
    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    return CompiledMemory(stats.argument_size_in_bytes, stats.output_size_in_bytes,
                          stats.alias_size_in_bytes, stats.temp_size_in_bytes)


class MemoryReport(NamedTuple):
    """A schedule's predicted memory next to the compiled program's (`jax.grad` of the remat loss)."""

    predicted_peak: float  # the schedule's peak: block values and cotangents
    measured: CompiledMemory

    @property
    def fixed(self) -> int:
        """Memory outside the graph: parameters and data (arguments) and gradients (outputs)."""
        return self.measured.argument + self.measured.output - self.measured.alias

    @property
    def predicted_total(self) -> float:
        return self.predicted_peak + self.fixed

    @property
    def relative_gap(self) -> float:
        """(measured - predicted) / predicted, on the totals."""
        return (self.measured.total - self.predicted_total) / self.predicted_total


def memory_report(loss_fn: Callable[..., Any], args: Sequence[Any], schedule: RematSchedule, *,
                  mode: str = "explicit") -> MemoryReport:
    """Compile `jax.grad(apply(loss_fn, schedule, mode=mode))` for `args` and compare its memory
    with the schedule's prediction."""
    measured = compiled_memory(jax.grad(apply(loss_fn, schedule, mode=mode)), *args)
    return MemoryReport(schedule.peak_memory, measured)
