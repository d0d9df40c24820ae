"""Job records and the per-account output index, in Redis. No media, no key.

Every key comes from pipeline/state/keys.py.
"""

from __future__ import annotations

import json
import time

import redis

from pipeline.core.errors import Forbidden, InvalidUpload, NotFound, TooManyJobs
from pipeline.core.records import (
    FINISHED_STATUSES,
    PURGED_WITH_INPUTS,
    TRANSITIONS,
    JobKind,
    JobRecord,
    JobStatus,
    Orphan,
    OutputRecord,
    RetentionRecord,
    Stage,
    Worker,
)
from pipeline.core.retry import retry_on_conflict
from pipeline.security.pseudonyms import account_ref
from pipeline.state import keys
from pipeline.state.ledger import RetentionLedger

_LIST_FIELDS = ("input_uris", "output_ids")
# What identifies a person in a job record: gone once the job is minimised.
PERSONAL_JOB_FIELDS = ("account_id", "input_uris", "reason", "runner_id", "ingress_id")
_FLOAT_FIELDS = ("created_s", "updated_s", "succeeded_s", "finished_s", "inputs_purged_s",
                 "minimised_s")
_INT_FIELDS = (
    "resolution_px", "num_inputs_purged_verified", "attempts", "face_batch_size",
    "diffusion_batch_size", "frames_total", "frames_done",
)


# Lua literals generated from the one declaration of the lifecycle (records.TRANSITIONS),
# so a script can never allow a move the enum does not.
_LUA_FINISHED = "{" + ", ".join(f"['{s.value}']=true" for s in FINISHED_STATUSES) + "}"
_LUA_MOVES = "{" + ", ".join(
    f"['{frm.value}']={{" + ", ".join(f"['{to.value}']=true" for to in sorted(moves)) + "}"
    for frm, moves in TRANSITIONS.items()) + "}"
ANY_RUNNER = "*"  # transition(): whoever holds the job

# Sets fields other than the status of an unfinished job, so a record deleted meanwhile
# (account deletion) is never recreated half-empty by a late update.
_UPDATE_IF_UNFINISHED = f"""
local finished = {_LUA_FINISHED}
local status = redis.call('HGET', KEYS[1], 'status')
if (not status) or finished[status] then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""
# The one writer of a job's status (docs/ARCHITECTURE.md, "Who writes a job"). Moves the job
# to ARGV[2] only if TRANSITIONS allows it from its current status and, unless ARGV[3] is
# '*', the job is held by runner ARGV[3] ('' = unclaimed) and, when ARGV[5] names a worker
# kind (runner or ingress), that worker's lease (KEYS[4]) has lapsed at ARGV[4]: all checked
# at the moment of writing. An ended job leaves the active sets.
# KEYS: job, active jobs, the account's active set, a lease zset. ARGV: job id, status,
# runner, now, lapsed worker kind or '', then field, value, ...
_TRANSITION = f"""
local moves, finished = {_LUA_MOVES}, {_LUA_FINISHED}
local status, to = redis.call('HGET', KEYS[1], 'status'), ARGV[2]
if (not status) or (not moves[status]) or (not moves[status][to]) then return 0 end
local runner = redis.call('HGET', KEYS[1], 'runner_id') or ''
if ARGV[3] ~= '*' and runner ~= ARGV[3] then return 0 end
local lapsed = ARGV[5]
if lapsed ~= '' then
  local holder = runner
  if lapsed == 'ingress' then holder = redis.call('HGET', KEYS[1], 'ingress_id') or '' end
  local lease = redis.call('ZSCORE', KEYS[4], holder)
  if lease and tonumber(lease) >= tonumber(ARGV[4]) then return 0 end
end
redis.call('HSET', KEYS[1], 'status', to, unpack(ARGV, 6))
if finished[to] then
  redis.call('SREM', KEYS[2], ARGV[1])
  redis.call('SREM', KEYS[3], ARGV[1])
end
return 1
"""
_RECORD_PURGE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, ''} end
redis.call('HINCRBY', KEYS[1], 'num_inputs_purged_verified', ARGV[1])
local first = 0
if ARGV[2] == '1' then first = redis.call('HSETNX', KEYS[1], 'inputs_purged_s', ARGV[3]) end
return {first, redis.call('HGET', KEYS[1], 'finished_s') or ''}
"""


def _to_record(job_id: str, raw: dict) -> JobRecord:
    if not raw:
        raise NotFound(f"job {job_id} not found")
    d: dict[str, object] = {k.decode(): v.decode() for k, v in raw.items()}
    for name in _LIST_FIELDS:
        d[name] = json.loads(str(d[name])) if d.get(name) else []
    for name in _FLOAT_FIELDS:
        d[name] = float(str(d[name])) if d.get(name) else None
    for name in _INT_FIELDS:
        d[name] = int(str(d.get(name) or 0))
    d["status"] = JobStatus(str(d.get("status") or JobStatus.QUEUED))
    if d.get("kind"):
        d["kind"] = JobKind(str(d["kind"]))
    d.setdefault("account_id", "")  # minimised records have none
    try:
        return JobRecord(**d)  # type: ignore[arg-type]
    except TypeError:  # a record being deleted right now
        raise NotFound(f"job {job_id} not found") from None


def _to_output(raw: dict, account_id: str) -> OutputRecord | None:
    """An output hash as a record, or None if missing or another account's."""
    d = {k.decode(): v.decode() for k, v in raw.items()}
    if not d or d.get("account_id") != account_id:
        return None
    return OutputRecord(
        output_id=d["output_id"], account_id=d["account_id"], job_id=d["job_id"], uri=d["uri"],
        media_type=d["media_type"], created_s=float(d["created_s"]),
        provider=d.get("provider", ""), region=d.get("region", ""), bucket=d.get("bucket", ""),
        size_bytes=int(d.get("size_bytes") or 0))


def _end_fields(*, ok: bool, reason: str, output_ids: tuple[str, ...],
                now_s: float) -> dict[str, object]:
    fields: dict[str, object] = {"finished_s": now_s, "updated_s": now_s}
    if ok:
        fields.update(succeeded_s=now_s, output_ids=list(output_ids))
    else:
        fields["reason"] = reason
    return fields


def _flat(fields: dict[str, object]) -> list[str]:
    """HSET arguments for a script: field, value, field, value, ..."""
    return [x for k, v in fields.items() for x in (k, _encode(v))]


def _encode(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    return "" if value is None else str(value)


class JobStore:
    """Creates, updates and reads jobs and outputs."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self.ledger = RetentionLedger(client)
        self._update_if_unfinished = client.register_script(_UPDATE_IF_UNFINISHED)
        self._transition = client.register_script(_TRANSITION)
        self._record_purge = client.register_script(_RECORD_PURGE)

    def create_job(self, job: JobRecord, records: list[RetentionRecord], *,
                   max_in_flight: int | None = None) -> None:
        """Register the job and its objects' retention records in one MULTI.

        Called before any object is written, so an object never exists without a record.
        Refused (InvalidUpload) while the account is being deleted, and (TooManyJobs) when
        the account already has ``max_in_flight`` unfinished jobs.
        """
        fields = {k: getattr(job, k) for k in job.__slots__ if getattr(job, k) is not None}
        tombstone = keys.account_tombstone(job.account_id)
        active = keys.account_active(job.account_id)
        blocked = keys.blocked_account(account_ref(job.account_id))

        def attempt() -> None:
            with self.redis.pipeline(transaction=True) as p:
                p.watch(tombstone, active, blocked)
                if p.exists(blocked):
                    raise Forbidden("this account was reported as belonging to a child under "
                                    "13; its data was deleted and no new jobs are accepted")
                if p.exists(tombstone):
                    raise InvalidUpload("this account is being deleted; no new jobs are "
                                        "accepted for it", problem="conflict")
                if max_in_flight is not None and p.scard(active) >= max_in_flight:
                    raise TooManyJobs(f"this account already has {max_in_flight} unfinished "
                                      "jobs; wait for one to finish")
                p.multi()
                p.hset(keys.job(job.job_id), mapping={k: _encode(v) for k, v in fields.items()})
                p.sadd(keys.ACTIVE_JOBS, job.job_id)
                p.zadd(keys.account_jobs(job.account_id), {job.job_id: job.created_s})
                p.sadd(active, job.job_id)
                self.ledger.register(records, pipe=p)
                p.execute()

        retry_on_conflict(attempt)

    def discard_job(self, job_id: str, records: list[RetentionRecord]) -> None:
        """Undo ``create_job`` once the job's objects are verified gone (failed ingest)."""
        p = self.redis.pipeline(transaction=True)
        p.delete(keys.job(job_id))
        p.srem(keys.ACTIVE_JOBS, job_id)
        for rec in records:
            p.zrem(keys.account_jobs(rec.account_id), job_id)
            p.srem(keys.account_active(rec.account_id), job_id)
        p.execute()
        for rec in records:
            self.ledger.complete(rec)

    def get_job(self, job_id: str) -> JobRecord:
        return _to_record(job_id, self.redis.hgetall(keys.job(job_id)))

    def transition(self, job_id: str, to: JobStatus, *, account_id: str,
                   runner: str = ANY_RUNNER, lapsed: Worker | None = None,
                   now_s: float | None = None, fields: dict[str, object] | None = None) -> bool:
        """Move a job to status ``to`` and set ``fields`` with it, atomically, if
        ``TRANSITIONS`` allows the move from its status now and, unless ``runner`` is
        ANY_RUNNER, the job is held by ``runner`` ("" = unclaimed) and, when ``lapsed``
        names a worker kind, the lease of the job's worker of that kind has lapsed at
        ``now_s``. The only writer of ``status``: returns whether it moved the job."""
        now = time.time() if now_s is None else now_s
        fields = {"updated_s": now, **(fields or {})}
        return bool(self._transition(
            keys=[keys.job(job_id), keys.ACTIVE_JOBS, keys.account_active(account_id),
                  keys.worker_leases(lapsed or Worker.RUNNER)],
            args=[job_id, to.value, runner, repr(now), lapsed.value if lapsed else "",
                  *_flat(fields)]))

    def update_job(self, job_id: str, **fields: object) -> bool:
        """Set fields other than the status of an unfinished job; False (nothing written)
        once it ended or is gone. The status moves through ``transition`` alone."""
        if "status" in fields:
            raise ValueError("a job's status changes through JobStore.transition only")
        fields["updated_s"] = time.time()
        return bool(self._update_if_unfinished(keys=[keys.job(job_id)], args=_flat(fields)))

    def finish_job(
        self, job_id: str, *, ok: bool, reason: str = "", output_ids: tuple[str, ...] = ()
    ) -> bool:
        """Mark a job succeeded (with outputs; only a running job can) or failed (with a
        reason the user can read), whoever holds it: its holder's call, and account
        deletion's. A job that already ended keeps its first outcome; its inputs are made
        due either way, so the sweep removes them even if the purge call is lost."""
        now = time.time()
        fields = _end_fields(ok=ok, reason=reason, output_ids=output_ids, now_s=now)
        account = self.account_of(job_id)
        moved = bool(account) and self.transition(
            job_id, JobStatus.SUCCEEDED if ok else JobStatus.FAILED, account_id=account,
            now_s=now, fields=fields)
        self.ledger.expedite_job(job_id, PURGED_WITH_INPUTS, now)
        return moved

    def fail_orphan(self, job: JobRecord, orphan: Orphan, *, now_s: float) -> bool:
        """Fail ``job`` for ``orphan.reason`` if, at this instant, it is still held by the
        runner it was seen with (or still unclaimed) and, when ``orphan.lapsed`` names a
        worker, that worker's lease is still lapsed. Atomic, so a worker that heartbeats or
        a runner that claims the job meanwhile keeps it. Returns whether it failed the job."""
        fields = _end_fields(ok=False, reason=orphan.reason, output_ids=(), now_s=now_s)
        failed = self.transition(job.job_id, JobStatus.FAILED, account_id=job.account_id,
                                 runner=job.runner_id, lapsed=orphan.lapsed, now_s=now_s,
                                 fields=fields)
        if failed:
            self.ledger.expedite_job(job.job_id, PURGED_WITH_INPUTS, now_s)
        return failed

    def record_purge(self, job_id: str, *, num_inputs_verified: int, complete: bool) -> None:
        """Count inputs verified gone; stamp ``inputs_purged_s`` once all are gone."""
        now = time.time()
        first_complete, finished = self._record_purge(
            keys=[keys.job(job_id)],
            args=[num_inputs_verified, "1" if complete else "0", repr(now)])
        if first_complete and finished:
            lag_s = now - float(finished)
            p = self.redis.pipeline(transaction=True)
            p.lpush(keys.PURGE_LAGS, repr(lag_s))
            p.ltrim(keys.PURGE_LAGS, 0, 9999)
            p.zadd(keys.PURGED_JOBS, {job_id: now})
            p.execute()

    def minimise_and_expire(self, *, now_s: float, grace_s: float, ttl_s: float) -> tuple[int, int]:
        """Data minimisation of ended jobs whose inputs are purged: after ``grace_s`` (the
        app has read the result) a record loses its personal fields (account id, input
        URIs, reason, runner) and moves from the account's index to the index kept by its
        pseudonym (``keys.account_minimised_jobs``: account deletion still finds it); after
        ``ttl_s`` it is deleted. The status call answers with what remains until then.
        Returns (minimised, deleted)."""
        expired = [j.decode() for j in self.redis.zrangebyscore(keys.PURGED_JOBS, 0,
                                                                now_s - ttl_s)]
        for job_id in expired:
            account, ref = (v.decode() if v else "" for v in
                            self.redis.hmget(keys.job(job_id), "account_id", "account_ref"))
            p = self.redis.pipeline(transaction=True)
            p.delete(keys.job(job_id))
            p.zrem(keys.PURGED_JOBS, job_id)
            if account:
                p.zrem(keys.account_jobs(account), job_id)
            if ref:
                p.zrem(keys.account_minimised_jobs(ref), job_id)
            p.execute()
        minimised = 0
        for job_id in (j.decode() for j in self.redis.zrangebyscore(
                keys.PURGED_JOBS, 0, now_s - grace_s)):
            minimised += self._minimise(job_id, now_s)
        return minimised, len(expired)

    def _minimise(self, job_id: str, now_s: float) -> bool:
        """Drop a record's personal fields; False if it is already minimised or gone.
        WATCHed, so a record deleted meanwhile (account deletion) is never recreated."""
        job = keys.job(job_id)

        def attempt() -> bool:
            with self.redis.pipeline(transaction=True) as p:
                p.watch(job)
                account, created = p.hmget(job, "account_id", "created_s")
                if not account:
                    return False
                ref = account_ref(account.decode())
                p.multi()
                p.hdel(job, *PERSONAL_JOB_FIELDS)
                p.hset(job, mapping={"minimised_s": repr(now_s), "account_ref": ref})
                p.zrem(keys.account_jobs(account.decode()), job_id)
                p.zadd(keys.account_minimised_jobs(ref), {job_id: float(created or now_s)})
                p.execute()
                return True

        return retry_on_conflict(attempt)

    def minimised_job_ids(self, account_id: str) -> list[str]:
        """The account's minimised job records (no longer in ``account_job_ids``), oldest
        first."""
        return [j.decode() for j in
                self.redis.zrange(keys.account_minimised_jobs(account_ref(account_id)), 0, -1)]

    def account_job_ids(self, account_id: str) -> list[str]:
        """Oldest first."""
        return [j.decode() for j in self.redis.zrange(keys.account_jobs(account_id), 0, -1)]

    def account_of(self, job_id: str) -> str:
        """The job's account id, or "" once the job record is gone."""
        return (self.redis.hget(keys.job(job_id), "account_id") or b"").decode()

    def is_finished(self, job_id: str) -> bool:
        """True once the job succeeded or failed, or no longer exists (account deleted)."""
        status = self.redis.hget(keys.job(job_id), "status")
        return status is None or JobStatus(status.decode()).is_finished

    def forget_job(self, job_id: str, account_id: str) -> None:
        """Drop a finished job's record, minimised or not, and every index entry of it
        (account deletion); its inputs must be purged first."""
        p = self.redis.pipeline(transaction=True)
        p.delete(keys.job(job_id))
        p.srem(keys.ACTIVE_JOBS, job_id)
        p.zrem(keys.PURGED_JOBS, job_id)
        p.zrem(keys.account_jobs(account_id), job_id)
        p.zrem(keys.account_minimised_jobs(account_ref(account_id)), job_id)
        p.srem(keys.account_active(account_id), job_id)
        p.execute()

    def remove_output(self, out: OutputRecord) -> None:
        p = self.redis.pipeline(transaction=True)
        p.delete(keys.output(out.output_id))
        p.zrem(keys.account_outputs(out.account_id), out.output_id)
        p.execute()

    def purge_lags_s(self) -> list[float]:
        return [float(v) for v in self.redis.lrange(keys.PURGE_LAGS, 0, -1)]

    def active_job_ids(self) -> list[str]:
        return sorted(j.decode() for j in self.redis.smembers(keys.ACTIVE_JOBS))

    def add_output(self, out: OutputRecord, pending: RetentionRecord) -> bool:
        """Index an output and drop its pending retention record, in one MULTI.

        Refused (False) if the job is gone or already ended (its runner gave up on it), or
        the account is being deleted: the caller then deletes the object. The pending
        record's deadline purges it if nobody does.
        """
        job, tombstone = keys.job(out.job_id), keys.account_tombstone(out.account_id)

        def attempt() -> bool:
            with self.redis.pipeline(transaction=True) as p:
                p.watch(job, tombstone)
                status = p.hget(job, "status")
                if p.exists(tombstone) or status is None or JobStatus(status.decode()).is_finished:
                    return False
                p.multi()
                p.hset(keys.output(out.output_id),
                       mapping={k: _encode(getattr(out, k)) for k in out.__slots__})
                p.zadd(keys.account_outputs(out.account_id), {out.output_id: out.created_s})
                self.ledger.complete(pending, pipe=p)
                p.execute()
                return True

        return retry_on_conflict(attempt)

    def get_output(self, account_id: str, output_id: str) -> OutputRecord:
        """An output of this account; another account's output is reported as not found."""
        found = _to_output(self.redis.hgetall(keys.output(output_id)), account_id)
        if found is None:
            raise NotFound(f"output {output_id} not found for this account")
        return found

    def list_outputs(self, account_id: str) -> list[OutputRecord]:
        return self.page_outputs(account_id, limit=None)[0]

    def page_outputs(self, account_id: str, *, limit: int | None, after: str | None = None
                     ) -> tuple[list[OutputRecord], str | None]:
        """The account's outputs, oldest first, ``limit`` at a time from after the output
        id ``after``; returns them and the id to continue after (None at the end). Two
        Redis round trips per page, whatever its size."""
        ids, next_cursor = self._page(keys.account_outputs(account_id), limit, after, "output")
        p = self.redis.pipeline(transaction=False)
        for output_id in ids:
            p.hgetall(keys.output(output_id))
        records = [r for r in (_to_output(raw, account_id) for raw in p.execute())
                   if r is not None]  # deleted between the two reads
        return records, next_cursor

    def page_jobs(self, account_id: str, *, limit: int, after: str | None = None
                  ) -> tuple[list[JobRecord], str | None]:
        """The account's job records, oldest first, paged like ``page_outputs``. A job
        leaves the list when its record is minimised (``job_record_grace_s`` after its
        purge); it can still be read by id until it expires."""
        ids, next_cursor = self._page(keys.account_jobs(account_id), limit, after, "job")
        p = self.redis.pipeline(transaction=False)
        for job_id in ids:
            p.hgetall(keys.job(job_id))
        records = []
        for job_id, raw in zip(ids, p.execute(), strict=True):
            try:
                records.append(_to_record(job_id, raw))
            except NotFound:  # deleted between the two reads
                continue
        return records, next_cursor

    def _page(self, index: str, limit: int | None, after: str | None, what: str
              ) -> tuple[list[str], str | None]:
        """Ids of a zset index, ``limit`` from after member ``after``, and the next cursor."""
        start = 0
        if after is not None:
            rank = self.redis.zrank(index, after)
            if rank is None:
                raise InvalidUpload(f"cursor is unknown or its {what} was deleted; start "
                                    "again without a cursor", problem="invalid")
            start = rank + 1
        stop = -1 if limit is None else start + limit  # one more: is there a next page?
        ids = [i.decode() for i in self.redis.zrange(index, start, stop)]
        more = limit is not None and len(ids) > limit
        ids = ids[:limit] if limit is not None else ids
        return ids, (ids[-1] if more and ids else None)

    def note_batch(self, job_ids: list[str], stage: Stage, *, cost_units: int,
                   max_cost_units: int) -> None:
        """Jobs entering one model call (a GPU pool's only write to a job: a statistic,
        never its status): the size of the batch that serves them, and the batch's fill
        for the metrics."""
        for job_id in job_ids:
            self.update_job(job_id, **{f"{stage.value}_batch_size": len(job_ids)})
        p = self.redis.pipeline(transaction=False)
        p.lpush(keys.batch_fill(stage.value), repr(cost_units / max_cost_units))
        p.ltrim(keys.batch_fill(stage.value), 0, 999)
        p.execute()

    def finished_among(self, job_ids: list[str]) -> set[str]:
        """Those of ``job_ids`` that ended or no longer exist (one pipelined read)."""
        p = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            p.hget(keys.job(job_id), "status")
        return {job_id for job_id, raw in zip(job_ids, p.execute(), strict=True)
                if raw is None or JobStatus(raw.decode()).is_finished}

    def batch_fills(self, stage: Stage) -> list[float]:
        return [float(v) for v in self.redis.lrange(keys.batch_fill(stage.value), 0, -1)]

    def unfinished_counts(self) -> dict[tuple[JobStatus, str], int]:
        """Unfinished jobs by status and batch bucket ("kind/style/resolution"), one
        pipelined read per 1,000 jobs: the queue depth per bucket."""
        ids = self.active_job_ids()
        counts: dict[tuple[JobStatus, str], int] = {}
        for start in range(0, len(ids), 1000):
            p = self.redis.pipeline(transaction=False)
            for job_id in ids[start:start + 1000]:
                p.hmget(keys.job(job_id), "status", "kind", "style", "resolution_px")
            for status, kind, style, resolution in p.execute():
                if status:
                    bucket = "/".join(v.decode() for v in (kind, style, resolution) if v)
                    key = (JobStatus(status.decode()), bucket)
                    counts[key] = counts.get(key, 0) + 1
        return counts

    # Job runners: who holds which job (and its key) in memory.

    def claim_job(self, job_id: str, runner_id: str) -> bool:
        """The hand-off: the job is running, held by ``runner_id``. False if it is not
        waiting for a runner (ended: withdrawn, reaped, account deleted; or gone), and then
        nobody should drive it."""
        if self.transition(job_id, JobStatus.RUNNING, account_id=self.account_of(job_id),
                           runner="", fields={"runner_id": runner_id}):
            return True
        # A retried claim whose first try ran but whose answer was lost (a Redis timeout)
        # finds the job already running under this runner: that is its claim.
        status, holder = self.redis.hmget(keys.job(job_id), "status", "runner_id")
        return status == JobStatus.RUNNING.value.encode() and holder == runner_id.encode()

    def heartbeat(self, worker: Worker, worker_id: str, *, lease_s: float, now_s: float) -> None:
        """Renew a worker's lease: it is live until ``now_s + lease_s``."""
        leases = keys.worker_leases(worker)
        p = self.redis.pipeline(transaction=True)
        p.zadd(leases, {worker_id: now_s + lease_s})
        p.zremrangebyscore(leases, "-inf", now_s - 3600.0)  # long-gone workers
        p.execute()

    def live(self, worker: Worker, now_s: float) -> set[str]:
        """Ids of the workers of this kind whose lease has not lapsed at ``now_s``."""
        return {w.decode() for w in self.redis.zrangebyscore(keys.worker_leases(worker), now_s,
                                                             "+inf")}

    def unfinished_jobs(self) -> list[JobRecord]:
        """Every job not yet succeeded or failed (skipping ones deleted meanwhile), read in
        pipelined rounds of 1,000."""
        ids = self.active_job_ids()
        found = []
        for start in range(0, len(ids), 1000):
            chunk = ids[start:start + 1000]
            p = self.redis.pipeline(transaction=False)
            for job_id in chunk:
                p.hgetall(keys.job(job_id))
            for job_id, raw in zip(chunk, p.execute(), strict=True):
                try:
                    found.append(_to_record(job_id, raw))
                except NotFound:
                    continue
        return found

    def try_lock(self, name: str, owner: str, ttl_s: float) -> bool:
        """A leased lock: true for the one caller that got it; it expires by itself."""
        return bool(self.redis.set(keys.lock(name), owner, nx=True, px=int(ttl_s * 1000)))
