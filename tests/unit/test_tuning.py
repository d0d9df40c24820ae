"""Live tuning: the config change `ephemera tune` deploys, and the live concurrency gate
inside a GPU replica's batch function. No Ray cluster is started."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import yaml

from actors.common import BatchRunner
from pipeline.core.config import StageBatchConfig
from pipeline.core.records import StageResult
from serve.tuning import tuned_config
from tests.unit.factories import make_item

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
    # Valid for the pool alone, but a 4-photo job (service.yaml) could then never run.
    ("face", {"max_batch_cost": 3}, "could no longer run every job.*largest job"),
    ("diffusion", {"max_batch_cost": 1}, "could no longer run every job"),
])
def test_a_bad_tune_is_refused_naming_the_problem(pool, changes, message):
    with pytest.raises(ValueError, match=message):
        tuned_config(deployed(), pool, changes)


def test_batches_waiting_while_the_model_is_busy_are_merged_into_one_call():
    """Serve closes small batches while a model call runs; the next call takes them all."""
    calls: list[list[str]] = []

    def model(items):
        calls.append([it.job_id for it in items])
        time.sleep(0.05)
        return [StageResult(it.job_id, ok=True) for it in items]

    async def scenario() -> list[list[StageResult]]:
        runner = BatchRunner(model, StageBatchConfig(max_batch_cost=8, max_concurrent_batches=1))
        first = asyncio.ensure_future(runner.submit("k", [make_item("a")]))
        await asyncio.sleep(0.01)  # the first call is running now
        rest = [asyncio.ensure_future(runner.submit("k", [make_item(j)])) for j in "bcd"]
        return [await first, *[await r for r in rest]]

    results = asyncio.run(scenario())
    assert calls == [["a"], ["b", "c", "d"]]
    assert [[r.job_id for r in rs] for rs in results] == [["a"], ["b"], ["c"], ["d"]]


def test_live_concurrency_and_cost_limits_follow_reconfigure():
    running, peak = [0], [0]

    def model(items):
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        running[0] -= 1
        return [StageResult(it.job_id, ok=True) for it in items]

    async def scenario(runner: BatchRunner, n: int) -> None:
        await asyncio.gather(*(runner.submit(f"key{i}", [make_item(f"j{i}")]) for i in range(n)))

    runner = BatchRunner(model, StageBatchConfig(max_batch_cost=1, max_concurrent_batches=1))
    asyncio.run(scenario(runner, 4))
    assert peak[0] == 1
    runner.reconfigure(StageBatchConfig(max_batch_cost=1, max_concurrent_batches=3))
    asyncio.run(scenario(runner, 6))
    assert peak[0] == 3


def test_a_failed_model_call_fails_every_batch_it_merged():
    def model(items):
        raise RuntimeError("CUDA error")

    async def scenario():
        runner = BatchRunner(model, StageBatchConfig())
        return await asyncio.gather(runner.submit("k", [make_item("a")]),
                                    return_exceptions=True)

    assert isinstance(asyncio.run(scenario())[0], RuntimeError)


def test_an_abandoned_attempt_batched_with_its_retry_runs_once():
    """Serve may batch a timed-out attempt with its retry: the model sees the job once and
    the old attempt is answered 'superseded' (no second set of outputs)."""
    seen: list[list[tuple[str, int]]] = []

    def model(items):
        seen.append([(it.job_id, it.attempts) for it in items])
        return [StageResult(it.job_id, ok=True, output_ids=("o1",)) for it in items]

    async def scenario():
        runner = BatchRunner(model, StageBatchConfig())
        return await runner.submit("k", [make_item("a", attempts=0), make_item("a", attempts=1)])

    old, new = asyncio.run(scenario())
    assert seen == [[("a", 1)]]
    assert (new.ok, new.output_ids) == (True, ("o1",))
    assert (old.ok, old.output_ids) == (False, ()) and "newer attempt" in old.reason


def test_replicas_change_only_where_autoscaling_is_off():
    """`tune --auto --replicas`: a fixed pool gets the count; an autoscaling one refuses."""
    before = deployed()
    with pytest.raises(ValueError, match="autoscales"):
        tuned_config(before, "diffusion", {"num_replicas": 2})
    fixed = entry(before, "DiffusionDeployment")
    del fixed["autoscaling_config"]
    fixed["num_replicas"] = 1
    after = tuned_config(before, "diffusion", {"num_replicas": 3, "max_wait_ms": 50})
    assert entry(after, "DiffusionDeployment")["num_replicas"] == 3
    assert entry(after, "DiffusionDeployment")["user_config"]["max_wait_ms"] == 50
    assert "num_replicas" not in entry(after, "DiffusionDeployment")["user_config"]
    with pytest.raises(ValueError, match="at least 1"):
        tuned_config(before, "diffusion", {"num_replicas": 0})
