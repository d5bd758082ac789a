"""`solve_placement`: MoE expert placement (formats.md 3.2) by name, with a proven lower bound.

Solvers (`PLACEMENT_SOLVERS`, the CLI names):
  round-robin   expert e on device e mod G
  random        a seeded random permutation dealt round-robin
  eplb          DeepSeek EPLB: replicate by load per replica, balanced packing (global policy, or
                hierarchical with num_nodes / num_groups)
  coactivation  co-activation-aware greedy on the exact 3.2 cost
  local-search  iterated local search from the better of coactivation and eplb (and `current`)
  cpsat         exact CP-SAT model, warm-started by local search; "optimal" when proven
  greedy        the best of round-robin, eplb, coactivation and local-search for this instance

Migration: with `current` (the placement in service) and migration_weight > 0, the solvers that
search (local-search, cpsat, greedy's choice) minimise cost + migration_weight * transfers, where
transfers = the (expert, device) pairs hosted that `current` does not host (weights to copy). The
written `cost` stays the pure 3.2 cost; get the transfers with `transfers(current, devices)`.

Lower bound: `lower_bound` (per-batch bounds) and, with spare slots, `replica_bound` (the
replica-count relaxation, solved by CP-SAT in a tenth of the time limit); cpsat adds, without spare
slots and up to TRANSITIVE_MAX_EXPERTS experts, `colocation_bound` (another tenth), and its own
proven bound. Any result whose cost meets the proven lower bound is reported "optimal".
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from pipesched.solvers._interrupt import Deadline, Interrupted
from pipesched.solvers._placement_common import (
    Batches,
    Devices,
    aggregate,
    cost,
    lower_bound,
    max_replicas,
    transfers,
)
from pipesched.solvers._placement_cpsat import TRANSITIVE_MAX_EXPERTS, colocation_bound, replica_bound, solve_cpsat
from pipesched.solvers._placement_greedy import coactivation_greedy, eplb, random_placement, round_robin
from pipesched.solvers._placement_search import local_search
from pipesched.solvers._names import PLACEMENT_SOLVERS
from pipesched.solvers._result import Result

from pipesched._common import FormatError, approx_le
from pipesched.placement import Placement, PlacementInstance, check_devices, validate_placement

__all__ = ["PLACEMENT_SOLVERS", "solve_placement", "transfers"]


# shares of the time limit that cpsat spends on its local-search warm start, and every solver on
# the replica-count relaxation bound (with spare slots only)
_WARM_START_SHARE = 0.2
_BOUND_SHARE = 0.1


def solve_placement(
    instance: PlacementInstance,
    solver: str = "greedy",
    time_limit: float = 10.0,
    workers: int = 2,
    seed: int = 0,
    current: Sequence[Sequence[int]] | None = None,
    migration_weight: float = 0.0,
    progress: bool = False,
    *,
    num_nodes: int = 1,
    num_groups: int = 1,
) -> Result:
    """Place the experts of `instance` with `solver` (one of PLACEMENT_SOLVERS) within `time_limit`
    seconds. `num_nodes` / `num_groups` select EPLB's hierarchical policy. Ctrl-C returns the best
    placement so far (round-robin when there is none yet) with `interrupted` set."""
    if solver not in PLACEMENT_SOLVERS:
        raise FormatError(f"solver: unknown placement solver {solver!r}; choose one of {', '.join(PLACEMENT_SOLVERS)}")
    if migration_weight < 0:
        raise ValueError(f"migration_weight must be >= 0, got {migration_weight}")
    if current is not None:
        check_devices(instance, current)
    start = time.perf_counter()
    deadline = Deadline(time_limit, start)
    batches = aggregate(instance)
    bound = lower_bound(instance, batches)
    devices: Devices | None = None  # the best placement so far (what a Ctrl-C keeps)
    proven = interrupted = False

    def objective(devices: Sequence[Sequence[int]]) -> float:
        return cost(instance, batches, devices) + migration_weight * transfers(current, devices)

    def search(limit: float) -> Devices:
        starts = [coactivation_greedy(instance, batches), _eplb(instance, batches)]
        starts += [[sorted(d) for d in current]] if current is not None else []
        return local_search(instance, batches, min(starts, key=objective), time_limit=min(limit, deadline.left()),
                            seed=seed, current=current, migration_weight=migration_weight, progress=progress)

    try:
        if max_replicas(instance) > 1:
            bound = max(bound, replica_bound(instance, batches, time_limit=_BOUND_SHARE * time_limit,
                                             workers=workers, seed=seed))
        if solver == "round-robin":
            devices = round_robin(instance)
        elif solver == "random":
            devices = random_placement(instance, seed)
        elif solver == "eplb":
            devices = _eplb(instance, batches, num_nodes, num_groups)
        elif solver == "coactivation":
            devices = coactivation_greedy(instance, batches)
        elif solver == "local-search":
            devices = search(deadline.left())
        elif solver == "greedy":
            devices = min([coactivation_greedy(instance, batches), _eplb(instance, batches), round_robin(instance)],
                          key=objective)
            devices = min([search(deadline.left()), devices], key=objective)
        else:
            devices = warm = search(_WARM_START_SHARE * time_limit)
            if instance.num_slots == instance.num_experts and 1 < instance.slots_per_device and \
                    instance.num_experts <= TRANSITIVE_MAX_EXPERTS:  # (weak without transitivity)
                bound = max(bound, colocation_bound(instance, batches, time_limit=min(_BOUND_SHARE * time_limit,
                                                                                      deadline.left()),
                                                    workers=workers, seed=seed))
            if migration_weight > 0 or not approx_le(cost(instance, batches, warm), bound):  # else optimal already
                outcome = solve_cpsat(instance, batches, warm, time_limit=deadline.left(), workers=workers,
                                      seed=seed, current=current, migration_weight=migration_weight,
                                      progress=progress)
                devices = warm if outcome.devices is None else min([outcome.devices, warm], key=objective)
                proven, interrupted = outcome.optimal, outcome.interrupted
                bound = bound if outcome.bound is None else max(bound, outcome.bound)
    except Interrupted as stop:  # in local search: its best placement so far
        devices = stop.best if devices is None else min([stop.best, devices], key=objective)
        interrupted = True
    except KeyboardInterrupt:
        interrupted = True
    if devices is None:  # interrupted before any placement: round-robin takes no time to build
        devices = round_robin(instance)
    return _result(instance, batches, devices, bound, proven, solver, time.perf_counter() - start, interrupted)


def _eplb(instance: PlacementInstance, batches: Batches, num_nodes: int = 1, num_groups: int = 1) -> Devices:
    """EPLB on the expected per-batch load of each expert."""
    return eplb(instance, batches.weights @ batches.counts, num_nodes=num_nodes, num_groups=num_groups)


def _result(instance: PlacementInstance, batches: Batches, devices: Devices, bound: float, proven: bool,
            solver: str, solve_time: float, interrupted: bool) -> Result:
    """Validated Result; "optimal" when CP-SAT proved it or the cost meets the proven bound."""
    value = cost(instance, batches, devices)
    optimal = proven or approx_le(value, bound)
    placement = Placement.from_devices(
        instance, [sorted(d) for d in devices], lower_bound=min(bound, value) if optimal else bound,
        status="optimal" if optimal else "feasible", solver=solver, solve_time_s=solve_time)
    validate_placement(placement)
    return Result.of(placement, interrupted)
