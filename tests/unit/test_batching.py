"""batching.BatchQueue: full batches go at once, partial ones after max_wait_ms, keys never mix."""

from __future__ import annotations

from pipeline.batching import BatchQueue
from pipeline.config import StageBatchConfig

A = ("ai_photo", "portrait", 64)
B = ("art_style", "comic", 64)


def make_queue(max_batch_size: int = 4, max_wait_ms: float = 50.0) -> BatchQueue[str]:
    return BatchQueue(StageBatchConfig(max_batch_size=max_batch_size, max_wait_ms=max_wait_ms))


def fill(queue: BatchQueue[str], key, names: list[str], now_s: float) -> None:
    for name in names:
        queue.add(name, key, now_s)


def test_full_batch_is_released_at_once():
    queue = make_queue(max_batch_size=3)
    fill(queue, A, ["a1", "a2", "a3", "a4"], now_s=0.0)

    assert queue.pop_ready(now_s=0.0) == [["a1", "a2", "a3"]]
    assert len(queue) == 1


def test_partial_batch_waits_for_max_wait_ms():
    queue = make_queue(max_batch_size=4, max_wait_ms=50)
    fill(queue, A, ["a1", "a2"], now_s=10.0)

    assert queue.pop_ready(now_s=10.049) == []
    assert queue.pop_ready(now_s=10.05) == [["a1", "a2"]]
    assert len(queue) == 0


def test_wait_is_measured_from_the_oldest_job():
    queue = make_queue(max_batch_size=4, max_wait_ms=100)
    queue.add("early", A, 0.0)
    queue.add("late", A, 0.09)

    assert queue.pop_ready(now_s=0.1) == [["early", "late"]]


def test_keys_are_never_mixed_in_one_batch():
    queue = make_queue(max_batch_size=4, max_wait_ms=0)
    queue.add("a1", A, 0.0)
    queue.add("b1", B, 0.0)
    queue.add("a2", A, 0.0)
    queue.add("b2", B, 0.0)

    batches = queue.pop_ready(now_s=0.0)

    assert sorted(batches) == [["a1", "a2"], ["b1", "b2"]]


def test_fifo_order_within_a_key():
    queue = make_queue(max_batch_size=2, max_wait_ms=0)
    fill(queue, A, ["first", "second", "third", "fourth", "fifth"], now_s=0.0)

    assert queue.pop_ready(now_s=1.0) == [["first", "second"], ["third", "fourth"], ["fifth"]]


def test_max_batches_is_honoured_and_the_rest_stays_queued():
    queue = make_queue(max_batch_size=2, max_wait_ms=0)
    fill(queue, A, ["a1", "a2", "a3", "a4"], now_s=0.0)
    fill(queue, B, ["b1", "b2"], now_s=0.5)

    assert queue.pop_ready(now_s=1.0, max_batches=1) == [["a1", "a2"]]
    assert len(queue) == 4
    assert queue.pop_ready(now_s=1.0, max_batches=2) == [["a3", "a4"], ["b1", "b2"]]
    assert len(queue) == 0


def test_max_batches_zero_releases_nothing():
    queue = make_queue(max_batch_size=1)
    fill(queue, A, ["a1"], now_s=0.0)

    assert queue.pop_ready(now_s=5.0, max_batches=0) == []
    assert len(queue) == 1


def test_oldest_group_is_released_first():
    queue = make_queue(max_batch_size=8, max_wait_ms=10)
    queue.add("b-old", B, 0.0)
    queue.add("a-new", A, 0.5)

    assert queue.pop_ready(now_s=1.0) == [["b-old"], ["a-new"]]


def test_full_batch_goes_before_an_older_partial_one_when_slots_are_limited():
    queue = make_queue(max_batch_size=2, max_wait_ms=10)
    queue.add("a-lonely", A, 0.0)  # partial, due since 0.01
    fill(queue, B, ["b1", "b2"], now_s=0.5)  # full

    assert queue.pop_ready(now_s=1.0, max_batches=1) == [["b1", "b2"]]


def test_reconfigure_changes_the_batch_size_and_wait():
    queue = make_queue(max_batch_size=8, max_wait_ms=1000)
    fill(queue, A, ["a1", "a2", "a3"], now_s=0.0)
    assert queue.pop_ready(now_s=0.0) == []

    queue.reconfigure(StageBatchConfig(max_batch_size=2, max_wait_ms=1000))
    assert queue.pop_ready(now_s=0.0) == [["a1", "a2"]]

    queue.reconfigure(StageBatchConfig(max_batch_size=2, max_wait_ms=0))
    assert queue.pop_ready(now_s=0.0) == [["a3"]]


def test_remove_drops_a_finished_jobs_items_from_every_group():
    queue = make_queue(max_batch_size=8, max_wait_ms=0)
    fill(queue, A, ["a1", "gone"], now_s=0.0)
    fill(queue, B, ["gone"], now_s=0.0)
    assert queue.remove(lambda item: item == "gone") == 2
    assert queue.pop_ready(now_s=1.0) == [["a1"]]
