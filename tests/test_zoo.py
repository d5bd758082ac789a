"""The named-schedule zoo: validity on a grid of instances and the published bubble / memory."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipesched import FormatError
from pipesched.pipeline import validate_pipeline
from pipesched.pipeline.zoo import (
    ZOO,
    heterogeneous_instance,
    interleaved_placement,
    linear_placement,
    supports,
    uniform_instance,
    v_placement,
    wave_placement,
    zoo_schedule,
)

LINEAR = ("gpipe", "1f1b", "zb-h1", "zb-h2")
V_SHAPE = ("zb-v", "v-half", "v-min", "dualpipe-v")
WAVE = ("hanayo",)
NEEDS_SPLIT = ("zb-h1", "zb-h2", *V_SHAPE)
DEVICES = (2, 3, 4, 8)


def microbatch_counts(P):
    return sorted({1, P, 2 * P, 3 * P + 1})


def placements(name, P):
    """The placements `name` supports, canonical ones."""
    if name in LINEAR:
        return [linear_placement(P)]
    if name in V_SHAPE:
        return [v_placement(P)]
    if name in WAVE:
        return [wave_placement(P, waves) for waves in (1, 2, 3)]
    return [interleaved_placement(P, v) for v in (1, 2, 3)]


def device_idle(schedule):
    """Per device: time between its first start and last end not spent computing."""
    idle = []
    for d in range(schedule.instance.num_devices):
        ops = schedule.ops_of_device(d)
        idle.append(ops[-1].end - ops[0].start - sum(op.end - op.start for op in ops))
    return idle


def run(instance, name):
    simulation = zoo_schedule(instance, name)
    report = validate_pipeline(simulation.schedule)
    assert report.makespan == pytest.approx(simulation.schedule.makespan)
    return simulation


# ---- placements and builders -----------------------------------------------------------------


def test_canonical_placements():
    assert linear_placement(3) == (0, 1, 2)
    assert interleaved_placement(3, 2) == (0, 1, 2, 0, 1, 2)
    assert v_placement(3) == (0, 1, 2, 2, 1, 0)
    assert wave_placement(2, 2) == (0, 1, 1, 0, 0, 1, 1, 0)
    for P in range(1, 9):
        assert wave_placement(P, 1) == v_placement(P)


def test_uniform_instance_splits_device_costs_among_chunks():
    instance = uniform_instance(2, 4, 4, 8, 2, 6, split_backward=True, placement=interleaved_placement(2, 2))
    assert instance.num_stages == 4
    assert {(st.F, st.B, st.W, st.activation) for st in instance.stages} == {(2, 4, 1, 3)}
    with pytest.raises(FormatError, match="same number of stages"):
        uniform_instance(2, 4, 1, 1, placement=(0, 0, 1))


def test_heterogeneous_instance_is_reproducible_and_in_range():
    a = heterogeneous_instance(4, 3, seed=7, split_backward=True)
    assert a == heterogeneous_instance(4, 3, seed=7, split_backward=True)
    assert a != heterogeneous_instance(4, 3, seed=8, split_backward=True)
    assert all(5 <= x <= 15 for s in a.stages for x in (s.F, s.B, s.W, s.activation))


# ---- every schedule is valid wherever it is supported -------------------------------------------


@pytest.mark.parametrize("name", ZOO)
def test_valid_on_grid(name):
    checked = 0
    for P in DEVICES:
        for M in microbatch_counts(P):
            for split in (False, True):
                for placement in placements(name, P):
                    for instance in (
                        uniform_instance(P, M, 1, 2, 1, split_backward=split, placement=placement),
                        heterogeneous_instance(P, M, seed=P * M, split_backward=split, placement=placement,
                                               comm=3),
                    ):
                        if not supports(name, instance):
                            assert (name in NEEDS_SPLIT and not split) or name == "interleaved-1f1b"
                            continue
                        schedule = run(instance, name).schedule
                        assert schedule.solver == name
                        assert not schedule.rematerialized
                        checked += 1
    assert checked >= 2 * len(DEVICES) * 3


@pytest.mark.parametrize("name", ZOO)
@given(data=st.data())
def test_valid_on_random_instances(name, data):
    P = data.draw(st.integers(1, 4), label="P")
    M = data.draw(st.integers(1, 9), label="M")
    placement = data.draw(st.sampled_from(placements(name, P)), label="placement")
    instance = heterogeneous_instance(
        P, M, seed=data.draw(st.integers(0, 10**6)), spread=data.draw(st.sampled_from([0.0, 0.5, 0.9])),
        split_backward=name in NEEDS_SPLIT or data.draw(st.booleans()), placement=placement,
        comm=data.draw(st.sampled_from([0, 1, 7])), allow_remat=data.draw(st.booleans()))
    if not supports(name, instance):
        assert name == "interleaved-1f1b" and M % max(1, M // P)
        return
    schedule = run(instance, name).schedule
    busiest = max(sum(instance.duration(op.op, op.stage) for op in schedule.ops_of_device(d)) for d in range(P))
    assert schedule.makespan >= busiest - 1e-9
    assert not schedule.rematerialized


# ---- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ZOO)
def test_unsupported_placement_is_refused_in_one_line(name):
    other = v_placement(4) if name not in V_SHAPE + WAVE else interleaved_placement(4, 2)
    instance = uniform_instance(4, 8, 1, 1, 1, split_backward=True, placement=other)
    assert not supports(name, instance)
    with pytest.raises(FormatError, match=rf"^{name}: needs [^\n]*placement") as error:
        ZOO[name](instance)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", NEEDS_SPLIT)
def test_split_backward_is_required(name):
    placement = placements(name, 3)[0]
    instance = uniform_instance(3, 6, 1, 1, 1, placement=placement)
    assert not supports(name, instance)
    with pytest.raises(FormatError, match="split_backward"):
        zoo_schedule(instance, name)


def test_interleaved_needs_whole_rounds():
    ok = uniform_instance(4, 12, 1, 2, placement=interleaved_placement(4, 2))
    assert supports("interleaved-1f1b", ok)
    refused = uniform_instance(2, 7, 1, 2, placement=interleaved_placement(2, 2))  # 3 rounds of 7
    assert not supports("interleaved-1f1b", refused)
    with pytest.raises(FormatError, match="multiple of max"):
        zoo_schedule(refused, "interleaved-1f1b")


def test_unknown_name():
    with pytest.raises(FormatError, match="unknown zoo schedule 'zb-h3'"):
        zoo_schedule(uniform_instance(2, 2, 1, 1), "zb-h3")


def test_memory_limit_is_reported_not_enforced():
    instance = uniform_instance(4, 8, 1, 2)
    assert zoo_schedule(instance.replace(memory_limit=4), "1f1b").fits_memory
    tight = zoo_schedule(instance.replace(memory_limit=3), "1f1b")
    assert not tight.fits_memory
    assert tight.schedule.makespan == zoo_schedule(instance, "1f1b").schedule.makespan


# ---- published bubbles and memory (uniform instances) --------------------------------------------


@pytest.mark.parametrize("P", DEVICES)
@pytest.mark.parametrize("M", [1, 3, 8, 13])
def test_1f1b_and_gpipe(P, M):
    """Unsplit; with split backward W stays off the critical path (test below)."""
    F, B = 1, 2
    instance = uniform_instance(P, M, F, B)
    one_f_one_b, gpipe = run(instance, "1f1b"), run(instance, "gpipe")
    for sim in (one_f_one_b, gpipe):
        assert sim.schedule.makespan == (M + P - 1) * (F + B)
        assert device_idle(sim.schedule)[0] == (P - 1) * (F + B)
    assert one_f_one_b.memory.peaks[0] == min(P, M)
    assert one_f_one_b.memory.peaks == tuple(min(P - d, M) for d in range(P))
    assert gpipe.memory.peaks == (M,) * P


@pytest.mark.parametrize("name", ["1f1b", "gpipe"])
def test_split_1f1b_keeps_w_off_the_critical_path(name):
    P, M, F, B, W = 4, 8, 1, 2, 1
    sim = run(uniform_instance(P, M, F, B, W, split_backward=True), name)
    assert sim.schedule.makespan == M * (F + B + W) + (P - 1) * (F + B)


@pytest.mark.parametrize("P", DEVICES)
def test_zb_h1_bubble_is_a_third_of_1f1b(P):
    M, T = 3 * P + 1, 2
    split = uniform_instance(P, M, T, T, T, split_backward=True)
    fused = uniform_instance(P, M, T, 2 * T)  # 1F1B runs B and W as one backward
    zb, base = run(split, "zb-h1"), run(fused, "1f1b")
    assert device_idle(base.schedule)[0] == (P - 1) * 3 * T
    assert device_idle(zb.schedule)[0] == (P - 1) * (T + T - T)  # (P-1)(F+B-W)
    assert max(device_idle(zb.schedule)) * 3 == max(device_idle(base.schedule))
    assert zb.memory.peaks == base.memory.peaks


@pytest.mark.parametrize("P", DEVICES)
def test_zb_h1_bubble_with_unequal_costs(P):
    F, B, W = 3, 4, 2
    zb = run(uniform_instance(P, 2 * P, F, B, W, split_backward=True), "zb-h1")
    assert device_idle(zb.schedule)[0] == (P - 1) * (F + B - W)


@pytest.mark.parametrize("P", DEVICES)
def test_zb_h2_is_a_parallelogram(P):
    M, T = 2 * P + 3, 1
    sim = run(uniform_instance(P, M, T, T, T, split_backward=True), "zb-h2")
    assert device_idle(sim.schedule) == [0] * P
    assert sim.schedule.makespan == M * 3 * T + (P - 1) * T
    assert sim.memory.peaks[0] == 2 * P - 1


@pytest.mark.parametrize("P", DEVICES)
@pytest.mark.parametrize("F, B, W", [(3, 4, 2), (2, 3, 1)])
def test_zb_h2_bubble_with_unequal_costs(P, F, B, W):
    sim = run(uniform_instance(P, 3 * P, F, B, W, split_backward=True), "zb-h2")
    assert max(device_idle(sim.schedule)) == device_idle(sim.schedule)[0] == (P - 1) * (F + B - 2 * W)


@pytest.mark.parametrize("P", DEVICES)
def test_zb_v_zero_bubble_with_1f1b_memory(P):
    M, T = 2 * P + 3, 2
    sim = run(uniform_instance(P, M, T, T, T, split_backward=True, placement=v_placement(P)), "zb-v")
    assert device_idle(sim.schedule) == [0] * P
    assert sim.schedule.makespan == M * 3 * T + (P - 1) * T / 2  # chunk forwards of T/2 ramp up
    assert max(sim.memory.peaks) == P


@pytest.mark.parametrize("P", DEVICES)
@pytest.mark.parametrize("v", [2, 4])
def test_interleaved_bubble_is_divided_by_chunks(P, v):
    M, F, B = 2 * P, 4, 8
    sim = run(uniform_instance(P, M, F, B, placement=interleaved_placement(P, v)), "interleaved-1f1b")
    assert sim.schedule.makespan == M * (F + B) + (P - 1) * (F + B) / v
    assert sim.memory.peaks[0] == P + (P - 1) / v


@pytest.mark.parametrize("P", DEVICES)
def test_looped_bfs(P):
    M, F, B, v = P + 1, 4, 8, 2
    sim = run(uniform_instance(P, M, F, B, placement=interleaved_placement(P, v)), "looped-bfs")
    assert sim.schedule.makespan == M * (F + B) + (P - 1) * (F + B) / v
    assert sim.memory.peaks == (M,) * P


def steady_increment(name, P, M, T, placement):
    """Makespan added by P more microbatches: P(F+B+W) iff the steady state has no bubble."""
    def makespan(m):
        return run(uniform_instance(P, m, T, T, T, split_backward=True, placement=placement), name).schedule.makespan
    return makespan(M + P) - makespan(M)


@pytest.mark.parametrize("name", ["zb-h2", "zb-v", "v-half", "v-min", "dualpipe-v"])
@pytest.mark.parametrize("P", [3, 4, 8])
def test_zero_bubble_in_steady_state(name, P):
    placement = placements(name, P)[0]
    assert steady_increment(name, P, 3 * P, 1, placement) == P * 3


@pytest.mark.parametrize("P", [3, 4, 6, 8])
def test_v_half_and_v_min_memory(P):
    instance = uniform_instance(P, 3 * P, 1, 1, 1, split_backward=True, placement=v_placement(P))
    base = max(run(uniform_instance(P, 3 * P, 1, 1, 1, split_backward=True), "1f1b").memory.peaks)
    half, low = max(run(instance, "v-half").memory.peaks), max(run(instance, "v-min").memory.peaks)
    assert base == P
    assert half <= P / 2 + 1
    assert low <= math.ceil(P / 3) + 1
    assert low <= half < base


@pytest.mark.parametrize("P", DEVICES)
def test_dualpipe_v_published_bubble_and_memory(P):
    f = b = w = 1  # per chunk; the README's B is a chunk's full backward (b + w)
    M = 2 * P + 2
    sim = run(uniform_instance(P, M, 2 * f, 2 * b, 2 * w, split_backward=True, placement=v_placement(P)),
              "dualpipe-v")
    published = (P - 1) * ((f + b + w) + (b + w) - 3 * w)  # (PP/2-1)(F&B+B-3W), F&B not overlapped
    assert max(device_idle(sim.schedule)) <= published
    assert max(sim.memory.peaks) == P + 1 / 2  # PP+1 chunk activations of one half each


# ---- Hanayo (wave placement) -------------------------------------------------------------------


def hanayo_makespan(P, M, waves, t_f, t_b):
    """Hanayo's makespan, each of the 2W·P stages taking t_f/2W forward and t_b/2W backward, no comm:
    the 1F1B bubble (P-1)(t_f+t_b) divided by 2W, i.e. the bubble ratio (P-1)/(P-1 + 2WM)."""
    return (M + (P - 1) / (2 * waves)) * (t_f + t_b)


@pytest.mark.parametrize("P", DEVICES)
@pytest.mark.parametrize("waves", [1, 2, 3])
@pytest.mark.parametrize("t_f, t_b", [(1, 2), (1, 1), (3, 1)])
def test_hanayo_bubble_ratio(P, waves, t_f, t_b):
    """Bubble ratio (P-1)/(P-1 + 2WM) of Liu et al. 2023 (Hanayo, SC'23): with W waves a device's
    ramp costs (P-1) stage-times of 1/2W of its share. Exact for M >= 2P-1, and no schedule does
    better (device P-1 waits (P-1)t_f/2W for its first input and its last output needs
    (P-1)t_b/2W more); for smaller M the formula stays a lower bound."""
    for M in (1, P, 2 * P - 1, 2 * P, 3 * P + 1):
        instance = uniform_instance(P, M, 2 * waves * t_f, 2 * waves * t_b, placement=wave_placement(P, waves))
        makespan = run(instance, "hanayo").schedule.makespan
        expected = hanayo_makespan(P, M, waves, 2 * waves * t_f, 2 * waves * t_b)
        if M < 2 * P - 1:
            assert makespan >= expected
            continue
        assert makespan == expected
        busy = M * 2 * waves * (t_f + t_b)  # every device's share of the work
        assert (makespan - busy) / makespan == pytest.approx((P - 1) / (P - 1 + 2 * waves * M))


@pytest.mark.parametrize("P", DEVICES)
def test_hanayo_one_wave_beats_1f1b_and_matches_interleaved(P):
    M, F, B = 2 * P, 4, 8
    hanayo = run(uniform_instance(P, M, F, B, placement=wave_placement(P, 1)), "hanayo").schedule
    base = run(uniform_instance(P, M, F, B), "1f1b").schedule
    interleaved = run(uniform_instance(P, M, F, B, placement=interleaved_placement(P, 2)), "interleaved-1f1b")
    assert base.makespan - hanayo.makespan == (P - 1) * (F + B) / 2
    assert hanayo.makespan == interleaved.schedule.makespan


@pytest.mark.parametrize("P", [2, 3, 4])
@pytest.mark.parametrize("waves", [1, 2])
def test_hanayo_split_keeps_w_off_the_critical_path_and_memory(P, waves):
    M, F, B, W = 2 * P, 2, 4, 2
    instance = uniform_instance(P, M, 2 * waves * F, 2 * waves * B, 2 * waves * W, split_backward=True,
                                placement=wave_placement(P, waves))
    sim = run(instance, "hanayo")
    assert sim.schedule.makespan == M * 2 * waves * (F + B + W) + (P - 1) * (F + B)
    chunks = 2 * waves
    assert sim.memory.peaks == tuple(min(((chunks - 1) * M + 2 * d + 1) / chunks, M) for d in range(P))


def test_hanayo_never_deadlocks():
    """The order depends on (P, W, M) only, so one heterogeneous instance with comm per triple checks it."""
    for P in range(1, 7):
        for waves in (1, 2, 3):
            for M in range(1, 13):
                instance = heterogeneous_instance(P, M, seed=100 * P + 10 * waves + M, spread=0.9,
                                                  split_backward=M % 2 == 0, placement=wave_placement(P, waves),
                                                  comm=M % 3)
                schedule = run(instance, "hanayo").schedule
                assert schedule.makespan >= max(sum(instance.duration(op.op, op.stage) for op in
                                                    schedule.ops_of_device(d)) for d in range(P))


@pytest.mark.parametrize("placement", [linear_placement(4), interleaved_placement(4, 2),
                                       wave_placement(4, 1)[:-1] + (1,), wave_placement(4, 2)[:12]])
def test_hanayo_refuses_other_placements(placement):
    instance = heterogeneous_instance(4, 8, placement=placement)
    assert not supports("hanayo", instance)
    with pytest.raises(FormatError, match=r"^hanayo: needs the wave placement[^\n]*wave_placement\(P, W\)") as error:
        zoo_schedule(instance, "hanayo")
    assert "\n" not in str(error.value)
