"""faces: MTCNN (shipped weights) finds the astronaut's face and its five landmarks, and no
face in the cat or the coffee; the landmarks align the face onto the ArcFace template; an
ArcFace-format ONNX model (random weights, InsightFace's contract) embeds it; faces too
small or too blurred are refused with a reason; identities average and renormalise.

MTCNN and the tiny embedder are loaded once per module.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from PIL import Image, ImageFilter
from skimage import data

from pipeline.core.errors import ModelError
from pipeline.core.records import EmbeddingBatch, FaceBatch, FaceProblem
from pipeline.models.faces import (
    ALIGNED_SIZE_PX,
    ARCFACE_TEMPLATE_PX,
    EMBEDDING_DIM,
    ArcFaceEmbedder,
    Detection,
    FaceQuality,
    MtcnnDetector,
    align_face,
    embed_faces,
    letterbox,
    mean_identity,
    sharpness,
    similarity_transform,
)
from pipeline.models.tiny import build_tiny_arcface
from tests.unit.factories import cpu_runtime

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def detector() -> MtcnnDetector:
    return MtcnnDetector(cpu_runtime(), min_probability=0.9)


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("arcface") / "tiny-arcface.onnx"
    build_tiny_arcface(path)
    return path


@pytest.fixture(scope="module")
def embedder(onnx_path) -> ArcFaceEmbedder:
    return ArcFaceEmbedder(onnx_path, cpu_runtime())


def blurred(image: np.ndarray, radius: float) -> np.ndarray:
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))


def shrunk(image: np.ndarray, side_px: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((side_px, side_px)))


@pytest.fixture(scope="module")
def astronaut_detection(detector) -> Detection:
    (found,) = detector.detect([data.astronaut()])
    assert found is not None
    return found


# ------------------------------------------------------------------ alignment (models)

@pytest.mark.models
def test_similarity_transform_recovers_a_known_rotation_scale_and_shift():
    angle, scale, shift = math.radians(20), 3.0, np.array([140.0, 75.0])
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    landmarks = (ARCFACE_TEMPLATE_PX @ rotation.T) * scale + shift  # a face in a big photo

    matrix = similarity_transform(landmarks, ARCFACE_TEMPLATE_PX)

    mapped = landmarks @ matrix[:, :2].T + matrix[:, 2]
    np.testing.assert_allclose(mapped, ARCFACE_TEMPLATE_PX, atol=1e-9)
    np.testing.assert_allclose(np.linalg.det(matrix[:, :2]), 1 / scale**2, rtol=1e-9)


@pytest.mark.models
def test_align_face_puts_the_known_landmarks_on_the_template():
    """Dots drawn at five landmark positions of a rotated, scaled face land on the five
    template points of the 112x112 crop."""
    angle, scale, shift = math.radians(-15), 2.5, np.array([60.0, 40.0])
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    landmarks = (ARCFACE_TEMPLATE_PX @ rotation.T) * scale + shift
    image = np.zeros((400, 400, 3), np.uint8)
    for x, y in landmarks:
        image[round(y) - 3: round(y) + 4, round(x) - 3: round(x) + 4] = 255

    crop = align_face(image, landmarks)

    assert crop.shape == (ALIGNED_SIZE_PX, ALIGNED_SIZE_PX, 3) and crop.dtype == np.uint8
    for x, y in ARCFACE_TEMPLATE_PX:
        assert crop[round(y), round(x)].min() > 200
    assert crop.mean() < 40  # the rest stays dark: nothing else was mapped there


@pytest.mark.models
def test_mtcnn_landmarks_align_the_astronaut_onto_the_template(astronaut_detection):
    """Real landmarks: left eye left of right eye, nose below them, mouth below the nose, and
    the aligned crop is sharp."""
    left_eye, right_eye, nose, mouth_l, mouth_r = astronaut_detection.landmarks_px
    assert left_eye[0] < right_eye[0]
    assert nose[1] > max(left_eye[1], right_eye[1])
    assert min(mouth_l[1], mouth_r[1]) > nose[1]
    x0, y0, x1, y1 = astronaut_detection.box_px
    assert x0 < nose[0] < x1 and y0 < nose[1] < y1
    crop = align_face(data.astronaut(), astronaut_detection.landmarks_px)
    assert sharpness(crop) > 100


def test_letterbox_fits_every_image_on_one_canvas():
    canvas, scales = letterbox([data.astronaut(), data.chelsea(), np.zeros((40, 10, 3), np.uint8)],
                               256)
    assert canvas.shape == (3, 256, 256, 3)
    assert scales == pytest.approx([0.5, 256 / 451, 256 / 40])


# ------------------------------------------------------------------ detection + stage core

@pytest.fixture(scope="module")
def mixed(detector, embedder) -> EmbeddingBatch:
    """cat, astronaut, coffee, astronaut: three image sizes in one detector call."""
    images = [data.chelsea(), data.astronaut(), data.coffee(), data.astronaut()]
    return embed_faces(FaceBatch(job_ids=["cat", "a1", "coffee", "a2"], images=images),
                       detector, embedder)


def test_astronaut_gives_one_unit_norm_512d_embedding(mixed):
    vector = mixed.embeddings[1]
    assert vector is not None and mixed.rejections[1] is None
    assert vector.shape == (EMBEDDING_DIM,) and vector.dtype == np.float32
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)


def test_cat_and_coffee_are_rejected_as_no_face(mixed):
    for i in (0, 2):
        assert mixed.embeddings[i] is None
        assert mixed.rejections[i].problem is FaceProblem.NO_FACE


def test_mixed_batch_keeps_order(mixed):
    assert mixed.job_ids == ["cat", "a1", "coffee", "a2"]
    assert [e is not None for e in mixed.embeddings] == [False, True, False, True]
    np.testing.assert_allclose(mixed.embeddings[1], mixed.embeddings[3], atol=1e-5)


def test_a_blurred_face_is_refused_as_blurred(detector, embedder):
    batch = embed_faces(FaceBatch(["j"], [blurred(data.astronaut(), 4)]), detector, embedder)
    assert batch.embeddings == [None]
    assert batch.rejections[0].problem is FaceProblem.BLURRED
    assert "sharpness" in batch.rejections[0].detail


def test_a_tiny_face_is_refused_as_too_small(detector, embedder):
    batch = embed_faces(FaceBatch(["j"], [shrunk(data.astronaut(), 96)]), detector, embedder)
    assert batch.embeddings == [None]
    assert batch.rejections[0].problem is FaceProblem.TOO_SMALL
    assert "px apart" in batch.rejections[0].detail


def test_quality_thresholds_come_from_config(detector, embedder):
    lenient = FaceQuality(min_eye_distance_px=1.0, min_sharpness=0.0)
    batch = embed_faces(FaceBatch(["j"], [blurred(data.astronaut(), 4)]), detector, embedder,
                        lenient)
    assert batch.embeddings[0] is not None


def test_the_largest_face_is_used_when_several_are_present(detector):
    """Two astronauts side by side, one at half size: the detection is the big one."""
    big, small = data.astronaut(), shrunk(data.astronaut(), 256)
    canvas = np.zeros((512, 768, 3), np.uint8)
    canvas[:, :512], canvas[:256, 512:] = big, small
    (found,) = detector.detect([canvas])
    assert found is not None and found.box_px[2] < 512


def test_detector_honours_min_probability(detector):
    strict = copy.copy(detector)
    strict.min_probability = 1.0 + 1e-9  # no detection can reach it

    assert strict.detect([data.astronaut()]) == [None]


def test_one_detector_and_one_embedder_call_per_batch(astronaut_detection):
    class CountingDetector:
        def __init__(self) -> None:
            self.calls: list[int] = []

        def detect(self, images):
            self.calls.append(len(images))
            return [astronaut_detection if image.mean() > 50 else None for image in images]

    class CountingEmbedder:
        def __init__(self) -> None:
            self.calls: list[int] = []

        def embed(self, crops):
            self.calls.append(len(crops))
            vectors = np.zeros((len(crops), EMBEDDING_DIM), np.float32)
            vectors[np.arange(len(crops)), np.arange(len(crops))] = 1.0
            return vectors

    detector, embedder = CountingDetector(), CountingEmbedder()
    black = np.zeros((512, 512, 3), np.uint8)
    batch = embed_faces(FaceBatch(["a", "b", "c"], [data.astronaut(), black, data.astronaut()]),
                        detector, embedder)

    assert detector.calls == [3] and embedder.calls == [2]
    assert batch.embeddings[1] is None
    assert batch.embeddings[0][0] == 1 and batch.embeddings[2][1] == 1


# ------------------------------------------------------------------ the ONNX embedder (models)

@pytest.mark.models
def test_embedder_follows_its_weights(onnx_path, tmp_path):
    crops = np.random.default_rng(0).integers(0, 255, (3, 112, 112, 3), dtype=np.uint8)
    again = ArcFaceEmbedder(onnx_path, cpu_runtime()).embed(crops)
    np.testing.assert_array_equal(ArcFaceEmbedder(onnx_path, cpu_runtime()).embed(crops), again)
    build_tiny_arcface(tmp_path / "other.onnx", seed=7)
    other = ArcFaceEmbedder(tmp_path / "other.onnx", cpu_runtime()).embed(crops)
    assert not np.allclose(other, again)
    np.testing.assert_allclose(np.linalg.norm(again, axis=1), 1.0, rtol=1e-5)


@pytest.mark.models
def test_embedder_normalises_inputs_as_insightface_does(embedder):
    """A graph without its own Sub/Mul preprocessing gets (x - 127.5) / 127.5."""
    assert (embedder.mean, embedder.std) == (127.5, 127.5)
    assert embedder.providers == ["CPUExecutionProvider"]


def _graph_with(path, *, out_dim: int = EMBEDDING_DIM, side: int = ALIGNED_SIZE_PX):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    flat = 3 * side * side
    weight = numpy_helper.from_array(np.zeros((flat, out_dim), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input.1"], ["f"], axis=1),
         helper.make_node("MatMul", ["f", "w"], ["out"])], "g",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, side, side])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", out_dim])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.mark.models
def test_embedder_errors_name_the_problem(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        ArcFaceEmbedder(tmp_path / "missing.onnx", cpu_runtime())
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelError, match="not a loadable ONNX model"):
        ArcFaceEmbedder(tmp_path / "junk.onnx", cpu_runtime())
    with pytest.raises(ModelError, match="128-d embeddings"):
        ArcFaceEmbedder(_graph_with(tmp_path / "dlib.onnx", out_dim=128), cpu_runtime())
    with pytest.raises(ModelError, match="takes input"):
        ArcFaceEmbedder(_graph_with(tmp_path / "facenet.onnx", side=160), cpu_runtime())


# ------------------------------------------------------------------ identities

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
