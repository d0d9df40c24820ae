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

Every (stage, batch) call is warmed up once, then timed once per repetition, R
repetitions (default 5) interleaved: each repetition times every stage at every batch
size, batch sizes side by side (detect b1, detect b2, ..., align b1, ...). The batching
gain of a stage at batch N is (time per image at batch 1) / (time per image at batch N),
computed per repetition from that repetition's two calls: above 1, batching pays. Times
and gains are reported as medians over the repetitions, and the gains also with their
spread (``median [min-max] IQR``). Prints a table, writes bench-out/bench_models.json
(medians, every repetition's times, the gains' spreads) and bench-out/bench_models.png
(error bars: min-max over the repetitions).
"""

from __future__ import annotations

import argparse
import json
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
from scripts.bench_stats import MIN_REPETITIONS, Spread, interleave, paired_ratios  # noqa: E402

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


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(batches: tuple[int, ...], repeats: int, steps: int) -> tuple[dict, dict]:
    """Every repetition's seconds per call, as stage -> batch -> [s per repetition]."""
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
        calls: dict[str, dict[int, Callable[[], object]]] = {stage: {} for stage in STAGES}
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
                fn()  # warm-up: first-call allocations, lazy init
                calls[stage][n] = fn
        # Interleaved: each repetition times every stage at every batch size, b1 beside bN.
        runs = {(stage, n): (lambda _, fn=fn: seconds(fn))
                for stage in STAGES for n, fn in calls[stage].items()}
        times = interleave(runs, repeats)
        per_batch = {stage: {n: times[(stage, n)] for n in batches} for stage in STAGES}
        for n in batches:
            print(f"  batch {n:>2}: " + "  ".join(
                f"{s} {Spread.of(per_batch[s][n]).median * 1000:.0f} ms" for s in STAGES),
                flush=True)
    meta = {"device": runtime.device, "dtype": str(runtime.dtype).removeprefix("torch."),
            "steps": steps, "repeats": repeats, "torch_num_threads": models.torch_num_threads,
            "embedder_providers": embedder.providers}
    return per_batch, meta


def gains(per_batch: dict[str, dict[int, list[float]]]) -> dict[str, dict[int, Spread]]:
    """Per-image time at batch 1 over per-image time at batch N, per repetition (the two
    calls of one repetition paired), as a spread over the repetitions."""
    return {stage: {n: Spread.of(paired_ratios(times[1], [t / n for t in ts]))
                    for n, ts in times.items()}
            for stage, times in per_batch.items()}


def medians(per_batch: dict[str, dict[int, list[float]]]) -> dict[str, dict[int, float]]:
    return {stage: {n: Spread.of(ts).median for n, ts in times.items()}
            for stage, times in per_batch.items()}


def print_report(per_batch: dict, gain: dict, meta: dict) -> None:
    batches = sorted(next(iter(per_batch.values())))
    seconds_ = medians(per_batch)
    print(f"\nper-image ms (device {meta['device']}, {meta['dtype']}, "
          f"{meta['steps']} diffusion steps, median of {meta['repeats']} interleaved)")
    print(f"{'stage':<12}" + "".join(f"{'b' + str(n):>9}" for n in batches)
          + f"{'gain b' + str(batches[-1]):>12}")
    for stage in STAGES:
        row = "".join(f"{seconds_[stage][n] / n * 1000:>9.1f}" for n in batches)
        print(f"{stage:<12}{row}{gain[stage][batches[-1]].median:>11.2f}x")
    print(f"\nbatching gain, median [min-max] IQR over {meta['repeats']} repetitions")
    print(f"{'stage':<12}" + "".join(f"{'b' + str(n):>27}" for n in batches[1:]))
    for stage in STAGES:
        print(f"{stage:<12}" + "".join(f"{gain[stage][n].format():>27}" for n in batches[1:]))
    print("\nbatching gain = per-image time at batch 1 / per-image time at batch N")
    for stage in STAGES:
        print(f"  {stage:<11} " + "  ".join(f"b{n} {gain[stage][n].median:.2f}x"
                                             for n in batches))


def write_outputs(per_batch: dict, gain: dict, meta: dict) -> Path:
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_models.json").write_text(json.dumps(
        {"meta": meta, "seconds_per_batch": medians(per_batch),
         "gain": {stage: {n: s.median for n, s in g.items()} for stage, g in gain.items()},
         "seconds_per_batch_values": per_batch,
         "gain_spreads": {stage: {n: s.as_dict() for n, s in g.items()}
                          for stage, g in gain.items()}}, indent=1))
    png = OUT / "bench_models.png"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return png
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    def bars(spreads: list[Spread], scale: list[float]) -> tuple[list[float], list[list[float]]]:
        mid = [s.median * k for s, k in zip(spreads, scale, strict=True)]
        return mid, [[(s.median - s.min) * k for s, k in zip(spreads, scale, strict=True)],
                     [(s.max - s.median) * k for s, k in zip(spreads, scale, strict=True)]]

    for stage in STAGES:
        batches = sorted(per_batch[stage])
        ms, err = bars([Spread.of(per_batch[stage][n]) for n in batches],
                       [1000 / n for n in batches])
        left.errorbar(batches, ms, yerr=err, marker="o", capsize=3, label=stage)
        g, err = bars([gain[stage][n] for n in batches], [1.0] * len(batches))
        right.errorbar(batches, g, yerr=err, marker="o", capsize=3, label=stage)
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
    fig.suptitle(f"bench_models: tiny models on {meta['device']} ({meta['dtype']}); median of "
                 f"{meta['repeats']} interleaved repetitions, bars min-max")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    return png


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="batches 1, 4, 8 only")
    parser.add_argument("--repeats", type=int, default=MIN_REPETITIONS,
                        help="interleaved repetitions of every timed call")
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
