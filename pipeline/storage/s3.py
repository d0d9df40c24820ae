"""AWS S3 (boto3): one bucket in a US region.

Retries timeouts, throttling and 5xx with exponential backoff and full jitter, then raises
StorageError. PUT is atomic in S3, so a failed write never leaves a partial object.
Inputs and face data may also carry SSE-C under the device key; outputs get server-side
encryption with a server-managed key (SSE-S3 or SSE-KMS), since every device of the
account must read them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from pipeline.core.config import S3Config
from pipeline.core.errors import StorageError, WrongKey
from pipeline.core.retry import RetryPolicy, retry_call
from pipeline.security.crypto import provider_key

T = TypeVar("T")
_RETRYABLE_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable",
                    "Throttling", "ThrottlingException", "RequestTimeTooSkewed"}


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _transient(exc: BaseException) -> bool:
    """Worth another try: 5xx, throttling, timeouts and connection errors."""
    if isinstance(exc, ClientError):
        return _status(exc) >= 500 or _code(exc) in _RETRYABLE_CODES
    return isinstance(exc, BotoCoreError)


def _failure(exc: ClientError | BotoCoreError) -> str:
    if isinstance(exc, ClientError):
        return _code(exc) or str(_status(exc))
    return type(exc).__name__


class S3ObjectStore:
    provider = "aws"

    def __init__(self, cfg: S3Config, *, client=None, sleep: Callable[[float], None] = time.sleep):
        self.cfg = cfg
        self.bucket = cfg.bucket
        self.region = cfg.region
        self.url = f"s3://{cfg.bucket}"
        self._sleep = sleep
        self.client = client or boto3.client(
            "s3", region_name=cfg.region, endpoint_url=cfg.endpoint_url,
            config=Config(connect_timeout=cfg.timeout_s, read_timeout=cfg.timeout_s,
                          retries={"total_max_attempts": 1},  # ours below, with jitter
                          s3={"addressing_style": "path"} if cfg.endpoint_url else None),
        )

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return retry_call(fn, policy=RetryPolicy(max_tries=self.cfg.max_attempts),
                              retryable=_transient, sleep=self._sleep)
        except (ClientError, BotoCoreError) as exc:
            if not _transient(exc):
                raise  # a refusal: the caller says what it means
            raise StorageError(f"S3 {what} failed ({_failure(exc)}) after "
                               f"{self.cfg.max_attempts} attempts") from None

    def _sse_c(self, customer_key: bytes | None) -> dict:
        if customer_key is None or not self.cfg.sse_c_inputs:
            return {}
        # The provider gets its own subkey, never the one of the ciphertext inside.
        return {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": provider_key(customer_key)}

    def put(self, key: str, data: bytes, *, customer_key: bytes | None = None) -> None:
        extra = self._sse_c(customer_key)
        if not extra and self.cfg.output_encryption != "none":
            extra = {"ServerSideEncryption": self.cfg.output_encryption}
        try:
            self._call("put", lambda: self.client.put_object(
                Bucket=self.bucket, Key=key, Body=data, **extra))
        except ClientError as exc:
            raise StorageError(f"S3 put refused ({_code(exc)})") from None

    def get(self, key: str, *, customer_key: bytes | None = None) -> bytes:
        try:
            response = self._call("get", lambda: self.client.get_object(
                Bucket=self.bucket, Key=key, **self._sse_c(customer_key)))
            return response["Body"].read()
        except ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404"):
                raise StorageError("object not found") from None
            if self._sse_c(customer_key) and _status(exc) in (400, 403):
                raise WrongKey("the stored object did not decrypt with this device key "
                               "(SSE-C); upload again from the device that holds the key") from None
            raise StorageError(f"S3 get refused ({_code(exc)})") from None

    def exists(self, key: str) -> bool:
        try:
            self._call("head", lambda: self.client.head_object(Bucket=self.bucket, Key=key))
            return True
        except ClientError as exc:
            if _status(exc) == 404:
                return False
            if _status(exc) == 400 and self.cfg.sse_c_inputs:  # SSE-C: HEAD needs the key
                return True
            raise StorageError(f"S3 head refused ({_code(exc)})") from None

    def delete(self, key: str) -> None:
        try:
            self._call("delete", lambda: self.client.delete_object(Bucket=self.bucket, Key=key))
            if self.cfg.versioned_bucket:
                self._delete_versions(key)
        except ClientError as exc:
            raise StorageError(f"S3 delete refused ({_code(exc)})") from None

    def _delete_versions(self, key: str) -> None:
        """On a versioned bucket a plain DELETE only adds a marker: remove every version."""
        marker: dict = {}
        while True:
            listing = self._list_versions(key, marker)
            for entry in listing.get("Versions", []) + listing.get("DeleteMarkers", []):
                if entry["Key"] == key:
                    self._delete_version(key, entry["VersionId"])
            if not listing.get("IsTruncated"):
                return
            marker = {"KeyMarker": listing["NextKeyMarker"],
                      "VersionIdMarker": listing["NextVersionIdMarker"]}

    def _list_versions(self, key: str, marker: dict) -> dict:
        return self._call("list versions", lambda: self.client.list_object_versions(
            Bucket=self.bucket, Prefix=key, **marker))

    def _delete_version(self, key: str, version_id: str) -> None:
        self._call("delete version", lambda: self.client.delete_object(
            Bucket=self.bucket, Key=key, VersionId=version_id))

    def list_keys(self, prefix: str) -> list[str]:
        keys: list[str] = []
        token: dict = {}
        while True:
            page = self._list_page(prefix, token)
            keys += [item["Key"] for item in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return sorted(keys)
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def _list_page(self, prefix: str, token: dict) -> dict:
        return self._call("list", lambda: self.client.list_objects_v2(
            Bucket=self.bucket, Prefix=prefix, **token))

    def signed_url(self, key: str, ttl_s: int) -> str | None:
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=ttl_s)
