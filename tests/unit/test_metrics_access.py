"""Who may read /metrics: the users' API token as before, or Prometheus's own metrics token
(service.yaml metrics_token_env), which opens GET /metrics and nothing else; and the
cluster-wide gauges are exported once (at /metrics), never again per node through Ray's
metrics agent. In process: the ingress's own middleware in front of stand-in routes."""

from __future__ import annotations

import hashlib

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from ray.util.metrics import Metric as RayMetric

import serve.api as api
import serve.telemetry as telemetry
from pipeline.core.config import CONFIG_DIR, ServiceConfig, load_yaml
from pipeline.core.records import Stage
from pipeline.state.metrics import service_metrics

API_TOKEN = "api-token-" + "0123456789abcdef"
METRICS_TOKEN = "metrics-token-" + "fedcba9876543210"


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@pytest.fixture()
def client(monkeypatch):
    """The ingress's token middleware in front of routes that answer 200."""
    monkeypatch.setattr(api.app.state, "api_token_sha256", digest(API_TOKEN), raising=False)
    monkeypatch.setattr(api.app.state, "metrics_token_sha256", digest(METRICS_TOKEN),
                        raising=False)
    routes = FastAPI()
    routes.middleware("http")(api._require_token)
    for path in ("/metrics", "/v1/accounts/a/outputs", "/openapi.json", "/healthz"):
        routes.add_api_route(path, lambda: {"ok": True}, methods=["GET"])
    routes.add_api_route("/metrics", lambda: {"ok": True}, methods=["POST"])
    routes.add_api_route("/v1/jobs", lambda: {"ok": True}, methods=["POST"])
    with TestClient(routes) as test_client:
        yield test_client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_the_metrics_token_opens_get_metrics_and_nothing_else(client):
    assert client.get("/metrics", headers=bearer(METRICS_TOKEN)).status_code == 200
    assert client.get("/metrics", headers=bearer(API_TOKEN)).status_code == 200  # still
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=bearer("wrong-token-0123456789")).status_code == 401
    for method, path in (("GET", "/v1/accounts/a/outputs"), ("POST", "/v1/jobs"),
                         ("GET", "/openapi.json"), ("POST", "/metrics")):
        refused = client.request(method, path, headers=bearer(METRICS_TOKEN))
        assert refused.status_code == 401, (method, path)
        assert client.request(method, path, headers=bearer(API_TOKEN)).status_code == 200
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize(("api_sha256", "metrics_sha256", "path", "sent", "allowed"), [
    (None, None, "/v1/jobs", "", True),  # no API token configured: the loopback demo
    (b"", None, "/metrics", METRICS_TOKEN, False),  # settings never read: fail closed
    (b"", digest(METRICS_TOKEN), "/v1/jobs", METRICS_TOKEN, False),
    (digest(API_TOKEN), None, "/metrics", METRICS_TOKEN, False),  # no metrics token set
    (digest(API_TOKEN), digest(METRICS_TOKEN), "/metrics/", METRICS_TOKEN, False),
    (digest(API_TOKEN), digest(METRICS_TOKEN), "/metrics", METRICS_TOKEN, True),
])
def test_token_allows(api_sha256, metrics_sha256, path, sent, allowed):
    assert api.token_allows(path, "GET", sent, api_sha256, metrics_sha256) is allowed


def test_tokens_are_read_checked_and_kept_apart():
    service = ServiceConfig(api_token_env="A_TOKEN", metrics_token_env="M_TOKEN")
    settings = type("S", (), {"service": service})()
    assert api.expected_token_digests(settings, {"A_TOKEN": API_TOKEN, "M_TOKEN": METRICS_TOKEN}) \
        == (digest(API_TOKEN), digest(METRICS_TOKEN))
    with pytest.raises(ValueError, match="metrics_token_env names M_TOKEN.*16 characters"):
        api.expected_token_digests(settings, {"A_TOKEN": API_TOKEN, "M_TOKEN": "short"})
    with pytest.raises(ValueError, match="is the API token"):
        api.expected_token_digests(settings, {"A_TOKEN": API_TOKEN, "M_TOKEN": API_TOKEN})
    with pytest.raises(ValueError, match="metrics_token_env needs api_token_env"):
        ServiceConfig(metrics_token_env="M_TOKEN")
    with pytest.raises(ValueError, match="name another"):
        ServiceConfig(api_token_env="A_TOKEN", metrics_token_env="A_TOKEN")


def test_production_gives_prometheus_a_token_of_its_own():
    service = load_yaml(CONFIG_DIR / "production" / "service.yaml", ServiceConfig)
    assert service.metrics_token_env == "EPHEMERA_METRICS_TOKEN"
    assert service.api_token_env != service.metrics_token_env


class _Ledger:
    def oldest_created_s(self, cls):
        return None

    def count(self) -> int:
        return 0


class _Jobs:
    """Just enough of a JobStore for service_metrics: an empty service."""

    ledger = _Ledger()
    redis = type("R", (), {"get": staticmethod(lambda key: None)})()

    def purge_lags_s(self) -> list[float]:
        return []

    def unfinished_counts(self) -> dict:
        return {}

    def batch_fills(self, stage: Stage) -> list[float]:
        return []


def test_cluster_wide_gauges_are_not_also_exported_per_node():
    cluster_wide = {m.name for m in service_metrics(_Jobs(), now_s=0.0)}
    per_node = {m._name for m in vars(telemetry).values() if isinstance(m, RayMetric)}
    assert len(cluster_wide) >= 6 and len(per_node) >= 4
    assert not cluster_wide & per_node
