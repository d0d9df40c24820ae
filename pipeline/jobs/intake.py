"""Accepting a job: validate everything first, then register, then store ciphertext.

Order matters for the privacy promises:
1. every check runs before anything is written, so bad input changes nothing;
2. the job and the retention records of all its objects go into Redis in one MULTI
   *before* any object is written, so no object can exist without a record;
3. only AES-GCM ciphertext of the metadata-free re-encoding reaches the store;
4. if a write fails, what was written is deleted, verified, and the job is discarded.
"""

from __future__ import annotations

import re
import secrets
import time
import uuid
from dataclasses import dataclass, field

from pipeline.core.config import ServiceConfig, Settings
from pipeline.core.errors import EphemeraError, InvalidUpload, StorageError
from pipeline.core.reasons import Reason
from pipeline.core.records import (
    JOB_KINDS,
    CleanImage,
    JobKind,
    JobRecord,
    JobStatus,
    ObjectClass,
    RetentionRecord,
    WorkItem,
)
from pipeline.jobs.orchestration import job_cost_units
from pipeline.media.ingest import check_file_shape, check_media, declared_pixels
from pipeline.media.sandbox import Decoder, DecodeReport
from pipeline.media.video import CleanVideo
from pipeline.retention.purge import deadline_for
from pipeline.security import crypto
from pipeline.state.job_store import JobStore
from pipeline.storage.base import (
    ObjectStore,
    StoreSet,
    delete_verified,
    input_key,
    key_from_uri,
    object_uri,
)
from pipeline.storage.residency import check_country

ACCOUNT_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True, slots=True)
class JobRequest:
    """A validated request: clean images (or one clean video) and the parameters, ready to
    be stored."""

    account_id: str
    kind: JobKind
    style: str
    resolution_px: int
    images: list[CleanImage]
    country: str | None = None  # ISO alpha-2: picks the storage region, then forgotten
    video: CleanVideo | None = None

    @property
    def payloads(self) -> list[bytes]:
        """The stripped bytes to encrypt and store, one object each."""
        return [self.video.mp4_bytes] if self.video else [i.png_bytes for i in self.images]

    def num_frames(self, settings: Settings) -> int:
        """Frames of the clip this job makes; 0 for a photo job."""
        if self.video:
            return self.video.num_frames
        return settings.styles.styles[self.style].num_frames if self.kind == JobKind.ANIMATE else 0

    def fps(self, settings: Settings) -> float:
        if self.video:
            return float(self.video.fps)
        return float(settings.styles.styles[self.style].fps) if self.kind == JobKind.ANIMATE else 0.0


def check_account_id(account_id: str | None) -> str:
    if not account_id or not ACCOUNT_ID_PATTERN.fullmatch(account_id):
        raise InvalidUpload(
            "account_id must be 1-64 characters of letters, digits, '_' or '-'", problem="invalid"
        )
    return account_id


@dataclass(frozen=True, slots=True)
class RequestShape:
    """What a job request is, known from its fields, sizes and magic bytes alone."""

    account_id: str
    kind: JobKind
    style: str
    resolution_px: int
    country: str | None
    is_video: list[bool]  # per file


def check_request_shape(*, account_id: str | None, kind: str | None, style: str | None,
                        resolution_px: int | None, files: list[bytes], settings: Settings,
                        country: str | None = None,
                        declared: list[str | None] | None = None) -> RequestShape:
    """The cheap checks, before any decoder sees a byte (the ingress runs them): fields,
    file count, each file's size and what its magic bytes say it is (photo or video)
    against what its part header claims, photos vs one video, the kind vs the media."""
    account = check_account_id(account_id)
    user_country = check_country(country)
    if kind not in JOB_KINDS:
        raise InvalidUpload(f"kind {kind!r} is unknown; use one of {', '.join(JOB_KINDS)}",
                            problem="invalid")
    if style not in settings.styles.styles:
        known = ", ".join(sorted(settings.styles.styles))
        raise InvalidUpload(f"style {style!r} is unknown; use one of {known}", problem="invalid")
    service = settings.service
    resolution = service.default_resolution_px if resolution_px is None else resolution_px
    if resolution not in service.allowed_resolutions_px:
        raise InvalidUpload(
            f"resolution_px {resolution} is not offered; use one of "
            f"{service.allowed_resolutions_px}", problem="invalid")
    if not files:
        raise InvalidUpload("no files were sent; select at least one photo", problem="malformed")
    if len(files) > service.max_files_per_job:
        raise InvalidUpload(
            f"{len(files)} files were sent; at most {service.max_files_per_job} per job",
            problem="too_large")
    claims = declared or [None] * len(files)
    is_video = [check_file_shape(data, index=i, limits=service, declared=claim)
                for i, (data, claim) in enumerate(zip(files, claims, strict=True), 1)]
    if any(is_video) and len(files) > 1:
        raise InvalidUpload("a job takes photos or one video, not several files with a video",
                            problem="invalid")
    if any(is_video) and kind != JobKind.ART_STYLE:
        raise InvalidUpload(f"kind {kind} takes photos; send a video with kind art_style",
                            problem="invalid")
    if kind == JobKind.ANIMATE and len(files) != 1:
        raise InvalidUpload("kind animate takes exactly one photo", problem="invalid")
    return RequestShape(account_id=account, kind=JobKind(kind), style=style,
                        resolution_px=resolution, country=user_country, is_video=is_video)


def check_job_request(*, account_id: str | None, kind: str | None, style: str | None,
                      resolution_px: int | None, files: list[bytes],
                      settings: Settings, country: str | None = None,
                      declared: list[str | None] | None = None,
                      decode: Decoder | None = None) -> JobRequest:
    """Validate every field and every file; raises InvalidUpload naming the first problem.

    Cheapest first: the request's shape (``check_request_shape``), then what the photos'
    headers declare (a pixel budget for the request), then each file decoded, stripped
    and re-encoded by ``decode`` (the media pool passes its sandbox; default: in this
    process), within a CPU budget for the whole request."""
    shape = check_request_shape(account_id=account_id, kind=kind, style=style,
                                resolution_px=resolution_px, files=files, settings=settings,
                                country=country, declared=declared)
    service = settings.service
    budget = sum(declared_pixels(data) for data in files)
    if budget > service.max_request_pixels:
        raise InvalidUpload(f"the files declare {budget} pixels together, over the "
                            f"per-request limit of {service.max_request_pixels}; send fewer "
                            "or smaller photos", problem="too_large")
    decode = decode or decode_in_process(service)
    claims = declared or [None] * len(files)
    media: list[CleanImage | CleanVideo] = []
    cpu_left_s = service.request_decode_cpu_s
    wall_end = time.monotonic() + service.request_decode_wall_s
    for i, (data, claim) in enumerate(zip(files, claims, strict=True), 1):
        wall_left_s = wall_end - time.monotonic()
        if cpu_left_s <= 0 or wall_left_s <= 0:
            raise InvalidUpload(
                f"the files need more than {service.request_decode_cpu_s:g} s of CPU or "
                f"{service.request_decode_wall_s:g} s in all to decode (request_decode_cpu_s, "
                "request_decode_wall_s); send fewer or smaller files", problem="too_large")
        report = decode(data, index=i, declared=claim, cpu_s=cpu_left_s, wall_s=wall_left_s)
        cpu_left_s -= report.cpu_s
        if report.error is not None:
            raise report.error
        assert report.media is not None
        media.append(report.media)
    videos = [m for m in media if isinstance(m, CleanVideo)]
    images = [m for m in media if isinstance(m, CleanImage)]
    if len(videos) != sum(shape.is_video):  # the decoder and the magic bytes disagree
        raise InvalidUpload("a file is not what its first bytes say it is",
                            problem="unsupported_media")
    return JobRequest(account_id=shape.account_id, kind=shape.kind, style=shape.style,
                      resolution_px=shape.resolution_px, images=images, country=shape.country,
                      video=videos[0] if videos else None)


def decode_in_process(limits: ServiceConfig) -> Decoder:
    """A decoder that runs ``check_media`` in this process (unit tests, tools): no sandbox,
    so no memory or CPU limit beyond the checks themselves."""
    def decode(data: bytes, *, index: int, declared: str | None, cpu_s: float | None = None,
               wall_s: float | None = None) -> DecodeReport:
        started = time.process_time()
        try:
            media = check_media(data, index=index, limits=limits, declared=declared)
        except InvalidUpload as exc:
            return DecodeReport(None, exc, time.process_time() - started, 0)
        return DecodeReport(media, None, time.process_time() - started, 0)
    return decode


@dataclass(frozen=True, slots=True)
class Upload:
    """A job request as the ingress hands it to the media pool: the form's fields, the
    files' bytes (in memory), the device key, and the id and ingress the job will carry."""

    account_id: str | None
    kind: str | None
    style: str | None
    resolution_px: int | None
    country: str | None
    files: list[bytes] = field(repr=False)
    declared: list[str | None]
    device_key: bytes = field(repr=False)
    job_id: str
    ingress_id: str


@dataclass(frozen=True, slots=True)
class IngestOutcome:
    """The media pool's answer: the accepted job's work item, or why it was refused (an
    EphemeraError for the ingress to raise: 4xx, 429, 503)."""

    item: WorkItem | None = field(default=None, repr=False)
    error: EphemeraError | None = None


def ingest_upload(upload: Upload, decode: Decoder, stores: StoreSet, jobs: JobStore,
                  settings: Settings) -> IngestOutcome:
    """The media pool's work on one request: every check and decode (``check_job_request``
    with the pool's sandbox), then the job registered and its ciphertext stored
    (``accept_job``). Never raises for what the request holds."""
    try:
        request = check_job_request(
            account_id=upload.account_id, kind=upload.kind, style=upload.style,
            resolution_px=upload.resolution_px, files=upload.files, settings=settings,
            country=upload.country, declared=upload.declared, decode=decode)
        _, item = accept_job(request, upload.device_key, stores, jobs, settings,
                             job_id=upload.job_id, ingress_id=upload.ingress_id)
    except EphemeraError as exc:
        return IngestOutcome(error=exc)
    return IngestOutcome(item=item)


def new_job_id() -> str:
    return uuid.uuid4().hex


def accept_job(request: JobRequest, device_key: bytes, stores: StoreSet, jobs: JobStore,
               settings: Settings, *, job_id: str | None = None,
               ingress_id: str = "") -> tuple[JobRecord, WorkItem]:
    """Register the job (as ``job_id``, or a new id), store its encrypted inputs in the
    region nearest the user, and return the record and work item. ``ingress_id``: the
    replica storing it, whose lease keeps the job alive until a runner claims it.

    Raises StorageError after undoing everything if the store fails part-way.
    """
    store = stores.for_inputs(request.country)
    job_id = job_id or new_job_id()
    now = time.time()
    payloads = request.payloads
    uris = [object_uri(store, input_key(job_id, uuid.uuid4().hex)) for _ in payloads]
    num_frames = request.num_frames(settings)
    records = [
        RetentionRecord(uri=u, object_class=ObjectClass.INPUT, account_id=request.account_id,
                        job_id=job_id, created_s=now,
                        deadline_s=deadline_for(ObjectClass.INPUT, now, settings.retention),
                        provider=store.provider, region=store.region, bucket=store.bucket)
        for u in uris
    ]
    job = JobRecord(job_id=job_id, account_id=request.account_id, kind=request.kind,
                    style=request.style, resolution_px=request.resolution_px, status=JobStatus.QUEUED,
                    created_s=now, updated_s=now, input_uris=uris, frames_total=num_frames,
                    ingress_id=ingress_id)
    jobs.create_job(job, records, max_in_flight=settings.service.max_jobs_in_flight_per_account)
    try:
        for uri, payload in zip(uris, payloads, strict=True):
            store.put(key_from_uri(store, uri), crypto.encrypt(payload, device_key, uri=uri),
                      customer_key=device_key)
    except StorageError:
        _undo(job_id, uris, records, store, jobs)
        raise
    item = WorkItem(job_id=job_id, account_id=request.account_id, kind=request.kind,
                    style=request.style, resolution_px=request.resolution_px,
                    input_uris=tuple(uris), device_key=device_key,
                    seed=secrets.randbelow(2**31),
                    deadline_s=now + settings.service.job_timeout_s,
                    cost_units=job_cost_units(
                        1 if request.kind in (JobKind.AI_PHOTO, JobKind.ANIMATE) or num_frames
                        else len(request.images),
                        request.resolution_px,
                        reference_resolution_px=settings.batching.reference_resolution_px,
                        num_frames=min(num_frames, settings.batching.video_chunk_frames) or 1),
                    num_frames=num_frames, fps=request.fps(settings),
                    video_input=request.video is not None, accepted_s=now,
                    country=request.country or "")
    return job, item


def _undo(job_id: str, uris: list[str], records: list[RetentionRecord], store: ObjectStore,
          jobs: JobStore) -> None:
    """After a failed write: delete what may exist; forget the job only if all is verified
    gone. Otherwise the job ends failed and keeps its records (due at once), so the sweep
    deletes the objects once the store is back."""
    try:
        for uri in uris:
            delete_verified(store, key_from_uri(store, uri))
    except StorageError:
        jobs.finish_job(job_id, ok=False, reason=Reason.STORE_FAILED_ON_UPLOAD)
        return
    jobs.discard_job(job_id, records)


def withdraw_job(job_id: str, stores: StoreSet, jobs: JobStore) -> None:
    """Take back an accepted job that no runner could take: delete its inputs, verified,
    then its records, as if it had never been accepted."""
    records = jobs.ledger.records_for_job(job_id)
    try:
        for rec in records:
            store, key = stores.locate(rec.uri)
            delete_verified(store, key)
    except StorageError:
        jobs.finish_job(job_id, ok=False, reason=Reason.AT_CAPACITY)
        return
    jobs.discard_job(job_id, records)
