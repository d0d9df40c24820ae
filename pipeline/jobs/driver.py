"""The job runner's decisions, as a plain object with its ports injected.

A job runner replica (serve/runner.py) holds one ``JobDriver`` and only moves messages:
it hands each job to ``run_job``, turns Serve's answers into ``StagePort`` results and
exceptions, and runs the heartbeat and reaper loops. Everything that decides (claim the
job, which stage next, retry or give up, wait out a full pool, end the job, have its inputs
purged, which jobs are orphans) is here, unit-tested with fakes (tests/unit/test_driver.py)
like the pure rules it calls in ``orchestration.py``.

The driver is the one writer of the lifecycle of the jobs it holds (docs/ARCHITECTURE.md,
"Who writes a job"): it claims a job (queued -> running), records its progress and
attempts, and ends it; the reaper ends orphans through the same ``JobStore.transition``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import redis

from pipeline.core.reasons import Reason, stage_timed_out, worker_failed
from pipeline.core.records import JobRecord, Orphan, Stage, StageResult, Worker, WorkItem
from pipeline.core.retry import RetryPolicy, retry_call_async
from pipeline.jobs.orchestration import (
    Next,
    after_crash,
    after_result,
    check_deadline,
    find_orphan,
    is_far_overdue,
    stage_timeout_s,
    start,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# Redis briefly away: about a minute of backoff; after that the job is settled failed in
# the background (or by the reaper).
STORE_POLICY = RetryPolicy(max_tries=12, base_s=0.1, cap_s=8.0)
# A full pool: wait without spending an attempt, until the job's deadline (the tries only
# bound the loop should a clock stand still).
POOL_FULL_POLICY = RetryPolicy(max_tries=100_000, base_s=0.1, cap_s=2.0)
# Asking retention to purge: a few tries; the retention sweep is the backstop.
PURGE_POLICY = RetryPolicy(max_tries=5, base_s=0.2, cap_s=2.0)


class PoolFull(Exception):
    """A stage's pool refused the call because it is full; nothing ran."""


class JobPort(Protocol):
    """What the driver needs of the job store (pipeline/state/job_store.py)."""

    def claim_job(self, job_id: str, runner_id: str) -> bool: ...
    def update_job(self, job_id: str, **fields: object) -> bool: ...
    def finish_job(self, job_id: str, *, ok: bool, reason: str = "",
                   output_ids: tuple[str, ...] = ()) -> bool: ...
    def live(self, worker: Worker, now_s: float) -> set[str]: ...
    def unfinished_jobs(self) -> list[JobRecord]: ...
    def fail_orphan(self, job: JobRecord, orphan: Orphan, *, now_s: float) -> bool: ...
    def try_lock(self, name: str, owner: str, ttl_s: float) -> bool: ...


class StagePort(Protocol):
    """Calls a stage's pool with one job. Raises ``PoolFull`` when the pool is full,
    ``TimeoutError`` past ``timeout_s`` (the port withdraws the call and discards a late
    answer's outputs), any other exception when the worker failed."""

    async def call(self, stage: Stage, item: WorkItem, timeout_s: float) -> StageResult: ...


class PurgePort(Protocol):
    """Asks the retention pool to purge an ended job's inputs and face data."""

    async def purge_job(self, job_id: str) -> None: ...


@dataclass(slots=True)
class DriverKnobs:
    """The runner's live knobs (batching.yaml via Serve user_config) and its timings."""

    max_attempts: int
    stage_timeout_s: float
    lease_s: float  # service.yaml heartbeat_lease_s
    job_timeout_s: float  # service.yaml job_timeout_s


def _is_store_error(exc: BaseException) -> bool:
    return isinstance(exc, redis.RedisError)


class JobDriver:
    """Drives the jobs one runner holds, and reaps the jobs nobody can finish."""

    def __init__(self, jobs: JobPort, stages: StagePort, retention: PurgePort, *,
                 runner_id: str, knobs: DriverKnobs,
                 on_finished: Callable[[WorkItem, bool, float], None] = lambda *_: None,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.jobs = jobs
        self.stages = stages
        self.retention = retention
        self.runner_id = runner_id
        self.knobs = knobs
        self.on_finished = on_finished  # (item, ok, started_s): the usage event
        self.clock = clock
        self.sleep = sleep
        self.held: dict[str, WorkItem] = {}  # the only copies of these jobs' device keys
        self.beating_since: float | None = clock()  # None while heartbeats fail
        self._tasks: set[asyncio.Task] = set()

    # One job, from the hand-off to its end.

    async def run_job(self, item: WorkItem) -> bool:
        """Claim the job, drive it through its stages, record its end and have its inputs
        purged. Returns whether it succeeded. If the driver cannot finish it (Redis away
        for a minute, the call cancelled), it settles the job failed in the background."""
        if item.job_id in self.held:  # a second hand-off of a job this runner drives
            return False
        self.held[item.job_id] = item
        started_s = self.clock()
        try:
            if not await self._store(self.jobs.claim_job, item.job_id, self.runner_id):
                return False  # withdrawn, reaped or deleted before it got here
            plan = start(item, self.clock())
            while plan.stage is not None:
                done = plan.item.frames_done
                plan = await self.run_stage(plan.stage, plan.item)
                if plan.item.frames_done != done:  # a clip's chunk: report progress
                    await self._store(self.jobs.update_job, item.job_id,
                                      frames_done=plan.item.frames_done)
            await self._store(self.jobs.finish_job, item.job_id, ok=plan.ok,
                              reason=plan.reason, output_ids=plan.output_ids)
            self.on_finished(plan.item, plan.ok, started_s)
        except BaseException:
            self.spawn(self.settle(item.job_id, Reason.INTERRUPTED))
            raise
        finally:
            self.held.pop(item.job_id, None)  # the device key goes with it
        self.spawn(self.purge(item.job_id))
        return plan.ok

    async def run_stage(self, stage: Stage, item: WorkItem) -> Next:
        """One stage call and what follows from it. A full pool is waited out without
        spending an attempt, but never past the job's deadline."""
        async def call() -> StageResult:
            if self.clock() >= item.deadline_s:  # the last wait outlived the deadline
                raise PoolFull(stage.value)
            return await self.stages.call(stage, item, self._timeout_s(item))

        try:
            result = await retry_call_async(
                call, policy=POOL_FULL_POLICY, sleep=self.sleep,
                retryable=lambda exc: isinstance(exc, PoolFull) and self.clock() < item.deadline_s)
        except PoolFull:  # still full at the deadline (or after very many waits)
            return check_deadline(Next(item, stage=stage), self.clock())
        except Exception as exc:  # the worker died, timed out or raised: retried
            what = (stage_timed_out(stage, self.knobs.stage_timeout_s)
                    if isinstance(exc, TimeoutError) else worker_failed(stage, exc))
            plan = after_crash(stage, item, what, max_attempts=self.knobs.max_attempts,
                               now_s=self.clock())
        else:
            plan = after_result(stage, item, result, max_attempts=self.knobs.max_attempts,
                                now_s=self.clock())
        if plan.stage is not None and plan.item.attempts != item.attempts:
            await self._store(self.jobs.update_job, item.job_id, attempts=plan.item.attempts)
        return plan

    def _timeout_s(self, item: WorkItem) -> float:
        return stage_timeout_s(item, self.clock(), per_call_s=self.knobs.stage_timeout_s)

    async def settle(self, job_id: str, reason: str) -> None:
        """End a job this runner cannot finish (first outcome wins), then purge it."""
        try:
            await self._store(self.jobs.finish_job, job_id, ok=False, reason=reason)
        except redis.RedisError:
            log.warning("a job could not be settled; the reaper will")
        await self.purge(job_id)

    async def purge(self, job_id: str) -> None:
        """Ask retention to purge; a few tries, then the retention sweep is the backstop
        (the job's inputs were made due when it ended)."""
        try:
            await retry_call_async(lambda: self.retention.purge_job(job_id),
                                   policy=PURGE_POLICY, sleep=self.sleep)
        except Exception:
            log.warning("purge of a job deferred to the retention sweep")

    # Orphans: jobs whose holder is gone.

    def beat(self, ok: bool) -> None:
        """Told of each heartbeat: a reaper must have beaten without a break for a lease."""
        if not ok:
            self.beating_since = None
        elif self.beating_since is None:
            self.beating_since = self.clock()

    async def reap_if_leader(self) -> bool:
        """Reap if this runner has heartbeated without a break for a whole lease (so after
        a Redis outage every live worker renewed first) and holds the reaper lock."""
        now = self.clock()
        if self.beating_since is None or now - self.beating_since < self.knobs.lease_s:
            return False
        if not await asyncio.to_thread(self.jobs.try_lock, "reaper", self.runner_id,
                                       self.knobs.lease_s / 2):
            return False
        await self.reap(now)
        return True

    async def reap(self, now_s: float) -> list[str]:
        """Fail and purge the jobs whose runner or ingress is gone, that no runner ever
        took, or that are far past their timeout; each failure re-checks its grounds
        atomically. Returns the ids of the jobs it failed."""
        live = await asyncio.to_thread(self.jobs.live, Worker.RUNNER, now_s)
        live.add(self.runner_id)
        ingresses = await asyncio.to_thread(self.jobs.live, Worker.INGRESS, now_s)
        timeout_s = self.knobs.job_timeout_s
        failed = []
        for job in await asyncio.to_thread(self.jobs.unfinished_jobs):
            orphan = find_orphan(job, live_runners=live, live_ingresses=ingresses,
                                 now_s=now_s, unclaimed_grace_s=timeout_s)
            if job.runner_id == self.runner_id and job.job_id not in self.held:
                orphan = Orphan(Reason.INTERRUPTED, None)  # ours, but no longer driven
            elif orphan is None and is_far_overdue(job, now_s=now_s, job_timeout_s=timeout_s):
                orphan = Orphan(Reason.TIMEOUT, None)
            if orphan is not None and await asyncio.to_thread(
                    self.jobs.fail_orphan, job, orphan, now_s=now_s):
                failed.append(job.job_id)
                self.spawn(self.purge(job.job_id))
        return failed

    # Plumbing.

    async def _store(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A job-store call off the event loop, retried while Redis is briefly away."""
        return await retry_call_async(lambda: asyncio.to_thread(call, *args, **kwargs),
                                      policy=STORE_POLICY, retryable=_is_store_error,
                                      sleep=self.sleep)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` in the background, keeping a reference until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for the background work (settles, purges) spawned so far: for tests."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
