"""The auto-tuner's pure parts: the grid, percentiles and the choice of a setting."""

from __future__ import annotations

import pytest

from serve.autotune import Measured, choose, percentile, sweep_grid, table


def measured(cost: int, wait: float, *, jobs_s: float, p95_s: float, failed: int = 0) -> Measured:
    return Measured(setting={"max_batch_cost": cost, "max_wait_ms": wait}, offered_rps=2.0,
                    jobs=8, succeeded=8 - failed, failed=failed, throughput_jobs_s=jobs_s,
                    p50_s=p95_s / 2, p95_s=p95_s, wall_s=10.0, batch_sizes=[2, 4])


def test_the_grid_is_every_combination_in_a_stable_order():
    assert sweep_grid([4, 8], [50, 200]) == [
        {"max_batch_cost": 4, "max_wait_ms": 50.0}, {"max_batch_cost": 4, "max_wait_ms": 200.0},
        {"max_batch_cost": 8, "max_wait_ms": 50.0}, {"max_batch_cost": 8, "max_wait_ms": 200.0}]
    assert sweep_grid([8], [50], [1, 2])[1] == {"max_batch_cost": 8, "max_wait_ms": 50.0,
                                                "max_concurrent_batches": 2}
    with pytest.raises(ValueError, match="at least one"):
        sweep_grid([], [50])


def test_percentiles_interpolate_like_numpy():
    import numpy as np

    values = [0.3, 1.2, 0.9, 4.0, 2.2, 0.1, 7.5]
    for q in (0, 10, 50, 95, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_the_choice_is_the_most_throughput_within_the_target_with_no_failure():
    fast_but_slow_tail = measured(16, 800, jobs_s=3.0, p95_s=40.0)
    failing = measured(16, 50, jobs_s=2.8, p95_s=5.0, failed=1)
    good = measured(8, 200, jobs_s=2.5, p95_s=9.0)
    tie = measured(8, 50, jobs_s=2.5, p95_s=7.0)
    worse = measured(4, 50, jobs_s=1.0, p95_s=3.0)
    results = [fast_but_slow_tail, failing, good, tie, worse]
    assert choose(results, p95_target_s=30.0) is tie  # ties go to the lower p95
    assert choose(results, p95_target_s=60.0) is fast_but_slow_tail
    assert choose(results, p95_target_s=1.0) is None
    text = table(results, tie, 30.0)
    assert "<- chosen" in text.splitlines()[4] and "misses target" in text.splitlines()[1]
