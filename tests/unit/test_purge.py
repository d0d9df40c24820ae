"""retention: purging, as pure logic on an in-memory ledger and a local store. Each object
is deleted and verified gone, a receipt is chained, and only then does its record leave
the ledger; claims keep two workers off one object; store errors are retried, then left
for the sweep; a record of a store this worker lacks waits for a worker that has it.

tests/integration/test_purge_on_redis.py runs these same tests on the Redis ledger.
"""

from __future__ import annotations

import time
import uuid

import pytest

from pipeline.core.config import RetentionConfig
from pipeline.core.records import PURGED_WITH_INPUTS, ObjectClass, RetentionRecord
from pipeline.retention.purge import (
    FOREIGN_RETRY_S,
    purge_job,
    purge_receipt_id,
    purge_records,
    sweep_due,
)
from pipeline.storage.base import StoreSet, face_key, input_key, object_uri, output_key
from tests.unit.fakes import FlakyStore, MemoryLedger

FAST = RetentionConfig(lease_s=5, purge_max_attempts=3)


@pytest.fixture()
def ledger():
    return MemoryLedger()


@pytest.fixture()
def store(tmp_path) -> FlakyStore:
    return FlakyStore(f"file://{tmp_path / 'store'}", failures=0)


def stored(store, ledger, *, job_id: str | None = None, object_class=ObjectClass.INPUT,
           deadline_s: float | None = None) -> RetentionRecord:
    """An object in the store with its retention record (written first, as in the app)."""
    job_id = job_id or uuid.uuid4().hex
    make_key = {ObjectClass.INPUT: input_key, ObjectClass.FACE_DATA: face_key}.get(
        object_class, lambda j, o: output_key("acct", o, "png"))
    key = make_key(job_id, uuid.uuid4().hex)
    now = time.time()
    rec = RetentionRecord(uri=object_uri(store, key), object_class=object_class,
                          account_id="acct-p", job_id=job_id, created_s=now,
                          deadline_s=now + 3600 if deadline_s is None else deadline_s)
    ledger.register([rec])
    store.put(key, b"ciphertext")
    return rec


def exists(store, rec: RetentionRecord) -> bool:
    return store.exists(rec.uri[len(store.url) + 1:])


def test_a_purge_deletes_verifies_chains_a_receipt_then_drops_the_record(store, ledger):
    rec = stored(store, ledger)

    receipts = purge_records([rec], StoreSet.single(store), ledger, owner="w", cfg=FAST)

    assert [(r.uri, r.verified_gone, r.object_class) for r in receipts] == [
        (rec.uri, True, ObjectClass.INPUT)]
    assert not exists(store, rec) and ledger.get(rec.uri) is None
    assert ledger.due_uris(float("inf")) == []
    chained = ledger.receipts().appended
    assert [(rid, r.uri, acct) for rid, r, acct in chained] == [
        (purge_receipt_id(rec.job_id), rec.uri, "acct-p")]


def test_an_object_already_gone_counts_as_purged(store, ledger):
    rec = stored(store, ledger)
    store.delete(rec.uri[len(store.url) + 1:])

    receipts = purge_records([rec], StoreSet.single(store), ledger, owner="w", cfg=FAST)

    assert [r.verified_gone for r in receipts] == [True] and ledger.get(rec.uri) is None


def test_a_record_another_worker_claimed_is_left_to_it(store, ledger):
    rec = stored(store, ledger)
    assert ledger.try_claim(rec.uri, "other-worker", FAST.lease_s)

    assert purge_records([rec], StoreSet.single(store), ledger, owner="w", cfg=FAST) == []
    assert exists(store, rec) and ledger.get(rec.uri) == rec
    ledger.release(rec.uri)  # its lease ran out: now this worker takes it
    assert len(purge_records([rec], StoreSet.single(store), ledger, owner="w", cfg=FAST)) == 1


def test_a_stale_copy_of_a_purged_record_is_neither_purged_nor_counted_again(store, ledger):
    """Two workers read the same due list; the second finds the record gone, writes no
    second receipt and leaves no claim behind."""
    rec = stored(store, ledger)
    assert len(purge_records([rec], StoreSet.single(store), ledger, owner="a", cfg=FAST)) == 1

    assert purge_records([rec], StoreSet.single(store), ledger, owner="b", cfg=FAST) == []
    assert len(ledger.receipts().appended) == 1
    assert ledger.try_claim(rec.uri, "c", FAST.lease_s)  # "b" released its claim


def test_store_errors_are_retried_with_capped_backoff_then_succeed(store, ledger):
    rec = stored(store, ledger)
    store.failures = 2
    waits: list[float] = []

    receipts = purge_records([rec], StoreSet.single(store), ledger, owner="w", cfg=FAST,
                             sleep=waits.append)

    assert len(receipts) == 1 and not exists(store, rec) and ledger.get(rec.uri) is None
    assert len(waits) == 2
    assert all(0 <= w <= min(2.0, 0.05 * 2**i) for i, w in enumerate(waits))  # backoff_s


def test_a_store_that_stays_down_keeps_the_record_counts_a_failure_and_defers_it(store,
                                                                                ledger):
    rec = stored(store, ledger, deadline_s=time.time() - 1)  # due now
    store.failures = 100

    before = time.time()
    assert purge_records([rec], StoreSet.single(store), ledger, owner="w", cfg=FAST,
                         sleep=lambda s: None) == []

    assert exists(store, rec) and ledger.get(rec.uri) == rec  # kept for the sweep
    assert ledger.purge_failures == 1
    assert rec.uri not in ledger.due_uris(before)  # others get their turn first...
    assert ledger.due_uris(time.time() + FAST.lease_s + 1) == [rec.uri]  # ...then it again
    assert ledger.receipts().appended == []
    store.failures = 0
    ledger.release(rec.uri)
    assert len(purge_records([rec], StoreSet.single(store), ledger, owner="w", cfg=FAST)) == 1


def test_a_record_of_a_store_this_worker_lacks_waits_for_one_that_has_it(store, ledger):
    now = time.time()
    rec = RetentionRecord(uri="gs://eph-inputs-asia/inputs/j/x.bin",
                          object_class=ObjectClass.INPUT, account_id="acct-p", job_id="j",
                          created_s=now, deadline_s=now - 1)
    ledger.register([rec])

    assert purge_records([rec], StoreSet.single(store), ledger, owner="w", cfg=FAST) == []

    assert ledger.get(rec.uri) == rec and ledger.purge_failures == 0
    assert ledger.due_uris(time.time()) == []
    assert ledger.due_uris(time.time() + FOREIGN_RETRY_S + 1) == [rec.uri]
    assert ledger.try_claim(rec.uri, "gcs-worker", FAST.lease_s)  # released for it


def test_a_crash_before_the_receipt_leaves_the_record_for_the_next_purge(store, ledger):
    """A record leaves the ledger only after its receipt: a worker that dies in between
    leaves it, and the next purge re-verifies the (already missing) object and chains the
    receipt."""
    rec = stored(store, ledger)
    ledger.receipts().fail_next = 1

    with pytest.raises(ConnectionError):
        purge_records([rec], StoreSet.single(store), ledger, owner="w", cfg=FAST)

    assert not exists(store, rec) and ledger.get(rec.uri) == rec
    ledger.release(rec.uri)  # the dead worker's lease runs out
    receipts = purge_records([rec], StoreSet.single(store), ledger, owner="w2", cfg=FAST)
    assert len(receipts) == 1 and ledger.get(rec.uri) is None
    assert [r.uri for _, r, _ in ledger.receipts().appended] == [rec.uri]


def test_a_given_receipt_id_gathers_the_receipts_of_a_request(store, ledger):
    recs = [stored(store, ledger), stored(store, ledger)]

    purge_records(recs, StoreSet.single(store), ledger, owner="w", cfg=FAST,
                  receipt_id="deletion-1")

    assert [rid for rid, _, _ in ledger.receipts().appended] == ["deletion-1", "deletion-1"]


def test_purging_a_job_takes_its_inputs_and_face_data_and_never_its_outputs(store, ledger):
    job_id = uuid.uuid4().hex
    inputs = stored(store, ledger, job_id=job_id)
    face = stored(store, ledger, job_id=job_id, object_class=ObjectClass.FACE_DATA)
    output = stored(store, ledger, job_id=job_id, object_class=ObjectClass.OUTPUT)
    other_job = stored(store, ledger)

    receipts = purge_job(job_id, StoreSet.single(store), ledger, owner="w", cfg=FAST)

    assert sorted(r.uri for r in receipts) == sorted([inputs.uri, face.uri])
    assert {r.object_class for r in receipts} <= set(PURGED_WITH_INPUTS)
    assert not exists(store, inputs) and not exists(store, face)
    assert exists(store, output) and ledger.get(output.uri) == output
    assert exists(store, other_job)


def test_the_sweep_purges_only_what_is_past_its_deadline(store, ledger):
    now = time.time()
    overdue = stored(store, ledger, deadline_s=now - 1)
    later = stored(store, ledger, deadline_s=now + 3600)

    receipts = sweep_due(StoreSet.single(store), ledger, owner="sweeper", cfg=FAST, now_s=now)

    assert [r.uri for r in receipts] == [overdue.uri]
    assert not exists(store, overdue) and exists(store, later)
    assert ledger.get(later.uri) == later
