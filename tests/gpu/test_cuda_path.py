"""The GPU path: same code, selected by config. Skipped unless a CUDA GPU is present.

Each test reads back what the loaded pipeline runs with (``observe_pipeline``: attention
processors, compiled UNet, memory format, device and dtype), not the config echoed, and
checks the float outputs are finite before they become uint8.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _generator(tmp_path, runtime):
    from pipeline.models.loading import load_generator

    return load_generator(tmp_path / "m", runtime, ip_adapter=tmp_path / "faceid.safetensors",
                          build_tiny_if_missing=True)


@pytest.fixture()
def float_outputs(monkeypatch) -> list[np.ndarray]:
    """Every float image batch the generator turns into uint8, as it came from the model
    (a NaN would otherwise be cast into a black pixel, or refused with a ModelError)."""
    from pipeline.models import diffusion

    seen: list[np.ndarray] = []
    to_uint8 = diffusion._to_uint8
    monkeypatch.setattr(diffusion, "_to_uint8", lambda x: seen.append(np.array(x)) or to_uint8(x))
    return seen


def _assert_finite(outputs: list[np.ndarray], expected_calls: int) -> None:
    assert len(outputs) == expected_calls
    for images in outputs:
        assert np.isfinite(images).all(), f"{(~np.isfinite(images)).sum()} NaN/Inf values"


def test_tiny_models_and_faceid_adapter_run_in_fp16_on_cuda_with_the_selected_attention(
        tmp_path, float_outputs):
    import importlib.util

    from pipeline.core.config import ModelsConfig
    from pipeline.models.diffusion import GenerationParams
    from pipeline.models.runtime import observe_pipeline, select_runtime

    runtime = select_runtime(ModelsConfig(device="auto", dtype="auto", attention="auto"))
    assert runtime.device == "cuda" and runtime.dtype == torch.float16
    has_xformers = importlib.util.find_spec("xformers") is not None
    assert runtime.attention == ("xformers" if has_xformers else "sdpa")
    generator = _generator(tmp_path, runtime)
    unet = generator.txt2img.unet
    assert unet.dtype == torch.float16 and unet.encoder_hid_proj is not None
    for pipe in (generator.txt2img, generator.img2img):
        observed = observe_pipeline(pipe)
        # every layer, the face adapter's included, runs the selected backend
        assert observed.attention == {runtime.attention}, observed
        assert (observed.device, observed.dtype) == ("cuda", torch.float16)
        assert not observed.compiled and not observed.unet_channels_last
    params = GenerationParams(prompt="a watercolor painting", resolution_px=64,
                              num_inference_steps=4, guidance_scale=1.0)
    embeddings = np.random.default_rng(0).normal(size=(4, 512)).astype(np.float32)
    images = generator.ai_photos(embeddings, params, seeds=[0, 1, 2, 3])
    assert images.shape == (4, 64, 64, 3) and images.dtype == np.uint8
    assert images.std() > 0  # not a blank (NaN-clipped) fp16 output
    same_seed = generator.ai_photos(embeddings, params, seeds=[0, 0, 0, 0])
    assert not np.array_equal(same_seed[0], same_seed[1])  # each row follows its own face
    styled = generator.art_styles([np.full((64, 64, 3), 120, np.uint8)] * 2, params,
                                  seeds=[0, 1])
    assert styled.shape == (2, 64, 64, 3)
    _assert_finite(float_outputs, expected_calls=3)


def test_sdpa_by_config_is_the_backend_in_use_on_cuda(tmp_path, float_outputs):
    """attention: sdpa is honoured even where xformers is installed."""
    from pipeline.core.config import ModelsConfig
    from pipeline.models.diffusion import GenerationParams
    from pipeline.models.runtime import observe_pipeline, select_runtime

    runtime = select_runtime(ModelsConfig(attention="sdpa"))
    generator = _generator(tmp_path, runtime)
    assert observe_pipeline(generator.txt2img).attention == {"sdpa"}
    params = GenerationParams(prompt="a watercolor painting", resolution_px=64,
                              num_inference_steps=2, guidance_scale=1.0)
    embeddings = np.random.default_rng(0).normal(size=(2, 512)).astype(np.float32)
    generator.ai_photos(embeddings, params, seeds=[0, 1])
    _assert_finite(float_outputs, expected_calls=1)


def test_face_stage_runs_on_cuda(tmp_path):
    """MTCNN on the GPU; the ArcFace ONNX model on onnxruntime's CUDA provider when
    onnxruntime-gpu is installed (the Docker image's), else on its CPU provider."""
    import onnxruntime
    import skimage.data

    from pipeline.core.config import ModelsConfig
    from pipeline.core.records import FaceBatch
    from pipeline.models.faces import MtcnnDetector, embed_faces
    from pipeline.models.loading import load_embedder
    from pipeline.models.runtime import select_runtime

    runtime = select_runtime(ModelsConfig())
    detector = MtcnnDetector(runtime, min_probability=0.9)
    embedder = load_embedder(tmp_path / "arcface.onnx", runtime, build_tiny_if_missing=True)
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        assert embedder.providers[0] == "CUDAExecutionProvider"
    batch = embed_faces(FaceBatch(["a", "c"], [skimage.data.astronaut(), skimage.data.chelsea()]),
                        detector, embedder)
    assert batch.embeddings[0] is not None and batch.embeddings[1] is None
    assert abs(float(np.linalg.norm(batch.embeddings[0])) - 1.0) < 1e-4


def test_compiled_channels_last_unet_runs_on_cuda(tmp_path, float_outputs):
    """The optional GPU paths: torch.compile and channels-last, both by config, both seen
    on the loaded modules; the compiled UNet really is the one that runs."""
    from pipeline.core.config import ModelsConfig
    from pipeline.models.diffusion import GenerationParams
    from pipeline.models.runtime import observe_pipeline, select_runtime

    runtime = select_runtime(ModelsConfig(channels_last=True, torch_compile=True))
    assert runtime.compile and runtime.channels_last
    generator = _generator(tmp_path, runtime)
    for pipe in (generator.txt2img, generator.img2img):
        observed = observe_pipeline(pipe)
        assert observed.compiled and isinstance(pipe.unet, torch._dynamo.eval_frame.OptimizedModule)
        assert observed.unet_channels_last and observed.vae_channels_last
        assert observed.attention == {runtime.attention}
    from torch._dynamo.utils import counters

    graphs_before = counters["stats"]["unique_graphs"]
    params = GenerationParams(prompt="a watercolor painting", resolution_px=64,
                              num_inference_steps=2, guidance_scale=1.0)
    embeddings = np.random.default_rng(0).normal(size=(2, 512)).astype(np.float32)
    images = generator.ai_photos(embeddings, params, seeds=[0, 1])
    assert images.shape == (2, 64, 64, 3) and images.std() > 0
    assert counters["stats"]["unique_graphs"] > graphs_before  # dynamo compiled the UNet
    _assert_finite(float_outputs, expected_calls=1)


def test_clips_run_in_fp16_on_cuda(tmp_path, float_outputs):
    """AnimateDiff's video-to-video pipeline (animate, styled videos) on the GPU."""
    from pipeline.core.config import ModelsConfig
    from pipeline.models.diffusion import GenerationParams
    from pipeline.models.loading import load_generator
    from pipeline.models.runtime import observe_pipeline, select_runtime

    runtime = select_runtime(ModelsConfig())
    generator = load_generator(tmp_path / "m", runtime, ip_adapter=tmp_path / "faceid.safetensors",
                               motion_adapter=tmp_path / "motion", build_tiny_if_missing=True)
    params = GenerationParams(prompt="a watercolor painting", resolution_px=64,
                              num_inference_steps=4, guidance_scale=1.0, strength=0.6)
    frames = [np.full((64, 96, 3), 20 * i, np.uint8) for i in range(8)]
    observed = observe_pipeline(generator.vid2vid)
    assert observed.attention == {runtime.attention}, observed  # motion layers included
    assert (observed.device, observed.dtype) == ("cuda", torch.float16)
    clip = generator.clip(frames, params, seed=1, size_px=(64, 40))
    assert clip.shape == (8, 40, 64, 3) and clip.std() > 0
    _assert_finite(float_outputs, expected_calls=1)
