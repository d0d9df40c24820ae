"""Offline evaluation: the service's face and generation stages over an operator's test set.

``ephemera eval MANIFEST --out RESULTS.parquet`` (Ray Data wiring: actors/evaluation.py)
runs three steps over the images a Parquet manifest names, each a plain function here:

1. ``identify_images`` (a face worker): read the image, check and strip it as an upload is
   (``check_upload``), and take its identity with the face stage's own ``identify_jobs``.
   An ai_photo image without a usable face fails with the reason the service gives.
2. ``generate_images`` (a diffusion worker): the diffusion stage's ``generate``, batched by
   (kind, style, resolution) and by cost as the service batches, ``num_outputs`` seeds each.
3. ``score_images`` (a face worker): the identity similarity of every output, the cosine
   between the source's ArcFace identity and the ArcFace embedding of the output's face.

The manifest (``MANIFEST_SCHEMA``), one row per image:

    image_id     string, required, unique      names the image in the results
    kind         string, required              ai_photo | art_style (clips are not evaluated)
    style        string, required              a styles.yaml style
    image_uri    string  | one of the two      file:///abs/path.png, a path relative to the
    image_bytes  binary  | per row             manifest's folder, s3://bucket/key or
                                               gs://bucket/key; or the file's bytes inline
    resolution_px int, optional                default: service.yaml default_resolution_px
    seed          int, optional                default: crc32 of image_id
    num_outputs   int, optional (1..16)        default 1; output n uses seed + n

Evaluation images are operator-owned test data, never user uploads: a manifest naming an
object in a store where storage.yaml keeps users' media (the input stores: uploads and face
data; the output store: generated photos) is refused before anything runs
(``check_manifest``).

Results (``RESULT_SCHEMA``), one row per manifest row, in manifest order: the row's
fields, ``seconds`` (its share of the workers' time: each model call's wall time split
evenly over the images in it, summed over the three steps), ``failure_reason`` (null when
it succeeded), ``identity_similarity_mean`` / ``_min`` / ``identity_similarities`` (one
per output; null/empty where the source has no face, as an art_style photo may not) and
``num_output_faces`` (outputs in which the detector found a face). An output with no
detected face is embedded whole (resized to the ArcFace crop), so a lost face lowers the
score instead of dropping out of it; ``num_output_faces`` tells the two apart.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.core.config import (
    PoolConfig,
    ServiceConfig,
    Settings,
    StorageConfig,
    resolve_path,
)
from pipeline.core.errors import InvalidUpload, StorageError
from pipeline.core.reasons import Reason
from pipeline.core.records import JobKind
from pipeline.jobs.orchestration import job_cost_units
from pipeline.jobs.stages import Generator, generate, identify_jobs, style_params
from pipeline.media.ingest import check_upload, decode_clean_png, encode_png
from pipeline.models.faces import (
    ALIGNED_SIZE_PX,
    DEFAULT_QUALITY,
    FaceDetector,
    FaceEmbedder,
    FaceQuality,
    align_face,
)
from pipeline.storage.base import ObjectStore, key_from_uri

log = logging.getLogger(__name__)

EVAL_KINDS = (JobKind.AI_PHOTO, JobKind.ART_STYLE)
MAX_OUTPUTS_PER_IMAGE = 16

MANIFEST_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("kind", pa.string()), ("style", pa.string()),
    ("image_uri", pa.string()), ("image_bytes", pa.binary()),
    ("resolution_px", pa.int32()), ("seed", pa.int64()), ("num_outputs", pa.int32()),
])
REQUIRED_COLUMNS = ("image_id", "kind", "style")

RESULT_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("kind", pa.string()), ("style", pa.string()),
    ("resolution_px", pa.int32()), ("seed", pa.int64()), ("num_outputs", pa.int32()),
    ("seconds", pa.float64()), ("failure_reason", pa.string()),
    ("identity_similarity_mean", pa.float64()), ("identity_similarity_min", pa.float64()),
    ("identity_similarities", pa.list_(pa.float64())), ("num_output_faces", pa.int32()),
])


# ---------------------------------------------------------------- records

@dataclass(frozen=True, slots=True)
class EvalImage:
    """One checked manifest row. Exactly one of ``image_uri`` and ``image_bytes`` is set;
    a URI is absolute (``file://``, ``s3://`` or ``gs://``)."""

    image_id: str
    kind: JobKind
    style: str
    resolution_px: int
    seed: int
    num_outputs: int = 1
    image_uri: str | None = None
    image_bytes: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class EvalItem:
    """One image on its way through the three steps: what each made, or why it failed."""

    image: EvalImage
    source_png: bytes | None = field(default=None, repr=False)  # checked, stripped source
    identity: np.ndarray | None = field(default=None, repr=False)  # (512,) float32
    output_pngs: tuple[bytes, ...] = field(default=(), repr=False)
    similarities: tuple[float, ...] = ()
    num_output_faces: int = 0
    reason: str | None = None  # set: failed, and later steps pass it by
    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class IdentityScore:
    """How well the outputs of one image keep its identity: one cosine per output."""

    similarities: tuple[float, ...]

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.similarities)) if self.similarities else None

    @property
    def min(self) -> float | None:
        return min(self.similarities) if self.similarities else None


def identity_similarity(identity: np.ndarray, output_embeddings: np.ndarray) -> IdentityScore:
    """The cosine between a (512,) source identity and each row of (N, 512) output face
    embeddings. Neither needs to be normalised; a zero vector scores 0."""
    source = np.asarray(identity, np.float64).reshape(-1)
    outputs = np.asarray(output_embeddings, np.float64).reshape(-1, source.size)
    norms = np.linalg.norm(outputs, axis=1) * np.linalg.norm(source)
    dots = outputs @ source
    cosines = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
    return IdentityScore(tuple(float(c) for c in np.clip(cosines, -1.0, 1.0)))


# ---------------------------------------------------------------- the manifest

def user_media_stores(storage: StorageConfig) -> dict[str, str]:
    """Where storage.yaml keeps users' media: store URL -> what it holds there."""
    found: dict[str, str] = {}
    local = f"file://{resolve_path(storage.local_root).resolve()}"
    if storage.inputs == "local":
        found[local] = "the production input store (users' uploads and face data)"
    elif storage.inputs == "s3" and storage.s3 is not None:
        found[f"s3://{storage.s3.bucket}"] = "the production input bucket (users' uploads)"
    elif storage.inputs == "gcs" and storage.gcs is not None:
        for bucket in storage.gcs.buckets.values():
            found[f"gs://{bucket}"] = "a production input bucket (users' uploads)"
    if storage.outputs == "local":
        found.setdefault(local, "the production output store (users' generated photos)")
    elif storage.s3 is not None:
        found.setdefault(f"s3://{storage.s3.bucket}",
                         "the production output bucket (users' generated photos)")
    return found


def check_image_uri(uri: str, storage: StorageConfig, *, base_dir: Path, where: str) -> str:
    """The absolute form of a manifest's ``image_uri``; refuses what is not a readable
    location and anything inside a store of users' media (``user_media_stores``)."""
    if uri.startswith(("s3://", "gs://")):
        parts = uri.split("/", 3)
        if not parts[2] or len(parts) < 4 or not parts[3]:
            raise ValueError(f"{where}: image_uri {uri!r} names no object; write "
                             "s3://bucket/key or gs://bucket/key")
        absolute = uri
    elif "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"{where}: image_uri {uri!r} is not file://, s3:// or gs://; give "
                         "a path, a file:// URI or an object store URI")
    else:
        raw = uri[len("file://"):] if uri.startswith("file://") else uri
        if uri.startswith("file://") and not raw.startswith("/"):
            raise ValueError(f"{where}: image_uri {uri!r} is not an absolute file:// URI; "
                             "write file:///absolute/path, or a path relative to the manifest")
        absolute = f"file://{(base_dir / raw).resolve()}"  # resolved: no way out by ".."
    for store_url, holds in user_media_stores(storage).items():
        if _inside(absolute, store_url):
            raise ValueError(
                f"{where}: image_uri {uri!r} lies in {store_url.split('://', 1)[1]}, {holds} "
                "named by storage.yaml; evaluation reads operator-owned test images only, "
                "never users' media: copy the test set to a bucket or folder of its own")
    return absolute


def _inside(uri: str, store_url: str) -> bool:
    if uri.startswith("file://") and store_url.startswith("file://"):
        return Path(uri[len("file://"):]).is_relative_to(store_url[len("file://"):])
    return uri.startswith(store_url.rstrip("/") + "/")


def check_manifest(table: pa.Table, settings: Settings, *, base_dir: Path) -> list[EvalImage]:
    """The manifest's rows as checked records (see the module docstring for the columns).

    Raises ValueError naming the row, the column and the value, and how to fix it: an
    unknown or missing column, a wrong type, an unknown kind or style, a resolution the
    service does not offer, a duplicate id, a row with both or neither image source, and
    any image inside a store of users' media.
    """
    unknown = sorted(set(table.column_names) - set(MANIFEST_SCHEMA.names))
    if unknown:
        raise ValueError(f"manifest column(s) {unknown} are unknown; the columns are "
                         f"{', '.join(MANIFEST_SCHEMA.names)}")
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing or not {"image_uri", "image_bytes"} & set(table.column_names):
        raise ValueError(f"the manifest lacks column(s) {missing or ['image_uri or image_bytes']}"
                         f"; it needs {', '.join(REQUIRED_COLUMNS)} and image_uri or "
                         "image_bytes")
    columns = {}
    for name in table.column_names:
        try:
            columns[name] = table.column(name).cast(MANIFEST_SCHEMA.field(name).type).to_pylist()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise ValueError(f"manifest column {name} is {table.column(name).type}; it must "
                             f"be {MANIFEST_SCHEMA.field(name).type}") from None
    images, seen = [], set()
    for n in range(table.num_rows):
        row = {name: values[n] for name, values in columns.items()}
        images.append(_check_row(row, f"manifest row {n}", settings, base_dir))
        if images[-1].image_id in seen:
            raise ValueError(f"manifest row {n}: image_id {images[-1].image_id!r} appears "
                             "twice; ids name the result rows, make them unique")
        seen.add(images[-1].image_id)
    return images


def _check_row(row: dict, where: str, settings: Settings, base_dir: Path) -> EvalImage:
    image_id = row.get("image_id")
    if not image_id:
        raise ValueError(f"{where}: image_id is empty; give every row a unique id")
    where = f"{where} ({image_id})"
    kind = row.get("kind")
    if kind not in EVAL_KINDS:
        raise ValueError(f"{where}: kind {kind!r} is not evaluated; use "
                         f"{' or '.join(EVAL_KINDS)} (clips are not evaluated)")
    style = row.get("style")
    if style not in settings.styles.styles:
        raise ValueError(f"{where}: style {style!r} is unknown; use one of "
                         f"{', '.join(sorted(settings.styles.styles))}")
    service = settings.service
    resolution = row.get("resolution_px")
    resolution = service.default_resolution_px if resolution is None else resolution
    if resolution not in service.allowed_resolutions_px:
        raise ValueError(f"{where}: resolution_px {resolution} is not offered; use one of "
                         f"{service.allowed_resolutions_px}")
    num_outputs = 1 if row.get("num_outputs") is None else row["num_outputs"]
    if not 1 <= num_outputs <= MAX_OUTPUTS_PER_IMAGE:
        raise ValueError(f"{where}: num_outputs {num_outputs} must be 1 to "
                         f"{MAX_OUTPUTS_PER_IMAGE}")
    uri, data = row.get("image_uri"), row.get("image_bytes")
    if (uri is None) == (data is None):
        raise ValueError(f"{where}: give exactly one of image_uri and image_bytes")
    seed = row.get("seed")
    return EvalImage(
        image_id=image_id, kind=JobKind(kind), style=style, resolution_px=resolution,
        seed=zlib.crc32(image_id.encode()) & 0x7FFFFFFF if seed is None else seed,
        num_outputs=num_outputs, image_bytes=data,
        image_uri=None if uri is None else check_image_uri(
            uri, settings.storage, base_dir=base_dir, where=where))


def manifest_table(images: list[EvalImage]) -> pa.Table:
    """Checked rows as a manifest (scripts/make_eval_manifest.py writes this)."""
    return pa.Table.from_pylist([_manifest_row(im) for im in images], schema=MANIFEST_SCHEMA)


def _manifest_row(im: EvalImage) -> dict:
    return {"image_id": im.image_id, "kind": str(im.kind), "style": im.style,
            "image_uri": im.image_uri, "image_bytes": im.image_bytes,
            "resolution_px": im.resolution_px, "seed": im.seed, "num_outputs": im.num_outputs}


def image_reader(storage: StorageConfig) -> Callable[[str], bytes]:
    """Reads a checked ``image_uri``: a local file, or an object through the project's own
    S3 and GCS stores (storage.yaml's endpoint, region and retry settings, another bucket).
    Opens one store per bucket, on first use."""
    stores: dict[str, ObjectStore] = {}

    def store_for(uri: str) -> ObjectStore:
        url = "/".join(uri.split("/", 3)[:3])
        if url not in stores:
            bucket = url.split("/")[2]
            if url.startswith("s3://"):
                from pipeline.storage.s3 import S3ObjectStore

                if storage.s3 is None:
                    raise StorageError("s3:// image URIs are read with storage.yaml's s3: "
                                       "settings (region, endpoint); add that section")
                stores[url] = S3ObjectStore(storage.s3.model_copy(update={"bucket": bucket}))
            else:
                from pipeline.storage.gcs import GcsObjectStore, gcs_client

                if storage.gcs is None:
                    raise StorageError("gs:// image URIs are read with storage.yaml's gcs: "
                                       "settings (project, endpoint); add that section")
                stores[url] = GcsObjectStore(storage.gcs, gcs_client(storage.gcs), bucket,
                                             region="eval")
        return stores[url]

    def read(uri: str) -> bytes:
        if uri.startswith("file://"):
            try:
                return Path(uri[len("file://"):]).read_bytes()
            except OSError as exc:
                raise StorageError(f"cannot read {uri}: {exc.strerror}") from None
        store = store_for(uri)
        return store.get(key_from_uri(store, uri))

    return read


# ---------------------------------------------------------------- the three steps

def identify_images(items: list[EvalItem], read: Callable[[str], bytes], limits: ServiceConfig,
                    detector: FaceDetector, embedder: FaceEmbedder,
                    quality: FaceQuality = DEFAULT_QUALITY) -> list[EvalItem]:
    """Step 1: each image read, checked and stripped as an upload is, and its identity
    taken as the face stage takes it (``identify_jobs``, one batch). An ai_photo image
    without a usable face fails with the service's reason; an art_style one goes on
    without an identity (its outputs are then not scored)."""
    started = time.perf_counter()
    loaded = [_load_source(item, read, limits) for item in items]
    todo = [i for i, item in enumerate(loaded) if item.reason is None]
    if todo:
        identities = identify_jobs(
            [loaded[i].image.image_id for i in todo],
            [[decode_clean_png(loaded[i].source_png or b"")] for i in todo],
            detector, embedder, quality)
        for i, identity in zip(todo, identities, strict=True):
            if not isinstance(identity, str):
                loaded[i] = replace(loaded[i], identity=identity)
            elif loaded[i].image.kind == JobKind.AI_PHOTO:
                loaded[i] = replace(loaded[i], reason=identity)
    return _charge(loaded, time.perf_counter() - started, dict.fromkeys(range(len(loaded)), 1.0))


def _load_source(item: EvalItem, read: Callable[[str], bytes], limits: ServiceConfig) -> EvalItem:
    image = item.image
    try:
        data = image.image_bytes if image.image_uri is None else read(image.image_uri)
        clean = check_upload(data or b"", index=1, limits=limits)
    except (InvalidUpload, StorageError) as exc:
        return replace(item, reason=str(exc))
    return replace(item, source_png=clean.png_bytes)


def generate_images(items: list[EvalItem], generator: Generator, settings: Settings
                    ) -> list[EvalItem]:
    """Step 2: ``num_outputs`` images per live item, through the diffusion stage's own
    ``generate``: one model call per (kind, style, resolution) group and at most
    batching.yaml's diffusion ``max_batch_cost`` per call, as the service batches. A call
    that raises is retried image by image; an image that fails alone fails with the
    service's reason."""
    out = list(items)
    for chunk in _cost_chunks(items, settings):
        started = time.perf_counter()
        try:
            made = _generate_chunk([items[i] for i in chunk], generator, settings)
        except Exception as exc:  # the model's own errors: one image may be the cause
            log.warning("an evaluation batch failed (%s); retrying image by image",
                        type(exc).__name__)
            made = []
            for i in chunk:
                try:
                    made += _generate_chunk([items[i]], generator, settings)
                except Exception as alone:
                    log.warning("an evaluation image failed alone: %s", type(alone).__name__)
                    made.append(replace(items[i], reason=Reason.UNPROCESSABLE))
        for i, item in zip(chunk, made, strict=True):
            out[i] = item
        out = _charge(out, time.perf_counter() - started,
                      {i: float(items[i].image.num_outputs) for i in chunk})
    return out


def _cost_chunks(items: list[EvalItem], settings: Settings) -> list[list[int]]:
    """Indices of the live items, grouped by batch key and cut at the cost limit."""
    groups: dict[tuple[str, str, int], list[int]] = {}
    for i, item in enumerate(items):
        if item.reason is None:
            im = item.image
            groups.setdefault((im.kind, im.style, im.resolution_px), []).append(i)
    limit = settings.batching.diffusion.max_batch_cost
    chunks: list[list[int]] = []
    for members in groups.values():
        chunk: list[int] = []
        cost = 0
        for i in members:
            im = items[i].image
            units = job_cost_units(im.num_outputs, im.resolution_px,
                                   reference_resolution_px=settings.batching.reference_resolution_px)
            if chunk and cost + units > limit:
                chunks.append(chunk)
                chunk, cost = [], 0
            chunk.append(i)
            cost += units
        chunks.append(chunk)
    return chunks


def _generate_chunk(chunk: list[EvalItem], generator: Generator, settings: Settings
                    ) -> list[EvalItem]:
    first = chunk[0].image
    sources: list[np.ndarray] = []
    seeds: list[int] = []
    for item in chunk:
        source = (item.identity if first.kind == JobKind.AI_PHOTO
                  else decode_clean_png(item.source_png or b""))
        if source is None:
            raise ValueError(f"{item.image.image_id}: ai_photo without an identity; "
                             "identify_images must run first")
        sources += [source] * item.image.num_outputs
        seeds += [item.image.seed + n for n in range(item.image.num_outputs)]
    params = style_params(first.style, first.resolution_px, settings)
    images = generate(first.kind, sources, params, seeds, generator)
    made, start = [], 0
    for item in chunk:
        stop = start + item.image.num_outputs
        made.append(replace(item, output_pngs=tuple(encode_png(x) for x in images[start:stop])))
        start = stop
    return made


def score_images(items: list[EvalItem], detector: FaceDetector, embedder: FaceEmbedder
                 ) -> list[EvalItem]:
    """Step 3: the identity similarity of every output of every live item with an identity.
    Faces are found by the service's detector and aligned to the ArcFace template; an
    output with no detected face is embedded whole. One detector and one embedder call."""
    started = time.perf_counter()
    todo = [i for i, it in enumerate(items)
            if it.reason is None and it.identity is not None and it.output_pngs]
    outputs = [decode_clean_png(png) for i in todo for png in items[i].output_pngs]
    out = list(items)
    if outputs:
        detections = detector.detect(outputs)
        crops = [align_face(image, d.landmarks_px) if d is not None else _whole(image)
                 for image, d in zip(outputs, detections, strict=True)]
        vectors = embedder.embed(np.stack(crops))
        row = 0
        for i in todo:
            count = len(items[i].output_pngs)
            identity = items[i].identity
            assert identity is not None  # todo holds items with an identity only
            score = identity_similarity(identity, vectors[row:row + count])
            found = sum(d is not None for d in detections[row:row + count])
            out[i] = replace(items[i], similarities=score.similarities, num_output_faces=found)
            row += count
    return _charge(out, time.perf_counter() - started,
                   {i: float(len(items[i].output_pngs)) for i in todo})


def _whole(image: np.ndarray) -> np.ndarray:
    size = (ALIGNED_SIZE_PX, ALIGNED_SIZE_PX)
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))


def _charge(items: list[EvalItem], elapsed_s: float, weights: dict[int, float]) -> list[EvalItem]:
    """Split one call's wall time over the items it worked on (index -> weight: the images
    each read, or made, or scored)."""
    total = sum(weights.values())
    out = list(items)
    for i, weight in weights.items():
        out[i] = replace(out[i], seconds=out[i].seconds + elapsed_s * weight / total)
    return out


# ---------------------------------------------------------------- tables between steps

ITEM_SCHEMA = pa.schema([
    *(MANIFEST_SCHEMA.field(name) for name in MANIFEST_SCHEMA.names),
    ("source_png", pa.binary()), ("identity", pa.binary()),
    ("output_pngs", pa.list_(pa.binary())), ("similarities", pa.list_(pa.float64())),
    ("num_output_faces", pa.int32()), ("reason", pa.string()), ("seconds", pa.float64()),
])


def items_to_table(items: list[EvalItem]) -> pa.Table:
    """Items as Arrow rows, for the hand-over between two steps (Ray Data blocks)."""
    return pa.Table.from_pylist([{
        **_manifest_row(it.image),
        "source_png": it.source_png,
        "identity": None if it.identity is None else it.identity.astype(np.float32).tobytes(),
        "output_pngs": list(it.output_pngs), "similarities": list(it.similarities),
        "num_output_faces": it.num_output_faces, "reason": it.reason, "seconds": it.seconds,
    } for it in items], schema=ITEM_SCHEMA)


def items_from_table(table: pa.Table) -> list[EvalItem]:
    """``items_to_table`` read back."""
    return [EvalItem(
        image=EvalImage(image_id=r["image_id"], kind=JobKind(r["kind"]), style=r["style"],
                        resolution_px=r["resolution_px"], seed=r["seed"],
                        num_outputs=r["num_outputs"], image_uri=r["image_uri"],
                        image_bytes=r["image_bytes"]),
        source_png=r["source_png"],
        identity=None if r["identity"] is None else np.frombuffer(r["identity"], np.float32),
        output_pngs=tuple(r["output_pngs"] or ()), similarities=tuple(r["similarities"] or ()),
        num_output_faces=r["num_output_faces"], reason=r["reason"], seconds=r["seconds"],
    ) for r in table.cast(ITEM_SCHEMA).to_pylist()]


def results_table(items: list[EvalItem]) -> pa.Table:
    """The result rows (``RESULT_SCHEMA``): no pixels, no embeddings."""
    rows = []
    for it in items:
        score = IdentityScore(it.similarities)
        im = it.image
        rows.append({
            "image_id": im.image_id, "kind": str(im.kind), "style": im.style,
            "resolution_px": im.resolution_px, "seed": im.seed, "num_outputs": im.num_outputs,
            "seconds": it.seconds, "failure_reason": it.reason,
            "identity_similarity_mean": score.mean, "identity_similarity_min": score.min,
            "identity_similarities": list(it.similarities),
            "num_output_faces": it.num_output_faces})
    return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


# ---------------------------------------------------------------- the summary

@dataclass(frozen=True, slots=True)
class EvalPool:
    """One step's actor pool, sized from its deployments.yaml section like the Serve pool:
    a fixed ``num_replicas`` or the autoscaling range (at least one actor), its CPUs, and
    its GPUs (fractional ones included) only where the cluster has a GPU."""

    min_size: int
    max_size: int
    num_cpus: float
    num_gpus: float

    @classmethod
    def of(cls, pool: PoolConfig, *, gpu_present: bool) -> EvalPool:
        if pool.autoscaling is not None:
            low = max(1, pool.autoscaling.min_replicas)
            high = max(low, pool.autoscaling.max_replicas)
        else:
            low = high = pool.num_replicas
        return cls(low, high, pool.num_cpus, pool.num_gpus if gpu_present else 0.0)


@dataclass(frozen=True, slots=True)
class EvalWorkers:
    """What ran an evaluation: the face pool (twice: identify and score), the diffusion pool."""

    face: EvalPool
    diffusion: EvalPool

    @property
    def num_gpus(self) -> float:
        return (2 * self.face.max_size * self.face.num_gpus
                + self.diffusion.max_size * self.diffusion.num_gpus)

    @property
    def label(self) -> str:
        return "GPU" if self.num_gpus else "CPU worker"

    @property
    def count(self) -> int:
        """GPUs (rounded up: fractional shares of one GPU count once), or CPU actors."""
        if self.num_gpus:
            return math.ceil(self.num_gpus - 1e-9)
        return 2 * self.face.max_size + self.diffusion.max_size


@dataclass(frozen=True, slots=True)
class EvalSummary:
    num_images: int
    num_failed: int
    wall_s: float
    workers: EvalWorkers
    similarity_p10: float | None
    similarity_p50: float | None
    num_scored: int
    num_outputs: int
    num_output_faces: int
    failures: dict[str, int]  # reason -> images

    @property
    def images_per_s(self) -> float:
        return self.num_images / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def failure_rate(self) -> float:
        return self.num_failed / self.num_images if self.num_images else 0.0


def summarize(results: pa.Table, wall_s: float, workers: EvalWorkers) -> EvalSummary:
    """Throughput, failure rate and the spread of per-image mean identity similarity."""
    rows = results.to_pylist()
    means = [r["identity_similarity_mean"] for r in rows
             if r["identity_similarity_mean"] is not None]
    failures: dict[str, int] = {}
    for r in rows:
        if r["failure_reason"] is not None:
            failures[r["failure_reason"]] = failures.get(r["failure_reason"], 0) + 1
    scored = [r for r in rows if r["identity_similarities"]]
    return EvalSummary(
        num_images=len(rows), num_failed=sum(failures.values()), wall_s=wall_s,
        workers=workers,
        similarity_p10=float(np.percentile(means, 10)) if means else None,
        similarity_p50=float(np.percentile(means, 50)) if means else None,
        num_scored=len(means), num_outputs=sum(len(r["identity_similarities"]) for r in scored),
        num_output_faces=sum(r["num_output_faces"] for r in scored), failures=failures)


def render_summary(summary: EvalSummary) -> str:
    w = summary.workers

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    per_worker = summary.images_per_s / w.count if w.count else 0.0
    where = (f"{w.count} GPU(s) reserved" if w.num_gpus else "no GPU") + (
        f"; actors: face {w.face.max_size}, diffusion {w.diffusion.max_size}, "
        f"scoring {w.face.max_size}")
    lines = [
        f"images: {summary.num_images}, failed {summary.num_failed} "
        f"(failure rate {summary.failure_rate:.1%}), in {summary.wall_s:.1f} s",
        f"throughput: {summary.images_per_s:.3f} images/s, {per_worker:.3f} images/s per "
        f"{w.label} ({where})",
        f"identity similarity (per-image mean, {summary.num_scored} images): "
        f"p10 {fmt(summary.similarity_p10)}, p50 {fmt(summary.similarity_p50)}; faces "
        f"found in {summary.num_output_faces} of {summary.num_outputs} outputs",
    ]
    lines += [f"failed x{n}: {reason}" for reason, n in sorted(summary.failures.items())]
    return "\n".join(lines)
