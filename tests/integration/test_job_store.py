"""The job store's guarantees on a real Redis: the per-account limit, ended jobs that stay
ended, and the reaper's atomic check (a live runner keeps its job)."""

from __future__ import annotations

import time
import uuid

import pytest
import redis

from pipeline import keys
from pipeline.errors import TooManyJobs
from pipeline.jobs import JobStore
from pipeline.records import JobRecord, JobStatus, ObjectClass, RetentionRecord, Stage
from pipeline.redis_server import RedisServer


@pytest.fixture()
def jobs(tmp_path) -> JobStore:
    server = RedisServer(tmp_path / "redis").start()
    yield JobStore(redis.Redis.from_url(server.url))
    server.stop()


def new_job(jobs: JobStore, account: str = "acct-j", *, limit: int | None = None) -> JobRecord:
    job_id, now = uuid.uuid4().hex, time.time()
    uri = f"file:///store/inputs/{job_id}/a.bin"
    job = JobRecord(job_id=job_id, account_id=account, kind="art_style", style="comic",
                    resolution_px=64, status=JobStatus.QUEUED, created_s=now, updated_s=now,
                    input_uris=[uri])
    jobs.create_job(job, [RetentionRecord(uri, ObjectClass.INPUT, account, job_id, now,
                                          now + 3600)], max_in_flight=limit)
    return job


def test_an_account_at_its_limit_is_refused_until_a_job_ends(jobs):
    first, second = new_job(jobs, limit=2), new_job(jobs, limit=2)
    with pytest.raises(TooManyJobs, match="2 unfinished"):
        new_job(jobs, limit=2)
    assert jobs.redis.zcard(keys.account_jobs("acct-j")) == 2  # the refused one left nothing
    jobs.finish_job(first.job_id, ok=True)
    new_job(jobs, limit=2)
    assert jobs.redis.scard(keys.account_active("acct-j")) == 2
    assert second.job_id in {m.decode() for m in jobs.redis.smembers(keys.account_active("acct-j"))}


def test_an_ended_job_never_reads_running_again(jobs):
    job = new_job(jobs)
    jobs.finish_job(job.job_id, ok=False, reason="reaped")
    jobs.note_batch([job.job_id], Stage.DIFFUSION, cost_units=1, max_cost_units=8)  # a late batch
    assert not jobs.claim_job(job.job_id, "runner-late")
    view = jobs.get_job(job.job_id)
    assert (view.status, view.reason, view.runner_id) == (JobStatus.FAILED, "reaped", "")


def test_the_reaper_fails_a_job_only_while_its_runner_is_gone(jobs):
    now = time.time()
    job = new_job(jobs)
    jobs.heartbeat_runner("runner-a", lease_s=10, now_s=now)
    assert jobs.claim_job(job.job_id, "runner-a")
    seen = jobs.get_job(job.job_id)
    assert not jobs.fail_orphan(seen, "gone", now_s=now)  # lease still valid
    # The runner renews its lease after the reaper's snapshot: the job stays.
    jobs.heartbeat_runner("runner-a", lease_s=10, now_s=now + 20)
    assert not jobs.fail_orphan(seen, "gone", now_s=now + 25)
    assert jobs.get_job(job.job_id).status is JobStatus.QUEUED
    # Lapsed for real: failed, out of the active sets, inputs made due.
    assert jobs.fail_orphan(seen, "gone", now_s=now + 40)
    view = jobs.get_job(job.job_id)
    assert (view.status, view.reason) == (JobStatus.FAILED, "gone")
    assert jobs.active_job_ids() == [] and jobs.redis.scard(keys.account_active("acct-j")) == 0


def test_a_job_claimed_after_the_reapers_snapshot_is_left_alone(jobs):
    job = new_job(jobs)
    unclaimed = jobs.get_job(job.job_id)
    jobs.heartbeat_runner("runner-b", lease_s=10, now_s=time.time())
    assert jobs.claim_job(job.job_id, "runner-b")
    assert not jobs.fail_orphan(unclaimed, "never started", now_s=time.time() + 3600)
    assert jobs.get_job(job.job_id).runner_id == "runner-b"


@pytest.mark.privacy
def test_a_purged_job_loses_its_personal_fields_after_the_grace_then_goes(jobs):
    job = new_job(jobs, "acct-minimise")
    jobs.finish_job(job.job_id, ok=False, reason="file 1: no human face was found")
    jobs.record_purge(job.job_id, num_inputs_verified=1, complete=True)
    purged_s = jobs.get_job(job.job_id).inputs_purged_s

    assert jobs.minimise_and_expire(now_s=purged_s + 10, grace_s=60, ttl_s=3600) == (0, 0)
    assert jobs.get_job(job.job_id).account_id == "acct-minimise"  # the app can still read it

    assert jobs.minimise_and_expire(now_s=purged_s + 61, grace_s=60, ttl_s=3600) == (1, 0)
    kept = jobs.get_job(job.job_id)
    assert (kept.account_id, kept.input_uris, kept.reason, kept.runner_id) == ("", [], "", "")
    assert kept.status == JobStatus.FAILED and kept.minimised_s == purged_s + 61
    raw = b"".join(jobs.redis.hgetall(keys.job(job.job_id)).values())
    assert b"acct-minimise" not in raw and b"inputs/" not in raw
    assert jobs.account_job_ids("acct-minimise") == []

    assert jobs.minimise_and_expire(now_s=purged_s + 3601, grace_s=60, ttl_s=3600) == (0, 1)
    assert not jobs.redis.exists(keys.job(job.job_id))
    assert jobs.redis.zscore(keys.PURGED_JOBS, job.job_id) is None
