"""Chains: the Rotor / Revolve setting as a remat graph, and recognising such a graph.

Layer i (0 <= i < n) of a chain has a forward node ``f{i}`` and a backward node ``b{i}``:

* ``f{i}`` reads ``f{i-1}`` (``f0`` reads nothing: the input is not part of the graph), costs
  ``forward_cost[i]`` and outputs ``output_size[i]`` bytes, the activation the next layer reads;
* ``b{i}`` reads ``b{i+1}`` (the incoming gradient; none for the last layer), ``f{i}`` and
  ``f{i-1}`` (for i > 0), costs ``backward_cost[i]`` and outputs ``gradient_size[i]`` bytes (the
  gradient with respect to the layer's input; by default the size of that input).

So the values a layer's backward needs are its input ``f{i-1}`` and its output ``f{i}``: the layer's
output doubles as its saved tape (Rotor's x-bar_i = x_i). `chain_layout` also recognises chains
whose first layer has no backward node (the Checkmate VGG graphs compute no gradient for the
network input; their loss node is the last layer): that layer's backward cost and gradient size
are then 0 and its `ChainLayout.backward` entry is None. A layer whose backward keeps residuals
larger than its output is modelled by giving ``output_size`` the residual size (conservative).
This is the public ``chain_*`` instances' structure (SOURCE.md) with per-layer numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

from pipesched._common import FormatError
from pipesched.remat._model import RematInstance, RematNode


@dataclasses.dataclass(frozen=True)
class Chain:
    """Per-layer numbers of a chain, layer 0 first."""

    forward_cost: tuple[float, ...]
    backward_cost: tuple[float, ...]
    output_size: tuple[float, ...]
    gradient_size: tuple[float, ...]

    def __post_init__(self) -> None:
        n = len(self.forward_cost)
        if n == 0:
            raise FormatError("chain: needs at least one layer")
        for name in ("forward_cost", "backward_cost", "output_size", "gradient_size"):
            values = tuple(getattr(self, name))
            object.__setattr__(self, name, values)
            if len(values) != n:
                raise FormatError(f"chain.{name}: expected {n} values (one per layer), got {len(values)}")
            bad = [i for i, v in enumerate(values) if not v >= 0]
            if bad:
                raise FormatError(f"chain.{name}[{bad[0]}]: must be >= 0, got {values[bad[0]]}")

    @property
    def length(self) -> int:
        return len(self.forward_cost)

    @classmethod
    def homogeneous(cls, length: int, *, forward_cost: float = 1, backward_cost: float = 1,
                    size: float = 1) -> Chain:
        return cls((forward_cost,) * length, (backward_cost,) * length, (size,) * length, (size,) * length)


def forward_id(i: int) -> str:
    return f"f{i}"


def backward_id(i: int) -> str:
    return f"b{i}"


def make_chain(forward_cost: Sequence[float], backward_cost: Sequence[float],
               output_size: Sequence[float], gradient_size: Sequence[float] | None = None) -> Chain:
    """A chain; `gradient_size` defaults to each layer's input size (layer 0: its output size)."""
    if gradient_size is None:
        gradient_size = [output_size[max(i - 1, 0)] for i in range(len(output_size))]
    return Chain(tuple(forward_cost), tuple(backward_cost), tuple(output_size), tuple(gradient_size))


def chain_instance(chain: Chain, budget: float, name: str = "chain") -> RematInstance:
    """The remat graph of `chain` (module docstring) under `budget`, default order f0..f{n-1},
    b{n-1}..b0."""
    n = chain.length
    forward = [RematNode(forward_id(i), chain.forward_cost[i], chain.output_size[i],
                         (forward_id(i - 1),) if i else (), backward=False) for i in range(n)]
    backward = []
    for i in reversed(range(n)):
        deps = ((backward_id(i + 1),) if i < n - 1 else ()) + (forward_id(i),) + (
            (forward_id(i - 1),) if i else ())
        backward.append(RematNode(backward_id(i), chain.backward_cost[i], chain.gradient_size[i], deps,
                                  backward=True))
    return RematInstance(name, tuple(forward + backward), budget)


class ChainLayout(NamedTuple):
    """A graph recognised as a chain: its numbers and the node index of each f_i and b_i (b_0 may
    be None: module docstring)."""

    chain: Chain
    forward: tuple[int, ...]
    backward: tuple[int | None, ...]


def chain_layout(instance: RematInstance) -> ChainLayout | None:
    """The chain structure of `instance` (module docstring) whatever its ids and node order, or
    None when the graph is not such a chain."""
    nodes, deps, users = instance.nodes, instance.dep_indices, instance.users
    n = (len(nodes) + 1) // 2
    first_backward = len(nodes) % 2 == 0  # else layer 0 has no backward node
    sources = [i for i, d in enumerate(deps) if not d]
    if len(sources) != 1:
        return None
    forward = [sources[0]]
    for _ in range(n - 1):
        nxt = [u for u in users[forward[-1]] if deps[u] == (forward[-1],)]
        if len(nxt) != 1:
            return None
        forward.append(nxt[0])
    backward: list[int | None] = [None] * n
    for i in reversed(range(0 if first_backward else 1, n)):
        wanted = {forward[i]} | ({forward[i - 1]} if i else set())
        if i < n - 1:
            wanted.add(backward[i + 1])
        found = [u for u in users[forward[i]] if set(deps[u]) == wanted and len(deps[u]) == len(wanted)
                 and u not in forward]
        if len(found) != 1:
            return None
        backward[i] = found[0]
    if len(set(forward) | (set(backward) - {None})) != len(nodes):
        return None
    def backward_numbers(attribute: str) -> tuple[float, ...]:
        return tuple(0 if b is None else getattr(nodes[b], attribute) for b in backward)
    chain = Chain(tuple(nodes[i].cost for i in forward), backward_numbers("cost"),
                  tuple(nodes[i].memory for i in forward), backward_numbers("memory"))
    return ChainLayout(chain, tuple(forward), tuple(backward))
