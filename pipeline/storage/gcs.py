"""Google Cloud Storage (google-cloud-storage): one bucket per region.

Retries timeouts, 429 and 5xx with exponential backoff and full jitter, then raises
StorageError (the client library's own retry is turned off, so this is the only one).
An upload is atomic (a resumable one is only visible once finalised), so a failed write
leaves no partial object. Inputs and face data may also carry CSEK under the device key.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import requests
from google.api_core import exceptions as gexc
from google.cloud import storage

from pipeline.core.config import GcsConfig
from pipeline.core.errors import StorageError, WrongKey
from pipeline.core.retry import RetryPolicy, retry_call
from pipeline.security.crypto import provider_key

T = TypeVar("T")
_RETRYABLE = (gexc.ServerError, gexc.TooManyRequests, requests.ConnectionError,
              requests.Timeout)


def gcs_client(cfg: GcsConfig) -> storage.Client:
    if cfg.endpoint_url:
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project=cfg.project, credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": cfg.endpoint_url})
    return storage.Client(project=cfg.project)


def open_gcs_stores(cfg: GcsConfig, client: storage.Client | None = None) -> dict[str, GcsObjectStore]:
    client = client or gcs_client(cfg)
    return {region: GcsObjectStore(cfg, client, bucket, region)
            for region, bucket in cfg.buckets.items()}


class GcsObjectStore:
    provider = "gcp"

    def __init__(self, cfg: GcsConfig, client: storage.Client, bucket: str, region: str, *,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.cfg = cfg
        self.client = client
        self.bucket = bucket
        self.region = region
        self.url = f"gs://{bucket}"
        self._bucket = client.bucket(bucket)
        self._sleep = sleep

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return retry_call(fn, policy=RetryPolicy(max_tries=self.cfg.max_attempts),
                              retryable=lambda exc: isinstance(exc, _RETRYABLE),
                              sleep=self._sleep)
        except _RETRYABLE as exc:
            raise StorageError(f"GCS {what} failed ({type(exc).__name__}) after "
                               f"{self.cfg.max_attempts} attempts") from None

    def _blob(self, key: str, customer_key: bytes | None = None) -> storage.Blob:
        # The provider gets its own subkey, never the one of the ciphertext inside.
        use_key = provider_key(customer_key) if self.cfg.csek_inputs and customer_key else None
        return self._bucket.blob(key, encryption_key=use_key)

    def put(self, key: str, data: bytes, *, customer_key: bytes | None = None) -> None:
        blob = self._blob(key, customer_key)
        try:
            self._call("put", lambda: blob.upload_from_string(
                data, content_type="application/octet-stream", timeout=self.cfg.timeout_s,
                retry=None))
        except gexc.GoogleAPICallError as exc:
            raise StorageError(f"GCS put refused ({exc.code})") from None

    def get(self, key: str, *, customer_key: bytes | None = None) -> bytes:
        blob = self._blob(key, customer_key)
        try:
            return self._call("get", lambda: blob.download_as_bytes(
                timeout=self.cfg.timeout_s, retry=None))
        except gexc.NotFound:
            raise StorageError("object not found") from None
        except gexc.BadRequest as exc:
            if self.cfg.csek_inputs and customer_key:
                raise WrongKey("the stored object did not decrypt with this device key (CSEK);"
                               " upload again from the device that holds the key") from None
            raise StorageError(f"GCS get refused ({exc.code})") from None
        except gexc.GoogleAPICallError as exc:
            raise StorageError(f"GCS get refused ({exc.code})") from None

    def exists(self, key: str) -> bool:
        try:
            return self._call("head", lambda: self._bucket.blob(key).exists(
                timeout=self.cfg.timeout_s, retry=None))
        except gexc.GoogleAPICallError as exc:
            raise StorageError(f"GCS head refused ({exc.code})") from None

    def delete(self, key: str) -> None:
        try:
            self._call("delete", lambda: self._bucket.blob(key).delete(
                timeout=self.cfg.timeout_s, retry=None))
        except gexc.NotFound:
            return  # already gone: deletes are idempotent
        except gexc.GoogleAPICallError as exc:
            raise StorageError(f"GCS delete refused ({exc.code})") from None

    def list_keys(self, prefix: str) -> list[str]:
        return sorted(self._call("list", lambda: [
            b.name for b in self.client.list_blobs(self.bucket, prefix=prefix, retry=None,
                                                   timeout=self.cfg.timeout_s)]))

    def signed_url(self, key: str, ttl_s: int) -> str | None:
        return None  # outputs live on S3 (policy); inputs are never handed out
