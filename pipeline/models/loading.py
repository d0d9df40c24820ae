"""What a GPU replica loads, from settings: every model location resolved through the model
store (a verified local copy), tiny random-weight models built where allowed and absent,
placed on the device models.yaml selects. The actors, benchmarks and tests all load here."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.config import ModelsConfig, Settings
from pipeline.models.faces import FaceQuality
from pipeline.models.model_store import resolve_model
from pipeline.models.runtime import Runtime, select_runtime

if TYPE_CHECKING:  # face replicas never import diffusers, diffusion replicas never MTCNN
    from pipeline.models.diffusion import DiffusionGenerator
    from pipeline.models.faces import ArcFaceEmbedder, MtcnnDetector


class Model(StrEnum):
    """The models a replica may need; each is one models.yaml location + sha256 pin."""

    DIFFUSION = "diffusion_model_dir"
    IP_ADAPTER = "ip_adapter_weights"
    MOTION_ADAPTER = "motion_adapter_dir"
    FACE_EMBEDDER = "face_embedder_weights"


_PINS = {Model.DIFFUSION: "diffusion_model_sha256", Model.IP_ADAPTER: "ip_adapter_sha256",
         Model.MOTION_ADAPTER: "motion_adapter_sha256",
         Model.FACE_EMBEDDER: "face_embedder_sha256"}


def model_path(settings: Settings, model: Model) -> Path:
    """The local, verified path of one model (downloads what the node's cache lacks)."""
    models = settings.models
    return resolve_model(getattr(models, model.value), sha256=getattr(models, _PINS[model]),
                         cache_dir=models.model_cache_dir, storage=settings.storage,
                         setting=model.value)


def face_quality(models: ModelsConfig) -> FaceQuality:
    return FaceQuality(min_eye_distance_px=models.face_min_eye_distance_px,
                       min_sharpness=models.face_min_sharpness)


def open_face_models(settings: Settings, runtime: Runtime | None = None
                     ) -> tuple[MtcnnDetector, ArcFaceEmbedder]:
    from pipeline.models.faces import MtcnnDetector, load_embedder

    models = settings.models
    runtime = runtime or select_runtime(models)
    detector = MtcnnDetector(runtime, min_probability=models.face_min_probability,
                             canvas_px=models.face_detect_canvas_px)
    embedder = load_embedder(model_path(settings, Model.FACE_EMBEDDER), runtime,
                             build_tiny_if_missing=models.build_tiny_if_missing,
                             num_threads=models.torch_num_threads)
    return detector, embedder


def open_generator(settings: Settings, runtime: Runtime | None = None) -> DiffusionGenerator:
    from pipeline.models.diffusion import load_generator

    return load_generator(model_path(settings, Model.DIFFUSION),
                          runtime or select_runtime(settings.models),
                          ip_adapter=model_path(settings, Model.IP_ADAPTER),
                          motion_adapter=model_path(settings, Model.MOTION_ADAPTER),
                          build_tiny_if_missing=settings.models.build_tiny_if_missing)
