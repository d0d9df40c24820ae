"""Benchmark: what batching gains inside each model stage, measured in-process.

Run:  .venv/bin/python scripts/bench_models.py [--quick] [--repeats R]
      (about a minute on 2 CPU cores with the tiny models; --quick: batches 1, 4, 8)

For batch sizes 1, 2, 4, 8, 16 it times, per batch:
  face stage   detect (MTCNN, one letterboxed call for the whole batch), align (five-point
               similarity warp to 112x112), embed (the ArcFace ONNX model, one call), and
               the three together;
  diffusion    ai_photo generation (IP-Adapter-FaceID) at the configured steps and 64 px.
Inputs are real photos of several sizes (scikit-image's astronaut, resized and padded), so
the detector's common-canvas batching is what is measured. Models are the embedded
defaults (tiny random weights of the real architectures); on a CUDA machine the device is
picked as in production (models.yaml ``device: auto``).

Each time is the median of R repeats after one warm-up. The batching gain of a stage at
batch N is (time per image at batch 1) / (time per image at batch N): above 1, batching
pays. Prints a table, writes bench-out/bench_models.json and bench-out/bench_models.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.core.config import load_settings  # noqa: E402

OUT = REPO / "bench-out"
BATCHES = (1, 2, 4, 8, 16)
QUICK_BATCHES = (1, 4, 8)
SIZES_PX = ((512, 512), (480, 640), (600, 800), (384, 384))  # (height, width)
STAGES = ("detect", "align", "embed", "face total", "diffusion")


def photos(count: int) -> list[np.ndarray]:
    """``count`` real face photos of mixed sizes: the astronaut scaled into each size."""
    out = []
    for i in range(count):
        height, width = SIZES_PX[i % len(SIZES_PX)]
        side = min(height, width)
        face = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((side, side)))
        canvas = np.full((height, width, 3), 90, np.uint8)
        canvas[:side, :side] = face
        out.append(canvas)
    return out


def median_s(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first-call allocations, lazy init
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(batches: tuple[int, ...], repeats: int, steps: int) -> tuple[dict, dict]:
    import torch
    from diffusers.utils import logging as diffusers_logging

    from pipeline.models.diffusion import GenerationParams
    from pipeline.models.faces import align_face
    from pipeline.models.loading import open_face_models, open_generator
    from pipeline.models.runtime import select_runtime

    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    base = load_settings()
    torch.set_num_threads(base.models.torch_num_threads)  # as each actor does
    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
        models = base.models.model_copy(update={
            "diffusion_model_dir": f"{tmp}/tiny-sd",
            "ip_adapter_weights": f"{tmp}/tiny-ip-adapter-faceid.safetensors",
            "motion_adapter_dir": f"{tmp}/tiny-motion-adapter",
            "face_embedder_weights": f"{tmp}/tiny-arcface.onnx",
            "build_tiny_if_missing": True,
        })
        settings = base.model_copy(update={"models": models})
        runtime = select_runtime(models)
        detector, embedder = open_face_models(settings, runtime)
        generator = open_generator(settings, runtime)
        params = GenerationParams(prompt="a studio portrait photo", resolution_px=64,
                                  num_inference_steps=steps, guidance_scale=1.0)
        per_batch: dict[str, dict[int, float]] = {stage: {} for stage in STAGES}
        for n in batches:
            images = photos(n)
            detections = detector.detect(images)
            assert all(d is not None for d in detections), "every bench photo holds a face"
            landmarks = [d.landmarks_px for d in detections]  # type: ignore[union-attr]
            crops = np.stack([align_face(im, lm) for im, lm in zip(images, landmarks, strict=True)])
            embeddings = embedder.embed(crops)

            def face_total(images: list[np.ndarray] = images) -> None:
                found = detector.detect(images)
                aligned = [align_face(im, d.landmarks_px)  # type: ignore[union-attr]
                           for im, d in zip(images, found, strict=True)]
                embedder.embed(np.stack(aligned))

            timed = {
                "detect": lambda images=images: detector.detect(images),
                "align": lambda images=images, landmarks=landmarks: [
                    align_face(im, lm) for im, lm in zip(images, landmarks, strict=True)],
                "embed": lambda crops=crops: embedder.embed(crops),
                "face total": face_total,
                "diffusion": lambda e=embeddings, n=n: generator.ai_photos(
                    e, params, seeds=list(range(n))),
            }
            for stage, fn in timed.items():
                per_batch[stage][n] = median_s(fn, repeats)
            print(f"  batch {n:>2}: " + "  ".join(
                f"{s} {per_batch[s][n] * 1000:.0f} ms" for s in STAGES), flush=True)
    meta = {"device": runtime.device, "dtype": str(runtime.dtype).removeprefix("torch."),
            "steps": steps, "repeats": repeats, "torch_num_threads": models.torch_num_threads,
            "embedder_providers": embedder.providers}
    return per_batch, meta


def gains(per_batch: dict[str, dict[int, float]]) -> dict[str, dict[int, float]]:
    """Per-image time at batch 1 over per-image time at batch N."""
    return {stage: {n: (times[1]) / (t / n) for n, t in times.items()}
            for stage, times in per_batch.items()}


def print_report(per_batch: dict, gain: dict, meta: dict) -> None:
    batches = sorted(next(iter(per_batch.values())))
    print(f"\nper-image ms (device {meta['device']}, {meta['dtype']}, "
          f"{meta['steps']} diffusion steps, median of {meta['repeats']})")
    print(f"{'stage':<12}" + "".join(f"{'b' + str(n):>9}" for n in batches)
          + f"{'gain b' + str(batches[-1]):>12}")
    for stage in STAGES:
        row = "".join(f"{per_batch[stage][n] / n * 1000:>9.1f}" for n in batches)
        print(f"{stage:<12}{row}{gain[stage][batches[-1]]:>11.2f}x")
    print("\nbatching gain = per-image time at batch 1 / per-image time at batch N")
    for stage in STAGES:
        print(f"  {stage:<11} " + "  ".join(f"b{n} {gain[stage][n]:.2f}x" for n in batches))


def write_outputs(per_batch: dict, gain: dict, meta: dict) -> Path:
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_models.json").write_text(json.dumps(
        {"meta": meta, "seconds_per_batch": per_batch, "gain": gain}, indent=1))
    png = OUT / "bench_models.png"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return png
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for stage in STAGES:
        batches = sorted(per_batch[stage])
        left.plot(batches, [per_batch[stage][n] / n * 1000 for n in batches], marker="o",
                  label=stage)
        right.plot(batches, [gain[stage][n] for n in batches], marker="o", label=stage)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.grid(alpha=0.3)
    left.set_yscale("log")
    left.set_ylabel("ms per image")
    left.set_title("time per image")
    right.axhline(1.0, color="grey", lw=0.8)
    right.set_ylabel("gain vs batch 1")
    right.set_title("batching gain per stage")
    right.legend(fontsize=8)
    fig.suptitle(f"bench_models: tiny models on {meta['device']} ({meta['dtype']})")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    return png


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="batches 1, 4, 8 only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None,
                        help="diffusion steps (default: models.yaml num_inference_steps)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    steps = args.steps or load_settings().models.num_inference_steps
    per_batch, meta = measure(QUICK_BATCHES if args.quick else BATCHES, args.repeats, steps)
    gain = gains(per_batch)
    print_report(per_batch, gain, meta)
    print(f"\nwrote {write_outputs(per_batch, gain, meta)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
