"""A one-machine rehearsal of the production cluster, with Ray's own multi-node tools.

    python scripts/rehearse_cluster.py            # the autoscaling rehearsal (a few minutes)
    python scripts/rehearse_cluster.py --static   # the node-loss scenario (tests/cluster)

What runs is what `ray up cluster.yaml` runs, on one machine:
- nodes: the head and worker node types of ``cluster.yaml``'s ``available_node_types``
  (their resources; declared GPUs are a resource only, models run on the CPU). The default
  mode starts them with ``ray.cluster_utils.AutoscalingCluster`` (Ray's autoscaler with its
  fake multi-node provider), ``--static`` with ``ray.cluster_utils.Cluster`` (a head and two
  GPU worker nodes, no autoscaler);
- Ray token authentication on for every process and command (``RAY_AUTH_MODE=token``);
- the production config set (``configs/production``) with local stand-ins for its
  endpoints: SeaweedFS for S3, the GCS emulator, a private Redis; its models staged into
  the S3 stand-in's model bucket at the production locations and pinned by sha256, as the
  runbook's first deploy does (tiny random-weight models of the real architectures, on CPU);
- deployed as the head node's commands deploy it: ``ephemera deploy-config`` then
  ``serve deploy`` against the head's dashboard, both as subprocesses with the token.

Then it shows the autoscaler adding worker nodes for the pools and removing them idle, the
replicas on the node types meant for them, a GPU worker node killed while it holds jobs in a
GPU batch (every job ends: retried, or failed with a reason, and purged), and `ephemera
status` / `ephemera tune` under token auth. Timings the rehearsal shortens so it ends in
minutes (autoscaler idle timeout, Serve scale-down delays) are said in ``SHORTENED``.

Last line: ``rehearsal: nodes added A, removed R, node killed K, jobs J, succeeded S,
failed F, lost 0, inputs left 0``. ``--json FILE`` writes every observation for a test.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.state.redis_server import RedisServer, free_port  # noqa: E402
from serve.launcher import wait_app_running  # noqa: E402

BIN = Path(sys.executable).parent
APP = "ephemera"
ACCOUNT = "rehearsal"
MODELS_BUCKET = "ephemera-models-us"
# Shortened so the rehearsal ends in minutes; production values are in cluster.yaml and
# configs/production/deployments.yaml.
SHORTENED = {"idle_timeout_minutes": 0.25, "downscale_delay_s": 5.0, "upscale_delay_s": 1.0}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------- node types (cluster.yaml)


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict[str, float]
    min_workers: int
    max_workers: int

    @property
    def gpus(self) -> float:
        return float(self.resources.get("GPU", 0))


def node_types(cluster_file: Path, *, max_per_type: int) -> tuple[NodeType, list[NodeType]]:
    """The head type and the worker types of a cluster launcher file, with their declared
    resources; worker counts capped at ``max_per_type`` (one machine's memory)."""
    config = yaml.safe_load(cluster_file.read_text())
    types = config["available_node_types"]
    head_name = config["head_node_type"]

    def one(name: str) -> NodeType:
        spec = types[name]
        resources = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
        return NodeType(name, resources, int(spec.get("min_workers", 0)),
                        min(int(spec.get("max_workers", 0)), max_per_type))

    head = one(head_name)
    workers = [one(name) for name in types if name != head_name]
    return head, workers


# ------------------------------------------------------------------ stand-ins and configs


@dataclass
class StandIns:
    """Local servers in place of the production endpoints."""

    redis: RedisServer
    seaweed: object
    gcs: object
    inputs_bucket: str
    outputs_bucket: str

    def stop(self) -> None:
        for server in (self.gcs, self.seaweed, self.redis):
            with contextlib.suppress(Exception):
                server.stop()


def start_stand_ins(work: Path, production_storage: dict) -> StandIns:
    from tests.integration.object_servers import (
        FAKE_AWS_ENV,
        GcsEmulator,
        SeaweedS3,
        make_gcs_bucket,
        make_s3_bucket,
    )

    for name, value in FAKE_AWS_ENV.items():
        os.environ.setdefault(name, value)
    started: list = []
    try:
        redis = RedisServer(work / "redis").start()
        started.append(redis)
        seaweed = SeaweedS3(work / "seaweed").start()
        started.append(seaweed)
        gcs = GcsEmulator().start()
        started.append(gcs)
    except BaseException:
        for server in reversed(started):
            with contextlib.suppress(Exception):
                server.stop()
        raise
    outputs_bucket = production_storage["s3"]["bucket"]
    inputs_bucket = production_storage["gcs"]["buckets"][production_storage["gcs"]
                                                         ["fallback_region"]]
    make_s3_bucket(seaweed.client(), outputs_bucket, lifecycle=False)
    make_s3_bucket(seaweed.client(), MODELS_BUCKET, lifecycle=False)
    make_gcs_bucket(gcs.client(), inputs_bucket)
    return StandIns(redis, seaweed, gcs, inputs_bucket, outputs_bucket)


def _edit_yaml(path: Path, changes: dict) -> None:
    values = yaml.safe_load(path.read_text()) or {}
    values.update(changes)
    path.write_text(yaml.safe_dump(values, sort_keys=False))


def production_configs(dest: Path, stand_ins: StandIns, *, http_port: int,
                       static: bool) -> Path:
    """configs/production, with the stand-ins' endpoints, CPU models and the pool sizes
    this machine holds; everything else as shipped."""
    import shutil

    shutil.copytree(ROOT / "configs" / "production", dest)
    _edit_yaml(dest / "service.yaml", {
        "http_host": "127.0.0.1", "http_port": http_port,
        "redis_url": stand_ins.redis.url, "ray_address": "auto",
        # Models run on this machine's CPUs: 64 px outputs (production: 512 and 768) keep
        # a batch well inside stage_timeout_s.
        "allowed_resolutions_px": [64], "default_resolution_px": 64})
    storage = yaml.safe_load((dest / "storage.yaml").read_text())
    # The emulator reports every bucket's location as "US": one region named "us".
    storage["gcs"] = {**storage["gcs"], "endpoint_url": stand_ins.gcs.endpoint,
                      "project": "ephemera-test", "buckets": {"us": stand_ins.inputs_bucket},
                      "country_regions": {}, "fallback_region": "us"}
    storage["s3"] = {**storage["s3"], "endpoint_url": stand_ins.seaweed.endpoint,
                     "output_encryption": "none"}  # SeaweedFS has no KMS
    (dest / "storage.yaml").write_text(yaml.safe_dump(storage, sort_keys=False))
    _edit_yaml(dest / "models.yaml", {
        "device": "cpu", "dtype": "float32", "attention": "sdpa", "torch_compile": False,
        "channels_last": False, "num_inference_steps": 2, "torch_num_threads": 1,
        "model_cache_dir": str(dest.parent / "model-cache")})
    deployments = yaml.safe_load((dest / "deployments.yaml").read_text())
    for name, pool in deployments.items():
        scaling = pool.get("autoscaling")
        if static or name in ("api", "media", "runner"):
            # One replica each: fixed pools for the node-loss scenario; the CPU pools of
            # the autoscaling run stay small too (2 cores here).
            pool.pop("autoscaling", None)
            pool["num_replicas"] = 1
        elif scaling:
            scaling.update({"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                            "upscale_delay_s": SHORTENED["upscale_delay_s"],
                            "downscale_delay_s": SHORTENED["downscale_delay_s"]})
        if name == "retention":
            pool["num_replicas"] = 1
        if name == "media":
            pool["memory_bytes"] = 1 << 30
    (dest / "deployments.yaml").write_text(yaml.safe_dump(deployments, sort_keys=False))
    return dest


def stage_models(configs: Path, work: Path) -> dict[str, str]:
    """Tiny models of the real architectures, staged at the production locations of
    models.yaml in the S3 stand-in and pinned by their manifest sha256."""
    from pipeline.core.config import MODEL_PINS, StorageConfig, load_yaml
    from pipeline.models.model_store import stage_model
    from pipeline.models.tiny import (
        build_tiny_arcface,
        build_tiny_ip_adapter,
        build_tiny_models,
        build_tiny_motion_adapter,
    )

    storage = load_yaml(configs / "storage.yaml", StorageConfig)
    models = yaml.safe_load((configs / "models.yaml").read_text())
    built = work / "tiny"
    build_tiny_models(built / "sd")
    build_tiny_ip_adapter(built / "sd", built / "ip-adapter" / "ip-adapter.safetensors")
    build_tiny_motion_adapter(built / "motion")
    build_tiny_arcface(built / "arcface" / "arcface.onnx")
    sources = {"diffusion_model_dir": built / "sd",
               "ip_adapter_weights": built / "ip-adapter" / "ip-adapter.safetensors",
               "motion_adapter_dir": built / "motion",
               "face_embedder_weights": built / "arcface" / "arcface.onnx"}
    pins = {}
    for setting, source in sources.items():
        manifest = stage_model(source, models[setting], storage)
        pins[MODEL_PINS[setting]] = manifest.sha256
    _edit_yaml(configs / "models.yaml", pins)
    return pins


# ------------------------------------------------------------------------------ clusters


def _token_env() -> None:
    """Token authentication for this process and everything it starts; every Ray address
    on loopback (Ray turns 127.0.0.1 into the machine's address unless told it is a
    one-machine cluster, and sandboxes may not reach that address)."""
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    os.environ.setdefault("EPHEMERA_API_TOKEN", "rehearsal-api-" + secrets.token_hex(16))
    os.environ.setdefault("EPHEMERA_ACCOUNT_SECRET", "rehearsal-account-" + secrets.token_hex(24))
    os.environ.setdefault("EPHEMERA_AGGREGATE_SECRET", "rehearsal-aggr-" + secrets.token_hex(24))
    os.environ.setdefault("EPHEMERA_METRICS_TOKEN", "rehearsal-metrics-" + secrets.token_hex(16))
    os.environ.setdefault("EPHEMERA_TLOG_SIGNING_KEY",
                          base64.b64encode(secrets.token_bytes(32)).decode())
    os.environ.pop("RAY_ADDRESS", None)


def _kill_matching(needles: list[str]) -> int:
    """SIGKILL every process of this user whose command line holds one of ``needles``."""
    import psutil

    killed = 0
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.info["pid"] == os.getpid():
            continue
        cmdline = " ".join(proc.info["cmdline"] or [])
        if any(n in cmdline for n in needles):
            with contextlib.suppress(psutil.Error):
                proc.kill()
                killed += 1
    return killed


def _autoscaling_cluster_class():
    from ray.cluster_utils import AutoscalingCluster

    class RehearsalCluster(AutoscalingCluster):
        """Ray's AutoscalingCluster, started on its own ports and temp folder and stopped
        alone: its own ``start``/``shutdown`` run ``ray stop --force``, which would also stop
        any other Ray on the machine, and its base config file is not in the wheel."""

        def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False,
                             **config_kwargs):
            self.gcs_port, self.dashboard_port = free_port(), free_port()
            return {
                "cluster_name": "ephemera-rehearsal", "max_workers": 16,
                "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                             "disable_node_updaters": True, "disable_launch_config_check": True,
                             "gcs_address": f"127.0.0.1:{self.gcs_port}"},
                "available_node_types": {
                    **worker_node_types,
                    "ray.head.default": {"resources": dict(head_resources), "node_config": {},
                                         "max_workers": 0}},
                "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0,
                "docker": {}, "initialization_commands": [], "setup_commands": [],
                "head_setup_commands": [], "worker_setup_commands": [],
                "head_start_ray_commands": [], "worker_start_ray_commands": [],
                "file_mounts": {}, "cluster_synced_files": [],
                "file_mounts_sync_continuously": False, "rsync_exclude": [],
                "rsync_filter": [], **config_kwargs}

        def start(self, _system_config=None, override_env=None):
            self.temp_dir = tempfile.mkdtemp(prefix="ephemera-rehearsal-ray-")
            config_file = Path(self.temp_dir) / "autoscaling.json"
            config_file.write_text(json.dumps(self._config))
            resources = dict(self._head_resources)
            cmd = [str(BIN / "ray"), "start", "--head", f"--autoscaling-config={config_file}",
                   f"--port={self.gcs_port}", "--node-ip-address=127.0.0.1",
                   "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                   f"--ray-client-server-port={free_port()}", f"--temp-dir={self.temp_dir}",
                   f"--num-cpus={int(resources.pop('CPU', 0))}",
                   f"--num-gpus={int(resources.pop('GPU', 0))}", "--disable-usage-stats"]
            if resources:
                cmd.append(f"--resources={json.dumps(resources)}")
            env = {**os.environ, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1",
                   **(override_env or {})}
            subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)

        @property
        def address(self) -> str:
            return f"127.0.0.1:{self.gcs_port}"

        @property
        def dashboard(self) -> str:
            return f"http://127.0.0.1:{self.dashboard_port}"

        def shutdown(self):
            import shutil

            _kill_matching([self.temp_dir, f"127.0.0.1:{self.gcs_port}",
                            f"--gcs_server_port={self.gcs_port}"])
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    return RehearsalCluster


@dataclass
class Running:
    """A started cluster: its GCS address, the dashboard (for `serve deploy`), and how to
    stop it and kill one of its nodes."""

    address: str
    dashboard: str
    stop: object
    kill_node: object  # (node_id hex) -> None


def start_autoscaling(head: NodeType, workers: list[NodeType]) -> Running:
    cluster_class = _autoscaling_cluster_class()
    # Ray's `memory` resource cannot be declared to the fake provider's nodes: they report
    # the machine's memory instead.
    worker_types = {w.name: {"resources": {k: v for k, v in w.resources.items()
                                           if k != "memory"}, "node_config": {},
                             "min_workers": w.min_workers, "max_workers": w.max_workers}
                    for w in workers}
    cluster = cluster_class(head_resources={k: v for k, v in head.resources.items() if k != "memory"},
                            worker_node_types=worker_types,
                            idle_timeout_minutes=SHORTENED["idle_timeout_minutes"])
    cluster.start()

    def kill_node(node_id: str) -> None:
        # The fake provider's nodes carry their id in the environment of every process.
        import psutil

        for proc in psutil.process_iter(["pid"]):
            with contextlib.suppress(psutil.Error, OSError):
                if proc.environ().get("RAY_OVERRIDE_NODE_ID_FOR_TESTING") == node_id:
                    proc.kill()

    return Running(cluster.address, cluster.dashboard, cluster.shutdown, kill_node)


def _node_args(node_type: NodeType) -> dict:
    """``Cluster.add_node`` keywords for a node of this type."""
    extra = dict(node_type.resources)
    args = {"num_cpus": extra.pop("CPU", 0), "num_gpus": extra.pop("GPU", 0),
            "node_ip_address": "127.0.0.1"}
    if "memory" in extra:
        args["memory"] = int(extra.pop("memory"))
    return {**args, "resources": extra}


def start_static(head: NodeType, workers: list[NodeType], gpu_nodes: int = 2) -> Running:
    """The head, one node of each CPU worker type and ``gpu_nodes`` of the GPU type."""
    from ray.cluster_utils import Cluster

    dashboard_port = free_port()
    cluster = Cluster(initialize_head=True, head_node_args={
        **_node_args(head), "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": dashboard_port})
    nodes = {}
    for node_type in workers:
        for _ in range(gpu_nodes if node_type.gpus else 1):
            node = cluster.add_node(**_node_args(node_type))
            nodes[node.node_id] = node
    cluster.wait_for_nodes()

    def kill_node(node_id: str) -> None:
        cluster.remove_node(nodes.pop(node_id), allow_graceful=False)

    return Running(cluster.address, f"http://127.0.0.1:{dashboard_port}", cluster.shutdown,
                   kill_node)


# --------------------------------------------------------------------------- observation


def alive_nodes() -> dict[str, dict[str, float]]:
    import ray

    return {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}


def replicas_by_node() -> dict[str, list[tuple[str, int]]]:
    """Alive Serve replicas: deployment name -> [(node id, pid)]."""
    from ray.util.state import list_actors

    placed: dict[str, list[tuple[str, int]]] = {}
    for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000, detail=True):
        name = actor.class_name or ""
        if name.startswith("ServeReplica:"):
            deployment = name.split(":")[-1]
            placed.setdefault(deployment, []).append((actor.node_id, actor.pid))
    return placed


def wait_for(what: str, check, timeout_s: float, poll_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


def cli(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    """An `ephemera`/`serve` command as an operator runs it on the head: its own process,
    the token from the environment."""
    result = subprocess.run(list(args), cwd=ROOT, env=dict(os.environ), capture_output=True,
                            text=True, timeout=timeout_s)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed ({result.returncode}):\n"
                           f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return result


def deploy(configs: Path, stand_ins: StandIns, dashboard: str, work: Path) -> None:
    """The head node's deploy step: write the Serve config, `serve deploy` it."""
    serve_file = work / "serve.yaml"
    cli(str(BIN / "ephemera"), "deploy-config", "--config-dir", str(configs), "--redis-url",
        stand_ins.redis.url, "--out", str(serve_file))
    cli(str(BIN / "serve"), "deploy", "--address", dashboard, str(serve_file))


def photo() -> bytes:
    import skimage.data
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).resize((256, 256)).save(buffer, format="JPEG")
    return buffer.getvalue()


def submit_jobs(base_url: str, count: int) -> list[tuple[str, str]]:
    """``count`` art-style jobs over four accounts (the per-account limit is 8 in flight);
    returns (account, job id) pairs."""
    from pipeline.security import crypto
    from serve.client import EphemeraClient

    key, data = crypto.new_device_key(), photo()

    def post(n: int) -> tuple[str, str]:
        account = f"{ACCOUNT}-{n % 4}"
        with EphemeraClient(base_url, token=os.environ["EPHEMERA_API_TOKEN"],
                            timeout_s=120) as api:
            return account, api.submit_job([("p.jpg", data)], device_key=key,
                                            kind="art_style", style="watercolor",
                                            account_id=account).job_id

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(post, range(count)))


def job_views(base_url: str, jobs: list[tuple[str, str]]) -> dict[str, object]:
    from serve.client import EphemeraClient

    with EphemeraClient(base_url, token=os.environ["EPHEMERA_API_TOKEN"], timeout_s=60) as api:
        return {job_id: api.get_job(account, job_id) for account, job_id in jobs}


def settled(views: dict) -> bool:
    return all(v.status.is_finished and v.inputs_purged_s for v in views.values())


def inputs_left(stand_ins: StandIns) -> list[str]:
    """Every stored input, face-data and work object, on both stand-ins."""
    from pipeline.storage.posture import PURGED_PREFIXES

    left = [b.name for b in stand_ins.gcs.client().list_blobs(stand_ins.inputs_bucket)
            if b.name.startswith(PURGED_PREFIXES)]
    s3 = stand_ins.seaweed.client()
    for prefix in PURGED_PREFIXES:
        left += [o["Key"] for o in s3.list_objects_v2(
            Bucket=stand_ins.outputs_bucket, Prefix=prefix).get("Contents", [])]
    return left


class NodeWatcher:
    """Samples the cluster's alive nodes twice a second, in a thread, and keeps a timeline
    of nodes added and removed (with their types) and of the diffusion pool's replicas."""

    def __init__(self, type_of) -> None:
        import threading

        self.type_of = type_of
        self.started = time.monotonic()
        self.known: dict[str, str] = {}
        self.timeline: list[tuple[float, str, str]] = []
        self._stop = threading.Event()
        self._sample()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        nodes = alive_nodes()
        at = round(time.monotonic() - self.started, 1)
        for node_id in nodes.keys() - self.known.keys():
            self.known[node_id] = self.type_of(nodes[node_id], node_id)
            self.timeline.append((at, "added", self.known[node_id]))
        for node_id in self.known.keys() - nodes.keys():
            self.timeline.append((at, "removed", self.known.pop(node_id)))

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            with contextlib.suppress(Exception):
                self._sample()

    def note(self, what: str, detail: str = "") -> None:
        self.timeline.append((round(time.monotonic() - self.started, 1), what, detail))

    def count(self, what: str) -> int:
        return sum(1 for _, event, _ in self.timeline if event == what)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)


@dataclass
class Report:
    mode: str
    node_types: dict[str, dict[str, float]] = field(default_factory=dict)
    nodes_added: int = 0
    nodes_removed: int = 0
    nodes_killed: int = 0
    placement: dict[str, list[str]] = field(default_factory=dict)  # deployment -> node types
    killed_node_type: str = ""
    killed_deployments: list[str] = field(default_factory=list)
    in_flight_on_killed: list[str] = field(default_factory=list)
    in_flight_outcomes: dict[str, list] = field(default_factory=dict)  # job -> [status, attempts]
    after_kill_placement: dict[str, list[str]] = field(default_factory=dict)
    jobs: int = 0
    succeeded: int = 0
    failed: int = 0
    failed_reasons: list[str] = field(default_factory=list)
    retried: int = 0
    last_job_end_after_kill_s: float = 0.0
    lost: int = 0
    inputs_left: list[str] = field(default_factory=list)
    status_ok: bool = False
    tune_ok: bool = False
    timeline: list = field(default_factory=list)  # [seconds, event, node type or detail]
    seconds: float = 0.0

    def last_line(self) -> str:
        return (f"rehearsal: nodes added {self.nodes_added}, removed {self.nodes_removed}, "
                f"node killed {self.nodes_killed}, jobs {self.jobs}, succeeded "
                f"{self.succeeded}, failed {self.failed}, lost {self.lost}, inputs left "
                f"{len(self.inputs_left)}")


def classify(resources: dict[str, float], head: NodeType, workers: list[NodeType],
             head_id: str, node_id: str) -> str:
    """A node's type: the head by id, a worker by its declared resources."""
    if node_id == head_id:
        return head.name
    for worker in workers:
        declared = {k: v for k, v in worker.resources.items() if k != "memory"}
        if all(abs(resources.get(k, 0) - v) < 1e-6 for k, v in declared.items()):
            return worker.name
    return "unknown"


# ----------------------------------------------------------------------------- scenario


def rehearse(args: argparse.Namespace) -> Report:
    import ray

    started = time.monotonic()
    report = Report(mode="static" if args.static else "autoscaling")
    head, workers = node_types(ROOT / args.cluster_file, max_per_type=2)
    gpu_types = [w for w in workers if w.gpus > 0]
    if not gpu_types:
        raise ValueError(f"{args.cluster_file} declares no GPU worker type")
    report.node_types = {t.name: t.resources for t in (head, *workers)}
    work = Path(tempfile.mkdtemp(prefix="ephemera-rehearsal-"))
    production_storage = yaml.safe_load((ROOT / "configs/production/storage.yaml").read_text())
    stand_ins = start_stand_ins(work, production_storage)
    running = None
    try:
        http_port = free_port()
        configs = production_configs(work / "configs", stand_ins, http_port=http_port,
                                     static=args.static)
        log("staging the models at the production locations (S3 stand-in) and pinning them")
        stage_models(configs, work)
        log(f"starting the cluster ({report.mode}) with node types "
            f"{', '.join(report.node_types)}; token auth on")
        running = (start_static(head, workers) if args.static
                   else start_autoscaling(head, workers))
        ray.init(address=running.address, log_to_driver=False, logging_level="ERROR")
        head_id = ray.get_runtime_context().get_node_id()
        watcher = NodeWatcher(lambda resources, node_id: classify(
            resources, head, workers, head_id, node_id))
        log(f"deploying as the head does: ephemera deploy-config, serve deploy "
            f"({len(watcher.known)} nodes up)")
        deploy(configs, stand_ins, running.dashboard, work)
        wait_app_running(args.timeout_s, APP)
        base_url = f"http://127.0.0.1:{http_port}"

        def types_of(placed: dict[str, list[tuple[str, int]]]) -> dict[str, list[str]]:
            nodes = alive_nodes()
            return {d: sorted(classify(nodes.get(n, {}), head, workers, head_id, n)
                              for n, _ in reps) for d, reps in placed.items()}

        watcher.note("app running")
        report.placement = types_of(replicas_by_node())
        log(f"placement: {report.placement}")

        job_ids = submit_jobs(base_url, args.jobs)
        report.jobs = len(job_ids)
        watcher.note("jobs accepted", str(len(job_ids)))
        log(f"{len(job_ids)} jobs accepted; waiting for a GPU batch in flight")

        def diffusion_in_flight() -> list[str]:
            views = job_views(base_url, job_ids)
            return [j for j, v in views.items() if v.status == "running"
                    and v.batch_sizes.diffusion and not v.output_ids]

        wait_for("a diffusion batch in flight", diffusion_in_flight, args.timeout_s, 0.2)
        placed = replicas_by_node()
        victim_node, victim_pid = placed["DiffusionDeployment"][0]
        # Freeze the replica so the batch provably is in flight when its node dies.
        os.kill(victim_pid, signal.SIGSTOP)
        time.sleep(1.0)
        report.in_flight_on_killed = diffusion_in_flight()
        nodes = alive_nodes()
        report.killed_node_type = classify(nodes.get(victim_node, {}), head, workers, head_id,
                                           victim_node)
        report.killed_deployments = sorted(d for d, reps in placed.items()
                                           if any(n == victim_node for n, _ in reps))
        log(f"killing a {report.killed_node_type} node holding {report.killed_deployments} "
            f"with {len(report.in_flight_on_killed)} jobs in its batch")
        running.kill_node(victim_node)
        with contextlib.suppress(ProcessLookupError):  # a lost machine keeps no process
            os.kill(victim_pid, signal.SIGKILL)
        report.nodes_killed = 1
        killed_s = time.time()
        watcher.note("killed", report.killed_node_type)

        views = wait_for("every job to end and be purged",
                         lambda: (v if settled(v := job_views(base_url, job_ids)) else None),
                         args.timeout_s)
        report.succeeded = sum(v.status == "succeeded" for v in views.values())
        report.failed = sum(v.status == "failed" for v in views.values())
        report.failed_reasons = [v.reason or "" for v in views.values() if v.status == "failed"]
        report.in_flight_outcomes = {j: [views[j].status.value, views[j].attempts]
                                     for j in report.in_flight_on_killed}
        report.retried = sum(v.attempts >= 1 for v in views.values())  # crashed attempts
        report.last_job_end_after_kill_s = round(
            max(v.finished_s or killed_s for v in views.values()) - killed_s, 1)
        report.lost = report.jobs - report.succeeded - report.failed
        watcher.note("every job ended", f"{report.succeeded} succeeded, {report.failed} failed")

        def pools_back() -> dict[str, list[str]] | None:
            placed = replicas_by_node()
            gone = any(n == victim_node for reps in placed.values() for n, _ in reps)
            wanted = {"FaceDeployment", "DiffusionDeployment"}
            return None if gone or not wanted <= set(placed) else types_of(placed)

        report.after_kill_placement = wait_for("the GPU pools back on another node",
                                               pools_back, args.timeout_s)
        watcher.note("GPU pools back")
        log(f"after the kill: {report.after_kill_placement}")

        cli(str(BIN / "ephemera"), "status", "--address", running.address, "--redis-url",
            stand_ins.redis.url)
        report.status_ok = True
        cli(str(BIN / "ephemera"), "tune", "diffusion", "--address", running.address,
            "--max-wait-ms", "150")
        report.tune_ok = True
        log("ephemera status and ephemera tune ran under token auth")

        if not args.static:
            before = len(alive_nodes())
            minimum = 1 + sum(w.min_workers for w in workers)
            log(f"idle: waiting for the autoscaler to remove idle nodes ({before} up, "
                f"min {minimum})")
            wait_for("idle nodes removed", lambda: len(watcher.known) <= minimum,
                     args.timeout_s, 2.0)
        report.inputs_left = wait_for_empty(stand_ins)
        watcher.stop()
        report.timeline = watcher.timeline
        # Added: every worker node the autoscaler (or --static) started; removed: every node
        # gone that was not the one killed.
        report.nodes_added = watcher.count("added") - 1  # the head
        report.nodes_removed = watcher.count("removed") - report.nodes_killed
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
        if running is not None:
            running.stop()
        stand_ins.stop()
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    report.seconds = round(time.monotonic() - started, 1)
    return report


def wait_for_empty(stand_ins: StandIns, timeout_s: float = 30.0) -> list[str]:
    """Inputs left after every job was purged (none expected; waited briefly in case a
    purge is still being verified)."""
    deadline = time.monotonic() + timeout_s
    while (left := inputs_left(stand_ins)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--static", action="store_true",
                        help="ray.cluster_utils.Cluster: a head and two GPU workers, no "
                             "autoscaler (the node-loss test)")
    parser.add_argument("--cluster-file", default="cluster.yaml")
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument("--json", metavar="FILE", help="write the report as JSON")
    args = parser.parse_args(argv)
    _token_env()  # before Ray is imported: it reads the auth mode once per process
    report = rehearse(args)
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(report), indent=2))
    print(json.dumps({k: v for k, v in asdict(report).items()
                      if k not in ("failed_reasons", "inputs_left")}, indent=1))
    print(report.last_line())
    return 0 if report.lost == 0 and not report.inputs_left else 1


if __name__ == "__main__":
    sys.exit(main())
