"""Fixtures with real parts: a private Redis server, a local object store, and one local Ray
cluster running the whole Serve application, all on loopback, stopped by the fixtures."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import httpx
import pytest
import redis

from pipeline.core.config import load_settings
from pipeline.state.redis_server import RedisServer, free_port

API_TOKEN_ENV = "EPHEMERA_TEST_API_TOKEN"
API_TOKEN = "test-token-" + "0123456789abcdef"
METRICS_TOKEN_ENV = "EPHEMERA_TEST_METRICS_TOKEN"
METRICS_TOKEN = "test-metrics-token-" + "0123456789abcdef"  # Prometheus's: GET /metrics only
# Services started by these tests look like production (a token, cloud stores), so every
# process of theirs needs both pseudonym secrets (32+ characters); Ray workers and
# `serve run` inherit them.
os.environ.setdefault("EPHEMERA_ACCOUNT_SECRET", "integration-tests-" + "s" * 32)
os.environ.setdefault("EPHEMERA_AGGREGATE_SECRET", "integration-tests-aggregate-" + "g" * 32)
# ... and the deletion log's signing key (base64 of a 32-byte Ed25519 seed), for the same
# reason; the tests that check heads read the key through the same variable.
os.environ.setdefault("EPHEMERA_TLOG_SIGNING_KEY",
                      base64.b64encode(b"integration-tests-tlog-" + b"k" * 9).decode())


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> RedisServer:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_client(redis_server) -> redis.Redis:
    return redis.Redis.from_url(redis_server.url)


@pytest.fixture(scope="session")
def face_weights_path(tmp_path_factory) -> Path:
    """An ArcFace-format ONNX embedder in a file (not the default one): the service loads it
    through its config path."""
    from pipeline.models.tiny import build_tiny_arcface

    path = tmp_path_factory.mktemp("weights") / "arcface.onnx"
    build_tiny_arcface(path, seed=1234)
    return path


@pytest.fixture(scope="session")
def pinned_models(tmp_path_factory, face_weights_path) -> dict[str, str]:
    """The tiny models staged into a local model store (each with its manifest) and their
    pins: models.yaml values. A production-shaped config (an API token is enough) refuses
    unpinned models, so the services these tests start load them as production does,
    fetched into a cache and verified against the pins."""
    from pipeline.core.config import StorageConfig
    from pipeline.models.tiny import stage_tiny_models

    return stage_tiny_models(tmp_path_factory.mktemp("models"), StorageConfig(),
                             face_embedder=face_weights_path)


@pytest.fixture(scope="session")
def test_settings(tmp_path_factory, redis_server, pinned_models):
    root = tmp_path_factory.mktemp("service")
    base = load_settings()
    return base.model_copy(update={
        "service": base.service.model_copy(update={
            "redis_url": redis_server.url,
            "max_files_per_job": 3,
            "max_file_bytes": 3 * 1024 * 1024,
            "ray_object_store_mb": 150,  # small, so a test can fill it
            "api_token_env": API_TOKEN_ENV,
            "metrics_token_env": METRICS_TOKEN_ENV,
            "heartbeat_lease_s": 4.0,  # a killed runner's or ingress's jobs reaped in seconds
            "usage_flush_s": 1.0,  # usage events reach the store within a second
            "ray_metrics_export_port": free_port(),
        }),
        # Fixed pools, so fault tests know which replica holds what; two runners, so
        # losing one must not touch the other's jobs.
        "deployments": base.deployments.model_copy(update={
            "api": base.deployments.api.model_copy(update={"autoscaling": None}),
            "media": base.deployments.media.model_copy(update={"autoscaling": None}),
            "runner": base.deployments.runner.model_copy(update={"autoscaling": None,
                                                                 "num_replicas": 2}),
        }),
        "models": base.models.model_copy(update={
            **pinned_models,
            "model_cache_dir": str(root / "model-cache"),
            "num_inference_steps": 4,
        }),
        "batching": base.batching.model_copy(update={
            "diffusion": base.batching.diffusion.model_copy(update={"max_wait_ms": 400.0}),
        }),
        "retention": base.retention.model_copy(update={"sweep_interval_s": 1.0}),
        "storage": base.storage.model_copy(update={"local_root": str(root / "store")}),
    })


@pytest.fixture(scope="session")
def service(test_settings, tmp_path_factory):
    import os

    from serve.launcher import start_service

    os.environ[API_TOKEN_ENV] = API_TOKEN  # inherited by the Ray workers started below
    os.environ[METRICS_TOKEN_ENV] = METRICS_TOKEN
    svc = start_service(test_settings, workdir=tmp_path_factory.mktemp("work"))
    yield svc
    svc.stop()


@pytest.fixture(scope="session")
def store_root(service) -> Path:
    return Path(service.settings.storage.local_root)


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """A real S3 server (SeaweedFS) on loopback, and fake credentials in the environment
    (inherited by Ray workers started later)."""
    import os

    from tests.integration.object_servers import FAKE_AWS_ENV, SeaweedS3

    for name, value in FAKE_AWS_ENV.items():
        os.environ.setdefault(name, value)
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gcs_emulator():
    from tests.integration.object_servers import GcsEmulator

    server = GcsEmulator().start()
    yield server
    server.stop()


@pytest.fixture()
def client(service):
    """The app backend: it sends the service's API token with every call."""
    with httpx.Client(base_url=service.base_url, timeout=120.0,
                      headers={"Authorization": f"Bearer {API_TOKEN}"}) as c:
        yield c
