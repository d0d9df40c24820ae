"""Fail closed (issue 23, item 1): every way off the machine is a production marker, and a
production-shaped process refuses to start without the API token and both pseudonym
secrets (32+ characters), never falls back to the demo secret, and refuses an account
secret other than the cluster's. The embedded loopback demo still starts with no secret."""

from __future__ import annotations

import hashlib
import inspect

import pytest

from pipeline.core.config import (
    GcsConfig,
    ModelsConfig,
    S3Config,
    ServiceConfig,
    Settings,
    StorageConfig,
    StyleConfig,
    StylesConfig,
)
from pipeline.security import pseudonyms
from pipeline.state import keys
from pipeline.state.cluster_secret import check_cluster_secret, check_process_secrets
from tests.unit.factories import fake_pins

STYLES = StylesConfig(styles={"p": StyleConfig(prompt="p")})
S3 = S3Config(bucket="bkt", region="us-east-1")
GCS = GcsConfig(project="p", buckets={"us": "b"}, country_regions={"US": "us"},
                fallback_region="us")
ACCOUNT, AGGREGATE = "a" * 40, "g" * 40

# Each corner the issue found open: one store in the cloud, or Redis off the machine.
CORNERS = {
    "inputs local, outputs s3": ({}, StorageConfig(outputs="s3", s3=S3)),
    "inputs s3, outputs local": ({}, StorageConfig(inputs="s3", s3=S3)),
    "inputs gcs, outputs local": ({}, StorageConfig(inputs="gcs", gcs=GCS)),
    "remote redis_url": ({"redis_url": "redis://redis.internal:6379/0"}, StorageConfig()),
}


@pytest.fixture(autouse=True)
def no_secrets(monkeypatch):
    """No secret in the environment, and this process not yet checked (a check that
    passed with markers refuses the demo secret for the rest of the process)."""
    monkeypatch.delenv(pseudonyms.SECRET_ENV, raising=False)
    monkeypatch.delenv(pseudonyms.AGGREGATE_SECRET_ENV, raising=False)
    monkeypatch.setattr(pseudonyms, "_demo_refused", False)


class FakeRedis:
    """SET NX and GET: all the fingerprint needs (unit tests run no Redis)."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}
        self.calls = 0

    def set(self, name: str, value: str, *, nx: bool = False) -> bool:
        self.calls += 1
        if nx and name in self.data:
            return False
        self.data[name] = value
        return True

    def get(self, name: str) -> bytes | None:
        self.calls += 1
        return self.data[name].encode() if name in self.data else None


def corner_settings(corner: str, **service) -> Settings:
    extra, storage = CORNERS[corner]
    return Settings(service=ServiceConfig(**extra, **service), storage=storage, styles=STYLES,
                    models=ModelsConfig(**fake_pins()))


@pytest.mark.parametrize("corner", CORNERS)
def test_every_way_off_the_machine_needs_the_api_token(corner):
    with pytest.raises(ValueError, match="api_token_env must name"):
        corner_settings(corner)
    assert corner_settings(corner, api_token_env="EPHEMERA_API_TOKEN").production_markers


@pytest.mark.parametrize("corner", CORNERS)
def test_every_way_off_the_machine_needs_both_secrets(corner, monkeypatch):
    settings = corner_settings(corner, api_token_env="EPHEMERA_API_TOKEN")
    marker = next(m for m in settings.production_markers if "api_token_env" not in m)
    client = FakeRedis()
    with pytest.raises(ValueError, match=f"{pseudonyms.SECRET_ENV} is not set.*{marker}"):
        check_process_secrets(settings, client)
    monkeypatch.setenv(pseudonyms.SECRET_ENV, ACCOUNT)
    with pytest.raises(ValueError, match=f"{pseudonyms.AGGREGATE_SECRET_ENV} is not set"):
        check_process_secrets(settings, client)
    monkeypatch.setenv(pseudonyms.AGGREGATE_SECRET_ENV, AGGREGATE)
    check_process_secrets(settings, client)


def test_only_loopback_redis_stays_the_demo():
    for url in (None, "redis://127.0.0.1:6379/0", "redis://localhost:1/0",
                "unix:///run/redis.sock"):
        assert Settings(service=ServiceConfig(redis_url=url), styles=STYLES).production_markers == []
    for url in ("redis://10.0.0.7:6379/0", "rediss://127.0.0.1.example.com:6379", "nonsense"):
        markers = Settings(service=ServiceConfig(redis_url=url, api_token_env="T"),
                           styles=STYLES, models=ModelsConfig(**fake_pins())).production_markers
        assert "service.yaml redis_url" in markers


@pytest.mark.parametrize("name", [pseudonyms.SECRET_ENV, pseudonyms.AGGREGATE_SECRET_ENV])
def test_a_short_secret_is_refused_even_in_the_demo(name, monkeypatch):
    monkeypatch.setenv(pseudonyms.SECRET_ENV, ACCOUNT)
    monkeypatch.setenv(pseudonyms.AGGREGATE_SECRET_ENV, AGGREGATE)
    monkeypatch.setenv(name, "short")
    with pytest.raises(ValueError, match=f"{name} holds only 5 characters"):
        check_secrets_of(corner_settings("remote redis_url", api_token_env="T"))
    with pytest.raises(ValueError, match=f"{name} holds 5 characters"):
        check_secrets_of(Settings(styles=STYLES))  # the demo: no marker, still refused
    with pytest.raises(ValueError, match=name):  # and never used silently
        pseudonyms.account_ref("alice") if name == pseudonyms.SECRET_ENV \
            else pseudonyms.aggregate_secret()


def check_secrets_of(settings: Settings) -> None:
    check_process_secrets(settings, FakeRedis())


def test_no_fallback_to_the_demo_secret_once_production_shaped(monkeypatch):
    demo_ref = pseudonyms.account_ref("alice")  # the demo: the public demo secret
    monkeypatch.setenv(pseudonyms.SECRET_ENV, ACCOUNT)
    monkeypatch.setenv(pseudonyms.AGGREGATE_SECRET_ENV, AGGREGATE)
    check_secrets_of(corner_settings("inputs local, outputs s3", api_token_env="T"))
    assert pseudonyms.account_ref("alice") != demo_ref
    monkeypatch.delenv(pseudonyms.SECRET_ENV)  # the variable lost after the start
    monkeypatch.delenv(pseudonyms.AGGREGATE_SECRET_ENV)
    with pytest.raises(ValueError, match=f"{pseudonyms.SECRET_ENV} is not set"):
        pseudonyms.account_ref("alice")
    with pytest.raises(ValueError, match=f"{pseudonyms.AGGREGATE_SECRET_ENV} is not set"):
        pseudonyms.aggregate_secret()


def test_the_demo_default_starts_with_no_secret():
    settings = Settings(styles=STYLES)  # embedded Redis, local stores, 127.0.0.1
    assert settings.production_markers == []
    client = FakeRedis()
    check_process_secrets(settings, client)
    assert client.calls == 0  # one process, one machine: no fingerprint to compare
    assert pseudonyms.account_ref("alice") == pseudonyms.keyed_id("account", "alice")


def test_every_process_of_a_cluster_uses_the_same_account_secret(monkeypatch):
    settings = corner_settings("remote redis_url", api_token_env="T")
    client = FakeRedis()
    monkeypatch.setenv(pseudonyms.AGGREGATE_SECRET_ENV, AGGREGATE)
    monkeypatch.setenv(pseudonyms.SECRET_ENV, ACCOUNT)
    check_process_secrets(settings, client)  # the first process records the fingerprint
    stored = client.data[keys.ACCOUNT_SECRET_FINGERPRINT]
    assert ACCOUNT not in stored and stored != hashlib.sha256(ACCOUNT.encode()).hexdigest()
    check_process_secrets(settings, client)  # the same secret starts
    monkeypatch.setenv(pseudonyms.SECRET_ENV, "b" * 40)
    with pytest.raises(ValueError, match="this node's EPHEMERA_ACCOUNT_SECRET differs from "
                                         "the cluster's"):
        check_process_secrets(settings, client)
    assert client.data[keys.ACCOUNT_SECRET_FINGERPRINT] == stored  # never overwritten
    check_cluster_secret(FakeRedis())  # a fresh cluster takes this node's


def deployment_classes():
    from actors.diffusion import DiffusionDeployment
    from actors.face import FaceDeployment
    from actors.media import MediaDeployment
    from actors.retention import RetentionDeployment
    from serve.api import ApiDeployment
    from serve.runner import JobRunnerDeployment

    return {"ingress": (ApiDeployment, 3), "media": (MediaDeployment, 0),
            "runner": (JobRunnerDeployment, 3), "retention": (RetentionDeployment, 0),
            "face": (FaceDeployment, 0), "diffusion": (DiffusionDeployment, 0)}


@pytest.mark.parametrize("name", ["ingress", "media", "runner", "retention", "face",
                                  "diffusion"])
def test_every_process_that_computes_a_pseudonym_refuses_to_start_without_it(name, tmp_path):
    """Each deployment's __init__ checks before it computes anything (Redis on a closed
    port: a check made after connecting would fail differently)."""
    deployment, num_handles = deployment_classes()[name]
    settings = Settings(
        service=ServiceConfig(redis_url="redis://127.0.0.1:9/0", ray_address="auto",
                              api_token_env="T"),
        storage=StorageConfig(local_root=str(tmp_path)), styles=STYLES,
        models=ModelsConfig(**fake_pins()))
    # The class as written (Serve wraps the ingress in an ASGI class with an async __init__).
    cls = next(k for k in deployment.func_or_class.__mro__
               if not inspect.iscoroutinefunction(k.__init__))
    with pytest.raises(ValueError, match=f"{pseudonyms.SECRET_ENV} is not set.*ray_address"):
        cls(settings, *([None] * num_handles))


def test_the_cli_refuses_a_redis_off_loopback_without_the_secrets(tmp_path, monkeypatch):
    """`ephemera retention/privacy/usage` compute pseudonyms too; a --redis-url off the
    machine counts like one in service.yaml (no connection is made before the check)."""
    import argparse

    from serve.cli import _backends

    args = argparse.Namespace(config_dir="configs", store_url=f"file://{tmp_path}",
                              redis_url="redis://10.0.0.7:6379/0")
    with pytest.raises(ValueError, match=f"{pseudonyms.SECRET_ENV} is not set.*redis_url"):
        _backends(args)
    args.redis_url = "redis://127.0.0.1:9/0"  # the demo's embedded Redis: no secret needed
    assert _backends(args)[1] is not None
