"""Face pool: MTCNN detection, ArcFace alignment and embedding, batched by Serve."""

from __future__ import annotations

from ray import serve

from actors.common import GpuPool
from pipeline.core.config import Settings
from pipeline.core.records import Stage, StageResult, WorkItem


@serve.deployment
class FaceDeployment(GpuPool):
    stage = Stage.FACE

    def load(self, settings: Settings) -> None:
        from pipeline.models.loading import face_quality, open_face_models

        self.detector, self.embedder = open_face_models(settings)
        self.quality = face_quality(settings.models)

    def run_stage(self, items: list[WorkItem]) -> list[StageResult]:
        from pipeline.jobs.stages import face_stage, run_isolating_failures

        return run_isolating_failures(
            lambda batch: face_stage(batch, self.stores, self.jobs, self.detector,
                                     self.embedder, self.settings.retention, self.quality),
            items)
