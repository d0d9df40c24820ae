"""Model weights from a configured location: a local file, or an object in a bucket
(``s3://bucket/key``, ``gs://bucket/key``) read with the storage clients of storage.yaml.

Weights are read into memory; nothing is cached on disk.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from pipeline.config import GcsConfig, S3Config, StorageConfig


def read_weights_bytes(location: str, storage: StorageConfig) -> bytes:
    """The raw bytes at ``location``; raises ValueError naming the setting when missing."""
    if location.startswith(("s3://", "gs://")):
        bucket, _, key = location[5:].partition("/")
        if not bucket or not key:
            raise ValueError(f"weights location {location!r} must be scheme://bucket/key")
        store = bucket_store(location[:2], bucket, storage)
        return store.get(key)
    path = Path(location)
    if not path.is_file():
        raise ValueError(f"face_embedder_weights {location!r} is not a file; give a state_dict "
                         "path, an s3:// or gs:// object, or 'random'")
    return path.read_bytes()


def load_state_dict(location: str, storage: StorageConfig) -> dict[str, torch.Tensor]:
    data = read_weights_bytes(location, storage)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def bucket_store(scheme: str, bucket: str, storage: StorageConfig):
    if scheme == "s3":
        from pipeline.s3_store import S3ObjectStore

        base = storage.s3.model_dump() if storage.s3 else {"region": "us-east-1"}
        return S3ObjectStore(S3Config(**{**base, "bucket": bucket}))
    from pipeline.gcs_store import GcsObjectStore, gcs_client

    base_gcs = storage.gcs.model_dump() if storage.gcs else {"project": "default"}
    cfg = GcsConfig(**{**base_gcs, "buckets": {"weights": bucket},
                       "country_regions": {}, "fallback_region": "weights"})
    return GcsObjectStore(cfg, gcs_client(cfg), bucket, "weights")
