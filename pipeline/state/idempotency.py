"""Idempotent job submission: a client that retries ``POST /v1/jobs`` with the same
``Idempotency-Key`` and the same body gets the first job back instead of a second job (and a
second encrypted copy of the photos); the same key with a different body is a 409.

A key is scoped to the account (by pseudonym) and kept ``idempotency_window_s``. The first
request claims it, naming its ingress and the id its job will have, before anything is
stored; a concurrent duplicate gets a 409 whose Retry-After lasts until that ingress's lease
would lapse; a request that fails releases its claim, so a retry can proceed. A request cut
by its ingress's death releases nothing: once that ingress's lease has lapsed, a retry
looks at the job the dead ingress was making. If a runner took it, the retry gets that job
(it runs on); if not, the retry takes the claim over and makes a new job (the reaper fails
and purges the one the dead ingress was storing). So at most one job of a key runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import re

import redis

from pipeline.core.errors import InvalidUpload
from pipeline.core.retry import retry_on_conflict
from pipeline.security.pseudonyms import account_ref
from pipeline.state import keys

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


# One round trip, atomic. KEYS: the claim, the ingress leases. ARGV: this request's claim
# (JSON), window_s, its digest, now. Returns {outcome, value}: go (claimed), replay (value:
# the first job), conflict (another body), busy (value: when the claiming ingress's lease
# lapses), lapsed (value: the claim of a dead ingress, as stored).
_CLAIM = """
local raw = redis.call('GET', KEYS[1])
if raw then
  local first = cjson.decode(raw)
  if first['digest'] ~= ARGV[3] then return {'conflict', ''} end
  local job_id = first['job_id'] or ''
  if job_id ~= '' then return {'replay', job_id} end
  local lease = redis.call('ZSCORE', KEYS[2], first['ingress'] or '')
  if lease and tonumber(lease) >= tonumber(ARGV[4]) then return {'busy', lease} end
  return {'lapsed', raw}
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return {'go', ''}
"""
MAX_CLAIM_TRIES = 3  # a lapsed claim changing under us means another retry is at work


class Idempotency:
    def __init__(self, client: redis.Redis, *, window_s: float) -> None:
        self.redis = client
        self.window_s = window_s
        self._claim = client.register_script(_CLAIM)

    def _key(self, account_id: str, key: str) -> str:
        return keys.idempotency(account_ref(account_id), key)

    def claim(self, account_id: str, key: str, digest: str, *, job_id: str, ingress_id: str,
              now_s: float) -> str | None:
        """None: this request goes ahead and makes job ``job_id``. A job id: the first
        request's job (replay). Raises 409 for another body, or while the first request's
        ingress still lives."""
        name = self._key(account_id, key)
        claim = json.dumps({"digest": digest, "job_id": "", "pending": job_id,
                            "ingress": ingress_id})
        busy = InvalidUpload("a request with this Idempotency-Key is still being handled; "
                             "retry shortly", problem="conflict")
        busy.retry_after_s = 1  # the API sends Retry-After: clients retry this 409

        def attempt() -> str | None:
            outcome, value = (v.decode() for v in self._claim(
                keys=[name, keys.INGRESSES],
                args=[claim, max(1, int(self.window_s)), digest, repr(now_s)]))
            if outcome == "go":
                return None
            if outcome == "replay":
                return value
            if outcome == "conflict":
                raise InvalidUpload("this Idempotency-Key was used with a different request; "
                                    "use a new key for a new job", problem="conflict")
            if outcome == "busy":
                # Until the first request's ingress would be declared gone, so a retry
                # after a crash is not refused again.
                busy.retry_after_s = max(1, math.ceil(float(value) - now_s))
                raise busy
            return self._take_over(name, value, claim) or None

        try:
            return retry_on_conflict(attempt, max_tries=MAX_CLAIM_TRIES)
        except redis.WatchError:  # the lapsed claim kept changing: another retry is at work
            raise busy from None

    def _take_over(self, name: str, seen: str, claim: str) -> str:
        """The claim ``seen`` of a dead ingress. If a runner took the job it was making,
        complete the claim with that job and return its id; else claim the key for this
        request and return "". Raises WatchError if the claim changed meanwhile (look
        again)."""
        first = json.loads(seen)
        pending = str(first.get("pending") or "")
        with self.redis.pipeline(transaction=True) as p:
            p.watch(name, *([keys.job(pending)] if pending else []))
            if (p.get(name) or b"").decode() != seen:
                raise redis.WatchError(f"{name} changed since it was read")
            handed_over = bool(pending and p.hget(keys.job(pending), "runner_id"))
            p.multi()
            p.set(name, json.dumps({"digest": first["digest"], "job_id": pending,
                                    "pending": "", "ingress": ""}) if handed_over else claim,
                  ex=max(1, int(self.window_s)))
            p.execute()
        return pending if handed_over else ""

    def complete(self, account_id: str, key: str, digest: str, job_id: str) -> None:
        self.redis.set(self._key(account_id, key),
                       json.dumps({"digest": digest, "job_id": job_id, "pending": "",
                                   "ingress": ""}),
                       ex=max(1, int(self.window_s)))

    def release(self, account_id: str, key: str) -> None:
        self.redis.delete(self._key(account_id, key))
