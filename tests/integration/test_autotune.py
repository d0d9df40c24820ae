"""`ephemera tune diffusion --auto` on the running service: a tiny sweep end to end (real
jobs over HTTP, each setting applied live), the best setting applied, and a target no
setting meets leaves the pool as it was."""

from __future__ import annotations

import json

import pytest

from serve.cli import main as cli
from serve.tuning import retune, service_status
from tests.integration.conftest import API_TOKEN_ENV

pytestmark = pytest.mark.integration


def test_auto_tune_measures_each_setting_live_and_applies_the_best(service, tmp_path):
    out = tmp_path / "sweep.json"
    common = ["tune", "diffusion", "--auto", "--costs", "8", "--offered-rps", "4",
              "--token-env", API_TOKEN_ENV]
    try:
        assert cli([*common, "--waits-ms", "20,1500", "--jobs", "4", "--p95-target-s", "300",
                    "--out", str(out)]) == 0
        sweep = json.loads(out.read_text())
        results = sweep["results"]
        assert [r["setting"]["max_wait_ms"] for r in results] == [20.0, 1500.0]
        assert all(r["succeeded"] == 4 and r["failed"] == 0 for r in results), results
        assert all(r["throughput_jobs_s"] > 0 and r["p95_s"] >= r["p50_s"] > 0 for r in results)
        best = max(results, key=lambda r: (round(r["throughput_jobs_s"], 6), -r["p95_s"]))
        assert sweep["chosen"] == best["setting"]
        running = service_status()["DiffusionDeployment"]["user_config"]
        assert running["max_wait_ms"] == best["setting"]["max_wait_ms"]
        assert out.with_suffix(".png").stat().st_size > 0

        retune("diffusion", {"max_batch_cost": 8, "max_wait_ms": 400})
        assert cli([*common, "--waits-ms", "30", "--jobs", "2", "--p95-target-s", "0.001"]) == 1
        running = service_status()["DiffusionDeployment"]["user_config"]
        assert (running["max_batch_cost"], running["max_wait_ms"]) == (8, 400.0)
    finally:
        retune("diffusion", {"max_batch_cost": 8, "max_wait_ms": 400})
