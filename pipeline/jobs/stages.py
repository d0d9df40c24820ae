"""The GPU stages as plain functions over batches of WorkItems.

Each stage reads its inputs from the store, decrypts them in memory with the job's device
key, runs one batched model call, and writes what the next stage needs back to the store
(encrypted face data, or outputs). Only small records travel between stages, so plaintext
media never enter Ray's object store (which could spill them to disk).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Protocol

import numpy as np

from pipeline.core.config import RetentionConfig, Settings
from pipeline.core.errors import StorageError, WrongKey
from pipeline.core.reasons import Reason
from pipeline.core.records import (
    FaceBatch,
    FaceProblem,
    FaceRejection,
    JobKind,
    ObjectClass,
    OutputRecord,
    RetentionRecord,
    StageResult,
    WorkItem,
)
from pipeline.jobs import clips
from pipeline.media.ingest import decode_clean_png, encode_output
from pipeline.models.diffusion import FACE_EMBEDDING_DIM, GenerationParams
from pipeline.models.faces import (
    DEFAULT_QUALITY,
    FaceDetector,
    FaceEmbedder,
    FaceQuality,
    embed_faces,
    mean_identity,
)
from pipeline.retention.purge import store_with_inputs
from pipeline.security import crypto
from pipeline.state.job_store import JobStore
from pipeline.storage.base import (
    ObjectStore,
    StoreSet,
    delete_verified,
    key_from_uri,
    object_uri,
    output_key,
)

log = logging.getLogger(__name__)


class Generator(Protocol):
    """What the diffusion stage needs of a model: DiffusionGenerator, or the benchmarks'
    SimulatedGenerator."""

    def ai_photos(self, face_embeddings: np.ndarray, params: GenerationParams,
                  seeds: list[int]) -> np.ndarray: ...

    def art_styles(self, images: list[np.ndarray], params: GenerationParams,
                   seeds: list[int]) -> np.ndarray: ...

    def clip(self, frames: list[np.ndarray], params: GenerationParams, seed: int,
             size_px: tuple[int, int]) -> np.ndarray: ...


class _ItemFailed(Exception):
    def __init__(self, reason: str, *, retryable: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


def _read_plain(stores: StoreSet, uri: str, key: bytes) -> bytes:
    try:
        store, object_key = stores.locate(uri)
        return crypto.decrypt(store.get(object_key, customer_key=key), key, uri=uri)
    except WrongKey as exc:
        raise _ItemFailed(str(exc), retryable=False) from None
    except StorageError as exc:
        log.warning("reading a job object failed: %s", exc)  # the error names no content
        raise _ItemFailed(Reason.STORE_UNAVAILABLE, retryable=True) from None


def _read_images(stores: StoreSet, item: WorkItem) -> list[np.ndarray]:
    return [decode_clean_png(_read_plain(stores, u, item.device_key)) for u in item.input_uris]


def run_isolating_failures(stage: Callable[[list[WorkItem]], list[StageResult]],
                           items: list[WorkItem]) -> list[StageResult]:
    """Run ``stage`` on the batch; if it raises, run each job alone, so one bad photo fails
    only its own job (as retryable: the runner's attempt count still bounds it)."""
    try:
        return stage(items)
    except Exception:
        if len(items) == 1:
            raise
    results = []
    for item in items:
        try:
            results += stage([item])
        except Exception as exc:
            log.warning("a job failed alone in its stage: %s", type(exc).__name__)
            results.append(StageResult(item.job_id, ok=False, retryable=True,
                                       reason=Reason.UNPROCESSABLE))
    return results


def face_stage(items: list[WorkItem], stores: StoreSet, jobs: JobStore,
               detector: FaceDetector, embedder: FaceEmbedder,
               retention: RetentionConfig, quality: FaceQuality = DEFAULT_QUALITY
               ) -> list[StageResult]:
    """Detect, align and embed the face in every input of every job in one batch.

    Stores one encrypted identity embedding per job (class ``face_data``, registered in the
    ledger before it is written) and returns its URI. A job with an input holding no face
    fails with a reason naming that input.
    """
    results: dict[str, StageResult] = {}
    photos: dict[str, list[np.ndarray]] = {}
    for item in items:
        try:
            photos[item.job_id] = _read_images(stores, item)
        except _ItemFailed as exc:
            results[item.job_id] = StageResult(item.job_id, ok=False, reason=exc.reason,
                                               retryable=exc.retryable)
    readable = [item for item in items if item.job_id not in results]
    identities = identify_jobs([it.job_id for it in readable],
                               [photos[it.job_id] for it in readable], detector, embedder,
                               quality)
    for item, identity in zip(readable, identities, strict=True):
        if isinstance(identity, str):
            results[item.job_id] = StageResult(item.job_id, ok=False, reason=identity)
            continue
        face_data = identity.tobytes()
        try:
            uri = store_with_inputs(stores, jobs, item, face_data, ObjectClass.FACE_DATA,
                                    retention)
        except StorageError:
            results[item.job_id] = StageResult(item.job_id, ok=False, retryable=True,
                                               reason=Reason.STORE_UNAVAILABLE)
            continue
        results[item.job_id] = StageResult(item.job_id, ok=True, face_uri=uri)
    return [results[item.job_id] for item in items]


def identify_jobs(job_ids: list[str], photos: list[list[np.ndarray]], detector: FaceDetector,
                  embedder: FaceEmbedder, quality: FaceQuality = DEFAULT_QUALITY
                  ) -> list[np.ndarray | str]:
    """The identity of each job from its photos (at least one each), as the face stage and
    the offline evaluation (pipeline/jobs/evaluation.py) both compute it.

    Every photo of every job goes through one ``embed_faces`` call (detect, align, check,
    embed); a job's embeddings are averaged into one (512,) float32 identity
    (``mean_identity``). A job with a photo that gives no identity gets instead the reason
    the user reads (``face_failure_reason``), naming its first such photo.
    """
    owners = [(n, index) for n, images in enumerate(photos)
              for index in range(1, len(images) + 1)]
    batch = embed_faces(FaceBatch(job_ids=[job_ids[n] for n, _ in owners],
                                  images=[image for images in photos for image in images]),
                        detector, embedder, quality)
    found: list[list[np.ndarray]] = [[] for _ in photos]
    reasons: dict[int, str] = {}
    for (n, index), emb, rejection in zip(owners, batch.embeddings, batch.rejections,
                                          strict=True):
        if n in reasons:
            continue
        if emb is None:
            reasons[n] = face_failure_reason(index, rejection)
            continue
        found[n].append(emb)
    return [reasons[n] if n in reasons else mean_identity(found[n]) for n in range(len(photos))]


def face_failure_reason(file_index: int, rejection: FaceRejection | None) -> str:
    """What the user reads when a photo cannot give an identity: which file, why, and what
    to upload instead."""
    problem = rejection.problem if rejection else FaceProblem.NO_FACE
    advice = {
        FaceProblem.NO_FACE: "ai_photo needs a clear, front-facing photo of one person",
        FaceProblem.TOO_SMALL: "upload a closer photo, or one cropped around the face",
        FaceProblem.BLURRED: "upload a sharper, well-lit photo of the face",
    }[problem]
    detail = rejection.detail if rejection else "no human face was found"
    return f"file {file_index}: {detail}; {advice}"


def generation_params(item: WorkItem, settings: Settings) -> GenerationParams:
    return style_params(item.style, item.resolution_px, settings)


def style_params(style_name: str, resolution_px: int, settings: Settings) -> GenerationParams:
    """What one (style, resolution) batch is generated with: styles.yaml and models.yaml."""
    style = settings.styles.styles[style_name]
    return GenerationParams(
        prompt=style.prompt, resolution_px=resolution_px,
        num_inference_steps=settings.models.num_inference_steps,
        guidance_scale=style.guidance_scale, strength=style.strength,
        face_scale=style.face_scale,
    )


def generate(kind: JobKind, sources: list[np.ndarray], params: GenerationParams,
             seeds: list[int], generator: Generator) -> np.ndarray:
    """One model call for a batch of one kind, as the diffusion stage and the offline
    evaluation both make it: ai_photo from (512,) identities, art_style from (H, W, 3)
    images; one seed and one (resolution, resolution, 3) uint8 image per source."""
    if kind == JobKind.AI_PHOTO:
        return generator.ai_photos(np.stack(sources), params, seeds)
    if kind == JobKind.ART_STYLE:
        return generator.art_styles(sources, params, seeds)
    raise ValueError(f"kind {kind} makes clips: use clip_chunk_stage")


def diffusion_stage(items: list[WorkItem], stores: StoreSet, jobs: JobStore,
                    generator: Generator, settings: Settings) -> list[StageResult]:
    """Generate for a batch of jobs sharing one batch key, then run the output stage.

    ai_photo: one image per job from its face embedding. art_style: one image per input.
    """
    if len({it.batch_key for it in items}) != 1:
        raise ValueError("a diffusion batch must share one (kind, style, resolution) key")
    if items[0].is_clip:
        return [clip_chunk_stage(item, stores, jobs, generator, settings) for item in items]
    params = generation_params(items[0], settings)
    failed: dict[str, StageResult] = {}
    sources: list[tuple[WorkItem, np.ndarray]] = []
    for item in items:
        try:
            if item.kind == JobKind.AI_PHOTO:
                if item.face_uri is None:
                    raise _ItemFailed(Reason.NO_FACE_DATA, retryable=False)
                raw = _read_plain(stores, item.face_uri, item.device_key)
                sources.append((item, np.frombuffer(raw, dtype=np.float32).reshape(FACE_EMBEDDING_DIM)))
            else:
                sources.extend((item, image) for image in _read_images(stores, item))
        except _ItemFailed as exc:
            failed[item.job_id] = StageResult(item.job_id, ok=False, reason=exc.reason,
                                              retryable=exc.retryable)
    sources = [(it, x) for it, x in sources if it.job_id not in failed]
    generated: np.ndarray | list = []
    if sources:
        seeds = [it.seed + n for n, (it, _) in enumerate(sources)]
        generated = generate(items[0].kind, [x for _, x in sources], params, seeds, generator)
    per_job: dict[str, list[np.ndarray]] = {}
    for (item, _), image in zip(sources, generated, strict=True):
        per_job.setdefault(item.job_id, []).append(image)
    results = []
    for item in items:
        if item.job_id in failed:
            results.append(failed[item.job_id])
            continue
        if jobs.is_finished(item.job_id):  # timed out or account deleted meanwhile
            results.append(StageResult(item.job_id, ok=False, reason=Reason.ENDED))
            continue
        try:
            output_ids = store_outputs(item, per_job[item.job_id], stores.outputs, jobs,
                                       settings.service.output_format)
        except JobEnded:
            results.append(StageResult(item.job_id, ok=False, reason=Reason.ENDED))
            continue
        except StorageError as exc:
            log.warning("storing outputs failed: %s", exc)
            results.append(StageResult(item.job_id, ok=False, retryable=True,
                                       reason=Reason.STORE_UNAVAILABLE))
            continue
        results.append(StageResult(item.job_id, ok=True, output_ids=tuple(output_ids)))
    return results


def clip_chunk_stage(item: WorkItem, stores: StoreSet, jobs: JobStore, generator: Generator,
                     settings: Settings) -> StageResult:
    """One chunk of a clip (pipeline/jobs/clips.py): generate its frames; store them, or, for the
    last chunk, assemble the clip and its poster and run the output stage."""
    start, stop = clips.chunk_range(item, settings.batching.video_chunk_frames)
    try:
        plain = _read_plain(stores, item.input_uris[0], item.device_key)
        earlier = [clips.unpack_frames(_read_plain(stores, u, item.device_key))
                   for u in item.work_uris] if stop >= item.num_frames else []
    except _ItemFailed as exc:
        return StageResult(item.job_id, ok=False, reason=exc.reason, retryable=exc.retryable)
    frames = clips.source_frames(plain, item, start, stop)
    height_px, width_px = frames[0].shape[:2]
    size = clips.clip_size_px(height_px, width_px, item.resolution_px)
    made = generator.clip(frames, clips.clip_params(item, settings), item.seed, size)
    if jobs.is_finished(item.job_id):
        return StageResult(item.job_id, ok=False, reason=Reason.ENDED)
    try:
        if stop < item.num_frames:
            work_uri = clips.store_chunk(stores, jobs, item, made, settings)
            return StageResult(item.job_id, ok=True, frames_done=stop, work_uri=work_uri)
        blobs = clips.encode_clip(np.concatenate([*earlier, made]), item.fps,
                                  settings.service.video_output_format,
                                  settings.service.output_format)
        output_ids = store_encoded_outputs(item, blobs, stores.outputs, jobs)
    except JobEnded:
        return StageResult(item.job_id, ok=False, reason=Reason.ENDED)
    except StorageError as exc:
        log.warning("storing a clip failed: %s", exc)
        return StageResult(item.job_id, ok=False, retryable=True,
                           reason=Reason.STORE_UNAVAILABLE)
    return StageResult(item.job_id, ok=True, frames_done=stop, output_ids=tuple(output_ids))


class JobEnded(Exception):
    """The job ended or its account was deleted while its outputs were being written."""


PENDING_OUTPUT_TTL_S = 3600.0  # an output written but never indexed is purged after this


def store_outputs(item: WorkItem, images: list[np.ndarray], store: ObjectStore, jobs: JobStore,
                  output_format: str) -> list[str]:
    """Encode images in ``output_format`` and store them (``store_encoded_outputs``)."""
    blobs = [(*encode_output(image, output_format), output_format) for image in images]
    return store_encoded_outputs(item, blobs, store, jobs)


def store_encoded_outputs(item: WorkItem, blobs: list[tuple[bytes, str, str]],
                          store: ObjectStore, jobs: JobStore) -> list[str]:
    """Output stage: encode, store under the account, add to the account's output index.

    Each output gets a pending retention record before it is written, dropped when it is
    indexed, so no output object exists unaccounted for. All or nothing per job: if a
    write fails, or the job or account was deleted meanwhile, what was written is deleted.
    """
    written: list[tuple[OutputRecord, RetentionRecord]] = []
    try:
        for data, media_type, extension in blobs:
            output_id = uuid.uuid4().hex
            key = output_key(item.account_id, output_id, extension)
            now = time.time()
            out = OutputRecord(output_id=output_id, account_id=item.account_id,
                               job_id=item.job_id, uri=object_uri(store, key),
                               media_type=media_type, created_s=now, provider=store.provider,
                               region=store.region, bucket=store.bucket,
                               size_bytes=len(data))
            pending = RetentionRecord(uri=out.uri, object_class=ObjectClass.OUTPUT,
                                      account_id=item.account_id, job_id=item.job_id,
                                      created_s=now, deadline_s=now + PENDING_OUTPUT_TTL_S,
                                      provider=store.provider, region=store.region,
                                      bucket=store.bucket)
            jobs.ledger.register([pending])
            written.append((out, pending))
            store.put(key, data)
        indexed = [out.output_id for out, pending in written if jobs.add_output(out, pending)]
    except StorageError:
        _drop_outputs(written, store, jobs)
        raise
    if len(indexed) != len(written):  # the job or the account was deleted meanwhile
        _drop_outputs(written, store, jobs)
        raise JobEnded()
    return indexed


def _drop_outputs(written: list[tuple[OutputRecord, RetentionRecord]], store: ObjectStore,
                  jobs: JobStore) -> None:
    for out, pending in written:
        jobs.remove_output(out)
        try:
            delete_verified(store, key_from_uri(store, out.uri))
        except StorageError:
            continue  # the pending record stays: the sweep deletes it at its deadline
        jobs.ledger.complete(pending)
