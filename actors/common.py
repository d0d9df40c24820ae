"""What every actor does once at start (pin torch threads, open Redis and the store), and
the batching shell shared by the GPU pools (``GpuPool``: the face and diffusion pools differ
only in the model they load and the stage function they call)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis
from ray import serve

from pipeline.core.config import MAX_CONCURRENT_BATCHES, Settings, StageBatchConfig
from pipeline.core.reasons import Reason
from pipeline.core.records import Stage, StageResult, WorkItem
from pipeline.jobs.orchestration import batch_cost, is_expired, merge_waiting
from pipeline.state.cluster_secret import check_process_secrets
from pipeline.state.job_store import JobStore
from pipeline.storage.base import StoreSet, open_stores
from serve.telemetry import observe_batch


def open_backends(settings: Settings) -> tuple[redis.Redis, StoreSet]:
    if settings.service.redis_url is None:
        raise ValueError("redis_url must be resolved before actors start (see serve.launcher)")
    return redis.Redis.from_url(settings.service.redis_url), open_stores(settings.storage)


def pin_torch_threads(settings: Settings) -> None:
    import torch

    torch.set_num_threads(settings.models.torch_num_threads)


@dataclass(slots=True)
class _Waiting:
    key: str
    items: list[WorkItem]
    future: asyncio.Future


class BatchRunner:
    """The model calls of one GPU replica: at most ``max_concurrent_batches`` at once, each
    merging every batch Serve handed over meanwhile (same key, up to ``max_batch_cost``).

    Why not Serve's batching alone: ``@serve.batch`` closes a batch when its wait times out,
    even while the model is busy, so under load a replica queues many small batches behind
    the running one. Merging them when the model frees up keeps batches full; Serve still
    routes, splits by key, bounds the queue and applies the first wait. Knobs change live.
    """

    def __init__(self, run: Callable[[list[WorkItem]], list[StageResult]],
                 cfg: StageBatchConfig) -> None:
        self.run = run
        self.cfg = cfg
        self.active = 0
        self.waiting: list[_Waiting] = []
        self.calls: dict[asyncio.Task, float] = {}  # running model calls -> start time

    def longest_call_s(self, now_s: float) -> float:
        """How long the oldest running model call has been running (0: none)."""
        return max((now_s - started for started in self.calls.values()), default=0.0)

    def reconfigure(self, cfg: StageBatchConfig) -> None:
        self.cfg = cfg
        self._start_ready()

    async def submit(self, key: str, items: list[WorkItem]) -> list[StageResult]:
        future = asyncio.get_running_loop().create_future()
        self.waiting.append(_Waiting(key, items, future))
        self._start_ready()
        return await future

    def _start_ready(self) -> None:
        while self.waiting and self.active < self.cfg.max_concurrent_batches:
            taken_at = merge_waiting([(w.key, batch_cost(w.items), frozenset(
                it.job_id for it in w.items)) for w in self.waiting], self.cfg.max_batch_cost)
            taken = [self.waiting[i] for i in taken_at]
            self.waiting = [w for i, w in enumerate(self.waiting) if i not in set(taken_at)]
            self.active += 1
            task = asyncio.get_running_loop().create_task(self._call(taken))
            self.calls[task] = time.time()
            task.add_done_callback(self.calls.pop)

    async def _call(self, taken: list[_Waiting]) -> None:
        items = _newest_attempts([it for w in taken for it in w.items])
        try:
            results = await asyncio.to_thread(self.run, items)
            by_attempt = {(it.job_id, it.attempts): r for it, r in zip(
                items, _in_order(items, results), strict=True)}
            for w in taken:
                if not w.future.done():
                    w.future.set_result([by_attempt.get((it.job_id, it.attempts)) or StageResult(
                        it.job_id, ok=False, reason=Reason.SUPERSEDED) for it in w.items])
        except Exception as exc:
            for w in taken:
                if not w.future.done():
                    w.future.set_exception(exc)
        finally:  # whatever happened, nobody waits forever
            for w in taken:
                if not w.future.done():
                    w.future.set_exception(RuntimeError("the model call was interrupted"))
            self.active -= 1
            self._start_ready()


def _newest_attempts(items: list[WorkItem]) -> list[WorkItem]:
    """One item per job, its newest attempt: an abandoned attempt that Serve batched with
    its retry is answered 'superseded' instead of generating twice."""
    newest: dict[str, WorkItem] = {}
    for item in items:
        if item.job_id not in newest or item.attempts > newest[item.job_id].attempts:
            newest[item.job_id] = item
    return list(newest.values())


def _in_order(items: list[WorkItem], results: list[StageResult]) -> list[StageResult]:
    by_job = {r.job_id: r for r in results}
    return [by_job[it.job_id] for it in items]


def apply_batching(batched_method, runner: BatchRunner, cfg: StageBatchConfig) -> None:
    """Set a ``@serve.batch`` method's size (cost units) and wait, and the model calls'
    merging and concurrency, from the pool's config."""
    batched_method.set_max_batch_size(cfg.max_batch_cost)
    batched_method.set_batch_wait_timeout_s(cfg.max_wait_ms / 1000.0)
    runner.reconfigure(cfg)


def run_unexpired(items: list[WorkItem], run: Callable[[list[WorkItem]], list[StageResult]],
                  on_batch: Callable[[list[WorkItem]], None],
                  ended: Callable[[list[str]], set[str]]) -> list[StageResult]:
    """Run a batch on the jobs still within their deadline and not ended meanwhile (their
    runner died, or the account was deleted); the others fail unrun, costing no GPU time."""
    now = time.time()
    gone = ended([it.job_id for it in items])
    live = [it for it in items if not is_expired(it, now) and it.job_id not in gone]
    results = {}
    if live:
        on_batch(live)
        results = {r.job_id: r for r in run(live)}
    return [results.get(it.job_id) or StageResult(
        it.job_id, ok=False, reason=Reason.ENDED if it.job_id in gone else Reason.TIMEOUT)
        for it in items]


def live_model_call(stage: Stage, jobs: JobStore,
                    run: Callable[[list[WorkItem]], list[StageResult]],
                    max_cost_units: Callable[[], int]) -> Callable[[list[WorkItem]], list[StageResult]]:
    """A GPU pool's model call as its BatchRunner runs it: expired and ended jobs are
    dropped, the batch is recorded (job status, batch size and fill, metrics), then run."""
    def note_batch(items: list[WorkItem]) -> None:
        observe_batch(stage, items)
        jobs.note_batch([it.job_id for it in items], stage, cost_units=batch_cost(items),
                        max_cost_units=max_cost_units())

    return lambda items: run_unexpired(items, run, note_batch, jobs.finished_among)


def raise_if_stuck(model_calls: BatchRunner, stage_timeout_s: float) -> None:
    """For a GPU pool's check_health: a model call stuck past twice the stage timeout (a
    hung GPU) marks the replica unhealthy; Serve replaces it and runners retry elsewhere."""
    stuck_s = model_calls.longest_call_s(time.time())
    if stuck_s > stage_timeout_s * 2:
        raise RuntimeError(f"a model call has run for {stuck_s:.0f} s")


class GpuPool:
    """A GPU pool replica: Serve batches its ``run`` calls (by cost, split by batch key),
    its BatchRunner merges and runs them, live knobs arrive through ``reconfigure``.
    Subclasses (actors/face.py, actors/diffusion.py) load their model in ``load`` and run
    one stage function in ``run_stage``; they return results and never write a job's
    status (docs/ARCHITECTURE.md, "Who writes a job").

    ``@serve.batch`` keeps one queue per decorated function in a process; each replica is
    its own process, so sharing the method between the two pools shares nothing.
    """

    stage: Stage

    def __init__(self, settings: Settings) -> None:
        pin_torch_threads(settings)
        self.settings = settings
        client, self.stores = open_backends(settings)
        check_process_secrets(settings, client)  # before the model loads, before any pseudonym
        self.jobs = JobStore(client)
        self.load(settings)
        self.batching: StageBatchConfig = getattr(settings.batching, self.stage.value)
        self.model_calls = BatchRunner(
            live_model_call(self.stage, self.jobs, self.run_stage,
                            lambda: self.batching.max_batch_cost), self.batching)

    def load(self, settings: Settings) -> None:
        """Load the pool's model(s) once."""
        raise NotImplementedError

    def run_stage(self, items: list[WorkItem]) -> list[StageResult]:
        """One model call over a merged batch (in a worker thread)."""
        raise NotImplementedError

    async def reconfigure(self, user_config: dict) -> None:
        """batching.yaml's section of this pool: applied live, no restart (user_config)."""
        self.batching = StageBatchConfig.model_validate(user_config)
        apply_batching(self.run, self.model_calls, self.batching)

    def batching_now(self) -> dict:
        """The batching this replica runs with now (its user_config as last applied), read
        only: for operators and tests checking that a live tune reached it."""
        return self.batching.model_dump()

    def check_health(self) -> None:
        raise_if_stuck(self.model_calls, self.settings.batching.stage_timeout_s)

    @serve.multiplexed(max_num_models_per_replica=64)
    async def bucket(self, bucket_id: str) -> str:
        """Batch keys count as 'models', so Serve routes a key to replicas already batching it."""
        return bucket_id

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05,
                 max_concurrent_batches=MAX_CONCURRENT_BATCHES, batch_size_fn=batch_cost)
    async def run(self, items: list[WorkItem]) -> list[StageResult]:
        key = serve.get_multiplexed_model_id()
        await self.bucket(key)
        return await self.model_calls.submit(key, items)
