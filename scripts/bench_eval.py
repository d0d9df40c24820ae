"""Benchmark: `ephemera eval` (Ray Data, offline) vs the service (Serve, online) on the same
work, in one run.

Run:  .venv/bin/python scripts/bench_eval.py [--repeat N]
      (default N=1: the sample manifest of scripts/make_eval_manifest.py, 5 images; N
      copies its rows N times; a few minutes on 2 CPU cores)

Everything lives in a fresh temporary directory (the manifest and its images, the object
store, embedded Redis), removed at the end; the tiny models come from models/ (built there
first if missing), as the default config has them.

1. The service: started as `ephemera serve` starts it (local Ray, Serve, embedded Redis),
   one untimed warm-up job, then every manifest row submitted at once through the typed
   client (serve/client.py), ``num_outputs`` ai_photo/art_style jobs per row (a job makes
   one image), so both make the same images. Timed from the first POST to the last job's
   end (server clock): warm, startup excluded. The startup is timed too.
2. The evaluation: ``run_eval`` on the same manifest with the same configs, in a fresh
   local Ray. Its wall time includes starting its actors and loading their models (a batch
   job pays that every run), and it also scores every output (a detector and an embedder
   call the service does not make).

Prints both in images/s (manifest rows per second), the ratio eval/service, and the
ratio against the service's startup-included time; writes bench-out/bench_eval.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from actors.evaluation import run_eval  # noqa: E402
from pipeline.core.config import Settings, load_settings  # noqa: E402
from pipeline.jobs.evaluation import (  # noqa: E402
    EvalImage,
    check_manifest,
    manifest_table,
    render_summary,
)
from pipeline.security import crypto  # noqa: E402
from scripts.make_eval_manifest import write_sample  # noqa: E402
from serve.client import NO_RETRIES, EphemeraClient  # noqa: E402

OUT_DIR = REPO / "bench-out"
ACCOUNT = "bench-eval"
JOB_WAIT_S = 900.0


def bench_settings(base: Settings, root: Path) -> Settings:
    return base.model_copy(update={
        "service": base.service.model_copy(update={
            "redis_url": None, "max_jobs_in_flight_per_account": 10_000}),
        "storage": base.storage.model_copy(update={"local_root": str(root / "store")}),
    })


def repeated_manifest(root: Path, repeat: int, settings: Settings) -> tuple[Path, list[EvalImage]]:
    sample = write_sample(root / "sample")
    images = check_manifest(pq.read_table(sample), settings, base_dir=sample.parent)
    if repeat == 1:
        return sample, images
    images = [replace(im, image_id=f"{im.image_id}-{n}") for n in range(repeat) for im in images]
    path = root / "sample" / f"manifest-x{repeat}.parquet"
    pq.write_table(manifest_table(images), path)
    return path, images


def image_bytes(image: EvalImage) -> bytes:
    if image.image_bytes is not None:
        return image.image_bytes
    return Path((image.image_uri or "")[len("file://"):]).read_bytes()


def run_service(settings: Settings, root: Path, images: list[EvalImage]) -> dict:
    from serve.launcher import start_service

    jobs = [(im, image_bytes(im)) for im in images for _ in range(im.num_outputs)]
    key = crypto.new_device_key()
    began = time.time()
    with start_service(settings, workdir=root / "work") as service:
        started_s = time.time() - began
        print(f"[service] up in {started_s:.1f} s; warm-up, then {len(jobs)} jobs", flush=True)
        with EphemeraClient(service.base_url, retry=NO_RETRIES, timeout_s=120.0) as api:
            def submit(job: tuple[EvalImage, bytes]) -> tuple[str, float]:
                im, data = job
                sent = time.time()
                accepted = api.submit_job([(f"{im.image_id}.png", data)], device_key=key,
                                          kind=str(im.kind), style=im.style,
                                          account_id=ACCOUNT, resolution_px=im.resolution_px)
                return accepted.job_id, sent

            warm_id, _ = submit(jobs[0])
            api.wait_job(ACCOUNT, warm_id, timeout_s=JOB_WAIT_S, until_purged=False)
            with ThreadPoolExecutor(max_workers=min(len(jobs), 16)) as pool:
                posted = list(pool.map(submit, jobs))
            views = [api.wait_job(ACCOUNT, job_id, timeout_s=JOB_WAIT_S, until_purged=False)
                     for job_id, _ in posted]
    first = min(sent for _, sent in posted)
    last = max(v.succeeded_s or v.finished_s or 0.0 for v in views)
    failed = sorted({v.reason or "failed" for v in views if v.status != "succeeded"})
    return {"jobs": len(jobs), "warm_s": last - first, "startup_s": started_s,
            "failed_jobs": sum(v.status != "succeeded" for v in views), "reasons": failed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=1, help="copies of the sample's rows")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    root = Path(tempfile.mkdtemp(prefix="ephemera-bench-eval-"))
    try:
        settings = bench_settings(load_settings(), root)
        manifest, images = repeated_manifest(root, args.repeat, settings)
        service = run_service(settings, root, images)
        print("[eval] starting a local Ray for ephemera eval ...", flush=True)
        began = time.perf_counter()
        summary = run_eval(manifest, root / "results.parquet", settings)
        eval_total_s = time.perf_counter() - began
    finally:
        shutil.rmtree(root, ignore_errors=True)
    n = len(images)
    numbers = {
        "images": n, "repeat": args.repeat, "service_jobs": service["jobs"],
        "service_images_per_s": n / service["warm_s"],
        "service_with_startup_images_per_s": n / (service["warm_s"] + service["startup_s"]),
        "eval_images_per_s": summary.images_per_s,
        "eval_with_ray_start_images_per_s": n / eval_total_s,
        "service_warm_s": service["warm_s"], "service_startup_s": service["startup_s"],
        "eval_wall_s": summary.wall_s, "eval_total_s": eval_total_s,
        "service_failed_jobs": service["failed_jobs"], "service_reasons": service["reasons"],
        "eval_failed": summary.num_failed,
    }
    numbers["eval/service"] = numbers["eval_images_per_s"] / numbers["service_images_per_s"]
    numbers["eval/service_with_startup"] = (numbers["eval_with_ray_start_images_per_s"]
                                           / numbers["service_with_startup_images_per_s"])
    print()
    print(render_summary(summary))
    print(f"service: {service['jobs']} jobs for {n} images in {service['warm_s']:.1f} s warm "
          f"(+{service['startup_s']:.1f} s startup); failed jobs: {service['failed_jobs']} "
          f"{service['reasons']}")
    OUT_DIR.mkdir(exist_ok=True)
    (OUT_DIR / "bench_eval.json").write_text(json.dumps(numbers, indent=2) + "\n")
    print(f"wrote {(OUT_DIR / 'bench_eval.json').relative_to(REPO)}")
    print(f"service (warm): {numbers['service_images_per_s']:.3f} images/s")
    print(f"eval (actor start and model loads included): {numbers['eval_images_per_s']:.3f} "
          "images/s")
    print(f"eval/service: {numbers['eval/service']:.2f}")
    print(f"eval/service, both with their startup: {numbers['eval/service_with_startup']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
