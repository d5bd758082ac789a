"""Small builders shared by the tests (hand-written, independent of the solvers)."""

from __future__ import annotations

from pipesched.pipeline import Action, PipelineInstance, Stage


def uniform(P: int, M: int, *, F: float = 10, B: float = 20, W: float = 10, activation: float = 1,
            split: bool = False, remat: bool = False, memory_limit=None, comm=0) -> PipelineInstance:
    stages = [Stage(d, F, B, W, activation, wgrad_stash=activation / 2 if split else 0,
                    checkpoint=activation / 4 if remat else 0) for d in range(P)]
    return PipelineInstance(P, M, stages, comm=comm, memory_limit=memory_limit, split_backward=split,
                            allow_remat=remat)


def hand_1f1b(instance: PipelineInstance, *, remat: frozenset[tuple[int, int]] = frozenset()) -> list[list[Action]]:
    """Textbook 1F1B for one stage per device (stage d on device d): P-1-d warm-up forwards, then
    one forward / one backward; W right after its B when split; R right before its B."""
    P, M = instance.num_devices, instance.num_microbatches
    rows = []
    for d in range(P):
        row: list[Action] = []

        def backward(m: int) -> None:
            if (d, m) in remat:
                row.append(Action(d, "R", m))
            row.append(Action(d, "B", m))
            if instance.split_backward:
                row.append(Action(d, "W", m))

        f = min(P - 1 - d, M)
        row.extend(Action(d, "F", m) for m in range(f))
        for b in range(M):
            if f < M:
                row.append(Action(d, "F", f))
                f += 1
            backward(b)
        rows.append(row)
    return rows
