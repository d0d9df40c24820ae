"""The decisions of a job's life between acceptance and its end: which stage next, when
to retry, when it expired, when its runner is gone. Pure, with the clock passed in.

A job runner replica (serve/runner.py) drives each job it holds through these decisions
and only moves messages; the same rules run in the unit tests without Ray or Redis.
See docs/ARCHITECTURE.md for the invariants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from pipeline.core.reasons import Reason, out_of_attempts
from pipeline.core.records import JobKind, JobRecord, Orphan, Stage, StageResult, Worker, WorkItem


@dataclass(frozen=True, slots=True)
class Next:
    """What to do with one job: send it to a stage, or finish it."""

    item: WorkItem
    stage: Stage | None  # None: finished
    ok: bool = False
    reason: str = ""
    output_ids: tuple[str, ...] = ()


def first_stage(item: WorkItem) -> Stage:
    return Stage.FACE if item.kind == JobKind.AI_PHOTO and item.face_uri is None else Stage.DIFFUSION


def start(item: WorkItem, now_s: float) -> Next:
    """The first step of a job handed to a runner (it may have waited in a queue)."""
    return check_deadline(Next(item, stage=first_stage(item)), now_s)


def after_result(stage: Stage, item: WorkItem, result: StageResult, *, max_attempts: int,
                 now_s: float) -> Next:
    """The plan for ``item`` once ``stage`` returned ``result`` for it."""
    if result.ok and stage is Stage.FACE:
        return check_deadline(Next(replace(item, face_uri=result.face_uri),
                                   stage=Stage.DIFFUSION), now_s)
    if result.ok and item.is_clip and result.frames_done < item.num_frames:
        # A clip's next chunk: the frames made so far are stored at result.work_uri.
        if result.frames_done <= item.frames_done or result.work_uri is None:
            return Next(item, stage=None, ok=False, reason=Reason.CLIP_STALLED)
        chunk = replace(item, frames_done=result.frames_done,
                        work_uris=(*item.work_uris, result.work_uri))
        return check_deadline(Next(chunk, stage=Stage.DIFFUSION), now_s)
    if result.ok:
        done = replace(item, frames_done=result.frames_done) if item.is_clip else item
        return Next(done, stage=None, ok=True, output_ids=result.output_ids)
    if result.retryable:
        return after_crash(stage, item, result.reason, max_attempts=max_attempts, now_s=now_s)
    return Next(item, stage=None, ok=False, reason=result.reason)


def after_crash(stage: Stage, item: WorkItem, reason: str, *, max_attempts: int,
                now_s: float) -> Next:
    """A worker crashed or timed out: retry at the same stage, or fail after max_attempts."""
    tried = replace(item, attempts=item.attempts + 1)
    if tried.attempts < max_attempts:
        return check_deadline(Next(tried, stage=stage), now_s)
    return Next(tried, stage=None, ok=False,
                reason=out_of_attempts(reason, tried.attempts))


def check_deadline(plan: Next, now_s: float) -> Next:
    """A job past its deadline is never sent to a stage: it ends failed instead."""
    if plan.stage is not None and now_s >= plan.item.deadline_s:
        return Next(plan.item, stage=None, ok=False, reason=Reason.TIMEOUT)
    return plan


def stage_timeout_s(item: WorkItem, now_s: float, *, per_call_s: float) -> float:
    """How long one stage call may take: its own limit, and never past the job's deadline."""
    return max(0.0, min(per_call_s, item.deadline_s - now_s))


def is_expired(item: WorkItem, now_s: float) -> bool:
    """For a GPU replica about to run a batch: skip jobs already past their deadline."""
    return now_s >= item.deadline_s


def batch_cost(items: list[WorkItem]) -> int:
    """What a batch costs, for Serve's ``batch_size_fn``: the sum of its jobs' units."""
    return sum(item.cost_units for item in items)


def merge_waiting(waiting: list[tuple[str, int, frozenset[str]]], max_cost: int) -> list[int]:
    """Which waiting batches one model call takes: the oldest batch, then every later batch
    of the same key that still fits in ``max_cost`` (by index, oldest first). A batch
    holding a job already taken waits for the next call (a retry of an abandoned attempt).

    ``waiting``: (batch key, cost, job ids) per batch Serve handed over, oldest first.
    """
    if not waiting:
        return []
    key = waiting[0][0]
    taken: list[int] = []
    cost = 0
    jobs: set[str] = set()
    for index, (batch_key, batch_cost_units, job_ids) in enumerate(waiting):
        if batch_key != key or jobs & job_ids:
            continue
        if taken and cost + batch_cost_units > max_cost:
            break
        taken.append(index)
        cost += batch_cost_units
        jobs |= job_ids
    return taken


def job_cost_units(num_images: int, resolution_px: int, *, reference_resolution_px: int,
                   num_frames: int = 1) -> int:
    """Images x frames x pixels relative to the reference size, rounded up; at least 1.
    Steps are the same for every job of a deployment, so they scale all costs alike."""
    pixels = (resolution_px / reference_resolution_px) ** 2
    return max(1, math.ceil(num_images * num_frames * pixels))


def find_orphan(job: JobRecord, *, live_runners: set[str], live_ingresses: set[str],
                now_s: float, unclaimed_grace_s: float) -> Orphan | None:
    """Why an unfinished job can never finish, or None while it still may.

    A job whose runner is gone lost its device key with it. A job no runner claimed whose
    ingress is gone was never handed over (the ingress died while storing it or handing
    it off) and has no key anywhere either. A job no runner claimed within
    ``unclaimed_grace_s`` of acceptance lost its hand-off some other way (cancelled).
    """
    if job.status.is_finished:
        return None
    if job.runner_id:
        return None if job.runner_id in live_runners else Orphan(Reason.RESTART, Worker.RUNNER)
    if job.ingress_id and job.ingress_id not in live_ingresses:
        return Orphan(Reason.NOT_STARTED, Worker.INGRESS)
    if now_s - job.created_s > unclaimed_grace_s:
        return Orphan(Reason.NOT_STARTED, None)
    return None


def is_far_overdue(job: JobRecord, *, now_s: float, job_timeout_s: float) -> bool:
    """A backstop: an unfinished job twice past its timeout ends, whoever holds it (its
    runner should have ended it at the deadline; something kept it from doing so)."""
    return not job.status.is_finished and now_s - job.created_s > 2 * job_timeout_s
