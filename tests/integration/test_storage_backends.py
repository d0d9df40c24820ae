"""S3 (SeaweedFS, a real S3 server) and GCS (gcp-storage-emulator) on loopback: the
pipeline path per backend, data residency, posture checks, retries, keys."""

from __future__ import annotations

import http.server
import io
import threading
import uuid

import httpx
import numpy as np
import PIL.Image
import pytest
import redis
import skimage.data

from pipeline.core.config import GcsConfig, S3Config, StorageConfig, load_settings
from pipeline.core.errors import InvalidUpload, StorageError, WrongKey
from pipeline.jobs.intake import accept_job, check_job_request
from pipeline.jobs.stages import diffusion_stage, face_stage
from pipeline.retention.deletion import delete_account, delete_output
from pipeline.retention.purge import purge_finished_job, reconcile
from pipeline.security import crypto
from pipeline.state.job_store import JobStore
from pipeline.storage.base import StoreSet
from pipeline.storage.gcs import open_gcs_stores
from pipeline.storage.posture import check_gcs_bucket, check_s3_bucket
from pipeline.storage.s3 import S3ObjectStore
from tests.integration.helpers import encode_image, windows
from tests.integration.object_servers import make_gcs_bucket, make_s3_bucket

pytestmark = pytest.mark.storage

ASTRONAUT = encode_image(skimage.data.astronaut(), "JPEG")
REGIONS = {"us-central1": "in-usc1", "europe-west1": "in-euw1", "asia-northeast1": "in-ane1"}
COUNTRIES = {"US": "us-central1", "TR": "europe-west1", "DE": "europe-west1",
             "JP": "asia-northeast1"}


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def s3_config(seaweed, bucket: str, **extra) -> S3Config:
    return S3Config(bucket=bucket, region="us-east-1", endpoint_url=seaweed.endpoint,
                    output_encryption="none",  # SeaweedFS has no SSE-S3 without a KMS
                    max_attempts=2, **extra)


def gcs_config(emulator, buckets: dict[str, str]) -> GcsConfig:
    return GcsConfig(project="ephemera-test", endpoint_url=emulator.endpoint, buckets=buckets,
                     country_regions={c: r for c, r in COUNTRIES.items()},
                     fallback_region="us-central1", max_attempts=2)


@pytest.fixture()
def jobs(redis_server):
    client = redis.Redis.from_url(redis_server.url.rsplit("/", 1)[0] + "/4")
    yield JobStore(client)
    client.flushdb()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny diffusion models and the real MTCNN, loaded once for the module."""
    from pipeline.core.config import ModelsConfig
    from pipeline.models.faces import MtcnnDetector
    from pipeline.models.loading import load_embedder, load_generator
    from pipeline.models.runtime import select_runtime

    runtime = select_runtime(ModelsConfig())
    root = tmp_path_factory.mktemp("m")
    generator = load_generator(root / "tiny", runtime, ip_adapter=root / "adapter.safetensors",
                               build_tiny_if_missing=True)
    return (MtcnnDetector(runtime, min_probability=0.9),
            load_embedder(root / "arcface.onnx", runtime, build_tiny_if_missing=True), generator)


@pytest.fixture(params=["s3", "gcs"])
def stores(request, seaweed, gcs_emulator) -> StoreSet:
    """Outputs always on S3 (the policy: generated photos on AWS, US); inputs and face data
    on the backend under test."""
    s3_client = seaweed.client()
    outputs_bucket = _name("out")
    make_s3_bucket(s3_client, outputs_bucket, lifecycle=False)
    outputs = S3ObjectStore(s3_config(seaweed, outputs_bucket), client=s3_client)
    if request.param == "s3":
        inputs_bucket = _name("in")
        make_s3_bucket(s3_client, inputs_bucket)
        inputs = S3ObjectStore(s3_config(seaweed, inputs_bucket), client=s3_client)
        return StoreSet({inputs.region: inputs}, outputs, lambda country: inputs.region)
    client = gcs_emulator.client()
    buckets = {region: _name(short) for region, short in REGIONS.items()}
    for bucket in buckets.values():
        make_gcs_bucket(client, bucket)
    cfg = gcs_config(gcs_emulator, buckets)
    from pipeline.storage.residency import region_for_country

    return StoreSet(open_gcs_stores(cfg, client), outputs,
                    lambda country: region_for_country(country, cfg))


def _raw_exists(store, key: str) -> bool:
    """HEAD through the provider's own client, not through our store code."""
    if store.provider == "aws":
        try:
            store.client.head_object(Bucket=store.bucket, Key=key)
            return True
        except Exception as exc:
            assert "404" in str(exc) or "Not Found" in str(exc), exc
            return False
    return store.client.bucket(store.bucket).blob(key).exists()


def _raw_get(store, key: str) -> bytes:
    if store.provider == "aws":
        return store.client.get_object(Bucket=store.bucket, Key=key)["Body"].read()
    return store.client.bucket(store.bucket).blob(key).download_as_bytes()


def test_pipeline_path_per_backend(stores, jobs, models):
    """Upload -> generate -> purge -> verify (HEAD 404) -> delete output -> delete account."""
    detector, embedder, generator = models
    settings = load_settings()
    settings = settings.model_copy(update={"models": settings.models.model_copy(
        update={"num_inference_steps": 2})})
    key = crypto.new_device_key()
    request = check_job_request(account_id="alice_smith", kind="ai_photo", style="portrait",
                                resolution_px=None, files=[ASTRONAUT], settings=settings,
                                country="TR")
    job, item = accept_job(request, key, stores, jobs, settings)
    input_store, input_key = stores.locate(job.input_uris[0])
    record = jobs.ledger.get(job.input_uris[0])
    assert (record.provider, record.region, record.bucket) == (
        input_store.provider, input_store.region, input_store.bucket)
    stored = _raw_get(input_store, input_key)
    # Ciphertext: not an image, and no 48-byte run of the upload or of its clean re-encoding
    # (short markers like b"PNG" occur by chance in ~500 kB of random bytes).
    assert stored.startswith(crypto.MAGIC)
    with pytest.raises(PIL.UnidentifiedImageError):
        PIL.Image.open(io.BytesIO(stored))
    clean = request.images[0].png_bytes
    assert not [w for w in windows(ASTRONAUT) + windows(clean) if w in stored]

    [face] = face_stage([item], stores, jobs, detector, embedder, settings.retention)
    assert face.ok, face.reason
    face_store, face_key = stores.locate(face.face_uri)
    assert face_store is input_store  # face data stays in the user's region
    [result] = diffusion_stage([item.__class__(**{**{s: getattr(item, s) for s in item.__slots__},
                                                  "face_uri": face.face_uri})],
                               stores, jobs, generator, settings)
    assert result.ok, result.reason
    out = jobs.get_output("alice_smith", result.output_ids[0])
    out_store, out_key = stores.locate(out.uri)
    assert out_store is stores.outputs and out.provider == "aws" and out.region == "us-east-1"
    assert _raw_get(out_store, out_key).startswith(b"\x89PNG")
    # Object names carry no personal data.
    all_keys = [k for s in stores.all() for k in s.list_keys("")]
    assert all_keys and not any("alice" in k or "photo" in k for k in all_keys)

    assert jobs.claim_job(job.job_id, "runner-test")
    jobs.finish_job(job.job_id, ok=True, output_ids=result.output_ids)
    purge_finished_job(job.job_id, stores, jobs, owner="t", cfg=settings.retention)
    assert not _raw_exists(input_store, input_key) and not _raw_exists(face_store, face_key)

    delete_output("alice_smith", out.output_id, stores, jobs)
    assert not _raw_exists(out_store, out_key)
    request = check_job_request(account_id="alice_smith", kind="art_style", style="comic",
                                resolution_px=None, files=[ASTRONAUT], settings=settings)
    job2, item2 = accept_job(request, key, stores, jobs, settings)
    [art] = diffusion_stage([item2], stores, jobs, generator, settings)
    assert art.ok
    from pipeline.retention.deletion import request_account_deletion

    receipt_id = request_account_deletion("alice_smith", jobs)
    delete_account("alice_smith", receipt_id, stores, jobs, owner="t", cfg=settings.retention)
    assert [k for s in stores.all() for k in s.list_keys("")] == []
    assert [r for r in reconcile(stores, jobs.ledger, owner="t", cfg=settings.retention)
            if r.object_class == "orphan"] == []


@pytest.mark.parametrize(("country", "region"), [
    ("TR", "europe-west1"), ("de", "europe-west1"), ("JP", "asia-northeast1"),
    ("US", "us-central1"), ("BR", "us-central1"), (None, "us-central1")])
def test_gcs_residency_routes_each_country_to_its_region(gcs_emulator, seaweed, jobs,
                                                         country, region):
    client = gcs_emulator.client()
    buckets = {r: _name(short) for r, short in REGIONS.items()}
    for bucket in buckets.values():
        make_gcs_bucket(client, bucket)
    cfg = gcs_config(gcs_emulator, buckets)
    from pipeline.storage.residency import region_for_country

    stores = StoreSet(open_gcs_stores(cfg, client),
                      S3ObjectStore(s3_config(seaweed, "unused-out"), client=seaweed.client()),
                      lambda c: region_for_country(c, cfg))
    settings = load_settings()
    request = check_job_request(account_id="acct-geo", kind="art_style", style="comic",
                                resolution_px=None, files=[ASTRONAUT], settings=settings,
                                country=country)
    job, _ = accept_job(request, crypto.new_device_key(), stores, jobs, settings)
    record = jobs.ledger.get(job.input_uris[0])
    assert (record.provider, record.region, record.bucket) == ("gcp", region, buckets[region])
    assert job.input_uris[0].startswith(f"gs://{buckets[region]}/inputs/")
    assert client.bucket(buckets[region]).blob(job.input_uris[0].split("/", 3)[3]).exists()


def test_bad_country_and_non_us_aws_region_are_refused():
    with pytest.raises(InvalidUpload, match="country"):
        check_job_request(account_id="a", kind="art_style", style="comic", resolution_px=None,
                          files=[ASTRONAUT], settings=load_settings(), country="Turkey")
    with pytest.raises(ValueError, match="outside the US"):
        S3Config(bucket="media", region="eu-west-1")
    with pytest.raises(ValueError, match="no bucket"):
        GcsConfig(project="p", buckets={"us-central1": "b"}, fallback_region="europe-west1")


# -- bucket posture -------------------------------------------------------------------

def test_s3_posture_on_seaweedfs(seaweed):
    client = seaweed.client()
    good, versioned, locked, bare = (_name(p) for p in ("good", "ver", "lock", "bare"))
    make_s3_bucket(client, good)
    make_s3_bucket(client, versioned, versioning=True)
    make_s3_bucket(client, locked, object_lock=True)
    make_s3_bucket(client, bare, lifecycle=False)
    assert check_s3_bucket(client, s3_config(seaweed, good), holds_inputs=True) == []
    [problem] = check_s3_bucket(client, s3_config(seaweed, versioned), holds_inputs=True)
    assert problem.setting == "versioning" and "versioned_bucket" in problem.fix
    settings = [p.setting for p in check_s3_bucket(client, s3_config(seaweed, locked),
                                                   holds_inputs=True)]
    assert "Object Lock" in settings
    problems = check_s3_bucket(client, s3_config(seaweed, bare), holds_inputs=True)
    assert {p.setting for p in problems} == {"lifecycle rule for inputs/",
                                            "lifecycle rule for face/",
                                            "lifecycle rule for work/"}
    assert check_s3_bucket(client, s3_config(seaweed, bare), holds_inputs=False) == []
    wrong_region = S3Config(bucket=good, region="us-west-2", endpoint_url=seaweed.endpoint)
    assert [p.setting for p in check_s3_bucket(client, wrong_region, holds_inputs=True)] == [
        "location"]


def test_versioned_bucket_deletes_every_version_when_configured(seaweed):
    client = seaweed.client()
    bucket = _name("ver")
    make_s3_bucket(client, bucket, versioning=True)
    store = S3ObjectStore(s3_config(seaweed, bucket, versioned_bucket=True), client=client)
    store.put("inputs/j/a.bin", b"v1")
    store.put("inputs/j/a.bin", b"v2")
    store.delete("inputs/j/a.bin")
    listing = client.list_object_versions(Bucket=bucket, Prefix="inputs/j/a.bin")
    assert listing.get("Versions", []) == [] and listing.get("DeleteMarkers", []) == []


def test_gcs_posture_on_the_emulator_and_recorded_resources(gcs_emulator):
    client = gcs_emulator.client()
    fresh = client.create_bucket(_name("fresh"))  # defaults: 7-day soft delete, no lifecycle
    fresh.reload()
    settings = {p.setting for p in check_gcs_bucket(fresh, "US", holds_inputs=True)}
    assert settings == {"soft-delete retention", "lifecycle rule for inputs/",
                        "lifecycle rule for face/", "lifecycle rule for work/"}
    fixed = make_gcs_bucket(client, _name("fixed"))
    fixed.reload()
    # The emulator ignores locations (always "US"), so location is checked on recorded
    # bucket resources below, as GCS returns them.
    assert check_gcs_bucket(fixed, "US", holds_inputs=True) == []

    recorded_good = {
        "name": "in-euw1", "location": "EUROPE-WEST1", "versioning": {"enabled": False},
        "softDeletePolicy": {"retentionDurationSeconds": "0"},
        "lifecycle": {"rule": [{"action": {"type": "Delete"},
                                "condition": {"age": 1, "matchesPrefix": ["inputs/", "face/", "work/"]}}]},
    }
    good = _recorded(client, recorded_good)
    assert check_gcs_bucket(good, "europe-west1", holds_inputs=True) == []
    wrong = {p.setting for p in check_gcs_bucket(good, "asia-northeast1", holds_inputs=True)}
    assert wrong == {"location"}
    recorded_bad = {**recorded_good, "versioning": {"enabled": True},
                    "retentionPolicy": {"retentionPeriod": "864000"},
                    "defaultEventBasedHold": True}
    bad = _recorded(client, recorded_bad)
    assert {p.setting for p in check_gcs_bucket(bad, "europe-west1", holds_inputs=True)} == {
        "versioning", "retention policy", "default event-based hold"}


def _recorded(client, resource: dict):
    """A Bucket built from a recorded bucket resource (the JSON GCS returns)."""
    from google.cloud.storage import Bucket

    bucket = Bucket(client, name=resource["name"])
    bucket._set_properties(resource)
    return bucket


def test_service_refuses_to_start_on_a_bad_bucket(seaweed, tmp_path):
    from serve.cli import main as cli
    from serve.launcher import refuse_bad_buckets

    client = seaweed.client()
    bad = _name("bad")
    make_s3_bucket(client, bad, versioning=True)
    base = load_settings()
    storage = StorageConfig(inputs="s3", outputs="s3", s3=s3_config(seaweed, bad))
    with pytest.raises(ValueError, match="versioning"):
        refuse_bad_buckets(base.model_copy(update={"storage": storage}))
    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    for path in (load_settings.__globals__["CONFIG_DIR"]).glob("*.yaml"):
        (config_dir / path.name).write_text(path.read_text())
    service_yaml = (config_dir / "service.yaml").read_text()  # cloud stores need a token
    (config_dir / "service.yaml").write_text(
        service_yaml.replace("api_token_env: null", "api_token_env: EPHEMERA_API_TOKEN"))
    (config_dir / "storage.yaml").write_text(
        f"inputs: s3\noutputs: s3\ns3:\n  bucket: {bad}\n  region: us-east-1\n"
        f"  endpoint_url: {seaweed.endpoint}\n  output_encryption: none\n")
    assert cli(["--config-dir", str(config_dir), "storage", "check"]) == 1
    good = _name("good")
    make_s3_bucket(client, good)
    (config_dir / "storage.yaml").write_text(
        (config_dir / "storage.yaml").read_text().replace(bad, good))
    assert cli(["--config-dir", str(config_dir), "storage", "check"]) == 0


# -- keys, encryption, retries ----------------------------------------------------------

def test_sse_c_wrong_key_is_a_clear_error_and_the_object_needs_its_key(seaweed):
    client = seaweed.client()
    bucket = _name("ssec")
    make_s3_bucket(client, bucket)
    store = S3ObjectStore(s3_config(seaweed, bucket, sse_c_inputs=True), client=client)
    key, other = crypto.new_device_key(), crypto.new_device_key()
    store.put("inputs/j/x.bin", b"ciphertext", customer_key=key)
    assert store.get("inputs/j/x.bin", customer_key=key) == b"ciphertext"
    with pytest.raises(WrongKey, match="device key"):
        store.get("inputs/j/x.bin", customer_key=other)
    with pytest.raises(Exception, match="customer"):  # the server refuses a keyless read
        client.get_object(Bucket=bucket, Key="inputs/j/x.bin")
    assert store.exists("inputs/j/x.bin")
    store.delete("inputs/j/x.bin")
    assert not store.exists("inputs/j/x.bin")


def test_app_level_wrong_key_fails_the_job_with_a_reason(stores, jobs, models):
    detector, embedder, _ = models
    settings = load_settings()
    request = check_job_request(account_id="acct-k", kind="ai_photo", style="portrait",
                                resolution_px=None, files=[ASTRONAUT], settings=settings)
    _, item = accept_job(request, crypto.new_device_key(), stores, jobs, settings)
    wrong = item.__class__(**{**{s: getattr(item, s) for s in item.__slots__},
                              "device_key": crypto.new_device_key()})
    [result] = face_stage([wrong], stores, jobs, detector, embedder, settings.retention)
    assert not result.ok and not result.retryable and "device key" in result.reason


def test_outputs_get_server_side_encryption_on_aws():
    """SSE-S3 on outputs, checked against moto (a mock: SeaweedFS has no SSE-S3 without a
    KMS), since every device of the account must read outputs."""
    from moto.server import ThreadedMotoServer

    from pipeline.state.redis_server import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        import boto3

        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                              aws_access_key_id="t", aws_secret_access_key="t")
        client.create_bucket(Bucket="outputs-us")
        store = S3ObjectStore(S3Config(bucket="outputs-us", region="us-east-1",
                                       endpoint_url=f"http://127.0.0.1:{port}"), client=client)
        store.put("outputs/acct/o.png", b"\x89PNG...")
        head = client.head_object(Bucket="outputs-us", Key="outputs/acct/o.png")
        assert head["ServerSideEncryption"] == "AES256"
    finally:
        server.stop()


def test_signed_output_url_downloads_the_output(seaweed):
    client = seaweed.client()
    bucket = _name("signed")
    make_s3_bucket(client, bucket, lifecycle=False)
    store = S3ObjectStore(s3_config(seaweed, bucket), client=client)
    png = encode_image(np.zeros((8, 8, 3), np.uint8), "PNG")
    store.put("outputs/d/o.png", png)
    url = store.signed_url("outputs/d/o.png", ttl_s=60)
    assert "Expires=" in url or "X-Amz-Expires=" in url
    assert httpx.get(url).content == png


class _Always503(http.server.BaseHTTPRequestHandler):
    hits = 0

    def _reply(self) -> None:
        type(self).hits += 1
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        self.send_response(503)
        self.send_header("content-length", "0")
        self.end_headers()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _reply

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def failing_server():
    _Always503.hits = 0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Always503)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_s3_5xx_and_timeouts_are_retried_with_backoff_then_fail_clearly(failing_server):
    sleeps: list[float] = []
    cfg = S3Config(bucket="media", region="us-east-1", endpoint_url=failing_server,
                   max_attempts=4, timeout_s=2)
    store = S3ObjectStore(cfg, sleep=sleeps.append)
    with pytest.raises(StorageError, match="after 4 attempts"):
        store.put("inputs/j/x.bin", b"data")
    assert _Always503.hits == 4 and len(sleeps) == 3
    # Full-jitter exponential backoff: each wait within its doubling cap.
    assert all(0.0 <= s <= min(2.0, 0.05 * 2 ** n) for n, s in enumerate(sleeps)), sleeps
    closed = S3ObjectStore(S3Config(bucket="media", region="us-east-1", max_attempts=2,
                                    endpoint_url="http://127.0.0.1:9", timeout_s=1),
                           sleep=sleeps.append)
    with pytest.raises(StorageError, match="after 2 attempts"):
        closed.get("inputs/j/x.bin")


def test_gcs_5xx_is_retried_then_fails_clearly(failing_server):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    from pipeline.storage.gcs import GcsObjectStore

    cfg = GcsConfig(project="p", endpoint_url=failing_server, buckets={"us-central1": "b"},
                    fallback_region="us-central1", max_attempts=3, timeout_s=2)
    gclient = storage.Client(project="p", credentials=AnonymousCredentials(),
                             client_options={"api_endpoint": failing_server})
    sleeps: list[float] = []
    store = GcsObjectStore(cfg, gclient, "b", "us-central1", sleep=sleeps.append)
    with pytest.raises(StorageError, match="after 3 attempts"):
        store.exists("inputs/j/x.bin")
    assert len(sleeps) == 2


def test_face_embedder_loads_from_the_model_store_on_s3_and_gcs(seaweed, gcs_emulator,
                                                                face_weights_path, tmp_path):
    """models.yaml face_embedder_weights may name an s3:// or gs:// store location: staged
    with its manifest, fetched once, verified, and the same model runs."""
    from pipeline.core.config import ModelsConfig
    from pipeline.models.faces import ArcFaceEmbedder
    from pipeline.models.model_store import ModelStoreError, resolve_model, stage_model
    from pipeline.models.runtime import select_runtime

    runtime = select_runtime(ModelsConfig())
    s3_bucket, gcs_bucket = _name("weights"), _name("weights")
    make_s3_bucket(seaweed.client(), s3_bucket, lifecycle=False)
    gcs_emulator.client().create_bucket(gcs_bucket)
    storage = StorageConfig(s3=s3_config(seaweed, "any"),
                            gcs=gcs_config(gcs_emulator, {r: "any" for r in REGIONS}))
    crops = np.random.default_rng(0).integers(0, 255, (2, 112, 112, 3), dtype=np.uint8)
    expected = ArcFaceEmbedder(face_weights_path, runtime).embed(crops)
    for location in (f"s3://{s3_bucket}/arcface/v1", f"gs://{gcs_bucket}/arcface/v1"):
        manifest = stage_model(face_weights_path, location, storage)
        local = resolve_model(location, sha256=manifest.sha256, cache_dir=str(tmp_path / "c"),
                              storage=storage, setting="face_embedder_weights")
        assert local.name == face_weights_path.name and local.is_file()
        np.testing.assert_array_equal(ArcFaceEmbedder(local, runtime).embed(crops), expected)
    with pytest.raises(ModelStoreError, match="no manifest.json"):
        resolve_model(f"s3://{s3_bucket}/missing", sha256=None, cache_dir=str(tmp_path / "c"),
                      storage=storage)
