"""Live tuning and status of a running service, through Serve's own config path.

``retune`` reads the config Serve deployed, changes one pool's batching (its
``user_config``, plus the ``max_ongoing_requests`` derived from it) and deploys it again:
Serve sees only lightweight changes and calls ``reconfigure()`` on the running replicas,
so no replica restarts and no job is lost. ``serve deploy`` of an edited config file does
the same thing.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import ValidationError

from pipeline.core.config import BatchingConfig, Settings, StageBatchConfig, load_settings, resolve_path
from pipeline.core.records import Pool
from serve.app import APP_NAME, DIFFUSION, FACE, RUNNER

POOL_DEPLOYMENTS = {Pool.FACE: FACE, Pool.DIFFUSION: DIFFUSION, Pool.RUNNER: RUNNER}


def tuned_config(deployed: dict[str, Any], pool: str, changes: dict[str, Any]) -> dict[str, Any]:
    """A copy of a deployed app config (ServeApplicationSchema as a dict) with ``changes``
    applied to ``pool``'s user_config; raises ValueError naming a bad pool or value."""
    if pool not in POOL_DEPLOYMENTS:
        raise ValueError(f"pool {pool!r} is unknown; use one of {', '.join(POOL_DEPLOYMENTS)}")
    config = copy.deepcopy(deployed)
    name = POOL_DEPLOYMENTS[pool]
    entry = next((d for d in config.get("deployments", []) if d.get("name") == name), None)
    if entry is None or entry.get("user_config") is None:
        raise ValueError(f"the deployed config has no user_config for {name}; deploy it from "
                         "a config made by `ephemera deploy-config`")
    merged = {**entry["user_config"], **changes}
    if pool == "runner":
        keys = BatchingConfig().runner_user_config().keys()
        BatchingConfig.model_validate(merged)  # bounds of max_attempts / stage_timeout_s
        entry["user_config"] = {k: merged[k] for k in keys}
    else:
        batching = StageBatchConfig.model_validate(merged)
        _check_with_the_rest(config.get("args") or {}, pool, batching)
        entry["user_config"] = batching.model_dump()
        entry["max_ongoing_requests"] = batching.max_ongoing_requests
    return config


def _check_with_the_rest(args: dict[str, Any], pool: str, batching: StageBatchConfig) -> None:
    """The tuned pool against the settings the app runs with: a max_batch_cost below the
    largest job or one video chunk would leave those jobs unrunnable, so it is refused
    here as `ephemera` refuses it at start. Raises ValueError with the settings' reason."""
    if "settings" in args:
        settings = Settings.model_validate(args["settings"])
    elif "config_dir" in args:
        settings = load_settings(resolve_path(str(args["config_dir"])))
    else:
        return  # an app deployed without our args: only the pool's own bounds are known
    tuned = settings.batching.model_copy(update={pool: batching})
    try:
        Settings.model_validate({**settings.model_dump(), "batching": tuned.model_dump()})
    except ValidationError as exc:
        reasons = "; ".join(str(e.get("msg", "")) for e in exc.errors())
        raise ValueError(f"refused, the service could no longer run every job: {reasons}") from None


def deployed_app_config(app_name: str = APP_NAME) -> tuple[dict[str, Any], dict[str, Any]]:
    """The running app's config and the instance's http_options/proxy_location (needs Ray)."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    app = details.get("applications", {}).get(app_name)
    if not app or not app.get("deployed_app_config"):
        raise ValueError(f"no app {app_name!r} deployed from a config is running here")
    instance = {"http_options": details.get("http_options") or {},
                "proxy_location": details.get("proxy_location") or "EveryNode"}
    return app["deployed_app_config"], instance


def retune(pool: str, changes: dict[str, Any], app_name: str = APP_NAME,
           timeout_s: float = 120.0) -> dict[str, Any]:
    """Apply ``changes`` to ``pool`` on the running service and return the new user_config
    once every replica runs with it (Serve applies a deploy asynchronously: the app reads
    DEPLOYING from the moment the config is accepted until the replicas are reconfigured)."""
    from serve.launcher import deploy_config, wait_app_running

    deployed, instance = deployed_app_config(app_name)
    config = tuned_config(deployed, pool, changes)
    http = {k: v for k, v in instance["http_options"].items() if k in ("host", "port")}
    deploy_config({"proxy_location": instance["proxy_location"], "http_options": http,
                   "applications": [config]})
    wait_app_running(timeout_s, app_name)
    name = POOL_DEPLOYMENTS[pool]
    return next(d for d in config["deployments"] if d["name"] == name)["user_config"]


def service_status(app_name: str = APP_NAME) -> dict[str, dict[str, Any]]:
    """Replicas per deployment and the batching each pool runs with (needs Ray)."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None:
        raise ValueError(f"no app {app_name!r} is running here")
    deployed, _ = deployed_app_config(app_name)
    configs = {d["name"]: d for d in deployed.get("deployments", [])}
    return {name: {"status": str(dep.status),
                   "replicas": dict(dep.replica_states),
                   "user_config": configs.get(name, {}).get("user_config")}
            for name, dep in app.deployments.items()}
