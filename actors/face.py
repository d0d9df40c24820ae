"""Face actor pool: MTCNN detection + InceptionResnetV1 embedding, one batch per call."""

from __future__ import annotations

from ray import serve

from actors.common import open_backends, pin_torch_threads
from pipeline.config import Settings
from pipeline.records import StageResult, WorkItem


@serve.deployment(max_ongoing_requests=2)
class FaceDeployment:
    def __init__(self, settings: Settings) -> None:
        from pipeline.faces import FacenetEmbedder, MtcnnDetector
        from pipeline.ledger import RetentionLedger
        from pipeline.runtime import select_runtime

        pin_torch_threads(settings)
        self.settings = settings
        client, self.stores = open_backends(settings)
        self.ledger = RetentionLedger(client)
        runtime = select_runtime(settings.models)
        self.detector = MtcnnDetector(runtime, min_probability=settings.models.face_min_probability)
        self.embedder = FacenetEmbedder(runtime, weights=settings.models.face_embedder_weights,
                                        storage=settings.storage)

    def run_batch(self, items: list[WorkItem]) -> list[StageResult]:
        from pipeline.stages import face_stage, run_isolating_failures

        return run_isolating_failures(
            lambda batch: face_stage(batch, self.stores, self.ledger, self.detector,
                                     self.embedder, self.settings.retention), items)
