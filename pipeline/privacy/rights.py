"""Users' privacy rights, for the app's backend (which has verified the user):

* right to know: ``export_account`` lists every category and piece the service holds for an
  account (outputs, job records, deletion receipts, privacy requests, flags);
* right to delete: account deletion (pipeline/retention/deletion.py), recorded as a request;
* opt-out of sale and sharing: a per-account flag that third-party exports honour;
* under 13: the account and all its data are deleted at once and the account is blocked
  for good (by pseudonym, so the block keeps no id).

Every request is recorded (kind, received, acknowledged, completed) so that the policy's
deadlines can be reported: acknowledgement within 10 business days, completion within 45
days (``late_requests``, ``ephemera privacy report``).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum

import redis

from pipeline.core.errors import NotFound
from pipeline.security.pseudonyms import account_ref
from pipeline.state import keys
from pipeline.state.job_store import JobStore
from pipeline.state.receipts import ReceiptLedger
from pipeline.storage.base import ObjectStore

ACK_BUSINESS_DAYS = 10
COMPLETE_DAYS = 45


class RequestKind(StrEnum):
    KNOW = "know"
    DELETE = "delete"
    OPT_OUT = "opt_out"
    OPT_IN = "opt_in"
    UNDER_13 = "under_13"


@dataclass(frozen=True, slots=True)
class PrivacyRequest:
    request_id: str
    kind: RequestKind
    account_ref: str  # never the raw account id
    received_s: float
    acknowledged_s: float | None = None
    completed_s: float | None = None
    receipt_id: str = ""  # the deletion receipt, for delete and under_13

    @property
    def ack_due_s(self) -> float:
        return add_business_days(self.received_s, ACK_BUSINESS_DAYS)

    @property
    def complete_due_s(self) -> float:
        return self.received_s + COMPLETE_DAYS * 86400.0


def add_business_days(start_s: float, days: int) -> float:
    """``start_s`` plus ``days`` Monday-to-Friday days (public holidays not counted)."""
    moment = datetime.fromtimestamp(start_s, UTC)
    day: date = moment.date()
    left = days
    while left:
        day += timedelta(days=1)
        if day.weekday() < 5:
            left -= 1
    return datetime.combine(day, moment.timetz()).timestamp()


class PrivacyRequests:
    """The record of every privacy request (Redis)."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def open(self, kind: RequestKind, account_id: str, *, now_s: float | None = None,
             acknowledged: bool = True) -> PrivacyRequest:
        """Record a request as received (and, for the automated ones, acknowledged)."""
        now = time.time() if now_s is None else now_s
        request = PrivacyRequest(uuid.uuid4().hex, kind, account_ref(account_id), now,
                                 acknowledged_s=now if acknowledged else None)
        with self.redis.pipeline(transaction=True) as p:
            p.hset(keys.privacy_request(request.request_id), mapping=_fields(request))
            p.zadd(keys.PRIVACY_OPEN, {request.request_id: now})
            p.sadd(keys.account_privacy_requests(request.account_ref), request.request_id)
            p.execute()
        return request

    def record_completed(self, kind: RequestKind, account_id: str, *,
                         now_s: float | None = None) -> PrivacyRequest:
        """Record a request answered on the spot (received, acknowledged and completed at
        once), in one MULTI; it is never open. Holds the pseudonym, never the raw id."""
        now = time.time() if now_s is None else now_s
        request = PrivacyRequest(uuid.uuid4().hex, kind, account_ref(account_id), now,
                                 acknowledged_s=now, completed_s=now)
        with self.redis.pipeline(transaction=True) as p:
            p.hset(keys.privacy_request(request.request_id), mapping=_fields(request))
            p.sadd(keys.account_privacy_requests(request.account_ref), request.request_id)
            p.execute()
        return request

    def complete(self, request_id: str, *, receipt_id: str = "",
                 now_s: float | None = None) -> None:
        now = time.time() if now_s is None else now_s
        with self.redis.pipeline(transaction=True) as p:
            p.hset(keys.privacy_request(request_id),
                   mapping={"completed_s": repr(now), "receipt_id": receipt_id})
            p.zrem(keys.PRIVACY_OPEN, request_id)
            p.execute()

    def attach_receipt(self, request_id: str, receipt_id: str) -> None:
        self.redis.hset(keys.privacy_request(request_id), "receipt_id", receipt_id)

    def get(self, request_id: str) -> PrivacyRequest:
        raw = self.redis.hgetall(keys.privacy_request(request_id))
        if not raw:
            raise NotFound(f"privacy request {request_id} not found")
        d = {k.decode(): v.decode() for k, v in raw.items()}
        return PrivacyRequest(
            request_id=d["request_id"], kind=RequestKind(d["kind"]),
            account_ref=d["account_ref"], received_s=float(d["received_s"]),
            acknowledged_s=float(d["acknowledged_s"]) if d.get("acknowledged_s") else None,
            completed_s=float(d["completed_s"]) if d.get("completed_s") else None,
            receipt_id=d.get("receipt_id", ""))

    def open_requests(self) -> list[PrivacyRequest]:
        ids = [i.decode() for i in self.redis.zrange(keys.PRIVACY_OPEN, 0, -1)]
        return [self.get(i) for i in ids]

    def settle_deletions(self, now_s: float | None = None) -> None:
        """Complete the open delete and under-13 requests whose account deletion finished
        (the retention actors carry deletions out; their receipt says when)."""
        chain = ReceiptLedger(self.redis)
        for request in self.open_requests():
            if not request.receipt_id:
                continue
            try:
                receipt = chain.get_request(request.receipt_id)
            except NotFound:
                continue
            if receipt.get("status") == "complete":
                self.complete(request.request_id, receipt_id=request.receipt_id,
                              now_s=float(receipt.get("updated_s") or now_s or time.time()))

    def for_account(self, account_id: str) -> list[PrivacyRequest]:
        ids = sorted(i.decode() for i in self.redis.smembers(
            keys.account_privacy_requests(account_ref(account_id))))
        return [self.get(i) for i in ids]


def _fields(request: PrivacyRequest) -> dict[str, str]:
    return {k: ("" if v is None else repr(v) if isinstance(v, float) else str(v))
            for k, v in asdict(request).items()}


def late_requests(requests: list[PrivacyRequest], now_s: float) -> list[tuple[PrivacyRequest, str]]:
    """Open requests past a deadline, with which one."""
    late = []
    for request in requests:
        if request.acknowledged_s is None and now_s > request.ack_due_s:
            late.append((request, f"not acknowledged within {ACK_BUSINESS_DAYS} business days"))
        elif request.completed_s is None and now_s > request.complete_due_s:
            late.append((request, f"not completed within {COMPLETE_DAYS} days"))
    return late


# ---------------------------------------------------------------- flags

def set_opt_out(client: redis.Redis, account_id: str, opted_out: bool) -> None:
    """The flag, and the account's pseudonym in the set third-party exports leave out."""
    with client.pipeline(transaction=True) as p:
        if opted_out:
            p.set(keys.account_opt_out(account_id), "1")
            p.sadd(keys.OPTED_OUT_REFS, account_ref(account_id))
        else:
            p.delete(keys.account_opt_out(account_id))
            p.srem(keys.OPTED_OUT_REFS, account_ref(account_id))
        p.execute()


def excluded_from_sharing(client: redis.Redis) -> set[str]:
    """Pseudonyms whose usage never leaves the service: opted out, or deleted."""
    return {r.decode() for r in client.smembers(keys.OPTED_OUT_REFS)}


def is_opted_out(client: redis.Redis, account_id: str) -> bool:
    return bool(client.exists(keys.account_opt_out(account_id)))


def block_child_account(client: redis.Redis, account_id: str) -> None:
    """No job is ever accepted again for this account (checked in JobStore.create_job)."""
    client.set(keys.blocked_account(account_ref(account_id)), "under_13")


def is_blocked(client: redis.Redis, account_id: str) -> bool:
    return bool(client.exists(keys.blocked_account(account_ref(account_id))))


# ---------------------------------------------------------------- right to know

def export_account(account_id: str, jobs: JobStore, usage_store: ObjectStore | None = None
                   ) -> dict:
    """Every category and piece of data the service holds for ``account_id``: what the
    right to know returns. Media bytes, embeddings and keys are never held outside a running
    job, so they appear only as counts and places."""
    client = jobs.redis
    outputs = [{"output_id": o.output_id, "job_id": o.job_id, "created_s": o.created_s,
                "media_type": o.media_type, "size_bytes": o.size_bytes,
                "provider": o.provider, "region": o.region}
               for o in jobs.list_outputs(account_id)]
    job_records = []
    for job_id in jobs.account_job_ids(account_id) + jobs.minimised_job_ids(account_id):
        try:
            job = jobs.get_job(job_id)
        except NotFound:
            continue
        job_records.append({
            "job_id": job.job_id, "kind": job.kind, "style": job.style,
            "status": str(job.status), "created_s": job.created_s,
            "finished_s": job.finished_s, "reason": job.reason or None,
            "num_inputs": len(job.input_uris), "inputs_purged_s": job.inputs_purged_s,
            "num_inputs_purged_verified": job.num_inputs_purged_verified,
            "input_locations": sorted({_place(u) for u in job.input_uris}),
            "output_ids": job.output_ids})
    chain = ReceiptLedger(client)
    receipts = []
    for receipt_id in sorted(r.decode() for r in
                             client.smembers(keys.account_receipts(account_id))):
        try:
            request = chain.get_request(receipt_id)
        except NotFound:
            continue
        receipts.append({"receipt_id": receipt_id, "kind": request.get("kind"),
                         "status": request.get("status"),
                         "requested_s": float(request.get("requested_s") or 0),
                         "objects_verified_gone": len(request["objects"])})
    requests = [_request_view(r) for r in PrivacyRequests(client).for_account(account_id)]
    return {
        "account_id": account_id,
        "categories": {
            "outputs": "generated photos and clips kept until you delete them",
            "jobs": "records of your generation requests (no media, no keys)",
            "deletion_receipts": "proofs that deleted data is gone",
            "privacy_requests": "your rights requests and their handling",
            "usage": "one record per job: kind, style, timings, outcome, country",
            "flags": "your choices",
        },
        "outputs": outputs,
        "jobs": job_records,
        "deletion_receipts": receipts,
        "privacy_requests": requests,
        "usage": _usage_of(account_id, usage_store) if usage_store is not None else [],
        "flags": {"opted_out_of_sale_and_sharing": is_opted_out(client, account_id)},
        "not_held": ["original photos and videos after generation", "face data after "
                     "generation", "device keys", "file names", "precise location"],
    }


def answer_right_to_know(account_id: str, jobs: JobStore, usage_store: ObjectStore | None = None,
                         *, now_s: float | None = None) -> dict:
    """The export GET: ``export_account``, recorded as a completed right-to-know request
    (by pseudonym, listed in the export it answers) when the service holds anything of the
    account. For an id it holds nothing of (never seen, or deleted) nothing is written: a
    read of an unknown id leaves no trace, and no key names it."""
    export = export_account(account_id, jobs, usage_store)
    if not holds_anything(export):
        return export
    request = PrivacyRequests(jobs.redis).record_completed(RequestKind.KNOW, account_id,
                                                           now_s=now_s)
    export["privacy_requests"].append(_request_view(request))
    return export


def holds_anything(export: dict) -> bool:
    """Whether an export lists any piece of data (a choice counts)."""
    sections = ("outputs", "jobs", "deletion_receipts", "privacy_requests", "usage")
    return any(export[s] for s in sections) or any(export["flags"].values())


def _request_view(r: PrivacyRequest) -> dict:
    return {"request_id": r.request_id, "kind": str(r.kind), "received_s": r.received_s,
            "acknowledged_s": r.acknowledged_s, "completed_s": r.completed_s,
            "receipt_id": r.receipt_id or None}


def _usage_of(account_id: str, store: ObjectStore) -> list[dict]:
    """The account's usage events (read from every usage file: O(usage data))."""
    from pipeline.privacy.usage import read_events

    ref = account_ref(account_id)
    return [{k: v for k, v in row.items() if k != "account_ref"}
            for row in read_events(store).to_pylist() if row["account_ref"] == ref]


def _place(uri: str) -> str:
    """Provider and bucket of an input (never the object key)."""
    scheme, _, rest = uri.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}" if scheme in ("s3", "gs") else scheme
