"""What every actor does once at start (pin torch threads, open Redis and the store), and
the batching shell shared by the GPU pools."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from pipeline.core.config import Settings, StageBatchConfig
from pipeline.core.records import Stage, StageResult, WorkItem
from pipeline.jobs.orchestration import TIMEOUT_REASON, batch_cost, is_expired, merge_waiting
from pipeline.state.job_store import JobStore
from pipeline.storage.base import StoreSet, open_stores
from serve.telemetry import observe_batch

ENDED_REASON = "the job already ended"
SUPERSEDED_REASON = "a newer attempt of this job ran instead"


def open_backends(settings: Settings) -> tuple[redis.Redis, StoreSet]:
    if settings.service.redis_url is None:
        raise ValueError("redis_url must be resolved before actors start (see serve.launcher)")
    return redis.Redis.from_url(settings.service.redis_url), open_stores(settings.storage)


def pin_torch_threads(settings: Settings) -> None:
    import torch

    torch.set_num_threads(settings.models.torch_num_threads)


@dataclass(slots=True)
class _Waiting:
    key: str
    items: list[WorkItem]
    future: asyncio.Future


class BatchRunner:
    """The model calls of one GPU replica: at most ``max_concurrent_batches`` at once, each
    merging every batch Serve handed over meanwhile (same key, up to ``max_batch_cost``).

    Why not Serve's batching alone: ``@serve.batch`` closes a batch when its wait times out,
    even while the model is busy, so under load a replica queues many small batches behind
    the running one. Merging them when the model frees up keeps batches full; Serve still
    routes, splits by key, bounds the queue and applies the first wait. Knobs change live.
    """

    def __init__(self, run: Callable[[list[WorkItem]], list[StageResult]],
                 cfg: StageBatchConfig) -> None:
        self.run = run
        self.cfg = cfg
        self.active = 0
        self.waiting: list[_Waiting] = []
        self.calls: dict[asyncio.Task, float] = {}  # running model calls -> start time

    def longest_call_s(self, now_s: float) -> float:
        """How long the oldest running model call has been running (0: none)."""
        return max((now_s - started for started in self.calls.values()), default=0.0)

    def reconfigure(self, cfg: StageBatchConfig) -> None:
        self.cfg = cfg
        self._start_ready()

    async def submit(self, key: str, items: list[WorkItem]) -> list[StageResult]:
        future = asyncio.get_running_loop().create_future()
        self.waiting.append(_Waiting(key, items, future))
        self._start_ready()
        return await future

    def _start_ready(self) -> None:
        while self.waiting and self.active < self.cfg.max_concurrent_batches:
            taken_at = merge_waiting([(w.key, batch_cost(w.items), frozenset(
                it.job_id for it in w.items)) for w in self.waiting], self.cfg.max_batch_cost)
            taken = [self.waiting[i] for i in taken_at]
            self.waiting = [w for i, w in enumerate(self.waiting) if i not in set(taken_at)]
            self.active += 1
            task = asyncio.get_running_loop().create_task(self._call(taken))
            self.calls[task] = time.time()
            task.add_done_callback(self.calls.pop)

    async def _call(self, taken: list[_Waiting]) -> None:
        items = _newest_attempts([it for w in taken for it in w.items])
        try:
            results = await asyncio.to_thread(self.run, items)
            by_attempt = {(it.job_id, it.attempts): r for it, r in zip(
                items, _in_order(items, results), strict=True)}
            for w in taken:
                if not w.future.done():
                    w.future.set_result([by_attempt.get((it.job_id, it.attempts)) or StageResult(
                        it.job_id, ok=False, reason=SUPERSEDED_REASON) for it in w.items])
        except Exception as exc:
            for w in taken:
                if not w.future.done():
                    w.future.set_exception(exc)
        finally:  # whatever happened, nobody waits forever
            for w in taken:
                if not w.future.done():
                    w.future.set_exception(RuntimeError("the model call was interrupted"))
            self.active -= 1
            self._start_ready()


def _newest_attempts(items: list[WorkItem]) -> list[WorkItem]:
    """One item per job, its newest attempt: an abandoned attempt that Serve batched with
    its retry is answered 'superseded' instead of generating twice."""
    newest: dict[str, WorkItem] = {}
    for item in items:
        if item.job_id not in newest or item.attempts > newest[item.job_id].attempts:
            newest[item.job_id] = item
    return list(newest.values())


def _in_order(items: list[WorkItem], results: list[StageResult]) -> list[StageResult]:
    by_job = {r.job_id: r for r in results}
    return [by_job[it.job_id] for it in items]


def apply_batching(batched_method, runner: BatchRunner, cfg: StageBatchConfig) -> None:
    """Set a ``@serve.batch`` method's size (cost units) and wait, and the model calls'
    merging and concurrency, from the pool's config."""
    batched_method.set_max_batch_size(cfg.max_batch_cost)
    batched_method.set_batch_wait_timeout_s(cfg.max_wait_ms / 1000.0)
    runner.reconfigure(cfg)


def run_unexpired(items: list[WorkItem], run: Callable[[list[WorkItem]], list[StageResult]],
                  on_batch: Callable[[list[WorkItem]], None],
                  ended: Callable[[list[str]], set[str]]) -> list[StageResult]:
    """Run a batch on the jobs still within their deadline and not ended meanwhile (their
    runner died, or the account was deleted); the others fail unrun, costing no GPU time."""
    now = time.time()
    gone = ended([it.job_id for it in items])
    live = [it for it in items if not is_expired(it, now) and it.job_id not in gone]
    results = {}
    if live:
        on_batch(live)
        results = {r.job_id: r for r in run(live)}
    return [results.get(it.job_id) or StageResult(
        it.job_id, ok=False, reason=ENDED_REASON if it.job_id in gone else TIMEOUT_REASON)
        for it in items]


def live_model_call(stage: Stage, jobs: JobStore,
                    run: Callable[[list[WorkItem]], list[StageResult]],
                    max_cost_units: Callable[[], int]) -> Callable[[list[WorkItem]], list[StageResult]]:
    """A GPU pool's model call as its BatchRunner runs it: expired and ended jobs are
    dropped, the batch is recorded (job status, batch size and fill, metrics), then run."""
    def note_batch(items: list[WorkItem]) -> None:
        observe_batch(stage, items)
        jobs.note_batch([it.job_id for it in items], stage, cost_units=batch_cost(items),
                        max_cost_units=max_cost_units())

    return lambda items: run_unexpired(items, run, note_batch, jobs.finished_among)


def raise_if_stuck(model_calls: BatchRunner, stage_timeout_s: float) -> None:
    """For a GPU pool's check_health: a model call stuck past twice the stage timeout (a
    hung GPU) marks the replica unhealthy; Serve replaces it and runners retry elsewhere."""
    stuck_s = model_calls.longest_call_s(time.time())
    if stuck_s > stage_timeout_s * 2:
        raise RuntimeError(f"a model call has run for {stuck_s:.0f} s")
