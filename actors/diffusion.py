"""Diffusion actor pool: SD-architecture generation + the output stage, one batch per call."""

from __future__ import annotations

from ray import serve

from actors.common import open_backends, pin_torch_threads
from pipeline.config import Settings, resolve_path
from pipeline.records import StageResult, WorkItem


@serve.deployment(max_ongoing_requests=2)
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
        self.generator = load_generator(
            resolve_path(settings.models.diffusion_model_dir),
            select_runtime(settings.models),
            build_tiny_if_missing=settings.models.build_tiny_if_missing,
        )

    def run_batch(self, items: list[WorkItem]) -> list[StageResult]:
        from pipeline.stages import diffusion_stage, run_isolating_failures

        return run_isolating_failures(
            lambda batch: diffusion_stage(batch, self.stores, self.jobs, self.generator,
                                          self.settings), items)
