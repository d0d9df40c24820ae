"""Retention actor pool: purge finished jobs' inputs and face data, sweep due deadlines,
reconcile the store against the ledger, and carry out account deletions.

All state lives in Redis; a restarted replica just carries on (Serve restarts a dead one).
Claims (SET NX with a lease) keep two replicas from processing one object, and an expired
claim is picked up again, so nothing is skipped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from ray import serve

from actors.common import open_backends
from pipeline.core.config import Settings
from pipeline.state.cluster_secret import check_process_secrets
from pipeline.state.tlog import SettledSize, TransparencyLog, migrate_chain
from pipeline.transparency.heads import signing_key

log = logging.getLogger("ray.serve")


@serve.deployment(max_ongoing_requests=100, ray_actor_options={"num_cpus": 0})
class RetentionDeployment:
    def __init__(self, settings: Settings) -> None:
        from pipeline.state.job_store import JobStore

        self.settings = settings
        client, self.stores = open_backends(settings)
        check_process_secrets(settings, client)  # before any pseudonym is computed
        self.jobs = JobStore(client)
        self.owner = f"retention-{os.getpid()}"
        self._background: asyncio.Task | None = None
        self._signer: asyncio.Task | None = None
        self.tlog_key = signing_key(settings.retention.transparency, settings.production_markers)
        self.tlog = TransparencyLog(client)
        migrate_chain(client)  # receipts chained before the log: carried in once

    def _ensure_background(self) -> None:
        if self._background is None or self._background.done():
            self._background = asyncio.get_running_loop().create_task(self._forever())
        if self._signer is None or self._signer.done():
            self._signer = asyncio.get_running_loop().create_task(self._sign_heads_forever())

    async def _sign_heads_forever(self) -> None:
        """Signed tree heads of the deletion log: checked every tenth of a second, signed
        when transparency.head_interval_s or head_max_entries calls for one (every replica
        runs this; heads only grow, so racing signers publish one head per size)."""
        cfg = self.settings.retention.transparency
        settled = SettledSize(cfg.head_settle_s)

        def sign() -> None:
            size = settled.observe(time.monotonic(), self.tlog.size())
            self.tlog.sign_head(self.tlog_key, cfg, size=size)

        while True:
            await self._guarded("signing a tree head", sign)
            await asyncio.sleep(min(0.1, cfg.head_interval_s))

    async def _forever(self) -> None:
        last_reconcile = 0.0
        while True:
            # Each pass on its own: one failing pass never starves the others.
            await self._guarded("sweep", self.sweep)
            await self._guarded("account deletions", self.resume_account_deletions)
            await self._guarded("job records", self.minimise_jobs)
            if time.time() - last_reconcile >= self.settings.retention.reconcile_interval_s:
                await self._guarded("reconcile", self.reconcile)
                last_reconcile = time.time()
            await asyncio.sleep(self.settings.retention.sweep_interval_s)

    async def _guarded(self, name: str, work) -> None:
        try:
            await asyncio.to_thread(work)
        except Exception:  # Redis or the store is down: try again next round
            log.exception("retention %s failed; retrying next round", name)

    async def check_health(self) -> None:
        self._ensure_background()  # Serve calls this periodically: work starts with the replica

    def sweep(self) -> int:
        from pipeline.retention.purge import note_purges, sweep_due

        receipts = sweep_due(self.stores, self.jobs.ledger, owner=self.owner,
                             cfg=self.settings.retention)
        note_purges(self.jobs, receipts)
        return len(receipts)

    def minimise_jobs(self) -> int:
        cfg = self.settings.retention
        minimised, deleted = self.jobs.minimise_and_expire(
            now_s=time.time(), grace_s=cfg.job_record_grace_s, ttl_s=cfg.job_record_ttl_h * 3600)
        return minimised + deleted

    def reconcile(self) -> int:
        from pipeline.retention.purge import note_purges, reconcile

        receipts = reconcile(self.stores, self.jobs.ledger, owner=self.owner,
                             cfg=self.settings.retention)
        note_purges(self.jobs, receipts)
        return len(receipts)

    def resume_account_deletions(self) -> int:
        from pipeline.retention.deletion import delete_account, pending_account_deletions

        done = 0
        for receipt_id, account_id in pending_account_deletions(self.jobs.redis).items():
            try:
                done += delete_account(account_id, receipt_id, self.stores, self.jobs,
                                       owner=self.owner, cfg=self.settings.retention)
            except Exception:  # this account waits for the next round; others go on
                log.exception("deleting an account failed; retrying next round")
        return done

    async def purge_job(self, job_id: str) -> int:
        """Purge and verify a finished job's inputs and face data; returns objects verified."""
        from pipeline.retention.purge import purge_finished_job

        self._ensure_background()
        return await asyncio.to_thread(purge_finished_job, job_id, self.stores, self.jobs,
                                       owner=self.owner, cfg=self.settings.retention)

    async def discard_outputs(self, account_id: str, output_ids: list[str]) -> int:
        """Delete outputs written by an abandoned attempt of a job (never shown to anyone)."""
        from pipeline.retention.deletion import discard_outputs

        return await asyncio.to_thread(discard_outputs, account_id, output_ids, self.stores,
                                       self.jobs)

    async def delete_account(self, account_id: str, receipt_id: str) -> int:
        from pipeline.retention.deletion import delete_account

        self._ensure_background()
        return await asyncio.to_thread(delete_account, account_id, receipt_id, self.stores,
                                       self.jobs, owner=self.owner, cfg=self.settings.retention)
