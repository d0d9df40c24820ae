"""Face stage: detect (MTCNN, real weights shipped in facenet-pytorch), align to the ArcFace
112x112 template by the five landmarks, embed with an ArcFace-format ONNX model (InsightFace's
input/output contract: RGB 112x112, (x - 127.5) / 127.5 unless the graph normalises itself,
one 512-d vector per face), and L2-normalise.

This is the identity space IP-Adapter-FaceID is trained on. The embedder's weights come
from the model store; for the embedded default, the demo and tests
``pipeline.models.tiny.build_tiny_arcface`` writes a random-weight ONNX graph of the same
contract (InsightFace's trained graphs ship in no package).

Every image of a batch goes through one detector call (letterboxed onto a common canvas)
and every found face through one embedder call.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from pipeline.core.errors import ModelError
from pipeline.core.records import EmbeddingBatch, FaceBatch, FaceProblem, FaceRejection
from pipeline.models.runtime import Runtime

EMBEDDING_DIM = 512
ALIGNED_SIZE_PX = 112
# InsightFace's five-point ArcFace template (left eye, right eye, nose, mouth left, mouth
# right) in a 112x112 crop: insightface/utils/face_align.py ``arcface_dst``.
ARCFACE_TEMPLATE_PX = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
     [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64,
)


@dataclass(frozen=True, slots=True)
class Detection:
    """The largest confident face of one image, in that image's pixel coordinates."""

    box_px: tuple[float, float, float, float]  # x0, y0, x1, y1
    landmarks_px: np.ndarray  # (5, 2): left eye, right eye, nose, mouth left, mouth right
    probability: float

    @property
    def eye_distance_px(self) -> float:
        return float(np.linalg.norm(self.landmarks_px[1] - self.landmarks_px[0]))


@dataclass(frozen=True, slots=True)
class FaceQuality:
    """Below these a face cannot carry an identity (models.yaml)."""

    min_eye_distance_px: float = 20.0
    min_sharpness: float = 10.0


DEFAULT_QUALITY = FaceQuality()


class FaceDetector(Protocol):
    def detect(self, images: list[np.ndarray]) -> list[Detection | None]:
        """The largest confident face per (H, W, 3) uint8 RGB image, or None."""
        ...


class FaceEmbedder(Protocol):
    def embed(self, crops: np.ndarray) -> np.ndarray:
        """(N, 112, 112, 3) uint8 aligned RGB crops -> (N, 512) L2-normalised float32."""
        ...


# ---------------------------------------------------------------- detection

class MtcnnDetector:
    """facenet-pytorch's MTCNN with its shipped P/R/O-Net weights, one call per batch."""

    def __init__(self, runtime: Runtime, *, min_probability: float,
                 canvas_px: int = 512) -> None:
        from facenet_pytorch import MTCNN  # heavy import, and torchvision-bound

        self.min_probability = min_probability
        self.canvas_px = canvas_px
        self.mtcnn = MTCNN(select_largest=True, device=torch.device(runtime.device))

    def detect(self, images: list[np.ndarray]) -> list[Detection | None]:
        if not images:
            return []
        canvas, scales = letterbox(images, self.canvas_px)
        boxes, probs, points = self.mtcnn.detect(canvas, landmarks=True)
        return [
            _largest(b, p, pts, scale, self.min_probability)
            for b, p, pts, scale in zip(boxes, probs, points, scales, strict=True)
        ]


def letterbox(images: list[np.ndarray], canvas_px: int) -> tuple[np.ndarray, list[float]]:
    """Scale each image to fit a ``canvas_px`` square (top-left, black padding) so that one
    detector call takes them all; returns the (N, S, S, 3) batch and each image's scale."""
    canvas = np.zeros((len(images), canvas_px, canvas_px, 3), np.uint8)
    scales = []
    for i, image in enumerate(images):
        height, width = image.shape[:2]
        scale = canvas_px / max(height, width)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        resized = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
        canvas[i, : size[1], : size[0]] = resized
        scales.append(scale)
    return canvas, scales


def _largest(boxes, probs, points, scale: float, min_probability: float) -> Detection | None:
    if boxes is None:
        return None
    best: Detection | None = None
    best_area = -1.0
    for box, prob, pts in zip(boxes, probs, points, strict=True):
        if prob is None or float(prob) < min_probability:
            continue
        x0, y0, x1, y1 = (float(v) / scale for v in box)
        area = (x1 - x0) * (y1 - y0)
        if area > best_area:
            best_area = area
            best = Detection((x0, y0, x1, y1), np.asarray(pts, np.float64) / scale, float(prob))
    return best


# ---------------------------------------------------------------- alignment

def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The (2, 3) rotation + uniform scale + translation that best maps ``src`` points onto
    ``dst`` in least squares (Umeyama 1991, no reflection), as InsightFace aligns faces."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1.0
    rotation = u @ np.diag(d) @ vt
    variance = (src_c**2).sum() / len(src)
    scale = float((s * d).sum() / variance) if variance > 0 else 1.0
    translation = dst_mean - scale * rotation @ src_mean
    return np.hstack([scale * rotation, translation[:, None]])


def align_face(image: np.ndarray, landmarks_px: np.ndarray) -> np.ndarray:
    """The (112, 112, 3) uint8 crop with the five landmarks on the ArcFace template."""
    matrix = np.vstack([similarity_transform(landmarks_px, ARCFACE_TEMPLATE_PX), [0, 0, 1]])
    inverse = np.linalg.inv(matrix)[:2].ravel()  # PIL maps output pixels to input pixels
    crop = Image.fromarray(image).transform(
        (ALIGNED_SIZE_PX, ALIGNED_SIZE_PX), Image.Transform.AFFINE, tuple(inverse),
        resample=Image.Resampling.BILINEAR,
    )
    return np.asarray(crop)


def sharpness(crop: np.ndarray) -> float:
    """Variance of the Laplacian of the grey crop: low when the face is blurred."""
    grey = crop.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    lap = (grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:]
           - 4 * grey[1:-1, 1:-1])
    return float(lap.var())


def assess(detection: Detection | None, crop: np.ndarray | None,
           quality: FaceQuality) -> FaceRejection | None:
    """Why this face cannot carry an identity, or None when it can."""
    if detection is None or crop is None:
        return FaceRejection(FaceProblem.NO_FACE, "no human face was found")
    if detection.eye_distance_px < quality.min_eye_distance_px:
        return FaceRejection(
            FaceProblem.TOO_SMALL,
            f"the face is too small for identity (eyes {detection.eye_distance_px:.0f} px "
            f"apart, at least {quality.min_eye_distance_px:.0f} needed)",
        )
    value = sharpness(crop)
    if value < quality.min_sharpness:
        return FaceRejection(
            FaceProblem.BLURRED,
            f"the face is too blurred for identity (sharpness {value:.1f}, at least "
            f"{quality.min_sharpness:.1f} needed)",
        )
    return None


# ---------------------------------------------------------------- embedding

class ArcFaceEmbedder:
    """An ArcFace-format ONNX model run with onnxruntime (CUDA provider on a GPU)."""

    def __init__(self, path: Path, runtime: Runtime, *, num_threads: int = 1) -> None:
        import onnxruntime as ort

        if not Path(path).is_file():
            raise ModelError(f"face embedder {path} does not exist; point models.yaml "
                             "face_embedder_weights at an ArcFace .onnx file or store location")
        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        if runtime.device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        model_bytes = Path(path).read_bytes()  # read once: for the session and the graph
        try:
            self.session = ort.InferenceSession(model_bytes, options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelError(f"face embedder {path} is not a loadable ONNX model ({exc})") from None
        self.providers = self.session.get_providers()
        inp = self.session.get_inputs()[0]
        if list(inp.shape[1:]) != [3, ALIGNED_SIZE_PX, ALIGNED_SIZE_PX]:
            raise ModelError(f"face embedder {path} takes input {inp.shape}; an ArcFace model "
                             f"takes (N, 3, {ALIGNED_SIZE_PX}, {ALIGNED_SIZE_PX})")
        out = self.session.get_outputs()[0]
        if out.shape[-1] != EMBEDDING_DIM:
            raise ModelError(f"face embedder {path} gives {out.shape[-1]}-d embeddings; "
                             f"IP-Adapter-FaceID needs {EMBEDDING_DIM}-d ArcFace embeddings")
        self.input_name = inp.name
        # InsightFace's rule: a graph that starts by subtracting/scaling normalises itself.
        first_ops = [node.op_type for node in _graph_nodes(model_bytes)[:8]]
        normalises = "Sub" in first_ops or "Mul" in first_ops
        self.mean, self.std = (0.0, 1.0) if normalises else (127.5, 127.5)

    def embed(self, crops: np.ndarray) -> np.ndarray:
        blob = (crops.astype(np.float32).transpose(0, 3, 1, 2) - self.mean) / self.std
        (vectors,) = self.session.run(None, {self.input_name: blob})[:1]
        vectors = np.asarray(vectors, np.float32).reshape(len(crops), -1)
        if vectors.shape[1] != EMBEDDING_DIM:
            raise ModelError(f"face embedder gave {vectors.shape[1]}-d embeddings; "
                             f"{EMBEDDING_DIM}-d expected")
        norms = np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-8)
        return (vectors / norms).astype(np.float32)


def _graph_nodes(model_bytes: bytes) -> list:
    import onnx

    return list(onnx.load_from_string(model_bytes).graph.node)


# ---------------------------------------------------------------- the stage's core

def embed_faces(batch: FaceBatch, detector: FaceDetector, embedder: FaceEmbedder,
                quality: FaceQuality = DEFAULT_QUALITY) -> EmbeddingBatch:
    """The largest face of each image: detected in one call, aligned, checked, and all
    usable faces embedded in one call. One embedding or one rejection per image."""
    detections = detector.detect(batch.images)
    crops = [align_face(image, d.landmarks_px) if d is not None else None
             for image, d in zip(batch.images, detections, strict=True)]
    rejections = [assess(d, c, quality) for d, c in zip(detections, crops, strict=True)]
    embeddings: list[np.ndarray | None] = [None] * len(crops)
    usable = [i for i, r in enumerate(rejections) if r is None]
    if usable:
        vectors = embedder.embed(np.stack([crops[i] for i in usable]))  # type: ignore[misc]
        for row, i in enumerate(usable):
            embeddings[i] = vectors[row]
    return EmbeddingBatch(job_ids=batch.job_ids, embeddings=embeddings, rejections=rejections)


def mean_identity(embeddings: list[np.ndarray]) -> np.ndarray:
    """One identity from several photos of a person: the renormalised mean embedding."""
    mean = np.mean(np.stack(embeddings), axis=0)
    return (mean / max(float(np.linalg.norm(mean)), 1e-8)).astype(np.float32)
