"""Retention ledger in Redis: one record per stored object, a sorted set by deadline.

Keys (no plaintext media, key or embedding ever enters Redis):
  eph:ret:rec:<uri>     hash: uri, object_class, account_id, job_id, created_s, deadline_s
  eph:ret:due           zset: uri -> deadline_s
  eph:ret:job:<job_id>  set of the job's uris
  eph:ret:lease:<uri>   claim by one retention worker, expires after lease_s
  eph:ret:created:<class>  zset uri -> created_s (the oldest-surviving-object metric)
  eph:metrics:purge_failures  count of deletions that failed every retry

A record is written before (or in the same MULTI as) the object itself, so no object can
exist without one. A record leaves the ledger only once its object is verified gone.
"""

from __future__ import annotations

import redis

from pipeline.core.records import ObjectClass, RetentionRecord
from pipeline.state import keys
from pipeline.state.receipts import ReceiptLedger

_EXPEDITE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'deadline_s', ARGV[2])
redis.call('ZADD', KEYS[2], 'XX', ARGV[2], ARGV[1])
return 1
"""


class RetentionLedger:
    """Reads and writes retention records. Every method is a few atomic Redis commands."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._expedite = client.register_script(_EXPEDITE)

    def register(self, records: list[RetentionRecord], pipe: redis.client.Pipeline | None = None) -> None:
        """Add records; with ``pipe`` they join the caller's MULTI instead of their own."""
        own = pipe is None
        p = self.redis.pipeline(transaction=True) if pipe is None else pipe
        for rec in records:
            p.hset(
                keys.retention_record(rec.uri),
                mapping={
                    "uri": rec.uri,
                    "object_class": rec.object_class,
                    "account_id": rec.account_id,
                    "job_id": rec.job_id,
                    "created_s": repr(rec.created_s),
                    "deadline_s": repr(rec.deadline_s),
                    "provider": rec.provider,
                    "region": rec.region,
                    "bucket": rec.bucket,
                },
            )
            p.zadd(keys.RETENTION_DUE, {rec.uri: rec.deadline_s})
            p.zadd(f"{keys.RETENTION_CREATED}:{rec.object_class}", {rec.uri: rec.created_s})
            p.sadd(keys.retention_job(rec.job_id), rec.uri)
        if own:
            p.execute()

    def get(self, uri: str) -> RetentionRecord | None:
        raw = self.redis.hgetall(keys.retention_record(uri))
        if not raw:
            return None
        d = {k.decode(): v.decode() for k, v in raw.items()}
        return RetentionRecord(
            uri=d["uri"],
            object_class=ObjectClass(d["object_class"]),
            account_id=d["account_id"],
            job_id=d["job_id"],
            created_s=float(d["created_s"]),
            deadline_s=float(d["deadline_s"]),
            provider=d.get("provider", ""),
            region=d.get("region", ""),
            bucket=d.get("bucket", ""),
        )

    def records_for_job(self, job_id: str) -> list[RetentionRecord]:
        uris = sorted(u.decode() for u in self.redis.smembers(keys.retention_job(job_id)))
        return [rec for rec in (self.get(u) for u in uris) if rec is not None]

    def due_uris(self, now_s: float, limit: int = 100) -> list[str]:
        """URIs whose deadline has passed, oldest deadline first."""
        return [u.decode() for u in self.redis.zrangebyscore(keys.RETENTION_DUE, "-inf", now_s, 0, limit)]

    def try_claim(self, uri: str, owner: str, lease_s: float) -> bool:
        """Claim ``uri`` for one worker; False if another holds a live lease (SET NX PX)."""
        return bool(self.redis.set(keys.retention_lease(uri), owner, nx=True, px=max(1, int(lease_s * 1000))))

    def release(self, uri: str) -> None:
        self.redis.delete(keys.retention_lease(uri))

    def complete(self, rec: RetentionRecord, pipe: redis.client.Pipeline | None = None) -> None:
        """Drop a record whose object is verified gone (or indexed, for an output)."""
        p = self.redis.pipeline(transaction=True) if pipe is None else pipe
        p.delete(keys.retention_record(rec.uri))
        p.zrem(keys.RETENTION_DUE, rec.uri)
        p.zrem(f"{keys.RETENTION_CREATED}:{rec.object_class}", rec.uri)
        p.srem(keys.retention_job(rec.job_id), rec.uri)
        p.delete(keys.retention_lease(rec.uri))
        if pipe is None:
            p.execute()

    def defer(self, uri: str, until_s: float) -> None:
        """Push a record the sweep could not purge to later, so it does not block others."""
        self.redis.zadd(keys.RETENTION_DUE, {uri: until_s}, xx=True)

    def expedite_job(self, job_id: str, classes: tuple[str, ...], now_s: float) -> None:
        """Make a finished job's objects of ``classes`` due now, so a lost purge call is
        picked up by the next sweep instead of waiting for the hard ceiling."""
        for rec in self.records_for_job(job_id):
            if rec.object_class in classes and rec.deadline_s > now_s:
                self._expedite(keys=[keys.retention_record(rec.uri), keys.RETENTION_DUE],
                               args=[rec.uri, repr(now_s)])

    def receipts(self) -> ReceiptLedger:
        """The receipt chain that verified deletions of these records join."""
        return ReceiptLedger(self.redis)

    def note_purge_failure(self) -> None:
        self.redis.incr(keys.PURGE_FAILURES)

    def oldest_created_s(self, object_class: str) -> float | None:
        first = self.redis.zrange(f"{keys.RETENTION_CREATED}:{object_class}", 0, 0, withscores=True)
        return float(first[0][1]) if first else None

    def count(self) -> int:
        return int(self.redis.zcard(keys.RETENTION_DUE))
