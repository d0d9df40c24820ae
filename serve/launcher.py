"""Start the whole service locally: embedded Redis if none is configured, local Ray, Serve.

Used by ``ephemera serve``, the demo, the integration tests and the benchmarks.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from pipeline.core.config import Settings, resolve_path
from pipeline.state.redis_server import RedisServer, free_port


def resolve_settings(settings: Settings, *, workdir: Path) -> tuple[Settings, RedisServer | None]:
    """Make paths absolute and start the embedded Redis when no redis_url is set."""
    service = settings.service
    server = None
    redis_url = service.redis_url
    if redis_url is None:
        server = RedisServer(workdir / "redis").start()
        redis_url = server.url
    port = service.http_port or free_port()
    resolved = service.model_copy(update={"redis_url": redis_url, "http_port": port})
    # Actors may run in another working directory: pin the local store's folder.
    storage = settings.storage.model_copy(
        update={"local_root": str(resolve_path(settings.storage.local_root).resolve())})
    return settings.model_copy(update={"service": resolved, "storage": storage}), server


@dataclass
class Service:
    settings: Settings
    base_url: str
    redis_server: RedisServer | None = None
    spill_dir: Path | None = None
    _stopped: bool = field(default=False, repr=False)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            if self.redis_server is not None:
                self.redis_server.stop()
            if self.spill_dir is not None:
                shutil.rmtree(self.spill_dir, ignore_errors=True)

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_service(settings: Settings, *, workdir: Path, startup_timeout_s: float = 180.0) -> Service:
    """Start Redis (if needed), a local Ray instance and the Serve app; wait for /healthz."""
    import ray
    from ray import serve

    from serve.app import serve_config

    if settings.service.ray_address:
        require_ray_token_auth()
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local cluster
    refuse_bad_buckets(settings)
    workdir.mkdir(parents=True, exist_ok=True)
    settings, redis_server = resolve_settings(settings, workdir=workdir)
    service = settings.service
    spill_dir = None
    try:
        if service.ray_address:
            ray.init(address=service.ray_address, log_to_driver=False)
        else:
            spill_dir = memory_spill_dir(service.ray_spill_root)
            ray.init(
                # "local": a new instance even where `ray start` ran (Ray would join that)
                address="local",
                num_cpus=service.ray_num_cpus, include_dashboard=False, log_to_driver=False,
                object_store_memory=(service.ray_object_store_mb * 1024 * 1024
                                     if service.ray_object_store_mb else None),
                # Uploads cross Ray's object store on their way from the HTTP proxy to the
                # ingress. Spilled and fallback-allocated objects go to this folder, which
                # must be RAM-backed: nothing from the object store may reach a disk.
                object_spilling_directory=str(spill_dir),
                _metrics_export_port=service.ray_metrics_export_port,
                _plasma_directory=service.ray_spill_root,
            )
        serve.start(http_options={"host": service.http_host, "port": service.http_port})
        deploy_config(serve_config(settings, args={"settings": settings.model_dump(mode="json")}))
        base_url = f"http://{service.http_host}:{service.http_port}"
        wait_app_running(startup_timeout_s)
        _wait_healthy(base_url, startup_timeout_s)
    except BaseException:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            if redis_server is not None:
                redis_server.stop()
            if spill_dir is not None:
                shutil.rmtree(spill_dir, ignore_errors=True)
        raise
    return Service(settings=settings, base_url=base_url, redis_server=redis_server,
                   spill_dir=spill_dir)


def deploy_config(config: dict) -> None:
    """Deploy a Serve config (ServeDeploySchema) on the connected cluster, as ``serve
    deploy`` does: the declarative path, where a change to only ``user_config`` or replica
    counts reconfigures running replicas in place instead of restarting them."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))


def wait_app_running(timeout_s: float, app_name: str = "ephemera") -> None:
    """Wait until every deployment of the app runs; raise with Serve's message if it fails."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        app = serve.status().applications.get(app_name)
        if app is not None and app.status == "RUNNING":
            return
        if app is not None and app.status == "DEPLOY_FAILED":
            raise RuntimeError(f"the Serve app failed to deploy: {app.message}")
        time.sleep(0.25)
    raise RuntimeError(f"the Serve app did not reach RUNNING within {timeout_s} s")


def refuse_bad_buckets(settings: Settings) -> None:
    """Refuse to start on a bucket whose settings would break a privacy promise."""
    from pipeline.storage.base import open_stores
    from pipeline.storage.posture import check_storage

    problems = check_storage(settings.storage, open_stores(settings.storage))
    if problems:
        raise ValueError("refusing to start; fix the storage buckets:\n  "
                         + "\n  ".join(str(p) for p in problems))


def require_ray_token_auth() -> None:
    """Joining a cluster: Ray's token authentication must be on, so no one on the network
    can submit work to the cluster that holds users' keys in memory."""
    if os.environ.get("RAY_AUTH_MODE") != "token":
        raise ValueError("service.yaml ray_address joins a cluster: set RAY_AUTH_MODE=token "
                         "(and the cluster's token, RAY_AUTH_TOKEN) in this environment")


RAY_TOKEN_SOURCES = "RAY_AUTH_TOKEN, a file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token"


def has_ray_token(environ: Mapping[str, str], home: Path) -> bool:
    """Whether Ray 2.60's client would find a cluster token: the ``RAY_AUTH_TOKEN``
    variable, the file ``RAY_AUTH_TOKEN_PATH`` names, or ``~/.ray/auth_token``, in that
    order (Ray's own AuthenticationTokenLoader)."""
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return True
    path = Path(environ["RAY_AUTH_TOKEN_PATH"]) if environ.get("RAY_AUTH_TOKEN_PATH") \
        else home / ".ray" / "auth_token"
    try:
        return bool(path.read_text().strip())
    except OSError:
        return False


def client_auth_mode(environ: Mapping[str, str], home: Path) -> str:
    """The ``RAY_AUTH_MODE`` an operator command (``ephemera status``, ``tune``) joins a
    running cluster with.

    An explicit ``RAY_AUTH_MODE`` is kept (``token`` without a token is refused here, not
    after Ray's 20 s connection timeout). Unset, a token in the environment means token
    mode: a token client joins a token cluster and, as well, a local ``ephemera serve``
    (which runs with auth disabled), so giving the token never hurts. Unset and no token:
    ``disabled``, the local launcher's mode (a token cluster then refuses the connection).
    """
    mode = environ.get("RAY_AUTH_MODE")
    if mode:
        if mode == "token" and not has_ray_token(environ, home):
            raise ValueError(f"RAY_AUTH_MODE=token but no cluster token was found; give it "
                             f"as {RAY_TOKEN_SOURCES}")
        return mode
    return "token" if has_ray_token(environ, home) else "disabled"


def memory_spill_dir(root: str) -> Path:
    """A fresh folder under ``root``, refused unless ``root`` is a tmpfs or ramfs mount."""
    fs_type = filesystem_type(Path(root))
    if fs_type not in ("tmpfs", "ramfs"):
        raise ValueError(f"service.yaml ray_spill_root {root!r} is on {fs_type or 'an unknown'}"
                         " filesystem; it must be tmpfs (e.g. /dev/shm) so spilled uploads "
                         "never reach a disk")
    path = Path(root) / f"ephemera-spill-{uuid.uuid4().hex[:12]}"
    path.mkdir(mode=0o700)
    return path


def filesystem_type(path: Path) -> str | None:
    """The type of the mount holding ``path`` (longest matching mount point in /proc/mounts)."""
    resolved = str(path.resolve())
    best, best_type = "", None
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    for line in mounts:
        parts = line.split()
        if len(parts) >= 3:
            mount_point = parts[1]
            inside = resolved == mount_point or resolved.startswith(mount_point.rstrip("/") + "/")
            if inside and len(mount_point) > len(best):
                best, best_type = mount_point, parts[2]
    return best_type


def _wait_healthy(base_url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base_url}/healthz", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"the service did not become healthy within {timeout_s} s")
