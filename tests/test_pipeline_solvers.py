"""solve_pipeline: validity, bounds <= optimum <= heuristics, brute-force optima, infeasibility."""

import itertools
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pipesched.solvers import MemoryLimitError, infeasibility_proof, solve_pipeline

from pipesched._common import approx_le
from pipesched.cli import main
from pipesched.pipeline import DeadlockError, PipelineInstance, Stage, simulate, validate_pipeline
from pipesched.pipeline.bounds import lower_bound, min_memory_need
from helpers import uniform

from pipesched.pipeline import zoo
from pipesched.pipeline.zoo import ZOO, supports, uniform_instance, zoo_schedule

durations = st.sampled_from([0, 1, 2, 3, 4, 5, 1.5, 2.5])


@st.composite
def small_instances(draw, max_devices=3, max_stages=4, max_microbatches=4, extensions=None, max_options=2,
                    max_pairs=None):
    """Random small instances; `extensions` (None: drawn) adds formats.md 1.4's keys: 1 to
    `max_options` remat options per stage and, with a split backward, RW and wgrad_checkpoint;
    at most `max_pairs` (stage, microbatch) pairs when given."""
    P = draw(st.integers(1, max_devices))
    S = draw(st.integers(1, max_stages))
    M = draw(st.integers(1, max_microbatches if max_pairs is None else min(max_microbatches, max_pairs // S)))
    split, remat = draw(st.booleans()), draw(st.booleans())
    extended = draw(st.booleans()) if extensions is None else extensions
    stages = []
    for s in range(S):
        act = draw(st.integers(1, 4))
        stash = draw(st.integers(0, act)) if split else 0
        keys = {}
        if extended:
            keys["remat_options"] = tuple((draw(st.integers(0, act)), draw(durations))
                                          for _ in range(draw(st.integers(1, max_options))))
            if split and draw(st.booleans()):
                keys.update(RW=draw(durations), wgrad_checkpoint=draw(st.integers(0, stash)))
        stages.append(Stage(device=draw(st.integers(0, P - 1)) if s else 0, F=draw(durations) + (1 if remat else 0),
                            B=draw(durations), W=draw(durations), activation=act,
                            wgrad_stash=stash, R=draw(durations),
                            checkpoint=draw(st.integers(0, act)), **keys))
    comm = draw(st.one_of(st.sampled_from([0, 1, 2]), st.lists(st.integers(0, 2), min_size=S - 1, max_size=S - 1)))
    instance = PipelineInstance(P, M, tuple(stages), comm=comm, split_backward=split, allow_remat=remat)
    need = max(min_memory_need(instance, d) for d in range(P))
    limit = draw(st.one_of(st.none(), st.integers(max(1, int(need)) - 1, int(need) + 6)))
    return instance.replace(memory_limit=limit)


def heuristic_makespans(instance: PipelineInstance) -> list[float]:
    out = [solve_pipeline(instance, "greedy").objective]
    for name in ZOO:
        if supports(name, instance):
            result = zoo_schedule(instance, name)
            if result.fits_memory:
                out.append(result.schedule.makespan)
    return out


@settings(max_examples=25)
@given(small_instances())
def test_bound_le_cpsat_le_every_heuristic(instance):
    result = solve_pipeline(instance, "cpsat", time_limit=5)
    validate_pipeline(result.schedule)
    if result.status == "infeasible":
        assert infeasibility_proof(instance) is not None and not result.schedule.ops
        return
    assert approx_le(result.lower_bound, result.objective)
    for makespan in heuristic_makespans(instance):
        assert approx_le(result.objective, makespan)


def _device_orders(ops: list[tuple[str, int, int]]) -> list[list[tuple[str, int, int]]]:
    """Every order of one device's ops that keeps each (stage, microbatch)'s own F < R < B < RW < W
    and forwards of one microbatch in stage order (orders breaking these deadlock or are invalid)."""
    rank = {"F": 0, "R": 1, "B": 2, "RW": 3, "W": 4}

    def before(a, b) -> bool:
        (oa, sa, ma), (ob, sb, mb) = a, b
        if ma != mb:
            return False
        if sa == sb:
            return rank[oa] < rank[ob]
        return oa == ob == "F" and sa < sb or oa == ob == "B" and sa > sb

    out: list[list] = []

    def extend(prefix: list, rest: list) -> None:
        if not rest:
            out.append(prefix)
            return
        for i, op in enumerate(rest):
            if not any(before(other, op) for j, other in enumerate(rest) if j != i):
                extend(prefix + [op], rest[:i] + rest[i + 1:])
    extend([], ops)
    return out


def _choices(instance: PipelineInstance, s: int) -> list[tuple[int | None, bool]]:
    """Per pair of stage s: (remat option or None, backward-pass recompute or not)."""
    if not instance.allow_remat:
        return [(None, False)]
    options = [None, *range(len(instance.stages[s].options))]
    return [(k, rw) for k in options for rw in ((False, True) if instance.may_recompute_backward(s) else (False,))]


def brute_force_optimum(instance: PipelineInstance) -> float | None:
    """Exact optimum: some optimal schedule is the earliest-start timing of its per-device order
    (re-timing earlier keeps every device's memory events in the same order), so try every remat
    choice (none / option k, with or without RW) of every pair and every order."""
    S, M = instance.num_stages, instance.num_microbatches
    pairs = [(s, m) for s in range(S) for m in range(M)]
    best = None
    for picks in itertools.product(*(_choices(instance, s) for s, _ in pairs)):
        choice = dict(zip(pairs, picks))
        per_device = []
        for d in range(instance.num_devices):
            ops = [(op, s, m) for s in instance.stages_of_device[d] for m in range(M)
                   for op in ("F", *(("R",) if choice[s, m][0] is not None else ()), "B",
                              *(("RW",) if choice[s, m][1] else ()), *instance.backward_ops[1:])]
            per_device.append(_device_orders(ops))
        for rows in itertools.product(*per_device):
            program = [[f"{s}{op}{m}" + (f":{choice[s, m][0]}" if op == "R" else "") for op, s, m in row]
                       for row in rows]
            try:
                result = simulate(instance, program)
            except DeadlockError:
                continue
            if result.fits_memory and (best is None or result.schedule.makespan < best):
                best = result.schedule.makespan
    return best


@settings(max_examples=20)
@given(small_instances(max_devices=2, max_stages=2, max_microbatches=2))
def test_lower_bound_and_optimal_claims_against_brute_force(instance):
    optimum = brute_force_optimum(instance)
    result = solve_pipeline(instance, "cpsat", time_limit=10)
    if optimum is None:
        assert result.status == "infeasible"
        return
    assert approx_le(lower_bound(instance), optimum)
    assert approx_le(result.lower_bound, optimum)
    assert approx_le(optimum, result.objective)
    if result.status == "optimal":
        assert approx_le(result.objective, optimum)


@settings(max_examples=20, deadline=None)
@given(small_instances(max_devices=2, max_stages=2, max_microbatches=2, extensions=True, max_pairs=2))
def test_bound_and_optimum_against_brute_force_with_remat_options_and_rw(instance):
    """formats.md 1.4: lower_bound <= exact optimum <= CP-SAT, equal when CP-SAT says optimal.
    (At most 2 pairs: with every remat choice of every pair the enumeration grows as 6^pairs
    times the orders; tests/test_pipeline_bounds.py checks the bounds on P <= 3, M <= 4 against
    CP-SAT's proven optima.)"""
    instance = instance.replace(allow_remat=True, stages=tuple(st if st.F > 0 else Stage(**{**st.__dict__, "F": 1})
                                                               for st in instance.stages))
    optimum = brute_force_optimum(instance)
    result = solve_pipeline(instance, "cpsat", time_limit=10)
    validate_pipeline(result.schedule)
    if optimum is None:
        assert result.status == "infeasible"
        return
    assert approx_le(lower_bound(instance), optimum)
    assert approx_le(optimum, result.objective)
    if result.status == "optimal":
        assert approx_le(result.objective, optimum)


def test_public_instances_solve_to_proven_optimum(instances_dir):
    for path in sorted((instances_dir / "pipeline").glob("*.json")):
        instance = PipelineInstance.load(path)
        greedy = solve_pipeline(instance, "greedy")
        validate_pipeline(greedy.schedule)
        result = solve_pipeline(instance, "cpsat", time_limit=60)
        validate_pipeline(result.schedule)
        assert result.status == "optimal", (path.name, result.objective, result.lower_bound)
        assert result.objective <= greedy.objective


def test_infeasible_memory_limit_is_proven():
    instance = uniform_instance(4, 8, 10, 20, 10, activation=3, memory_limit=2)
    result = solve_pipeline(instance, "cpsat", time_limit=5)
    assert result.status == "infeasible" and not result.schedule.ops
    assert "device 0 needs at least 3" in infeasibility_proof(instance)
    validate_pipeline(result.schedule)


def test_remat_makes_a_tight_limit_feasible():
    """activation 4, checkpoint 1, limit 5 on a V placement: device 0 holds stages 0 and 7, so
    without remat it needs 8; with remat 1 + 4 = 5 fits."""
    base = uniform_instance(4, 4, 10, 20, 10, activation=8, placement=(0, 1, 2, 3, 3, 2, 1, 0), memory_limit=5)
    stages = tuple(Stage(st.device, st.F, st.B, st.W, st.activation, checkpoint=1) for st in base.stages)
    instance = base.replace(stages=stages)
    assert solve_pipeline(instance, "greedy").status == "infeasible"
    result = solve_pipeline(instance.replace(allow_remat=True), "greedy")
    validate_pipeline(result.schedule)
    assert result.schedule.rematerialized


def test_split_backward_beats_1f1b_under_its_memory_limit():
    """F = B = W: ZB-H1 cuts 1F1B's bubble (P-1)(F+B+W) to a third; under the same memory limit
    (P activations) the solver must do at least as well."""
    P, M, T = 4, 8, 10
    instance = uniform_instance(P, M, T, T, T, split_backward=True, memory_limit=P)
    zb_h1 = solve_pipeline(instance, "zb-h1")
    result = solve_pipeline(instance, "cpsat", time_limit=30)
    validate_pipeline(result.schedule)
    assert result.objective <= zb_h1.objective
    bubble_1f1b = (P - 1) * 3 * T
    assert result.objective - M * 3 * T <= bubble_1f1b / 3


def test_zoo_schedule_over_the_memory_limit_says_so():
    instance = uniform_instance(4, 8, 10, 20, 10, memory_limit=4)
    with pytest.raises(MemoryLimitError, match="gpipe does not fit the memory limit: peak 8 > limit 4"):
        solve_pipeline(instance, "gpipe")


def test_greedy_heterogeneous_comm_and_interleaved():
    instance = uniform_instance(4, 16, 8, 16, 8, placement=(0, 1, 2, 3, 0, 1, 2, 3), split_backward=True,
                                memory_limit=6, comm=2)
    result = solve_pipeline(instance, "greedy")
    validate_pipeline(result.schedule)
    assert result.lower_bound <= result.objective


def test_cli_solve_pipeline(tmp_path, instances_dir, capsys):
    out = tmp_path / "s.json"
    assert main(["solve", "pipeline", str(instances_dir / "pipeline" / "p03_zero_bubble.json"), "--solver",
                 "cpsat", "--time-limit", "20", "--out", str(out), "--quiet"]) == 0
    assert "optimal" in capsys.readouterr().out
    assert main(["validate", str(out)]) == 0
    assert main(["solve", "pipeline", str(out), "--solver", "cpsat"]) == 2  # a schedule is not an instance


def test_every_solver_honours_the_time_limit():
    """Greedy and CP-SAT on 8 x 384 microbatches with remat (the greedy rules alone took 2.5 s, CP-SAT
    3.5 s at a 1 s limit before deadlines); every named schedule on a placement it supports."""
    limited = uniform(8, 384, split=True, remat=True, memory_limit=4)
    cases = [(limited, "cpsat"), (limited, "greedy")]
    for name in zoo.ZOO:
        devices = 8
        placement = (zoo.interleaved_placement(devices, 2) if name in ("interleaved-1f1b", "looped-bfs") else
                     zoo.v_placement(devices) if name in ("zb-v", "v-half", "v-min", "dualpipe-v", "hanayo") else
                     zoo.linear_placement(devices))
        stages = [Stage(d, 10, 20, 10, 1, wgrad_stash=0.5) for d in placement]
        cases.append((PipelineInstance(devices, 128, stages, split_backward=True), name))
    for instance, solver in cases:
        started = time.perf_counter()
        solve_pipeline(instance, solver, time_limit=1)
        assert time.perf_counter() - started <= 2, solver
