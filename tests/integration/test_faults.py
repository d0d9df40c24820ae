"""Faults on the real running service: kill -9 actors and Redis, break the store, fill
Ray's object store. After each: every accepted job ended (succeeded, or failed with a
reason), every input and face-data object is gone, and a reconciler pass finds no orphan.

Run with ``pytest -m faults``; they run after every other test of a session (conftest).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import ray
import redis as redis_lib
import skimage.data

from pipeline.core.config import RetentionConfig
from pipeline.core.reasons import Reason, out_of_attempts
from pipeline.retention.purge import reconcile
from pipeline.security import crypto
from pipeline.state import keys
from pipeline.state.ledger import RetentionLedger
from pipeline.storage.base import open_stores
from tests.integration.helpers import (
    encode_image,
    job_url,
    replica_pid,
    run_in_replica,
    submit,
    wait_running,
    windows,
)

pytestmark = pytest.mark.faults

PHOTO = encode_image(skimage.data.astronaut(), "PNG")


def submit_many(client, count: int, *, kind: str = "art_style") -> list[str]:
    key = crypto.new_device_key()
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: submit(client, [PHOTO], key=key, kind=kind,
                                                   style="watercolor"), range(count)))
    assert all(r.status_code == 202 for r in responses), [r.text for r in responses]
    return [r.json()["job_id"] for r in responses]


def wait_all_settled(client, job_ids: list[str], timeout_s: float = 240.0) -> list[dict]:
    """Every job ended with an outcome and its inputs were verified gone."""
    deadline = time.monotonic() + timeout_s
    views: list[dict] = []
    while time.monotonic() < deadline:
        try:
            views = [client.get(job_url(j)).json() for j in job_ids]
        except Exception:  # the API itself may be restarting
            time.sleep(0.5)
            continue
        if all(v.get("status") in ("succeeded", "failed") and v.get("inputs_purged_s")
               for v in views):
            return views
        time.sleep(0.25)
    raise AssertionError(f"jobs did not settle in {timeout_s} s: {views}")


def assert_clean(service, store_root: Path, views: list[dict]) -> None:
    for view in views:
        assert view["status"] == "succeeded" or (
            view["status"] == "failed" and len(view["reason"]) > 10), view  # a real reason
        for prefix in ("inputs", "face", "work"):  # work: a clip's frames between chunks
            assert not list((store_root / prefix / view["job_id"]).rglob("*.bin")), prefix
    settings = service.settings
    ledger = RetentionLedger(redis_lib.Redis.from_url(settings.service.redis_url))
    receipts = reconcile(open_stores(settings.storage), ledger, owner="test",
                         cfg=RetentionConfig())
    assert [r for r in receipts if r.object_class == "orphan"] == []


def test_gpu_actor_killed_mid_batch(client, service, store_root):
    """The kill provably hits a batch in flight: the replica is frozen (SIGSTOP) as soon as
    a job entered its model call; a job still running a second later, with no output, was
    inside the frozen batch (a stopped process delivers nothing). Then SIGKILL: that job
    is retried on a new replica (its record counts the crashed attempt) and succeeds."""
    job_ids = submit_many(client, 4)
    wait_running(client, job_ids, "diffusion")
    killed = replica_pid("DiffusionDeployment")
    os.kill(killed, signal.SIGSTOP)
    try:
        time.sleep(1.0)
        views = [client.get(job_url(j)).json() for j in job_ids]
        in_flight = [v["job_id"] for v in views if v["status"] == "running"
                     and v["batch_sizes"]["diffusion"] and not v["output_ids"]]
    finally:
        os.kill(killed, signal.SIGKILL)
    assert in_flight, f"no batch was in flight when the replica stopped: {views}"
    views = wait_all_settled(client, job_ids)
    assert_clean(service, store_root, views)
    retried = {v["job_id"]: v for v in views if v["job_id"] in in_flight}
    assert all(v["status"] == "succeeded" and v["attempts"] >= 1 for v in retried.values()), \
        retried
    # A new replica took over (Serve restarted it; the batch was retried on it).
    assert replica_pid("DiffusionDeployment") != killed


def test_retention_actor_killed_mid_purge(client, service, store_root):
    """The kill provably hits purges in flight: the (only) retention replica is frozen
    (SIGSTOP) before the jobs end, so each succeeded job's purge call sits in it; a second
    later its inputs are still stored. Then SIGKILL: the runners' retries and the sweep of
    the restarted replica purge every input."""
    job_ids = submit_many(client, 4, kind="ai_photo")
    frozen = replica_pid("RetentionDeployment")
    os.kill(frozen, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 120
        while not (done := [j for j in job_ids
                            if client.get(job_url(j)).json()["status"] == "succeeded"]):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(1.0)
        pending = [j for j in done if list((store_root / "inputs" / j).rglob("*.bin"))]
        assert pending, "the inputs were purged without the retention replica"
        assert all(client.get(job_url(j)).json()["inputs_purged_s"] is None for j in pending)
    finally:
        os.kill(frozen, signal.SIGKILL)
    assert_clean(service, store_root, wait_all_settled(client, job_ids))
    assert replica_pid("RetentionDeployment") != frozen


def _unfinished(redis_client, job_ids: list[str]) -> list[str]:
    """Those of ``job_ids`` not yet ended and without outputs, read from Redis directly."""
    found = []
    for job_id in job_ids:
        status, outputs = redis_client.hmget(keys.job(job_id), "status", "output_ids")
        if status in (b"queued", b"running") and outputs in (None, b"", b"[]"):
            found.append(job_id)
    return found


def test_redis_killed_and_restarted_mid_run(client, service, store_root, redis_server,
                                            redis_client):
    """The kill provably hits jobs in flight: they are inside a diffusion batch, unfinished,
    when Redis dies (SIGKILL; AOF on disk). Each of them ends after Redis is back: the
    runners and replicas retried their writes across the outage."""
    job_ids = submit_many(client, 4)
    wait_running(client, job_ids, "diffusion")
    in_flight = _unfinished(redis_client, job_ids)
    redis_server.kill()
    killed_s = time.time()
    time.sleep(1.5)
    redis_server.start()  # same port, same data dir
    assert in_flight, "every job had ended before Redis was killed"
    views = wait_all_settled(client, job_ids)
    assert_clean(service, store_root, views)
    ended = {v["job_id"]: v["finished_s"] for v in views}
    assert all(ended[j] > killed_s for j in in_flight), (in_flight, ended)


def _gave_up(view: dict, max_attempts: int) -> bool:
    """The job ended failed after its last retry, naming the store as the cause (never
    blaming the user's photo)."""
    return view["status"] == "failed" and view["reason"] == out_of_attempts(
        Reason.STORE_UNAVAILABLE, max_attempts)


def _hit_the_outage(view: dict, max_attempts: int) -> bool:
    """The job view shows a failed stage call with no output: retried (a store failure
    is retryable, so ``attempts`` rises) or failed once out of attempts."""
    retried = view["status"] == "running" and view["attempts"] >= 1
    return (retried or _gave_up(view, max_attempts)) and not view["output_ids"]


def test_store_outage_fails_cleanly_and_everything_is_purged_after(client, service,
                                                                   store_root):
    """The outage provably hits jobs in flight: they are inside a diffusion model call,
    unfinished and never retried, when the store breaks, so their next store call (the
    output write, or a retry's input read) fails. At least one of them then shows it in
    its job view (retried, or failed out of attempts); once the store is back every job
    has ended cleanly and nothing is left."""
    max_attempts = service.settings.batching.max_attempts
    job_ids = submit_many(client, 3)
    wait_running(client, job_ids, "diffusion")
    before = [client.get(job_url(j)).json() for j in job_ids]
    in_flight = [v["job_id"] for v in before if v["status"] == "running"
                 and v["batch_sizes"]["diffusion"] and not v["output_ids"] and not v["attempts"]]
    parked = store_root.with_name(store_root.name + "-parked")
    store_root.rename(parked)
    store_root.write_bytes(b"")  # the mount is gone: every store call errors
    try:
        assert in_flight, f"no job was in a diffusion call when the store broke: {before}"
        during = submit(client, [PHOTO], key=crypto.new_device_key(), kind="art_style",
                        style="watercolor")
        assert during.status_code == 503 and "store" in during.json()["detail"]
        deadline = time.monotonic() + 30
        while True:
            views = [client.get(job_url(j)).json() for j in in_flight]
            if hit := [v for v in views if _hit_the_outage(v, max_attempts)]:
                break
            assert time.monotonic() < deadline, \
                f"no job in flight showed the store outage within 30 s: {views}"
            time.sleep(0.05)
    finally:
        store_root.unlink()
        parked.rename(store_root)
    views = wait_all_settled(client, job_ids)
    assert_clean(service, store_root, views)
    assert not list((store_root / "inputs").rglob("*.bin"))
    ended = {v["job_id"]: v for v in views}
    for job_id in (v["job_id"] for v in hit):  # failed out of attempts, or a retry succeeded
        end = ended[job_id]
        assert (end["status"] == "succeeded" and end["attempts"] >= 1) or _gave_up(
            end, max_attempts), (hit, end)


def test_full_object_store_spills_only_to_memory(client, service, tmp_path_factory):
    """Fill Ray's object store past its size while an upload crosses it: whatever Ray
    spills must stay in RAM (tmpfs), never on a disk."""
    from serve.launcher import filesystem_type

    marker = b"EPHEMERA-SPILL-PROBE-" + os.urandom(8)
    block = np.frombuffer(marker * (10 * 1024 * 1024 // len(marker)), dtype=np.uint8)
    refs = [ray.put(block.copy()) for _ in range(25)]  # ~250 MB into a 150 MB store
    photo = encode_image(skimage.data.coffee(), "PNG")
    response = submit(client, [photo], key=crypto.new_device_key(), kind="art_style",
                      style="comic")
    assert response.status_code == 202
    view = wait_all_settled(client, [response.json()["job_id"]])[0]
    spill_dir = service.spill_dir
    assert spill_dir is not None and filesystem_type(spill_dir) == "tmpfs"
    spilled = [p for p in spill_dir.rglob("*") if p.is_file()]
    assert spilled, "nothing was spilled: the test did not fill the object store"
    session = Path(ray._private.worker.global_worker.node.get_session_dir_path())
    needles = [marker] + windows(photo)
    on_disk = [str(p) for p in session.rglob("*") if p.is_file() and not p.is_symlink()
               and _contains_any(p, needles)]
    assert on_disk == []
    del refs
    assert view["status"] == "succeeded"


def _contains_any(path: Path, needles: list[bytes]) -> bool:
    try:
        data = path.read_bytes()
    except OSError:
        return False
    return any(n in data for n in needles)


def _held_by(redis_client, job_ids: list[str]) -> dict[str, str]:
    """job id -> the runner holding it (its id carries the runner's pid)."""
    return {j: (redis_client.hget(keys.job(j), "runner_id") or b"").decode() for j in job_ids}


def test_job_runner_killed_fails_only_the_jobs_it_held(client, service, store_root,
                                                       redis_client):
    """Two runners share the jobs. Kill one while its jobs are provably in flight (claimed,
    unfinished, held back by a slow batch): exactly those fail with a reason and are
    purged; the other runner's jobs all succeed."""
    from pipeline.core.reasons import Reason
    from serve.tuning import retune

    retune("diffusion", {"max_wait_ms": 6000, "max_batch_cost": 64})  # hold jobs in flight
    try:
        job_ids = submit_many(client, 8)
        deadline = time.monotonic() + 30
        while not all(_held_by(redis_client, job_ids).values()):
            assert time.monotonic() < deadline, "the jobs were not all claimed by runners"
            time.sleep(0.05)
        holders = _held_by(redis_client, job_ids)
        assert len(set(holders.values())) == 2, holders  # Serve spread them over both
        victim = sorted(set(holders.values()))[0]
        doomed = [j for j, r in holders.items() if r == victim]
        assert all(client.get(job_url(j)).json()["status"] in ("queued", "running")
                   for j in doomed)  # in flight at the kill
        os.kill(int(victim.split("-")[1]), signal.SIGKILL)
    finally:
        retune("diffusion", {"max_wait_ms": 400, "max_batch_cost": 8})
    views = {v["job_id"]: v for v in wait_all_settled(client, job_ids)}
    for job_id, runner in holders.items():
        if runner == victim:
            assert views[job_id]["status"] == "failed"
            assert views[job_id]["reason"] == Reason.RESTART
        else:
            assert views[job_id]["status"] == "succeeded", views[job_id]
    assert_clean(service, store_root, list(views.values()))


def test_job_runner_killed_between_a_clips_chunks_leaves_no_work_data(client, service,
                                                                       store_root, redis_client):
    """The kill provably lands between a clip's chunks: its first chunk is stored as work
    data (``work/<job>/``) and the job is still running, its next chunk held back by a slow
    diffusion batch, when the runner holding it is killed. The job fails with a reason, and
    its inputs, face data and work data are verified gone; the reconciler finds no orphan."""
    from pipeline.core.reasons import Reason
    from serve.tuning import retune
    from tests.unit.factories import make_video

    upload = make_video(frames=12, width=96, height=64, fps=24)  # two chunks of 8 + 4
    retune("diffusion", {"max_wait_ms": 6000, "max_batch_cost": 64})  # hold the next chunk
    try:
        response = submit(client, [upload], key=crypto.new_device_key(), kind="art_style",
                          style="watercolor", account_id="acct-clip-fault",
                          names=["clip.mov"])
        assert response.status_code == 202, response.text
        job_id = response.json()["job_id"]
        work = store_root / "work" / job_id
        deadline = time.monotonic() + 60
        while not list(work.rglob("*.bin")):
            assert time.monotonic() < deadline, "the clip's first chunk was never stored"
            time.sleep(0.05)
        assert client.get(job_url(job_id)).json()["status"] == "running"  # between chunks
        runner = _held_by(redis_client, [job_id])[job_id]
        os.kill(int(runner.split("-")[1]), signal.SIGKILL)
    finally:
        retune("diffusion", {"max_wait_ms": 400, "max_batch_cost": 8})
    [view] = wait_all_settled(client, [job_id])
    assert view["status"] == "failed" and view["reason"] == Reason.RESTART, view
    assert_clean(service, store_root, [view])


def test_ingress_killed_after_accepting_loses_no_job(client, service, store_root,
                                                    redis_client):
    """The ingress hands each job to a runner before answering 202 and keeps the open
    request; killing it while the jobs are provably unfinished loses nothing: every
    accepted job finishes after the kill (Serve restarts the ingress)."""
    job_ids = submit_many(client, 4)
    in_flight = _unfinished(redis_client, job_ids)
    os.kill(replica_pid("ApiDeployment"), signal.SIGKILL)
    killed_s = time.time()
    assert in_flight, "every job had ended before the ingress was killed"
    views = wait_all_settled(client, job_ids, timeout_s=240)
    assert [v["status"] for v in views] == ["succeeded"] * 4
    assert all(v["finished_s"] > killed_s for v in views if v["job_id"] in in_flight)
    assert_clean(service, store_root, views)


def _block_after_storing_an_input(signal_path: str):
    """Fault injection, run inside the media replica (a slow store, not a mock: the real
    local store writes the object): the next input object is written, then its write call
    reports its key in ``signal_path`` and blocks until ``signal_path + '.release'``
    exists, before the job goes back to the ingress. It strikes once: later writes (the
    client's retry) are the real store's."""
    def install(_actor) -> bool:
        import time
        from pathlib import Path

        from pipeline.storage import base as storage

        real_put = storage.LocalObjectStore.put

        def put(self, key, data, **kwargs):
            real_put(self, key, data, **kwargs)
            if key.startswith(storage.INPUT_PREFIX):
                storage.LocalObjectStore.put = real_put
                Path(signal_path).write_text(key)
                release = Path(signal_path + ".release")
                deadline = time.monotonic() + 600
                while not release.exists() and time.monotonic() < deadline:
                    time.sleep(0.05)

        storage.LocalObjectStore.put = put
        return True
    return install


class RecordingApi:
    """The typed client with patient retries, over an httpx client that records every
    job submission attempt's Idempotency-Key and every answer's status."""

    def __init__(self, service) -> None:
        from serve.client import EphemeraClient, RetryPolicy
        from tests.integration.conftest import API_TOKEN

        self.attempts: list[str] = []
        self.answers: list[int] = []
        self.http = httpx.Client(
            base_url=service.base_url, timeout=120.0,
            headers={"Authorization": f"Bearer {API_TOKEN}"}, event_hooks={
                "request": [lambda r: self.attempts.append(r.headers["Idempotency-Key"])
                            if r.method == "POST" else None],
                "response": [lambda r: self.answers.append(r.status_code)
                             if r.request.method == "POST" else None]})
        self.api = EphemeraClient(http=self.http, retry=RetryPolicy(max_retries=40,
                                                                    max_backoff_s=5.0))
        self.pool = ThreadPoolExecutor(1)

    def submit_in_background(self, account: str) -> Future:
        return self.pool.submit(self.api.submit_job, [("photo.png", PHOTO)],
                                device_key=crypto.new_device_key(), kind="art_style",
                                style="watercolor", account_id=account)

    def assert_retried_with_one_key(self) -> None:
        assert len(self.attempts) >= 2 and len(set(self.attempts)) == 1, self.attempts
        assert self.answers[-1] == 202, self.answers

    def close(self) -> None:
        self.pool.shutdown()
        self.http.close()


def wait_for_fault(signal_file: Path, submission: Future) -> str:
    """What the fault injected in the ingress reported once it struck (it writes it)."""
    deadline = time.monotonic() + 60
    while not signal_file.exists():
        assert time.monotonic() < deadline and not submission.done(), "the fault never struck"
        time.sleep(0.01)
    return signal_file.read_text()


def test_ingress_killed_mid_write_loses_nothing(service, store_root, redis_client, tmp_path):
    """The kill provably hits a write in flight: the ingress waits on the media pool, which
    is held inside the store call that wrote the job's encrypted input, before any runner
    could take the job; then the ingress gets SIGKILL. The client's retry, with the same
    Idempotency-Key, makes a new job (the dead ingress's claim is taken over once its lease
    lapses), which succeeds. The job the dead
    ingress was storing fails with a reason and its stored input is purged within seconds
    (its ingress's lease), not at the job timeout."""
    from pipeline.core.reasons import Reason

    signal_file = tmp_path / "storing"
    victim = replica_pid("ApiDeployment")
    assert run_in_replica("MediaDeployment", _block_after_storing_an_input(str(signal_file)))
    client = RecordingApi(service)
    account = f"acct-cut-{os.urandom(4).hex()}"
    try:
        submission = client.submit_in_background(account)
        stored_key = wait_for_fault(signal_file, submission)
        cut_job = stored_key.split("/")[1]
        # In flight: the object is stored, the job registered, and no runner holds it.
        assert (store_root / stored_key).is_file()
        status, runner = redis_client.hmget(keys.job(cut_job), "status", "runner_id")
        assert status == b"queued" and not runner
        os.kill(victim, signal.SIGKILL)
        accepted = submission.result(timeout=240)
        client.assert_retried_with_one_key()
        assert accepted.job_id != cut_job and not accepted.replayed
        done = client.api.wait_job(account, accepted.job_id, timeout_s=180)
        try:
            cut = client.api.wait_job(account, cut_job, timeout_s=60)
        except TimeoutError as exc:  # the job the dead ingress cut was never settled
            pytest.fail(f"the job cut by the ingress's death never ended: {exc}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
        (tmp_path / "storing.release").touch()  # never leave the media call held
        client.close()
    assert done.status == "succeeded", done
    assert (cut.status, cut.reason) == ("failed", Reason.NOT_STARTED)
    assert cut.inputs_purged_s is not None and cut.inputs_purged_s - cut.created_s < 60
    assert not (store_root / stored_key).exists()
    assert replica_pid("ApiDeployment") != victim
    assert_clean(service, store_root, [done.model_dump(mode="json"), cut.model_dump(mode="json")])


def _block_before_recording_the_key(signal_path: str):
    """Fault injection, run inside the ingress replica: the call that records a handed-off
    job under its Idempotency-Key reports the job id in ``signal_path`` and blocks."""
    def install(_actor) -> bool:
        import time
        from pathlib import Path

        from pipeline.state import idempotency

        def complete(self, account_id, key, digest, job_id):
            Path(signal_path).write_text(job_id)
            time.sleep(600)

        idempotency.Idempotency.complete = complete
        return True
    return install


def test_ingress_killed_between_hand_off_and_answer_makes_no_second_job(service, store_root,
                                                                       redis_client, tmp_path):
    """The kill provably lands after a runner took the job and before the ingress answered
    (it is stopped inside the call recording the job under its Idempotency-Key); then
    SIGKILL. The client's retry with the same key is answered with that same job, which
    succeeds: the account has one job, not two."""
    signal_file = tmp_path / "answering"
    victim = replica_pid("ApiDeployment")
    assert run_in_replica("ApiDeployment", _block_before_recording_the_key(str(signal_file)))
    client = RecordingApi(service)
    account = f"acct-handed-{os.urandom(4).hex()}"
    try:
        submission = client.submit_in_background(account)
        handed = wait_for_fault(signal_file, submission)
        deadline = time.monotonic() + 30
        while not redis_client.hget(keys.job(handed), "runner_id"):  # a runner holds it
            assert time.monotonic() < deadline, "no runner took the job"
            time.sleep(0.02)
        os.kill(victim, signal.SIGKILL)
        accepted = submission.result(timeout=240)
        client.assert_retried_with_one_key()
        assert (accepted.job_id, accepted.replayed) == (handed, True)
        done = client.api.wait_job(account, handed, timeout_s=180)
        assert [j.job_id for j in client.api.iter_jobs(account)] == [handed]
    finally:
        with contextlib.suppress(ProcessLookupError):  # never leave the fault installed
            os.kill(victim, signal.SIGKILL)
        client.close()
    assert done.status == "succeeded", done
    assert replica_pid("ApiDeployment") != victim
    assert_clean(service, store_root, [done.model_dump(mode="json")])


def test_media_replica_killed_mid_request_answers_503_and_keeps_nothing(
        service, store_root, redis_client, client, tmp_path):
    """The kill provably hits a request in flight: the media replica is held inside the
    store call that wrote the job's encrypted input (the job registered), then SIGKILL.
    The ingress answers 503 with Retry-After and withdraws the job: its input is verified
    gone and its record removed; Serve brings the pool back."""
    from tests.integration.helpers import submit

    signal_file = tmp_path / "storing"
    victim = replica_pid("MediaDeployment")
    ingress = replica_pid("ApiDeployment")
    assert run_in_replica("MediaDeployment", _block_after_storing_an_input(str(signal_file)))
    account = f"acct-media-{os.urandom(4).hex()}"
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(submit, client, [PHOTO], key=crypto.new_device_key(),
                             kind="art_style", style="watercolor", account_id=account,
                             names=["photo.png"])
        try:
            stored_key = wait_for_fault(signal_file, answer)
            job_id = stored_key.split("/")[1]
            assert (store_root / stored_key).is_file() and redis_client.exists(keys.job(job_id))
        finally:
            os.kill(victim, signal.SIGKILL)
        response = answer.result(timeout=120)
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) > 0
    assert not (store_root / stored_key).exists()
    assert not redis_client.exists(keys.job(job_id))
    assert client.get(f"/v1/accounts/{account}/jobs").json()["jobs"] == []
    assert replica_pid("ApiDeployment") == ingress
    deadline = time.monotonic() + 120
    while True:  # Serve replaces the replica
        try:
            if replica_pid("MediaDeployment") != victim:
                break
        except Exception:  # no replica registered at this instant
            pass
        assert time.monotonic() < deadline, "the media pool did not come back"
        time.sleep(0.5)
