"""The model store: weights in a local folder, ``s3://bucket/prefix`` or ``gs://bucket/prefix``,
each model with a manifest of its files' sha256; GPU nodes fetch once into a local cache
and verify every byte before a model is loaded.

  stage_model(src, dest)   copy a save_pretrained folder (or one file) into the store and
                           write ``manifest.json``; returns the manifest
  fetch_model(location)    the local path of a verified copy, downloading what the cache
                           lacks; refuses a hash mismatch with a ModelStoreError

``models.yaml`` may pin the manifest's own sha256 (``*_sha256``), so a node refuses a model
that someone changed in the bucket. Weights are public model files, never user media.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.core.config import GcsConfig, S3Config, StorageConfig
from pipeline.core.errors import ModelError, StorageError
from pipeline.storage.base import LocalObjectStore, ObjectStore

MANIFEST = "manifest.json"
COMPLETE = ".verified"


class ModelStoreError(ModelError):
    """A model is missing, incomplete or does not match its hashes."""


@dataclass(frozen=True, slots=True)
class ModelFile:
    path: str  # relative, with "/"
    sha256: str
    size_bytes: int


@dataclass(frozen=True, slots=True)
class Manifest:
    files: tuple[ModelFile, ...]

    def to_json(self) -> bytes:
        return json.dumps({"files": [asdict(f) for f in self.files]}, indent=1,
                          sort_keys=True).encode()

    @property
    def sha256(self) -> str:
        """The hash that models.yaml pins: it covers every file's hash and path."""
        return hashlib.sha256(self.to_json()).hexdigest()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        try:
            raw = json.loads(data)
            return cls(tuple(ModelFile(**f) for f in raw["files"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelStoreError(f"{MANIFEST} is not a model manifest ({exc})") from None


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def open_location(location: str, storage: StorageConfig) -> tuple[ObjectStore, str]:
    """The store holding ``location`` and the key prefix of the model inside it."""
    if location.startswith(("s3://", "gs://")):
        bucket, _, prefix = location[5:].partition("/")
        if not bucket:
            raise ModelStoreError(f"model location {location!r} must be scheme://bucket/prefix")
        return bucket_store(location[:2], bucket, storage), prefix.strip("/")
    return LocalObjectStore(f"file://{Path(location).resolve()}"), ""


def _key(prefix: str, path: str) -> str:
    return f"{prefix}/{path}" if prefix else path


def stage_model(src: Path, dest: str, storage: StorageConfig) -> Manifest:
    """Copy a folder (every file under it) or a single file into the store at ``dest`` and
    write its manifest last, so a reader never sees a manifest of missing files."""
    if src.is_file():
        sources = {src.name: src}
    elif src.is_dir():
        sources = {p.relative_to(src).as_posix(): p for p in sorted(src.rglob("*"))
                   if p.is_file() and not p.name.startswith(".")}
    else:
        raise ModelStoreError(f"{src} is neither a file nor a folder")
    if not sources:
        raise ModelStoreError(f"{src} holds no files")
    store, prefix = open_location(dest, storage)
    files = []
    for rel, path in sources.items():
        data = path.read_bytes()
        store.put(_key(prefix, rel), data)
        files.append(ModelFile(rel, sha256_of(data), len(data)))
    manifest = Manifest(tuple(files))
    store.put(_key(prefix, MANIFEST), manifest.to_json())
    return manifest


def fetch_model(location: str, cache_root: Path, storage: StorageConfig, *,
                expected_sha256: str | None = None) -> Path:
    """A verified local copy of the model at ``location`` (its folder; for a one-file
    model, that file). Downloads once per manifest into ``cache_root``; every file is
    checked against the manifest, and the manifest against ``expected_sha256``."""
    store, prefix = open_location(location, storage)
    try:
        manifest = Manifest.from_json(store.get(_key(prefix, MANIFEST)))
    except StorageError:
        raise ModelStoreError(f"no {MANIFEST} at {location}: stage the model with `ephemera "
                              "models stage SRC DEST` first") from None
    if expected_sha256 and manifest.sha256 != expected_sha256:
        raise ModelStoreError(f"the model at {location} has manifest sha256 {manifest.sha256}, "
                              f"but models.yaml expects {expected_sha256}; someone changed it, "
                              "or models.yaml names the wrong version")
    target = cache_root / manifest.sha256[:32]
    if not (target / COMPLETE).is_file():
        _download(store, prefix, manifest, target, location)
    if len(manifest.files) == 1 and "/" not in manifest.files[0].path:
        return target / manifest.files[0].path
    return target


def _download(store: ObjectStore, prefix: str, manifest: Manifest, target: Path,
              location: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=target.parent))
    try:
        for entry in manifest.files:
            try:
                data = store.get(_key(prefix, entry.path))
            except StorageError:
                raise ModelStoreError(f"{entry.path} is listed in the manifest at {location} "
                                      "but missing from the store") from None
            if sha256_of(data) != entry.sha256:
                raise ModelStoreError(f"{entry.path} at {location} has sha256 "
                                      f"{sha256_of(data)}, the manifest says {entry.sha256}; "
                                      "refusing a changed or corrupted weight file")
            path = staging / entry.path
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        (staging / COMPLETE).write_text(manifest.sha256)
        if target.exists():  # another process on this node won the race
            return
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def resolve_model(location: str, *, sha256: str | None, cache_dir: str,
                  storage: StorageConfig, setting: str = "the model") -> Path:
    """Where to load a model (folder or one file) from: a verified cached copy of a store
    location (s3://, gs://, or a local folder holding a manifest), else the plain local
    path as configured. ``setting`` names the models.yaml key in errors."""
    from pipeline.core.config import resolve_path

    if location.startswith(("s3://", "gs://")):
        return fetch_model(location, resolve_path(cache_dir), storage, expected_sha256=sha256)
    local = resolve_path(location)
    if (local / MANIFEST).is_file():
        return fetch_model(str(local), resolve_path(cache_dir), storage, expected_sha256=sha256)
    if sha256:
        raise ModelStoreError(f"{setting} has a sha256 pin but {location} has no "
                              f"{MANIFEST}; stage it with `ephemera models stage`")
    return local


def bucket_store(scheme: str, bucket: str, storage: StorageConfig) -> ObjectStore:
    """A store for a model bucket, with the clients (endpoint, retries) of storage.yaml."""
    if scheme == "s3":
        from pipeline.storage.s3 import S3ObjectStore

        base = storage.s3.model_dump() if storage.s3 else {"region": "us-east-1"}
        return S3ObjectStore(S3Config(**{**base, "bucket": bucket}))
    from pipeline.storage.gcs import GcsObjectStore, gcs_client

    base_gcs = storage.gcs.model_dump() if storage.gcs else {"project": "default"}
    cfg = GcsConfig(**{**base_gcs, "buckets": {"weights": bucket},
                       "country_regions": {}, "fallback_region": "weights"})
    return GcsObjectStore(cfg, gcs_client(cfg), bucket, "weights")
