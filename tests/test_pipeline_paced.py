"""Paced (periodic) schedules of solvers/_pipeline_periodic.py: valid, within memory, and what
makes multi-wave placements under tight memory close to their bounds."""

from hypothesis import given, settings
from pipesched.solvers import solve_pipeline
from pipesched.solvers._pipeline_periodic import group_sizes, paced_candidates
from test_pipeline_bounds import multi_wave_instances

from pipesched.pipeline import validate_pipeline
from pipesched.pipeline.bounds import lower_bound
from pipesched.pipeline.zoo import interleaved_placement, uniform_instance, v_placement


@settings(max_examples=30, deadline=None)
@given(multi_wave_instances())
def test_paced_candidates_are_valid_and_fit_memory(instance):
    for candidate in paced_candidates(instance):
        assert candidate.fits_memory
        report = validate_pipeline(candidate.schedule)
        assert max(p - (instance.limit(d) or p) for d, p in enumerate(report.peak_memory)) <= 1e-6


def test_greedy_is_close_to_the_bound_on_multi_wave_placements_at_one_microbatch_of_memory():
    """Before pacing, the best schedule found on these was 1.3-1.8x the bound (bench_pipeline)."""
    for placement, split in ((v_placement(4), True), (interleaved_placement(4, 2), False)):
        instance = uniform_instance(4, 16, 10, 10 if split else 20, 10 if split else 0, split_backward=split,
                                    placement=placement, memory_limit=1)
        result = solve_pipeline(instance, "greedy")
        validate_pipeline(result.schedule)
        assert result.objective <= 1.12 * lower_bound(instance), placement


def test_groups_follow_how_many_microbatches_memory_holds():
    instance = uniform_instance(4, 8, 10, 20, placement=v_placement(4), memory_limit=2)
    assert list(group_sizes(instance)) == [1, 2]
    assert list(group_sizes(instance.replace(memory_limit=None))) == [1]
