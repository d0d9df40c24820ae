"""What every actor does once at start (pin torch threads, open Redis and the store), and
the batching shell shared by the GPU pools."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import redis

from pipeline.config import Settings, StageBatchConfig
from pipeline.orchestration import TIMEOUT_REASON, is_expired
from pipeline.records import StageResult, WorkItem
from pipeline.storage import StoreSet, open_stores

ENDED_REASON = "the job already ended"


def open_backends(settings: Settings) -> tuple[redis.Redis, StoreSet]:
    if settings.service.redis_url is None:
        raise ValueError("redis_url must be resolved before actors start (see serve.launcher)")
    return redis.Redis.from_url(settings.service.redis_url), open_stores(settings.storage)


def pin_torch_threads(settings: Settings) -> None:
    import torch

    torch.set_num_threads(settings.models.torch_num_threads)


class LiveLimit:
    """An asyncio concurrency limit that can change while batches run.

    Serve fixes ``max_concurrent_batches`` when a replica starts; this gate inside the batch
    function makes the concurrency a live knob (batching.yaml, through user_config).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self._changed: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:  # created on the replica's event loop
            self._changed = asyncio.Condition()
        return self._changed

    async def set_limit(self, limit: int) -> None:
        async with self._condition():
            self.limit = limit
            self._condition().notify_all()

    async def __aenter__(self) -> None:
        async with self._condition():
            await self._condition().wait_for(lambda: self.active < self.limit)
            self.active += 1

    async def __aexit__(self, *exc: object) -> None:
        async with self._condition():
            self.active -= 1
            self._condition().notify_all()


def apply_batching(batched_method, gate: LiveLimit, cfg: StageBatchConfig):
    """Set a ``@serve.batch`` method's size (cost units) and wait from the pool's config."""
    batched_method.set_max_batch_size(cfg.max_batch_cost)
    batched_method.set_batch_wait_timeout_s(cfg.max_wait_ms / 1000.0)
    return gate.set_limit(cfg.max_concurrent_batches)


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
