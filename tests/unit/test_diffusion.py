"""diffusion: tiny random-weight SD models, loaded with from_pretrained as in production.

The models are built and loaded once per module; each generation takes a few hundred ms.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.embeddings import IPAdapterFaceIDImageProjection
from skimage import data

from pipeline.diffusion import (
    FACE_EMBEDDING_DIM,
    DiffusionGenerator,
    GenerationParams,
    build_tiny_models,
    load_face_projection,
    load_generator,
    save_face_projection,
)
from tests.unit.factories import cpu_runtime

STEPS = 2
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-sd")
    build_tiny_models(path)
    return path


@pytest.fixture(scope="module")
def generator(model_dir) -> DiffusionGenerator:
    return load_generator(model_dir, cpu_runtime(), build_tiny_if_missing=False)


def embeddings(n: int, seed: int) -> np.ndarray:
    """``n`` random L2-normalised face embeddings."""
    vectors = np.random.default_rng(seed).normal(size=(n, FACE_EMBEDDING_DIM))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def params(guidance_scale: float = 1.0, strength: float = 0.6) -> GenerationParams:
    return GenerationParams(prompt="a studio portrait photo", resolution_px=64,
                            num_inference_steps=STEPS, guidance_scale=guidance_scale,
                            strength=strength)


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


def test_face_projection_maps_distinct_identities_to_distinct_tokens(generator):
    faces = torch.as_tensor(embeddings(2, seed=0))
    with torch.inference_mode():
        tokens = generator.face_proj(faces)

    assert tokens.shape == (2, 4, 32)  # (batch, num_face_tokens, cross_attention_dim)
    assert (tokens[0] - tokens[1]).abs().mean() > 0.1


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


def test_missing_model_dir_is_refused_when_building_is_off(tmp_path):
    with pytest.raises(ValueError, match="diffusion_model_dir"):
        load_generator(tmp_path / "absent", cpu_runtime(), build_tiny_if_missing=False)
    assert not (tmp_path / "absent").exists()


def test_face_projection_round_trips_through_disk(tmp_path):
    torch.manual_seed(0)
    proj = IPAdapterFaceIDImageProjection(image_embed_dim=FACE_EMBEDDING_DIM,
                                          cross_attention_dim=32, mult=1, num_tokens=4).eval()
    save_face_projection(proj, tmp_path / "face_proj")

    loaded = load_face_projection(tmp_path / "face_proj")

    faces = torch.as_tensor(embeddings(3, seed=2))
    with torch.inference_mode():
        torch.testing.assert_close(loaded(faces), proj(faces))


def test_channels_last_by_config_keeps_the_unet_so_and_still_generates(model_dir):
    from dataclasses import replace

    runtime = replace(cpu_runtime(), channels_last=True)
    generator = load_generator(model_dir, runtime, build_tiny_if_missing=False)
    convs = [m.weight for m in generator.txt2img.unet.modules()
             if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    images = generator.ai_photos(embeddings(1, seed=0), params(), seeds=[1])
    assert images.shape == (1, 64, 64, 3) and images.dtype == np.uint8
