"""Face stage: detect and align faces (MTCNN, real pretrained weights shipped inside
facenet-pytorch), then embed them with an InceptionResnetV1 identity network (512-d).

The embedder's weights come from a configured file or bucket object; ``random`` builds the real architecture
with random weights for the demo and tests (the pretrained ones are not shipped in any
package and cannot be downloaded here).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from PIL import Image

from pipeline.config import StorageConfig
from pipeline.records import EmbeddingBatch, FaceBatch
from pipeline.runtime import Runtime
from pipeline.weights import load_state_dict

CROP_SIZE_PX = 160


class FaceDetector(Protocol):
    def detect(self, images: list[np.ndarray]) -> list[torch.Tensor | None]:
        """One aligned (3, 160, 160) float crop of the largest face per image, or None."""
        ...


class FaceEmbedder(Protocol):
    def embed(self, crops: torch.Tensor) -> np.ndarray:
        """(N, 3, 160, 160) crops -> (N, 512) L2-normalised float32 embeddings."""
        ...


class MtcnnDetector:
    """facenet-pytorch's MTCNN with its shipped P/R/O-Net weights."""

    def __init__(self, runtime: Runtime, *, min_probability: float) -> None:
        from facenet_pytorch import MTCNN  # heavy import, and torchvision-bound

        self.min_probability = min_probability
        self.mtcnn = MTCNN(
            image_size=CROP_SIZE_PX, margin=14, select_largest=True, post_process=True,
            device=torch.device(runtime.device),
        )

    def detect(self, images: list[np.ndarray]) -> list[torch.Tensor | None]:
        crops: list[torch.Tensor | None] = [None] * len(images)
        # MTCNN batches images of one size in one call; group by shape.
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(images):
            by_shape.setdefault(image.shape, []).append(i)
        for indices in by_shape.values():
            pil = [Image.fromarray(images[i]) for i in indices]
            faces, probs = self.mtcnn(pil, return_prob=True)
            for i, face, prob in zip(indices, faces, probs, strict=True):
                # With select_largest, prob is a 1-element array: [p] or [None].
                p = np.asarray(prob, dtype=object).ravel()
                if face is not None and p.size and p[0] is not None and float(p[0]) >= self.min_probability:
                    crops[i] = face
        return crops


class FacenetEmbedder:
    """InceptionResnetV1 (FaceNet) identity embeddings."""

    def __init__(self, runtime: Runtime, *, weights: str,
                 storage: StorageConfig | None = None) -> None:
        """``weights``: 'random', a state_dict file, or s3:// / gs:// object (read with the
        clients of ``storage``)."""
        from facenet_pytorch import InceptionResnetV1

        self.runtime = runtime
        model = InceptionResnetV1(pretrained=None, classify=False)
        if weights != "random":
            state = load_state_dict(weights, storage or StorageConfig())
            model.load_state_dict({k: v for k, v in state.items() if not k.startswith("logits")})
        self.model = model.eval().to(runtime.device)

    @torch.inference_mode()
    def embed(self, crops: torch.Tensor) -> np.ndarray:
        out = self.model(crops.to(self.runtime.device, torch.float32))
        return out.float().cpu().numpy().astype(np.float32)


def embed_faces(batch: FaceBatch, detector: FaceDetector, embedder: FaceEmbedder) -> EmbeddingBatch:
    """Detect the largest face in each image and embed all found faces in one call.

    Returns one embedding per image, None where no face was found.
    """
    crops = detector.detect(batch.images)
    found = [i for i, c in enumerate(crops) if c is not None]
    embeddings: list[np.ndarray | None] = [None] * len(crops)
    if found:
        stacked = torch.stack([crops[i] for i in found])  # type: ignore[misc]
        vectors = embedder.embed(stacked)
        for row, i in enumerate(found):
            embeddings[i] = vectors[row]
    return EmbeddingBatch(job_ids=batch.job_ids, embeddings=embeddings)


def mean_identity(embeddings: list[np.ndarray]) -> np.ndarray:
    """One identity from several photos of a person: the renormalised mean embedding."""
    mean = np.mean(np.stack(embeddings), axis=0)
    return (mean / max(float(np.linalg.norm(mean)), 1e-8)).astype(np.float32)
