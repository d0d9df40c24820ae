"""`ephemera status` against a Ray cluster that runs token authentication, as a cluster
started with RAY_AUTH_MODE=token does: the token in the environment is enough (the head
node's secrets carry RAY_AUTH_TOKEN, not the mode), and without it the CLI says how to
give it. The cluster is a private local one (address="local"), so no other Ray on this
machine is joined by accident."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from ray import serve

pytestmark = pytest.mark.deploy
ROOT = Path(__file__).resolve().parents[2]
CLUSTER_TOKEN = "ephemera-test-ray-token-0123456789abcdef"

# Starts a token-auth cluster with a one-deployment app named like ours, deployed from a
# config (as `serve deploy` does), prints the GCS address and lives until stdin closes.
HEAD = """
import sys
import ray
from ray.serve.context import _get_global_client
from ray.serve.schema import ServeDeploySchema
from serve.launcher import wait_app_running

ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
from ray import serve
serve.start(http_options={"host": "127.0.0.1", "port": 0})
_get_global_client().deploy_apps(ServeDeploySchema.model_validate({"applications": [{
    "name": "ephemera", "route_prefix": "/", "import_path":
    "tests.integration.test_cli_token_auth:echo_app", "deployments": [
        {"name": "Echo", "num_replicas": 1, "user_config": {"max_wait_ms": 7.0},
         "ray_actor_options": {"num_cpus": 0}}]}]}))
wait_app_running(120)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()
serve.shutdown()
ray.shutdown()
"""


@serve.deployment
class Echo:
    def reconfigure(self, config: dict) -> None:
        self.config = config

    def __call__(self, request) -> str:
        return "ok"


def echo_app(args: dict):
    return Echo.bind()


def clean_env(tmp_path: Path) -> dict[str, str]:
    """No Ray auth settings, a home without ~/.ray/auth_token, the repo importable."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_AUTH_", "RAY_ADDRESS"))}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {**env, "HOME": str(home), "PYTHONPATH": str(ROOT)}


def test_status_joins_a_token_cluster_with_the_token_from_the_environment(tmp_path):
    env = clean_env(tmp_path)
    head = subprocess.Popen(
        [sys.executable, "-c", HEAD], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True,
        env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": CLUSTER_TOKEN})
    try:
        address = head.stdout.readline().strip()
        assert address, "the token cluster did not start"

        def status(**extra: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [sys.executable, "-m", "serve.cli", "status", "--address", address], cwd=ROOT,
                env={**env, "RAY_gcs_rpc_server_connect_timeout_s": "5", **extra},
                capture_output=True, text=True, timeout=120)

        joined = status(RAY_AUTH_TOKEN=CLUSTER_TOKEN)  # the mode is left to the CLI
        assert joined.returncode == 0, joined.stderr[-2000:]
        assert "Echo" in joined.stdout and "max_wait_ms" in joined.stdout
        refused = status()  # no token anywhere: the cluster refuses, the CLI says why
        assert refused.returncode == 2
        assert "RAY_AUTH_MODE=disabled" in refused.stderr and "RAY_AUTH_TOKEN" in refused.stderr
    finally:
        head.stdin.close()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
