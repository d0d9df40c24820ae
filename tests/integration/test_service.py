"""The whole path over HTTP on a real local Ray + Serve, real Redis, real object store."""

from __future__ import annotations

import base64
import io
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import PIL
import pytest
import skimage.data
from PIL import Image

from pipeline.core.config import ServiceConfig
from pipeline.media.ingest import check_upload
from pipeline.security import crypto
from pipeline.state import keys
from tests.integration.helpers import (
    CAMERA_MODEL,
    api_over,
    encode_image,
    face_embedding,
    files_under,
    find_needles,
    frozen,
    job_url,
    jpeg_with_gps,
    key_header,
    redis_values,
    replica_pid,
    submit,
    wait_finished,
    wait_running,
    windows,
)

ASTRONAUT = skimage.data.astronaut()


def _decodes(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _assert_inputs_gone(store_root: Path, redis_client, job_id: str) -> None:
    """What a user is promised: the job's inputs and face data no longer exist."""
    job_inputs = [p for p in (store_root / "inputs" / job_id).rglob("*") if p.is_file()]
    job_faces = [p for p in (store_root / "face" / job_id).rglob("*") if p.is_file()]
    assert job_inputs == [] and job_faces == []
    assert redis_client.scard(keys.retention_job(job_id)) == 0


def test_healthz(client):
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_ai_photo_with_gps_jpeg_end_to_end(client, service, store_root, redis_client,
                                           redis_server, face_weights_path):
    key = crypto.new_device_key()
    upload = jpeg_with_gps(ASTRONAUT)
    clean = check_upload(upload, index=1, limits=ServiceConfig()).png_bytes
    response = submit(client, [upload], key=key, kind="ai_photo", style="portrait")
    assert response.status_code == 202, response.text
    body = response.json()
    job_id = body["job_id"]
    assert body["status_url"] == f"/v1/accounts/acct-1/jobs/{job_id}"

    # While the input and the face data are stored (the diffusion replica is held inside
    # the job's model call), no stored byte anywhere (object store, Redis values, Redis's
    # AOF on disk) holds the upload, its stripped pixels, the EXIF strings, the key or the
    # embedding: only ciphertext, which opens with the key into exactly those.
    wait_running(client, [job_id], "diffusion")
    with frozen(replica_pid("DiffusionDeployment")):
        inputs = sorted((store_root / "inputs" / job_id).rglob("*.bin"))
        faces = sorted((store_root / "face" / job_id).rglob("*.bin"))
        assert len(inputs) == 1 and len(faces) == 1, "the job's objects are not stored"
        input_uri = json.loads(redis_client.hget(keys.job(job_id), "input_uris"))[0]
        base = input_uri[:input_uri.index("/inputs/")]  # the store's URL
        uri_of = {p: f"{base}/{p.relative_to(store_root).as_posix()}" for p in inputs + faces}
        assert crypto.decrypt(inputs[0].read_bytes(), key, uri=uri_of[inputs[0]]) == clean
        embedding = np.frombuffer(crypto.decrypt(faces[0].read_bytes(), key,
                                                 uri=uri_of[faces[0]]), np.float32)
        # The service's embedding is the one this photo has (computed here, same weights).
        assert np.allclose(embedding, face_embedding(clean, face_weights_path), atol=1e-5)
        needles = {"exif-model": CAMERA_MODEL, "exif-header": b"Exif\x00\x00",
                   "key": key, "key-b64": base64.b64encode(key)}
        needles |= {f"upload-{i}": w for i, w in enumerate(windows(upload))}
        needles |= {f"stripped-{i}": w for i, w in enumerate(windows(clean))}
        needles |= {f"embedding-{i}": w for i, w in enumerate(windows(embedding.tobytes(), 32))}
        blobs = files_under(store_root, redis_server.data_dir) + redis_values(redis_client)
        assert find_needles(blobs, needles) == []

    view = wait_finished(client, job_id)
    assert view["status"] == "succeeded", view
    assert view["num_inputs_purged_verified"] == view["num_inputs"] == 1
    assert view["inputs_purged_s"] - view["finished_s"] < 30  # seconds, not days

    # The output decodes, is the configured size and carries no metadata.
    output = client.get(view["output_urls"][0])
    assert output.status_code == 200 and output.headers["content-type"] == "image/png"
    image = _decodes(output.content)
    assert image.size == (64, 64) and not image.getexif() and not image.text

    _assert_inputs_gone(store_root, redis_client, job_id)
    # And after the purge, with the output stored: still none of it anywhere.
    blobs = files_under(store_root, redis_server.data_dir) + redis_values(redis_client)
    assert find_needles(blobs, needles) == []


def test_art_style_many_files_outputs_readable_from_any_device(client, store_root, redis_client):
    key = crypto.new_device_key()
    files = [encode_image(ASTRONAUT, "PNG"), encode_image(skimage.data.coffee(), "WEBP")]
    response = submit(client, files, key=key, kind="art_style", style="watercolor",
                      account_id="acct-art")
    assert response.status_code == 202, response.text
    view = wait_finished(client, response.json()["job_id"])
    assert view["status"] == "succeeded", view
    assert len(view["output_ids"]) == 2 and view["num_inputs_purged_verified"] == 2
    _assert_inputs_gone(store_root, redis_client, view["job_id"])

    # Another device of the account: no device key, same outputs.
    listing = client.get("/v1/accounts/acct-art/outputs").json()["outputs"]
    assert {o["output_id"] for o in listing} >= set(view["output_ids"])
    for url in view["output_urls"]:
        fetched = client.get(url)
        assert fetched.status_code == 200
        assert _decodes(fetched.content).size == (64, 64)
        # No proxy or browser may keep a copy of a user's picture.
        assert fetched.headers.get("Cache-Control") == "private, no-store"
    # Another account sees none of them.
    stranger = client.get(f"/v1/accounts/someone-else/outputs/{view['output_ids'][0]}")
    assert stranger.status_code == 404
    assert client.get("/v1/accounts/someone-else/outputs").json()["outputs"] == []


def test_photo_without_face_fails_with_reason_and_is_purged(client, store_root, redis_client):
    response = submit(client, [encode_image(skimage.data.chelsea(), "JPEG")],
                      key=crypto.new_device_key(), kind="ai_photo")
    assert response.status_code == 202
    view = wait_finished(client, response.json()["job_id"])
    assert view["status"] == "failed"
    assert "no human face" in view["reason"] and "file 1" in view["reason"]
    assert view["output_ids"] == [] and view["num_inputs_purged_verified"] == 1
    _assert_inputs_gone(store_root, redis_client, view["job_id"])


def test_a_blurred_face_among_sharp_ones_fails_the_job_naming_its_file(client, store_root,
                                                                       redis_client):
    from PIL import ImageFilter

    blurred = np.asarray(Image.fromarray(ASTRONAUT).filter(ImageFilter.GaussianBlur(4)))
    response = submit(client, [encode_image(ASTRONAUT, "PNG"), encode_image(blurred, "PNG")],
                      key=crypto.new_device_key(), kind="ai_photo")
    assert response.status_code == 202
    view = wait_finished(client, response.json()["job_id"])
    assert view["status"] == "failed"
    assert view["reason"].startswith("file 2: the face is too blurred for identity")
    assert "upload a sharper" in view["reason"]
    assert view["output_ids"] == [] and view["num_inputs_purged_verified"] == 2
    _assert_inputs_gone(store_root, redis_client, view["job_id"])


def test_jobs_are_batched_by_key(client, store_root, redis_client):
    """Jobs arriving together with one (kind, style, resolution) share a model call."""
    files = [encode_image(ASTRONAUT, "PNG")]
    key = crypto.new_device_key()
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(
            lambda _: submit(client, files, key=key, kind="art_style", style="comic"), range(4)))
    assert all(r.status_code == 202 for r in responses)
    views = [wait_finished(client, r.json()["job_id"]) for r in responses]
    assert all(v["status"] == "succeeded" for v in views)
    assert max(v["batch_sizes"]["diffusion"] for v in views) >= 2
    for v in views:
        _assert_inputs_gone(store_root, redis_client, v["job_id"])


def test_unknown_job_is_404(client):
    assert client.get("/v1/accounts/acct-1/jobs/does-not-exist").status_code == 404


# -- bad input: a 4xx with a reason, and nothing stored or registered -----------------

def _png_header_only(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


_GOOD = encode_image(ASTRONAUT, "JPEG")
_KEY = crypto.new_device_key()

BAD_REQUESTS = {
    "empty file": (dict(files=[b""]), 400, "empty"),
    "truncated jpeg": (dict(files=[_GOOD[: len(_GOOD) // 2]]), 422, "truncated"),
    "text named .jpg": (dict(files=[b"hello, this is not a photo\n" * 20]), 415, "not a readable image"),
    "20000x20000 png": (dict(files=[_png_header_only(20000, 20000)]), 413, "pixels"),
    "file over the size limit": (
        dict(files=[b"\xff\xd8" + b"\x00" * (3 * 1024 * 1024 + 10)]), 413, "over the limit"),
    "too many files": (dict(files=[_GOOD] * 4), 413, "at most 3"),
    "unknown style": (dict(files=[_GOOD], style="vaporwave"), 422, "style"),
    "unknown kind": (dict(files=[_GOOD], kind="deepfake"), 422, "kind"),
    "bad account id": (dict(files=[_GOOD], account_id="../etc"), 422, "account_id"),
    "missing key": (dict(files=[_GOOD], headers={}), 400, "X-Device-Key"),
    "short key": (dict(files=[_GOOD], headers=key_header(b"x" * 16)), 400, "32"),
    "key not base64": (dict(files=[_GOOD], headers={"X-Device-Key": "***"}), 400, "base64"),
}


# What a job request can leave behind: its job, the account's job indexes, the retention
# records and inputs of its objects, its Idempotency-Key. Only these are compared, and only
# for additions: the shared service keeps deleting, minimising and flushing earlier tests'
# outputs, receipts and usage in the background, which a refused request cannot cause.
_REQUEST_TRACES = (keys.job("*"), keys.account_jobs("*"), keys.account_active("*"),
                   keys.retention_record("*"), keys.retention_job("*"), keys.idempotency("*", "*"))


def _snapshot(store_root: Path, redis_client) -> tuple[set[str], set[str], set[bytes]]:
    names = {k.decode() for pattern in _REQUEST_TRACES
             for k in redis_client.scan_iter(match=pattern, count=1000)}
    inputs = store_root / "inputs"
    stored = {str(p.relative_to(store_root)) for p in inputs.rglob("*") if p.is_file()} \
        if inputs.exists() else set()
    return names, stored, set(redis_client.smembers(keys.ACTIVE_JOBS))


def _wait_quiet(redis_client, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while redis_client.scard(keys.ACTIVE_JOBS) or redis_client.zcount(keys.RETENTION_DUE, "-inf",
                                                                          "+inf"):
        assert time.monotonic() < deadline, "earlier jobs did not settle"
        time.sleep(0.1)


@pytest.mark.parametrize("case", list(BAD_REQUESTS), ids=list(BAD_REQUESTS))
def test_bad_input_is_rejected_and_changes_nothing(case, client, store_root, redis_client):
    request, status, words = BAD_REQUESTS[case]
    _wait_quiet(redis_client)
    before = _snapshot(store_root, redis_client)
    parts = [("files", (f"f{i}.jpg", d, "image/jpeg")) for i, d in enumerate(request["files"])]
    response = client.post(
        "/v1/jobs", files=parts, headers=request.get("headers", key_header(_KEY)),
        data={"kind": request.get("kind", "ai_photo"), "style": request.get("style", "portrait"),
              "account_id": request.get("account_id", "acct-bad")})
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]
    assert base64.b64encode(_KEY).decode() not in response.text
    after = _snapshot(store_root, redis_client)
    added = [sorted(now - then) for now, then in zip(after, before, strict=True)]
    assert added == [[], [], []], added  # no job, record, input or key left behind


def test_nothing_plaintext_in_any_input_object_while_stored(service, store_root):
    """Every object under inputs/ is Ephemera ciphertext, never an image (checked on a
    fresh upload, before the pipeline purges it)."""
    import redis as redis_lib

    from pipeline.jobs.intake import accept_job, check_job_request
    from pipeline.state.job_store import JobStore
    from pipeline.storage.base import open_stores

    settings = service.settings
    stores = open_stores(settings.storage)
    store = stores.outputs
    jobs = JobStore(redis_lib.Redis.from_url(settings.service.redis_url))
    request = check_job_request(account_id="acct-direct", kind="art_style", style="comic",
                                resolution_px=None, files=[jpeg_with_gps(ASTRONAUT)],
                                settings=settings)
    key = crypto.new_device_key()
    job, _ = accept_job(request, key, stores, jobs, settings)
    try:
        blob = (store_root / job.input_uris[0][len(store.url) + 1:]).read_bytes()
        assert blob.startswith(crypto.MAGIC)
        with pytest.raises(PIL.UnidentifiedImageError):
            _decodes(blob)
        plain = crypto.decrypt(blob, key, uri=job.input_uris[0])
        decoded = _decodes(plain)
        assert not decoded.getexif() and CAMERA_MODEL not in plain
        assert np.asarray(decoded.convert("RGB")).shape == ASTRONAUT.shape
    finally:
        from pipeline.retention.purge import purge_finished_job

        jobs.finish_job(job.job_id, ok=False, reason="test cleanup")
        purge_finished_job(job.job_id, stores, jobs, owner="test", cfg=settings.retention)


# -- user deletion and metrics -------------------------------------------------------

def _generate(client, account_id: str, num_files: int = 1) -> dict:
    files = [encode_image(ASTRONAUT, "PNG")] * num_files
    response = submit(client, files, key=crypto.new_device_key(), kind="art_style",
                      style="comic", account_id=account_id)
    assert response.status_code == 202, response.text
    view = wait_finished(client, response.json()["job_id"])
    assert view["status"] == "succeeded", view
    return view


def test_delete_one_output_is_prompt_verified_and_receipted(client, store_root):
    view = _generate(client, "acct-del-one", num_files=2)
    gone_id, kept_id = view["output_ids"]
    assert client.delete(f"/v1/accounts/other-acct/outputs/{gone_id}").status_code == 404
    response = client.delete(f"/v1/accounts/acct-del-one/outputs/{gone_id}")
    assert response.status_code == 200 and response.json()["status"] == "complete"
    assert client.get(f"/v1/accounts/acct-del-one/outputs/{gone_id}").status_code == 404
    assert client.get(f"/v1/accounts/acct-del-one/outputs/{kept_id}").status_code == 200
    assert not list(store_root.rglob(f"{gone_id}.*")) and list(store_root.rglob(f"{kept_id}.*"))
    receipt = client.get(response.json()["receipt_url"]).json()
    assert receipt["kind"] == "output" and receipt["status"] == "complete"
    assert [o["result"] for o in receipt["objects"]] == ["verified_gone"]


def test_delete_account_removes_outputs_jobs_and_index(client, store_root):
    views = [_generate(client, "acct-del-all") for _ in range(2)]
    response = client.delete("/v1/accounts/acct-del-all")
    assert response.status_code == 202
    receipt = api_over(client).wait_deletion("acct-del-all", response.json()["receipt_id"])
    assert sum(o.object_class == "output" for o in receipt.objects) == 2
    assert client.get("/v1/accounts/acct-del-all/outputs").json()["outputs"] == []
    for view in views:
        assert client.get(job_url(view["job_id"])).status_code == 404
        for output_id in view["output_ids"]:
            assert not list(store_root.rglob(f"{output_id}.*"))
    assert client.get("/v1/accounts/acct-del-all/deletions/not-a-receipt").status_code == 404


def test_metrics_export_purge_lag_and_oldest_input(client):
    _generate(client, "acct-metrics")
    text = client.get("/metrics").text
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    count = float(values["ephemera_purge_lag_seconds_count"])
    assert count >= 1
    # A histogram: every lag is under 30 s, so that bucket holds them all.
    assert float(values['ephemera_purge_lag_seconds_bucket{le="30.0"}']) == count
    assert float(values['ephemera_purge_lag_seconds_bucket{le="+Inf"}']) == count
    assert 'ephemera_oldest_object_age_seconds{object_class="input"}' in values
    assert 0 < float(values['ephemera_batch_fill_ratio{stage="diffusion"}']) <= 1
    # Prometheus conventions: a HELP and a TYPE per family, counters end in _total.
    assert "# TYPE ephemera_purge_failures_total counter" in text
    assert text.count("# HELP") == text.count("# TYPE") >= 6


def test_calls_without_the_api_token_are_refused_and_change_nothing(service, store_root,
                                                                     redis_client):
    import httpx

    _wait_quiet(redis_client)
    before = _snapshot(store_root, redis_client)
    with httpx.Client(base_url=service.base_url, timeout=60) as anonymous:
        assert anonymous.get("/healthz").status_code == 200  # liveness needs no token
        response = submit(anonymous, [_GOOD], key=_KEY)
        assert response.status_code == 401 and "token" in response.json()["detail"]
        wrong = anonymous.post("/v1/jobs", headers={"Authorization": "Bearer wrong-token-xyz",
                                                    **key_header(_KEY)},
                               files=[("files", ("a.jpg", _GOOD, "image/jpeg"))],
                               data={"kind": "ai_photo", "style": "portrait",
                                     "account_id": "acct-1"})
        assert wrong.status_code == 401
        for path in ("/v1/accounts/acct-1/outputs", "/v1/accounts/acct-1/jobs/x", "/metrics"):
            assert anonymous.get(path).status_code == 401
        assert anonymous.delete("/v1/accounts/acct-1").status_code == 401
    after = _snapshot(store_root, redis_client)
    added = [sorted(now - then) for now, then in zip(after, before, strict=True)]
    assert added == [[], [], []], added  # no job, record, input or key left behind


def test_the_metrics_token_reads_metrics_and_nothing_else(service, store_root, redis_client):
    """Prometheus's token (service.yaml metrics_token_env) opens GET /metrics only: never
    /v1, the API document or a job submission, and it changes nothing."""
    import httpx

    from tests.integration.conftest import METRICS_TOKEN

    _wait_quiet(redis_client)
    before = _snapshot(store_root, redis_client)
    metrics = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    with httpx.Client(base_url=service.base_url, timeout=60, headers=metrics) as scraper:
        scraped = scraper.get("/metrics")
        assert scraped.status_code == 200 and "# TYPE ephemera_jobs_unfinished gauge" in scraped.text
        for path in ("/v1/accounts/acct-1/outputs", "/v1/accounts/acct-1/jobs/x",
                     "/openapi.json", "/docs"):
            assert scraper.get(path).status_code == 401, path
        refused = submit(scraper, [_GOOD], key=_KEY)
        assert refused.status_code == 401 and "token" in refused.json()["detail"]
        assert scraper.delete("/v1/accounts/acct-1").status_code == 401
    assert httpx.get(f"{service.base_url}/metrics", timeout=60).status_code == 401
    after = _snapshot(store_root, redis_client)
    added = [sorted(now - then) for now, then in zip(after, before, strict=True)]
    assert added == [[], [], []], added


def test_chunked_upload_without_length_is_refused(client, redis_client, store_root):
    _wait_quiet(redis_client)
    before = _snapshot(store_root, redis_client)

    def chunks():
        yield b"--x\r\n"

    response = client.post("/v1/jobs", content=chunks(), headers={
        **key_header(_KEY), "Content-Type": "multipart/form-data; boundary=x"})
    assert response.status_code == 411
    after = _snapshot(store_root, redis_client)
    added = [sorted(now - then) for now, then in zip(after, before, strict=True)]
    assert added == [[], [], []], added  # no job, record, input or key left behind


def test_a_deleted_account_accepts_no_new_job(client):
    _generate(client, "acct-tomb")
    assert client.delete("/v1/accounts/acct-tomb").status_code == 202
    response = submit(client, [_GOOD], key=_KEY, account_id="acct-tomb")
    assert response.status_code == 409 and "being deleted" in response.json()["detail"]


def _replica_names(deployment: str) -> set[str]:
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::ephemera#{deployment}#")}


def _wait_pool_batching(deployment: str, wanted: dict, *, consecutive: int = 6,
                        timeout_s: float = 30.0) -> None:
    """Wait until ``consecutive`` calls in a row to the pool's ``batching_now`` (Serve
    routes each to any replica) answer with ``wanted``'s values: the tune reached them."""
    from ray import serve

    from serve.app import APP_NAME

    handle = serve.get_deployment_handle(deployment, app_name=APP_NAME)
    deadline = time.monotonic() + timeout_s
    agreed, seen = 0, {}
    while agreed < consecutive:
        assert time.monotonic() < deadline, (
            f"{deployment} replicas still run {seen} {timeout_s} s after the tune to {wanted}")
        now = handle.batching_now.remote().result(timeout_s=10)
        seen = {k: now[k] for k in wanted}
        agreed = agreed + 1 if seen == wanted else 0
        if not agreed:
            time.sleep(0.1)


def test_batching_is_tuned_live_under_load_without_restart_or_loss(client, redis_client):
    """`ephemera tune` while jobs are in flight: the diffusion pool takes the new batching
    through Serve's user_config (a longer wait gathers a burst into one batch); no replica
    restarts and every job succeeds. A cost below the largest job is refused and changes
    nothing."""
    from serve.tuning import retune

    replicas_before = _replica_names("DiffusionDeployment") | _replica_names("JobRunnerDeployment")
    files, key = [encode_image(ASTRONAUT, "PNG")], crypto.new_device_key()

    def burst(n: int, account: str) -> list[str]:
        with ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(lambda _: submit(client, files, key=key, kind="art_style",
                                                        style="comic", account_id=account),
                                      range(n)))
        assert all(r.status_code == 202 for r in responses), [r.text for r in responses]
        return [r.json()["job_id"] for r in responses]

    try:
        in_flight = burst(6, "acct-tune-a")
        with pytest.raises(ValueError, match="could no longer run every job"):
            retune("diffusion", {"max_batch_cost": 1})  # a 3-photo job costs 3
        applied = retune("diffusion", {"max_batch_cost": 64, "max_wait_ms": 4000})
        assert applied["max_batch_cost"] == 64
        views = [wait_finished(client, j) for j in in_flight]
        assert [v["status"] for v in views] == ["succeeded"] * 6
        _wait_pool_batching("DiffusionDeployment",
                            {k: applied[k] for k in ("max_batch_cost", "max_wait_ms")})
        after = [wait_finished(client, j) for j in burst(4, "acct-tune-b")]
        assert [v["status"] for v in after] == ["succeeded"] * 4
        assert [v["batch_sizes"]["diffusion"] for v in after] == [4, 4, 4, 4]
        replicas_after = (_replica_names("DiffusionDeployment")
                          | _replica_names("JobRunnerDeployment"))
        assert replicas_after == replicas_before  # reconfigured in place, not restarted
    finally:
        retune("diffusion", {"max_batch_cost": 8, "max_wait_ms": 400})


def test_an_account_over_its_in_flight_limit_gets_429_and_nothing_changes(
        client, service, store_root, redis_client):
    """The per-account limit: the jobs over it are refused with Retry-After, no record or
    object is left of them, and the accepted ones all finish."""
    from serve.tuning import retune

    limit = service.settings.service.max_jobs_in_flight_per_account
    files, key = [encode_image(ASTRONAUT, "PNG")], crypto.new_device_key()
    retune("diffusion", {"max_wait_ms": 4000, "max_batch_cost": 64})  # jobs stay in flight
    try:
        with ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(lambda _: submit(client, files, key=key, kind="art_style",
                                                        style="comic", account_id="acct-busy"),
                                      range(limit + 4)))
    finally:
        retune("diffusion", {"max_batch_cost": 8, "max_wait_ms": 400})
    accepted = [r for r in responses if r.status_code == 202]
    refused = [r for r in responses if r.status_code == 429]
    assert len(accepted) + len(refused) == len(responses)
    assert refused and len(accepted) >= limit
    assert all(int(r.headers["Retry-After"]) > 0 and "unfinished" in r.json()["detail"]
               for r in refused)
    views = [wait_finished(client, r.json()["job_id"]) for r in accepted]
    assert all(v["status"] == "succeeded" for v in views)
    assert redis_client.zcard(keys.account_jobs("acct-busy")) == len(accepted)
    assert redis_client.scard(keys.account_active("acct-busy")) == 0


def test_ephemera_status_shows_replicas_queue_batch_fill_and_purge_lag(client, service, capsys):
    from serve.cli import main as cli

    _generate(client, "acct-status")
    assert cli(["status", "--redis-url", service.settings.service.redis_url]) == 0
    out = capsys.readouterr().out
    for deployment in ("ApiDeployment", "JobRunnerDeployment", "DiffusionDeployment"):
        assert deployment in out
    assert "2 running" in out  # the two job runners of the test settings
    assert "max_batch_cost" in out  # the live batching each pool runs with
    for metric in ("ephemera_jobs_unfinished", "ephemera_batch_fill_ratio[diffusion]",
                   "purge lag p99:"):
        assert metric in out


def test_ray_metrics_agent_exports_stage_latency_queue_wait_and_batch_size(client, service):
    """Per-process metrics reach Prometheus through Ray's metrics agent on the node."""
    import httpx

    _generate(client, "acct-ray-metrics")
    port = service.settings.service.ray_metrics_export_port
    wanted = {"ray_ephemera_stage_latency_seconds_count", "ray_ephemera_queue_wait_seconds_count",
              "ray_ephemera_batch_size_jobs_count"}
    found: set[str] = set()
    deadline = time.monotonic() + 60
    while not wanted <= found and time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        found = {line.split("{")[0] for line in text.splitlines() if not line.startswith("#")}
        time.sleep(1)
    assert wanted <= found, wanted - found


def test_the_api_schema_and_docs_need_the_token_like_v1(service, client):
    with httpx.Client(base_url=service.base_url, timeout=30) as anonymous:
        for path in ("/openapi.json", "/docs"):
            assert anonymous.get(path).status_code == 401
        assert anonymous.get("/healthz").status_code == 200
    document = client.get("/openapi.json")
    assert document.status_code == 200 and "/v1/jobs" in document.json()["paths"]
    assert client.get("/docs").status_code == 200


def test_another_accounts_job_and_receipt_look_exactly_like_missing_ones(client):
    view = _generate(client, "acct-scope-a")
    job_id, output_id = view["job_id"], view["output_ids"][0]
    mine = client.get(f"/v1/accounts/acct-scope-a/jobs/{job_id}")
    assert mine.status_code == 200 and mine.json()["output_urls"][0].startswith(
        "/v1/accounts/acct-scope-a/outputs/")
    theirs = client.get(f"/v1/accounts/acct-scope-b/jobs/{job_id}")
    missing = client.get("/v1/accounts/acct-scope-b/jobs/" + "0" * 32)
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json()["error"] == missing.json()["error"] == "NotFound"
    deletion = client.delete(f"/v1/accounts/acct-scope-a/outputs/{output_id}").json()
    receipt_id = deletion["receipt_id"]
    assert deletion["receipt_url"] == f"/v1/accounts/acct-scope-a/deletions/{receipt_id}"
    assert client.get(deletion["receipt_url"]).status_code == 200
    assert client.get(f"/v1/accounts/acct-scope-b/deletions/{receipt_id}").status_code == 404
    assert receipt_id not in (job_id, f"purge-{job_id}")


def test_a_retried_post_with_its_idempotency_key_returns_the_first_job(client, store_root):
    key = crypto.new_device_key()
    files = [("files", ("a.png", encode_image(ASTRONAUT, "PNG"), "image/png"))]
    data = {"kind": "art_style", "style": "comic", "account_id": "acct-idem"}
    headers = {**key_header(key), "Idempotency-Key": "retry-me-0001"}
    first = client.post("/v1/jobs", files=files, data=data, headers=headers)
    again = client.post("/v1/jobs", files=files, data=data, headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.json()["job_id"] == first.json()["job_id"] and again.json()["replayed"]
    assert first.headers["Location"] == first.json()["status_url"]
    stored = [p for p in (store_root / "inputs" / first.json()["job_id"]).rglob("*") if p.is_file()]
    assert len(stored) <= 1  # one encrypted copy, not two (or none: already purged)
    other = client.post("/v1/jobs", files=files, data={**data, "style": "watercolor"},
                        headers=headers)
    assert other.status_code == 409 and "different request" in other.json()["detail"]
    bad = client.post("/v1/jobs", files=files, data=data,
                      headers={**key_header(key), "Idempotency-Key": "no spaces!"})
    assert bad.status_code == 422


def test_the_running_service_serves_the_committed_contract(client):
    import json

    committed = json.loads((Path(__file__).resolve().parents[2] / "docs" / "openapi.json")
                           .read_text())
    assert client.get("/openapi.json").json() == committed


# -- promises the user can check -----------------------------------------------------------

def test_a_stored_input_opens_with_the_header_key_and_with_no_other(client, redis_client,
                                                                    service):
    """Over HTTP: the object the service stores for an upload decrypts with the key the
    request sent in X-Device-Key, and with no other key (another device's, all zeros)."""
    from pipeline.core.errors import WrongKey
    from pipeline.state.job_store import JobStore
    from pipeline.storage.base import open_stores
    from serve.tuning import retune

    key, photo = crypto.new_device_key(), encode_image(ASTRONAUT, "PNG")
    stores = open_stores(service.settings.storage)
    retune("diffusion", {"max_wait_ms": 4000, "max_batch_cost": 64})  # the job waits a while
    try:
        response = submit(client, [photo], key=key, kind="art_style", style="comic",
                          account_id="acct-keys")
        assert response.status_code == 202, response.text
        job = JobStore(redis_client).get_job(response.json()["job_id"])
        [uri] = job.input_uris
        store, object_key = stores.locate(uri)
        blob = store.get(object_key, customer_key=key)
        try:
            plain = crypto.decrypt(blob, key, uri=uri)
        except WrongKey:
            pytest.fail("the stored input does not open with the key the request sent")
        assert np.array_equal(np.asarray(_decodes(plain).convert("RGB")), ASTRONAUT)
        for other in (crypto.new_device_key(), bytes(32)):
            with pytest.raises(WrongKey):
                crypto.decrypt(blob, other, uri=uri)
    finally:
        retune("diffusion", {"max_batch_cost": 8, "max_wait_ms": 400})
    assert wait_finished(client, job.job_id)["status"] == "succeeded"


def _file_fds(pid: int) -> set[str]:
    """What the process has open that is a file (not a socket, pipe or anonymous inode)."""
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("/"):
            found.add(f"{fd.name} -> {target}")
    return found


def test_a_large_upload_leaves_no_plaintext_on_disk_while_it_is_read(client, service,
                                                                     store_root):
    """An upload over 1 MiB (Starlette's spool limit) trickles in for a second while the
    ingress replica's open files are watched: it opens no file but the object store's
    (which writes ciphertext, checked elsewhere), so no plaintext touches a disk (a spooled
    upload shows as an open temporary file)."""
    import threading

    rng = np.random.default_rng(3)
    big = encode_image(rng.integers(0, 255, (700, 700, 3), dtype=np.uint8), "PNG")
    assert len(big) > (1 << 20) * 1.2
    boundary = "ephemera-test-boundary"
    fields = {"kind": "art_style", "style": "comic", "account_id": "acct-big"}
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n'
                    f"{v}\r\n".encode() for k, v in fields.items())
    body += (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; '
             f'filename="big.png"\r\nContent-Type: image/png\r\n\r\n').encode()
    body += big + f"\r\n--{boundary}--\r\n".encode()

    def trickle():
        for start in range(0, len(body), 64 * 1024):
            yield body[start:start + 64 * 1024]
            time.sleep(0.04)

    pid = replica_pid("ApiDeployment")
    before, seen, done = _file_fds(pid), set(), threading.Event()

    def watch():
        while not done.is_set():
            seen.update(_file_fds(pid))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        response = client.post("/v1/jobs", content=trickle(), headers={
            **key_header(crypto.new_device_key()), "Content-Length": str(len(body)),
            "Content-Type": f"multipart/form-data; boundary={boundary}"})
    finally:
        done.set()
        watcher.join()
    assert response.status_code == 202, response.text
    opened = {f for f in seen - before if str(store_root) not in f}
    assert opened == set(), "the ingress opened files while reading the upload"
    done_job = api_over(client).wait_job("acct-big", response.json()["job_id"], timeout_s=180)
    assert done_job.status == "succeeded"
