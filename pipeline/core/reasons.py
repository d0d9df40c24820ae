"""Every reason a job can fail with, in one place: what the user reads in the job's
``reason`` (and what tests and operators match on). Plain words, no media, no key, no
secret; each says what to do next.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """The fixed reasons. Reasons that carry a detail (which file, which stage, how many
    attempts) are built by the functions below."""

    # The worker holding the job (and its device key, in memory only) is gone.
    RESTART = ("the worker holding this job stopped before it finished; the device key is "
               "held in memory only, so please submit the photos again")
    NOT_STARTED = "the job was interrupted before it started; please try again"
    INTERRUPTED = "the job was interrupted; please try again"
    TIMEOUT = "the job timed out; please try again"
    # A stage's answer for a job that ended meanwhile, or for an abandoned attempt.
    ENDED = "the job already ended"
    SUPERSEDED = "a newer attempt of this job ran instead"
    ACCOUNT_DELETED = "the account was deleted"
    STORE_UNAVAILABLE = "the object store is unavailable"
    STORE_FAILED_ON_UPLOAD = ("the object store failed while storing the upload; nothing was "
                              "processed, please try again")
    AT_CAPACITY = "the service was at capacity; please try again"
    UNPROCESSABLE = "this photo could not be processed"
    NO_FACE_DATA = "face stage did not run"
    CLIP_STALLED = "a clip chunk made no progress"


def stage_timed_out(stage: str, timeout_s: float) -> str:
    return f"the {stage} stage did not answer within {timeout_s:g} s"


def worker_failed(stage: str, error: BaseException) -> str:
    """Names the error's type only: its message may hold anything."""
    return f"the {stage} worker failed ({type(error).__name__})"


def out_of_attempts(reason: str, attempts: int) -> str:
    return f"{reason} ({attempts} attempts); please try again later"
