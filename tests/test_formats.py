"""formats.md I/O: public instances load, load(save(x)) == x, bad input is one clear line."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

import pipesched
from pipesched import FormatError
from pipesched.pipeline import Action, PipelineInstance, Stage, simulate
from pipesched.placement import Placement, PlacementInstance
from pipesched.remat import RematInstance, RematNode, RematSchedule

numbers = st.one_of(st.integers(0, 50), st.floats(0, 50, allow_nan=False).map(lambda x: round(x, 3)))


@st.composite
def pipeline_instances(draw) -> PipelineInstance:
    P, M, S = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 6))
    remat = draw(st.booleans())
    stages = []
    for _ in range(S):
        act = draw(numbers)
        stages.append(Stage(device=draw(st.integers(0, P - 1)), F=draw(numbers) + (1 if remat else 0),
                            B=draw(numbers), W=draw(numbers), activation=act,
                            wgrad_stash=draw(st.floats(0, 1)) * act, R=draw(numbers),
                            checkpoint=draw(st.sampled_from([0, act / 2]))))
    comm = draw(st.one_of(numbers, st.lists(numbers, min_size=S - 1, max_size=S - 1).map(tuple)))
    limit = draw(st.one_of(st.none(), numbers, st.lists(numbers, min_size=P, max_size=P).map(tuple)))
    return PipelineInstance(P, M, tuple(stages), comm=comm, memory_limit=limit, split_backward=draw(st.booleans()),
                            allow_remat=remat, name=draw(st.one_of(st.none(), st.text(max_size=8))))


def sequential_program(instance: PipelineInstance) -> list[list[Action]]:
    """Microbatch after microbatch, all stages forward then backward: always deadlock-free."""
    rows: list[list[Action]] = [[] for _ in range(instance.num_devices)]
    S = instance.num_stages
    for m in range(instance.num_microbatches):
        order = [Action(s, "F", m) for s in range(S)]
        for s in reversed(range(S)):
            order.append(Action(s, "B", m))
            if instance.split_backward:
                order.append(Action(s, "W", m))
        for a in order:
            rows[instance.stages[a.stage].device].append(a)
    return rows


@st.composite
def remat_instances(draw) -> RematInstance:
    n = draw(st.integers(1, 8))
    nodes = []
    for i in range(n):
        deps = draw(st.lists(st.integers(0, i - 1), unique=True, max_size=3)) if i else []
        nodes.append(RematNode(f"v{i}", draw(numbers), draw(numbers), tuple(f"v{d}" for d in deps),
                               draw(st.one_of(st.none(), st.booleans()))))
    return RematInstance(draw(st.text(max_size=5)), tuple(nodes), budget=draw(numbers))


@st.composite
def placement_instances(draw) -> PlacementInstance:
    E, G = draw(st.integers(1, 8)), draw(st.integers(1, 4))
    C = draw(st.integers(-(-E // G), E + 1))
    trace = draw(st.lists(st.lists(st.integers(0, E - 1), unique=True, min_size=1, max_size=3).map(tuple),
                          min_size=1, max_size=12))
    return PlacementInstance(E, G, C, draw(st.integers(1, 5)), tuple(trace))


@given(pipeline_instances())
def test_pipeline_roundtrip(tmp_path_factory, instance):
    path = tmp_path_factory.mktemp("rt") / "x.json"
    instance.save(path)
    assert PipelineInstance.load(path) == instance
    schedule = simulate(instance.replace(memory_limit=None), sequential_program(instance)).schedule
    schedule.save(path)
    assert pipesched.load(path) == schedule


@given(remat_instances())
def test_remat_roundtrip(tmp_path_factory, instance):
    path = tmp_path_factory.mktemp("rt") / "x.json"
    instance.save(path)
    assert pipesched.load(path) == instance
    schedule = RematSchedule(instance, tuple(instance.default_steps()), 1.5, 2, None, "feasible", "x", 0.25)
    schedule.save(path)
    assert pipesched.load(path) == schedule


@given(placement_instances(), st.randoms(use_true_random=False))
def test_placement_roundtrip(tmp_path_factory, instance, rng):
    path = tmp_path_factory.mktemp("rt") / "x.json"
    instance.save(path)
    assert pipesched.load(path) == instance
    experts = list(range(instance.num_experts))
    rng.shuffle(experts)
    devices = [experts[d::instance.num_devices] for d in range(instance.num_devices)]
    placement = Placement.from_devices(instance, devices, lower_bound=0.5, status="feasible", solver="x",
                                       solve_time_s=0)
    placement.save(path)
    assert pipesched.load(path) == placement


def test_every_public_instance_loads(instances_dir):
    files = sorted(instances_dir.glob("*/*.json"))
    assert len(files) >= 30
    for f in files:
        obj = pipesched.load(f)
        pipesched.validate(obj)
        assert obj.to_dict()["format"] == json.loads(f.read_text())["format"]


def _pipeline_dict() -> dict:
    return {"format": "pipesched.pipeline-instance/1", "num_devices": 2, "num_microbatches": 2,
            "stages": [{"device": 0, "F": 1, "B": 2, "W": 0, "activation": 1},
                       {"device": 1, "F": 1, "B": 2, "W": 0, "activation": 1}],
            "comm": 0, "memory_limit": None, "split_backward": False}


def _break(d: dict, path: list, value) -> dict:
    target = d
    for k in path[:-1]:
        target = target[k]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return d


@pytest.mark.parametrize("path, value, key", [
    (["stages", 1, "F"], -1, "stages[1].F: must be >= 0, got -1"),
    (["stages", 0, "device"], 2, "stages[0].device: must be < 2"),
    (["stages", 0, "device"], 1.0, "stages[0].device: expected an integer"),
    (["num_microbatches"], True, "num_microbatches: expected an integer"),
    (["format"], "pipesched.remat-instance/1", "format:"),
    (["comm"], [1, 2], "comm: expected a number or a list of 1 numbers"),
    (["stages", 1, "activation"], KeyError, "stages[1].activation: missing required key"),
    (["split_backward"], "yes", "split_backward: expected true or false"),
])
def test_pipeline_instance_errors_name_the_key(tmp_path, path, value, key):
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(_break(_pipeline_dict(), path, value)))
    with pytest.raises(FormatError) as info:
        PipelineInstance.load(f)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{f}: ") and key in message


@pytest.mark.parametrize("nodes, key", [
    ([{"id": "a", "cost": 1, "memory": 1, "deps": ["zz"]}], "nodes[0].deps[0]: 'zz' unknown id"),
    ([{"id": "a", "cost": 1, "memory": 1, "deps": ["b"]}, {"id": "b", "cost": 1, "memory": 1, "deps": ["a"]}],
     "nodes[0].deps[0]: 'b' appears later: cycle"),
    ([{"id": "a", "cost": 1, "memory": 1, "deps": ["a"]}], "nodes[0].deps[0]: 'a' depends on itself (cycle)"),
    ([{"id": "a", "cost": -3, "memory": 1, "deps": []}], "nodes[0].cost: must be >= 0"),
    ([{"id": "a", "cost": 1, "memory": 1, "deps": []}, {"id": "a", "cost": 1, "memory": 1, "deps": []}],
     "nodes[1].id: duplicate id"),
])
def test_remat_instance_errors(nodes, key):
    with pytest.raises(FormatError, match=key.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        pipesched.from_dict({"format": "pipesched.remat-instance/1", "name": "x", "nodes": nodes, "budget": 9})


@pytest.mark.parametrize("changes, key", [
    ({"slots_per_device": 1, "num_devices": 2}, "slots_per_device: C*G = 1*2 = 2 < num_experts 3"),
    ({"trace": [[0, 7]]}, "trace[0][1]: must be < 3"),
    ({"trace": [[1, 1]]}, "trace[0]: expert ids of a token must be distinct"),
    ({"trace": []}, "trace: must not be empty"),
])
def test_placement_instance_errors(changes, key):
    d = {"format": "pipesched.placement-instance/1", "num_experts": 3, "num_devices": 2, "slots_per_device": 2,
         "batch_size": 1, "trace": [[0, 1]], **changes}
    with pytest.raises(FormatError) as info:
        pipesched.from_dict(d)
    assert key in str(info.value)


def test_schedule_with_unknown_step_id_is_malformed(tmp_path):
    d = {"format": "pipesched.remat-schedule/1",
         "instance": {"name": "x", "nodes": [{"id": "a", "cost": 1, "memory": 1, "deps": []}], "budget": 1},
         "steps": [["compute", "nope"]], "cost": 1, "peak_memory": 1, "lower_bound": None, "status": "feasible",
         "solver": "t", "solve_time_s": 0}
    with pytest.raises(FormatError, match=r"steps\[0\]\[1\]: unknown node id 'nope'"):
        pipesched.from_dict(d)


def test_truncated_json_is_one_line(tmp_path):
    f = tmp_path / "t.json"
    f.write_text(json.dumps(_pipeline_dict())[:40])
    with pytest.raises(FormatError) as info:
        pipesched.load(f)
    assert str(info.value).startswith(f"{f}: invalid JSON at line 1") and "\n" not in str(info.value)
