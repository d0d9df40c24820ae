"""run_isolating_failures: one bad photo fails its own job, not the batch."""

import pytest

from pipeline.core.records import StageResult
from pipeline.jobs.stages import run_isolating_failures
from tests.unit.factories import make_item


def test_a_batch_that_raises_is_retried_job_by_job():
    items = [make_item("ok1"), make_item("bad"), make_item("ok2")]

    def stage(batch):
        if any(it.job_id == "bad" for it in batch):
            raise RuntimeError("decoder exploded")
        return [StageResult(it.job_id, ok=True) for it in batch]

    results = run_isolating_failures(stage, items)
    assert [(r.job_id, r.ok) for r in results] == [("ok1", True), ("bad", False), ("ok2", True)]
    assert results[1].retryable and "could not be processed" in results[1].reason


def test_a_single_job_batch_raises_as_a_worker_failure():
    with pytest.raises(RuntimeError):
        run_isolating_failures(_always_raises, [make_item("solo")])


def _always_raises(batch):
    raise RuntimeError("worker state is broken")
