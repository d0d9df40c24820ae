"""Typed records that the layers hand each other. No dicts cross a layer boundary."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np


class JobKind(StrEnum):
    """What a job makes. Values are what the API takes and Redis holds."""

    AI_PHOTO = "ai_photo"  # face-conditioned photos from the user's selfies
    ART_STYLE = "art_style"  # each photo (or the one video) in a style
    ANIMATE = "animate"  # one photo brought to life as a short clip


JOB_KINDS: tuple[str, ...] = tuple(k.value for k in JobKind)


class JobStatus(StrEnum):
    """A job's lifecycle. Values are what Redis and the API hold."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def is_finished(self) -> bool:
        return not TRANSITIONS[self]


# Every move a job's status may make, declared once. Every status write goes through
# JobStore.transition, which checks this table inside Redis (its Lua is generated from it);
# see docs/ARCHITECTURE.md, "Who writes a job". Ended states allow no move.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.FAILED}),
    JobStatus.RUNNING: frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED}),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
}
FINISHED_STATUSES: tuple[JobStatus, ...] = tuple(s for s, moves in TRANSITIONS.items()
                                                 if not moves)


class Stage(StrEnum):
    """The GPU stages a job passes through; each is served by the pool of the same name."""

    FACE = "face"
    DIFFUSION = "diffusion"


class Pool(StrEnum):
    """The pools an operator tunes live (``ephemera tune POOL``): one per GPU stage, and
    the job runners."""

    FACE = Stage.FACE.value
    DIFFUSION = Stage.DIFFUSION.value
    RUNNER = "runner"


class Worker(StrEnum):
    """A process that holds jobs (and their device keys) in memory under a lease in Redis
    (``keys.worker_leases``): when the lease lapses, the jobs it held can never finish."""

    INGRESS = "ingress"  # from registering a job until a runner takes it
    RUNNER = "runner"  # from the hand-off to the job's end


@dataclass(frozen=True, slots=True)
class Orphan:
    """Why an unfinished job can never finish (``reason``, for the user), and the worker
    whose lapsed lease is the grounds (None: decided by time alone). The reaper fails
    the job only if that lease is still lapsed at the moment it writes."""

    reason: str
    lapsed: Worker | None


class ObjectClass(StrEnum):
    """What a stored object is, which decides when it must be gone."""

    INPUT = "input"
    FACE_DATA = "face_data"
    WORK_DATA = "work_data"  # generated frames of a clip between its chunks
    OUTPUT = "output"


# Derived from the user's media: purged with the inputs the moment the job ends.
PURGED_WITH_INPUTS = (ObjectClass.INPUT, ObjectClass.FACE_DATA, ObjectClass.WORK_DATA)


@dataclass(frozen=True, slots=True)
class CleanImage:
    """An uploaded image after decoding and metadata stripping.

    ``png_bytes`` is a fresh PNG encoding of the pixels alone: no EXIF, XMP, IPTC, ICC,
    comments or text chunks. This is the only form that is encrypted and stored.
    """

    png_bytes: bytes
    width_px: int
    height_px: int
    source_format: str  # "JPEG" | "PNG" | "WEBP" as detected from the bytes, not the name


@dataclass(frozen=True, slots=True)
class RetentionRecord:
    """One stored object's retention entry: who owns it and when it must be gone."""

    uri: str
    object_class: ObjectClass
    account_id: str
    job_id: str
    created_s: float
    deadline_s: float
    provider: str = ""  # "local" | "aws" | "gcp": where the object lives (residency)
    region: str = ""
    bucket: str = ""


@dataclass(frozen=True, slots=True)
class DeletionReceipt:
    """Proof that an object was deleted and verified gone. Holds no content."""

    uri: str
    object_class: str
    job_id: str
    deleted_at_s: float
    verified_gone: bool


@dataclass(frozen=True, slots=True)
class JobRecord:
    """A job as the API reports it. Holds no media and no key."""

    job_id: str
    account_id: str
    kind: JobKind
    style: str
    resolution_px: int
    status: JobStatus
    created_s: float
    updated_s: float
    input_uris: list[str]
    output_ids: list[str] = field(default_factory=list)
    reason: str = ""
    succeeded_s: float | None = None
    finished_s: float | None = None
    inputs_purged_s: float | None = None
    num_inputs_purged_verified: int = 0
    attempts: int = 0
    face_batch_size: int = 0  # jobs in the face-stage model call that served this job
    diffusion_batch_size: int = 0  # jobs in the diffusion model call
    runner_id: str = ""  # the job runner holding the job (and its key) in memory
    ingress_id: str = ""  # the ingress that registered it (holds the key until the hand-off)
    frames_total: int = 0  # clips: frames to generate (0 for photos)
    frames_done: int = 0  # clips: frames generated so far (progress)
    minimised_s: float | None = None  # personal fields dropped (data minimisation)
    account_ref: str = ""  # the account's pseudonym, kept once the id is dropped


@dataclass(frozen=True, slots=True)
class OutputRecord:
    """One generated image kept for its account until the user deletes it."""

    output_id: str
    account_id: str
    job_id: str
    uri: str
    media_type: str
    created_s: float
    provider: str = ""
    region: str = ""
    bucket: str = ""
    size_bytes: int = 0


@dataclass(frozen=True, slots=True)
class WorkItem:
    """A job travelling the GPU stages. Lives in memory only: it carries the device key.

    ``face_uri`` is set once the face stage stored the (encrypted) face embedding.
    """

    job_id: str
    account_id: str
    kind: JobKind
    style: str
    resolution_px: int
    input_uris: tuple[str, ...]
    device_key: bytes = field(repr=False)
    seed: int
    deadline_s: float = float("inf")  # past it the job fails and is never sent to a GPU
    cost_units: int = 1  # images x (resolution / reference)^2: what a batch is sized by
    sent_s: float = 0.0  # when a runner last sent it to a stage (queue-wait metric)
    face_uri: str | None = None
    attempts: int = 0
    # Clips (animate, or art_style on a video): frames to make, at what rate, how far done,
    # and the stored chunks made so far (encrypted WORK_DATA).
    num_frames: int = 0
    fps: float = 0.0
    frames_done: int = 0
    work_uris: tuple[str, ...] = ()
    video_input: bool = False
    # For the usage event at the end (never stored with the job record).
    accepted_s: float = 0.0
    country: str = ""

    @property
    def is_clip(self) -> bool:
        return self.num_frames > 0

    @property
    def batch_key(self) -> tuple[str, str, int]:
        """Jobs with the same key can share one model call (a styled video runs another
        pipeline than a styled photo)."""
        kind = f"{self.kind}-video" if self.video_input else self.kind
        return (kind, self.style, self.resolution_px)


@dataclass(frozen=True, slots=True)
class StageResult:
    """What a stage did with one job: new face data, outputs, or a failure reason."""

    job_id: str
    ok: bool
    reason: str = ""
    face_uri: str | None = None
    output_ids: tuple[str, ...] = ()
    retryable: bool = False
    frames_done: int = 0  # clips: frames generated once this chunk is stored
    work_uri: str | None = None  # clips: where this chunk's frames are stored


@dataclass(frozen=True, slots=True)
class FaceBatch:
    """Decoded, metadata-free RGB images of several jobs for the face stage."""

    job_ids: list[str]
    images: list[np.ndarray]  # each (height, width, 3) uint8


class FaceProblem(StrEnum):
    """Why an image cannot give an identity embedding."""

    NO_FACE = "no_face"
    TOO_SMALL = "too_small"
    BLURRED = "blurred"


@dataclass(frozen=True, slots=True)
class FaceRejection:
    problem: FaceProblem
    detail: str  # says what was measured; never holds image data


@dataclass(frozen=True, slots=True)
class EmbeddingBatch:
    """Per image: one identity embedding, or the reason there is none."""

    job_ids: list[str]
    embeddings: list[np.ndarray | None]  # each (512,) float32, L2-normalised
    rejections: list[FaceRejection | None]
