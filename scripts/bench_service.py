"""Benchmark: service throughput over HTTP vs. the same pipeline stages called in-process.

Run:  .venv/bin/python scripts/bench_service.py --quick
      .venv/bin/python scripts/bench_service.py [--jobs N] [--batch B] [--kind ai_photo|art_style]
                                                [--repetitions R]
      (or: make bench; defaults N=16, B=8, R=5, kind=ai_photo; a few minutes on 2 CPU
      cores; --quick: N=16, R=5, art_style, under 3 minutes on an idle 2-core machine)

Everything lives in a fresh temporary directory (object stores, embedded Redis, tiny
random-weight diffusion models), removed at the end; the repository's data/ and models/
are never touched. Inputs are real photos: scikit-image's astronaut sent as JPEG (it has
a real face, so ai_photo passes the face stage).

It measures four configurations, interleaved: R repetitions of
  a. "service b1": the service (local Ray + Serve, all over HTTP) with max_batch_cost=1
     for the face and diffusion pools,
  b. "service bB": the same service, live-retuned (``serve.tuning.retune``, no restart)
     to max_batch_cost=B,
  c. "raw bB": the same pipeline work called directly in this process, in chunks of B:
     validate + strip + encrypt + store each upload (check_job_request, accept_job), then
     face_stage / diffusion_stage with their output stage,
  d. "raw b1": raw again in chunks of 1,
in that order, so each ratio pairs two adjacent runs of one repetition: raw bB/b1 (X,
c/d), the service's bB/b1 (G, b/a) and service/raw at batch B (R, b/c: what orchestration
costs). One service and one in-process copy of the stages serve every repetition; the
service idles (its jobs finished and their inputs purged) while the raw runs go. The
service runs max_wait_ms=1000, max_concurrent_batches=1 and one replica per deployment
(fixed: autoscaling would carry replicas scaled up in one run into the next). The wait is
long enough for the B concurrent POSTs of a run to fill one batch: with 200 ms the batch
split 7+1, 5+3 or 8 by chance, and that chance, not orchestration, set service/raw's
spread (a batch is sent the moment it is full, so the wait costs nothing here; a run's
last batch waits only when --jobs is not a multiple of B). Both sides first run one
untimed full batch of B (the first batch-B calls build kernels for the new shape and made
repetition 1 an outlier; a whole untimed warm-up repetition was also tried, and measured
here it did not narrow the spread and cost ~25 s of the 3-minute budget). Before each run
it waits until the whole machine is quiet (below 0.4 busy cores for 0.25 s, at most 5 s),
and it polls job status one GET per round while jobs run (not one per job: those polls
took the service's CPU). Raw runs as each actor does: on torch_num_threads (1) intra-op
threads, set in the thread that runs it (set only in the thread that loads the stages, it
does not reach this one, and raw ran 2 threads on both cores), and on a core of its own:
for each raw run every thread of the idle service is moved to the other cores
(``bench_stats.cores_apart``, Linux thread affinity; its waiting for a core fell from
5-9% to 1% of the run), and all cores are given back for the service's runs. The tiny
models are built first; the service starts while this process loads its copy of the
stages.

Service timing runs from the first POST until every job reached ``succeeded`` (the job's
server-side ``succeeded_s``, same host clock; polling only detects it). Per-job latency is
POST -> succeeded. In-process latency is the time from the start of the timed region until
the chunk holding the job finished both stages (all jobs are "submitted" at once).

Each figure is reported as its median over the repetitions with its spread, as
``median [min-max] IQR``; a ratio is the median of the per-repetition ratios. It prints a
table, the ratios with their spreads, whether service/raw's spread is within ±0.05 of its
median (min-max and IQR), and ends with three lines, values being medians:
raw batchB/batch1 throughput (X), the service's batchB/batch1 (G), and service/raw at
batch B (R). Writes bench-out/bench_service.json (every repetition's runs, the spreads)
and, if matplotlib is importable, bench-out/bench_service.png (boxes: median, IQR, min-max).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.core.config import Settings, StageBatchConfig, load_settings
from pipeline.security import crypto
from scripts.bench_stats import (
    MIN_REPETITIONS,
    Spread,
    boxplot,
    cores_apart,
    interleave,
    paired_ratios,
    table,
    target_line,
    wait_until_quiet,
)
from serve.client import NO_RETRIES, ApiError, EphemeraClient
from serve.schemas import JobView

OUT_DIR = REPO / "bench-out"
STYLE_FOR_KIND = {"ai_photo": "portrait", "art_style": "watercolor"}
ACCOUNT = "bench-account"
MAX_WAIT_MS = 1000.0
JOB_WAIT_S = 900.0
QUICK_JOBS = 16  # per run: 5 x 4 runs of 16 jobs take 149-175 s here; 8 left service/raw's IQR wider
# Before each run: wait (at most QUIET_TIMEOUT_S) until the whole machine stayed below
# QUIET_BELOW_CORES for one QUIET_WINDOW_S, so the previous run's tail work (the service's
# purges, receipts, metrics and log flushes) does not land in the next run's timing.
QUIET_BELOW_CORES, QUIET_WINDOW_S, QUIET_TIMEOUT_S = 0.4, 0.25, 5.0
SPREAD_TARGET = 0.05  # service/raw: every repetition within median ± this
FIXED_REPLICAS = {"api": 1, "media": 1, "runner": 1, "face": 1, "diffusion": 1}


@dataclass
class RunResult:
    """One measured run of one configuration."""

    config: str
    jobs: int
    batch: int
    elapsed_s: float
    latencies_s: list[float]
    failures: list[str] = field(default_factory=list)
    batch_sizes: dict[str, dict[str, int]] = field(default_factory=dict)  # stage -> size -> n
    notes: str = ""
    load_1m: float = 0.0  # the machine's 1-minute load average when the run ended
    waited: float | None = None  # raw: share of the run its thread waited for a free core

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
    """``base`` with store and models under ``root``, batching set for a fair comparison and
    fixed replica counts (FIXED_REPLICAS), so every repetition runs the same deployment."""
    stage = StageBatchConfig(max_batch_cost=batch, max_wait_ms=MAX_WAIT_MS,
                             max_concurrent_batches=1)
    pools = {pool: getattr(base.deployments, pool).model_copy(
                 update={"autoscaling": None, "num_replicas": n})
             for pool, n in FIXED_REPLICAS.items()}
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
            # 1, so the pools can be retuned live down to max_batch_cost 1 (no video here)
            "video_chunk_frames": 1}),
        "deployments": base.deployments.model_copy(update=pools),
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
             poll_s: float = 0.25, *, until_purged: bool = False) -> dict[str, JobView]:
    """Poll GET /v1/accounts/{a}/jobs/{id} until every job succeeded or failed (and, with
    ``until_purged``, had its inputs purged); returns the views.

    Each round reads the pending jobs in order and stops at the first one not done: jobs
    finish about in submission order, so a round costs one GET while the batch runs
    instead of one per job. The timing never depends on polling (it uses the server's
    ``succeeded_s``), but the polls' own CPU did: 16 GETs every 0.25 s took ingress CPU
    from the 2 cores the service was being measured on."""
    pending, done = list(job_ids), {}
    deadline = time.monotonic() + timeout_s
    while pending:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} jobs did not finish within {timeout_s} s")
        for job_id in list(pending):
            view = api.get_job(ACCOUNT, job_id)
            if not (view.status.is_finished and (view.inputs_purged_s or not until_purged)):
                break
            done[job_id] = view
            pending.remove(job_id)
        if pending:
            time.sleep(poll_s)
    return done


def measure_service(api: EphemeraClient, spec: JobSpec, jobs: int) -> tuple[dict, dict, float]:
    """``jobs`` concurrent POSTs; returns views, POST starts, POST span. Then waits
    (untimed) until their inputs are purged, so no run's clean-up falls into the next."""
    with ThreadPoolExecutor(max_workers=min(jobs, 16)) as pool:
        posted = list(pool.map(lambda _: post_job(api, spec), range(jobs)))
    post_span = max(end for *_, end in posted) - min(start for _, start, _ in posted)
    job_ids = [job_id for job_id, _, _ in posted]
    views = wait_all(api, job_ids)
    wait_all(api, job_ids, timeout_s=120.0, until_purged=True)
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
                     sizes, notes=f"first POST sent -> last POST answered {post_span:.2f} s",
                     load_1m=os.getloadavg()[0])


class ServiceBench:
    """One running service, retuned live between max_batch_cost 1 and B."""

    def __init__(self, base: Settings, root: Path, batch: int, spec: JobSpec) -> None:
        self.settings = bench_settings(base, root, "service", batch)
        self.root, self.spec, self.batch_now = root, spec, batch
        self.service = None
        self.api: EphemeraClient | None = None

    def __enter__(self) -> ServiceBench:
        from serve.launcher import start_service

        print("[service] starting ...", flush=True)
        self.service = start_service(self.settings, workdir=self.root / "service" / "work")
        try:
            # No retries: a refused POST fails the run, instead of a backoff in the timing.
            self.api = EphemeraClient(self.service.base_url, retry=NO_RETRIES, timeout_s=120.0)
            # One full batch (the pools start at batch_now): the first batch-B call builds
            # the kernels for that shape, which would otherwise fall into the first run.
            warm, _, _ = measure_service(self.api, self.spec, self.batch_now)
            failed = [v.reason for v in warm.values() if v.status != "succeeded"]
            if failed:
                raise RuntimeError(f"warm-up jobs failed: {failed}")
        except BaseException:
            self.close()
            raise
        print(f"[service] up at {self.service.base_url}, warmed up", flush=True)
        return self

    def close(self) -> None:
        if self.api is not None:
            self.api.close()
        if self.service is not None:
            self.service.stop()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_batch(self, batch: int) -> None:
        """Retune the pools the jobs use (ai_photo: face and diffusion; art_style:
        diffusion) live and wait until their replicas run it."""
        if batch == self.batch_now:
            return
        from ray import serve

        from serve.app import APP_NAME
        from serve.tuning import POOL_DEPLOYMENTS, retune

        for pool in ("face", "diffusion") if self.spec.kind == "ai_photo" else ("diffusion",):
            retune(pool, {"max_batch_cost": batch})
            handle = serve.get_deployment_handle(POOL_DEPLOYMENTS[pool], app_name=APP_NAME)
            deadline = time.monotonic() + 30
            while handle.batching_now.remote().result(timeout_s=10)["max_batch_cost"] != batch:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{pool} did not take max_batch_cost {batch} in 30 s")
                time.sleep(0.1)
        self.batch_now = batch

    def run(self, batch: int, jobs: int) -> RunResult:
        self.set_batch(batch)
        views, posted, post_span = measure_service(self.api, self.spec, jobs)
        return service_result(f"service b{batch}", batch, views, posted, post_span)


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
    """Validate and store ``count`` jobs as the API does."""
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


def run_queue_wait_s() -> float | None:
    """Seconds this thread has spent runnable but waiting for a core (Linux schedstat)."""
    try:
        return int(Path("/proc/thread-self/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


class InProcessBench:
    """Raw: the stages loaded once in this process, with their own embedded Redis."""

    def __init__(self, base: Settings, root: Path, batch: int, spec: JobSpec) -> None:
        self.settings = bench_settings(base, root, "raw", batch)
        self.root, self.spec, self.batch = root, spec, batch
        self.server = None
        self.stages: Stages | None = None

    def __enter__(self) -> InProcessBench:
        from pipeline.state.redis_server import RedisServer

        print("[raw] loading models ...", flush=True)
        self.server = RedisServer(self.root / "raw" / "redis").start()
        try:
            self.stages = load_stages(self.settings, self.server.url, self.spec.kind)
        except BaseException:
            self.server.stop()
            raise
        return self

    def use_actor_threads(self) -> None:
        """torch_num_threads (1) intra-op threads, as every actor runs, in the calling
        thread: set in the thread that loaded the stages (a loader thread), the setting
        does not reach this one, which then ran 2 threads on both cores."""
        import torch

        torch.set_num_threads(self.settings.models.torch_num_threads)

    def warm_up(self) -> None:
        """One full chunk of B and one of 1, as the service's warm-up does, in the thread
        and on the core the runs use (warmed up in the loader thread, on other threads,
        repetition 1's raw bB was the slowest of five in every run)."""
        self.use_actor_threads()
        with self.own_core():
            warm = accept_items(self.stages, self.spec, self.batch + 1)
            if run_chunk(self.stages, warm[:-1]) or run_chunk(self.stages, warm[-1:]):
                raise RuntimeError("in-process warm-up jobs failed")

    def __exit__(self, *exc: object) -> None:
        if self.server is not None:
            self.server.stop()

    def run(self, batch: int, jobs: int) -> RunResult:
        """Accept (validate, strip, encrypt, store) and run the stages, in chunks of
        ``batch``, all timed; the same work the service does, without Ray or HTTP."""
        self.use_actor_threads()
        latencies, failures = [], []
        with self.own_core() as moved:
            wait_started = run_queue_wait_s()
            started = time.perf_counter()
            for i in range(0, jobs, batch):
                chunk = accept_items(self.stages, self.spec, min(batch, jobs - i))
                failures += run_chunk(self.stages, chunk)
                latencies += [time.perf_counter() - started] * len(chunk)
            elapsed = time.perf_counter() - started
            waited = run_queue_wait_s()
        notes = "latency: start of timed region -> chunk done; " + (
            f"on a core of its own, {moved} threads of the idle service on the others"
            if moved else "sharing every core with the idle service")
        return RunResult(f"raw b{batch}", jobs, batch, elapsed, latencies, failures,
                         notes=notes,
                         load_1m=os.getloadavg()[0],
                         waited=(waited - wait_started) / elapsed
                         if wait_started is not None and waited is not None else None)

    def own_core(self) -> AbstractContextManager[int]:
        """This thread and its Redis on one core; every other process below this one (the
        idle service: Ray's GCS, raylet, workers, replicas, the service's Redis) on the
        other cores (``cores_apart``; yields the threads moved)."""
        import psutil

        redis_pid = self.server.process.pid
        return cores_apart([redis_pid], lambda: [
            p.pid for p in psutil.Process().children(recursive=True) if p.pid != redis_pid])


# --- report ------------------------------------------------------------------------------


def configs(batch: int) -> list[str]:
    """The four configurations in the order each repetition runs them: every ratio's two
    runs are adjacent (service b1|service bB, service bB|raw bB, raw bB|raw b1)."""
    return ["service b1", f"service b{batch}", f"raw b{batch}", "raw b1"]


def ratios(runs: dict[str, list[RunResult]], batch: int) -> dict[str, list[float]]:
    """Per-repetition ratios, keyed by the closing lines' labels (with batch 8 spelt 8)."""
    def jps(name: str) -> list[float]:
        return [r.jobs_per_s for r in runs[name]]

    return {
        "raw batch8/batch1 throughput": paired_ratios(jps(f"raw b{batch}"), jps("raw b1")),
        "batch8/batch1 throughput": paired_ratios(jps(f"service b{batch}"), jps("service b1")),
        "service/raw throughput": paired_ratios(jps(f"service b{batch}"), jps(f"raw b{batch}")),
    }


def label(name: str, batch: int) -> str:
    return name.replace("8", str(batch))


def print_report(runs: dict[str, list[RunResult]], measured: dict[str, Spread],
                 batch: int) -> None:
    header = ("config", "jobs", "batch", "elapsed s", "jobs/s median [min-max] IQR",
              "p50 s", "p95 s")
    rows = []
    for name, results in runs.items():
        r0 = results[0]
        rows.append((name, str(r0.jobs), str(r0.batch),
                     f"{Spread.of(r.elapsed_s for r in results).median:.2f}",
                     Spread.of(r.jobs_per_s for r in results).format(3),
                     f"{Spread.of(percentile(r.latencies_s, 50) for r in results).median:.2f}",
                     f"{Spread.of(percentile(r.latencies_s, 95) for r in results).median:.2f}"))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print()
    print(f"medians over {len(next(iter(runs.values())))} interleaved repetitions")
    print(line.format(*header))
    print(line.format(*["-" * w for w in widths]))
    for row in rows:
        print(line.format(*row))
    print()
    for name, results in runs.items():
        sizes = {stage: dict(sum((Counter(r.batch_sizes.get(stage, {})) for r in results),
                                 Counter())) for stage in ("face", "diffusion")} \
            if results[0].batch_sizes else {}
        failures = [f for r in results for f in r.failures]
        extra = f"; batch sizes per job, all runs {sizes}" if sizes else ""
        failed = f"; FAILED {len(failures)}: {sorted(set(failures))}" if failures else ""
        share = ("; share of the run spent waiting for a core " + Spread.of(
            r.waited for r in results).format() if results[0].waited is not None else "")
        print(f"  {name}: {results[0].notes}{extra}{share}{failed}")
    loads = Spread.of(r.load_1m for results in runs.values() for r in results)
    cores = os.cpu_count() or 1
    print(f"  machine load (1-min average at each run's end) {loads.format(1)} on {cores} "
          f"cores" + (": busy, so the spreads include other work's noise" if loads.max > cores
                      else ""))
    print()
    print("ratios: median of the per-repetition ratios, [min-max], IQR")
    for text in table({label(k, batch): s for k, s in measured.items()}):
        print(f"  {text}")
    print("  per repetition: " + "; ".join(
        f"{label(k, batch).removesuffix(' throughput')} "
        + " ".join(f"{v:.2f}" for v in s.values) for k, s in measured.items()))


def write_outputs(runs: dict[str, list[RunResult]], measured: dict[str, Spread],
                  meta: dict) -> None:
    OUT_DIR.mkdir(exist_ok=True)
    payload = {
        **meta,
        "runs": [{**r.summary(), "repetition": i + 1}
                 for name in runs for i, r in enumerate(runs[name])],
        "jobs_per_s": {name: Spread.of(r.jobs_per_s for r in results).as_dict()
                       for name, results in runs.items()},
        "ratios": {k: s.median for k, s in measured.items()},  # medians, as before
        "ratio_spreads": {k: s.as_dict() for k, s in measured.items()},
    }
    path = OUT_DIR / "bench_service.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path.relative_to(REPO)}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    boxplot(left, {name: [r.jobs_per_s for r in results] for name, results in runs.items()},
            ylabel="jobs/s", title="throughput per run")
    boxplot(right, {label(k, meta["batch"]).removesuffix(" throughput"): s.values
                    for k, s in measured.items()},
            ylabel="ratio", title="per-repetition ratios", reference=1.0)
    fig.suptitle(f"bench_service: {meta['kind']}, {meta['jobs']} jobs per run, "
                 f"{meta['repetitions']} interleaved repetitions (box: IQR, whiskers: min-max)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(OUT_DIR / "bench_service.png", dpi=120)
    plt.close(fig)
    print(f"wrote {(OUT_DIR / 'bench_service.png').relative_to(REPO)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=None,
                        help=f"jobs per measured run (default 16; --quick {QUICK_JOBS})")
    parser.add_argument("--batch", type=int, default=8, help="max_batch_cost B to compare")
    parser.add_argument("--kind", choices=sorted(STYLE_FOR_KIND), default="ai_photo")
    parser.add_argument("--repetitions", type=int, default=MIN_REPETITIONS,
                        help=f"interleaved repetitions of every configuration (default "
                             f"{MIN_REPETITIONS})")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_JOBS} art_style jobs per run")
    args = parser.parse_args()
    if args.quick:
        args.kind = "art_style"
        args.jobs = args.jobs or QUICK_JOBS
    args.jobs = args.jobs or 16
    if args.jobs < 1 or args.batch < 2 or args.repetitions < 1:
        parser.error("--jobs and --repetitions must be at least 1, --batch at least 2")
    warnings.filterwarnings("ignore", category=FutureWarning)  # diffusers' config notices
    started = time.monotonic()
    load_start = os.getloadavg()
    print(f"machine load (1, 5, 15-min averages) {', '.join(f'{x:.1f}' for x in load_start)} "
          f"on {os.cpu_count()} cores", flush=True)
    base = load_settings()  # once: every run uses the same configs
    root = Path(tempfile.mkdtemp(prefix="ephemera-bench-"))
    spec = JobSpec(args.kind, STYLE_FOR_KIND[args.kind], sample_photo(), crypto.new_device_key())
    b = args.batch
    try:
        ensure_tiny_models(bench_settings(base, root, "models", b))
        print(f"[setup] tiny models built: {time.monotonic() - started:.1f} s", flush=True)
        with ExitStack() as stack, ThreadPoolExecutor(1) as loader:
            # this process loads its stages while the service's replicas start
            raw_bench = InProcessBench(base, root, b, spec)
            raw_loaded = loader.submit(raw_bench.__enter__)
            try:
                service = stack.enter_context(ServiceBench(base, root, b, spec))
            finally:
                raw = raw_loaded.result()  # waits for the load; raises if it failed
                stack.push(raw_bench.__exit__)
            raw.warm_up()
            print(f"[setup] {time.monotonic() - started:.1f} s (models, service, warm-ups)",
                  flush=True)
            order = configs(b)
            runners = {order[0]: lambda _: service.run(1, args.jobs),
                       order[1]: lambda _: service.run(b, args.jobs),
                       order[2]: lambda _: raw.run(b, args.jobs),
                       order[3]: lambda _: raw.run(1, args.jobs)}
            print(f"{args.repetitions} repetitions of {', '.join(order)}; "
                  f"{args.jobs} {args.kind} jobs per run", flush=True)
            quiet_waits: list[float] = []
            runs = interleave(runners, args.repetitions,
                              between=lambda name, rep: quiet_waits.append(wait_until_quiet(
                                  below_cores=QUIET_BELOW_CORES, window_s=QUIET_WINDOW_S,
                                  timeout_s=QUIET_TIMEOUT_S)),
                              log=lambda text: print(text, flush=True))
            quiet = Spread.of(quiet_waits)
            print(f"waited for a quiet machine (< {QUIET_BELOW_CORES:g} cores busy for "
                  f"{QUIET_WINDOW_S:g} s) before each run: {quiet.format(2)} s, "
                  f"{sum(w >= QUIET_TIMEOUT_S for w in quiet_waits)} of {len(quiet_waits)} "
                  f"gave up at {QUIET_TIMEOUT_S:g} s", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    measured = {k: Spread.of(v) for k, v in ratios(runs, b).items()}
    wall_s = time.monotonic() - started
    print_report(runs, measured, b)
    target = measured["service/raw throughput"].within(SPREAD_TARGET)
    write_outputs(runs, measured, {"kind": args.kind, "style": spec.style,
                                   "jobs": args.jobs, "batch": b,
                                   "repetitions": args.repetitions,
                                   "order": configs(b), "fixed_replicas": FIXED_REPLICAS,
                                   "max_wait_ms": MAX_WAIT_MS, "wall_s": wall_s,
                                   "quiet_waits_s": quiet.as_dict(),
                                   "quiet_below_cores": QUIET_BELOW_CORES,
                                   "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
                                   "cpu_count": os.cpu_count(),
                                   "spread_target": SPREAD_TARGET,
                                   "service_raw_within_target": target})
    print(target_line("service/raw", measured["service/raw throughput"], SPREAD_TARGET))
    print(f"wall time: {wall_s:.1f} s")
    for name, spread in measured.items():  # the three closing lines: medians
        print(f"{label(name, b)}: {spread.median:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
