"""scheduling: where a job goes after each stage answers, and when retries stop."""

from __future__ import annotations

from pipeline.scheduling import after_crash, after_result, first_stage
from tests.unit.factories import failed_result, make_item, ok_result

FACE_URI = "file:///store/face/job1/e.bin"


def test_first_stage_is_face_for_ai_photo_and_diffusion_otherwise():
    assert first_stage(make_item(kind="ai_photo")) == "face"
    assert first_stage(make_item(kind="ai_photo", face_uri=FACE_URI)) == "diffusion"
    assert first_stage(make_item(kind="art_style")) == "diffusion"


def test_face_success_goes_to_diffusion_with_the_face_uri():
    plan = after_result("face", make_item(), ok_result(face_uri=FACE_URI), max_attempts=3)

    assert plan.stage == "diffusion"
    assert plan.item.face_uri == FACE_URI
    assert plan.item.job_id == "job1" and plan.item.device_key == b"k" * 32


def test_diffusion_success_finishes_the_job_with_its_outputs():
    item = make_item(face_uri=FACE_URI)
    plan = after_result("diffusion", item, ok_result(output_ids=("o1", "o2")), max_attempts=3)

    assert plan.stage is None
    assert plan.ok is True
    assert plan.output_ids == ("o1", "o2")


def test_non_retryable_failure_finishes_with_the_reason():
    result = failed_result(reason="no human face was found in file 1", retryable=False)

    plan = after_result("face", make_item(), result, max_attempts=3)

    assert (plan.stage, plan.ok) == (None, False)
    assert plan.reason == "no human face was found in file 1"
    assert plan.item.attempts == 0


def test_retryable_failure_retries_at_the_same_stage_until_max_attempts():
    item = make_item(face_uri=FACE_URI)
    result = failed_result(reason="the object store is unavailable", retryable=True)
    stages = []
    for _ in range(10):
        plan = after_result("diffusion", item, result, max_attempts=3)
        stages.append(plan.stage)
        item = plan.item
        if plan.stage is None:
            break

    assert stages == ["diffusion", "diffusion", None]  # three tries in all
    assert plan.ok is False
    assert plan.item.attempts == 3
    assert "the object store is unavailable" in plan.reason
    assert "3 attempts" in plan.reason


def test_crash_with_one_attempt_allowed_fails_at_once():
    plan = after_crash("face", make_item(), "worker died", max_attempts=1)

    assert plan.stage is None and plan.ok is False
    assert "worker died" in plan.reason and "1 attempts" in plan.reason


def test_crash_keeps_the_face_uri_for_the_retry():
    plan = after_crash("diffusion", make_item(face_uri=FACE_URI), "timeout", max_attempts=3)

    assert plan.stage == "diffusion"
    assert plan.item.face_uri == FACE_URI and plan.item.attempts == 1
