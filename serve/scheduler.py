"""The batching scheduler: one replica holding the queues between ingress and GPU stages.

Jobs arrive with their device key, which lives only here, in memory, until the job ends.
The loop pops ready batches (pipeline.batching) and sends them to the face and diffusion
pools, then finishes each job and asks the retention pool to purge its inputs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import redis
from ray import serve

from pipeline.batching import BatchQueue
from pipeline.config import BatchingConfig, Settings
from pipeline.errors import NotFound
from pipeline.jobs import JobStore
from pipeline.records import StageResult, WorkItem
from pipeline.scheduling import Next, after_crash, after_result, first_stage

log = logging.getLogger("ray.serve")

STALE_CHECK_INTERVAL_S = 30.0
RESTART_REASON = (
    "the service restarted before this job finished; the device key is held in memory only, "
    "so please submit the photos again"
)


@dataclass
class _Live:
    accepted_s: float
    attempts: int  # the attempt whose results count; older ones arrive late and are dropped


@serve.deployment(num_replicas=1, max_ongoing_requests=10_000,
                  ray_actor_options={"num_cpus": 0})
class SchedulerDeployment:
    def __init__(self, settings: Settings, face, diffusion, retention) -> None:
        self.settings = settings
        self.jobs = JobStore(redis.Redis.from_url(settings.service.redis_url, socket_timeout=5,
                                                  socket_connect_timeout=2))
        self.handles = {"face": face, "diffusion": diffusion}
        self.retention = retention
        self.batching = settings.batching
        self.queues: dict[str, BatchQueue[WorkItem]] = {
            "face": BatchQueue(self.batching.face),
            "diffusion": BatchQueue(self.batching.diffusion),
        }
        self.inflight = {"face": 0, "diffusion": 0}
        self.live: dict[str, _Live] = {}  # the device keys live in the queued items only
        self._tasks: set[asyncio.Task] = set()
        self._loop_task: asyncio.Task | None = None
        self._last_stale_check_s = 0.0
        self._orphans = self._fail_orphans()

    def _fail_orphans(self) -> list[str]:
        """Jobs left active by a previous scheduler lost their key: fail them now."""
        orphans = self.jobs.active_job_ids()
        for job_id in orphans:
            self.jobs.finish_job(job_id, ok=False, reason=RESTART_REASON)
        return orphans

    def reconfigure(self, user_config: dict) -> None:
        """Batch sizes and waits change at run time through Serve's user_config."""
        self.batching = BatchingConfig.model_validate(user_config)
        self.queues["face"].reconfigure(self.batching.face)
        self.queues["diffusion"].reconfigure(self.batching.diffusion)

    def _spawn(self, coro) -> None:
        """Run in the background, keeping a reference so the task is not collected."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())
            for job_id in self._orphans:
                self._spawn(self._purge(job_id))
            self._orphans = []

    async def check_health(self) -> None:
        self._ensure_loop()

    async def submit(self, item: WorkItem) -> None:
        """Queue an accepted job. Returns at once; the job's status tells the rest."""
        self._ensure_loop()
        self.live[item.job_id] = _Live(accepted_s=time.time(), attempts=item.attempts)
        self.queues[first_stage(item)].add(item, item.batch_key, time.time())

    async def _run(self) -> None:
        while True:
            try:
                self._dispatch_ready()
                self._expire_overdue()
                await self._fail_stale_active()
            except Exception:  # keep the loop alive; each job still ends by its timeout
                log.exception("scheduler loop iteration failed")
            await asyncio.sleep(self.batching.poll_interval_ms / 1000.0)

    def _dispatch_ready(self) -> None:
        now = time.time()
        for stage, queue in self.queues.items():
            cfg = getattr(self.batching, stage)
            free = cfg.max_inflight_batches - self.inflight[stage]
            if free <= 0:
                continue
            for batch in queue.pop_ready(now, max_batches=free):
                batch = [it for it in batch if it.job_id in self.live]
                if batch:
                    self.inflight[stage] += 1
                    self._spawn(self._call_stage(stage, batch))

    async def _call_stage(self, stage: str, batch: list[WorkItem]) -> None:
        try:
            await asyncio.to_thread(self._mark_running, stage, batch)
        except redis.RedisError:
            log.warning("could not mark %d jobs running (Redis unavailable)", len(batch))
        try:
            call = self.handles[stage].run_batch.remote(batch)
            results = await asyncio.wait_for(call, timeout=self.batching.stage_timeout_s)
        except Exception as exc:  # worker died, timed out or raised: the batch is retried
            reason = f"the {stage} worker failed ({type(exc).__name__})"
            plans = [after_crash(stage, it, reason, max_attempts=self.batching.max_attempts)
                     for it in batch]
            results = [None] * len(batch)
        else:
            plans = [after_result(stage, it, res, max_attempts=self.batching.max_attempts)
                     for it, res in zip(batch, results, strict=True)]
        finally:
            self.inflight[stage] -= 1
        for sent, plan, result in zip(batch, plans, results, strict=True):
            self._carry_out(sent, plan, result)

    def _mark_running(self, stage: str, batch: list[WorkItem]) -> None:
        for item in batch:
            self.jobs.update_job(item.job_id, status="running", attempts=item.attempts,
                                 **{f"{stage}_batch_size": len(batch)})

    def _carry_out(self, sent: WorkItem, plan: Next, result: StageResult | None) -> None:
        job_id = sent.job_id
        live = self.live.get(job_id)
        if live is None or live.attempts != sent.attempts:
            # A late answer for an ended job or an abandoned attempt: drop it, and have
            # whatever it wrote (face data, outputs) removed.
            if result is not None and result.output_ids:
                self._spawn(self._discard_outputs(sent.account_id, result.output_ids))
            if live is None:
                self._spawn(self._purge(job_id))
            return
        if plan.stage is not None:
            live.attempts = plan.item.attempts
            self.queues[plan.stage].add(plan.item, plan.item.batch_key, time.time())
            return
        self._finish(job_id, ok=plan.ok, reason=plan.reason, output_ids=plan.output_ids)

    def _finish(self, job_id: str, *, ok: bool, reason: str = "",
                output_ids: tuple[str, ...] = ()) -> None:
        del self.live[job_id]
        for queue in self.queues.values():  # drop the last references to the device key
            queue.remove(lambda it: it.job_id == job_id)
        self._spawn(self._record_end(job_id, ok=ok, reason=reason, output_ids=output_ids))

    async def _record_end(self, job_id: str, *, ok: bool, reason: str,
                          output_ids: tuple[str, ...]) -> None:
        """Write the outcome, retrying while Redis is down, then have the inputs purged."""
        for attempt in range(1000):
            try:
                await asyncio.to_thread(self.jobs.finish_job, job_id, ok=ok, reason=reason,
                                        output_ids=output_ids)
                break
            except redis.RedisError:
                await asyncio.sleep(min(5.0, 0.1 * 2**attempt))
        await self._purge(job_id)

    def _expire_overdue(self) -> None:
        limit = time.time() - self.settings.service.job_timeout_s
        for job_id, live in list(self.live.items()):
            if live.accepted_s < limit:
                self._finish(job_id, ok=False, reason="the job timed out; please try again")

    async def _fail_stale_active(self) -> None:
        """Jobs registered but never handed to this scheduler (a cancelled request, a lost
        write) end failed once past the job timeout, and are purged."""
        now = time.time()
        if now - self._last_stale_check_s < STALE_CHECK_INTERVAL_S:
            return
        self._last_stale_check_s = now
        limit = now - self.settings.service.job_timeout_s
        for job_id in await asyncio.to_thread(self.jobs.active_job_ids):
            if job_id in self.live:
                continue
            try:
                job = await asyncio.to_thread(self.jobs.get_job, job_id)
            except NotFound:
                continue
            if job.created_s < limit:
                await asyncio.to_thread(self.jobs.finish_job, job_id, ok=False,
                                        reason="the job was interrupted; please try again")
                self._spawn(self._purge(job_id))

    async def _purge(self, job_id: str) -> None:
        """Ask a retention actor to purge; retry a few times (the sweep is the backstop)."""
        for attempt in range(5):
            try:
                await self.retention.purge_job.remote(job_id)
                return
            except Exception:
                await asyncio.sleep(0.2 * 2**attempt)
        log.warning("purge of job %s deferred to the retention sweep", job_id)

    async def _discard_outputs(self, account_id: str, output_ids: tuple[str, ...]) -> None:
        try:
            await self.retention.discard_outputs.remote(account_id, list(output_ids))
        except Exception:
            log.warning("could not discard %d late outputs", len(output_ids))
