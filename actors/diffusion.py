"""Diffusion pool: SD-architecture generation + the output stage, batched by Serve."""

from __future__ import annotations

from ray import serve

from actors.common import GpuPool
from pipeline.core.config import Settings
from pipeline.core.records import Stage, StageResult, WorkItem


@serve.deployment
class DiffusionDeployment(GpuPool):
    stage = Stage.DIFFUSION

    def load(self, settings: Settings) -> None:
        from pipeline.models.loading import open_pool_generator

        self.generator = open_pool_generator(settings)

    def run_stage(self, items: list[WorkItem]) -> list[StageResult]:
        from pipeline.jobs.stages import diffusion_stage, run_isolating_failures

        return run_isolating_failures(
            lambda batch: diffusion_stage(batch, self.stores, self.jobs, self.generator,
                                          self.settings), items)
