"""diffusion: tiny random-weight SD models and an IP-Adapter-FaceID file in the published
layout, loaded with from_pretrained and diffusers' load_ip_adapter as in production.

The models are built and loaded once per module; each generation takes a few hundred ms.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from skimage import data

from pipeline.core.errors import ModelError
from pipeline.models import diffusion
from pipeline.models.diffusion import (
    FACE_EMBEDDING_DIM,
    FACEID_NUM_TOKENS,
    DiffusionGenerator,
    GenerationParams,
    convert_ip_adapter_bin,
    ip_adapter_layout,
)
from pipeline.models.loading import load_generator
from pipeline.models.runtime import attention_backend, observe_pipeline
from pipeline.models.tiny import build_tiny_ip_adapter, build_tiny_models
from tests.unit.factories import cpu_runtime

STEPS = 2
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-sd")
    build_tiny_models(path)
    return path


@pytest.fixture(scope="module")
def adapter(model_dir) -> Path:
    path = model_dir.parent / "ip-adapter-faceid.safetensors"
    build_tiny_ip_adapter(model_dir, path)
    return path


@pytest.fixture(scope="module")
def generator(model_dir, adapter) -> DiffusionGenerator:
    return load_generator(model_dir, cpu_runtime(), ip_adapter=adapter,
                          motion_adapter=model_dir.parent / "motion-adapter",
                          build_tiny_if_missing=True)


def embeddings(n: int, seed: int) -> np.ndarray:
    """``n`` random L2-normalised face embeddings."""
    vectors = np.random.default_rng(seed).normal(size=(n, FACE_EMBEDDING_DIM))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def params(guidance_scale: float = 1.0, strength: float = 0.6,
           face_scale: float = 0.7) -> GenerationParams:
    return GenerationParams(prompt="a studio portrait photo", resolution_px=64,
                            num_inference_steps=STEPS, guidance_scale=guidance_scale,
                            strength=strength, face_scale=face_scale)


@pytest.fixture(scope="module")
def baseline(generator) -> np.ndarray:
    """ai_photos for identities from seed 0, generation seeds [1, 2], no guidance."""
    return generator.ai_photos(embeddings(2, seed=0), params(), seeds=[1, 2])


def test_ai_photos_returns_one_uint8_image_per_embedding(baseline):
    assert baseline.shape == (2, 64, 64, 3) and baseline.dtype == np.uint8
    assert baseline.std() > 0  # not a blank canvas


def test_same_seeds_give_identical_images(generator, baseline):
    again = generator.ai_photos(embeddings(2, seed=0), params(), seeds=[1, 2])
    np.testing.assert_array_equal(again, baseline)


def test_different_seeds_give_different_images(generator, baseline):
    reseeded = generator.ai_photos(embeddings(2, seed=0), params(), seeds=[3, 4])
    assert not np.array_equal(reseeded, baseline)


def test_face_embedding_conditions_the_image(generator, baseline):
    other_faces = generator.ai_photos(embeddings(2, seed=1), params(), seeds=[1, 2])
    assert not np.array_equal(other_faces, baseline)


def test_face_tokens_reach_the_adapters_attention_processors(generator):
    """The adapter is diffusers' own: decoupled IP attention on every cross-attention layer,
    fed by the FaceID projection (4 tokens per face)."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    unet = generator.txt2img.unet
    ip_layers = [p for p in unet.attn_processors.values()
                 if isinstance(p, IPAdapterAttnProcessor2_0)]
    cross_layers = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    assert len(ip_layers) == len(cross_layers) > 0
    assert ip_layers[0].num_tokens == [FACEID_NUM_TOKENS]
    faces = torch.as_tensor(embeddings(2, seed=0))[:, None, :]
    with torch.inference_mode():
        (tokens,) = unet.encoder_hid_proj(faces)
    assert tokens.shape == (2, 1, FACEID_NUM_TOKENS, unet.config.cross_attention_dim)
    assert (tokens[0] - tokens[1]).abs().mean() > 0.01


def test_zero_face_scale_removes_the_faces_effect(generator):
    a = generator.ai_photos(embeddings(2, seed=0), params(face_scale=0.0), seeds=[1, 2])
    b = generator.ai_photos(embeddings(2, seed=1), params(face_scale=0.0), seeds=[1, 2])
    np.testing.assert_array_equal(a, b)
    c = generator.ai_photos(embeddings(2, seed=1), params(face_scale=1.0), seeds=[1, 2])
    assert not np.array_equal(b, c)


def test_each_image_of_a_batch_follows_its_own_face(generator, baseline):
    """Batch rows are paired with their own embeddings (and, under guidance, with their own
    negatives): swapping the faces swaps the images."""
    faces = embeddings(2, seed=0)
    for guidance in (1.0, 3.0):
        ab = generator.ai_photos(faces, params(guidance_scale=guidance), seeds=[1, 1])
        ba = generator.ai_photos(faces[::-1].copy(), params(guidance_scale=guidance), seeds=[1, 1])
        np.testing.assert_array_equal(ab[0], ba[1])
        np.testing.assert_array_equal(ab[1], ba[0])
        assert not np.array_equal(ab[0], ab[1])


def test_art_styles_ignore_the_adapter_between_ai_photo_calls(generator):
    before = generator.art_styles([data.coffee()], params(), seeds=[3])
    generator.ai_photos(embeddings(1, seed=0), params(face_scale=1.5), seeds=[1])
    after = generator.art_styles([data.coffee()], params(), seeds=[3])
    np.testing.assert_array_equal(before, after)


def test_wrong_embedding_size_is_refused(generator):
    with pytest.raises(ModelError, match="512"):
        generator.ai_photos(np.zeros((1, 128), np.float32), params(), seeds=[1])


def test_classifier_free_guidance_path_runs_and_changes_the_result(generator, baseline):
    guided = generator.ai_photos(embeddings(2, seed=0), params(guidance_scale=5.0), seeds=[1, 2])

    assert guided.shape == (2, 64, 64, 3) and guided.dtype == np.uint8
    assert not np.array_equal(guided, baseline)


def test_art_styles_resizes_inputs_of_different_sizes(generator):
    inputs = [data.astronaut(), data.chelsea()]  # 512x512 and 300x451

    images = generator.art_styles(inputs, params(), seeds=[1, 2])

    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8


def test_art_styles_follows_its_input_image(generator):
    astronaut = generator.art_styles([data.astronaut()], params(strength=0.5), seeds=[1])
    coffee = generator.art_styles([data.coffee()], params(strength=0.5), seeds=[1])

    assert np.abs(astronaut.astype(int) - coffee.astype(int)).mean() > 5


def test_art_styles_with_guidance(generator):
    images = generator.art_styles([data.coffee()], params(guidance_scale=3.0), seeds=[5])
    assert images.shape == (1, 64, 64, 3)


def test_art_styles_with_fewer_than_one_effective_step_fails_clearly_or_runs(generator):
    few = GenerationParams(prompt="a watercolor painting", resolution_px=64,
                           num_inference_steps=2, guidance_scale=1.0, strength=0.3)
    try:
        images = generator.art_styles([data.coffee()], few, seeds=[1])
    except ValueError as exc:
        assert "strength" in str(exc)
    else:
        assert images.shape == (1, 64, 64, 3)


def test_missing_model_dir_is_refused_when_building_is_off(tmp_path, adapter):
    with pytest.raises(ModelError, match="diffusion_model_dir"):
        load_generator(tmp_path / "absent", cpu_runtime(), ip_adapter=adapter,
                       build_tiny_if_missing=False)
    assert not (tmp_path / "absent").exists()


@pytest.mark.models
def test_tiny_adapter_file_has_the_published_faceid_layout(model_dir, adapter):
    """One safetensors file, image_proj.* (MLP 512->1024->4 tokens, LayerNorm) and
    ip_adapter.N.* with N the attention layer's position: LoRA on every layer, to_k_ip and
    to_v_ip on the cross-attention ones (odd N), as in h94/IP-Adapter-FaceID."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    with safe_open(str(adapter), framework="pt") as f:
        keys = set(f.keys())
    assert {k.split(".")[0] for k in keys} == {"image_proj", "ip_adapter"}
    assert {"image_proj.proj.0.weight", "image_proj.proj.2.weight", "image_proj.norm.weight"} <= keys
    assert keys == set(ip_adapter_layout(unet))
    ip_ids = sorted({int(k.split(".")[1]) for k in keys if "to_k_ip" in k})
    assert ip_ids and all(i % 2 == 1 for i in ip_ids)
    state = load_file(str(adapter))
    assert state["image_proj.proj.0.weight"].shape == (2 * FACE_EMBEDDING_DIM, FACE_EMBEDDING_DIM)
    assert state["image_proj.proj.2.weight"].shape[0] == (
        FACEID_NUM_TOKENS * unet.config.cross_attention_dim)


@pytest.mark.models
def test_adapter_errors_name_the_problem(model_dir, adapter, tmp_path):
    def load(path):
        load_generator(model_dir, cpu_runtime(), ip_adapter=path, build_tiny_if_missing=False)

    with pytest.raises(ModelError, match="does not exist"):
        load(tmp_path / "missing.safetensors")
    state = load_file(str(adapter))
    wrong_dim = {**state, "image_proj.proj.0.weight": torch.zeros(1024, 128)}
    save_file(wrong_dim, str(tmp_path / "dim.safetensors"))
    with pytest.raises(ModelError, match="128-d face embeddings"):
        load(tmp_path / "dim.safetensors")
    plus = {k: v for k, v in state.items() if k != "image_proj.norm.weight"}
    save_file(plus, str(tmp_path / "plus.safetensors"))
    with pytest.raises(ModelError, match="not an IP-Adapter-FaceID"):
        load(tmp_path / "plus.safetensors")
    key = next(k for k in state if "to_k_ip" in k)
    other_base = {**state, key: torch.zeros(8, 8)}
    save_file(other_base, str(tmp_path / "base.safetensors"))
    with pytest.raises(ModelError, match="another base model"):
        load(tmp_path / "base.safetensors")


@pytest.mark.models
def test_a_published_bin_converts_to_the_same_adapter(adapter, tmp_path):
    state = load_file(str(adapter))
    nested = {part: {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(part + ".")}
              for part in ("image_proj", "ip_adapter")}
    torch.save(nested, tmp_path / "ip-adapter-faceid_sd15.bin")
    convert_ip_adapter_bin(tmp_path / "ip-adapter-faceid_sd15.bin", tmp_path / "out.safetensors")
    converted = load_file(str(tmp_path / "out.safetensors"))
    assert converted.keys() == state.keys()
    assert all(torch.equal(converted[k], state[k]) for k in state)


def test_channels_last_by_config_keeps_the_unet_so_and_still_generates(model_dir, adapter):
    from dataclasses import replace

    runtime = replace(cpu_runtime(), channels_last=True)
    generator = load_generator(model_dir, runtime, ip_adapter=adapter,
                               build_tiny_if_missing=False)
    convs = [m.weight for m in generator.txt2img.unet.modules()
             if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    observed = observe_pipeline(generator.txt2img)
    assert observed.unet_channels_last and observed.vae_channels_last
    assert observed.attention == {"sdpa"} and not observed.compiled
    images = generator.ai_photos(embeddings(1, seed=0), params(), seeds=[1])
    assert images.shape == (1, 64, 64, 3) and images.dtype == np.uint8


def test_observe_pipeline_reads_back_sdpa_and_the_default_memory_format(generator):
    """The CPU runtime as loaded: SDPA in every attention layer (the face adapter's
    included), of txt2img, img2img (same UNet) and the motion pipeline; no compile;
    channels-first weights; fp32 on CPU."""
    for pipe in (generator.txt2img, generator.img2img, generator.vid2vid):
        observed = observe_pipeline(pipe)
        assert observed.attention == {"sdpa"}, observed
        assert not observed.compiled
        assert not observed.unet_channels_last and not observed.vae_channels_last
        assert (observed.device, observed.dtype) == ("cpu", torch.float32)
    kinds = {type(p).__name__ for p in generator.txt2img.unet.attn_processors.values()}
    assert "IPAdapterAttnProcessor2_0" in kinds  # the adapter's layers were read too


def test_observe_pipeline_sees_a_compiled_unet(model_dir, adapter):
    """torch.compile by config wraps the UNet (compilation itself waits for the first
    call, which is the GPU tests' business); the accessor looks through ``_orig_mod``."""
    from dataclasses import replace

    generator = load_generator(model_dir, replace(cpu_runtime(), compile=True),
                               ip_adapter=adapter, build_tiny_if_missing=False)
    observed = observe_pipeline(generator.txt2img)
    assert observed.compiled and hasattr(generator.txt2img.unet, "_orig_mod")
    assert observe_pipeline(generator.img2img).compiled  # built after compile: shares it
    assert observed.attention == {"sdpa"}


@pytest.mark.parametrize(("class_name", "backend"), [
    ("AttnProcessor2_0", "sdpa"), ("IPAdapterAttnProcessor2_0", "sdpa"),
    ("XFormersAttnProcessor", "xformers"), ("IPAdapterXFormersAttnProcessor", "xformers"),
    ("AttnProcessor", "AttnProcessor"),
])
def test_attention_backend_is_read_from_the_processor_class(class_name, backend):
    assert attention_backend(type(class_name, (), {})()) == backend


def test_generated_floats_are_finite_and_non_finite_ones_are_refused(generator, monkeypatch):
    seen: list[np.ndarray] = []
    to_uint8 = diffusion._to_uint8
    monkeypatch.setattr(diffusion, "_to_uint8", lambda x: seen.append(x) or to_uint8(x))
    generator.ai_photos(embeddings(2, seed=0), params(), seeds=[1, 2])
    generator.art_styles([data.astronaut()], params(), seeds=[1])
    assert len(seen) == 2 and all(np.isfinite(x).all() for x in seen)
    broken = np.full((1, 4, 4, 3), 0.5, np.float32)
    broken[0, 0, 0] = [np.nan, np.inf, 0.2]
    with pytest.raises(ModelError, match="2 NaN/Inf values"):
        to_uint8(broken)


@pytest.mark.video
def test_clip_makes_one_frame_per_input_frame_at_the_asked_size(generator):
    frames = [np.full((40, 64, 3), 20 * i, np.uint8) for i in range(6)]
    clip = generator.clip(frames, params(strength=0.6), seed=3, size_px=(64, 40))
    assert clip.shape == (6, 40, 64, 3) and clip.dtype == np.uint8
    again = generator.clip(frames, params(strength=0.6), seed=3, size_px=(64, 40))
    np.testing.assert_array_equal(clip, again)
    still = generator.clip([data.astronaut()] * 4, params(strength=0.6), seed=3,
                           size_px=(64, 64))
    assert still.shape == (4, 64, 64, 3)


@pytest.mark.video
def test_the_motion_module_couples_the_frames_of_a_chunk(generator):
    """Temporal attention: changing one input frame changes the other generated frames too
    (a per-frame image-to-image would leave them untouched)."""
    frames = [np.full((64, 64, 3), 90, np.uint8) for _ in range(4)]
    changed = [*frames[:3], np.full((64, 64, 3), 250, np.uint8)]
    a = generator.clip(frames, params(strength=0.8), seed=1, size_px=(64, 64))
    b = generator.clip(changed, params(strength=0.8), seed=1, size_px=(64, 64))
    assert not np.array_equal(a[0], b[0])


def test_clips_without_a_motion_adapter_are_refused_clearly(model_dir, adapter):
    plain = load_generator(model_dir, cpu_runtime(), ip_adapter=adapter,
                           build_tiny_if_missing=False)
    with pytest.raises(ModelError, match="motion_adapter_dir"):
        plain.clip([np.zeros((64, 64, 3), np.uint8)], params(), seed=1, size_px=(64, 64))
