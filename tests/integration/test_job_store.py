"""The job store's guarantees on a real Redis: the per-account limit, ended jobs that stay
ended, and the reaper's atomic check (a live runner keeps its job)."""

from __future__ import annotations

import time
import uuid

import pytest
import redis

from pipeline.core.errors import TooManyJobs
from pipeline.core.records import (
    JobRecord,
    JobStatus,
    ObjectClass,
    Orphan,
    RetentionRecord,
    Stage,
    Worker,
)
from pipeline.state import keys
from pipeline.state.job_store import JobStore
from pipeline.state.redis_server import RedisServer


@pytest.fixture()
def jobs(tmp_path) -> JobStore:
    server = RedisServer(tmp_path / "redis").start()
    yield JobStore(redis.Redis.from_url(server.url))
    server.stop()


def new_job(jobs: JobStore, account: str = "acct-j", *, limit: int | None = None,
            ingress_id: str = "") -> JobRecord:
    job_id, now = uuid.uuid4().hex, time.time()
    uri = f"file:///store/inputs/{job_id}/a.bin"
    job = JobRecord(job_id=job_id, account_id=account, kind="art_style", style="comic",
                    resolution_px=64, status=JobStatus.QUEUED, created_s=now, updated_s=now,
                    input_uris=[uri], ingress_id=ingress_id)
    jobs.create_job(job, [RetentionRecord(uri, ObjectClass.INPUT, account, job_id, now,
                                          now + 3600)], max_in_flight=limit)
    return job


def test_an_account_at_its_limit_is_refused_until_a_job_ends(jobs):
    first, second = new_job(jobs, limit=2), new_job(jobs, limit=2)
    with pytest.raises(TooManyJobs, match="2 unfinished"):
        new_job(jobs, limit=2)
    assert jobs.redis.zcard(keys.account_jobs("acct-j")) == 2  # the refused one left nothing
    assert jobs.claim_job(first.job_id, "runner-a")
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
    gone = Orphan("gone", Worker.RUNNER)
    jobs.heartbeat(Worker.RUNNER, "runner-a", lease_s=10, now_s=now)
    assert jobs.claim_job(job.job_id, "runner-a")
    seen = jobs.get_job(job.job_id)
    assert not jobs.fail_orphan(seen, gone, now_s=now)  # lease still valid
    # The runner renews its lease after the reaper's snapshot: the job stays.
    jobs.heartbeat(Worker.RUNNER, "runner-a", lease_s=10, now_s=now + 20)
    assert not jobs.fail_orphan(seen, gone, now_s=now + 25)
    assert jobs.get_job(job.job_id).status is JobStatus.RUNNING
    # Lapsed for real: failed, out of the active sets, inputs made due.
    assert jobs.fail_orphan(seen, gone, now_s=now + 40)
    view = jobs.get_job(job.job_id)
    assert (view.status, view.reason) == (JobStatus.FAILED, "gone")
    assert jobs.active_job_ids() == [] and jobs.redis.scard(keys.account_active("acct-j")) == 0


def test_a_job_claimed_after_the_reapers_snapshot_is_left_alone(jobs):
    job = new_job(jobs)
    unclaimed = jobs.get_job(job.job_id)
    jobs.heartbeat(Worker.RUNNER, "runner-b", lease_s=10, now_s=time.time())
    assert jobs.claim_job(job.job_id, "runner-b")
    assert not jobs.fail_orphan(unclaimed, Orphan("never started", None),
                                now_s=time.time() + 3600)
    assert jobs.get_job(job.job_id).runner_id == "runner-b"


def test_an_unclaimed_job_fails_on_its_ingress_lease_only_while_it_is_lapsed(jobs):
    now = time.time()
    jobs.heartbeat(Worker.INGRESS, "ingress-a", lease_s=10, now_s=now)
    job = new_job(jobs, ingress_id="ingress-a")
    seen = jobs.get_job(job.job_id)
    assert seen.ingress_id == "ingress-a"
    gone = Orphan("never handed over", Worker.INGRESS)
    assert not jobs.fail_orphan(seen, gone, now_s=now + 5)  # the ingress still lives
    assert jobs.fail_orphan(seen, gone, now_s=now + 11)
    assert jobs.get_job(job.job_id).reason == "never handed over"
    # The due list now holds its input: the sweep purges it at once.
    assert jobs.ledger.due_uris(now + 11) == job.input_uris


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


def test_an_idempotency_claim_of_a_dead_ingress_is_taken_over_after_its_lease(jobs):
    """A request cut by its ingress's death (kill -9 mid-write) released nothing: its
    retry is told to wait until that ingress's lease lapses, then goes ahead."""
    from pipeline.core.errors import InvalidUpload
    from pipeline.state.idempotency import Idempotency

    idem, now = Idempotency(jobs.redis, window_s=3600), time.time()
    jobs.heartbeat(Worker.INGRESS, "ingress-a", lease_s=10, now_s=now)
    first = new_job(jobs, ingress_id="ingress-a")  # registered, never handed over

    def claim(digest: str, ingress: str, at_s: float, job_id: str = "job-x") -> str | None:
        return idem.claim("acct-i", "key-00000001", digest, job_id=job_id, ingress_id=ingress,
                          now_s=at_s)

    assert claim("d1", "ingress-a", now, job_id=first.job_id) is None
    with pytest.raises(InvalidUpload, match="still being handled") as busy:
        claim("d1", "ingress-b", now + 3)
    assert busy.value.retry_after_s == 7  # until ingress-a's lease lapses
    with pytest.raises(InvalidUpload, match="different request"):
        claim("d2", "ingress-b", now + 3)
    # ingress-a is gone and no runner took its job: the retry takes the claim over (the
    # reaper fails and purges the first job), and then owns it.
    assert claim("d1", "ingress-b", now + 11, job_id="job-b") is None
    jobs.heartbeat(Worker.INGRESS, "ingress-b", lease_s=10, now_s=now + 11)
    with pytest.raises(InvalidUpload, match="still being handled"):
        claim("d1", "ingress-c", now + 12)
    idem.complete("acct-i", "key-00000001", "d1", "job-b")
    assert claim("d1", "ingress-c", now + 12) == "job-b"
    # Another account's same key is another claim.
    assert idem.claim("acct-other", "key-00000001", "d1", job_id="job-o",
                      ingress_id="ingress-c", now_s=now + 12) is None


def test_a_retry_after_the_ingress_died_past_the_hand_off_gets_the_running_job(jobs):
    """The ingress handed its job to a runner, then died before recording it under the
    key: the retry is answered with that job, and no second job is made."""
    from pipeline.state.idempotency import Idempotency

    idem, now = Idempotency(jobs.redis, window_s=3600), time.time()
    jobs.heartbeat(Worker.INGRESS, "ingress-a", lease_s=10, now_s=now)
    job = new_job(jobs, ingress_id="ingress-a")
    assert idem.claim("acct-h", "key-00000002", "d1", job_id=job.job_id,
                      ingress_id="ingress-a", now_s=now) is None
    assert jobs.claim_job(job.job_id, "runner-a")  # the hand-off happened
    assert idem.claim("acct-h", "key-00000002", "d1", job_id="job-second",
                      ingress_id="ingress-b", now_s=now + 11) == job.job_id
    assert idem.claim("acct-h", "key-00000002", "d1", job_id="job-third",
                      ingress_id="ingress-c", now_s=now + 12) == job.job_id  # recorded


def test_every_status_write_follows_the_declared_transitions(jobs):
    """The Lua transition checks records.TRANSITIONS: a queued job cannot succeed (no runner
    ran it), an ended job moves nowhere, and a GPU pool's batch note never moves it."""
    from pipeline.core.records import TRANSITIONS

    job = new_job(jobs)
    assert not jobs.transition(job.job_id, JobStatus.SUCCEEDED, account_id="acct-j")
    assert jobs.get_job(job.job_id).status is JobStatus.QUEUED
    jobs.note_batch([job.job_id], Stage.FACE, cost_units=1, max_cost_units=8)
    view = jobs.get_job(job.job_id)
    assert (view.status, view.face_batch_size) == (JobStatus.QUEUED, 1)
    assert jobs.claim_job(job.job_id, "runner-a")
    assert jobs.claim_job(job.job_id, "runner-a")  # a retried claim (answer lost) holds
    assert not jobs.claim_job(job.job_id, "runner-b")  # held already: no second claim
    assert jobs.get_job(job.job_id).runner_id == "runner-a"
    with pytest.raises(ValueError, match="transition"):
        jobs.update_job(job.job_id, status=JobStatus.SUCCEEDED)
    assert jobs.finish_job(job.job_id, ok=True)
    for status in JobStatus:
        assert not jobs.transition(job.job_id, status, account_id="acct-j")
    assert jobs.get_job(job.job_id).status is JobStatus.SUCCEEDED
    assert TRANSITIONS[JobStatus.SUCCEEDED] == frozenset()
