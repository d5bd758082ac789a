"""Rematerialization of one training graph (formats.md section 2): instance, schedule, validator."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from pipesched._common import (
    MAX_NUMBER,
    EMPTY_STATUSES,
    FormatError,
    JsonFile,
    ValidationError,
    approx_eq,
    approx_le,
    as_bool,
    as_list,
    as_mapping,
    as_number,
    as_str,
    check_format,
    check_result_claims,
    need,
    read_result_fields,
)

INSTANCE_FORMAT = "pipesched.remat-instance/1"
SCHEDULE_FORMAT = "pipesched.remat-schedule/1"
RULE = "2.2"

Step = tuple[str, str]  # ("compute" | "free", node id)


@dataclasses.dataclass(frozen=True)
class RematNode:
    id: str
    cost: float
    memory: float
    deps: tuple[str, ...] = ()
    backward: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "cost": self.cost, "memory": self.memory, "deps": list(self.deps)}
        if self.backward is not None:
            d["backward"] = self.backward
        return d


@dataclasses.dataclass(frozen=True)
class RematInstance(JsonFile):
    """A training graph (nodes in a topological order) and a memory budget."""

    name: str
    nodes: tuple[RematNode, ...]
    budget: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "nodes", tuple(self.nodes))
        as_list(self.nodes, "nodes", nonempty=True)
        as_number(self.budget, "budget")
        seen: dict[str, int] = {}
        for i, node in enumerate(self.nodes):
            key = f"nodes[{i}]"
            as_str(node.id, f"{key}.id")
            if node.id in seen:
                raise FormatError(f"{key}.id: duplicate id {node.id!r} (also nodes[{seen[node.id]}])")
            as_number(node.cost, f"{key}.cost")
            as_number(node.memory, f"{key}.memory")
            for j, dep in enumerate(node.deps):
                if dep == node.id:
                    raise FormatError(f"{key}.deps[{j}]: {node.id!r} depends on itself (cycle)")
                if dep not in seen:
                    where = [n.id for n in self.nodes[i + 1:]]
                    why = ("appears later: cycle or nodes not in topological order"
                           if dep in where else "unknown id")
                    raise FormatError(f"{key}.deps[{j}]: {dep!r} {why}")
            if len(set(node.deps)) != len(node.deps):
                raise FormatError(f"{key}.deps: duplicate dependency")
            seen[node.id] = i
        for what in ("cost", "memory"):
            total = sum(getattr(node, what) for node in self.nodes)
            if total > MAX_NUMBER:
                raise FormatError(f"nodes: the total {what} of all nodes is {total:.3g}, more than 2^53; "
                                  "use coarser units")

    # ---- derived views ---------------------------------------------------------------------
    @functools.cached_property
    def index(self) -> dict[str, int]:
        return {node.id: i for i, node in enumerate(self.nodes)}

    @functools.cached_property
    def dep_indices(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(self.index[d] for d in node.deps) for node in self.nodes)

    @functools.cached_property
    def users(self) -> tuple[tuple[int, ...], ...]:
        users: list[list[int]] = [[] for _ in self.nodes]
        for i, deps in enumerate(self.dep_indices):
            for d in deps:
                users[d].append(i)
        return tuple(tuple(u) for u in users)

    @property
    def total_cost(self) -> float:
        """The no-remat cost: every node computed once."""
        return sum(node.cost for node in self.nodes)

    def default_steps(self) -> list[Step]:
        """The default order, each value freed right after its last reader (formats.md 2.2)."""
        last_reader = {i: max(u, default=i) for i, u in enumerate(self.users)}
        frees_after: dict[int, list[int]] = {}
        for value, reader in last_reader.items():
            frees_after.setdefault(reader, []).append(value)
        steps: list[Step] = []
        for i, node in enumerate(self.nodes):
            steps.append(("compute", node.id))
            steps.extend(("free", self.nodes[v].id) for v in sorted(frees_after.get(i, ())))
        return steps

    @functools.cached_property
    def reference_peak(self) -> float:
        return evaluate_steps(self, self.default_steps(), enforce_budget=False).peak_memory

    def with_budget(self, budget: float) -> RematInstance:
        return dataclasses.replace(self, budget=budget)

    # ---- JSON ------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, obj: Any, *, embedded: bool = False) -> RematInstance:
        obj = as_mapping(obj, "instance" if embedded else "<root>")
        check_format(obj, INSTANCE_FORMAT, required=not embedded)
        nodes = []
        for i, raw in enumerate(as_list(need(obj, "nodes", ""), "nodes", nonempty=True)):
            key = f"nodes[{i}]"
            raw = as_mapping(raw, key)
            backward = raw.get("backward")
            nodes.append(RematNode(
                id=as_str(need(raw, "id", key), f"{key}.id"),
                cost=as_number(need(raw, "cost", key), f"{key}.cost"),
                memory=as_number(need(raw, "memory", key), f"{key}.memory"),
                deps=tuple(as_str(d, f"{key}.deps[{j}]")
                           for j, d in enumerate(as_list(need(raw, "deps", key), f"{key}.deps"))),
                backward=None if backward is None else as_bool(backward, f"{key}.backward"),
            ))
        return cls(name=as_str(need(obj, "name", ""), "name"), nodes=tuple(nodes),
                   budget=as_number(need(obj, "budget", ""), "budget"))

    def to_dict(self) -> dict[str, Any]:
        return {"format": INSTANCE_FORMAT, "name": self.name,
                "nodes": [n.to_dict() for n in self.nodes], "budget": self.budget}


class RematEvaluation(NamedTuple):
    cost: float
    peak_memory: float


def evaluate_steps(instance: RematInstance, steps: Iterable[Step], *, enforce_budget: bool = True
                   ) -> RematEvaluation:
    """Execute `steps` under the rules of formats.md 2.2; raise ValidationError at the first break.

    Rules, numbered in the order formats.md states them:
    1. compute v needs every dep of v resident;  2. compute v needs v not resident;
    3. memory while computing v (resident + memory(v)) <= budget;
    4. free v needs v resident;  5. every node is computed at least once.
    """
    index, nodes = instance.index, instance.nodes
    resident = [False] * len(nodes)
    computed = [False] * len(nodes)
    level = cost = peak = 0.0
    for k, (kind, node_id) in enumerate(steps):
        i = index[node_id]
        where = f"steps[{k}] {kind} {node_id!r}"
        if kind == "compute":
            missing = [nodes[d].id for d in instance.dep_indices[i] if not resident[d]]
            if missing:
                raise ValidationError(f"{RULE} rule 1", f"{where}: deps not resident: {missing}", node_id)
            if resident[i]:
                raise ValidationError(f"{RULE} rule 2", f"{where}: value already resident", node_id)
            during = level + nodes[i].memory
            if enforce_budget and not approx_le(during, instance.budget):
                raise ValidationError(
                    f"{RULE} rule 3", f"{where}: memory {during} exceeds budget {instance.budget}", node_id)
            peak = max(peak, during)
            level = during
            cost += nodes[i].cost
            resident[i] = computed[i] = True
        elif kind == "free":
            if not resident[i]:
                raise ValidationError(f"{RULE} rule 4", f"{where}: value not resident", node_id)
            level -= nodes[i].memory
            resident[i] = False
        else:
            raise FormatError(f"steps[{k}][0]: expected 'compute' or 'free', got {kind!r}")
    never = [n.id for n, c in zip(nodes, computed) if not c]
    if never:
        raise ValidationError(f"{RULE} rule 5", f"nodes never computed: {never[:5]}", never[0])
    return RematEvaluation(cost, peak)


@dataclasses.dataclass(frozen=True)
class RematSchedule(JsonFile):
    """A remat schedule result file (formats.md 2.2)."""

    instance: RematInstance
    steps: tuple[Step, ...]
    cost: float
    peak_memory: float
    lower_bound: float | None
    status: str
    solver: str
    solve_time_s: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple((k, v) for k, v in self.steps))
        for i, (kind, node_id) in enumerate(self.steps):
            if kind not in ("compute", "free"):
                raise FormatError(f"steps[{i}][0]: expected 'compute' or 'free', got {kind!r}")
            if node_id not in self.instance.index:
                raise FormatError(f"steps[{i}][1]: unknown node id {node_id!r}")

    @classmethod
    def from_steps(cls, instance: RematInstance, steps: Sequence[Step], *, lower_bound: float | None,
                   status: str, solver: str, solve_time_s: float) -> RematSchedule:
        """Build a result from steps, computing cost and peak (raises if the steps are invalid)."""
        cost, peak = evaluate_steps(instance, steps) if steps else (0, 0)
        return cls(instance, tuple(steps), cost, peak, lower_bound, status, solver, solve_time_s)

    @classmethod
    def empty(cls, instance: RematInstance, *, status: str, lower_bound: float | None, solver: str,
              solve_time_s: float) -> RematSchedule:
        assert status in EMPTY_STATUSES
        return cls(instance, (), 0, 0, lower_bound, status, solver, solve_time_s)

    @classmethod
    def from_dict(cls, obj: Any) -> RematSchedule:
        obj = as_mapping(obj, "<root>")
        check_format(obj, SCHEDULE_FORMAT)
        instance = RematInstance.from_dict(need(obj, "instance", ""), embedded=True)
        steps = []
        for i, raw in enumerate(as_list(need(obj, "steps", ""), "steps")):
            raw = as_list(raw, f"steps[{i}]")
            if len(raw) != 2:
                raise FormatError(f"steps[{i}]: expected [kind, id], got {len(raw)} items")
            steps.append((as_str(raw[0], f"steps[{i}][0]"), as_str(raw[1], f"steps[{i}][1]")))
        fields = read_result_fields(obj, "cost")
        peak = as_number(need(obj, "peak_memory", ""), "peak_memory")
        try:
            return cls(instance=instance, steps=tuple(steps), peak_memory=peak, **fields)
        except FormatError as e:
            raise FormatError(str(e)) from None

    def to_dict(self) -> dict[str, Any]:
        return {"format": SCHEDULE_FORMAT, "instance": self.instance.to_dict(),
                "steps": [list(s) for s in self.steps], "cost": self.cost,
                "peak_memory": self.peak_memory, "lower_bound": self.lower_bound,
                "status": self.status, "solver": self.solver, "solve_time_s": self.solve_time_s}


def validate_remat(schedule: RematSchedule) -> RematEvaluation:
    """Check every rule of formats.md 2.2 (see `evaluate_steps`) plus the result-file rules:

    6. `cost` equals the recomputed cost; `peak_memory` equals the recomputed peak;
       `lower_bound` <= cost; "optimal" only with lower_bound == cost; no steps iff
       infeasible/unknown. Returns the recomputed (cost, peak_memory).
    """
    empty = not schedule.steps
    recomputed = RematEvaluation(0.0, 0.0) if empty else evaluate_steps(schedule.instance, schedule.steps)
    check_result_claims(f"{RULE} rule 6", "cost", schedule.cost, recomputed.cost,
                        schedule.lower_bound, schedule.status, empty)
    if not empty and not approx_eq(schedule.peak_memory, recomputed.peak_memory):
        raise ValidationError(f"{RULE} rule 6",
                              f"peak_memory is {schedule.peak_memory} but the steps give {recomputed.peak_memory}")
    return recomputed

