"""The deploy files a cluster operator runs, validated against Ray's own schemas, and the
generated Serve configs checked against the YAML they are generated from (no drift)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.serve.schema import ServeDeploySchema

from pipeline.core.config import US_AWS_REGIONS, load_settings
from serve.app import IMPORT_PATH, serve_config
from serve.cli import main as cli

ROOT = Path(__file__).resolve().parents[2]
RAY_SCHEMA = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
CLUSTER_FILES = [ROOT / "cluster.yaml", ROOT / "configs" / "deploy" / "cluster-gcp.yaml"]
NEVER_SHIPPED = [".venv", "data", "out", "models", "*.jpg", "*.png", "*.mp4", "*.pt"]


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_file_validates_against_rays_schema(path):
    jsonschema.validate(load(path), RAY_SCHEMA)


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_file_can_start_the_app(path):
    """A pinned image with ray on PATH (no setup that replaces Ray's), a CPU-only head,
    GPU workers, media never shipped, the object store on tmpfs, the app deployed."""
    cluster = load(path)
    assert re.fullmatch(r"[\w./-]+:[\w.-]*\d[\w.-]*", cluster["docker"]["image"])  # a pinned tag
    assert cluster["setup_commands"] == [] and cluster["head_setup_commands"] == []
    types = cluster["available_node_types"]
    assert types[cluster["head_node_type"]]["resources"]["GPU"] == 0
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values())
    for pattern in NEVER_SHIPPED:
        assert any(pattern in rule for rule in cluster["rsync_exclude"]), pattern
    assert all(local.startswith("./configs/") for local in cluster["file_mounts"].values())
    head = " ".join(cluster["head_start_ray_commands"])
    assert "--plasma-directory=/dev/shm" in head and "--object-spilling-directory=/dev/shm" in head
    assert "--num-gpus=0" in head
    assert "serve deploy configs/production/serve.yaml" in head


def test_aws_cluster_runs_in_a_us_region():
    provider = load(ROOT / "cluster.yaml")["provider"]
    assert provider["type"] == "aws" and provider["region"] in US_AWS_REGIONS


def test_gcp_variant_runs_on_gcp():
    assert load(ROOT / "configs" / "deploy" / "cluster-gcp.yaml")["provider"]["type"] == "gcp"


@pytest.mark.parametrize("name", ["configs/serve.yaml", "configs/production/serve.yaml"])
def test_serve_config_validates_and_matches_its_configs(name):
    """The checked-in Serve config is what `ephemera deploy-config` makes from its YAML."""
    shipped = load(ROOT / name)
    ServeDeploySchema.model_validate(shipped)
    app = shipped["applications"][0]
    assert app["import_path"] == IMPORT_PATH
    settings = load_settings(ROOT / app["args"]["config_dir"])
    assert shipped == serve_config(settings, args=app["args"])


def test_rayservice_serve_config_is_the_production_one():
    manifest = load(ROOT / "configs" / "deploy" / "rayservice.yaml")
    assert manifest["kind"] == "RayService" and manifest["apiVersion"] == "ray.io/v1"
    serve_config_v2 = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config_v2)
    assert serve_config_v2 == load(ROOT / "configs" / "production" / "serve.yaml")
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert group["rayStartParams"]["plasma-directory"] == "/dev/shm"
        volumes = group["template"]["spec"]["volumes"]
        assert {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": volumes[0]
                                            ["emptyDir"]["sizeLimit"]}} in volumes


def test_production_configs_pass_config_check(capsys):
    assert cli(["config", "check", "--config-dir", str(ROOT / "configs" / "production")]) == 0
    assert "inputs on gcs, outputs on s3" in capsys.readouterr().out
    settings = load_settings(ROOT / "configs" / "production")
    assert settings.service.http_host == "0.0.0.0" and settings.service.api_token_env
    assert settings.service.redis_url and settings.service.ray_address == "auto"
    assert settings.deployments.diffusion.num_gpus >= 1


def test_options_work_after_the_subcommand(tmp_path, capsys):
    """`ephemera config check --config-dir X` reads X (it used to exit 2)."""
    assert cli(["config", "check", "--config-dir", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    assert cli(["--config-dir", str(ROOT / "configs"), "config", "check"]) == 0


def test_deploy_config_writes_a_valid_serve_config(tmp_path):
    out = tmp_path / "serve.yaml"
    assert cli(["deploy-config", "--config-dir", "configs/production", "--out", str(out)]) == 0
    assert load(out) == load(ROOT / "configs" / "production" / "serve.yaml")


def test_grafana_dashboard_queries_only_metrics_we_export():
    dashboard = json.loads((ROOT / "configs" / "deploy" / "grafana-dashboard.json").read_text())
    exported = (ROOT / "pipeline" / "state" / "metrics.py").read_text() + \
        (ROOT / "serve" / "telemetry.py").read_text()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for name in re.findall(r"\b(?:ray_)?(ephemera_\w+?)(?:_bucket|_count|_sum)?\b",
                                   target["expr"]):
                assert f'"{name}' in exported, (panel["title"], name)


def test_the_image_keeps_media_and_environments_out():
    ignore = (ROOT / ".dockerignore").read_text().split()
    for pattern in (".venv", "data", "out", "models", "**/*.jpg", "**/*.mp4"):
        assert pattern in ignore
    assert os.path.exists(ROOT / "configs" / "deploy" / "Dockerfile")


def test_the_committed_openapi_document_is_the_api(tmp_path):
    """docs/openapi.json is what the code declares: regenerate it with
    `ephemera openapi --out docs/openapi.json` after changing a route."""
    import json

    from serve.api import openapi_document

    committed = json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert committed == json.loads(json.dumps(openapi_document()))
    job = committed["paths"]["/v1/jobs"]["post"]
    assert "multipart/form-data" in job["requestBody"]["content"]
    assert {p["name"] for p in job["parameters"]} >= {"X-Device-Key", "Idempotency-Key"}
    assert committed["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for path, methods in committed["paths"].items():
        for operation in methods.values():
            for code in ("404", "422", "503"):
                schema = operation["responses"][code]["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (path, code)
