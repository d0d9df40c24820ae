"""The job driver (pipeline/jobs/driver.py): the runner's decisions with fakes for the job
store, the stage pools and retention. No Ray, no Redis; the clock and the pauses are fake."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
import redis

from pipeline.core.reasons import Reason
from pipeline.core.records import (
    TRANSITIONS,
    JobRecord,
    JobStatus,
    Orphan,
    Stage,
    StageResult,
    Worker,
    WorkItem,
)
from pipeline.jobs.driver import DriverKnobs, JobDriver, PoolFull
from tests.unit.factories import make_item, make_job_record

NOW = 1000.0


class Clock:
    def __init__(self) -> None:
        self.now_s = NOW

    def __call__(self) -> float:
        return self.now_s

    async def sleep(self, seconds: float) -> None:
        self.now_s += seconds  # a pause passes at once, moving the fake clock


class FakeJobs:
    """The job store's contract, in memory, following the declared transitions."""

    def __init__(self) -> None:
        self.records: dict[str, dict] = {}
        self.leases: dict[Worker, dict[str, float]] = {Worker.RUNNER: {}, Worker.INGRESS: {}}
        self.down_for = 0  # the next N calls raise a Redis error
        self.finished: list[tuple[str, bool, str]] = []
        self.updates: list[tuple[str, dict]] = []

    def add(self, job_id: str, **fields) -> None:
        self.records[job_id] = {"status": JobStatus.QUEUED, "runner_id": "", **fields}

    def _maybe_down(self) -> None:
        if self.down_for:
            self.down_for -= 1
            raise redis.ConnectionError("redis is away")

    def _move(self, job_id: str, to: JobStatus) -> bool:
        rec = self.records.get(job_id)
        if rec is None or to not in TRANSITIONS[rec["status"]]:
            return False
        rec["status"] = to
        return True

    def claim_job(self, job_id: str, runner_id: str) -> bool:
        self._maybe_down()
        rec = self.records.get(job_id)
        if rec is None or rec["runner_id"] or not self._move(job_id, JobStatus.RUNNING):
            return False
        rec["runner_id"] = runner_id
        return True

    def update_job(self, job_id: str, **fields) -> bool:
        self._maybe_down()
        rec = self.records.get(job_id)
        if rec is None or rec["status"].is_finished:
            return False
        rec.update(fields)
        self.updates.append((job_id, fields))
        return True

    def finish_job(self, job_id, *, ok, reason="", output_ids=()) -> bool:
        self._maybe_down()
        moved = self._move(job_id, JobStatus.SUCCEEDED if ok else JobStatus.FAILED)
        if moved:
            self.records[job_id].update(reason=reason, output_ids=output_ids)
            self.finished.append((job_id, ok, reason))
        return moved

    def live(self, worker: Worker, now_s: float) -> set[str]:
        return {w for w, until in self.leases[worker].items() if until >= now_s}

    def unfinished_jobs(self) -> list[JobRecord]:
        return [make_job_record(job_id=j, status=r["status"], runner_id=r["runner_id"],
                                created_s=r.get("created_s", NOW))
                for j, r in self.records.items() if not r["status"].is_finished]

    def fail_orphan(self, job: JobRecord, orphan: Orphan, *, now_s: float) -> bool:
        rec = self.records[job.job_id]
        if rec["runner_id"] != job.runner_id or not self._move(job.job_id, JobStatus.FAILED):
            return False
        rec["reason"] = orphan.reason
        self.finished.append((job.job_id, False, orphan.reason))
        return True

    def try_lock(self, name: str, owner: str, ttl_s: float) -> bool:
        return True


@dataclass
class FakeStages:
    """Scripted answers per stage: a StageResult, or an exception to raise."""

    script: dict[Stage, list] = field(default_factory=dict)
    calls: list[tuple[Stage, int]] = field(default_factory=list)

    async def call(self, stage: Stage, item: WorkItem, timeout_s: float) -> StageResult:
        self.calls.append((stage, item.attempts))
        answer = self.script[stage].pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer


@dataclass
class FakeRetention:
    purged: list[str] = field(default_factory=list)

    async def purge_job(self, job_id: str) -> None:
        self.purged.append(job_id)


def make_driver(script, *, max_attempts=3, jobs=None):
    clock = Clock()
    jobs = jobs or FakeJobs()
    stages, retention = FakeStages(script), FakeRetention()
    finished = []
    driver = JobDriver(jobs, stages, retention, runner_id="runner-me",
                       knobs=DriverKnobs(max_attempts=max_attempts, stage_timeout_s=30,
                                         lease_s=4, job_timeout_s=600),
                       on_finished=lambda item, ok, started: finished.append((item.job_id, ok)),
                       clock=clock, sleep=clock.sleep)
    return driver, jobs, stages, retention, clock, finished


def run(driver: JobDriver, item: WorkItem) -> bool:
    async def go() -> bool:
        try:
            return await driver.run_job(item)
        finally:
            await driver.drain()  # the background settles and purges
    return asyncio.run(go())


def ok_face(job_id="job1"):
    return StageResult(job_id, ok=True, face_uri="file:///store/face/job1/x.bin")


def ok_outputs(job_id="job1"):
    return StageResult(job_id, ok=True, output_ids=("out-1",))


def test_an_ai_photo_job_is_claimed_driven_through_both_stages_ended_and_purged():
    driver, jobs, stages, retention, _, finished = make_driver(
        {Stage.FACE: [ok_face()], Stage.DIFFUSION: [ok_outputs()]})
    jobs.add("job1")
    assert run(driver, make_item(deadline_s=NOW + 600))
    assert [s for s, _ in stages.calls] == [Stage.FACE, Stage.DIFFUSION]
    rec = jobs.records["job1"]
    assert (rec["status"], rec["runner_id"], rec["output_ids"]) == (
        JobStatus.SUCCEEDED, "runner-me", ("out-1",))
    assert retention.purged == ["job1"] and finished == [("job1", True)]
    assert driver.held == {}  # the device key is gone with the job


def test_a_job_not_waiting_for_a_runner_is_left_alone():
    driver, jobs, stages, retention, _, finished = make_driver({})
    jobs.add("job1", status=JobStatus.FAILED)  # withdrawn or reaped before the hand-off
    assert not run(driver, make_item(deadline_s=NOW + 600))
    assert stages.calls == [] and retention.purged == [] and finished == []


def test_a_crashed_stage_is_retried_and_the_attempt_recorded():
    driver, jobs, stages, *_ = make_driver(
        {Stage.FACE: [RuntimeError("replica died"), ok_face()],
         Stage.DIFFUSION: [ok_outputs()]})
    jobs.add("job1")
    assert run(driver, make_item(deadline_s=NOW + 600))
    assert stages.calls[:2] == [(Stage.FACE, 0), (Stage.FACE, 1)]
    assert jobs.records["job1"]["attempts"] == 1


def test_a_stage_that_keeps_failing_ends_the_job_with_a_reason_naming_it():
    driver, jobs, stages, retention, *_ = make_driver(
        {Stage.FACE: [TimeoutError(), TimeoutError()]}, max_attempts=2)
    jobs.add("job1")
    assert not run(driver, make_item(deadline_s=NOW + 600))
    status, reason = jobs.records["job1"]["status"], jobs.records["job1"]["reason"]
    assert status is JobStatus.FAILED
    assert reason.startswith("the face stage did not answer within 30 s") and "2 attempts" in reason
    assert retention.purged == ["job1"]


def test_a_full_pool_is_waited_out_without_spending_an_attempt():
    driver, jobs, stages, *_ = make_driver(
        {Stage.FACE: [PoolFull("face")] * 3 + [ok_face()], Stage.DIFFUSION: [ok_outputs()]})
    jobs.add("job1")
    assert run(driver, make_item(deadline_s=NOW + 600))
    assert [a for s, a in stages.calls if s is Stage.FACE] == [0, 0, 0, 0]
    assert jobs.records["job1"].get("attempts", 0) == 0


def test_a_pool_full_until_the_deadline_ends_the_job_timed_out():
    driver, jobs, stages, _, clock, _ = make_driver({Stage.FACE: [PoolFull("face")] * 1000})
    called_at = []
    real_call = stages.call

    async def call(stage, item, timeout_s):
        called_at.append(clock.now_s)
        return await real_call(stage, item, timeout_s)

    stages.call = call
    jobs.add("job1")
    assert not run(driver, make_item(deadline_s=NOW + 5))
    assert jobs.records["job1"]["reason"] == Reason.TIMEOUT
    assert len(stages.calls) < 1000  # it stopped at the deadline, not at the script's end
    assert called_at and max(called_at) < NOW + 5  # no call was sent past the deadline


def test_a_second_hand_off_of_a_held_job_is_ignored():
    driver, jobs, stages, *_ = make_driver({})
    jobs.add("job1")
    item = make_item(deadline_s=NOW + 600)
    driver.held["job1"] = item  # this runner already drives it
    assert not run(driver, item)
    assert stages.calls == [] and driver.held == {"job1": item}


def test_redis_briefly_away_is_retried_and_long_away_settles_the_job_later():
    driver, jobs, stages, *_ = make_driver({Stage.DIFFUSION: [ok_outputs()]})
    jobs.add("job1")
    jobs.down_for = 3  # the claim fails three times, then Redis is back
    assert run(driver, make_item(kind="art_style", deadline_s=NOW + 600))
    assert jobs.records["job1"]["status"] is JobStatus.SUCCEEDED

    driver, jobs, stages, retention, *_ = make_driver({Stage.DIFFUSION: [ok_outputs()]})
    jobs.add("job1")
    jobs.down_for = 12  # every try of the claim
    with pytest.raises(redis.ConnectionError):
        run(driver, make_item(kind="art_style", deadline_s=NOW + 600))
    # In the background, once Redis was back: the job ended failed and was purged.
    assert jobs.records["job1"]["status"] is JobStatus.FAILED
    assert jobs.records["job1"]["reason"] == Reason.INTERRUPTED
    assert retention.purged == ["job1"]


def test_a_clip_reports_its_progress_chunk_by_chunk():
    chunk = StageResult("job1", ok=True, frames_done=4, work_uri="file:///store/work/job1/a")
    last = StageResult("job1", ok=True, frames_done=8, output_ids=("clip",))
    driver, jobs, stages, *_ = make_driver({Stage.DIFFUSION: [chunk, last]})
    jobs.add("job1")
    assert run(driver, make_item(kind="animate", num_frames=8, deadline_s=NOW + 600))
    assert [s for s, _ in stages.calls] == [Stage.DIFFUSION, Stage.DIFFUSION]
    assert [u for _, u in jobs.updates] == [{"frames_done": 4}, {"frames_done": 8}]
    assert jobs.records["job1"]["output_ids"] == ("clip",)


def test_the_reaper_fails_only_the_jobs_nobody_can_finish():
    driver, jobs, _, retention, clock, _ = make_driver({})
    jobs.leases[Worker.RUNNER] = {"runner-live": NOW + 10, "runner-dead": NOW - 1}
    jobs.add("live", status=JobStatus.RUNNING, runner_id="runner-live")
    jobs.add("dead", status=JobStatus.RUNNING, runner_id="runner-dead")
    jobs.add("mine-dropped", status=JobStatus.RUNNING, runner_id="runner-me")
    jobs.add("overdue", status=JobStatus.RUNNING, runner_id="runner-live",
             created_s=NOW - 1300)

    async def go():
        failed = await driver.reap(NOW)
        await driver.drain()
        return failed
    assert sorted(asyncio.run(go())) == ["dead", "mine-dropped", "overdue"]
    reasons = {j: jobs.records[j].get("reason") for j in ("dead", "mine-dropped", "overdue")}
    assert reasons == {"dead": Reason.RESTART, "mine-dropped": Reason.INTERRUPTED,
                       "overdue": Reason.TIMEOUT}
    assert jobs.records["live"]["status"] is JobStatus.RUNNING
    assert sorted(retention.purged) == ["dead", "mine-dropped", "overdue"]


def test_only_a_runner_beating_for_a_whole_lease_reaps():
    driver, jobs, _, _, clock, _ = make_driver({})
    jobs.add("dead", status=JobStatus.RUNNING, runner_id="runner-dead")
    assert not asyncio.run(driver.reap_if_leader())  # just started
    clock.now_s += 5
    driver.beat(False)  # Redis was away: the lease clock starts again
    driver.beat(True)
    assert not asyncio.run(driver.reap_if_leader())
    clock.now_s += 5
    assert asyncio.run(driver.reap_if_leader())
    assert jobs.records["dead"]["status"] is JobStatus.FAILED
