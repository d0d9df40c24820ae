"""Benchmark: service throughput over HTTP vs. the same pipeline stages called in-process.

Run:  .venv/bin/python scripts/bench_service.py --quick
      .venv/bin/python scripts/bench_service.py [--jobs N] [--batch B] [--kind ai_photo|art_style]
      (or: make bench; defaults N=16, B=8, kind=ai_photo; a few minutes on 2 CPU cores;
      --quick: N=8, art_style)

Everything lives in a fresh temporary directory (object stores, embedded Redis, tiny
random-weight diffusion models), removed at the end; the repository's data/ and models/
are never touched. Inputs are real photos: scikit-image's astronaut sent as JPEG (it has
a real face, so ai_photo passes the face stage).

In one run it measures
  a. the service (local Ray + Serve, all over HTTP) with max_batch_cost=B for both pools,
  b. the same service restarted with max_batch_cost=1,
  c. "raw": the same pipeline work called directly in this process, in chunks of B:
     validate + strip + encrypt + store each upload (check_job_request, accept_job), then
     face_stage / diffusion_stage with their output stage, after the service is stopped
     (so the two do not compete for the cores),
  d. raw again in chunks of 1.
Service runs use max_wait_ms=200 and max_concurrent_batches=1, and start with one
untimed warm-up job; the raw runs also do one untimed warm-up job. It ends with three
lines: raw batchB/batch1 throughput (X), the service's batchB/batch1 (G), and service/raw
at batch B (R: what orchestration costs).

Service timing runs from the first POST until every job reached ``succeeded`` (the job's
server-side ``succeeded_s``, same host clock; polling only detects it). Per-job latency is
POST -> succeeded. In-process latency is the time from the start of the timed region until
the chunk holding the job finished both stages (all jobs are "submitted" at once).

Prints a table and two ratios, writes bench-out/bench_service.json and, if matplotlib is
importable, bench-out/bench_service.png.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.core.config import Settings, StageBatchConfig, load_settings
from pipeline.security import crypto
from serve.client import NO_RETRIES, ApiError, EphemeraClient
from serve.schemas import JobView

OUT_DIR = REPO / "bench-out"
STYLE_FOR_KIND = {"ai_photo": "portrait", "art_style": "watercolor"}
ACCOUNT = "bench-account"
MAX_WAIT_MS = 200.0
JOB_WAIT_S = 900.0


@dataclass
class RunResult:
    """One measured configuration."""

    config: str
    jobs: int
    batch: int
    elapsed_s: float
    latencies_s: list[float]
    failures: list[str] = field(default_factory=list)
    batch_sizes: dict[str, dict[str, int]] = field(default_factory=dict)  # stage -> size -> n
    notes: str = ""

    @property
    def jobs_per_s(self) -> float:
        succeeded = self.jobs - len(self.failures)
        return succeeded / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def summary(self) -> dict:
        return {**asdict(self), "jobs_per_s": self.jobs_per_s,
                "p50_s": percentile(self.latencies_s, 50),
                "p95_s": percentile(self.latencies_s, 95)}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def sample_photo() -> bytes:
    """scikit-image's astronaut (a real face), encoded as JPEG."""
    buffer = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def bench_settings(base: Settings, root: Path, name: str, batch: int) -> Settings:
    """``base`` with store and models under ``root`` and batching set for a fair comparison."""
    stage = StageBatchConfig(max_batch_cost=batch, max_wait_ms=MAX_WAIT_MS,
                             max_concurrent_batches=1)
    return base.model_copy(update={
        "service": base.service.model_copy(update={
            "redis_url": None,  # embedded Redis, started by the launcher under the workdir
            "max_jobs_in_flight_per_account": 10_000,  # one account submits every job
            "max_files_per_job": 1,  # so batch cost 1 fits every job (one photo each)
        }),
        "storage": base.storage.model_copy(update={"local_root": str(root / name / "store")}),
        "models": base.models.model_copy(update={
            "diffusion_model_dir": str(root / "models" / "tiny-sd"),
            "ip_adapter_weights": str(root / "models" / "tiny-ip-adapter-faceid.safetensors"),
            "motion_adapter_dir": str(root / "models" / "tiny-motion-adapter"),
            "face_embedder_weights": str(root / "models" / "tiny-arcface.onnx"),
        }),
        "batching": base.batching.model_copy(update={
            "face": stage, "diffusion": stage,
            "video_chunk_frames": min(base.batching.video_chunk_frames, batch)}),
    })


def ensure_tiny_models(settings: Settings) -> None:
    """Build the tiny models once, before any timing, so no run pays for it."""
    from pipeline.models.loading import open_face_models, open_generator

    open_generator(settings)
    open_face_models(settings)


# --- service over HTTP -------------------------------------------------------------------


@dataclass(frozen=True)
class JobSpec:
    kind: str
    style: str
    photo: bytes
    device_key: bytes  # raw; the client sends it base64-encoded in X-Device-Key


def post_job(api: EphemeraClient, spec: JobSpec) -> tuple[str, float, float]:
    """Submit one job; returns its id and the wall-clock times the POST started and ended."""
    started = time.time()
    try:
        accepted = api.submit_job([("astronaut.jpg", spec.photo)], device_key=spec.device_key,
                                  kind=spec.kind, style=spec.style, account_id=ACCOUNT)
    except ApiError as exc:
        raise RuntimeError(f"submit failed: {exc}") from exc
    return accepted.job_id, started, time.time()


def wait_all(api: EphemeraClient, job_ids: list[str], timeout_s: float = JOB_WAIT_S,
             poll_s: float = 0.25) -> dict[str, JobView]:
    """Poll GET /v1/accounts/{a}/jobs/{id} until every job succeeded or failed; returns the views."""
    pending, done = set(job_ids), {}
    deadline = time.monotonic() + timeout_s
    while pending:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} jobs did not finish within {timeout_s} s")
        for job_id in list(pending):
            view = api.get_job(ACCOUNT, job_id)
            if view.status.is_finished:
                done[job_id] = view
                pending.discard(job_id)
        if pending:
            time.sleep(poll_s)
    return done


def measure_service(base_url: str, spec: JobSpec, jobs: int) -> tuple[dict, dict, float]:
    """One warm-up job, then ``jobs`` concurrent POSTs; returns views, POST starts, POST span."""
    # No retries: a refused POST fails the run, as before, instead of a backoff in the timing.
    with EphemeraClient(base_url, retry=NO_RETRIES, timeout_s=120.0) as api:
        warm_id, _, _ = post_job(api, spec)
        warm = wait_all(api, [warm_id])[warm_id]
        if warm.status != "succeeded":
            raise RuntimeError(f"warm-up job failed: {warm.reason}")
        with ThreadPoolExecutor(max_workers=min(jobs, 16)) as pool:
            posted = list(pool.map(lambda _: post_job(api, spec), range(jobs)))
        post_span = max(end for *_, end in posted) - min(start for _, start, _ in posted)
        views = wait_all(api, [job_id for job_id, _, _ in posted])
    return views, {job_id: start for job_id, start, _ in posted}, post_span


def service_result(config: str, batch: int, views: dict[str, JobView], posted: dict,
                   post_span: float) -> RunResult:
    first_post = min(posted.values())
    ends = [v.succeeded_s or v.finished_s for v in views.values()]
    failures = [v.reason or "failed" for v in views.values() if v.status != "succeeded"]
    latencies = [v.succeeded_s - posted[j] for j, v in views.items()
                 if v.status == "succeeded"]
    sizes = {stage: dict(sorted(Counter(str(getattr(v.batch_sizes, stage))
                                        for v in views.values()).items()))
             for stage in ("face", "diffusion")}
    return RunResult(config, len(views), batch, max(ends) - first_post, latencies, failures,
                     sizes, notes=f"first POST sent -> last POST answered {post_span:.2f} s")


def run_service(base: Settings, root: Path, name: str, batch: int, spec: JobSpec,
                jobs: int) -> RunResult:
    from serve.launcher import start_service

    settings = bench_settings(base, root, name.replace(" ", "-"), batch)
    print(f"[{name}] starting the service (max_batch_cost={batch}) ...", flush=True)
    workdir = root / name.replace(" ", "-") / "work"
    with start_service(settings, workdir=workdir) as service:
        print(f"[{name}] up at {service.base_url}; warm-up, then {jobs} jobs", flush=True)
        views, posted, post_span = measure_service(service.base_url, spec, jobs)
    result = service_result(name, batch, views, posted, post_span)
    print(f"[{name}] {result.elapsed_s:.2f} s, batch sizes per job: {result.batch_sizes}",
          flush=True)
    return result


# --- the same stages, in-process ---------------------------------------------------------


@dataclass
class Stages:
    """What the face and diffusion actors hold, built once (not timed)."""

    settings: Settings
    store: object
    jobs: object
    ledger: object
    generator: object
    detector: object = None
    embedder: object = None
    quality: object = None


def load_stages(settings: Settings, redis_url: str, kind: str) -> Stages:
    import redis
    import torch
    from diffusers.utils import logging as diffusers_logging

    from pipeline.models.loading import face_quality, open_face_models, open_generator
    from pipeline.models.runtime import select_runtime
    from pipeline.state.job_store import JobStore
    from pipeline.state.ledger import RetentionLedger
    from pipeline.storage.base import LocalObjectStore, StoreSet

    diffusers_logging.disable_progress_bar()  # as the diffusion actor does
    diffusers_logging.set_verbosity_error()
    torch.set_num_threads(settings.models.torch_num_threads)  # as each actor does
    client = redis.Redis.from_url(redis_url)
    runtime = select_runtime(settings.models)
    stages = Stages(settings=settings, store=StoreSet.single(LocalObjectStore(
                        f"file://{settings.storage.local_root}")),
                    jobs=JobStore(client), ledger=RetentionLedger(client),
                    generator=open_generator(settings, runtime))
    if kind == "ai_photo":
        stages.detector, stages.embedder = open_face_models(settings, runtime)
        stages.quality = face_quality(settings.models)
    return stages


def accept_items(stages: Stages, spec: JobSpec, count: int) -> list:
    """Validate and store ``count`` jobs as the API does (not timed)."""
    from pipeline.jobs.intake import accept_job, check_job_request

    key = crypto.new_device_key()
    items = []
    for _ in range(count):
        request = check_job_request(account_id=ACCOUNT, kind=spec.kind, style=spec.style,
                                    resolution_px=None, files=[spec.photo],
                                    settings=stages.settings)
        _, item = accept_job(request, key, stages.store, stages.jobs, stages.settings)
        items.append(item)
    return items


def run_chunk(stages: Stages, chunk: list) -> list[str]:
    """Face (ai_photo) then diffusion for one chunk; returns failure reasons."""
    from pipeline.jobs.stages import diffusion_stage, face_stage

    failures = []
    if chunk[0].kind == "ai_photo":
        results = face_stage(chunk, stages.store, stages.jobs, stages.detector,
                             stages.embedder, stages.settings.retention, stages.quality)
        failures += [r.reason for r in results if not r.ok]
        chunk = [replace(it, face_uri=r.face_uri) for it, r in zip(chunk, results, strict=True)
                 if r.ok]
    if chunk:
        results = diffusion_stage(chunk, stages.store, stages.jobs, stages.generator,
                                  stages.settings)
        failures += [r.reason for r in results if not r.ok]
    return failures


def run_in_process(base: Settings, root: Path, batch: int, spec: JobSpec,
                   jobs: int) -> RunResult:
    """Raw: accept (validate, strip, encrypt, store) and run the stages, in chunks of
    ``batch``, all timed; the same work the service does, without Ray or HTTP."""
    from pipeline.state.redis_server import RedisServer

    name = f"raw b{batch}"
    settings = bench_settings(base, root, name, batch)
    print(f"[{name}] loading models ...", flush=True)
    with RedisServer(root / name / "redis") as server:
        stages = load_stages(settings, server.url, spec.kind)
        [warm] = accept_items(stages, spec, 1)
        if run_chunk(stages, [warm]):
            raise RuntimeError("in-process warm-up job failed")
        latencies, failures = [], []
        started = time.perf_counter()
        for i in range(0, jobs, batch):
            chunk = accept_items(stages, spec, min(batch, jobs - i))
            failures += run_chunk(stages, chunk)
            latencies += [time.perf_counter() - started] * len(chunk)
        elapsed = time.perf_counter() - started
    print(f"[{name}] {elapsed:.2f} s", flush=True)
    return RunResult(name, jobs, batch, elapsed, latencies, failures,
                     notes="latency: start of timed region -> chunk done")


# --- report ------------------------------------------------------------------------------


def ratios(service_b: RunResult, service_1: RunResult, raw_b: RunResult,
           raw_1: RunResult) -> dict[str, float]:
    return {
        "raw batch8/batch1 throughput": raw_b.jobs_per_s / raw_1.jobs_per_s,
        "batch8/batch1 throughput": service_b.jobs_per_s / service_1.jobs_per_s,
        "service/raw throughput": service_b.jobs_per_s / raw_b.jobs_per_s,
    }


def print_report(results: list[RunResult], measured: dict[str, float]) -> None:
    header = ("config", "jobs", "batch", "elapsed s", "jobs/s", "p50 s", "p95 s")
    rows = [(r.config, str(r.jobs), str(r.batch), f"{r.elapsed_s:.2f}", f"{r.jobs_per_s:.3f}",
             f"{percentile(r.latencies_s, 50):.2f}", f"{percentile(r.latencies_s, 95):.2f}")
            for r in results]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print()
    print(line.format(*header))
    print(line.format(*["-" * w for w in widths]))
    for row in rows:
        print(line.format(*row))
    print()
    for r in results:
        extra = f"; batch sizes per job {r.batch_sizes}" if r.batch_sizes else ""
        failed = f"; FAILED {len(r.failures)}: {sorted(set(r.failures))}" if r.failures else ""
        print(f"  {r.config}: {r.notes}{extra}{failed}")


def write_outputs(results: list[RunResult], measured: dict[str, float], meta: dict) -> None:
    OUT_DIR.mkdir(exist_ok=True)
    payload = {**meta, "runs": [r.summary() for r in results], "ratios": measured}
    path = OUT_DIR / "bench_service.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path.relative_to(REPO)}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([r.config for r in results], [r.jobs_per_s for r in results])
    ax.set_ylabel("jobs/s")
    ax.set_title(f"{meta['kind']}, {meta['jobs']} jobs")
    fig.tight_layout()
    fig.savefig(OUT_DIR / "bench_service.png", dpi=120)
    plt.close(fig)
    print(f"wrote {(OUT_DIR / 'bench_service.png').relative_to(REPO)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=16, help="jobs per measured run")
    parser.add_argument("--batch", type=int, default=8, help="max_batch_cost B to compare")
    parser.add_argument("--kind", choices=sorted(STYLE_FOR_KIND), default="ai_photo")
    parser.add_argument("--quick", action="store_true", help="8 art_style jobs")
    args = parser.parse_args()
    if args.quick:
        args.jobs, args.kind = 8, "art_style"
    if args.jobs < 1 or args.batch < 1:
        parser.error("--jobs and --batch must be at least 1")
    warnings.filterwarnings("ignore", category=FutureWarning)  # diffusers' config notices
    started = time.monotonic()
    base = load_settings()  # once: every run uses the same configs
    root = Path(tempfile.mkdtemp(prefix="ephemera-bench-"))
    spec = JobSpec(args.kind, STYLE_FOR_KIND[args.kind], sample_photo(), crypto.new_device_key())
    try:
        ensure_tiny_models(bench_settings(base, root, "models", args.batch))
        results = [
            run_service(base, root, f"service b{args.batch}", args.batch, spec, args.jobs),
            run_service(base, root, "service b1", 1, spec, args.jobs),
            run_in_process(base, root, args.batch, spec, args.jobs),
            run_in_process(base, root, 1, spec, args.jobs),
        ]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    measured = ratios(*results)
    wall_s = time.monotonic() - started
    print_report(results, measured)
    write_outputs(results, measured, {"kind": args.kind, "style": spec.style,
                                      "jobs": args.jobs, "batch": args.batch,
                                      "max_wait_ms": MAX_WAIT_MS, "wall_s": wall_s})
    print(f"wall time: {wall_s:.1f} s")
    for label, value in measured.items():  # the three closing lines
        print(f"{label.replace('8', str(args.batch))}: {value:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
