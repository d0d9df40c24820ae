"""leases: a worker's renewals keep their schedule while the default executor is busy
(the ingress decodes photos there), so a live worker never looks gone. No Ray, no Redis:
the job store is a recorder."""

from __future__ import annotations

import asyncio
import threading
import time

from pipeline.core.records import Worker
from serve.leases import keep_lease


class RecordingJobs:
    def __init__(self) -> None:
        self.beats: list[tuple[Worker, str, float]] = []
        self.fail = False

    def heartbeat(self, worker: Worker, worker_id: str, *, lease_s: float, now_s: float) -> None:
        if self.fail:
            raise ConnectionError("Redis away")
        self.beats.append((worker, worker_id, time.monotonic()))


async def _run(jobs: RecordingJobs, seconds: float, heard: list[bool]) -> None:
    task = asyncio.create_task(keep_lease(jobs, Worker.INGRESS, "ingress-1", 0.5, heard.append))
    await asyncio.sleep(seconds)
    task.cancel()


def test_renewals_keep_their_schedule_while_every_executor_thread_is_busy():
    jobs, heard, release = RecordingJobs(), [], threading.Event()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        busy = [loop.run_in_executor(None, release.wait, 5) for _ in range(64)]  # saturated
        started = time.monotonic()
        await _run(jobs, 1.0, heard)
        release.set()
        await asyncio.gather(*busy)
        gaps = [b[2] - a[2] for a, b in zip(jobs.beats, jobs.beats[1:], strict=False)]
        assert jobs.beats and jobs.beats[0][2] - started < 0.1
        assert len(jobs.beats) >= 4 and max(gaps) < 0.25  # every lease_s / 5 = 0.1 s
        assert {(w, i) for w, i, _ in jobs.beats} == {(Worker.INGRESS, "ingress-1")}

    asyncio.run(main())
    assert heard and all(heard)


def test_a_failed_renewal_is_reported_and_retried():
    jobs, heard = RecordingJobs(), []
    jobs.fail = True

    asyncio.run(_run(jobs, 0.35, heard))

    assert len(heard) >= 3 and not any(heard) and jobs.beats == []
