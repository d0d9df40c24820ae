"""The deploy files a cluster operator runs, validated against Ray's and KubeRay's own
schemas, cross-checked against each other (one image, one Ray version, pools that fit the
node types, a token for every command) and against the code (metrics, secrets), and the
generated Serve configs checked against the YAML they are generated from (no drift)."""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import tempfile
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler.sdk import get_docker_host_mount_location
from ray.serve.schema import ServeDeploySchema

from pipeline.core.config import US_AWS_REGIONS, load_settings
from serve.app import IMPORT_PATH, serve_config
from serve.cli import main as cli
from tests.unit.factories import pinned_production_configs

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "configs" / "deploy"
RAY_SCHEMA = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
# KubeRay v1.7.0's RayService CRD schema, unchanged (provenance in its "$comment").
KUBERAY_SCHEMA = ROOT / "tests" / "unit" / "schemas" / "kuberay-v1.7.0-rayservice.schema.json"
# RayService fields KubeRay marks "Deprecated: This field is not used anymore"
# (ray-operator/apis/ray/v1/rayservice_types.go, kuberay#1685).
DEPRECATED_RAYSERVICE_FIELDS = {"serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold"}
CLUSTER_FILES = [ROOT / "cluster.yaml", DEPLOY / "cluster-gcp.yaml"]
NEVER_SHIPPED = [".venv", "data", "out", "models", "*.jpg", "*.png", "*.mp4", "*.pt"]
NODE_INIT = DEPLOY / "node-init.sh"
ENV_FILE = "/run/ephemera/secrets.env"
# The CUDA build of the pinned torch wheels (PyPI's torch 2.14.1 pulls cuda-toolkit 13.0),
# which the image's CUDA and the hosts' driver must match: bump both together.
TORCH_CUDA_TAG = {"2.14.1": "cu130"}
MIN_DRIVER_FOR_CUDA = {"cu130": 580}
REQUIRED_ALERTS = {"EphemeraPurgeLagHigh", "EphemeraInputPastCeiling", "EphemeraHttp5xxRate",
                   "EphemeraServiceFull", "EphemeraPoolWithoutReplica", "EphemeraRedisUnreachable"}
CPU_MARKER = "cpu_node"  # the custom resource only CPU workers carry


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def load_all(path: Path) -> list[dict]:
    return list(yaml.safe_load_all(path.read_text()))


def rayservice() -> dict:
    return load(DEPLOY / "rayservice.yaml")


def node_types(cluster: dict) -> dict[str, dict]:
    return cluster["available_node_types"]


def worker_types(cluster: dict) -> dict[str, dict]:
    return {k: v for k, v in node_types(cluster).items() if k != cluster["head_node_type"]}


def init_commands(cluster: dict, type_name: str) -> list[str]:
    """What Ray runs on a node's host before Docker: `ray up` always uses the top-level
    list for the head (commands.py); the autoscaler a worker type's own list, if any."""
    if type_name == cluster["head_node_type"]:
        return cluster["initialization_commands"]
    return node_types(cluster)[type_name].get("initialization_commands",
                                               cluster["initialization_commands"])


def node_init_calls(cluster: dict, type_name: str) -> list[list[str]]:
    return [shlex.split(c)[2:] for c in init_commands(cluster, type_name)
            if shlex.split(c)[1].endswith("/node-init.sh")]


# --- cluster launcher files -------------------------------------------------------------

@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_file_validates_against_rays_schema(path):
    jsonschema.validate(load(path), RAY_SCHEMA)


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_file_can_start_the_app(path):
    """A pinned image with ray on PATH (no setup that replaces Ray's), a head that runs no
    replica, GPU workers, media never shipped, the object store on tmpfs, the app deployed."""
    cluster = load(path)
    assert re.fullmatch(r"[\w./-]+:[\w.-]*\d[\w.-]*", cluster["docker"]["image"])  # a pinned tag
    assert cluster["setup_commands"] == [] and cluster["head_setup_commands"] == []
    types = node_types(cluster)
    assert types[cluster["head_node_type"]]["resources"] == {"CPU": 0, "GPU": 0}
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values())
    for pattern in NEVER_SHIPPED:
        assert any(pattern in rule for rule in cluster["rsync_exclude"]), pattern
    assert all(local.startswith("./configs/") for local in cluster["file_mounts"].values())
    head = " ".join(cluster["head_start_ray_commands"])
    assert "--plasma-directory=/dev/shm" in head and "--object-spilling-directory=/dev/shm" in head
    assert "--num-gpus=0" in head and "--num-cpus=0" in head
    assert "serve deploy configs/production/serve.yaml" in head


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_every_command_in_the_container_has_the_ray_token(path):
    """Ray runs each start command in its own shell (`docker exec`), so the token must live
    in the container's environment: RAY_AUTH_MODE=token from run_options, RAY_AUTH_TOKEN
    from the env file that each node's host fills before Docker starts."""
    cluster = load(path)
    options = cluster["docker"]["run_options"]
    assert "--env RAY_AUTH_MODE=token" in options
    assert f"--env-file {ENV_FILE}" in options
    commands = cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]
    assert not any("RAY_AUTH_MODE" in c or "RAY_AUTH_TOKEN" in c for c in commands)
    for type_name in node_types(cluster):  # every node fills the env file before Docker
        calls = node_init_calls(cluster, type_name)
        assert any(call[0].startswith("secrets-") for call in calls), type_name
    default_dir = re.search(r'SECRETS_DIR="\$\{EPHEMERA_SECRETS_DIR:-([^}]+)\}"',
                            NODE_INIT.read_text()).group(1)
    assert f"{default_dir}/secrets.env" == ENV_FILE


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_node_init_runs_from_where_the_launcher_puts_it(path):
    """File mounts reach the host before the initialization commands, under Ray's docker
    host mount folder (ray.autoscaler.sdk.get_docker_host_mount_location)."""
    cluster = load(path)
    [target] = [dst for dst, src in cluster["file_mounts"].items()
                if src == "./configs/deploy/node-init.sh"]
    host_path = get_docker_host_mount_location(cluster["cluster_name"]) + target
    for type_name in node_types(cluster):
        for command in init_commands(cluster, type_name):
            assert shlex.split(command)[:2] == ["bash", host_path], command


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cpu_work_stays_off_gpu_machines(path):
    """CPU workers carry the marker resource every CPU pool requests; GPU workers do not,
    and only they start Docker with the GPUs."""
    cluster = load(path)
    workers = worker_types(cluster)
    cpu = [t for t in workers.values() if t["resources"].get("GPU", 0) == 0]
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) > 0]
    assert cpu and gpu
    assert all(t["resources"].get(CPU_MARKER, 0) > 0 for t in cpu)
    assert all(CPU_MARKER not in t["resources"] for t in gpu)
    assert CPU_MARKER not in node_types(cluster)[cluster["head_node_type"]]["resources"]
    assert "--gpus all" not in cluster["docker"]["worker_run_options"]
    assert all("--gpus all" in t["docker"]["worker_run_options"] for t in gpu)
    assert all("docker" not in t for t in cpu)


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_gpu_hosts_have_the_driver_the_image_needs(path):
    """GPU workers wait for the NVIDIA driver and refuse one older than the image's CUDA
    needs, before Docker starts; every node boots the one image named in metadata."""
    cluster = load(path)
    cuda = cluster["docker"]["image"].rsplit("-", 1)[-1]
    for name, node_type in worker_types(cluster).items():
        if node_type["resources"].get("GPU", 0) > 0:
            waits = [c for c in node_init_calls(cluster, name) if c[0] == "wait-gpu"]
            assert waits and int(waits[0][1]) >= MIN_DRIVER_FOR_CUDA[cuda], name
            assert node_init_calls(cluster, name)[0][0] == "wait-gpu"  # first of all
    if cluster["provider"]["type"] == "aws":
        amis = {t["node_config"]["ImageId"] for t in node_types(cluster).values()}
        assert amis == {cluster["metadata"]["node_ami"]}
        assert cluster["metadata"]["node_ami"].startswith("resolve:ssm:/")
    else:
        images = {d["initializeParams"]["sourceImage"] for t in node_types(cluster).values()
                  for d in t["node_config"]["disks"]}
        assert images == {cluster["metadata"]["node_image"]}
        assert f"nvidia-{MIN_DRIVER_FOR_CUDA[cuda]}" in cluster["metadata"]["node_image"]
        for node_type in worker_types(cluster).values():
            if node_type["resources"].get("GPU", 0) > 0:
                items = node_type["node_config"]["metadata"]["items"]
                assert {"key": "install-nvidia-driver", "value": "True"} in items


def test_aws_cluster_runs_in_a_us_region():
    provider = load(ROOT / "cluster.yaml")["provider"]
    assert provider["type"] == "aws" and provider["region"] in US_AWS_REGIONS


def test_gcp_variant_runs_on_gcp():
    assert load(DEPLOY / "cluster-gcp.yaml")["provider"]["type"] == "gcp"


def test_aws_policies_name_what_the_cluster_file_uses():
    """The IAM documents are valid JSON policies and grant exactly the names cluster.yaml
    and node-init.sh use: the secrets, the target group, the pinned AMI parameter."""
    iam = DEPLOY / "iam"
    cluster = load(ROOT / "cluster.yaml")
    text = {p.name: p.read_text() for p in iam.glob("*.json")}
    for name, body in text.items():
        assert json.loads(body)["Version"] == "2012-10-17", name
    for type_name in worker_types(cluster):
        for call in node_init_calls(cluster, type_name):
            if call[0] == "secrets-aws":
                for secret in call[2:]:
                    assert f"secret:{secret}-??????" in text["aws-node-policy.json"]
                    assert f"secret:{secret}-??????" in text["aws-head-policy.json"]
            if call[0] == "lb-aws":
                assert f"targetgroup/{call[2]}/" in text["aws-node-policy.json"]
    parameter = cluster["metadata"]["node_ami"].removeprefix("resolve:ssm:")
    assert f"parameter{parameter}\"" in text["aws-head-policy.json"]
    profiles = {t["node_config"]["IamInstanceProfile"]["Name"] for t in node_types(cluster).values()}
    assert profiles == {"ephemera-head", "ephemera-node"}
    assert 'role/ephemera-node"' in text["aws-head-policy.json"]  # PassRole to workers only
    storage = load_settings(ROOT / "configs" / "production", require_pins=False).storage
    assert f"arn:aws:s3:::{storage.s3.bucket}/*" in text["aws-storage-policy.json"]


# --- the image and the Ray version --------------------------------------------------------

def test_one_image_and_one_ray_version_everywhere():
    """cluster.yaml, cluster-gcp.yaml, every RayService container and the Dockerfile's build
    command name one image; its base is Ray's image of the installed Ray, the RayService's
    rayVersion and pyproject's pin, for the CUDA the pinned torch wheels are built for."""
    image = load(ROOT / "cluster.yaml")["docker"]["image"]
    assert load(DEPLOY / "cluster-gcp.yaml")["docker"]["image"] == image
    cluster = rayservice()["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    assert {c["image"] for g in groups for c in g["template"]["spec"]["containers"]} == {image}
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert f"-t {image} ." in dockerfile
    [base] = re.findall(r"^FROM (\S+)$", dockerfile, flags=re.M)
    ray_version = ray.__version__
    python_tag, cuda_tag = image.rsplit(":", 1)[1].split("-")[1:]
    assert base == f"rayproject/ray:{ray_version}-{python_tag}-{cuda_tag}"
    assert cluster["rayVersion"] == ray_version
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"ray[serve]=={ray_version}"' in pyproject
    torch_pin = re.search(r'"torch==([\d.]+)"', pyproject).group(1)
    assert TORCH_CUDA_TAG[torch_pin] == cuda_tag


# --- production pools against the node types ----------------------------------------------

def replica_resources(deployment: dict) -> dict[str, float]:
    options = deployment["ray_actor_options"]
    need = {"CPU": options.get("num_cpus", 1.0), "GPU": options.get("num_gpus", 0.0),
            "memory": options.get("memory", 0), **options.get("resources", {})}
    return {k: v for k, v in need.items() if v}


def replicas(deployment: dict, bound: str) -> int:
    if "autoscaling_config" in deployment:
        return deployment["autoscaling_config"][f"{bound}_replicas"]
    return deployment["num_replicas"]


def pack(demands: list[dict[str, float]], nodes: list[dict[str, float]]) -> list[dict]:
    """First-fit decreasing (GPU, then CPU) of replica demands onto nodes' resources, as
    the autoscaler and the scheduler would find room; returns the demands left over."""
    free = [dict(n) for n in nodes]
    left = []
    for need in sorted(demands, key=lambda d: (d.get("GPU", 0), d.get("CPU", 0)), reverse=True):
        for node in free:
            if all(node.get(k, 0) + 1e-9 >= v for k, v in need.items()):
                for k, v in need.items():
                    node[k] -= v
                break
        else:
            left.append(need)
    return left


def production_demands(bound: str) -> list[dict[str, float]]:
    app = load(ROOT / "configs" / "production" / "serve.yaml")["applications"][0]
    return [replica_resources(d) for d in app["deployments"] for _ in range(replicas(d, bound))]


def cluster_nodes(cluster: dict, bound: str) -> list[dict[str, float]]:
    head = node_types(cluster)[cluster["head_node_type"]]["resources"]
    return [head] + [t["resources"] for t in worker_types(cluster).values()
                     for _ in range(t[f"{bound}_workers"])]


def test_the_packing_check_can_fail():
    """One GPU replica of 1.0 beside one of 0.25 does not fit one 1-GPU node (the finding
    of issue 20), and a CPU-marked replica never fits a GPU node."""
    one_gpu = [{"CPU": 8, "GPU": 1}]
    assert pack([{"CPU": 4, "GPU": 1}, {"CPU": 2, "GPU": 0.25}], one_gpu)
    assert not pack([{"CPU": 4, "GPU": 0.75}, {"CPU": 2, "GPU": 0.25}], one_gpu)
    assert pack([{"CPU": 1, CPU_MARKER: 0.01}], one_gpu)


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("bound", ["min", "max"])
def test_production_pools_fit_the_node_types(path, bound):
    """Every pool's min replicas fit the node types' min_workers (the base load runs
    without waiting for the autoscaler), and max replicas fit max_workers."""
    assert pack(production_demands(bound), cluster_nodes(load(path), bound)) == []


def test_cpu_pools_ask_for_cpu_machines():
    app = load(ROOT / "configs" / "production" / "serve.yaml")["applications"][0]
    for deployment in app["deployments"]:
        need = replica_resources(deployment)
        assert ("GPU" in need) != (need.get(CPU_MARKER, 0) > 0), deployment["name"]


# --- KubeRay ------------------------------------------------------------------------------

def strict(schema):
    """An object schema with properties refuses unknown fields, as `kubectl apply` does
    (server-side field validation Strict) where the CRD does not preserve them."""
    if isinstance(schema, dict):
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        for value in schema.values():
            strict(value)
    elif isinstance(schema, list):
        for value in schema:
            strict(value)
    return schema


def test_rayservice_validates_against_kuberays_crd():
    schema = strict(json.loads(KUBERAY_SCHEMA.read_text()))
    jsonschema.validate(rayservice(), schema)
    misspelt = rayservice()
    misspelt["spec"]["rayClusterConfig"]["authOption"] = {"mode": "token"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(misspelt, schema)


def test_rayservice_comes_up_with_auth_ft_and_an_upgrade_strategy():
    spec = rayservice()["spec"]
    assert not DEPRECATED_RAYSERVICE_FIELDS & set(spec)
    cluster = spec["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": "ephemera-ray-auth"}
    ft = cluster["gcsFaultToleranceOptions"]
    assert ft["redisAddress"].startswith(("redis://", "rediss://"))
    assert ft["redisPassword"]["valueFrom"]["secretKeyRef"]["name"]
    upgrade = spec["upgradeStrategy"]
    assert upgrade["type"] == "NewClusterWithIncrementalUpgrade"
    options = upgrade["clusterUpgradeOptions"]  # KubeRay's ValidateClusterUpgradeOptions
    assert 0 < options["stepSizePercent"] <= options["maxSurgePercent"] <= 100
    assert options["intervalSeconds"] > 0 and options["gatewayClassName"]
    assert cluster["enableInTreeAutoscaling"] is True
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        for container in group["template"]["spec"]["containers"]:
            names = {e["name"] for e in container.get("env", [])}
            assert not names & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}  # KubeRay sets both


def test_rayservice_serve_config_is_the_production_one():
    manifest = rayservice()
    assert manifest["kind"] == "RayService" and manifest["apiVersion"] == "ray.io/v1"
    serve_config_v2 = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config_v2)
    assert serve_config_v2 == load(ROOT / "configs" / "production" / "serve.yaml")
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert group["rayStartParams"]["plasma-directory"] == "/dev/shm"
        volumes = group["template"]["spec"]["volumes"]
        assert {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": volumes[0]
                                            ["emptyDir"]["sizeLimit"]}} in volumes


def test_rayservice_groups_mirror_the_cluster_files_node_types():
    """The `cpu` group carries cpu_node like cpu_worker and has its CPUs; the `gpu` group
    has one GPU like gpu_worker and no marker; counts follow min_workers/max_workers."""
    groups = {g["groupName"]: g for g in rayservice()["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    types = node_types(load(ROOT / "cluster.yaml"))
    for group_name, type_name in [("cpu", "cpu_worker"), ("gpu", "gpu_worker")]:
        group, node_type = groups[group_name], types[type_name]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert float(limits["cpu"]) == node_type["resources"]["CPU"]
        assert int(limits.get("nvidia.com/gpu", 0)) == node_type["resources"].get("GPU", 0)
        marker = group.get("resources", {}).get(CPU_MARKER)
        assert (float(marker) if marker else 0) == node_type["resources"].get(CPU_MARKER, 0)
        assert group["minReplicas"] == node_type["min_workers"]
        assert group["maxReplicas"] == node_type["max_workers"]


def test_traffic_and_metrics_reach_the_rayservice():
    """The Ingress ends TLS in front of the Service of the Gateway KubeRay makes for an
    incremental upgrade ("<RayService>-gateway", Istio names it "<Gateway>-<class>"); the
    app's gauges are scraped once, through KubeRay's "<RayService>-serve-svc"; Ray's
    metrics from every pod the RayService runs; the pods' service accounts exist."""
    manifest = rayservice()
    name = manifest["metadata"]["name"]
    gateway_class = manifest["spec"]["upgradeStrategy"]["clusterUpgradeOptions"]["gatewayClassName"]
    [ingress] = load_all(DEPLOY / "k8s" / "serve-ingress.yaml")
    backends = {p["backend"]["service"]["name"] for r in ingress["spec"]["rules"]
                for p in r["http"]["paths"]}
    assert backends == {f"{name}-gateway-{gateway_class}"} and ingress["spec"]["tls"]
    monitors = {d["kind"]: d for d in load_all(DEPLOY / "k8s" / "monitoring.yaml")}
    [target] = [t for c in monitors["ScrapeConfig"]["spec"]["staticConfigs"] for t in c["targets"]]
    assert target.split(".")[0] == f"{name}-serve-svc" and target.endswith(":8000")
    assert monitors["ScrapeConfig"]["spec"]["authorization"]["credentials"]["key"] == \
        load_settings(ROOT / "configs" / "production", require_pins=False).service.metrics_token_env
    selector = monitors["PodMonitor"]["spec"]["selector"]["matchLabels"]
    cluster = manifest["spec"]["rayClusterConfig"]
    accounts = {d["metadata"]["name"] for d in load_all(DEPLOY / "k8s" / "serviceaccounts.yaml")}
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        template = group["template"]
        assert selector.items() <= template["metadata"]["labels"].items()
        assert template["spec"]["serviceAccountName"] in accounts
        ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
        assert ports["metrics"] == int(group["rayStartParams"]["metrics-export-port"])


# --- secrets ------------------------------------------------------------------------------

def secret_variables_the_code_reads() -> set[str]:
    """Every EPHEMERA_* variable named in the code and every *_env of the production
    service.yaml (api_token_env, metrics_token_env)."""
    names = set()
    for folder in ("pipeline", "serve", "actors"):
        for path in (ROOT / folder).rglob("*.py"):
            names |= set(re.findall(r'"(EPHEMERA_[A-Z0-9_]+)"', path.read_text()))
    service = load(ROOT / "configs" / "production" / "service.yaml")
    names |= {v for k, v in service.items() if k.endswith("_env") and v}
    return names


def test_every_secret_the_code_reads_is_documented_and_required():
    documented = (DEPLOY / "k8s" / "secrets.md").read_text()
    required = set(re.search(r'REQUIRED_COMMON="([^"]+)"', NODE_INIT.read_text()).group(1).split())
    for name in secret_variables_the_code_reads():
        assert f"`{name}`" in documented, name
        assert name in required, name
    assert "RAY_AUTH_TOKEN" in required
    assert "`auth_token`" in documented and "`ephemera-ray-auth`" in documented


# --- node-init.sh, run for real with stand-ins for the cloud CLIs --------------------------

def fake_tool(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


@pytest.fixture
def tmpfs_dir():
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm tmpfs here")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as folder:
        yield Path(folder)


def run_node_init(args: list[str], tools: Path, secrets_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{tools}:{os.environ['PATH']}",
           "EPHEMERA_SECRETS_DIR": str(secrets_dir)}
    return subprocess.run(["bash", str(NODE_INIT), *args], env=env, capture_output=True,
                          text=True, timeout=30)


NODE_ENV = {"EPHEMERA_API_TOKEN": "api-token-value-123456", "EPHEMERA_METRICS_TOKEN": "m" * 24,
            "EPHEMERA_ACCOUNT_SECRET": "a" * 40, "EPHEMERA_AGGREGATE_SECRET": "g" * 40,
            "EPHEMERA_TLOG_SIGNING_KEY": "dGxvZy1zaWduaW5nLWtleS1mb3ItdGVzdHMtMzItYnk=",
            "RAY_AUTH_TOKEN": "f" * 64}


def fake_aws(tools: Path, node_env: dict) -> None:
    fake_tool(tools, "aws", f"""case "$*" in
  *ephemera/prod/node-env*) echo '{json.dumps(node_env)}' ;;
  *ephemera/prod/gcp-credentials*) echo '{{"type": "external_account"}}' ;;
  *) exit 3 ;;
esac
""")


def test_node_init_writes_the_secrets_as_a_private_env_file(tmp_path, tmpfs_dir):
    fake_aws(tmp_path, NODE_ENV)
    secrets_dir = tmpfs_dir / "ephemera"
    done = run_node_init(["secrets-aws", "us-east-1", "ephemera/prod/node-env",
                          "ephemera/prod/gcp-credentials"], tmp_path, secrets_dir)
    assert done.returncode == 0, done.stderr
    env_file = secrets_dir / "secrets.env"
    assert env_file.read_text().splitlines() == [f"{k}={v}" for k, v in sorted(NODE_ENV.items())]
    assert json.loads((secrets_dir / "gcp-credentials.json").read_text())["type"] == "external_account"
    assert stat.S_IMODE(secrets_dir.stat().st_mode) == 0o700
    for path in secrets_dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
    assert "RAY_AUTH_TOKEN" in done.stdout
    assert not any(v in done.stdout + done.stderr for v in NODE_ENV.values())  # names only


def test_node_init_refuses_a_secret_without_a_required_key(tmp_path, tmpfs_dir):
    fake_aws(tmp_path, {k: v for k, v in NODE_ENV.items() if k != "RAY_AUTH_TOKEN"})
    secrets_dir = tmpfs_dir / "ephemera"
    done = run_node_init(["secrets-aws", "us-east-1", "ephemera/prod/node-env",
                          "ephemera/prod/gcp-credentials"], tmp_path, secrets_dir)
    assert done.returncode != 0 and "RAY_AUTH_TOKEN" in done.stderr
    assert not (secrets_dir / "secrets.env").exists()


def test_node_init_keeps_secrets_off_disks(tmp_path):
    probe = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True,
                           text=True, check=True).stdout.strip()
    if probe in ("tmpfs", "ramfs"):
        pytest.skip("the test folder is itself on tmpfs here")
    fake_aws(tmp_path, NODE_ENV)
    done = run_node_init(["secrets-aws", "us-east-1", "ephemera/prod/node-env",
                          "ephemera/prod/gcp-credentials"], tmp_path, tmp_path / "secrets")
    assert done.returncode != 0 and "not tmpfs" in done.stderr
    assert not (tmp_path / "secrets" / "secrets.env").exists()


@pytest.mark.parametrize("driver, ok", [("580.95.05", True), ("595.91.07", True),
                                        ("570.172.08", False)])
def test_node_init_refuses_a_driver_older_than_cuda_13_needs(tmp_path, driver, ok):
    fake_tool(tmp_path, "nvidia-smi", f"echo {driver}\n")
    done = run_node_init(["wait-gpu", "580", "5"], tmp_path, tmp_path)
    assert (done.returncode == 0) == ok, done.stderr
    if not ok:
        assert "R580" in done.stderr


# --- Prometheus ---------------------------------------------------------------------------

def alert_rules() -> dict[str, dict]:
    groups = load(DEPLOY / "prometheus" / "alerts.yml")["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"]}


def serve_metric_names() -> set[str]:
    """Ray Serve's own metric names, from the installed Ray's source."""
    names = set()
    for path in (Path(ray.__file__).parent / "serve" / "_private").glob("*.py"):
        text = path.read_text().replace("{protocol_name}", "http")
        names |= set(re.findall(r'"(serve_[a-z0-9_]+)"', text))
    return names


def test_alert_rules_cover_the_issue_and_parse():
    rules = alert_rules()
    assert REQUIRED_ALERTS <= set(rules)
    for name, rule in rules.items():
        assert rule["expr"].count("(") == rule["expr"].count(")"), name
        assert rule["labels"]["severity"] in ("page", "warn") and rule["annotations"]["summary"]
    prometheus = load(DEPLOY / "prometheus" / "prometheus.yml")
    assert prometheus["rule_files"] == ["alerts.yml"]
    [rule_object] = [d for d in load_all(DEPLOY / "k8s" / "monitoring.yaml")
                     if d["kind"] == "PrometheusRule"]
    assert rule_object["spec"] == load(DEPLOY / "prometheus" / "alerts.yml")


def test_alerts_query_only_metrics_that_exist():
    """ephemera_* from pipeline/state/metrics.py, ray_ephemera_* from serve/telemetry.py,
    ray_serve_* from Ray Serve itself, and Prometheus's `up`."""
    ours = (ROOT / "pipeline" / "state" / "metrics.py").read_text()
    telemetry = (ROOT / "serve" / "telemetry.py").read_text()
    serve_names = serve_metric_names()
    for name, rule in alert_rules().items():
        expr = re.sub(r'\{[^}]*\}', "", rule["expr"])  # drop label matchers
        for metric in re.findall(r"\b((?:ray_)?(?:ephemera|serve)_[a-z0-9_]+)\b", expr):
            base = re.sub(r"_(bucket|count|sum)$", "", metric)
            if base.startswith("ray_ephemera_"):
                assert f'"{base.removeprefix("ray_")}"' in telemetry, (name, metric)
            elif base.startswith("ray_serve_"):
                assert base.removeprefix("ray_").removesuffix("_total") in serve_names, (name, metric)
            else:
                assert f'"{base}"' in ours, (name, metric)


def test_alert_thresholds_follow_the_configs():
    rules = alert_rules()
    retention = load(ROOT / "configs" / "production" / "retention.yaml")
    ceiling = rules["EphemeraInputPastCeiling"]["expr"]
    for object_class, hours in [("input", retention["input_ceiling_h"]),
                                ("face_data", retention["face_data_ceiling_h"])]:
        assert re.search(rf'object_class="{object_class}"\}}\) > {hours * 3600}\b', ceiling)
    app = load(ROOT / "configs" / "production" / "serve.yaml")["applications"][0]
    pools = rules["EphemeraPoolWithoutReplica"]["expr"]
    for deployment in app["deployments"]:
        assert f'deployment="{deployment["name"]}"' in pools
    assert f'application="{app["name"]}"' in pools
    jobs = {j["job_name"]: j for j in load(DEPLOY / "prometheus" / "prometheus.yml")["scrape_configs"]}
    assert 'up{job="ephemera-service"}' in rules["EphemeraRedisUnreachable"]["expr"]
    service_job = jobs["ephemera-service"]
    assert service_job["metrics_path"] == "/metrics"
    assert service_job["authorization"]["credentials_file"]
    assert len(service_job["static_configs"][0]["targets"]) == 1  # one target: no overcount
    [scrape] = [d for d in load_all(DEPLOY / "k8s" / "monitoring.yaml") if d["kind"] == "ScrapeConfig"]
    assert scrape["spec"]["jobName"] == "ephemera-service"
    for path in CLUSTER_FILES:
        start = " ".join(load(path)["head_start_ray_commands"] + load(path)["worker_start_ray_commands"])
        port = int(re.search(r"--metrics-export-port=(\d+)", start).group(1))
        assert jobs["ray-nodes"]["ec2_sd_configs"][0]["port"] == port


# --- Serve configs, CLI, image ------------------------------------------------------------

@pytest.mark.parametrize("name", ["configs/serve.yaml", "configs/production/serve.yaml"])
def test_serve_config_validates_and_matches_its_configs(name):
    """The checked-in Serve config is what `ephemera deploy-config` makes from its YAML."""
    shipped = load(ROOT / name)
    ServeDeploySchema.model_validate(shipped)
    app = shipped["applications"][0]
    assert app["import_path"] == IMPORT_PATH
    settings = load_settings(ROOT / app["args"]["config_dir"], require_pins=False)
    assert shipped == serve_config(settings, args=app["args"])


def test_production_configs_pass_config_check_once_their_models_are_pinned(tmp_path, capsys):
    """As shipped, the production set refuses to start (no model is pinned until the real
    weights are staged); with pins it passes."""
    assert cli(["config", "check", "--config-dir", str(ROOT / "configs" / "production")]) == 2
    assert "diffusion_model_sha256" in capsys.readouterr().err
    pinned = pinned_production_configs(tmp_path)
    assert cli(["config", "check", "--config-dir", str(pinned)]) == 0
    assert "inputs on gcs, outputs on s3" in capsys.readouterr().out
    settings = load_settings(pinned)
    assert settings.service.http_host == "0.0.0.0" and settings.service.api_token_env
    assert settings.service.redis_url and settings.service.ray_address == "auto"
    assert 0 < settings.deployments.diffusion.num_gpus <= 1


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
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
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
    assert os.path.exists(DEPLOY / "Dockerfile")


def test_the_committed_openapi_document_is_the_api(tmp_path):
    """docs/openapi.json is what the code declares: regenerate it with
    `ephemera openapi --out docs/openapi.json` after changing a route."""
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
