"""The Serve application graph: ingress -> scheduler -> face / diffusion pools, + retention."""

from __future__ import annotations

from ray.serve import Application

from actors.diffusion import DiffusionDeployment
from actors.face import FaceDeployment
from actors.retention import RetentionDeployment
from pipeline.config import Settings
from serve.api import ApiDeployment
from serve.scheduler import SchedulerDeployment


def _pool_options(pool) -> dict:
    return {
        "num_replicas": pool.num_replicas,
        "ray_actor_options": {"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus},
    }


def build_app(settings: Settings) -> Application:
    """Bind every deployment to ``settings`` (redis_url and store_url already resolved)."""
    face = FaceDeployment.options(**_pool_options(settings.models.face)).bind(settings)
    diffusion = DiffusionDeployment.options(**_pool_options(settings.models.diffusion)).bind(settings)
    retention = RetentionDeployment.options(
        num_replicas=settings.retention.num_replicas).bind(settings)
    scheduler = SchedulerDeployment.options(
        user_config=settings.batching.model_dump()).bind(settings, face, diffusion, retention)
    return ApiDeployment.bind(settings, scheduler, retention)
