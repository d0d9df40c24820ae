"""What a GPU replica loads, from settings: every model location resolved through the model
store (a verified local copy), tiny random-weight models built where allowed and absent,
placed on the device models.yaml selects. The actors, benchmarks and tests all load here.

This is the one place in production code that may build tiny models (``load_generator``,
``load_embedder``): only when models.yaml sets ``build_tiny_if_missing`` and the configured
weights are absent, never otherwise (the production config sets it false).
``pipeline.models.tiny`` is imported lazily there, and by nothing else in pipeline/models."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.config import MODEL_PINS, ModelsConfig, Settings
from pipeline.core.errors import ModelError
from pipeline.models.faces import FaceQuality
from pipeline.models.model_store import resolve_model
from pipeline.models.runtime import Runtime, select_runtime

if TYPE_CHECKING:  # face replicas never import diffusers, diffusion replicas never MTCNN
    from pipeline.models.diffusion import DiffusionGenerator
    from pipeline.models.faces import ArcFaceEmbedder, MtcnnDetector
    from pipeline.models.simulated import SimulatedGenerator


class Model(StrEnum):
    """The models a replica may need; each is one models.yaml location + sha256 pin."""

    DIFFUSION = "diffusion_model_dir"
    IP_ADAPTER = "ip_adapter_weights"
    MOTION_ADAPTER = "motion_adapter_dir"
    FACE_EMBEDDER = "face_embedder_weights"


def model_path(settings: Settings, model: Model) -> Path:
    """The local, verified path of one model (downloads what the node's cache lacks)."""
    models = settings.models
    return resolve_model(getattr(models, model.value), sha256=getattr(models, MODEL_PINS[model]),
                         cache_dir=models.model_cache_dir, storage=settings.storage,
                         setting=model.value)


def face_quality(models: ModelsConfig) -> FaceQuality:
    return FaceQuality(min_eye_distance_px=models.face_min_eye_distance_px,
                       min_sharpness=models.face_min_sharpness)


def load_embedder(path: Path, runtime: Runtime, *, build_tiny_if_missing: bool,
                  num_threads: int = 1) -> ArcFaceEmbedder:
    from pipeline.models.faces import ArcFaceEmbedder

    # The tiny-model decision: no embedder at ``path`` and tiny models allowed ->
    # a random-weight ArcFace-format graph (embedded default, demo, tests).
    if not path.is_file() and build_tiny_if_missing:
        from pipeline.models.tiny import build_tiny_arcface

        build_tiny_arcface(path)
    return ArcFaceEmbedder(path, runtime, num_threads=num_threads)


def load_generator(model_dir: Path, runtime: Runtime, *, ip_adapter: Path,
                   build_tiny_if_missing: bool,
                   motion_adapter: Path | None = None) -> DiffusionGenerator:
    """Load from ``model_dir`` and ``ip_adapter``; build tiny random weights there first if
    allowed and absent."""
    from pipeline.models.diffusion import DiffusionGenerator

    # The tiny-model decision: each absent model is built tiny (random weights) only when
    # models.yaml allows it; otherwise an absent pipeline or motion adapter is refused here
    # and an absent adapter file by DiffusionGenerator.
    if not (model_dir / "model_index.json").is_file():
        if not build_tiny_if_missing:
            raise ModelError(
                f"diffusion_model_dir {model_dir} holds no model_index.json; point it at a "
                "save_pretrained directory or set build_tiny_if_missing: true"
            )
        from pipeline.models.tiny import build_tiny_models

        build_tiny_models(model_dir)
    if not ip_adapter.is_file() and build_tiny_if_missing:
        from pipeline.models.tiny import build_tiny_ip_adapter

        build_tiny_ip_adapter(model_dir, ip_adapter)
    if motion_adapter is not None and not (motion_adapter / "config.json").is_file():
        if not build_tiny_if_missing:
            raise ModelError(f"motion_adapter_dir {motion_adapter} holds no config.json; point "
                             "it at a MotionAdapter save_pretrained folder")
        from pipeline.models.tiny import build_tiny_motion_adapter

        build_tiny_motion_adapter(motion_adapter)
    return DiffusionGenerator(model_dir, runtime, ip_adapter=ip_adapter,
                              motion_adapter=motion_adapter)


def open_face_models(settings: Settings, runtime: Runtime | None = None
                     ) -> tuple[MtcnnDetector, ArcFaceEmbedder]:
    from pipeline.models.faces import MtcnnDetector

    models = settings.models
    runtime = runtime or select_runtime(models)
    detector = MtcnnDetector(runtime, min_probability=models.face_min_probability,
                             canvas_px=models.face_detect_canvas_px)
    embedder = load_embedder(model_path(settings, Model.FACE_EMBEDDER), runtime,
                             build_tiny_if_missing=models.build_tiny_if_missing,
                             num_threads=models.torch_num_threads)
    return detector, embedder


def open_generator(settings: Settings, runtime: Runtime | None = None) -> DiffusionGenerator:
    return load_generator(model_path(settings, Model.DIFFUSION),
                          runtime or select_runtime(settings.models),
                          ip_adapter=model_path(settings, Model.IP_ADAPTER),
                          motion_adapter=model_path(settings, Model.MOTION_ADAPTER),
                          build_tiny_if_missing=settings.models.build_tiny_if_missing)


def open_pool_generator(settings: Settings) -> DiffusionGenerator | SimulatedGenerator:
    """What a diffusion worker generates with (the Serve pool's replicas and the offline
    evaluation's actors alike): the configured models, or, where models.yaml selects the
    simulated backend (benchmarks only), the GPU stand-in. Progress bars off: a worker
    has no terminal."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    if settings.models.diffusion_backend == "simulated":
        from pipeline.models.simulated import SimulatedGenerator

        return SimulatedGenerator(settings.models.simulated,
                                  reference_resolution_px=settings.batching.reference_resolution_px)
    return open_generator(settings)
