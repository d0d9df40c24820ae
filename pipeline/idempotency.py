"""Idempotent job submission: a client that retries ``POST /v1/jobs`` with the same
``Idempotency-Key`` and the same body gets the first job back instead of a second job (and a
second encrypted copy of the photos); the same key with a different body is a 409.

A key is scoped to the account (by pseudonym) and kept ``idempotency_window_s``. The first
request claims it with SET NX before anything is stored; a concurrent duplicate gets a 409
asking it to retry; a request that fails releases its claim, so a retry can proceed.
"""

from __future__ import annotations

import hashlib
import json
import re

import redis

from pipeline import keys
from pipeline.errors import InvalidUpload
from pipeline.pseudonyms import account_ref

KEY_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{8,128}")


def check_key(value: str | None) -> str | None:
    if value is None:
        return None
    if not KEY_PATTERN.fullmatch(value):
        raise InvalidUpload("Idempotency-Key must be 8-128 characters of letters, digits, "
                            "'_', '-', '.' or ':'", problem="invalid")
    return value


def body_digest(*, account_id: str, kind: str | None, style: str | None,
                resolution_px: int | None, country: str | None, files: list[bytes]) -> str:
    """What makes two requests "the same": every field and every file's bytes."""
    h = hashlib.sha256()
    h.update(json.dumps([account_id, kind, style, resolution_px, country]).encode())
    for data in files:
        h.update(hashlib.sha256(data).digest())
    return h.hexdigest()


class Idempotency:
    def __init__(self, client: redis.Redis, *, window_s: float) -> None:
        self.redis = client
        self.window_s = window_s

    def _key(self, account_id: str, key: str) -> str:
        return keys.idempotency(account_ref(account_id), key)

    def claim(self, account_id: str, key: str, digest: str) -> str | None:
        """None: this request goes ahead. A job id: the first request's job (replay).
        Raises 409 for another body, or while the first request is still running."""
        name = self._key(account_id, key)
        if self.redis.set(name, json.dumps({"digest": digest, "job_id": ""}), nx=True,
                          ex=max(1, int(self.window_s))):
            return None
        raw = self.redis.get(name)
        if raw is None:  # expired between the two calls: claim again
            return self.claim(account_id, key, digest)
        first = json.loads(raw)
        if first["digest"] != digest:
            raise InvalidUpload("this Idempotency-Key was used with a different request; use "
                                "a new key for a new job", problem="conflict")
        if not first["job_id"]:
            busy = InvalidUpload("a request with this Idempotency-Key is still being handled; "
                                 "retry shortly", problem="conflict")
            busy.retry_after_s = 1  # the API sends Retry-After: clients retry this 409
            raise busy
        return str(first["job_id"])

    def complete(self, account_id: str, key: str, digest: str, job_id: str) -> None:
        self.redis.set(self._key(account_id, key),
                       json.dumps({"digest": digest, "job_id": job_id}),
                       ex=max(1, int(self.window_s)))

    def release(self, account_id: str, key: str) -> None:
        self.redis.delete(self._key(account_id, key))
