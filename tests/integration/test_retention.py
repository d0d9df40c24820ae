"""Retention ledger durability, receipts, reconciler and account deletion against a real
Redis server and a real local store (no Ray)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable

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
from pipeline.state.receipts import ReceiptLedger
from pipeline.state.redis_server import RedisServer
from pipeline.state.tlog import TransparencyLog, audit
from pipeline.storage.base import (
    LocalObjectStore,
    StoreSet,
    face_key,
    input_key,
    key_from_uri,
    object_uri,
    output_key,
    work_key,
)
from pipeline.transparency.heads import signing_key
from serve.cli import main as cli
from tests.integration.helpers import log_leaves

CFG = RetentionConfig(lease_s=5, purge_max_attempts=2)
TLOG_CFG = CFG.transparency
TLOG_KEY = signing_key(TLOG_CFG, [])  # the demo key: these configs are not production-shaped


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


def make_job(store, jobs, *, account="acct-r", num_inputs=2, finished=False,
             clip=False) -> JobRecord:
    """A registered job whose encrypted inputs (and one face-data object) are stored; a
    ``clip`` also has one work-data object (its frames between chunks). Ceilings: 1 h."""
    job_id, now, key = uuid.uuid4().hex, time.time(), crypto.new_device_key()
    uris = [object_uri(store, input_key(job_id, uuid.uuid4().hex)) for _ in range(num_inputs)]
    face = object_uri(store, face_key(job_id, uuid.uuid4().hex))
    records = [RetentionRecord(u, "input", account, job_id, now, now + 3600) for u in uris]
    records.append(RetentionRecord(face, "face_data", account, job_id, now, now + 3600))
    if clip:
        work = object_uri(store, work_key(job_id, uuid.uuid4().hex))
        records.append(RetentionRecord(work, "work_data", account, job_id, now, now + 3600))
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


def test_every_purge_is_logged_and_tampering_is_detected(store, jobs, private_redis):
    """Each verified deletion is a leaf of the transparency log; `retention verify-ledger`
    audits leaves, nodes and signed heads and names an edited leaf or node."""
    for _ in range(3):
        job = make_job(store, jobs, finished=True)
        purge_finished_job(job.job_id, StoreSet.single(store), jobs, owner="t", cfg=CFG)
    client, log = jobs.redis, TransparencyLog(jobs.redis)
    assert log.sign_head(TLOG_KEY, TLOG_CFG, force=True) is not None
    entries = log_leaves(client)
    assert len(entries) == 9 and audit(log, TLOG_KEY.public_key()) == []
    assert all(e["result"] == "verified_gone" for e in entries)
    # Leaves hold a salted commitment, never the URI, its digest or any content.
    raw = b"".join(log.leaves(list(range(9))))
    assert b"inputs/" not in raw and store.url.encode() not in raw
    args = ["retention", "verify-ledger", "--redis-url", private_redis.url]
    assert cli(args) == 0

    chunk = keys.tlog_leaves(0)
    original = client.hget(chunk, "4")
    edited = json.loads(original)
    edited["verified_ms"] -= 3_600_000  # backdate a deletion
    client.hset(chunk, "4", json.dumps(edited, sort_keys=True, separators=(",", ":")))
    assert any("leaf 4" in p for p in audit(log, TLOG_KEY.public_key())) and cli(args) == 1
    client.hset(chunk, "4", original)
    assert audit(log, TLOG_KEY.public_key()) == []

    node_key = keys.tlog_nodes(1, 0)
    kept = client.getrange(node_key, 32, 63)
    client.setrange(node_key, 32, bytes(32))  # an inner node rewritten
    assert any("node (1, 1)" in p for p in audit(log, TLOG_KEY.public_key()))
    client.setrange(node_key, 32, kept)
    assert audit(log, TLOG_KEY.public_key()) == []


def test_truncating_the_log_is_detected(store, jobs):
    job = make_job(store, jobs, finished=True)
    purge_finished_job(job.job_id, StoreSet.single(store), jobs, owner="t", cfg=CFG)
    log = TransparencyLog(jobs.redis)
    log.sign_head(TLOG_KEY, TLOG_CFG, force=True)
    jobs.redis.decr(keys.TLOG_SIZE)
    assert any("truncated" in p for p in audit(log, TLOG_KEY.public_key()))


def test_reconciler_deletes_orphans_and_overdue_objects_only(store, jobs, private_redis):
    live = make_job(store, jobs)
    orphan_key = input_key(uuid.uuid4().hex, "orphan")  # as after a crash lost its record
    store.put(orphan_key, b"ciphertext with no record")
    orphan_face = face_key(uuid.uuid4().hex, "orphan")  # face data whose record was lost
    store.put(orphan_face, b"an embedding with no record")
    orphan_work = work_key(uuid.uuid4().hex, "orphan")  # a clip's frames, record lost
    store.put(orphan_work, b"frames with no record")
    live_clip = make_job(store, jobs, clip=True)
    overdue = make_job(store, jobs, clip=True)
    for rec in jobs.ledger.records_for_job(overdue.job_id):
        jobs.ledger.redis.zadd(keys.RETENTION_DUE, {rec.uri: 0}, xx=True)
        jobs.ledger.redis.hset(keys.retention_record(rec.uri), "deadline_s", "0")
    receipts = reconcile(StoreSet.single(store), jobs.ledger, owner="t", cfg=CFG)
    assert sum(r.object_class == "orphan" for r in receipts) == 3
    assert not store.exists(orphan_key) and not store.exists(orphan_face)
    assert not store.exists(orphan_work)
    assert store.list_keys(f"inputs/{overdue.job_id}/") == []
    assert store.list_keys(f"work/{overdue.job_id}/") == []  # past its deadline
    assert len(store.list_keys(f"inputs/{live.job_id}/")) == 2  # in use: untouched
    assert len(store.list_keys(f"work/{live_clip.job_id}/")) == 1
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
    logged = log_leaves(jobs.redis)
    assert {e["object_class"] for e in logged} >= {"orphan_output", "usage_data"}
    assert audit(TransparencyLog(jobs.redis), TLOG_KEY.public_key()) == []


def test_a_stuck_jobs_inputs_and_face_data_are_gone_by_their_ceilings(store, jobs):
    """A job that never leaves its stage (no runner ever finishes it). Its input, face
    data and work data (a clip's frames between chunks) get their deadlines from the
    configured ceilings when the service stores them (accept_job, store_with_inputs: real
    records in Redis), and the sweep, run as the retention actors run it, deletes them by
    those deadlines, verified, while the job is still unfinished. Short ceilings: input
    and work data 3 s, face data 2 s."""
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
    work_uri = store_with_inputs(stores, jobs, item, b"\x02" * 2048, ObjectClass.WORK_DATA,
                                 ceilings)
    assert key_from_uri(store, work_uri).startswith("work/")  # WORK_PREFIX, beside the inputs
    objects = {uri: key_from_uri(store, uri) for uri in (*job.input_uris, face_uri, work_uri)}
    ceiling_s = {uri: 3.0 for uri in job.input_uris} | {face_uri: 2.0, work_uri: 3.0}
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


def _sweep_as_the_actors_do(stores: StoreSet, jobs: JobStore, gone: Callable[[], bool], *,
                            within_s: float, interval_s: float = 0.2) -> float:
    """Run the retention actors' sweep round (sweep_due, then note_purges) every
    ``interval_s`` until ``gone()``; returns how long it took. Fails after ``within_s``."""
    from pipeline.retention.purge import note_purges, sweep_due

    started = time.monotonic()
    while not gone():
        assert time.monotonic() - started < within_s, f"not swept within {within_s} s"
        note_purges(jobs, sweep_due(stores, jobs.ledger, owner="retention-test", cfg=CFG))
        time.sleep(interval_s)
    return time.monotonic() - started


def test_a_clips_work_data_is_purged_with_its_inputs_when_the_job_ends(store, jobs):
    job = make_job(store, jobs, clip=True, finished=True)
    assert len(store.list_keys(f"work/{job.job_id}/")) == 1
    purge_finished_job(job.job_id, StoreSet.single(store), jobs, owner="t", cfg=CFG)
    for prefix in ("inputs", "face", "work"):
        assert store.list_keys(f"{prefix}/{job.job_id}/") == [], prefix
    assert jobs.ledger.records_for_job(job.job_id) == []
    assert jobs.get_job(job.job_id).inputs_purged_s is not None


def test_a_lost_purge_call_is_recovered_by_the_sweep_within_seconds(store, jobs):
    """Retention unreachable when the job ends: the runner records the end (finish_job)
    and its purge call never arrives. finish_job made the inputs, face data and work data
    due at once, so the next sweep rounds delete them within seconds, not at their
    one-hour ceilings, and the job records its purge."""
    job = make_job(store, jobs, clip=True)
    records = jobs.ledger.records_for_job(job.job_id)
    assert sorted(r.object_class for r in records) == ["face_data", "input", "input", "work_data"]
    assert all(r.deadline_s > time.time() + 3000 for r in records)  # the ceilings are far
    assert jobs.claim_job(job.job_id, "runner-test")
    jobs.finish_job(job.job_id, ok=True, output_ids=())  # ... and no purge_finished_job

    def gone() -> bool:
        return not any(store.list_keys(f"{p}/{job.job_id}/") for p in ("inputs", "face", "work"))

    took_s = _sweep_as_the_actors_do(StoreSet.single(store), jobs, gone, within_s=10.0)
    assert took_s < 5.0
    assert jobs.ledger.records_for_job(job.job_id) == []
    done = jobs.get_job(job.job_id)
    assert done.inputs_purged_s is not None and done.num_inputs_purged_verified == 2


def _minimised(store, jobs, account: str) -> tuple[JobRecord, OutputRecord]:
    """A succeeded job of ``account`` with one output, purged, then minimised: its record
    left the account's index and holds the pseudonym, kind, style and output id."""
    job, (out,) = finished_job_with_outputs(store, jobs, 1, account=account)
    purge_finished_job(job.job_id, StoreSet.single(store), jobs, owner="t", cfg=CFG)
    assert jobs.minimise_and_expire(now_s=time.time() + 120, grace_s=60,
                                    ttl_s=30 * 86400) == (1, 0)
    assert jobs.account_job_ids(account) == []
    kept = jobs.get_job(job.job_id)
    assert kept.account_id == "" and kept.output_ids == [out.output_id]
    return job, out


def _holding(client: redis.Redis, needle: bytes) -> list[bytes]:
    """Every key whose name or any value (field, member, element) holds ``needle``."""
    from tests.integration.helpers import redis_values

    return [name.removeprefix("redis:").encode() for name, blob in redis_values(client)
            if needle in blob]


@pytest.mark.privacy
@pytest.mark.parametrize("signal", ["delete", "under_13"])
def test_account_deletion_and_the_under_13_signal_remove_minimised_job_records(
        store, jobs, signal):
    """Minimisation takes a job out of the account's index; deletion (a user's request, or
    the under-13 signal, which also blocks the account) still removes its record, so the
    status read answers 404 and nothing of the job is left in Redis."""
    from pipeline.privacy.rights import block_child_account, is_blocked
    from pipeline.security.pseudonyms import account_ref

    account = f"acct-min-{signal}"
    minimised, out = _minimised(store, jobs, account)
    recent, _ = finished_job_with_outputs(store, jobs, 1, account=account)  # not minimised
    other, _ = _minimised(store, jobs, "acct-min-other")
    if signal == "under_13":
        block_child_account(jobs.redis, account)
    receipt_id = request_account_deletion(account, jobs)
    delete_account(account, receipt_id, StoreSet.single(store), jobs, owner="t", cfg=CFG)

    assert ReceiptLedger(jobs.redis).get_request(receipt_id)["status"] == "complete"
    for job in (minimised, recent):
        with pytest.raises(NotFound):  # what GET /v1/accounts/{a}/jobs/{id} reads: 404
            jobs.get_job(job.job_id)
        assert jobs.redis.zscore(keys.PURGED_JOBS, job.job_id) is None
        # The job id survives only in the deletion and purge receipts (proof of deletion).
        assert {k for k in _holding(jobs.redis, job.job_id.encode())
                if not k.startswith((b"eph:deletion:", b"eph:receipts:"))} == set()
    assert not store.exists(key_from_uri(store, out.uri))
    assert not jobs.redis.exists(keys.account_minimised_jobs(account_ref(account)))
    # The raw id is left only in the tombstone's name, which expires in a day.
    assert _holding(jobs.redis, account.encode()) == [keys.account_tombstone(account).encode()]
    assert is_blocked(jobs.redis, account) == (signal == "under_13")
    assert jobs.get_job(other.job_id).account_ref == account_ref("acct-min-other")  # untouched
    assert jobs.minimised_job_ids("acct-min-other") == [other.job_id]


def test_an_expired_minimised_record_leaves_the_pseudonyms_index(store, jobs):
    job, _ = _minimised(store, jobs, "acct-min-expire")
    assert jobs.minimised_job_ids("acct-min-expire") == [job.job_id]
    assert jobs.minimise_and_expire(now_s=time.time() + 31 * 86400, grace_s=60,
                                    ttl_s=30 * 86400) == (0, 1)
    assert jobs.minimised_job_ids("acct-min-expire") == []
    with pytest.raises(NotFound):
        jobs.get_job(job.job_id)


@pytest.mark.privacy
def test_the_export_get_writes_nothing_for_an_unknown_id_and_no_raw_id_for_a_known_one(
        store, jobs):
    """GET .../privacy/export for an id the service holds nothing of: answered empty, no
    key written. For a known account: recorded as a completed request, by pseudonym (no key
    name or value holds the raw id), and listed in the export it answers."""
    from pipeline.privacy.rights import answer_right_to_know

    known = "acct-export-known"
    job, _ = _minimised(store, jobs, known)
    finished_job_with_outputs(store, jobs, 1, account=known)
    client = jobs.redis

    def snapshot() -> dict[bytes, bytes | None]:
        return {k: client.dump(k) for k in client.scan_iter()}

    before, size = snapshot(), client.dbsize()
    never_seen = "acct-never-seen-7f3a"
    export = answer_right_to_know(never_seen, jobs, store)
    assert client.dbsize() == size and snapshot() == before
    assert _holding(client, never_seen.encode()) == []
    assert export["jobs"] == export["outputs"] == export["privacy_requests"] == []

    holding_before = set(_holding(client, known.encode()))
    first = answer_right_to_know(known, jobs, store)
    [request] = first["privacy_requests"]
    assert request["kind"] == "know" and request["completed_s"] is not None
    assert job.job_id in {j["job_id"] for j in first["jobs"]}  # the minimised record too
    assert set(_holding(client, known.encode())) == holding_before  # no new raw id
    second = answer_right_to_know(known, jobs, store)
    assert [r["kind"] for r in second["privacy_requests"]] == ["know", "know"]
    assert not client.exists(keys.PRIVACY_OPEN)  # answered on the spot: never open
