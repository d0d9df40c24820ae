"""A GPU stand-in for scale benchmarks: a diffusion generator whose batch takes the time a
real GPU would, by a cost model, while using no CPU (it sleeps).

BENCHMARK TOOL ONLY. Selected by ``models.yaml diffusion_backend: simulated``, refused by
the config in any production-shaped setting (see ``Settings``), never the default. It lets
this 2-core, GPU-less machine measure what the orchestration does when GPUs are the
bottleneck: scale-out over replicas, batching, back-pressure, autoscaling.

Cost model: one call takes ``overhead_s + s_per_unit x cost_units`` (scaled by
``time_scale``), where a unit is one 512 px image at 50 steps. Calibration (README,
"Simulated numbers"): Stable Diffusion 1.5, fp16, SDPA, 512 px, 50 steps on one A100
takes about 1.6 s at batch 1 (fal.ai's public SD benchmarks, diffusers + torch 2.1), and
at 512 px the UNet is compute-bound, so larger batches gain little per image: we take
overhead 0.25 s and 1.35 s per image.
"""

from __future__ import annotations

import time

import numpy as np

from pipeline.core.config import SimulatedGpuConfig
from pipeline.models.diffusion import GenerationParams


class SimulatedGenerator:
    """Same calls as DiffusionGenerator; returns flat grey images after the modelled time."""

    def __init__(self, cfg: SimulatedGpuConfig, *, reference_resolution_px: int) -> None:
        self.cfg = cfg
        self.reference_resolution_px = reference_resolution_px

    def batch_time_s(self, num_images: int, resolution_px: int) -> float:
        units = num_images * (resolution_px / self.reference_resolution_px) ** 2
        return self.cfg.time_scale * (self.cfg.overhead_s + self.cfg.s_per_unit * units)

    def _generate(self, num_images: int, resolution_px: int) -> np.ndarray:
        time.sleep(self.batch_time_s(num_images, resolution_px))  # the GPU works; no CPU used
        return np.full((num_images, resolution_px, resolution_px, 3), 128, dtype=np.uint8)

    def ai_photos(self, face_embeddings: np.ndarray, params: GenerationParams,
                  seeds: list[int]) -> np.ndarray:
        return self._generate(face_embeddings.shape[0], params.resolution_px)

    def art_styles(self, images: list[np.ndarray], params: GenerationParams,
                   seeds: list[int]) -> np.ndarray:
        return self._generate(len(images), params.resolution_px)

    def clip(self, frames: list[np.ndarray], params: GenerationParams, seed: int,
             size_px: tuple[int, int]) -> np.ndarray:
        """A chunk costs its frames as images (AnimateDiff denoises every frame)."""
        time.sleep(self.batch_time_s(len(frames), max(size_px)))
        return np.full((len(frames), size_px[1], size_px[0], 3), 128, dtype=np.uint8)
