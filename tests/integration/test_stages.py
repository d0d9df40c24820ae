"""Stage functions and the retention ledger against a real Redis server and a real local
store (no Ray): encryption of face data, purge verification, claims, retries, the sweep."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest
import redis
import skimage.data
import torch

from pipeline.core.config import RetentionConfig
from pipeline.core.errors import WrongKey
from pipeline.core.records import RetentionRecord, WorkItem
from pipeline.jobs.stages import face_stage
from pipeline.media.ingest import encode_png
from pipeline.retention.purge import purge_finished_job, sweep_due
from pipeline.security import crypto
from pipeline.state.job_store import JobStore
from pipeline.storage.base import LocalObjectStore, StoreSet, input_key, key_from_uri, object_uri
from tests.integration.helpers import files_under, find_needles, redis_values, windows

FAST = RetentionConfig(lease_s=5, purge_max_attempts=3)


@pytest.fixture()
def store(tmp_path) -> LocalObjectStore:
    return LocalObjectStore(f"file://{tmp_path / 'store'}")


@pytest.fixture()
def stage_redis(redis_server) -> redis.Redis:
    """Database 1 of the session's server: the running service (db 0) never sees these."""
    client = redis.Redis.from_url(redis_server.url.rsplit("/", 1)[0] + "/1")
    yield client
    client.flushdb()


@pytest.fixture()
def jobs(stage_redis) -> JobStore:
    return JobStore(stage_redis)


class KnownEmbedder:
    """A stand-in for InceptionResnetV1 whose output the test knows (so it can search for
    it); the detector stays the real MTCNN with its shipped weights."""

    def __init__(self) -> None:
        vector = np.random.default_rng(7).normal(size=512).astype(np.float32)
        self.vector = vector / np.linalg.norm(vector)

    def embed(self, crops: torch.Tensor) -> np.ndarray:
        return np.tile(self.vector, (crops.shape[0], 1))


def _store_input(store, jobs, job_id: str, pixels: np.ndarray, key: bytes, *,
                 deadline_s: float | None = None) -> str:
    uri = object_uri(store, input_key(job_id, uuid.uuid4().hex))
    now = time.time()
    jobs.ledger.register([RetentionRecord(uri, "input", "acct-stage", job_id, now,
                                          deadline_s if deadline_s is not None else now + 3600)])
    store.put(key_from_uri(store, uri), crypto.encrypt(encode_png(pixels), key, uri=uri))
    return uri


def _item(job_id: str, uris: list[str], key: bytes) -> WorkItem:
    return WorkItem(job_id=job_id, account_id="acct-stage", kind="ai_photo", style="portrait",
                    resolution_px=64, input_uris=tuple(uris), device_key=key, seed=1)


def test_face_stage_stores_only_encrypted_face_data_then_purge_removes_it(
        store, jobs, stage_redis, redis_server, tmp_path):
    from pipeline.core.config import ModelsConfig
    from pipeline.models.faces import MtcnnDetector
    from pipeline.models.runtime import select_runtime

    key = crypto.new_device_key()
    face_job, cat_job = uuid.uuid4().hex, uuid.uuid4().hex
    items = [
        _item(face_job, [_store_input(store, jobs, face_job, skimage.data.astronaut(), key)], key),
        _item(cat_job, [_store_input(store, jobs, cat_job, skimage.data.chelsea(), key)], key),
    ]
    embedder = KnownEmbedder()
    detector = MtcnnDetector(select_runtime(ModelsConfig()), min_probability=0.9)
    face_ok, cat = face_stage(items, StoreSet.single(store), jobs, detector, embedder, FAST)

    assert face_ok.ok and face_ok.face_uri is not None
    assert not cat.ok and "no human face" in cat.reason and not cat.retryable
    # Face data is registered before it exists, and is ciphertext under the device key.
    record = jobs.ledger.get(face_ok.face_uri)
    assert record is not None and record.object_class == "face_data"
    blob = store.get(key_from_uri(store, face_ok.face_uri))
    try:
        plain = crypto.decrypt(blob, key, uri=face_ok.face_uri)
    except WrongKey:
        pytest.fail("the stored face data is not ciphertext under the device key")
    stored = np.frombuffer(plain, np.float32)
    # The stage renormalises the mean embedding: equal up to float32 rounding.
    assert np.allclose(stored, embedder.vector, rtol=0, atol=1e-6)
    needles = {f"embedding-{i}": w for i, w in enumerate(windows(stored.tobytes(), 32))}
    blobs = files_under(tmp_path / "store", redis_server.data_dir) + redis_values(stage_redis)
    assert find_needles(blobs, needles) == []
    # Positive control: the same scan does find the embedding once it is stored in clear.
    store.put("inputs/leak/plain.bin", stored.tobytes())
    assert find_needles(files_under(tmp_path / "store"), needles) != []
    store.delete("inputs/leak/plain.bin")

    for job_id in (face_job, cat_job):
        purge_finished_job(job_id, StoreSet.single(store), jobs, owner="t", cfg=FAST)
        assert jobs.ledger.records_for_job(job_id) == []
    assert not store.exists(key_from_uri(store, face_ok.face_uri))
    assert store.list_keys(f"inputs/{face_job}/") == store.list_keys(f"face/{face_job}/") == []


def test_sweep_purges_only_objects_past_their_deadline(store, jobs):
    key, job_id = crypto.new_device_key(), uuid.uuid4().hex
    now = time.time()
    overdue = _store_input(store, jobs, job_id, skimage.data.coffee(), key, deadline_s=now - 1)
    later = _store_input(store, jobs, job_id, skimage.data.coffee(), key, deadline_s=now + 3600)
    receipts = sweep_due(StoreSet.single(store), jobs.ledger, owner="sweeper", cfg=FAST, now_s=now)
    assert overdue in [r.uri for r in receipts] and later not in [r.uri for r in receipts]
    assert not store.exists(key_from_uri(store, overdue))
    assert store.exists(key_from_uri(store, later))
    # A finished job's inputs become due at once, so a lost purge call waits seconds, not days.
    jobs.ledger.expedite_job(job_id, ("input",), now_s=now)
    sweep_due(StoreSet.single(store), jobs.ledger, owner="sweeper", cfg=FAST, now_s=now + 0.001)
    assert not store.exists(key_from_uri(store, later))
