"""Face pool: MTCNN detection, ArcFace alignment and embedding, batched by Serve (``@serve.batch``)."""

from __future__ import annotations

from ray import serve

from actors.common import (
    BatchRunner,
    apply_batching,
    live_model_call,
    open_backends,
    pin_torch_threads,
    raise_if_stuck,
)
from pipeline.core.config import MAX_CONCURRENT_BATCHES, Settings, StageBatchConfig
from pipeline.core.records import Stage, StageResult, WorkItem
from pipeline.jobs.orchestration import batch_cost


@serve.deployment
class FaceDeployment:
    def __init__(self, settings: Settings) -> None:
        from pipeline.models.loading import face_quality, open_face_models
        from pipeline.state.job_store import JobStore

        pin_torch_threads(settings)
        self.settings = settings
        client, self.stores = open_backends(settings)
        self.jobs = JobStore(client)
        self.detector, self.embedder = open_face_models(settings)
        self.quality = face_quality(settings.models)
        self.batching = settings.batching.face
        self.model_calls = BatchRunner(
            live_model_call(Stage.FACE, self.jobs, self._run, lambda: self.batching.max_batch_cost),
            self.batching)

    async def reconfigure(self, user_config: dict) -> None:
        """batching.yaml ``face``: applied live, no restart (Serve user_config)."""
        self.batching = StageBatchConfig.model_validate(user_config)
        apply_batching(self.run, self.model_calls, self.batching)

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

    def _run(self, items: list[WorkItem]) -> list[StageResult]:
        from pipeline.jobs.stages import face_stage, run_isolating_failures

        return run_isolating_failures(
            lambda batch: face_stage(batch, self.stores, self.jobs, self.detector,
                                     self.embedder, self.settings.retention, self.quality),
            items)
