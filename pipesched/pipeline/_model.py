"""Pipeline-parallel training (formats.md section 1): instance, operation, schedule."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

from pipesched._common import (
    EMPTY_STATUSES,
    MAX_NUMBER,
    FormatError,
    JsonFile,
    as_bool,
    as_int,
    as_list,
    as_mapping,
    as_number,
    as_str,
    check_format,
    need,
    optional,
    read_result_fields,
    show,
)

INSTANCE_FORMAT = "pipesched.pipeline-instance/1"
SCHEDULE_FORMAT = "pipesched.pipeline-schedule/1"
OP_KINDS = ("F", "B", "W", "R", "RW")
MAX_DEVICES = 4096
MAX_PAIRS = 2**16  # stages x microbatches: greedy answers within seconds up to here (README "Bad input")

# formats.md extensions not implemented yet: refused by name, never dropped (a result embeds its instance)
_EXTENSIONS = {"1.5 (offloading)": ("allow_offload", "host_memory", "offload_out", "offload_in", "offload_keep")}
_EXTENSION_OPS = {"O": "1.5 (offloading)", "P": "1.5 (offloading)"}


def _refuse_extensions(obj: Any, key: str) -> None:
    """FormatError naming the first key of an unimplemented formats.md extension that `obj` sets."""
    for section, names in _EXTENSIONS.items():
        for name in names:
            if obj.get(name) not in (None, False):
                where = f"{key}.{name}" if key else name
                raise FormatError(f"{where}: formats.md section {section} is not implemented yet; "
                                  "remove the key to use this file")


class RematOption(NamedTuple):
    """One way to rematerialize a microbatch of a stage (formats.md 1.4): keep `checkpoint`
    between F and R, recompute in `R` time units."""

    checkpoint: float
    R: float


@dataclasses.dataclass(frozen=True)
class Stage:
    """One model stage: where it runs, its op durations and its activation memory.

    `remat_options` (None: the one option `(checkpoint, R)`), `RW` (None: no backward-pass
    recompute) and `wgrad_checkpoint` are the optional keys of formats.md 1.4."""

    device: int
    F: float
    B: float
    W: float
    activation: float
    wgrad_stash: float = 0
    R: float | None = None  # None: same as F
    checkpoint: float = 0
    remat_options: tuple[RematOption, ...] | None = None
    RW: float | None = None
    wgrad_checkpoint: float = 0

    def __post_init__(self) -> None:
        if self.R is None:
            object.__setattr__(self, "R", self.F)
        if self.remat_options is not None:
            object.__setattr__(self, "remat_options", tuple(
                o if isinstance(o, RematOption) else RematOption(*o) for o in self.remat_options))

    @property
    def options(self) -> tuple[RematOption, ...]:
        """The remat options of formats.md 1.4 (the default one when the key is absent)."""
        return self.remat_options if self.remat_options is not None else (RematOption(self.checkpoint, self.R),)

    def duration(self, op: str, option: int = 0) -> float:
        if op == "R":
            return self.options[option].R
        return getattr(self, op)

    def check(self, key: str, num_devices: int, allow_remat: bool) -> None:
        as_int(self.device, f"{key}.device", lo=0, hi=num_devices)
        for name in ("F", "B", "W", "activation", "wgrad_stash", "R", "checkpoint", "wgrad_checkpoint"):
            as_number(getattr(self, name), f"{key}.{name}")
        for name in ("wgrad_stash", "checkpoint"):
            if getattr(self, name) > self.activation:
                raise FormatError(f"{key}.{name}: must be <= activation ({self.activation}), "
                                  f"got {getattr(self, name)}")
        if self.wgrad_checkpoint > self.wgrad_stash:
            raise FormatError(f"{key}.wgrad_checkpoint: must be <= wgrad_stash ({self.wgrad_stash}), "
                              f"got {self.wgrad_checkpoint}")
        if self.RW is not None:
            as_number(self.RW, f"{key}.RW")
        if self.remat_options is not None:
            as_list(list(self.remat_options), f"{key}.remat_options", nonempty=True)
            for i, (c, r) in enumerate(self.remat_options):
                as_number(c, f"{key}.remat_options[{i}].checkpoint")
                as_number(r, f"{key}.remat_options[{i}].R")
                if c > self.activation:
                    raise FormatError(f"{key}.remat_options[{i}].checkpoint: must be <= activation "
                                      f"({self.activation}), got {c}")
        if allow_remat and self.F <= 0:
            raise FormatError(f"{key}.F: must be > 0 when allow_remat is true, got {self.F}")

    @classmethod
    def from_dict(cls, obj: Any, key: str) -> Stage:
        obj = as_mapping(obj, key)
        _refuse_extensions(obj, key)
        options = obj.get("remat_options")
        if options is not None:
            options = tuple(_remat_option(o, f"{key}.remat_options[{i}]")
                            for i, o in enumerate(as_list(options, f"{key}.remat_options", nonempty=True)))
        return cls(
            device=need(obj, "device", key),
            F=need(obj, "F", key), B=need(obj, "B", key), W=need(obj, "W", key),
            activation=need(obj, "activation", key),
            wgrad_stash=optional(obj, "wgrad_stash", 0),
            R=obj.get("R"),
            checkpoint=optional(obj, "checkpoint", 0),
            remat_options=options, RW=obj.get("RW"),
            wgrad_checkpoint=optional(obj, "wgrad_checkpoint", 0),
        )

    def to_dict(self) -> dict[str, Any]:
        """The 1.1 keys, and the 1.4 keys only when set (files without them stay as they were)."""
        d = {f: getattr(self, f) for f in ("device", "F", "B", "W", "activation", "wgrad_stash", "R", "checkpoint")}
        if self.remat_options is not None:
            d["remat_options"] = [{"checkpoint": o.checkpoint, "R": o.R} for o in self.remat_options]
        if self.RW is not None:
            d["RW"] = self.RW
        if self.wgrad_checkpoint:
            d["wgrad_checkpoint"] = self.wgrad_checkpoint
        return d


def _remat_option(obj: Any, key: str) -> RematOption:
    obj = as_mapping(obj, key)
    return RematOption(need(obj, "checkpoint", key), need(obj, "R", key))


@dataclasses.dataclass(frozen=True)
class PipelineInstance(JsonFile):
    """P devices, M microbatches, S stages placed on devices; comm delays and memory limits."""

    num_devices: int
    num_microbatches: int
    stages: tuple[Stage, ...]
    comm: float | tuple[float, ...] = 0
    memory_limit: float | tuple[float, ...] | None = None
    split_backward: bool = False
    allow_remat: bool = False
    name: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        if isinstance(self.comm, list):
            object.__setattr__(self, "comm", tuple(self.comm))
        if isinstance(self.memory_limit, list):
            object.__setattr__(self, "memory_limit", tuple(self.memory_limit))
        P = as_int(self.num_devices, "num_devices", lo=1, hi=MAX_DEVICES + 1)
        M = as_int(self.num_microbatches, "num_microbatches", lo=1)
        as_list(self.stages, "stages", nonempty=True)
        if len(self.stages) * M > MAX_PAIRS:
            raise FormatError(f"num_microbatches: {len(self.stages)} stages x {M} microbatches = "
                              f"{len(self.stages) * M} pairs, more than the {MAX_PAIRS} pipesched schedules")
        as_bool(self.split_backward, "split_backward")
        as_bool(self.allow_remat, "allow_remat")
        for s, stage in enumerate(self.stages):
            if not isinstance(stage, Stage):
                raise FormatError(f"stages[{s}]: expected a Stage, got {type(stage).__name__}")
            stage.check(f"stages[{s}]", P, self.allow_remat)
        _check_scalar_or_list(self.comm, "comm", len(self.stages) - 1)
        if self.memory_limit is not None:
            _check_scalar_or_list(self.memory_limit, "memory_limit", P)
        comm = self.comm if isinstance(self.comm, tuple) else (self.comm,) * (len(self.stages) - 1)
        work = M * (sum(st.F + st.B + st.W + max(o.R for o in st.options) + (st.RW or 0) for st in self.stages)
                    + 2 * sum(comm))
        memory = M * sum(st.activation for st in self.stages)
        for what, total in (("durations (one microbatch after another)", work), ("activation memory", memory)):
            if total > MAX_NUMBER:
                raise FormatError(f"stages: the total of {what} over all microbatches is {total:.3g}, more than "
                                  f"2^53; use coarser units")
        if self.name is not None:
            as_str(self.name, "name")

    # ---- derived views ---------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def comm_after(self, s: int) -> float:
        """Delay across the boundary s|s+1 (0 when both stages share a device)."""
        if self.stages[s].device == self.stages[s + 1].device:
            return 0
        return self.comm[s] if isinstance(self.comm, tuple) else self.comm

    def limit(self, device: int) -> float | None:
        if self.memory_limit is None or not isinstance(self.memory_limit, tuple):
            return self.memory_limit
        return self.memory_limit[device]

    @functools.cached_property
    def stages_of_device(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(s for s, st in enumerate(self.stages) if st.device == d)
                     for d in range(self.num_devices))

    @property
    def backward_ops(self) -> tuple[str, ...]:
        """The ops every (stage, microbatch) must run besides F."""
        return ("B", "W") if self.split_backward else ("B",)

    def duration(self, op: str, stage: int, option: int = 0) -> float:
        return self.stages[stage].duration(op, option)

    def may_recompute_backward(self, s: int) -> bool:
        """Whether stage s may run a backward-pass recompute RW (formats.md 1.4)."""
        return self.allow_remat and self.split_backward and self.stages[s].RW is not None

    def freed_by_B(self, s: int) -> float:
        """Memory B(s, m) releases at its end (formats.md 1.2 rule 5)."""
        st = self.stages[s]
        return st.activation - st.wgrad_stash if self.split_backward else st.activation

    def replace(self, **changes: Any) -> PipelineInstance:
        return dataclasses.replace(self, **changes)

    # ---- JSON ------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, obj: Any, *, embedded: bool = False) -> PipelineInstance:
        obj = as_mapping(obj, "instance" if embedded else "<root>")
        check_format(obj, INSTANCE_FORMAT, required=not embedded)
        _refuse_extensions(obj, "")
        stages = as_list(need(obj, "stages", ""), "stages", nonempty=True)
        return cls(
            num_devices=need(obj, "num_devices", ""),
            num_microbatches=need(obj, "num_microbatches", ""),
            stages=tuple(Stage.from_dict(st, f"stages[{s}]") for s, st in enumerate(stages)),
            comm=need(obj, "comm", ""),
            memory_limit=need(obj, "memory_limit", ""),
            split_backward=need(obj, "split_backward", ""),
            allow_remat=optional(obj, "allow_remat", False),
            name=obj.get("name"),
        )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": INSTANCE_FORMAT}
        if self.name is not None:
            d["name"] = self.name
        d.update(
            num_devices=self.num_devices, num_microbatches=self.num_microbatches,
            stages=[st.to_dict() for st in self.stages],
            comm=list(self.comm) if isinstance(self.comm, tuple) else self.comm,
            memory_limit=list(self.memory_limit) if isinstance(self.memory_limit, tuple) else self.memory_limit,
            split_backward=self.split_backward, allow_remat=self.allow_remat,
        )
        return d


def _check_scalar_or_list(value: Any, key: str, length: int) -> None:
    if isinstance(value, tuple):
        if len(value) != length:
            raise FormatError(f"{key}: expected a number or a list of {length} numbers, got {len(value)}")
        for i, v in enumerate(value):
            as_number(v, f"{key}[{i}]")
    else:
        as_number(value, key)


@dataclasses.dataclass(frozen=True, order=True)
class Op:
    """One timed operation: `op` in F/B/W/R/RW of (stage, microbatch) from `start` to `end`;
    `option` is the remat option of an R op (formats.md 1.4), 0 for every other op."""

    start: float
    end: float
    op: str
    stage: int
    microbatch: int
    option: int = 0

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.op, self.stage, self.microbatch)

    @property
    def name(self) -> str:
        """Compact PyTorch-style name: `2F0` = forward of stage 2, microbatch 0 (`2R0:1`: a recompute
        with remat option 1)."""
        return f"{self.stage}{self.op}{self.microbatch}" + (f":{self.option}" if self.option else "")


@dataclasses.dataclass(frozen=True)
class PipelineSchedule(JsonFile):
    """A pipeline schedule result file (formats.md 1.2). `order_lower_bound` (an extra key, written
    only when set): a proven bound on the makespan of every valid schedule that keeps this
    schedule's per-device F/B/W order, e.g. after `solve_pipeline(..., order=...)`."""

    instance: PipelineInstance
    ops: tuple[Op, ...]
    makespan: float
    lower_bound: float | None
    status: str
    solver: str
    solve_time_s: float
    order_lower_bound: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "ops", tuple(self.ops))
        S, M = self.instance.num_stages, self.instance.num_microbatches
        for i, op in enumerate(self.ops):
            key = f"ops[{i}]"
            if op.op not in OP_KINDS:
                raise FormatError(f"{key}.op: expected one of {', '.join(OP_KINDS)}; got {show(op.op)}")
            as_int(op.stage, f"{key}.stage", lo=0, hi=S)
            as_int(op.option, f"{key}.option", lo=0,
                   hi=len(self.instance.stages[op.stage].options) if op.op == "R" else 1)
            as_int(op.microbatch, f"{key}.microbatch", lo=0, hi=M)
            as_number(op.start, f"{key}.start", nonneg=False)
            as_number(op.end, f"{key}.end", nonneg=False)

    @classmethod
    def from_ops(cls, instance: PipelineInstance, ops: list[Op] | tuple[Op, ...], *,
                 lower_bound: float | None, status: str, solver: str, solve_time_s: float
                 ) -> PipelineSchedule:
        ops = tuple(sorted(ops, key=lambda o: (o.start, o.end, o.op, o.stage, o.microbatch)))
        makespan = max((op.end for op in ops), default=0)
        return cls(instance, ops, makespan, lower_bound, status, solver, solve_time_s)

    @classmethod
    def empty(cls, instance: PipelineInstance, *, status: str, lower_bound: float | None, solver: str,
              solve_time_s: float, order_lower_bound: float | None = None) -> PipelineSchedule:
        assert status in EMPTY_STATUSES
        return cls(instance, (), 0, lower_bound, status, solver, solve_time_s, order_lower_bound)

    def device_of(self, op: Op) -> int:
        return self.instance.stages[op.stage].device

    def ops_of_device(self, device: int) -> list[Op]:
        """The device's ops in execution order (start time, then end time)."""
        return list(self._ops_by_device[device])

    @functools.cached_property
    def _ops_by_device(self) -> tuple[tuple[Op, ...], ...]:
        """Every device's ops in execution order, grouped in one pass over the ops."""
        device_of_stage = [st.device for st in self.instance.stages]
        by_device: list[list[Op]] = [[] for _ in range(self.instance.num_devices)]
        for op in self.ops:
            by_device[device_of_stage[op.stage]].append(op)
        return tuple(tuple(sorted(ops, key=lambda o: (o.start, o.end, o.stage, o.microbatch))) for ops in by_device)

    @property
    def rematerialized(self) -> frozenset[tuple[int, int]]:
        return frozenset((op.stage, op.microbatch) for op in self.ops if op.op == "R")

    @property
    def backward_recomputed(self) -> frozenset[tuple[int, int]]:
        """The pairs with a backward-pass recompute (RW op)."""
        return frozenset((op.stage, op.microbatch) for op in self.ops if op.op == "RW")

    # ---- JSON ------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, obj: Any) -> PipelineSchedule:
        obj = as_mapping(obj, "<root>")
        check_format(obj, SCHEDULE_FORMAT)
        instance = PipelineInstance.from_dict(need(obj, "instance", ""), embedded=True)
        ops = []
        for i, raw in enumerate(as_list(need(obj, "ops", ""), "ops")):
            key = f"ops[{i}]"
            raw = as_mapping(raw, key)
            kind = as_str(need(raw, "op", key), f"{key}.op")
            if kind in _EXTENSION_OPS:
                raise FormatError(f"{key}.op: {kind!r} ops (formats.md section {_EXTENSION_OPS[kind]}) "
                                  "are not implemented yet")
            stage = as_int(need(raw, "stage", key), f"{key}.stage", lo=0, hi=instance.num_stages)
            option = optional(raw, "option", 0)
            if option != 0 and kind != "R":
                raise FormatError(f"{key}.option: only R ops have a remat option (formats.md 1.4), got {show(option)}")
            if raw.get("device") is not None and raw["device"] != instance.stages[stage].device:
                raise FormatError(f"{key}.device: stage {stage} is on device "
                                  f"{instance.stages[stage].device}, got {show(raw['device'])}")
            ops.append(Op(start=need(raw, "start", key), end=need(raw, "end", key), op=kind,
                          stage=stage, microbatch=need(raw, "microbatch", key), option=option))
        order_bound = obj.get("order_lower_bound")
        return cls(instance=instance, ops=tuple(ops), **read_result_fields(obj, "makespan"),
                   order_lower_bound=None if order_bound is None else as_number(order_bound, "order_lower_bound"))

    def to_dict(self) -> dict[str, Any]:
        d = {
            "format": SCHEDULE_FORMAT,
            "instance": self.instance.to_dict(),
            "ops": [self._op_dict(op) for op in self.ops],
            "makespan": self.makespan, "lower_bound": self.lower_bound, "status": self.status,
            "solver": self.solver, "solve_time_s": self.solve_time_s,
        }
        if self.order_lower_bound is not None:
            d["order_lower_bound"] = self.order_lower_bound
        return d

    def _op_dict(self, op: Op) -> dict[str, Any]:
        d = {"op": op.op, "stage": op.stage, "microbatch": op.microbatch, "device": self.device_of(op),
             "start": op.start, "end": op.end}
        if op.op == "R" and (op.option or self.instance.stages[op.stage].remat_options is not None):
            d["option"] = op.option
        return d
