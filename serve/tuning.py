"""Live tuning and status of a running service, through Serve's own config path.

``retune`` reads the config Serve deployed, changes one pool's batching (its
``user_config``, plus the ``max_ongoing_requests`` derived from it) and deploys it again:
Serve sees only lightweight changes and calls ``reconfigure()`` on the running replicas,
so no replica restarts and no job is lost. ``serve deploy`` of an edited config file does
the same thing. ``tune_file`` makes the same change in the file the cluster is deployed
from (a Serve config or a RayService manifest) and in its batching.yaml, so the next
deploy keeps the tune instead of reverting it.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline.core.config import (
    UNPINNED_OK,
    BatchingConfig,
    Settings,
    StageBatchConfig,
    load_settings,
    resolve_path,
)
from pipeline.core.records import Pool
from serve.app import APP_NAME, DIFFUSION, FACE, RUNNER
from serve.config_file import (
    FileEdit,
    changed_values,
    check_parses_to,
    edit_deployment,
    edit_mapping,
    read_deployed,
    replace_app,
    with_serve_config,
)

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
    replicas = changes.get("num_replicas")
    changes = {k: v for k, v in changes.items() if k != "num_replicas"}
    if replicas is not None:
        if entry.get("autoscaling_config"):
            raise ValueError(f"{name} autoscales: Serve chooses its replicas; give replicas "
                             "only for a pool with autoscaling off (deployments.yaml)")
        if int(replicas) < 1:
            raise ValueError("num_replicas must be at least 1")
        entry["num_replicas"] = int(replicas)
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


@dataclass(frozen=True, slots=True)
class TunedFiles:
    """What ``tune_file`` would write: the files that change, notes for the operator, and
    the pool's user_config as the file will have it."""

    edits: list[FileEdit]
    notes: list[str]
    user_config: dict[str, Any]


def tune_file(path: Path, pool: str, changes: dict[str, Any], *, shown: str | None = None,
              app_name: str = APP_NAME) -> TunedFiles:
    """The edits that carry ``changes`` into the file a cluster is deployed from.

    ``path`` is a Serve config (``serve deploy``) or a KubeRay RayService manifest (its
    ``spec.serveConfigV2``); its app gets exactly the change ``tuned_config`` makes (the
    pool's user_config and derived max_ongoing_requests). The ``batching.yaml`` of the
    config set the app deploys (``args.config_dir``) gets the changed values too, so
    ``ephemera deploy-config`` regenerates the same file instead of reverting the tune.
    Only the changed values' lines change (comments and layout stay: serve/config_file.py);
    returns only the files that change. Raises ValueError naming a bad value or a file it
    cannot edit; nothing is written here.
    """
    where = shown or str(path)
    text = path.read_text()
    doc, serve_config, ray_service = read_deployed(text, where)
    app = next((a for a in serve_config["applications"] if a.get("name") == app_name), None)
    if app is None:
        raise ValueError(f"{where} has no application named {app_name!r}")
    tuned = tuned_config(app, pool, changes)
    name = POOL_DEPLOYMENTS[pool]
    values = changed_values(_entry(app, name), _entry(tuned, name))
    after = edit_deployment(text, app_name, name, values, where, ray_service=ray_service)
    check_parses_to(after, with_serve_config(doc, replace_app(serve_config, tuned), ray_service),
                    where, ray_service=ray_service)
    edits = [FileEdit(path, where, text, after)]
    notes = []
    config_dir = (app.get("args") or {}).get("config_dir")
    batching = resolve_path(str(config_dir)) / "batching.yaml" if config_dir else None
    if "num_replicas" in changes:
        notes.append(f"{name} now runs {changes['num_replicas']} replicas in {where}; set "
                     f"deployments.yaml {pool}.num_replicas to match, or `ephemera "
                     "deploy-config` will make the old count again")
    batch_changes = {k: v for k, v in changes.items() if k != "num_replicas"}
    if batching is not None and batching.is_file():
        edits.append(_batching_edit(batching, pool, batch_changes))
    else:
        notes.append(f"{where} names no config set here ({config_dir!r}), so no batching.yaml "
                     "was changed: change it by hand, or `ephemera deploy-config` will make "
                     "the old values again")
    return TunedFiles([e for e in edits if e.changed], notes, _entry(tuned, name)["user_config"])


def _batching_edit(path: Path, pool: str, changes: dict[str, Any]) -> FileEdit:
    """batching.yaml with ``changes`` in the pool's section (the runner's are top-level)."""
    shown = os.path.relpath(path) if not os.path.relpath(path).startswith("..") else str(path)
    text = path.read_text()
    current = yaml.safe_load(text) or {}
    values: dict[str, Any] = changes if pool == Pool.RUNNER else {pool: changes}
    values = changed_values(current, values)
    after = edit_mapping(text, values, shown)
    expected = copy.deepcopy(current)
    for key, value in values.items():
        expected[key] = {**expected.get(key, {}), **value} if isinstance(value, dict) else value
    check_parses_to(after, expected, shown)
    return FileEdit(path, shown, text, after)


def _entry(config: dict[str, Any], name: str) -> dict[str, Any]:
    return next(d for d in config["deployments"] if d.get("name") == name)


def _check_with_the_rest(args: dict[str, Any], pool: str, batching: StageBatchConfig) -> None:
    """The tuned pool against the settings the app runs with: a max_batch_cost below the
    largest job or one video chunk would leave those jobs unrunnable, so it is refused
    here as `ephemera` refuses it at start. Raises ValueError with the settings' reason."""
    # Batching against the rest; the model pins are checked where the service starts.
    if "settings" in args:
        settings = Settings.model_validate(args["settings"], context=UNPINNED_OK)
    elif "config_dir" in args:
        settings = load_settings(resolve_path(str(args["config_dir"])), require_pins=False)
    else:
        return  # an app deployed without our args: only the pool's own bounds are known
    tuned = settings.batching.model_copy(update={pool: batching})
    try:
        Settings.model_validate({**settings.model_dump(), "batching": tuned.model_dump()},
                                context=UNPINNED_OK)
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
