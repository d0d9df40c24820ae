"""Losing a GPU machine: a real multi-node Ray cluster on this machine
(``ray.cluster_utils.Cluster``: a CPU-only head, a CPU worker and two GPU workers with the
resources of cluster.yaml's node types), token authentication on, the production config set
with local stand-ins (SeaweedFS, the GCS emulator, Redis) and its models staged and pinned,
deployed by `ephemera deploy-config` + `serve deploy` as the head node does.

The GPU worker holding the diffusion replica is killed while a batch is in flight (its
replica frozen first, so the batch provably is inside it). Every job must end, succeeded or
failed with a reason, every input must be purged, and the pools must come back on the
other GPU worker. `ephemera status` and `ephemera tune` run against the token cluster.

The scenario runs in its own process (scripts/rehearse_cluster.py --static), since one
process holds one Ray connection and this session's other tests hold theirs; the test reads
its JSON report. GPUs are declared resources only: the models run on the CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[2]
CPU_POOLS = {"ApiDeployment", "MediaDeployment", "JobRunnerDeployment", "RetentionDeployment"}
GPU_POOLS = {"FaceDeployment", "DiffusionDeployment"}


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("node-loss") / "report.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    result = subprocess.run(
        [sys.executable, "scripts/rehearse_cluster.py", "--static", "--jobs", "12",
         "--timeout-s", "300", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0 and out.exists(), \
        f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return json.loads(out.read_text())


def test_replicas_run_on_the_node_types_meant_for_them(report):
    assert set(report["placement"]) == CPU_POOLS | GPU_POOLS
    for deployment, node_types in report["placement"].items():
        expected = "gpu_worker" if deployment in GPU_POOLS else "cpu_worker"
        assert set(node_types) == {expected}, (deployment, node_types)


def test_a_gpu_node_lost_mid_batch_loses_no_job_and_keeps_no_input(report):
    assert report["nodes_killed"] == 1 and report["killed_node_type"] == "gpu_worker"
    assert "DiffusionDeployment" in report["killed_deployments"]
    assert report["in_flight_on_killed"], "the node died holding no batch"
    assert report["lost"] == 0
    assert report["succeeded"] + report["failed"] == report["jobs"] == 12
    assert all(len(reason) > 10 for reason in report["failed_reasons"])  # a real reason
    # The jobs of the lost batch were retried elsewhere (their crashed attempt counted)
    # or failed with a reason; none was left running.
    for job, (status, attempts) in report["in_flight_outcomes"].items():
        assert status == "failed" or (status == "succeeded" and attempts >= 1), (job, status)
    assert report["inputs_left"] == []


def test_the_gpu_pools_come_back_on_the_surviving_gpu_node(report):
    after = report["after_kill_placement"]
    assert set(after) == CPU_POOLS | GPU_POOLS
    assert after["DiffusionDeployment"] == ["gpu_worker"]
    assert after["FaceDeployment"] == ["gpu_worker"]


def test_status_and_tune_work_under_token_auth(report):
    assert report["status_ok"] and report["tune_ok"]
