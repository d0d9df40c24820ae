"""Benchmark: clips, in-process and through the service.

Run:  .venv/bin/python scripts/bench_video.py [--quick]
      (a few minutes on 2 CPU cores with the tiny models; --quick: shorter clips)

In one run it measures
  a. frames/s of AnimateDiff video-to-video (tiny models, in-process) with a clip's frames
     batched video_chunk_frames at a time vs one frame per call;
  b. the latency of a photo job (art_style, one photo) submitted while a long video is
     being styled, with the video chunked (video_chunk_frames = 8) and unchunked (the
     whole video in one diffusion call), against the same photo job on an idle service.
Everything lives in a temporary directory; one diffusion replica, so the photo job has to
wait for a model call of the video to end.

Both comparisons run interleaved, R repetitions (--repetitions, default 5): (a) clip at
video_chunk_frames per call, clip at one frame per call, again, ...; (b) on each service,
a photo job on the idle service, then one during a long video, again, ... (each video's
inputs purged before the next idle photo). Each ratio is computed per repetition from its
adjacent pair and reported as the median with its spread (``median [min-max] IQR``);
the table shows medians. Prints a table, writes bench-out/bench_video.json (medians as
before, plus every repetition's values and the spreads) and bench-out/bench_video.png
(error bars: min-max over the repetitions).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.core.config import Settings, StageBatchConfig, load_settings  # noqa: E402
from pipeline.security import crypto  # noqa: E402
from scripts.bench_stats import MIN_REPETITIONS, Spread, interleave, paired_ratios, table  # noqa: E402
from serve.client import NO_RETRIES, EphemeraClient  # noqa: E402
from serve.schemas import JobView  # noqa: E402

OUT = REPO / "bench-out"


def astronaut_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buffer, format="PNG")
    return buffer.getvalue()


def long_video(frames: int) -> bytes:
    """A moving crop of a real photo, 96x64 at 24 fps, made here with PyAV."""
    from pipeline.media.video import encode_mp4

    photo = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((192, 128)))
    clip = [np.ascontiguousarray(photo[i % 64: i % 64 + 64, i % 96: i % 96 + 96])
            for i in range(frames)]
    return encode_mp4(clip, fps=24)


def measure_in_process(frames: int, chunk: int, steps: int,
                       repetitions: int) -> dict[str, list[float]]:
    """frames/s per repetition at ``chunk`` frames per call and at one, interleaved."""
    import torch
    from diffusers.utils import logging as diffusers_logging

    from pipeline.media.video import decode_frames
    from pipeline.models.diffusion import GenerationParams
    from pipeline.models.loading import open_generator

    diffusers_logging.set_verbosity_error()
    base = load_settings()
    torch.set_num_threads(base.models.torch_num_threads)
    with tempfile.TemporaryDirectory(prefix="bench-video-") as tmp:
        models = base.models.model_copy(update={
            "diffusion_model_dir": f"{tmp}/tiny-sd",
            "ip_adapter_weights": f"{tmp}/ip.safetensors",
            "motion_adapter_dir": f"{tmp}/motion", "build_tiny_if_missing": True})
        generator = open_generator(base.model_copy(update={"models": models}))
        source = decode_frames(long_video(frames))
        params = GenerationParams(prompt="a watercolor painting", resolution_px=64,
                                  num_inference_steps=steps, guidance_scale=1.0, strength=0.6)

        def run(per_call: int) -> float:
            start = time.perf_counter()
            for i in range(0, frames, per_call):
                generator.clip(source[i: i + per_call], params, seed=1, size_px=(64, 40))
            return frames / (time.perf_counter() - start)

        run(chunk)  # warm-up
        return interleave({f"chunk {chunk}": lambda _: run(chunk), "chunk 1": lambda _: run(1)},
                          repetitions)


def service_settings(base: Settings, root: Path, chunk: int) -> Settings:
    stage = base.batching.diffusion.model_copy(update={"max_batch_cost": max(8, chunk)})
    return base.model_copy(update={
        "service": base.service.model_copy(update={"redis_url": None}),
        "storage": base.storage.model_copy(update={"local_root": str(root / "store")}),
        "models": base.models.model_copy(update={
            "diffusion_model_dir": str(root.parent / "models" / "tiny-sd"),
            "ip_adapter_weights": str(root.parent / "models" / "ip.safetensors"),
            "motion_adapter_dir": str(root.parent / "models" / "motion"),
            "face_embedder_weights": str(root.parent / "models" / "arcface.onnx")}),
        "batching": base.batching.model_copy(update={
            "video_chunk_frames": chunk, "diffusion": StageBatchConfig(**{
                **stage.model_dump(), "max_concurrent_batches": 1})}),
        "deployments": base.deployments.model_copy(update={
            "diffusion": base.deployments.diffusion.model_copy(update={
                "autoscaling": None, "num_replicas": 1})}),
    })


def submit(api: EphemeraClient, data: bytes, name: str, key: bytes) -> str:
    return api.submit_job([(name, data)], device_key=key, kind="art_style",
                          style="watercolor", account_id="bench-video").job_id


def wait(api: EphemeraClient, job_id: str) -> JobView:
    """Until the job ended (not until its inputs were purged); raises JobFailed if it failed."""
    return api.wait_job("bench-video", job_id, poll_s=0.05, until_purged=False,
                        raise_on_failure=True)


def photo_latency(api: EphemeraClient, key: bytes) -> float:
    start = time.time()
    view = wait(api, submit(api, astronaut_png(), "photo.png", key))
    return view.succeeded_s - start


def measure_service(root: Path, chunk: int, frames: int,
                    repetitions: int) -> dict[str, list[float]]:
    """Per repetition: a photo on the idle service, then a photo during a long video."""
    from serve.launcher import start_service

    settings = service_settings(load_settings(), root, chunk)
    key = crypto.new_device_key()
    video = long_video(frames)
    # No retries: a retried POST would put its backoff into the latency measured.
    with start_service(settings, workdir=root / "work") as service, \
            EphemeraClient(service.base_url, retry=NO_RETRIES, timeout_s=120) as api:
        photo_latency(api, key)  # warm-up

        def during_video(_: int) -> tuple[float, float]:
            start = time.time()
            video_id = submit(api, video, "clip.mp4", key)
            time.sleep(0.5)  # the video's first chunk is on the GPU
            busy = photo_latency(api, key)
            video_s = wait(api, video_id).succeeded_s - start
            # untimed: its clean-up done before the next idle photo
            api.wait_job("bench-video", video_id, poll_s=0.1, until_purged=True)
            return busy, video_s

        runs = interleave({"photo idle s": lambda _: photo_latency(api, key),
                           "during": during_video}, repetitions)
    return {"photo idle s": runs["photo idle s"],
            "photo during video s": [busy for busy, _ in runs["during"]],
            "video s": [video_s for _, video_s in runs["during"]]}


def write_plot(results: dict) -> Path:
    png = OUT / "bench_video.png"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return png

    def err(values: list[list[float]]) -> list[list[float]]:
        spreads = [Spread.of(v) for v in values]
        return [[s.median - s.min for s in spreads], [s.max - s.median for s in spreads]]

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    fps = results["in_process_frames_per_s"]
    fps_values = results["in_process_frames_per_s_values"]
    left.bar(list(fps), list(fps.values()), color=["tab:blue", "tab:grey"],
             yerr=err(list(fps_values.values())), capsize=4)
    left.set_ylabel("frames/s")
    left.set_title("AnimateDiff vid2vid: frames per call")
    names = list(results["service"])
    values = results["service_values"]
    idle = [results["service"][n]["photo idle s"] for n in names]
    busy = [results["service"][n]["photo during video s"] for n in names]
    x = np.arange(len(names))
    right.bar(x - 0.2, idle, 0.4, label="photo, idle service", capsize=4,
              yerr=err([values[n]["photo idle s"] for n in names]))
    right.bar(x + 0.2, busy, 0.4, label="photo, during a long video", capsize=4,
              yerr=err([values[n]["photo during video s"] for n in names]))
    right.set_xticks(x, names)
    right.set_ylabel("photo job latency (s)")
    right.set_title("photo latency while a video runs")
    right.legend(fontsize=8)
    fig.suptitle(f"median of {results['repetitions']} interleaved repetitions; bars min-max",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    return png


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repetitions", type=int, default=MIN_REPETITIONS,
                        help="interleaved repetitions of each comparison")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    frames = 24 if args.quick else 48
    steps = load_settings().models.num_inference_steps
    reps = args.repetitions
    print(f"in-process: {frames} frames, {steps} steps, {reps} repetitions ...", flush=True)
    fps_values = measure_in_process(frames, 8, steps, reps)
    fps = {name: Spread.of(v).median for name, v in fps_values.items()}
    ratios = {"batched/one-at-a-time frames/s": Spread.of(
        paired_ratios(fps_values["chunk 8"], fps_values["chunk 1"]))}
    results: dict = {"frames": frames, "steps": steps, "repetitions": reps,
                     "in_process_frames_per_s": fps, "service": {},
                     "in_process_frames_per_s_values": fps_values, "service_values": {}}
    with tempfile.TemporaryDirectory(prefix="bench-video-svc-") as tmp:
        for name, chunk in (("chunked (8)", 8), (f"unchunked ({frames})", frames)):
            print(f"service, {name} ...", flush=True)
            values = measure_service(Path(tmp) / f"c{chunk}", chunk, frames, reps)
            results["service_values"][name] = values
            results["service"][name] = {k: Spread.of(v).median for k, v in values.items()}
            ratios[f"photo latency during video / idle, {name}"] = Spread.of(paired_ratios(
                values["photo during video s"], values["photo idle s"]))
    results["ratio_spreads"] = {k: s.as_dict() for k, s in ratios.items()}
    print(f"\n{'frames per call':<22}{'frames/s':>10}")
    for name, value in fps.items():
        print(f"{name:<22}{value:>10.2f}")
    print(f"batched/one-at-a-time frames/s: {ratios['batched/one-at-a-time frames/s'].median:.2f}")
    print(f"\n{'service':<18}{'photo idle s':>14}{'photo during video s':>22}{'video s':>9}")
    for name, row in results["service"].items():
        print(f"{name:<18}{row['photo idle s']:>14.2f}{row['photo during video s']:>22.2f}"
              f"{row['video s']:>9.2f}")
    print(f"\nratios over {reps} interleaved repetitions (each from its repetition's adjacent "
          f"pair; the table above: medians), median [min-max] IQR:")
    for line in table(ratios):
        print(f"  {line}")
    for name in results["service"]:
        print(f"photo latency during video / idle, {name}: "
              f"{ratios[f'photo latency during video / idle, {name}'].median:.2f}")
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_video.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {write_plot(results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
