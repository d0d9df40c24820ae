"""Purging: delete stored objects, verify each is gone, and drop its retention record.

Used on the job-success and job-failure events (the job's inputs and face data) and by the
background sweep (anything past its hard-ceiling deadline). Idempotent: an object already
missing counts as purged. A record leaves the ledger only after its object is verified gone,
so a crash at any point leaves the record for the next sweep.
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Callable
from typing import Protocol

from pipeline.core.config import RetentionConfig
from pipeline.core.errors import StorageError
from pipeline.core.records import (
    PURGED_WITH_INPUTS,
    DeletionReceipt,
    ObjectClass,
    RetentionRecord,
    WorkItem,
)
from pipeline.core.retry import RetryPolicy, retry_call
from pipeline.security import crypto
from pipeline.security.pseudonyms import keyed_id
from pipeline.state import keys
from pipeline.state.job_store import JobStore
from pipeline.state.ledger import RetentionLedger
from pipeline.state.receipts import ReceiptLedger
from pipeline.storage.base import (
    FACE_PREFIX,
    INPUT_PREFIX,
    OUTPUT_PREFIX,
    WORK_PREFIX,
    LocalObjectStore,
    ObjectStore,
    StoreSet,
    delete_verified,
    face_key,
    key_from_uri,
    object_uri,
    work_key,
)

PURGED_ON_EVENT = PURGED_WITH_INPUTS


class ReceiptSink(Protocol):
    """Where verified deletions are chained (ReceiptLedger in Redis)."""

    def append(self, receipt_id: str, receipt: DeletionReceipt, *, account_id: str,
               requested_s: float) -> object: ...


class PurgeLedger(Protocol):
    """What purging needs of the retention ledger: RetentionLedger in Redis; the unit tests
    pass an in-memory one (tests/unit/fakes.py) and run the same tests on both."""

    def get(self, uri: str) -> RetentionRecord | None: ...
    def records_for_job(self, job_id: str) -> list[RetentionRecord]: ...
    def due_uris(self, now_s: float, limit: int = 100) -> list[str]: ...
    def try_claim(self, uri: str, owner: str, lease_s: float) -> bool: ...
    def release(self, uri: str) -> None: ...
    def complete(self, rec: RetentionRecord) -> None: ...
    def defer(self, uri: str, until_s: float) -> None: ...
    def note_purge_failure(self) -> None: ...
    def receipts(self) -> ReceiptSink: ...
FOREIGN_RETRY_S = 3600.0  # a record of a store this worker does not have
TEMPORARY_FILE_MAX_AGE_S = 600.0  # a local write takes milliseconds; older ones are debris


def purge_receipt_id(job_id: str) -> str:
    """The receipt under which the service's own purges of a job's objects are chained:
    stable for the job (purges retried later join it), but keyed, so nobody can derive it
    from a job id."""
    return "purge-" + keyed_id("purge", job_id)


def deadline_for(object_class: ObjectClass, created_s: float, cfg: RetentionConfig) -> float:
    """Hard-ceiling deadline of a new object. Outputs have none (kept until the user deletes)."""
    if object_class in (ObjectClass.INPUT, ObjectClass.WORK_DATA):
        return created_s + cfg.input_ceiling_h * 3600.0
    if object_class == ObjectClass.FACE_DATA:
        return created_s + cfg.face_data_ceiling_h * 3600.0
    return float("inf")


def store_with_inputs(stores: StoreSet, jobs: JobStore, item: WorkItem, plain: bytes,
                      object_class: ObjectClass, cfg: RetentionConfig) -> str:
    """Store data derived from a job's inputs (face data, a clip's finished frames):
    encrypted under the job's key, beside the inputs (same region), its retention record
    written first. If the job ended meanwhile (its runner died, or it timed out), the
    record is made due at once, so the sweep removes what no purge of the job will look for
    any more. Returns the object's URI."""
    store, _ = stores.locate(item.input_uris[0])
    key_for = {ObjectClass.FACE_DATA: face_key, ObjectClass.WORK_DATA: work_key}[object_class]
    uri = object_uri(store, key_for(item.job_id, uuid.uuid4().hex))
    now = time.time()
    jobs.ledger.register([RetentionRecord(
        uri=uri, object_class=object_class, account_id=item.account_id, job_id=item.job_id,
        created_s=now, deadline_s=deadline_for(object_class, now, cfg),
        provider=store.provider, region=store.region, bucket=store.bucket)])
    store.put(key_from_uri(store, uri), crypto.encrypt(plain, item.device_key, uri=uri),
              customer_key=item.device_key)
    if jobs.is_finished(item.job_id):
        jobs.ledger.expedite_job(item.job_id, (object_class,), time.time())
    return uri


def purge_records(
    records: list[RetentionRecord],
    stores: StoreSet,
    ledger: PurgeLedger,
    *,
    owner: str,
    cfg: RetentionConfig,
    receipt_id: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> list[DeletionReceipt]:
    """Delete and verify each record's object; one receipt per object verified gone.

    A record another worker holds a live claim on is skipped (that worker purges it). An
    object that still fails after ``cfg.purge_max_attempts`` keeps its record and its claim
    expires, so the sweep retries it before the deadline matters.
    """
    receipts = []
    chain = ledger.receipts()
    policy = RetryPolicy(max_tries=cfg.purge_max_attempts)  # tries per object, then the sweep
    for rec in records:
        if not ledger.try_claim(rec.uri, owner, cfg.lease_s):
            continue
        if ledger.get(rec.uri) is None:  # purged by another worker since it was read
            ledger.release(rec.uri)
            continue
        claimed_s = time.time()
        try:
            store, key = stores.locate(rec.uri)
        except StorageError:  # no store of ours holds it: a worker configured for it purges it
            ledger.release(rec.uri)
            ledger.defer(rec.uri, time.time() + FOREIGN_RETRY_S)
            continue
        try:
            retry_call(functools.partial(delete_verified, store, key), policy=policy,
                       retryable=lambda exc: isinstance(exc, StorageError), sleep=sleep)
        except StorageError:
            ledger.note_purge_failure()
            # Retry after the lease; meanwhile other due records get their turn.
            ledger.defer(rec.uri, time.time() + cfg.lease_s)
            continue
        receipt = DeletionReceipt(uri=rec.uri, object_class=rec.object_class,
                                  job_id=rec.job_id, deleted_at_s=time.time(),
                                  verified_gone=True)
        # Receipt first, then drop the record: a crash in between re-verifies the
        # (already missing) object and writes a second receipt; nothing is lost.
        chain.append(receipt_id or purge_receipt_id(rec.job_id), receipt, account_id=rec.account_id,
                     requested_s=claimed_s)
        ledger.complete(rec)
        receipts.append(receipt)
    return receipts


def purge_job(job_id: str, stores: StoreSet, ledger: PurgeLedger, *, owner: str,
              cfg: RetentionConfig, receipt_id: str | None = None) -> list[DeletionReceipt]:
    """Purge a finished job's inputs and face data (not its outputs)."""
    records = [r for r in ledger.records_for_job(job_id) if r.object_class in PURGED_ON_EVENT]
    return purge_records(records, stores, ledger, owner=owner, cfg=cfg, receipt_id=receipt_id)


def sweep_due(stores: StoreSet, ledger: PurgeLedger, *, owner: str, cfg: RetentionConfig,
              now_s: float | None = None, limit: int = 500) -> list[DeletionReceipt]:
    """Purge every object whose hard-ceiling deadline has passed."""
    now = time.time() if now_s is None else now_s
    records = [r for r in (ledger.get(u) for u in ledger.due_uris(now, limit)) if r is not None]
    return purge_records(records, stores, ledger, owner=owner, cfg=cfg)


def purge_finished_job(job_id: str, stores: StoreSet, jobs: JobStore, *, owner: str,
                       cfg: RetentionConfig, receipt_id: str | None = None) -> int:
    """Purge a succeeded or failed job's inputs and face data and note it on the job.

    Once nothing of the job's inputs and face data is left in the ledger, the job record
    gets ``inputs_purged_s``. Returns how many objects this call verified gone.
    """
    if receipt_id is None:  # the service's own purge: a receipt the API can show
        receipt_id = ReceiptLedger(jobs.redis).open_request(
            kind="job_purge", account_id=jobs.account_of(job_id), subject=job_id,
            receipt_id=purge_receipt_id(job_id))
    receipts = purge_job(job_id, stores, jobs.ledger, owner=owner, cfg=cfg, receipt_id=receipt_id)
    note_purges(jobs, receipts, also_check=[job_id])
    if receipt_id == purge_receipt_id(job_id):
        left = [r for r in jobs.ledger.records_for_job(job_id) if r.object_class in PURGED_ON_EVENT]
        ReceiptLedger(jobs.redis).close_request(receipt_id, complete=not left)
    return len(receipts)


def note_purges(jobs: JobStore, receipts: list[DeletionReceipt], *,
                also_check: tuple[str, ...] | list[str] = ()) -> None:
    """Record on each affected job how many inputs were verified gone, and when all were."""
    by_job: dict[str, int] = {job_id: 0 for job_id in also_check}
    for receipt in receipts:
        if receipt.job_id:
            by_job[receipt.job_id] = by_job.get(receipt.job_id, 0) + (
                receipt.object_class == ObjectClass.INPUT)
    for job_id, num_inputs in by_job.items():
        left = [r for r in jobs.ledger.records_for_job(job_id)
                if r.object_class in PURGED_ON_EVENT]
        jobs.record_purge(job_id, num_inputs_verified=num_inputs, complete=not left)


RECONCILE_RECEIPT_ID = "reconcile"
USAGE_RECEIPT_ID = "usage-ttl"


def reconcile(stores: StoreSet, ledger: RetentionLedger, *, owner: str, cfg: RetentionConfig,
              now_s: float | None = None) -> list[DeletionReceipt]:
    """Delete every input or face-data object with no live record or past its deadline.

    Catches orphans of a crash or of lost Redis writes. Safe while jobs run: a record is
    always written before its object, so an object with no record is never in use.
    """
    now = time.time() if now_s is None else now_s
    chain = ReceiptLedger(ledger.redis)
    receipts: list[DeletionReceipt] = []
    for store in stores.all():
        if isinstance(store, LocalObjectStore):
            store.clean_temporary(older_than_s=TEMPORARY_FILE_MAX_AGE_S)
        receipts += _reconcile_store(store, stores, ledger, chain, owner=owner, cfg=cfg, now_s=now)
    return receipts


def _reconcile_store(store: ObjectStore, stores: StoreSet, ledger: RetentionLedger,
                     chain: ReceiptLedger, *, owner: str, cfg: RetentionConfig,
                     now_s: float) -> list[DeletionReceipt]:
    receipts: list[DeletionReceipt] = []
    for prefix in (INPUT_PREFIX, FACE_PREFIX, WORK_PREFIX):
        for key in store.list_keys(prefix):
            uri = object_uri(store, key)
            rec = ledger.get(uri)
            if rec is not None:
                if rec.deadline_s <= now_s:
                    receipts += purge_records([rec], stores, ledger, owner=owner, cfg=cfg)
                continue
            receipts += _delete_orphan(store, key, "orphan", ledger, chain, now_s=now_s)
    receipts += _reconcile_outputs(store, ledger, chain, now_s=now_s)
    receipts += _expire_usage(store, chain, cfg=cfg, now_s=now_s)
    return receipts


def _reconcile_outputs(store: ObjectStore, ledger: RetentionLedger, chain: ReceiptLedger, *,
                       now_s: float) -> list[DeletionReceipt]:
    """An output object with neither an index entry nor a pending record belongs to no one
    (a crash between writing and indexing, after the pending record was lost): delete it.
    Never one in use: an output gets its pending record before it is written, and indexing
    swaps the pending record for the index entry in one MULTI. So the pending record is
    read first: once it is gone, the index entry already exists (or the output was
    deleted). Reading the index first could miss both, between the two reads."""
    receipts = []
    for key in store.list_keys(OUTPUT_PREFIX):
        output_id = key.rsplit("/", 1)[-1].split(".", 1)[0]
        uri = object_uri(store, key)
        if ledger.get(uri) is not None or ledger.redis.exists(keys.output(output_id)):
            continue
        receipts += _delete_orphan(store, key, "orphan_output", ledger, chain, now_s=now_s)
    return receipts


def _delete_orphan(store: ObjectStore, key: str, object_class: str, ledger: RetentionLedger,
                   chain: ReceiptLedger, *, now_s: float) -> list[DeletionReceipt]:
    """Delete an object no record accounts for, verified, with a receipt ([] on failure)."""
    try:
        delete_verified(store, key)
    except StorageError:
        ledger.note_purge_failure()
        return []
    receipt = DeletionReceipt(uri=object_uri(store, key), object_class=object_class, job_id="",
                              deleted_at_s=time.time(), verified_gone=True)
    chain.append(RECONCILE_RECEIPT_ID, receipt, account_id="", requested_s=now_s)
    return [receipt]


def _expire_usage(store: ObjectStore, chain: ReceiptLedger, *, cfg: RetentionConfig,
                  now_s: float) -> list[DeletionReceipt]:
    """Usage data past ``usage_ttl_days``: deleted, verified, with receipts."""
    from pipeline.privacy.usage import expired_usage_keys

    receipts = []
    for key in expired_usage_keys(store, ttl_days=cfg.usage_ttl_days, now_s=now_s):
        try:
            delete_verified(store, key)
        except StorageError:
            continue
        receipt = DeletionReceipt(uri=object_uri(store, key), object_class="usage_data",
                                  job_id="", deleted_at_s=time.time(), verified_gone=True)
        chain.append(USAGE_RECEIPT_ID, receipt, account_id="", requested_s=now_s)
        receipts.append(receipt)
    return receipts
