"""Job runners: a pool of replicas, each driving the jobs handed to it to their end.

One ``run_job`` request per job, open until the job ends, so Serve itself balances jobs
over runners (power of two choices), bounds what one runner holds (max_ongoing_requests),
queues or refuses the rest at the caller (max_queued_requests: back-pressure), and
autoscales the pool on ongoing requests. No runner holds all in-flight work: losing one
loses only the jobs it held, whose device keys died with it; the other runners notice its
lease lapse, fail those jobs with a reason and have their inputs purged.

The decisions (claim, next stage, retry, deadline, end, purge, orphans) are
pipeline/jobs/driver.py's ``JobDriver``, unit-tested with fakes. This class is its shell: it
turns Serve handles into the driver's ports and runs the heartbeat, reaper and usage loops.
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
from pipeline.core.records import Stage, StageResult, Worker, WorkItem
from pipeline.jobs.driver import DriverKnobs, JobDriver, PoolFull
from pipeline.privacy.usage import UsageBuffer, write_events
from pipeline.state.cluster_secret import check_process_secrets
from pipeline.state.job_store import JobStore
from pipeline.storage.base import open_stores
from serve.leases import keep_lease
from serve.telemetry import observe_stage

log = logging.getLogger("ray.serve")


def bucket_id(item: WorkItem) -> str:
    """The batch key as Serve's multiplexed model id: Serve splits batches by it."""
    kind, style, resolution_px = item.batch_key
    return f"{kind}/{style}/{resolution_px}"


class ServeStages:
    """The driver's StagePort over the GPU pools' Serve handles."""

    def __init__(self, handles: dict[Stage, object], retention) -> None:
        self.handles = handles
        self.retention = retention
        self._late: set[asyncio.Task] = set()  # abandoned calls whose outputs are discarded

    async def call(self, stage: Stage, item: WorkItem, timeout_s: float) -> StageResult:
        handle = self.handles[stage].options(multiplexed_model_id=bucket_id(item))  # type: ignore[attr-defined]
        sent_s = time.time()
        response = handle.run.remote(replace(item, sent_s=sent_s))
        waiter = asyncio.ensure_future(_result(response))
        try:
            result = await asyncio.wait_for(asyncio.shield(waiter), timeout_s)
        except TimeoutError:
            # Withdraw it if it still waits for a replica; if it runs, whatever it writes
            # belongs to an abandoned attempt and is discarded when it arrives.
            response.cancel()
            task = asyncio.get_running_loop().create_task(
                self._discard_late(waiter, item, timeout_s))
            self._late.add(task)
            task.add_done_callback(self._late.discard)
            observe_stage(stage, sent_s, "timeout")
            raise
        except BackPressureError:
            raise PoolFull(stage.value) from None
        except Exception:
            observe_stage(stage, sent_s, "crash")
            raise
        observe_stage(stage, sent_s, "ok" if result.ok else "failed")
        return result

    async def _discard_late(self, waiter: asyncio.Future, item: WorkItem, waited_s: float) -> None:
        try:
            result = await asyncio.wait_for(waiter, max(waited_s, 1.0) * 4)
            if result.output_ids:
                await self.retention.discard_outputs.remote(item.account_id,
                                                            list(result.output_ids))
        except Exception:  # cancelled, failed, or too late: outputs expire with the job
            return


class ServePurge:
    """The driver's PurgePort over the retention pool's handle."""

    def __init__(self, retention) -> None:
        self.retention = retention

    async def purge_job(self, job_id: str) -> None:
        await self.retention.purge_job.remote(job_id)


@serve.deployment
class JobRunnerDeployment:
    def __init__(self, settings: Settings, face, diffusion, retention) -> None:
        self.settings = settings
        self.jobs = JobStore(redis.Redis.from_url(settings.service.redis_url, socket_timeout=5,
                                                  socket_connect_timeout=2))
        check_process_secrets(settings, self.jobs.redis)  # before any pseudonym is computed
        # The pid in the id lets an operator (and the fault tests) find the process.
        runner_id = f"runner-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.usage = UsageBuffer()  # written as Parquet every usage_flush_s
        self.usage_store = open_stores(settings.storage).outputs
        self.driver = JobDriver(
            self.jobs, ServeStages({Stage.FACE: face, Stage.DIFFUSION: diffusion}, retention),
            ServePurge(retention), runner_id=runner_id,
            knobs=DriverKnobs(max_attempts=settings.batching.max_attempts,
                              stage_timeout_s=settings.batching.stage_timeout_s,
                              lease_s=settings.service.heartbeat_lease_s,
                              job_timeout_s=settings.service.job_timeout_s),
            on_finished=lambda item, ok, started_s: self.usage.note(item, ok, started_s,
                                                                    time.time()))
        self._background: list[asyncio.Task] = []
        self.jobs.heartbeat(Worker.RUNNER, runner_id, lease_s=self.driver.knobs.lease_s,
                            now_s=time.time())

    @property
    def runner_id(self) -> str:
        return self.driver.runner_id

    @property
    def held(self) -> dict[str, WorkItem]:
        """The jobs this runner drives: the only copies of their device keys."""
        return self.driver.held

    def reconfigure(self, user_config: dict) -> None:
        """batching.yaml max_attempts and stage_timeout_s, live (Serve user_config)."""
        self.driver.knobs.max_attempts = int(user_config["max_attempts"])
        self.driver.knobs.stage_timeout_s = float(user_config["stage_timeout_s"])

    async def check_health(self) -> None:
        self._ensure_background()

    async def run_job(self, item: WorkItem) -> bool:
        """Drive one job to its end (JobDriver.run_job); the caller need not wait."""
        self._ensure_background()
        return await self.driver.run_job(item)

    def _ensure_background(self) -> None:
        if not self._background or any(t.done() for t in self._background):
            for task in self._background:
                task.cancel()
            loop = asyncio.get_running_loop()
            lease_s = self.driver.knobs.lease_s
            self._background = [loop.create_task(keep_lease(self.jobs, Worker.RUNNER,
                                                            self.runner_id, lease_s,
                                                            self.driver.beat)),
                                loop.create_task(self._reaper()),
                                loop.create_task(self._flush_usage())]

    async def _reaper(self) -> None:
        """One runner at a time reaps (JobDriver.reap_if_leader), twice a lease."""
        while True:
            await asyncio.sleep(self.driver.knobs.lease_s / 2)
            try:
                await self.driver.reap_if_leader()
            except Exception:
                log.warning("reaping failed; retrying")

    async def _flush_usage(self) -> None:
        while True:
            await asyncio.sleep(self.settings.service.usage_flush_s)
            events = self.usage.take()
            if not events:
                continue
            try:
                await asyncio.to_thread(write_events, self.usage_store, events,
                                        writer_id=self.runner_id)
            except Exception:  # the store is away: keep them for the next round
                self.usage.put_back(events)
                log.warning("usage events not written; retrying")


async def _result(response) -> StageResult:
    return await response
