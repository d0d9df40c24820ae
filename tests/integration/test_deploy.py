"""`serve run` of the shipped Serve config works: the real Serve CLI imports the app from
its import path, builds it from a config folder, and a job goes through it end to end.

Runs in its own Ray instance (a subprocess), against a private Redis and a copy of the
configs pointing at a temporary store and model folder, on a free loopback port.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import skimage.data
import yaml

from pipeline.security import crypto
from pipeline.state.redis_server import RedisServer, free_port
from tests.integration.helpers import encode_image, key_header

pytestmark = pytest.mark.deploy
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def serve_run(tmp_path):
    redis_server = RedisServer(tmp_path / "redis").start()
    configs = tmp_path / "configs"
    shutil.copytree(ROOT / "configs", configs, ignore=shutil.ignore_patterns("production",
                                                                            "deploy"))
    for name, changes in (("storage.yaml", {"local_root": str(tmp_path / "store")}),
                          ("models.yaml", {"diffusion_model_dir": str(tmp_path / "tiny-sd"),
                                           "num_inference_steps": 4})):
        values = yaml.safe_load((configs / name).read_text())
        (configs / name).write_text(yaml.safe_dump({**values, **changes}))
    port = free_port()
    serve_config = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    serve_config["http_options"]["port"] = port
    serve_config["applications"][0]["args"] = {"config_dir": str(configs),
                                               "redis_url": redis_server.url}
    config_file = tmp_path / "serve.yaml"
    config_file.write_text(yaml.safe_dump(serve_config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["RAY_AUTH_MODE"] = "disabled"
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "serve"), "run", str(config_file)], cwd=ROOT,
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        yield f"http://127.0.0.1:{port}", process
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        redis_server.stop()


def test_serve_run_of_the_shipped_config_serves_a_job(serve_run):
    base_url, process = serve_run
    deadline = time.monotonic() + 240
    with httpx.Client(base_url=base_url, timeout=30) as client:
        while True:
            assert process.poll() is None, "serve run exited"
            assert time.monotonic() < deadline, "the app did not come up"
            try:
                if client.get("/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        response = client.post(
            "/v1/jobs", headers=key_header(crypto.new_device_key()),
            files=[("files", ("a.png", encode_image(skimage.data.astronaut(), "PNG")))],
            data={"kind": "art_style", "style": "comic", "account_id": "acct-serve-run"})
        assert response.status_code in (202, 503), response.text
        while response.status_code == 503:  # runners still starting: Retry-After says when
            time.sleep(float(response.headers.get("Retry-After", "1")))
            assert time.monotonic() < deadline
            response = client.post(
                "/v1/jobs", headers=key_header(crypto.new_device_key()),
                files=[("files", ("a.png", encode_image(skimage.data.astronaut(), "PNG")))],
                data={"kind": "art_style", "style": "comic", "account_id": "acct-serve-run"})
        job_id = response.json()["job_id"]
        while True:
            view = client.get(f"/v1/accounts/acct-serve-run/jobs/{job_id}").json()
            if view["status"] in ("succeeded", "failed") and view["inputs_purged_s"]:
                break
            assert time.monotonic() < deadline, view
            time.sleep(0.5)
    assert view["status"] == "succeeded", view
