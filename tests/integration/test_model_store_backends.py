"""The model store on real protocol servers: a tiny diffusion pipeline, an IP-Adapter-FaceID
file and an ArcFace ONNX embedder staged to S3 (SeaweedFS) and to GCS (the emulator),
fetched and verified by a node, then loaded exactly as the GPU pools load them
(pipeline.models.loading)."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from skimage import data

from pipeline.core.config import GcsConfig, ModelsConfig, S3Config, StorageConfig, load_settings
from pipeline.core.records import FaceBatch
from pipeline.models.diffusion import GenerationParams
from pipeline.models.faces import embed_faces
from pipeline.models.loading import open_face_models, open_generator
from pipeline.models.model_store import ModelStoreError, stage_model
from pipeline.models.tiny import (
    build_tiny_arcface,
    build_tiny_ip_adapter,
    build_tiny_models,
    build_tiny_motion_adapter,
)
from tests.integration.object_servers import make_gcs_bucket, make_s3_bucket

pytestmark = [pytest.mark.storage, pytest.mark.models]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    build_tiny_models(root / "tiny-sd")
    build_tiny_ip_adapter(root / "tiny-sd", root / "ip-adapter-faceid.safetensors")
    build_tiny_arcface(root / "arcface.onnx")
    build_tiny_motion_adapter(root / "motion-adapter")
    return root


def _storage(request, seaweed, gcs_emulator) -> tuple[StorageConfig, str]:
    bucket = f"models-{uuid.uuid4().hex[:8]}"
    if request.param == "s3":
        make_s3_bucket(seaweed.client(), bucket, lifecycle=False)
        s3 = S3Config(bucket=bucket, region="us-east-1", endpoint_url=seaweed.endpoint,
                      output_encryption="none", max_attempts=2)
        return StorageConfig(outputs="s3", s3=s3), f"s3://{bucket}"
    make_gcs_bucket(gcs_emulator.client(), bucket, compliant=False)
    gcs = GcsConfig(project="ephemera-test", endpoint_url=gcs_emulator.endpoint,
                    buckets={"us-central1": bucket}, fallback_region="us-central1",
                    max_attempts=2)
    return StorageConfig(inputs="gcs", gcs=gcs), f"gs://{bucket}"


@pytest.fixture(params=["s3", "gcs"])
def store_location(request, seaweed, gcs_emulator):
    return _storage(request, seaweed, gcs_emulator)


def test_every_model_is_staged_fetched_verified_and_loaded(store_location, tiny_models,
                                                           tmp_path):
    storage, root = store_location
    pins = {
        name: stage_model(tiny_models / src, f"{root}/{name}", storage).sha256
        for name, src in (("sd15", "tiny-sd"), ("faceid", "ip-adapter-faceid.safetensors"),
                          ("arcface", "arcface.onnx"), ("motion", "motion-adapter"))
    }
    models = ModelsConfig(
        device="cpu", diffusion_model_dir=f"{root}/sd15", diffusion_model_sha256=pins["sd15"],
        ip_adapter_weights=f"{root}/faceid", ip_adapter_sha256=pins["faceid"],
        face_embedder_weights=f"{root}/arcface", face_embedder_sha256=pins["arcface"],
        motion_adapter_dir=f"{root}/motion", motion_adapter_sha256=pins["motion"],
        model_cache_dir=str(tmp_path / "cache"), build_tiny_if_missing=False)
    settings = load_settings().model_copy(update={"models": models, "storage": storage})

    detector, embedder = open_face_models(settings)
    batch = embed_faces(FaceBatch(["j"], [data.astronaut()]), detector, embedder)
    assert batch.embeddings[0] is not None
    generator = open_generator(settings)
    [image] = generator.ai_photos(batch.embeddings[0][None], GenerationParams(
        prompt="a portrait", resolution_px=64, num_inference_steps=2, guidance_scale=1.0),
        seeds=[1])
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    cached = sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert "arcface.onnx" in cached and "ip-adapter-faceid.safetensors" in cached

    wrong = models.model_copy(update={"ip_adapter_sha256": "e" * 64,
                                      "model_cache_dir": str(tmp_path / "other")})
    with pytest.raises(ModelStoreError, match="models.yaml expects"):
        open_generator(settings.model_copy(update={"models": wrong}))
