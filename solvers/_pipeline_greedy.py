"""Event-driven list scheduler for pipeline instances, safe under memory limits.

Whenever a device is idle it starts the ready op ranked first by a priority rule (non-delay list
scheduling). Memory is handled by *reservation*: a microbatch is admitted to a device (its first
forward there) only if the device can hold, on top of the reservations of the microbatches already
in flight there, the most this microbatch will ever need there until it is done (`_future_need`).
Admissions happen in microbatch order on every device. That never deadlocks on a feasible
instance: the smallest unfinished microbatch m* is either in flight everywhere it has been
admitted (its memory reserved, so its ops only wait for other ops, which all finish), or waits for
admission on a device where everything before it is finished and nothing after it was admitted
(its reservation there is then only its own need, which fits by feasibility; pending W ops always
run and free their stash).

With `allow_remat`, a microbatch that does not fit with full activations is admitted with every
stage on that device rematerialized (keep the checkpoint, recompute R just before B), if that fits.
Its reservation then counts only the checkpoints it keeps; one *headroom* per device (the largest
activation - checkpoint there) is reserved once, and a lock lets one rematerialized op at a time
use it: a forward until it ends, a recompute until its B ends (that B is ready as soon as R ends,
so the lock is always released). Remat modes: "never", "when-needed" (only microbatches that
do not fit otherwise) and "always"; `options[s]` picks the remat option of each stage (formats.md
1.4). With `backward_recompute`, every pair of a stage that may recompute in the backward pass
runs RW between its B and W: after B it keeps only `wgrad_checkpoint`, so its reservation counts
that; a second headroom per device (the largest wgrad_stash - wgrad_checkpoint there), reserved
up front, and a second lock let one pair at a time hold its stash again from RW start to W end
(its W is ready when RW ends and never waits for memory, so that lock is always released too).
The rule's timing is then re-derived by the simulator from the per-device order, which keeps the
order of memory events on every device and so the memory peak.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import NamedTuple

from pipesched.pipeline import Action, PipelineInstance, Program
from pipesched.pipeline.bounds import op_head_tail

Key = tuple[str, int, int]  # (op, stage, microbatch)


class Rule(NamedTuple):
    """A priority rule: `rank(op, stage, microbatch)` sorts ready ops (smaller first);
    `w_when_blocked`: W jumps ahead when a forward waits for memory (zero-bubble style)."""

    name: str
    rank: Callable[[str, int, int], tuple]
    w_when_blocked: bool


def make_rules(instance: PipelineInstance) -> list[Rule]:
    S = instance.num_stages
    bottom = {(op, s): instance.duration(op, s) + op_head_tail(instance, op, s)[1]
              for s in range(S) for op in ("F", "B", "W", "R")}

    def kinds(order: str, depth_first: bool) -> Callable[[str, int, int], tuple]:
        rank = {k: order.index(k) for k in order}

        def key(op: str, s: int, m: int) -> tuple:
            stage_key = -s if (op == "F") == depth_first else s
            return (rank[op], m, stage_key)
        return key

    return [
        Rule("backward-first", kinds("RBWF", True), False),
        Rule("zero-bubble", kinds("RBFW", True), True),
        Rule("zero-bubble-breadth", kinds("RBFW", False), True),
        Rule("forward-first", kinds("FRBW", True), True),
        Rule("critical-path", lambda op, s, m: (-bottom[op, s], m, s), True),
    ]


REMAT_MODES = ("never", "when-needed", "always")


def list_schedule(instance: PipelineInstance, rule: Rule, *, remat: str = "never",
                  options: tuple[int, ...] | None = None, backward_recompute: bool = False) -> Program | None:
    """The per-device program `rule` produces, or None if it gets stuck (only possible when a
    microbatch needs remat to fit and `remat` is "never"). `options`: the remat option of each
    stage (default 0)."""
    return _ListScheduler(instance, rule, remat, options, backward_recompute).run()


def least_memory_option(instance: PipelineInstance, s: int) -> int:
    """The remat option of stage s that keeps the least (ties: the fastest recompute)."""
    options = instance.stages[s].options
    return min(range(len(options)), key=lambda k: (options[k].checkpoint, options[k].R))


def option_choices(instance: PipelineInstance) -> list[tuple[int, ...]]:
    """Distinct per-stage option vectors worth trying: option k of every stage (the last one when
    it has fewer), and each stage's least-checkpoint option."""
    counts = [len(st.options) for st in instance.stages]
    least = tuple(least_memory_option(instance, s) for s in range(instance.num_stages))
    choices = [tuple(min(k, n - 1) for n in counts) for k in range(max(counts))] + [least]
    return list(dict.fromkeys(choices))


class _ListScheduler:
    def __init__(self, instance: PipelineInstance, rule: Rule, remat: str, options: tuple[int, ...] | None,
                 backward_recompute: bool):
        self.inst, self.rule = instance, rule
        self.remat_options = {"never": [False], "when-needed": [False, True], "always": [True]}[
            remat if instance.allow_remat else "never"]
        P, S = instance.num_devices, instance.num_stages
        self.S, self.M = S, instance.num_microbatches
        self.split = instance.split_backward
        self.dev = [st.device for st in instance.stages]
        self.first_stage = [stages[0] if stages else -1 for stages in instance.stages_of_device]
        self.stash = [st.wgrad_stash if self.split else 0 for st in instance.stages]
        self.option = options or (0,) * S
        self.kept = [st.options[k].checkpoint for st, k in zip(instance.stages, self.option)]
        self.rw = [backward_recompute and instance.may_recompute_backward(s) for s in range(S)]
        self.after_b = [st.wgrad_checkpoint if self.rw[s] else self.stash[s] for s, st in enumerate(instance.stages)]
        self.limit = [instance.limit(d) for d in range(P)]
        self.remat: set[tuple[int, int]] = set()
        self.deps_left: dict[Key, int] = {}
        self.ready_at: dict[Key, float] = {}
        self.state: dict[tuple[int, int], str] = {}  # (s, m) -> F (running), Fd, R, B, W
        self.need: dict[tuple[int, int], float] = {}  # (device, m) -> reserved memory
        self.next_admit = [0] * P  # next microbatch to admit on each device
        self.admit_ready: list[dict[int, float]] = [{} for _ in range(P)]  # m -> ready time
        self.avail: list[list] = [[] for _ in range(P)]  # heap of (rank, key): ready by now
        self.future: list[list] = [[] for _ in range(P)]  # heap of (ready time, rank, key)
        self.free_at = [0.0] * P
        self.running: list[tuple[float, Key]] = []
        self.times: list[float] = []
        self.rows: list[list[Action]] = [[] for _ in range(P)]
        self.left = S * self.M * (1 + len(instance.backward_ops))
        self.headroom = [max((instance.stages[s].activation - self.kept[s]
                              for s in stages if s < S - 1), default=0.0) for stages in instance.stages_of_device]
        self.headroom_taken = [False] * P
        self.lock: list[Key | None] = [None] * P
        self.r_parked: list[list] = [[] for _ in range(P)]
        self.reserved = [max((self.stash[s] - self.after_b[s] for s in stages if self.rw[s]), default=0.0)
                         for stages in instance.stages_of_device]  # the RW headroom, up front
        self.rw_lock: list[Key | None] = [None] * P
        self.rw_parked: list[list] = [[] for _ in range(P)]

    def _rank(self, op: str, s: int, m: int) -> tuple:
        return self.rule.rank("W" if op == "RW" else op, s, m)  # RW is the first part of W's work

    # ---- dependencies ----------------------------------------------------------------------
    def _deps(self, key: Key) -> int:
        op, s, m = key
        if op == "F":
            return 1 if s > 0 else 0
        if op == "B":
            return 1 + ((s, m) in self.remat)
        if op == "W":
            return 1 + self.rw[s]
        return 2 if op == "R" else 1  # R waits for F(s, m) and for the input of B(s, m); RW for B

    def _successors(self, key: Key) -> list[tuple[Key, float]]:
        op, s, m = key
        inst = self.inst
        out: list[tuple[Key, float]] = []
        if op == "F":
            out.append((("F", s + 1, m), inst.comm_after(s)) if s < self.S - 1 else (("B", s, m), 0))
            if (s, m) in self.remat:
                out.append((("R", s, m), 0))
        elif op == "B":
            if s > 0:
                out.append((("B", s - 1, m), inst.comm_after(s - 1)))
                if (s - 1, m) in self.remat:
                    out.append((("R", s - 1, m), inst.comm_after(s - 1)))
            if self.split:
                out.append((("W", s, m), 0))
            if self.rw[s]:
                out.append((("RW", s, m), 0))
        elif op == "R":
            out.append((("B", s, m), 0))
        elif op == "RW":
            out.append((("W", s, m), 0))
        return out

    def _release(self, key: Key, at: float) -> None:
        left = self.deps_left.get(key, self._deps(key)) - 1
        self.deps_left[key] = left
        self.ready_at[key] = max(self.ready_at.get(key, 0.0), at)
        if left == 0:
            self._make_ready(key, self.ready_at[key])

    def _make_ready(self, key: Key, t: float) -> None:
        op, s, m = key
        d = self.dev[s]
        if op == "F" and s == self.first_stage[d]:
            self.admit_ready[d][m] = t  # admitted later, in microbatch order
        elif op in ("F", "R") and (s, m) in self.remat and self.lock[d] is not None:
            heapq.heappush(self.r_parked[d], (self._rank(op, s, m), key))
            return
        elif op == "RW" and self.rw_lock[d] is not None:
            heapq.heappush(self.rw_parked[d], (self._rank(op, s, m), key))
            return
        else:
            if op in ("F", "R") and (s, m) in self.remat:
                self.lock[d] = key
            if op == "RW":
                self.rw_lock[d] = key
            heapq.heappush(self.future[d], (t, self._rank(op, s, m), key))
        heapq.heappush(self.times, t)

    # ---- memory ----------------------------------------------------------------------------
    def _future_need(self, d: int, m: int) -> float:
        """Most memory microbatch m can hold on device d from now on, the transient
        activation - checkpoint of its rematerialized forwards and recomputes aside (those use the
        device's headroom)."""
        inst = self.inst
        stages = inst.stages_of_device[d]
        held = []
        for s in stages:
            st, state = inst.stages[s], self.state.get((s, m))
            if state in ("F", "Fd", "R"):
                held.append(self.kept[s] if (s, m) in self.remat else st.activation)
            elif state == "B":
                held.append(self.after_b[s])
            elif state == "RW":
                held.append(self.stash[s])
            else:
                held.append(0.0)
        kept = [self.kept[s] if (s, m) in self.remat else inst.stages[s].activation for s in stages]
        need, before = sum(held), 0.0
        for i, s in enumerate(stages):  # future forwards, in stage order
            if self.state.get((s, m)) is None:
                need = max(need, before + kept[i])
                before += kept[i]
            else:
                before += held[i]
        return need

    def _update_need(self, d: int, m: int) -> None:
        new = self._future_need(d, m)
        self.reserved[d] += new - self.need.get((d, m), 0.0)
        self.need[d, m] = new

    def _admit(self, d: int, m: int, *, commit: bool) -> bool:
        """Whether microbatch m fits on device d next to the reservations there (with remat of
        its stages on d when needed and allowed); with `commit`, reserve it."""
        limit = self.limit[d]
        if limit is None:
            return True
        stages = [s for s in self.inst.stages_of_device[d] if s < self.S - 1]
        for remat in self.remat_options if stages else [False]:
            if remat and self.lock[d] is not None:
                continue
            if remat:
                self.remat.update((s, m) for s in stages)
            need = self._future_need(d, m)
            extra = self.headroom[d] if remat and not self.headroom_taken[d] else 0.0
            if self.reserved[d] + need + extra <= limit + 1e-9 * (1 + abs(limit)):
                if commit:
                    self.need[d, m] = need
                    self.reserved[d] += need + extra
                    self.headroom_taken[d] |= remat
                    if remat and self.first_stage[d] in stages:
                        self.lock[d] = ("F", self.first_stage[d], m)
                else:
                    self.remat.difference_update((s, m) for s in stages)
                return True
            if remat:
                self.remat.difference_update((s, m) for s in stages)
        return False

    # ---- main loop -------------------------------------------------------------------------
    def run(self) -> Program | None:
        for m in range(self.M):
            self._make_ready(("F", 0, m), 0.0)
        last = None
        while self.left:
            if not self.times:
                return None  # stuck: nothing runs and nothing will become ready
            t = heapq.heappop(self.times)
            if t == last:
                continue
            last = t
            while self.running and self.running[0][0] <= t:
                self._complete(*heapq.heappop(self.running))
            for d in range(self.inst.num_devices):
                if self.free_at[d] <= t:
                    self._start_next(d, t)
        return tuple(tuple(row) for row in self.rows)

    def _start_next(self, d: int, t: float) -> None:
        future, avail = self.future[d], self.avail[d]
        while future and future[0][0] <= t:
            _, rank, key = heapq.heappop(future)
            heapq.heappush(avail, (rank, key))
        m = self.next_admit[d]
        ready = self.admit_ready[d].get(m)
        admission = None
        if ready is not None and ready <= t:
            if self._admit(d, m, commit=False):
                s0 = self.first_stage[d]
                admission = (self._rank("F", s0, m), ("F", s0, m))
            elif self.rule.w_when_blocked and any(key[0] == "W" for _, key in avail):
                best = min(c for c in avail if c[1][0] == "W")  # free stash for the blocked forward
                avail.remove(best)
                heapq.heapify(avail)
                self._start(d, best[1], t)
                return
        if admission is not None and (not avail or admission < avail[0]):
            self._admit(d, m, commit=True)
            del self.admit_ready[d][m]
            self.next_admit[d] += 1
            self._start(d, admission[1], t)
        elif avail:
            self._start(d, heapq.heappop(avail)[1], t)

    def _start(self, d: int, key: Key, t: float) -> None:
        op, s, m = key
        option = self.option[s] if op == "R" else 0
        end = t + self.inst.duration(op, s, option)
        self.free_at[d] = end
        self.rows[d].append(Action(s, op, m, option))
        if op in ("F", "R", "RW"):
            self.state[s, m] = op  # reaches a level the reservation already counts
        heapq.heappush(self.running, (end, key))
        heapq.heappush(self.times, end)

    def _complete(self, end: float, key: Key) -> None:
        op, s, m = key
        d = self.dev[s]
        if op not in ("R", "RW"):  # optional ops are not counted in `left`
            self.left -= 1
            self.state[s, m] = "Fd" if op == "F" else op
        if op in ("B", "W") and self.limit[d] is not None:  # the only events that free memory
            self._update_need(d, m)
        if self.lock[d] == key and op == "F" or op == "B" and self.lock[d] == ("R", s, m):
            self.lock[d] = None
            if self.r_parked[d]:
                self._make_ready(heapq.heappop(self.r_parked[d])[1], end)
        if op == "W" and self.rw_lock[d] == ("RW", s, m):
            self.rw_lock[d] = None
            if self.rw_parked[d]:
                self._make_ready(heapq.heappop(self.rw_parked[d])[1], end)
        for succ, delay in self._successors(key):
            self._release(succ, end + delay)
