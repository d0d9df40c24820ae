"""Retention ledger durability, receipts, reconciler and account deletion against a real
Redis server and a real local store (no Ray)."""

from __future__ import annotations

import json
import time
import uuid

import pytest
import redis

from pipeline.core.config import RetentionConfig
from pipeline.core.errors import NotFound
from pipeline.core.records import JobRecord, OutputRecord, RetentionRecord
from pipeline.retention.deletion import delete_account, delete_output, request_account_deletion
from pipeline.retention.purge import purge_finished_job, reconcile
from pipeline.security import crypto
from pipeline.state import keys
from pipeline.state.job_store import JobStore
from pipeline.state.receipts import ReceiptLedger, verify_chain
from pipeline.state.redis_server import RedisServer
from pipeline.storage.base import (
    LocalObjectStore,
    StoreSet,
    face_key,
    input_key,
    key_from_uri,
    object_uri,
    output_key,
)
from serve.cli import main as cli

CFG = RetentionConfig(lease_s=5, purge_max_attempts=2)


@pytest.fixture()
def private_redis(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture()
def jobs(private_redis) -> JobStore:
    return JobStore(redis.Redis.from_url(private_redis.url))


@pytest.fixture()
def store(tmp_path) -> LocalObjectStore:
    return LocalObjectStore(f"file://{tmp_path / 'store'}")


def make_job(store, jobs, *, account="acct-r", num_inputs=2, finished=False) -> JobRecord:
    """A registered job whose encrypted inputs (and one face-data object) are stored."""
    job_id, now, key = uuid.uuid4().hex, time.time(), crypto.new_device_key()
    uris = [object_uri(store, input_key(job_id, uuid.uuid4().hex)) for _ in range(num_inputs)]
    face = object_uri(store, face_key(job_id, uuid.uuid4().hex))
    records = [RetentionRecord(u, "input", account, job_id, now, now + 3600) for u in uris]
    records.append(RetentionRecord(face, "face_data", account, job_id, now, now + 3600))
    job = JobRecord(job_id=job_id, account_id=account, kind="ai_photo", style="portrait",
                    resolution_px=64, status="queued", created_s=now, updated_s=now,
                    input_uris=uris)
    jobs.create_job(job, records)
    for rec in records:
        store.put(key_from_uri(store, rec.uri), crypto.encrypt(b"pixels", key, uri=rec.uri))
    if finished:
        assert jobs.claim_job(job_id, "runner-test")  # only a running job can succeed
        jobs.finish_job(job_id, ok=True, output_ids=())
    return job


def finished_job_with_outputs(store, jobs, num_outputs: int, *, account="acct-r"):
    """A succeeded job and its indexed outputs (indexed while it ran, as the stage does)."""
    job = make_job(store, jobs, account=account)
    outputs = [make_output(store, jobs, job) for _ in range(num_outputs)]
    assert jobs.claim_job(job.job_id, "runner-test")
    jobs.finish_job(job.job_id, ok=True, output_ids=tuple(o.output_id for o in outputs))
    return job, outputs


def make_output(store, jobs, job: JobRecord) -> OutputRecord:
    output_id = uuid.uuid4().hex
    key = output_key(job.account_id, output_id, "png")
    store.put(key, b"\x89PNG fake output")
    out = OutputRecord(output_id, job.account_id, job.job_id, object_uri(store, key),
                       "image/png", time.time())
    pending = RetentionRecord(out.uri, "output", job.account_id, job.job_id, out.created_s,
                              out.created_s + 3600)
    jobs.ledger.register([pending])
    assert jobs.add_output(out, pending)
    return out


def test_records_survive_kill_9_and_restart_then_every_input_is_purged(private_redis, store,
                                                                       jobs):
    made = [make_job(store, jobs) for _ in range(5)]
    before = {j.job_id: jobs.ledger.records_for_job(j.job_id) for j in made}
    private_redis.kill()  # SIGKILL: no shutdown hook, no final AOF rewrite
    private_redis.start()
    after_jobs = JobStore(redis.Redis.from_url(private_redis.url))
    for job in made:
        assert after_jobs.ledger.records_for_job(job.job_id) == before[job.job_id]
        after_jobs.finish_job(job.job_id, ok=False, reason="test")
        purge_finished_job(job.job_id, StoreSet.single(store), after_jobs, owner="t", cfg=CFG)
    assert store.list_keys("inputs/") == [] and store.list_keys("face/") == []
    assert after_jobs.ledger.count() == 0


def test_every_purge_is_chained_and_tampering_is_detected(store, jobs, private_redis):
    for _ in range(3):
        job = make_job(store, jobs, finished=True)
        purge_finished_job(job.job_id, StoreSet.single(store), jobs, owner="t", cfg=CFG)
    client = jobs.redis
    entries = [json.loads(e) for e in client.lrange(keys.RECEIPT_CHAIN, 0, -1)]
    assert len(entries) == 9 and verify_chain(client) == []
    assert all(e["result"] == "verified_gone" for e in entries)
    # Receipts hold a hash of the URI, never the URI or any content.
    assert all("inputs/" not in json.dumps(e) and store.url not in json.dumps(e)
               for e in entries)
    args = ["retention", "verify-ledger", "--redis-url", private_redis.url]
    assert cli(args) == 0

    original = client.lindex(keys.RECEIPT_CHAIN, 4)
    edited = json.loads(original)
    edited["verified_s"] -= 3600  # backdate a deletion
    client.lset(keys.RECEIPT_CHAIN, 4, json.dumps(edited, sort_keys=True))
    assert any("entry 4" in p for p in verify_chain(client)) and cli(args) == 1
    client.lset(keys.RECEIPT_CHAIN, 4, original)
    assert verify_chain(client) == []

    client.lrem(keys.RECEIPT_CHAIN, 1, client.lindex(keys.RECEIPT_CHAIN, 2))  # drop an entry
    assert verify_chain(client) != []


def test_truncating_the_chain_is_detected(store, jobs):
    job = make_job(store, jobs, finished=True)
    purge_finished_job(job.job_id, StoreSet.single(store), jobs, owner="t", cfg=CFG)
    jobs.redis.rpop(keys.RECEIPT_CHAIN)
    assert any("truncated" in p for p in verify_chain(jobs.redis))


def test_reconciler_deletes_orphans_and_overdue_objects_only(store, jobs, private_redis):
    live = make_job(store, jobs)
    orphan_key = input_key(uuid.uuid4().hex, "orphan")  # as after a crash lost its record
    store.put(orphan_key, b"ciphertext with no record")
    orphan_face = face_key(uuid.uuid4().hex, "orphan")  # face data whose record was lost
    store.put(orphan_face, b"an embedding with no record")
    overdue = make_job(store, jobs)
    for rec in jobs.ledger.records_for_job(overdue.job_id):
        jobs.ledger.redis.zadd(keys.RETENTION_DUE, {rec.uri: 0}, xx=True)
        jobs.ledger.redis.hset(keys.retention_record(rec.uri), "deadline_s", "0")
    receipts = reconcile(StoreSet.single(store), jobs.ledger, owner="t", cfg=CFG)
    assert sum(r.object_class == "orphan" for r in receipts) == 2
    assert not store.exists(orphan_key) and not store.exists(orphan_face)
    assert store.list_keys(f"inputs/{overdue.job_id}/") == []
    assert len(store.list_keys(f"inputs/{live.job_id}/")) == 2  # in use: untouched
    # A second pass finds nothing; the CLI runs the same pass.
    assert reconcile(StoreSet.single(store), jobs.ledger, owner="t", cfg=CFG) == []
    assert cli(["retention", "reconcile", "--redis-url", private_redis.url,
                "--store-url", store.url]) == 0


def test_delete_output_is_verified_and_receipted(store, jobs):
    job, (keep, gone) = finished_job_with_outputs(store, jobs, 2)
    with pytest.raises(NotFound):
        delete_output("someone-else", gone.output_id, StoreSet.single(store), jobs)
    receipt_id = delete_output(job.account_id, gone.output_id, StoreSet.single(store), jobs)
    assert not store.exists(key_from_uri(store, gone.uri))
    assert [o.output_id for o in jobs.list_outputs(job.account_id)] == [keep.output_id]
    request = ReceiptLedger(jobs.redis).get_request(receipt_id)
    assert request["status"] == "complete" and len(request["objects"]) == 1
    assert request["objects"][0]["object_class"] == "output"


def test_account_deletion_removes_everything_and_is_resumable(store, jobs):
    done_job, outputs = finished_job_with_outputs(store, jobs, 3, account="acct-del")
    running = make_job(store, jobs, account="acct-del")  # pending inputs
    other, (other_out,) = finished_job_with_outputs(store, jobs, 1, account="acct-keep")
    receipt_id = request_account_deletion("acct-del", jobs)
    assert ReceiptLedger(jobs.redis).get_request(receipt_id)["status"] == "pending"

    delete_account("acct-del", receipt_id, StoreSet.single(store), jobs, owner="t", cfg=CFG)
    request = ReceiptLedger(jobs.redis).get_request(receipt_id)
    assert request["status"] == "complete"
    classes = sorted(o["object_class"] for o in request["objects"])
    # Both jobs' inputs and face data (neither was purged yet) and the three outputs.
    assert classes == ["face_data"] * 2 + ["input"] * 4 + ["output"] * 3
    assert all(not store.exists(key_from_uri(store, o.uri)) for o in outputs)
    assert store.list_keys(f"inputs/{running.job_id}/") == []
    assert jobs.list_outputs("acct-del") == [] and jobs.account_job_ids("acct-del") == []
    for job in (done_job, running):
        with pytest.raises(NotFound):
            jobs.get_job(job.job_id)
    # The other account is untouched.
    assert store.exists(key_from_uri(store, other_out.uri))
    assert jobs.get_job(other.job_id).status == "succeeded"
    # Running it again (a retry after a crash) is harmless.
    assert delete_account("acct-del", receipt_id, StoreSet.single(store), jobs, owner="t", cfg=CFG) == 0


def test_two_actors_deleting_one_account_do_not_double_delete(store, jobs):
    finished_job_with_outputs(store, jobs, 5, account="acct-race")
    receipt_id = request_account_deletion("acct-race", jobs)
    assert request_account_deletion("acct-race", jobs) == receipt_id  # one pending request
    jobs.redis.set(keys.account_deletion_lock("acct-race"), "other-actor", px=5000)
    assert delete_account("acct-race", receipt_id, StoreSet.single(store), jobs, owner="t", cfg=CFG) == 0
    assert len(jobs.list_outputs("acct-race")) == 5  # the lock holder does the work
    jobs.redis.delete(keys.account_deletion_lock("acct-race"))
    delete_account("acct-race", receipt_id, StoreSet.single(store), jobs, owner="t", cfg=CFG)
    objects = ReceiptLedger(jobs.redis).get_request(receipt_id)["objects"]
    assert sum(o["object_class"] == "output" for o in objects) == 5


def test_outputs_are_never_purged_by_time(store, jobs):
    """Uninstalling or waiting deletes nothing: outputs have no deadline, and neither the
    sweep nor the reconciler touches them, even ten years on."""
    from pipeline.retention.purge import sweep_due

    job, (out,) = finished_job_with_outputs(store, jobs, 1)
    purge_finished_job(job.job_id, StoreSet.single(store), jobs, owner="t", cfg=CFG)
    ten_years_s = time.time() + 10 * 365 * 86400
    sweep_due(StoreSet.single(store), jobs.ledger, owner="t", cfg=CFG, now_s=ten_years_s)
    reconcile(StoreSet.single(store), jobs.ledger, owner="t", cfg=CFG, now_s=ten_years_s)
    assert store.exists(key_from_uri(store, out.uri))
    assert [o.output_id for o in jobs.list_outputs(job.account_id)] == [out.output_id]


def test_embedded_redis_falls_back_to_valkey_when_redis_server_is_absent(tmp_path,
                                                                          monkeypatch):
    import shutil

    from pipeline.state import redis_server as module

    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert module.find_server_binary().endswith("valkey-server")
    server = RedisServer(tmp_path / "valkey").start()
    try:
        client = redis.Redis.from_url(server.url)
        client.zadd("k", {"a": 1.0})
        assert client.zrange("k", 0, -1) == [b"a"]
    finally:
        server.stop()


def test_late_outputs_for_a_deleted_account_are_refused_and_removed(store, jobs):
    """A diffusion call that finishes after the account's deletion began leaves nothing."""
    import numpy as np

    from pipeline.core.records import WorkItem
    from pipeline.jobs.stages import JobEnded, store_outputs

    job = make_job(store, jobs, account="acct-late")
    item = WorkItem(job_id=job.job_id, account_id="acct-late", kind="art_style", style="comic",
                    resolution_px=64, input_uris=tuple(job.input_uris),
                    device_key=crypto.new_device_key(), seed=1)
    request_account_deletion("acct-late", jobs)
    with pytest.raises(JobEnded):
        store_outputs(item, [np.zeros((64, 64, 3), np.uint8)], store, jobs, "png")
    assert store.list_keys("outputs/") == [] and jobs.list_outputs("acct-late") == []
    assert [r for r in jobs.ledger.records_for_job(job.job_id) if r.object_class == "output"] == []


def test_an_indexed_output_keeps_no_retention_record(store, jobs):
    import numpy as np

    from pipeline.core.records import WorkItem
    from pipeline.jobs.stages import store_outputs

    job = make_job(store, jobs, account="acct-idx")
    item = WorkItem(job_id=job.job_id, account_id="acct-idx", kind="art_style", style="comic",
                    resolution_px=64, input_uris=tuple(job.input_uris),
                    device_key=crypto.new_device_key(), seed=1)
    [output_id] = store_outputs(item, [np.zeros((64, 64, 3), np.uint8)], store, jobs, "png")
    assert [o.output_id for o in jobs.list_outputs("acct-idx")] == [output_id]
    assert [r for r in jobs.ledger.records_for_job(job.job_id) if r.object_class == "output"] == []


@pytest.mark.privacy
def test_reconciler_deletes_orphan_outputs_and_expired_usage_with_receipts(store, jobs):
    from pipeline.privacy.usage import UsageEvent, day_of, write_events
    from pipeline.storage.base import output_key

    job, (kept,) = finished_job_with_outputs(store, jobs, 1)
    orphan = output_key(job.account_id, uuid.uuid4().hex, "png")  # written, never indexed
    store.put(orphan, b"an output nobody indexed")
    now = time.time()

    def event(day: str) -> UsageEvent:
        return UsageEvent(day=day, account_ref="r", kind="art_style", style="s",
                          resolution_px=64, num_inputs=1, num_frames=0, outcome="succeeded",
                          country="", queue_s=0.0, total_s=1.0)

    [old] = write_events(store, [event(day_of(now - 100 * 86400))], writer_id="w")
    [fresh] = write_events(store, [event(day_of(now))], writer_id="w")

    receipts = reconcile(StoreSet.single(store), jobs.ledger, owner="t", cfg=CFG, now_s=now)

    # (the finished job's own inputs, due now, go in the same pass)
    assert sorted(r.object_class for r in receipts
                  if r.object_class in ("orphan_output", "usage_data", "output")) == [
        "orphan_output", "usage_data"]
    assert not store.exists(orphan) and not store.exists(old)
    assert store.exists(fresh) and store.exists(key_from_uri(store, kept.uri))
    chain = [json.loads(e) for e in jobs.redis.lrange(keys.RECEIPT_CHAIN, 0, -1)]
    assert {e["object_class"] for e in chain} >= {"orphan_output", "usage_data"}
    assert verify_chain(jobs.redis) == []


def test_a_stuck_jobs_inputs_and_face_data_are_gone_by_their_ceilings(store, jobs):
    """A job that never leaves its stage (no runner ever finishes it). Its input and face
    data get their deadlines from the configured ceilings when the service stores them
    (accept_job, store_with_inputs: real records in Redis), and the sweep, run as the
    retention actors run it, deletes both by those deadlines, verified, while the job is
    still unfinished. Short ceilings: input 3 s, face data 2 s."""
    from pipeline.core.config import load_settings
    from pipeline.core.records import ObjectClass
    from pipeline.jobs.intake import accept_job, check_job_request
    from pipeline.retention.purge import store_with_inputs, sweep_due
    from tests.unit.factories import encode, photo

    ceilings = CFG.model_copy(update={"input_ceiling_h": 3 / 3600, "face_data_ceiling_h": 2 / 3600,
                                      "sweep_interval_s": 0.2})
    settings = load_settings().model_copy(update={"retention": ceilings})
    stores = StoreSet.single(store)
    request = check_job_request(account_id="acct-stuck", kind="art_style", style="comic",
                                resolution_px=None, files=[encode(photo(96, 96), "PNG")],
                                settings=settings)
    job, item = accept_job(request, crypto.new_device_key(), stores, jobs, settings)
    face_uri = store_with_inputs(stores, jobs, item, b"\x01" * 2048, ObjectClass.FACE_DATA,
                                 ceilings)
    objects = {uri: key_from_uri(store, uri) for uri in (*job.input_uris, face_uri)}
    ceiling_s = {uri: 3.0 for uri in job.input_uris} | {face_uri: 2.0}
    records = {uri: jobs.ledger.get(uri) for uri in objects}
    for uri, rec in records.items():  # what the service wrote, read back from Redis
        assert rec is not None and rec.deadline_s - rec.created_s == pytest.approx(ceiling_s[uri])
    gone_at: dict[str, float] = {}
    while len(gone_at) < len(objects) and time.time() < job.created_s + 15:
        sweep_due(stores, jobs.ledger, owner="retention-test", cfg=ceilings)
        for uri, key in objects.items():
            if uri not in gone_at and not store.exists(key):  # HEAD: 404
                gone_at[uri] = time.time()
        time.sleep(ceilings.sweep_interval_s)
    assert set(gone_at) == set(objects), "an object outlived its ceiling"
    for uri, when in gone_at.items():
        assert when <= records[uri].created_s + ceiling_s[uri] + 1.0  # one sweep's slack
        assert jobs.ledger.get(uri) is None
    assert jobs.get_job(job.job_id).status == "queued"  # the ceiling alone removed them
