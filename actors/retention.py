"""Retention actor pool: purge a finished job's inputs and face data, sweep due deadlines.

All state lives in Redis; a restarted replica just carries on. Claims (SET NX with a lease)
keep two replicas from processing one object, and an expired claim is picked up again.
"""

from __future__ import annotations

import asyncio
import os

from ray import serve

from actors.common import open_backends
from pipeline.config import Settings


@serve.deployment(max_ongoing_requests=100, ray_actor_options={"num_cpus": 0})
class RetentionDeployment:
    def __init__(self, settings: Settings) -> None:
        from pipeline.jobs import JobStore

        self.settings = settings
        client, self.store = open_backends(settings)
        self.jobs = JobStore(client)
        self.owner = f"retention-{os.getpid()}"
        self._sweeper: asyncio.Task | None = None

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.to_thread(self.sweep)
            await asyncio.sleep(self.settings.retention.sweep_interval_s)

    async def check_health(self) -> None:
        self._ensure_sweeper()  # Serve calls this periodically: the sweep starts with the replica

    def sweep(self) -> int:
        from pipeline.retention import sweep_due

        return len(sweep_due(self.store, self.jobs.ledger, owner=self.owner,
                             cfg=self.settings.retention))

    async def purge_job(self, job_id: str) -> int:
        """Purge and verify a finished job's inputs and face data; returns objects verified."""
        self._ensure_sweeper()
        return await asyncio.to_thread(self._purge_job, job_id)

    def _purge_job(self, job_id: str) -> int:
        from pipeline.retention import purge_finished_job

        return purge_finished_job(job_id, self.store, self.jobs, owner=self.owner,
                                  cfg=self.settings.retention)
