"""Remat graphs traced from a JAX loss, and remat schedules applied back to that loss.

Graph model (what `remat_instance_from_jax` builds):

* The loss is traced with `jax.make_jaxpr` and cut into *blocks*. With ``granularity="names"``
  a block ends at every `checkpoint_name(value, name)` (a fused layer block, named after its
  value), with ``granularity="equations"`` every equation is a block. The last block ("output")
  computes the loss from the others. A block reads block values, parameters and data; unnamed
  values it needs from earlier blocks are recomputed inside it (so a block is a pure function of
  block values, parameters and data).
* Forward node ``NAME`` computes block NAME; ``memory`` = bytes of its value; ``cost`` = its FLOPs.
* Backward node ``grad:NAME`` runs the VJP of block NAME, recomputing the block's internals from
  its inputs (exactly as `apply` runs it). It reads the backward nodes of the block's users (the
  cotangent of NAME is their sum) and the block's inputs that the traced VJP really reads (from
  ``jax.make_jaxpr`` of the pullback); its value is the cotangents of the block's inputs
  (``memory`` = their bytes); ``cost`` = FLOPs of the traced pullback. Blocks with integer
  values have no backward node.
* Parameters, data, parameter gradients and the loss are fixed memory, outside the graph.
* Only names visible in the top-level jaxpr count: a `checkpoint_name` inside `jax.jit`,
  `nnx.jit`, `lax.scan` or `jax.checkpoint` is part of the block that calls it.

FLOP model (`equation_flops`): ``dot_general`` 2 x (output size) x (contracted size);
convolutions 2 x (output size) x (kernel size / output features); layout-only primitives
(reshape, broadcast, transpose, slice, gather, ...) 0; reductions the input size; every other
primitive the output size; sub-jaxprs (jit, custom_jvp, checkpoint) are summed, scan bodies
multiplied by the trip count. Optional per-node timings can replace FLOPs (`time_nodes=True`).

`realized_steps(instance, kept)` is the schedule JAX runs when `apply` keeps `kept`
(pipesched/remat/_jax_apply.py); `policy_kept` expresses JAX's own policies as kept sets.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from pipesched._common import approx_eq, approx_le
from pipesched.remat._model import RematInstance, RematNode, RematSchedule, Step, evaluate_steps

GRAD_PREFIX = "grad:"
OUTPUT = "output"
GRANULARITIES = ("names", "equations")

_LAYOUT = frozenset({
    "reshape", "squeeze", "expand_dims", "broadcast_in_dim", "transpose", "name", "copy", "copy_p",
    "convert_element_type", "slice", "dynamic_slice", "dynamic_update_slice", "concatenate", "pad",
    "iota", "gather", "rev", "split", "bitcast_convert_type", "stop_gradient", "optimization_barrier",
})
_REDUCTIONS = frozenset({"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
                         "reduce_or", "argmax", "argmin", "cumsum", "cumprod", "cummax", "cumlogsumexp"})


# ---- FLOP model ---------------------------------------------------------------------------------
def _size(aval: Any) -> int:
    return math.prod(getattr(aval, "shape", ()))


def _bytes(aval: Any) -> int:
    dtype = getattr(aval, "dtype", None)
    return 0 if dtype is None or dtype == jax.dtypes.float0 else _size(aval) * np.dtype(dtype).itemsize


def equation_flops(eqn: jcore.JaxprEqn) -> int:
    """FLOPs of one equation under the model in the module docstring."""
    name = eqn.primitive.name
    out = sum(_size(v.aval) for v in eqn.outvars)
    subs = list(jcore.jaxprs_in_params(eqn.params))
    if subs:
        inner = sum(jaxpr_flops(j) for j in subs)
        return inner * int(eqn.params.get("length", 1))
    if name == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        shape = eqn.invars[0].aval.shape
        return 2 * out * math.prod(shape[d] for d in lhs_contract)
    if name == "conv_general_dilated":
        kernel = eqn.invars[1].aval.shape
        out_features = kernel[eqn.params["dimension_numbers"].rhs_spec[0]]
        return 2 * out * math.prod(kernel) // out_features
    if name in _LAYOUT:
        return 0
    if name in _REDUCTIONS:
        return sum(_size(v.aval) for v in eqn.invars)
    return out


def jaxpr_flops(jaxpr: jcore.Jaxpr | jcore.ClosedJaxpr) -> int:
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    return sum(equation_flops(e) for e in jaxpr.eqns)


# ---- blocks -------------------------------------------------------------------------------------
class Block(NamedTuple):
    """A pure piece of the traced loss: `outvars` as a function of `invars` through `eqns`."""

    name: str
    eqns: tuple[jcore.JaxprEqn, ...]
    invars: tuple[jcore.Var, ...]  # block values, parameters, data or constants it reads
    outvars: tuple[jcore.Var, ...]  # what it computes (before tagging)
    tagged: tuple[jcore.Var, ...]  # the vars that later blocks read for its value

    def as_function(self) -> Callable[..., list[jax.Array]]:
        effects = frozenset().union(*(e.effects for e in self.eqns))
        debug = jcore.DebugInfo("remat block", self.name, tuple(map(str, self.invars)),
                                tuple(map(str, self.outvars)))
        jaxpr = jcore.Jaxpr((), self.invars, self.outvars, self.eqns, effects, debug)
        return jcore.jaxpr_as_fun(jcore.ClosedJaxpr(jaxpr, ()))


class TracedLoss(NamedTuple):
    """A loss traced into blocks (in execution order, the output block last)."""

    jaxpr: jcore.ClosedJaxpr
    out_tree: Any
    blocks: tuple[Block, ...]


def _is_var(atom: Any) -> bool:
    return not isinstance(atom, jcore.Literal)


def _slice(eqns: Sequence[jcore.JaxprEqn], producer: dict[jcore.Var, int], roots: Iterable[Any],
           stop: set[jcore.Var]) -> tuple[tuple[jcore.JaxprEqn, ...], tuple[jcore.Var, ...]]:
    """The equations needed for `roots`, not looking past `stop` vars, and the vars read from outside."""
    needed: set[int] = set()
    leaves: dict[jcore.Var, None] = {}
    todo = [v for v in roots if _is_var(v)]
    seen: set[jcore.Var] = set()
    while todo:
        var = todo.pop()
        if var in seen:
            continue
        seen.add(var)
        if var in stop or var not in producer:
            leaves[var] = None
            continue
        k = producer[var]
        if k not in needed:
            needed.add(k)
            todo.extend(v for v in eqns[k].invars if _is_var(v))
    return tuple(eqns[k] for k in sorted(needed)), tuple(sorted(leaves, key=str))


def trace_loss(loss_fn: Callable[..., Any], *args: Any, granularity: str = "names") -> TracedLoss:
    """Trace `loss_fn(*args)` and cut it into blocks (see the module docstring)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), args)
    closed, out_shape = jax.make_jaxpr(loss_fn, return_shape=True)(*shapes)
    jaxpr = closed.jaxpr
    eqns = jaxpr.eqns
    producer = {v: k for k, e in enumerate(eqns) for v in e.outvars}
    if granularity == "names":
        roots = [(e.params["name"], (e.invars[0],), tuple(e.outvars))
                 for e in eqns if e.primitive.name == "name"]
    else:
        roots = [(f"e{k}.{e.primitive.name}", tuple(e.outvars), tuple(e.outvars)) for k, e in enumerate(eqns)]
    names = [r[0] for r in roots] + [OUTPUT]
    if len(set(names)) != len(names):
        dup = next(n for n, c in collections.Counter(names).items() if c > 1)
        raise ValueError(f"checkpoint_name {dup!r} is used twice (or is {OUTPUT!r}, the loss block): "
                         "give every named value a unique name")
    stop = {v for _, _, tagged in roots for v in tagged} | set(jaxpr.invars) | set(jaxpr.constvars)
    blocks = []
    for name, outvars, tagged in roots:
        body, invars = _slice(eqns, producer, outvars, stop - set(tagged))
        blocks.append(Block(name, body, invars, outvars, tagged))
    results = tuple(v for v in dict.fromkeys(jaxpr.outvars) if _is_var(v) and v not in stop)
    if results:
        body, invars = _slice(eqns, producer, results, stop)
        blocks.append(Block(OUTPUT, body, invars, results, results))
    return TracedLoss(closed, jax.tree.structure(out_shape), _reachable(blocks, jaxpr.outvars))


def _reachable(blocks: list[Block], results: Sequence[Any]) -> tuple[Block, ...]:
    """The blocks the results depend on, in order."""
    owner = {v: b for b in blocks for v in b.tagged}
    live = {owner[v].name for v in results if _is_var(v) and v in owner}
    for block in reversed(blocks):
        if block.name in live:
            live.update(owner[v].name for v in block.invars if v in owner)
    return tuple(b for b in blocks if b.name in live)


# ---- the remat instance -------------------------------------------------------------------------
def _pullback_jaxpr(block: Block) -> tuple[jcore.ClosedJaxpr, int]:
    """Jaxpr of (block inputs, output cotangents) -> input cotangents; the number of inputs."""
    fn = block.as_function()
    ins = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in block.invars]
    cts = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in block.outvars]

    def pullback(ins: list[Any], cts: list[Any]) -> Any:
        return jax.vjp(fn, *ins)[1](cts)

    return jax.make_jaxpr(pullback)(ins, cts), len(ins)


def _backward(block: Block) -> tuple[int, set[int]]:
    """FLOPs of the block's pullback and the positions of the inputs it reads."""
    closed, n_in = _pullback_jaxpr(block)
    jaxpr = closed.jaxpr
    producer = {v: k for k, e in enumerate(jaxpr.eqns) for v in e.outvars}
    body, leaves = _slice(jaxpr.eqns, producer, jaxpr.outvars, set())
    position = {v: i for i, v in enumerate(jaxpr.invars[:n_in])}
    return sum(equation_flops(e) for e in body), {position[v] for v in leaves if v in position}


def _differentiable(var: jcore.Var) -> bool:
    return jnp.issubdtype(var.aval.dtype, jnp.inexact)


def remat_instance_from_jax(loss_fn: Callable[..., Any], *args: Any, name: str = "jax",
                            budget: float | None = None, granularity: str = "names",
                            time_nodes: bool = False) -> RematInstance:
    """The remat graph (forward and backward) of `loss_fn(*args)`, as described in the module docstring.

    `budget` defaults to the reference peak (no remat needed). With `time_nodes=True` node costs
    are measured microseconds of each jitted block forward / pullback instead of FLOPs.
    """
    traced = trace_loss(loss_fn, *args, granularity=granularity)
    owner = {v: b.name for b in traced.blocks for v in b.tagged}
    users: dict[str, list[str]] = collections.defaultdict(list)
    for block in traced.blocks:
        for v in block.invars:
            if v in owner and block.name not in users[owner[v]]:
                users[owner[v]].append(block.name)
    graded = {b.name for b in traced.blocks if any(_differentiable(v) for v in b.outvars)}
    forward, backward = [], []
    for block in traced.blocks:
        deps = tuple(dict.fromkeys(owner[v] for v in block.invars if v in owner))
        cost = _time_forward(block) if time_nodes else sum(equation_flops(e) for e in block.eqns)
        forward.append(RematNode(block.name, cost, sum(_bytes(v.aval) for v in block.outvars), deps, False))
        if block.name not in graded:
            continue
        flops, read = _backward(block)
        reads = [owner[block.invars[i]] for i in sorted(read) if block.invars[i] in owner]
        grads = [GRAD_PREFIX + u for u in users[block.name] if u in graded]
        cotangents = sum(_bytes(v.aval) for v in block.invars if v in owner and _differentiable(v))
        cost = _time_backward(block) if time_nodes else flops
        backward.append(RematNode(GRAD_PREFIX + block.name, cost, cotangents,
                                  tuple(dict.fromkeys(grads + reads)), True))
    instance = RematInstance(name, (*forward, *reversed(backward)), 0)
    return instance.with_budget(instance.reference_peak if budget is None else budget)


def _median_us(fn: Callable[..., Any], *xs: Any, repeats: int = 5) -> int:
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*xs))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*xs))
        times.append(time.perf_counter() - start)
    return max(1, round(1e6 * sorted(times)[len(times) // 2]))


def _zeros(vars_: Iterable[jcore.Var]) -> list[jax.Array]:
    return [jnp.zeros(v.aval.shape, v.aval.dtype) for v in vars_]


def _time_forward(block: Block) -> int:
    return _median_us(block.as_function(), *_zeros(block.invars))


def _time_backward(block: Block) -> int:
    fn = block.as_function()
    ins, cts = _zeros(block.invars), _zeros(block.outvars)
    return _median_us(lambda ins, cts: jax.vjp(lambda *xs: fn(*xs), *ins)[1](cts), ins, cts)


# ---- schedules <-> JAX --------------------------------------------------------------------------
def forward_ids(instance: RematInstance) -> list[str]:
    return [n.id for n in instance.nodes if not n.id.startswith(GRAD_PREFIX)]


def kept_names(schedule: RematSchedule) -> tuple[str, ...]:
    """The forward values `schedule` computes exactly once (the ones JAX should save)."""
    counts = collections.Counter(node for kind, node in schedule.steps if kind == "compute")
    return tuple(n for n in forward_ids(schedule.instance) if counts[n] == 1)


def realized_steps(instance: RematInstance, kept: Iterable[str]) -> list[Step]:
    """The steps JAX runs when it saves `kept` (on a graph from `remat_instance_from_jax`).

    Forward: every forward node in order. Backward: before each backward node, recompute
    (depth-first, once) the forward values it needs that were not kept. Every copy of a value is
    freed right after its last reader.
    """
    kept = set(kept)
    fwd = [i for i, n in enumerate(instance.nodes) if not n.id.startswith(GRAD_PREFIX)]
    resident = [instance.nodes[i].id in kept for i in range(len(instance.nodes))]
    sequence = list(fwd)

    def ensure(i: int) -> None:
        if not resident[i]:
            for d in instance.dep_indices[i]:
                ensure(d)
            sequence.append(i)
            resident[i] = True

    for i, node in enumerate(instance.nodes):
        if node.id.startswith(GRAD_PREFIX):
            ensure(i)
    steps: list[Step] = []
    frees: dict[int, list[int]] = collections.defaultdict(list)
    for pos, i in enumerate(sequence):
        frees[_last_reader(instance, sequence, pos)].append(i)
        steps.append(("compute", instance.nodes[i].id))
        steps.extend(("free", instance.nodes[v].id) for v in frees.pop(pos, ()))
    return steps


def _last_reader(instance: RematInstance, sequence: Sequence[int], pos: int) -> int:
    """Position of the last reader of the copy computed at `pos` (before the value is recomputed)."""
    value, end = sequence[pos], pos
    for later in range(pos + 1, len(sequence)):
        if sequence[later] == value:
            break
        if value in instance.dep_indices[sequence[later]]:
            end = later
    return end


JAX_POLICIES = ("nothing_saveable", "dots_saveable", "everything_saveable")


def policy_kept(traced: TracedLoss, policy: str) -> tuple[str, ...]:
    """JAX's own policy as the block values it keeps: `nothing_saveable` none, `dots_saveable` the
    blocks whose value is the output of a `dot_general`, `everything_saveable` all."""
    if policy == "nothing_saveable":
        return ()
    if policy == "everything_saveable":
        return tuple(b.name for b in traced.blocks)
    if policy == "dots_saveable":
        return tuple(b.name for b in traced.blocks
                     if b.eqns and b.eqns[-1].primitive.name == "dot_general"
                     and tuple(b.eqns[-1].outvars) == b.outvars)
    raise ValueError(f"policy must be one of {JAX_POLICIES}, got {policy!r}")


def policy_schedule(instance: RematInstance, traced: TracedLoss, policy: str) -> RematSchedule:
    """JAX's `policy` as a schedule of `instance` (a graph of `traced`): the steps JAX runs
    (`realized_steps`); status "unknown" (no schedule) when they exceed the budget.

    Lower bound: the no-remat cost (every node is computed at least once, costs are >= 0).
    """
    started = time.perf_counter()
    solver = f"jax-{policy}"
    steps = realized_steps(instance, policy_kept(traced, policy))
    cost, peak = evaluate_steps(instance, steps, enforce_budget=False)
    if not approx_le(peak, instance.budget):
        return RematSchedule.empty(instance, status="unknown", lower_bound=instance.total_cost, solver=solver,
                                   solve_time_s=time.perf_counter() - started)
    status = "optimal" if approx_eq(cost, instance.total_cost) else "feasible"
    return RematSchedule.from_steps(instance, steps, lower_bound=instance.total_cost, status=status,
                                    solver=solver, solve_time_s=time.perf_counter() - started)
