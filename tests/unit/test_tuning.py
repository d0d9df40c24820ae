"""Live tuning: the config change `ephemera tune` deploys, and the live concurrency gate
inside a GPU replica's batch function. No Ray cluster is started."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml

from actors.common import LiveLimit
from serve.tuning import tuned_config

ROOT = Path(__file__).resolve().parents[2]


def deployed() -> dict:
    return yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())["applications"][0]


def entry(config: dict, name: str) -> dict:
    return next(d for d in config["deployments"] if d["name"] == name)


def test_tune_changes_only_the_pools_user_config_and_its_ongoing_limit():
    before = deployed()
    after = tuned_config(before, "diffusion", {"max_batch_cost": 16, "max_concurrent_batches": 2})

    diffusion = entry(after, "DiffusionDeployment")
    assert diffusion["user_config"]["max_batch_cost"] == 16
    assert diffusion["user_config"]["max_concurrent_batches"] == 2
    assert diffusion["max_ongoing_requests"] == 16 * 3  # running batches + one forming
    # Everything else is untouched, so Serve sees a lightweight update only.
    assert entry(after, "FaceDeployment") == entry(before, "FaceDeployment")
    assert {k: v for k, v in diffusion.items() if k not in ("user_config", "max_ongoing_requests")} \
        == {k: v for k, v in entry(before, "DiffusionDeployment").items()
            if k not in ("user_config", "max_ongoing_requests")}
    assert after["import_path"] == before["import_path"] and after["args"] == before["args"]
    assert entry(before, "DiffusionDeployment")["user_config"]["max_batch_cost"] == 8  # a copy


def test_tune_of_the_runner_changes_its_retry_policy():
    after = tuned_config(deployed(), "runner", {"max_attempts": 5})
    assert entry(after, "JobRunnerDeployment")["user_config"]["max_attempts"] == 5


@pytest.mark.parametrize(("pool", "changes", "message"), [
    ("gpu", {"max_batch_cost": 2}, "pool 'gpu' is unknown"),
    ("face", {"max_batch_cost": 0}, "max_batch_cost"),
    ("face", {"max_batch_size": 4}, "max_batch_size"),
    ("runner", {"max_attempts": 99}, "max_attempts"),
])
def test_a_bad_tune_is_refused_naming_the_problem(pool, changes, message):
    with pytest.raises(ValueError, match=message):
        tuned_config(deployed(), pool, changes)


def test_live_limit_follows_its_new_size_while_held():
    async def scenario() -> list[int]:
        gate = LiveLimit(1)
        running: list[int] = []
        peak: list[int] = []

        async def work() -> None:
            async with gate:
                running.append(1)
                peak.append(len(running))
                await asyncio.sleep(0.01)
                running.pop()

        first = asyncio.gather(*(work() for _ in range(4)))
        await first
        await gate.set_limit(3)
        await asyncio.gather(*(work() for _ in range(6)))
        return peak

    peak = asyncio.run(scenario())
    assert max(peak[:4]) == 1 and max(peak[4:]) == 3
