"""The model store on real protocol servers: a tiny diffusion pipeline staged to S3
(SeaweedFS) and to GCS (the emulator), fetched and verified by a node, then loaded with
diffusers' from_pretrained exactly as the diffusion pool does."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from pipeline.config import GcsConfig, ModelsConfig, S3Config, StorageConfig
from pipeline.diffusion import GenerationParams, build_tiny_models, load_generator
from pipeline.model_store import ModelStoreError, resolve_model_dir, stage_model
from pipeline.runtime import select_runtime
from tests.integration.object_servers import make_gcs_bucket, make_s3_bucket

pytestmark = [pytest.mark.storage, pytest.mark.models]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny-sd"
    build_tiny_models(path)
    return path


def _storage(request, seaweed, gcs_emulator) -> tuple[StorageConfig, str]:
    bucket = f"models-{uuid.uuid4().hex[:8]}"
    if request.param == "s3":
        make_s3_bucket(seaweed.client(), bucket, lifecycle=False)
        s3 = S3Config(bucket=bucket, region="us-east-1", endpoint_url=seaweed.endpoint,
                      output_encryption="none", max_attempts=2)
        return StorageConfig(outputs="s3", s3=s3), f"s3://{bucket}/sd15"
    make_gcs_bucket(gcs_emulator.client(), bucket, compliant=False)
    gcs = GcsConfig(project="ephemera-test", endpoint_url=gcs_emulator.endpoint,
                    buckets={"us-central1": bucket}, fallback_region="us-central1",
                    max_attempts=2)
    return StorageConfig(inputs="gcs", gcs=gcs), f"gs://{bucket}/sd15"


@pytest.fixture(params=["s3", "gcs"])
def store_location(request, seaweed, gcs_emulator):
    return _storage(request, seaweed, gcs_emulator)


def test_a_staged_pipeline_is_fetched_verified_and_loads(store_location, tiny_model, tmp_path):
    storage, location = store_location
    manifest = stage_model(tiny_model, location, storage)
    local = resolve_model_dir(location, sha256=manifest.sha256, cache_dir=str(tmp_path / "cache"),
                              storage=storage)
    generator = load_generator(local, select_runtime(ModelsConfig(), cuda_available=False,
                                                     xformers_installed=False),
                               build_tiny_if_missing=False)
    [image] = generator.art_styles([np.full((64, 64, 3), 120, np.uint8)],
                                   GenerationParams(prompt="a watercolor", resolution_px=64,
                                                    num_inference_steps=2, guidance_scale=1.0,
                                                    strength=1.0), seeds=[1])
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    with pytest.raises(ModelStoreError, match="models.yaml expects"):
        resolve_model_dir(location, sha256="e" * 64, cache_dir=str(tmp_path / "other"),
                          storage=storage)
