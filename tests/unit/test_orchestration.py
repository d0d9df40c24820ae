"""orchestration: where a job goes after each stage answers, when retries stop, when a job
expired, and when an unfinished job can never finish. Pure: the clock is a number."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pipeline.core.reasons import Reason
from pipeline.core.records import Orphan, Stage, Worker
from pipeline.jobs.orchestration import (
    after_crash,
    after_result,
    batch_cost,
    find_orphan,
    first_stage,
    is_expired,
    job_cost_units,
    merge_waiting,
    stage_timeout_s,
    start,
)
from tests.unit.factories import failed_result, make_item, make_job_record, ok_result

FACE_URI = "file:///store/face/job1/e.bin"
NOW = 1000.0


def test_first_stage_is_face_for_ai_photo_and_diffusion_otherwise():
    assert first_stage(make_item(kind="ai_photo")) is Stage.FACE
    assert first_stage(make_item(kind="ai_photo", face_uri=FACE_URI)) is Stage.DIFFUSION
    assert first_stage(make_item(kind="art_style")) is Stage.DIFFUSION


def test_face_success_goes_to_diffusion_with_the_face_uri():
    plan = after_result(Stage.FACE, make_item(), ok_result(face_uri=FACE_URI), max_attempts=3,
                        now_s=NOW)

    assert plan.stage is Stage.DIFFUSION
    assert plan.item.face_uri == FACE_URI
    assert plan.item.job_id == "job1" and plan.item.device_key == b"k" * 32


def test_a_clip_goes_chunk_by_chunk_carrying_its_stored_frames():
    clip = replace(make_item(kind="animate"), num_frames=20, fps=8.0)
    first = after_result(Stage.DIFFUSION, clip, ok_result(frames_done=8, work_uri="w1"),
                         max_attempts=3, now_s=NOW)
    assert first.stage is Stage.DIFFUSION
    assert (first.item.frames_done, first.item.work_uris) == (8, ("w1",))
    second = after_result(Stage.DIFFUSION, first.item, ok_result(frames_done=16, work_uri="w2"),
                          max_attempts=3, now_s=NOW)
    assert second.item.work_uris == ("w1", "w2") and second.stage is Stage.DIFFUSION
    last = after_result(Stage.DIFFUSION, second.item,
                        ok_result(frames_done=20, output_ids=("clip", "poster")),
                        max_attempts=3, now_s=NOW)
    assert (last.stage, last.ok, last.output_ids) == (None, True, ("clip", "poster"))


def test_a_chunk_without_progress_ends_the_clip_instead_of_looping():
    clip = replace(make_item(kind="animate"), num_frames=20, frames_done=8)
    plan = after_result(Stage.DIFFUSION, clip, ok_result(frames_done=8, work_uri="w"),
                        max_attempts=3, now_s=NOW)
    assert plan.stage is None and not plan.ok and "no progress" in plan.reason


def test_the_next_chunk_of_an_expired_clip_is_never_sent():
    clip = replace(make_item(kind="animate", deadline_s=NOW), num_frames=20)
    plan = after_result(Stage.DIFFUSION, clip, ok_result(frames_done=8, work_uri="w"),
                        max_attempts=3, now_s=NOW)
    assert plan.stage is None and plan.reason == Reason.TIMEOUT


def test_diffusion_success_finishes_the_job_with_its_outputs():
    plan = after_result(Stage.DIFFUSION, make_item(face_uri=FACE_URI),
                        ok_result(output_ids=("o1", "o2")), max_attempts=3, now_s=NOW)

    assert (plan.stage, plan.ok, plan.output_ids) == (None, True, ("o1", "o2"))


def test_non_retryable_failure_finishes_with_the_reason():
    result = failed_result(reason="no human face was found in file 1", retryable=False)

    plan = after_result(Stage.FACE, make_item(), result, max_attempts=3, now_s=NOW)

    assert (plan.stage, plan.ok) == (None, False)
    assert plan.reason == "no human face was found in file 1"


def test_retryable_failure_retries_the_same_stage_until_max_attempts():
    item = make_item()
    plans = []
    for _ in range(3):
        plan = after_result(Stage.FACE, item, failed_result(reason="store down", retryable=True),
                            max_attempts=3, now_s=NOW)
        plans.append(plan)
        item = plan.item

    assert [p.stage for p in plans] == [Stage.FACE, Stage.FACE, None]
    assert [p.item.attempts for p in plans] == [1, 2, 3]
    assert plans[-1].ok is False and "3 attempts" in plans[-1].reason


def test_a_crash_counts_as_an_attempt():
    plan = after_crash(Stage.DIFFUSION, make_item(attempts=2), "the diffusion worker failed",
                       max_attempts=3, now_s=NOW)

    assert plan.stage is None and "3 attempts" in plan.reason


@pytest.mark.parametrize("step", ["start", "after_face", "after_crash"])
def test_a_job_past_its_deadline_is_never_sent_to_a_stage(step):
    item = make_item(deadline_s=NOW - 1)
    if step == "start":
        plan = start(item, NOW)
    elif step == "after_face":
        plan = after_result(Stage.FACE, item, ok_result(face_uri=FACE_URI), max_attempts=3,
                            now_s=NOW)
    else:
        plan = after_crash(Stage.FACE, item, "crash", max_attempts=3, now_s=NOW)

    assert (plan.stage, plan.ok, plan.reason) == (None, False, Reason.TIMEOUT)


def test_a_job_within_its_deadline_starts():
    assert start(make_item(deadline_s=NOW + 1), NOW).stage is Stage.FACE
    assert not is_expired(make_item(deadline_s=NOW + 1), NOW)
    assert is_expired(make_item(deadline_s=NOW), NOW)


def test_a_stage_call_never_waits_past_the_deadline():
    assert stage_timeout_s(make_item(deadline_s=NOW + 5), NOW, per_call_s=120) == 5
    assert stage_timeout_s(make_item(deadline_s=NOW + 500), NOW, per_call_s=120) == 120
    assert stage_timeout_s(make_item(deadline_s=NOW - 5), NOW, per_call_s=120) == 0


def test_cost_grows_with_images_pixels_and_frames():
    assert job_cost_units(1, 64, reference_resolution_px=64) == 1
    assert job_cost_units(3, 64, reference_resolution_px=64) == 3
    assert job_cost_units(1, 128, reference_resolution_px=64) == 4
    assert job_cost_units(1, 512, reference_resolution_px=512, num_frames=14) == 14
    assert job_cost_units(1, 256, reference_resolution_px=512) == 1  # never below one
    assert batch_cost([make_item(cost_units=2), make_item(cost_units=3)]) == 5


def orphan(job, *, runners=frozenset(), ingresses=frozenset(), now_s=NOW, grace_s=600.0):
    return find_orphan(job, live_runners=set(runners), live_ingresses=set(ingresses),
                       now_s=now_s, unclaimed_grace_s=grace_s)


def test_a_job_whose_runner_is_gone_is_an_orphan_on_the_runners_lease():
    job = make_job_record(status="running", runner_id="runner-a", ingress_id="ingress-a")

    assert orphan(job, runners={"runner-b"}, ingresses={"ingress-a"}) == Orphan(
        Reason.RESTART, Worker.RUNNER)
    assert orphan(job, runners={"runner-a"}) is None  # its ingress no longer matters


def test_an_unclaimed_job_whose_ingress_is_gone_is_an_orphan_at_once():
    """The ingress died while storing or handing off the job: the device key died with it,
    so nothing can run the job; it need not wait for the grace period."""
    job = make_job_record(runner_id="", ingress_id="ingress-a", created_s=NOW - 1)

    assert orphan(job, ingresses={"ingress-b"}) == Orphan(Reason.NOT_STARTED, Worker.INGRESS)
    assert orphan(job, ingresses={"ingress-a"}) is None  # still being stored or handed off


def test_an_unclaimed_job_of_a_live_ingress_is_an_orphan_only_after_the_grace_period():
    job = make_job_record(runner_id="", ingress_id="ingress-a", created_s=NOW - 100)

    assert orphan(job, ingresses={"ingress-a"}) is None
    assert orphan(job, ingresses={"ingress-a"}, now_s=NOW + 600) == Orphan(Reason.NOT_STARTED,
                                                                          None)
    # A job registered without an ingress id (by a tool) is judged by time alone.
    assert orphan(make_job_record(created_s=NOW - 100), now_s=NOW + 600) == Orphan(
        Reason.NOT_STARTED, None)


def test_a_finished_job_is_never_an_orphan():
    job = make_job_record(status="succeeded", runner_id="runner-gone", created_s=0)

    assert orphan(job, grace_s=1) is None
    assert orphan(make_job_record(status="failed", ingress_id="ingress-gone"), grace_s=1) is None


def test_a_model_call_merges_same_key_batches_up_to_the_cost_limit():
    waiting = [("a", 2, frozenset({"j1", "j2"})), ("b", 1, frozenset({"j3"})),
               ("a", 3, frozenset({"j4", "j5", "j6"})), ("a", 4, frozenset({"j7"}))]
    assert merge_waiting(waiting, max_cost=5) == [0, 2]  # b waits; the last would overflow
    assert merge_waiting(waiting, max_cost=100) == [0, 2, 3]
    assert merge_waiting(waiting[1:], max_cost=1) == [0]  # the oldest batch always goes
    assert merge_waiting([], max_cost=8) == []


def test_a_job_is_never_twice_in_one_model_call():
    waiting = [("a", 1, frozenset({"j1"})), ("a", 1, frozenset({"j1"})),
               ("a", 1, frozenset({"j2"}))]
    assert merge_waiting(waiting, max_cost=8) == [0, 2]
