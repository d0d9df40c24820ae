"""faces: MTCNN (shipped weights) finds the astronaut's face and no face in the cat; FaceNet
embeds it; weights load from a path; identities average and renormalise.

MTCNN and the random-weight embedder are loaded once per module.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from skimage import data

from pipeline.faces import (
    CROP_SIZE_PX,
    FacenetEmbedder,
    MtcnnDetector,
    embed_faces,
    mean_identity,
)
from pipeline.records import EmbeddingBatch, FaceBatch
from tests.unit.factories import cpu_runtime

EMBEDDING_DIM = 512
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def detector() -> MtcnnDetector:
    return MtcnnDetector(cpu_runtime(), min_probability=0.9)


@pytest.fixture(scope="module")
def embedder() -> FacenetEmbedder:
    return FacenetEmbedder(cpu_runtime(), weights="random")


@pytest.fixture(scope="module")
def astronaut_crop(detector) -> torch.Tensor:
    (crop,) = detector.detect([data.astronaut()])
    assert crop is not None
    return crop


def test_detector_crops_the_astronauts_face(astronaut_crop):
    assert astronaut_crop.shape == (3, CROP_SIZE_PX, CROP_SIZE_PX)
    assert astronaut_crop.dtype == torch.float32


@pytest.fixture(scope="module")
def mixed(detector, embedder) -> EmbeddingBatch:
    """embed_faces over cat, astronaut, coffee, astronaut (two image sizes in one batch)."""
    images = [data.chelsea(), data.astronaut(), data.coffee(), data.astronaut()]
    return embed_faces(FaceBatch(job_ids=["cat", "a1", "coffee", "a2"], images=images),
                       detector, embedder)


def test_astronaut_gives_one_unit_norm_embedding(mixed):
    vector = mixed.embeddings[1]
    assert vector is not None
    assert vector.shape == (EMBEDDING_DIM,) and vector.dtype == np.float32
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)


def test_cat_and_coffee_give_no_embedding(mixed):
    assert mixed.embeddings[0] is None
    assert mixed.embeddings[2] is None


def test_mixed_batch_keeps_order(mixed):
    assert mixed.job_ids == ["cat", "a1", "coffee", "a2"]
    assert [e is not None for e in mixed.embeddings] == [False, True, False, True]
    np.testing.assert_allclose(mixed.embeddings[1], mixed.embeddings[3], atol=1e-5)


def test_detector_honours_min_probability(detector):
    strict = copy.copy(detector)
    strict.min_probability = 1.0 + 1e-9  # no detection can reach it

    assert strict.detect([data.astronaut()]) == [None]


def test_embed_faces_calls_the_embedder_once_for_the_found_faces():
    crop = torch.zeros(3, CROP_SIZE_PX, CROP_SIZE_PX)

    class FakeDetector:
        def detect(self, images):
            return [crop if image.mean() > 0 else None for image in images]

    class FakeEmbedder:
        def __init__(self) -> None:
            self.calls: list[int] = []

        def embed(self, crops):
            self.calls.append(crops.shape[0])
            return np.stack([np.full(EMBEDDING_DIM, n, np.float32) for n in range(len(crops))])

    embedder = FakeEmbedder()
    black, grey = np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 9, np.uint8)
    batch = embed_faces(FaceBatch(["a", "b", "c"], [grey, black, grey]), FakeDetector(), embedder)

    assert embedder.calls == [2]
    assert batch.embeddings[1] is None
    assert batch.embeddings[0][0] == 0 and batch.embeddings[2][0] == 1


def test_embedder_weights_load_from_a_path(tmp_path, astronaut_crop):
    from facenet_pytorch import InceptionResnetV1

    torch.manual_seed(1234)
    path = tmp_path / "facenet.pt"
    torch.save(InceptionResnetV1(pretrained=None, classify=False).state_dict(), path)

    first = FacenetEmbedder(cpu_runtime(), weights=str(path))
    second = FacenetEmbedder(cpu_runtime(), weights=str(path))
    crops = astronaut_crop.unsqueeze(0)

    np.testing.assert_array_equal(first.embed(crops), second.embed(crops))


def test_random_embedders_differ_so_the_loaded_weights_matter(embedder, astronaut_crop):
    other = FacenetEmbedder(cpu_runtime(), weights="random")
    crops = astronaut_crop.unsqueeze(0)

    assert not np.allclose(embedder.embed(crops), other.embed(crops))


def test_missing_weights_path_is_refused(tmp_path):
    with pytest.raises(ValueError, match="face_embedder_weights"):
        FacenetEmbedder(cpu_runtime(), weights=str(tmp_path / "missing.pt"))


def test_mean_identity_renormalises():
    a = np.zeros(EMBEDDING_DIM, np.float32)
    b = np.zeros(EMBEDDING_DIM, np.float32)
    a[0], b[1] = 1.0, 1.0

    identity = mean_identity([a, b])

    assert identity.dtype == np.float32
    assert np.linalg.norm(identity) == pytest.approx(1.0)
    np.testing.assert_allclose(identity[:2], [2**-0.5, 2**-0.5], rtol=1e-6)


def test_mean_identity_of_one_embedding_is_itself():
    vector = np.random.default_rng(0).normal(size=EMBEDDING_DIM).astype(np.float32)
    vector /= np.linalg.norm(vector)

    np.testing.assert_allclose(mean_identity([vector]), vector, rtol=1e-5)
