"""Media pool: every upload is decoded, stripped, re-encoded, encrypted and stored here,
never in the ingress; the decoding itself runs in sandboxed child processes under hard OS
limits (pipeline/media/sandbox.py), one per CPU of the replica. A hostile file can at worst
fail its own request or kill a child; the replica starts a fresh one."""

from __future__ import annotations

import asyncio
import math

from ray import serve

from actors.common import open_backends
from pipeline.core.config import Settings
from pipeline.jobs.intake import IngestOutcome, Upload, ingest_upload, withdraw_job
from pipeline.media.sandbox import DecodeBudget, SandboxPool
from pipeline.state.cluster_secret import check_process_secrets
from pipeline.state.job_store import JobStore


@serve.deployment
class MediaDeployment:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        client, self.stores = open_backends(settings)
        check_process_secrets(settings, client)  # before any pseudonym is computed
        self.jobs = JobStore(client)
        limits = settings.service
        self.sandbox = SandboxPool(
            limits, DecodeBudget(memory_bytes=limits.decode_memory_bytes,
                                 cpu_s=limits.decode_cpu_s, wall_s=limits.decode_wall_s),
            size=max(1, math.ceil(settings.deployments.media.num_cpus)))
        self.sandbox.start()

    async def ingest(self, upload: Upload) -> IngestOutcome:
        """Check, decode, strip, re-encode, register and store one request's files.

        If the ingress gives up on the call (cancelled), the work in its thread still runs
        to its end; a job it registered meanwhile is withdrawn here, so nothing is kept
        for an answer nobody will read."""
        work = asyncio.ensure_future(asyncio.to_thread(
            ingest_upload, upload, self.sandbox.decode, self.stores, self.jobs, self.settings))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            outcome = await work
            if outcome.item is not None:
                await asyncio.to_thread(withdraw_job, upload.job_id, self.stores, self.jobs)
            raise

    def restarts(self) -> int:
        """Sandbox children replaced after dying or overrunning a budget (tests, metrics)."""
        return self.sandbox.restarts

    def __del__(self) -> None:
        if hasattr(self, "sandbox"):  # absent when __init__ refused to start
            self.sandbox.close()
