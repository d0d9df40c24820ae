"""User deletion: one output, or a whole account. Each object is deleted, verified gone,
and written to the hash-chained receipt ledger under the request's receipt id.

Only an explicit request deletes anything: uninstalling the app sends none.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import redis

from pipeline.core.config import RetentionConfig
from pipeline.core.errors import NotFound
from pipeline.core.reasons import Reason
from pipeline.core.records import DeletionReceipt, ObjectClass
from pipeline.privacy.usage import forget_account
from pipeline.retention.purge import purge_finished_job
from pipeline.security.pseudonyms import account_ref
from pipeline.state import keys
from pipeline.state.job_store import JobStore
from pipeline.state.receipts import ReceiptLedger
from pipeline.storage.base import OUTPUT_PREFIX, StoreSet, account_digest, delete_verified, object_uri


def delete_output(account_id: str, output_id: str, stores: StoreSet, jobs: JobStore) -> str:
    """Delete one output now and verify it is gone; returns the receipt id.

    Raises NotFound if the account has no such output (another account's counts as none).
    """
    out = jobs.get_output(account_id, output_id)
    chain = ReceiptLedger(jobs.redis)
    receipt_id = chain.open_request(kind="output", account_id=account_id, subject=out.uri)
    requested_s = time.time()
    delete_verified(*stores.locate(out.uri))
    chain.append(receipt_id, DeletionReceipt(out.uri, "output", out.job_id, time.time(), True),
                 account_id=account_id, requested_s=requested_s)
    jobs.remove_output(out)
    chain.close_request(receipt_id, complete=True)
    return receipt_id


def discard_outputs(account_id: str, output_ids: list[str], stores: StoreSet,
                    jobs: JobStore) -> int:
    """Delete outputs of an abandoned attempt (a late answer after a retry); how many."""
    count = 0
    for output_id in output_ids:
        try:
            delete_output(account_id, output_id, stores, jobs)
            count += 1
        except NotFound:
            continue
    return count


TOMBSTONE_AFTER_S = 86400  # no new job for a deleted account id for a day after


def request_account_deletion(account_id: str, jobs: JobStore) -> str:
    """Record the request durably (a retention actor carries it out); returns the receipt id.

    Sets the account's tombstone first, so no new job or output can appear for it. A second
    request while one is pending returns the pending receipt.
    """
    chain = ReceiptLedger(jobs.redis)
    tombstone = keys.account_tombstone(account_id)
    receipt_id = chain.new_request_id()
    if not jobs.redis.set(tombstone, receipt_id, nx=True):
        existing = (jobs.redis.get(tombstone) or b"").decode()
        if existing and existing in pending_account_deletions(jobs.redis):
            return existing
        jobs.redis.set(tombstone, receipt_id)
    chain.open_request(kind="account", account_id=account_id,
                       subject=f"account:{account_id}", receipt_id=receipt_id)
    jobs.redis.hset(keys.PENDING_ACCOUNT_DELETIONS, receipt_id, account_id)
    return receipt_id


def pending_account_deletions(client: redis.Redis) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in client.hgetall(keys.PENDING_ACCOUNT_DELETIONS).items()}


_RELEASE_IF_OWNER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def delete_account(account_id: str, receipt_id: str, stores: StoreSet, jobs: JobStore, *,
                   owner: str, cfg: RetentionConfig) -> int:
    """Delete every output, index entry, job record (minimised ones too) and pending input
    of the account.

    Idempotent and resumable: a crash part-way leaves the request pending, and running it
    again finishes the work. One worker per account at a time (a leased lock, renewed as it
    goes). Returns the number of objects verified gone by this call.
    """
    lock = keys.account_deletion_lock(account_id)
    token = f"{owner}:{uuid.uuid4().hex}"
    lease_ms = max(1, int(cfg.lease_s * 1000))
    if not jobs.redis.set(lock, token, nx=True, px=lease_ms):
        return 0  # another retention actor is on it; its lease expires if it dies
    try:
        return _delete_account(account_id, receipt_id, stores, jobs, owner=owner, cfg=cfg,
                               keep_lock=lambda: jobs.redis.pexpire(lock, lease_ms))
    finally:
        jobs.redis.register_script(_RELEASE_IF_OWNER)(keys=[lock], args=[token])


def _account_jobs(account_id: str, jobs: JobStore) -> list[str]:
    """Every job record of the account: those in its index, then the minimised ones (a job
    minimised between the two reads is in the second)."""
    return jobs.account_job_ids(account_id) + jobs.minimised_job_ids(account_id)


def _delete_account(account_id: str, receipt_id: str, stores: StoreSet, jobs: JobStore, *,
                    owner: str, cfg: RetentionConfig, keep_lock: Callable[[], object]) -> int:
    chain = ReceiptLedger(jobs.redis)
    requested_s = time.time()
    count = 0
    # 1. Jobs: end the running ones, purge their inputs and face data, drop their records,
    #    minimised ones included (they left the account's index, not the account).
    #    (The tombstone already stops their outputs from being indexed.)
    for job_id in _account_jobs(account_id, jobs):
        keep_lock()
        jobs.finish_job(job_id, ok=False, reason=Reason.ACCOUNT_DELETED)
        count += purge_finished_job(job_id, stores, jobs, owner=owner, cfg=cfg,
                                    receipt_id=receipt_id)
        if not [r for r in jobs.ledger.records_for_job(job_id) if r.object_class != ObjectClass.OUTPUT]:
            jobs.forget_job(job_id, account_id)
    # 2. Outputs in the index, then anything left under the account's folder.
    for out in jobs.list_outputs(account_id):
        keep_lock()
        delete_verified(*stores.locate(out.uri))
        chain.append(receipt_id, DeletionReceipt(out.uri, "output", out.job_id, time.time(), True),
                     account_id=account_id, requested_s=requested_s)
        jobs.remove_output(out)
        count += 1
    store = stores.outputs
    for key in store.list_keys(f"{OUTPUT_PREFIX}{account_digest(account_id)}/"):
        keep_lock()
        uri = object_uri(store, key)
        delete_verified(store, key)
        chain.append(receipt_id, DeletionReceipt(uri, "output", "", time.time(), True),
                     account_id=account_id, requested_s=requested_s)
        count += 1
    done = not _account_jobs(account_id, jobs) and not jobs.list_outputs(account_id)
    if done:
        jobs.redis.hdel(keys.PENDING_ACCOUNT_DELETIONS, receipt_id)
        jobs.redis.expire(keys.account_tombstone(account_id), TOMBSTONE_AFTER_S)
        # The account's indexes and choices go too; receipts and privacy requests stay,
        # under their own ids and with the account's pseudonym only (proof of deletion).
        jobs.redis.delete(keys.account_receipts(account_id),
                          keys.account_privacy_requests(account_ref(account_id)),
                          keys.account_opt_out(account_id))
        # Its usage rows go as well; until then (and for any copy) it is never shared.
        jobs.redis.sadd(keys.OPTED_OUT_REFS, account_ref(account_id))
        forget_account(stores.outputs, account_ref(account_id))
    chain.close_request(receipt_id, complete=done)
    return count
