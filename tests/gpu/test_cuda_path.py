"""The GPU path: same code, selected by config. Skipped unless a CUDA GPU is present."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_tiny_models_run_in_fp16_on_cuda_with_the_selected_attention(tmp_path):
    from pipeline.config import ModelsConfig
    from pipeline.diffusion import GenerationParams, build_tiny_models, load_generator
    from pipeline.runtime import select_runtime

    build_tiny_models(tmp_path / "m")
    runtime = select_runtime(ModelsConfig(device="auto", dtype="auto", attention="auto"))
    assert runtime.device == "cuda" and runtime.dtype == torch.float16
    generator = load_generator(tmp_path / "m", runtime, build_tiny_if_missing=False)
    params = GenerationParams(prompt="a watercolor painting", resolution_px=64,
                              num_inference_steps=4, guidance_scale=1.0)
    embeddings = np.random.default_rng(0).normal(size=(4, 512)).astype(np.float32)
    images = generator.ai_photos(embeddings, params, seeds=[0, 1, 2, 3])
    assert images.shape == (4, 64, 64, 3) and images.dtype == np.uint8
    assert images.std() > 0  # not a blank (NaN-clipped) fp16 output


def test_face_detector_runs_on_cuda():
    import skimage.data

    from pipeline.config import ModelsConfig
    from pipeline.faces import MtcnnDetector
    from pipeline.runtime import select_runtime

    detector = MtcnnDetector(select_runtime(ModelsConfig()), min_probability=0.9)
    crops = detector.detect([skimage.data.astronaut(), skimage.data.chelsea()])
    assert crops[0] is not None and crops[1] is None


def test_compiled_channels_last_unet_runs_on_cuda(tmp_path):
    """The optional GPU paths: torch.compile and channels-last, both by config."""
    from pipeline.config import ModelsConfig
    from pipeline.diffusion import GenerationParams, build_tiny_models, load_generator
    from pipeline.runtime import select_runtime

    build_tiny_models(tmp_path / "m")
    runtime = select_runtime(ModelsConfig(channels_last=True, torch_compile=True))
    assert runtime.compile and runtime.channels_last
    generator = load_generator(tmp_path / "m", runtime, build_tiny_if_missing=False)
    params = GenerationParams(prompt="a watercolor painting", resolution_px=64,
                              num_inference_steps=2, guidance_scale=1.0)
    embeddings = np.random.default_rng(0).normal(size=(2, 512)).astype(np.float32)
    images = generator.ai_photos(embeddings, params, seeds=[0, 1])
    assert images.shape == (2, 64, 64, 3) and images.std() > 0
