"""The whole service over HTTP on cloud protocols: inputs and face data on GCS (emulator),
outputs on S3 (SeaweedFS), run as `ephemera serve` in its own process with its own Ray.

(The session's main service uses the local store; this one shows the same HTTP path,
purge and account deletion on the cloud backends.)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import skimage.data
import yaml

from pipeline.core.config import CONFIG_DIR
from pipeline.security import crypto
from pipeline.state.redis_server import free_port
from tests.integration.conftest import API_TOKEN, API_TOKEN_ENV
from tests.integration.helpers import api_over, encode_image, submit, wait_finished
from tests.integration.object_servers import FAKE_AWS_ENV, make_gcs_bucket, make_s3_bucket

pytestmark = pytest.mark.storage


@pytest.fixture()
def cloud_service(tmp_path, seaweed, gcs_emulator, redis_server, pinned_models):
    inputs_bucket, outputs_bucket = f"in-{uuid.uuid4().hex[:8]}", f"out-{uuid.uuid4().hex[:8]}"
    # The emulator reports every bucket's location as "US", so this service routes every
    # country to one region named "us"; per-country routing is tested in-process.
    make_gcs_bucket(gcs_emulator.client(), inputs_bucket)
    make_s3_bucket(seaweed.client(), outputs_bucket, lifecycle=False)
    configs = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, configs)
    port = free_port()
    service_yaml = (configs / "service.yaml").read_text()
    service_yaml = service_yaml.replace("redis_url: null", f"redis_url: {redis_server.url[:-2]}/6")
    service_yaml = service_yaml.replace("http_port: 0", f"http_port: {port}")
    service_yaml = service_yaml.replace("ray_object_store_mb: null", "ray_object_store_mb: 150")
    # Cloud stores: the service refuses to run without its API token (fail closed).
    service_yaml = service_yaml.replace("api_token_env: null", f"api_token_env: {API_TOKEN_ENV}")
    (configs / "service.yaml").write_text(service_yaml)
    # Production-shaped (cloud stores, a token): only pinned models are served.
    models = {**yaml.safe_load((configs / "models.yaml").read_text()), **pinned_models,
              "model_cache_dir": str(tmp_path / "model-cache"), "num_inference_steps": 2}
    (configs / "models.yaml").write_text(yaml.safe_dump(models))
    (configs / "storage.yaml").write_text(f"""
inputs: gcs
outputs: s3
s3:
  bucket: {outputs_bucket}
  region: us-east-1
  endpoint_url: {seaweed.endpoint}
  output_encryption: none
gcs:
  project: ephemera-test
  endpoint_url: {gcs_emulator.endpoint}
  buckets: {{us: {inputs_bucket}}}
  fallback_region: us
""")
    env = {**os.environ, **FAKE_AWS_ENV, "RAY_AUTH_MODE": "disabled", API_TOKEN_ENV: API_TOKEN}
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "serve.cli", "--config-dir", str(configs), "serve",
         "--workdir", str(tmp_path / "work")],
        cwd=Path(__file__).resolve().parents[2], env=env, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while True:
        try:
            if httpx.get(f"{base_url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError((tmp_path / "serve.log").read_text()[-3000:])
        time.sleep(0.5)
    yield base_url, inputs_bucket, outputs_bucket
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def test_http_path_on_gcs_inputs_and_s3_outputs(cloud_service, seaweed, gcs_emulator):
    base_url, inputs_bucket, outputs_bucket = cloud_service
    gcs, s3 = gcs_emulator.client(), seaweed.client()
    key = crypto.new_device_key()
    photo = encode_image(skimage.data.astronaut(), "JPEG")
    with httpx.Client(base_url=base_url, timeout=120,
                      headers={"Authorization": f"Bearer {API_TOKEN}"}) as client:
        views = []
        for kind, style in (("ai_photo", "portrait"), ("art_style", "comic")):
            response = submit(client, [photo], key=key, kind=kind, style=style,
                              account_id="acct-cloud")
            assert response.status_code == 202, response.text
            views.append(wait_finished(client, response.json()["job_id"]))
        assert [v["status"] for v in views] == ["succeeded", "succeeded"], views
        # Inputs and face data: verified gone from the GCS bucket.
        assert [b.name for b in gcs.list_blobs(inputs_bucket)] == []
        # Outputs: on S3, readable through the API and by a short-lived signed URL.
        output_keys = [o["Key"] for o in s3.list_objects_v2(
            Bucket=outputs_bucket, Prefix="outputs/").get("Contents", [])]
        assert len(output_keys) == 2 and all(k.startswith("outputs/") for k in output_keys)
        first = views[0]["output_urls"][0]
        assert client.get(first).content[:4] == b"\x89PNG"
        signed = client.get(first + "/url").json()["url"]
        assert httpx.get(signed).content == client.get(first).content
        # Account deletion empties the S3 bucket of this account's outputs.
        receipt_id = client.delete("/v1/accounts/acct-cloud").json()["receipt_id"]
        api_over(client).wait_deletion("acct-cloud", receipt_id)
    assert s3.list_objects_v2(Bucket=outputs_bucket).get("Contents", []) == []
