"""Job runners: a pool of replicas, each driving the jobs handed to it to their end.

One ``run_job`` request per job, open until the job ends, so Serve itself balances jobs
over runners (power of two choices), bounds what one runner holds (max_ongoing_requests),
queues or refuses the rest at the caller (max_queued_requests: back-pressure), and
autoscales the pool on ongoing requests. No runner holds all in-flight work: losing one
loses only the jobs it held, whose device keys died with it; the other runners notice its
lease lapse, fail those jobs with a reason and have their inputs purged.

The decisions (next stage, retry, deadline, orphan) are pure: pipeline/jobs/orchestration.py.
This class only moves messages between the stages, Redis and the retention pool.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from dataclasses import replace

import redis
from ray import serve
from ray.serve.exceptions import BackPressureError

from pipeline.core.config import Settings
from pipeline.core.records import Orphan, Stage, StageResult, Worker, WorkItem
from pipeline.core.retry import backoff_s
from pipeline.jobs.orchestration import (
    TIMEOUT_REASON,
    Next,
    after_crash,
    after_result,
    check_deadline,
    find_orphan,
    is_far_overdue,
    stage_timeout_s,
    start,
)
from pipeline.privacy.usage import UsageEvent, day_of, write_events
from pipeline.security.pseudonyms import account_ref
from pipeline.state.job_store import JobStore
from pipeline.storage.base import open_stores
from serve.leases import keep_lease
from serve.telemetry import observe_stage

log = logging.getLogger("ray.serve")

INTERRUPTED_REASON = "the job was interrupted; please try again"
MAX_REDIS_TRIES = 12  # about a minute of backoff; after that the reaper settles the job
MAX_BUFFERED_USAGE = 10_000  # usage events held while the store is away


def bucket_id(item: WorkItem) -> str:
    """The batch key as Serve's multiplexed model id: Serve splits batches by it."""
    kind, style, resolution_px = item.batch_key
    return f"{kind}/{style}/{resolution_px}"


@serve.deployment
class JobRunnerDeployment:
    def __init__(self, settings: Settings, face, diffusion, retention) -> None:
        self.settings = settings
        self.jobs = JobStore(redis.Redis.from_url(settings.service.redis_url, socket_timeout=5,
                                                  socket_connect_timeout=2))
        self.stages = {Stage.FACE: face, Stage.DIFFUSION: diffusion}
        self.retention = retention
        # The pid in the id lets an operator (and the fault tests) find the process.
        self.runner_id = f"runner-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.max_attempts = settings.batching.max_attempts
        self.stage_timeout_s = settings.batching.stage_timeout_s
        self.lease_s = settings.service.heartbeat_lease_s
        self.held: dict[str, WorkItem] = {}  # the only copies of these jobs' device keys
        self.usage: list[UsageEvent] = []  # written as Parquet every usage_flush_s
        self.usage_store = open_stores(settings.storage).outputs
        self._tasks: set[asyncio.Task] = set()
        self._background: list[asyncio.Task] = []
        self.jobs.heartbeat(Worker.RUNNER, self.runner_id, lease_s=self.lease_s, now_s=time.time())
        self._beating_since: float | None = time.time()  # None while heartbeats fail

    def reconfigure(self, user_config: dict) -> None:
        """batching.yaml max_attempts and stage_timeout_s, live (Serve user_config)."""
        self.max_attempts = int(user_config["max_attempts"])
        self.stage_timeout_s = float(user_config["stage_timeout_s"])

    async def check_health(self) -> None:
        self._ensure_background()

    async def run_job(self, item: WorkItem) -> bool:
        """Drive one job through its stages, record its end and have its inputs purged.
        Returns whether it succeeded; the caller need not wait for it."""
        self._ensure_background()
        self.held[item.job_id] = item
        started_s = time.time()
        try:
            if not await self._redis(self.jobs.claim_job, item.job_id, self.runner_id):
                return False  # withdrawn, reaped or deleted before it got here
            plan = start(item, time.time())
            while plan.stage is not None:
                done = plan.item.frames_done
                plan = await self._run_stage(plan.stage, plan.item)
                if plan.item.frames_done != done:  # a clip's chunk: report progress
                    await self._redis(self.jobs.update_job, item.job_id,
                                      frames_done=plan.item.frames_done)
            await self._redis(self.jobs.finish_job, item.job_id, ok=plan.ok, reason=plan.reason,
                              output_ids=plan.output_ids)
            self._note_usage(plan.item, plan.ok, started_s)
        except BaseException:  # Redis gone for long, or the request was cancelled
            self._spawn(self._settle(item.job_id, INTERRUPTED_REASON))
            raise
        finally:
            del self.held[item.job_id]  # the device key goes with it
        self._spawn(self._purge(item.job_id))
        return plan.ok

    def _note_usage(self, item: WorkItem, ok: bool, started_s: float) -> None:
        """One usage event per finished job: counts, timings, outcome, country, and the
        account's pseudonym; nothing of the media, the key or the reason."""
        if len(self.usage) >= MAX_BUFFERED_USAGE:
            return  # the store has been away for long: usage data is best-effort
        now = time.time()
        accepted = item.accepted_s or started_s
        self.usage.append(UsageEvent(
            day=day_of(now), account_ref=account_ref(item.account_id), kind=item.kind,
            style=item.style, resolution_px=item.resolution_px,
            num_inputs=len(item.input_uris), num_frames=item.num_frames,
            outcome="succeeded" if ok else "failed", country=item.country,
            queue_s=max(0.0, started_s - accepted), total_s=max(0.0, now - accepted)))

    async def _flush_usage(self) -> None:
        while True:
            await asyncio.sleep(self.settings.service.usage_flush_s)
            events, self.usage = self.usage, []
            if not events:
                continue
            try:
                await asyncio.to_thread(write_events, self.usage_store, events,
                                        writer_id=self.runner_id)
            except Exception:  # the store is away: keep them for the next round
                self.usage = events + self.usage
                log.warning("usage events not written; retrying")

    async def _settle(self, job_id: str, reason: str) -> None:
        """End a job this runner cannot finish (first outcome wins), then purge it."""
        try:
            await self._redis(self.jobs.finish_job, job_id, ok=False, reason=reason)
        except redis.RedisError:
            log.warning("a job could not be settled; the reaper will")
        await self._purge(job_id)

    async def _run_stage(self, stage: Stage, item: WorkItem) -> Next:
        waits = 0
        while True:  # bounded: check_deadline ends the job once its deadline passes
            try:
                result = await self._call(stage, item)
            except BackPressureError:  # the pool is full: wait, without spending an attempt
                await asyncio.sleep(backoff_s(waits, base_s=0.1, cap_s=2.0))
                waits += 1
                plan = check_deadline(Next(item, stage=stage), time.time())
                if plan.stage is None:
                    return plan
                continue
            except Exception as exc:  # worker died, timed out or raised: retried
                what = (f"the {stage} stage did not answer within {self.stage_timeout_s:g} s"
                        if isinstance(exc, TimeoutError)
                        else f"the {stage} worker failed ({type(exc).__name__})")
                plan = after_crash(stage, item, what, max_attempts=self.max_attempts,
                                   now_s=time.time())
            else:
                plan = after_result(stage, item, result, max_attempts=self.max_attempts,
                                    now_s=time.time())
            if plan.stage is not None and plan.item.attempts != item.attempts:
                await self._redis(self.jobs.update_job, item.job_id, attempts=plan.item.attempts)
            return plan

    async def _call(self, stage: Stage, item: WorkItem) -> StageResult:
        handle = self.stages[stage].options(multiplexed_model_id=bucket_id(item))
        sent_s = time.time()
        response = handle.run.remote(replace(item, sent_s=sent_s))
        waiter = asyncio.ensure_future(_result(response))
        timeout_s = stage_timeout_s(item, sent_s, per_call_s=self.stage_timeout_s)
        try:
            result = await asyncio.wait_for(asyncio.shield(waiter), timeout_s)
        except TimeoutError:
            # Withdraw it if it still waits for a replica; if it runs, whatever it writes
            # belongs to an abandoned attempt and is discarded when it arrives.
            response.cancel()
            self._spawn(self._discard_late(waiter, item))
            observe_stage(stage, sent_s, "timeout")
            raise
        except BackPressureError:
            raise
        except Exception:
            observe_stage(stage, sent_s, "crash")
            raise
        observe_stage(stage, sent_s, "ok" if result.ok else "failed")
        return result

    async def _discard_late(self, waiter: asyncio.Future, item: WorkItem) -> None:
        try:
            result = await asyncio.wait_for(waiter, self.stage_timeout_s * 4)
            if result.output_ids:
                await self.retention.discard_outputs.remote(item.account_id,
                                                            list(result.output_ids))
        except Exception:  # cancelled, failed, or too late: outputs expire with the job
            return

    async def _redis(self, call, *args, **kwargs):
        """A Redis write, retried with backoff while Redis is briefly away."""
        for attempt in range(MAX_REDIS_TRIES):
            try:
                return await asyncio.to_thread(call, *args, **kwargs)
            except redis.RedisError:
                if attempt == MAX_REDIS_TRIES - 1:
                    raise
                await asyncio.sleep(backoff_s(attempt, base_s=0.1, cap_s=8.0))

    async def _purge(self, job_id: str) -> None:
        """Ask a retention actor to purge; retry a few times (the sweep is the backstop)."""
        for attempt in range(5):
            try:
                await self.retention.purge_job.remote(job_id)
                return
            except Exception:
                await asyncio.sleep(backoff_s(attempt, base_s=0.2))
        log.warning("purge of a job deferred to the retention sweep")

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _ensure_background(self) -> None:
        if not self._background or any(t.done() for t in self._background):
            for task in self._background:
                task.cancel()
            loop = asyncio.get_running_loop()
            self._background = [loop.create_task(keep_lease(self.jobs, Worker.RUNNER,
                                                            self.runner_id, self.lease_s,
                                                            self._beat)),
                                loop.create_task(self._reaper()),
                                loop.create_task(self._flush_usage())]

    def _beat(self, ok: bool) -> None:
        if not ok:
            self._beating_since = None
        elif self._beating_since is None:
            self._beating_since = time.time()

    async def _reaper(self) -> None:
        """One runner at a time fails and purges the jobs no live runner holds. Only a
        runner that has heartbeated without a break for a whole lease reaps, so after a
        Redis outage every live runner has renewed its lease before anyone is judged."""
        while True:
            await asyncio.sleep(self.lease_s / 2)
            now = time.time()
            if self._beating_since is None or now - self._beating_since < self.lease_s:
                continue
            try:
                if await asyncio.to_thread(self.jobs.try_lock, "reaper", self.runner_id,
                                           self.lease_s / 2):
                    await self._reap(now)
            except Exception:
                log.warning("reaping failed; retrying")

    async def _reap(self, now_s: float) -> None:
        """Fail and purge the jobs whose runner or ingress is gone, that no runner ever
        took, or that are far past their timeout. Each failure re-checks its grounds
        atomically."""
        live = await asyncio.to_thread(self.jobs.live, Worker.RUNNER, now_s)
        live.add(self.runner_id)
        ingresses = await asyncio.to_thread(self.jobs.live, Worker.INGRESS, now_s)
        timeout_s = self.settings.service.job_timeout_s
        for job in await asyncio.to_thread(self.jobs.unfinished_jobs):
            orphan = find_orphan(job, live_runners=live, live_ingresses=ingresses, now_s=now_s,
                                 unclaimed_grace_s=timeout_s)
            if job.runner_id == self.runner_id and job.job_id not in self.held:
                orphan = Orphan(INTERRUPTED_REASON, None)  # ours, but no longer driven
            elif orphan is None and is_far_overdue(job, now_s=now_s, job_timeout_s=timeout_s):
                orphan = Orphan(TIMEOUT_REASON, None)
            if orphan is not None and await asyncio.to_thread(
                    self.jobs.fail_orphan, job, orphan, now_s=now_s):
                self._spawn(self._purge(job.job_id))


async def _result(response) -> StageResult:
    return await response
