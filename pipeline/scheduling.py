"""Scheduling decisions over work items: where a job goes next after a stage answered.

Pure: the Ray scheduler (serve/scheduler.py) feeds it results and carries out the plan.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pipeline.records import StageResult, WorkItem


@dataclass(frozen=True, slots=True)
class Next:
    """What to do with one job: enqueue at a stage, or finish it."""

    item: WorkItem
    stage: str | None  # "face" | "diffusion" | None when finished
    ok: bool = False
    reason: str = ""
    output_ids: tuple[str, ...] = ()


def first_stage(item: WorkItem) -> str:
    return "face" if item.kind == "ai_photo" and item.face_uri is None else "diffusion"


def after_result(stage: str, item: WorkItem, result: StageResult, *, max_attempts: int) -> Next:
    """The plan for ``item`` once ``stage`` returned ``result`` for it."""
    if result.ok and stage == "face":
        return Next(replace(item, face_uri=result.face_uri), stage="diffusion")
    if result.ok:
        return Next(item, stage=None, ok=True, output_ids=result.output_ids)
    if result.retryable:
        return after_crash(stage, item, result.reason, max_attempts=max_attempts)
    return Next(item, stage=None, ok=False, reason=result.reason)


def after_crash(stage: str, item: WorkItem, reason: str, *, max_attempts: int) -> Next:
    """A worker crashed or timed out: retry at the same stage, or fail after max_attempts."""
    tried = replace(item, attempts=item.attempts + 1)
    if tried.attempts < max_attempts:
        return Next(tried, stage=stage)
    return Next(tried, stage=None, ok=False,
                reason=f"{reason} ({tried.attempts} attempts); please try again later")
