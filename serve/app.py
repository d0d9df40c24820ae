"""The Serve application: ingress -> job runners -> face / diffusion pools, + retention.

Two ways in, one graph:
- ``build_app(settings)``: from resolved settings (the launcher, tests, benchmarks);
- ``build_from_args(args)``: Serve's import path for ``serve run`` / ``serve deploy`` and a
  KubeRay RayService (``import_path: serve.app:build_from_args``, ``args: {config_dir: ...}``).

``serve_config(settings)`` writes the matching Serve config file (ServeDeploySchema): every
live knob (batching per pool, retry policy) sits in a deployment's ``user_config``, so a
redeploy of an edited config reconfigures running replicas in place.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application
from ray.serve.config import BackpressureConfig

from actors.diffusion import DiffusionDeployment
from actors.face import FaceDeployment
from actors.media import MediaDeployment
from actors.retention import RetentionDeployment
from pipeline.core.config import (
    PoolConfig,
    Settings,
    StageBatchConfig,
    load_settings,
    portable_path,
    resolve_path,
)
from serve.api import ApiDeployment
from serve.runner import JobRunnerDeployment

APP_NAME = "ephemera"
IMPORT_PATH = "serve.app:build_from_args"
API, MEDIA, RUNNER, FACE, DIFFUSION, RETENTION = (
    "ApiDeployment", "MediaDeployment", "JobRunnerDeployment", "FaceDeployment",
    "DiffusionDeployment", "RetentionDeployment")


def _gpu_pool(pool: PoolConfig, batching: StageBatchConfig) -> PoolConfig:
    """A GPU pool takes as many jobs as its running batches plus one forming (unless set)."""
    if pool.max_ongoing_requests is not None:
        return pool
    return pool.model_copy(update={"max_ongoing_requests": batching.max_ongoing_requests})


def deployment_options(settings: Settings) -> dict[str, dict[str, Any]]:
    """Serve options of every deployment, by deployment name."""
    d, b, service = settings.deployments, settings.batching, settings.service
    retry = BackpressureConfig(status_code=503, retry_after_s=service.retry_after_s)
    return {
        API: {**d.api.replica_options(), "backpressure_config": retry},
        MEDIA: d.media.replica_options(),
        RUNNER: {**d.runner.replica_options(), "user_config": b.runner_user_config(),
                 # a runner scaled down finishes the jobs it holds before it goes
                 "graceful_shutdown_timeout_s": service.job_timeout_s},
        FACE: {**_gpu_pool(d.face, b.face).replica_options(), "user_config": b.face.model_dump(),
               "graceful_shutdown_timeout_s": b.stage_timeout_s},
        DIFFUSION: {**_gpu_pool(d.diffusion, b.diffusion).replica_options(),
                    "user_config": b.diffusion.model_dump(),
                    "graceful_shutdown_timeout_s": b.stage_timeout_s},
        RETENTION: d.retention.replica_options(),
    }


def build_app(settings: Settings) -> Application:
    """Bind every deployment to ``settings`` (redis_url and store paths already resolved)."""
    options = deployment_options(settings)
    face = FaceDeployment.options(**options[FACE]).bind(settings)
    diffusion = DiffusionDeployment.options(**options[DIFFUSION]).bind(settings)
    retention = RetentionDeployment.options(**options[RETENTION]).bind(settings)
    runner = JobRunnerDeployment.options(**options[RUNNER]).bind(settings, face, diffusion,
                                                                 retention)
    media = MediaDeployment.options(**options[MEDIA]).bind(settings)
    return ApiDeployment.options(**options[API]).bind(settings, media, runner, retention)


def build_from_args(args: dict[str, Any]) -> Application:
    """Serve's application builder. ``args``: ``config_dir`` (a folder of our YAML files;
    relative: to the app root, by ``resolve_path`` as in the CLI) and optionally
    ``redis_url`` (overrides service.yaml), or ``settings`` (resolved settings, as the
    launcher sends them)."""
    if "settings" in args:
        return build_app(Settings.model_validate(args["settings"]))
    settings = load_settings(str(args.get("config_dir", "configs")))
    redis_url = args.get("redis_url") or settings.service.redis_url
    if redis_url is None:
        raise ValueError("serve run / serve deploy need an external Redis: set redis_url in "
                         "service.yaml or in the app's args (only `ephemera serve` starts an "
                         "embedded one)")
    storage = settings.storage.model_copy(
        update={"local_root": str(resolve_path(settings.storage.local_root))})
    settings = settings.model_copy(update={
        "service": settings.service.model_copy(update={"redis_url": redis_url}),
        "storage": storage})
    from serve.launcher import refuse_bad_buckets

    refuse_bad_buckets(settings)
    return build_app(settings)


def serve_config(settings: Settings, *, args: dict[str, Any]) -> dict[str, Any]:
    """The Serve config file (``ServeDeploySchema``) that deploys this app with ``args``;
    ``args.config_dir`` is written relative to the app root when it lies under it (see
    ``portable_path``), so the file works on any machine with the app at any path."""
    if "config_dir" in args:
        args = {**args, "config_dir": portable_path(str(args["config_dir"]))}
    deployments = []
    for name, options in deployment_options(settings).items():
        entry: dict[str, Any] = {"name": name}
        for key in ("num_replicas", "autoscaling_config", "max_ongoing_requests",
                    "max_queued_requests", "user_config", "graceful_shutdown_timeout_s",
                    "ray_actor_options"):
            if key in options:
                entry[key] = options[key]
        if "backpressure_config" in options:
            entry["backpressure_config"] = options["backpressure_config"].model_dump()
        deployments.append(entry)
    service = settings.service
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": service.http_host, "port": service.http_port or 8000},
        "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": IMPORT_PATH,
                          "args": args, "deployments": deployments}],
    }
