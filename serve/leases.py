"""Worker leases: a job runner or an ingress replica renews its lease in Redis while it
lives; when the lease lapses, the jobs it held in memory (with their device keys) are
orphans that a runner's reaper fails and has purged (docs/ARCHITECTURE.md, invariant 2)."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from pipeline.core.records import Worker
from pipeline.state.job_store import JobStore

log = logging.getLogger("ray.serve")


async def keep_lease(jobs: JobStore, worker: Worker, worker_id: str, lease_s: float,
                     on_beat: Callable[[bool], None] = lambda ok: None) -> None:
    """Renew the lease every fifth of it, forever; ``on_beat`` hears whether each renewal
    reached Redis. Its own task and its own thread: a long request, a reap or a queue of
    photo decodes in the default executor never delays a renewal (a late one would make
    a live worker's jobs look orphaned)."""
    loop = asyncio.get_running_loop()
    own = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{worker.value}-lease")
    try:
        while True:
            try:
                await loop.run_in_executor(own, functools.partial(
                    jobs.heartbeat, worker, worker_id, lease_s=lease_s, now_s=time.time()))
                on_beat(True)
            except Exception:  # Redis away: every lease may lapse; the reaper waits it out
                on_beat(False)
                log.warning("%s heartbeat failed; retrying", worker.value)
            await asyncio.sleep(lease_s / 5)
    finally:  # cancelled: never wait here for a renewal stuck on an unreachable Redis
        own.shutdown(wait=False, cancel_futures=True)
