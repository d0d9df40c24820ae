"""Diffusion pool: SD-architecture generation + the output stage, batched by Serve."""

from __future__ import annotations

import time

from ray import serve

from actors.common import (
    BatchRunner,
    apply_batching,
    open_backends,
    pin_torch_threads,
    run_unexpired,
)
from pipeline.config import MAX_CONCURRENT_BATCHES, Settings, StageBatchConfig
from pipeline.orchestration import batch_cost
from pipeline.records import Stage, StageResult, WorkItem
from serve.telemetry import observe_batch


@serve.deployment
class DiffusionDeployment:
    def __init__(self, settings: Settings) -> None:
        from diffusers.utils import logging as diffusers_logging

        from pipeline.diffusion import load_generator
        from pipeline.jobs import JobStore
        from pipeline.runtime import select_runtime

        diffusers_logging.disable_progress_bar()
        pin_torch_threads(settings)
        self.settings = settings
        client, self.stores = open_backends(settings)
        self.jobs = JobStore(client)
        if settings.models.diffusion_backend == "simulated":  # benchmarks only
            from pipeline.simulated import SimulatedGenerator

            self.generator = SimulatedGenerator(
                settings.models.simulated,
                reference_resolution_px=settings.batching.reference_resolution_px)
        else:
            from pipeline.model_store import resolve_model_dir

            models = settings.models
            self.generator = load_generator(
                resolve_model_dir(models.diffusion_model_dir, sha256=models.diffusion_model_sha256,
                                  cache_dir=models.model_cache_dir, storage=settings.storage),
                select_runtime(models),
                build_tiny_if_missing=models.build_tiny_if_missing,
            )
        self.batching = settings.batching.diffusion
        self.model_calls = BatchRunner(self._run_checked, self.batching)

    async def reconfigure(self, user_config: dict) -> None:
        """batching.yaml ``diffusion``: applied live, no restart (Serve user_config)."""
        self.batching = StageBatchConfig.model_validate(user_config)
        apply_batching(self.run, self.model_calls, self.batching)

    def check_health(self) -> None:
        """A model call stuck past the stage timeout (a hung GPU) marks the replica
        unhealthy; Serve replaces it and the runners retry its jobs elsewhere."""
        stuck_s = self.model_calls.longest_call_s(time.time())
        if stuck_s > self.settings.batching.stage_timeout_s * 2:
            raise RuntimeError(f"a model call has run for {stuck_s:.0f} s")

    @serve.multiplexed(max_num_models_per_replica=64)
    async def bucket(self, bucket_id: str) -> str:
        """Batch keys count as 'models', so Serve routes a key to replicas already batching it."""
        return bucket_id

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.1,
                 max_concurrent_batches=MAX_CONCURRENT_BATCHES, batch_size_fn=batch_cost)
    async def run(self, items: list[WorkItem]) -> list[StageResult]:
        key = serve.get_multiplexed_model_id()
        await self.bucket(key)
        return await self.model_calls.submit(key, items)

    def _run_checked(self, items: list[WorkItem]) -> list[StageResult]:
        return run_unexpired(items, self._run, self._note_batch, self.jobs.finished_among)

    def _run(self, items: list[WorkItem]) -> list[StageResult]:
        from pipeline.stages import diffusion_stage, run_isolating_failures

        return run_isolating_failures(
            lambda batch: diffusion_stage(batch, self.stores, self.jobs, self.generator,
                                          self.settings), items)

    def _note_batch(self, items: list[WorkItem]) -> None:
        observe_batch(Stage.DIFFUSION, items)
        self.jobs.note_batch([it.job_id for it in items], Stage.DIFFUSION, cost_units=batch_cost(items),
                             max_cost_units=self.batching.max_batch_cost)
