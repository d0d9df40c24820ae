"""Load test: an open-loop overload on loopback with a replica of each kind killed under it.

Run:  .venv/bin/python scripts/load.py --quick      (30 s of load; about 3 minutes)
      .venv/bin/python scripts/load.py              (60 s of load)

SIMULATED GPUs (as in bench_scale.py: the diffusion pool sleeps by the A100 cost model and
uses no CPU); everything else is real and local: HTTP, ingress, job runners, Redis, the
store, retention. The offered rate is --overload (default 10) times the pool's capacity
from the cost model (replicas x full batches per second). Requests are sent on a fixed
schedule whatever the answers (open loop), bounded in count and time, to 127.0.0.1 only.

Under the load it kills (SIGKILL) one replica each of the ingress, a job runner, the
diffusion pool and the retention pool, spread over the run. Then it waits until every
accepted job ended and was purged (jobs stranded by a dead ingress are reaped after the
job timeout), and counts:
  accepted  answered 202;  rejected  every other final answer: 429/503 (back-pressure, with
  Retry-After) and anything else, exceptions included;  succeeded / failed  final status
  of accepted jobs;  lost  accepted jobs with no final status;  inputs left  input and
  face-data objects still stored;  5xx  final answers 500-599 other than a 503 with
  Retry-After (target 0).
Requests go through the typed client with a retry policy for what a fault cuts off: a
500/502/504 (Serve's proxy answers 500 for a request cut by the ingress's death), a 409
with Retry-After (the dead ingress's claim of the Idempotency-Key, until its lease lapses)
and connection errors are retried with the same Idempotency-Key, so no job is made twice.
A 429 or 503 is a refusal the open loop counts as it comes, not retried. Retries are
counted apart ("retried"), by what was retried, never as final answers.
It samples the resident memory of every Ray, Serve and Redis process each second and
prints the peak per process kind, to show memory stays bounded under overload. Ends with
`accepted: A, succeeded: S, failed: F, rejected: J, lost: L, inputs left: I, 5xx: N`;
exits 1 unless lost, inputs left and 5xx are all 0.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import skimage.data
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.core.config import PoolConfig, SimulatedGpuConfig, StageBatchConfig, load_settings
from pipeline.security import crypto
from scripts.bench_scale import replica_pids
from serve.client import ApiError, EphemeraClient, RetryPolicy, job_call, retry_after
from serve.schemas import JobView

OUT_DIR = REPO / "bench-out"
DIFFUSION_REPLICAS = 2
BATCH_COST = 8
KILLS = ("ApiDeployment", "JobRunnerDeployment", "DiffusionDeployment", "RetentionDeployment")
# Retry what a fault cut off (every call is idempotent: POST /v1/jobs carries an
# Idempotency-Key, the same on each retry); leave 429/503 refusals to be counted. Patient
# enough for a dead ingress's claim on a key (409 + Retry-After until its lease lapses).
CUT_OFF_RETRY = RetryPolicy(max_retries=6, backoff_s=0.5, max_backoff_s=10.0,
                            retry_status=frozenset({500, 502, 504}))


def answer_label(response: httpx.Response) -> str:
    """The status code; a 429/503 without Retry-After is told apart (a client cannot pace
    its retry, so it counts as a 5xx for a 503)."""
    code = response.status_code
    if code in (429, 503) and retry_after(response) is None:
        return f"{code} without Retry-After"
    return str(code)


def is_5xx(label: str) -> bool:
    """A final answer a client must not see: any 5xx but a 503 with Retry-After."""
    return label[:1] == "5" and label != "503"


def retry_label(why: httpx.Response | Exception) -> str:
    return str(why.status_code) if isinstance(why, httpx.Response) else type(why).__name__


def load_settings_for(root: Path, job_timeout_s: float):
    base = load_settings()
    return base.model_copy(update={
        "service": base.service.model_copy(update={
            "max_jobs_in_flight_per_account": 10_000, "ray_num_cpus": 16,
            "job_timeout_s": job_timeout_s, "heartbeat_lease_s": 5.0}),
        "storage": base.storage.model_copy(update={"local_root": str(root / "store")}),
        "models": base.models.model_copy(update={"diffusion_backend": "simulated",
                                                 "simulated": SimulatedGpuConfig()}),
        "batching": base.batching.model_copy(update={
            "stage_timeout_s": job_timeout_s / 2, "max_attempts": 2,
            "diffusion": StageBatchConfig(max_batch_cost=BATCH_COST, max_wait_ms=100)}),
        "retention": base.retention.model_copy(update={"sweep_interval_s": 1.0}),
        "deployments": base.deployments.model_copy(update={
            "api": PoolConfig(num_replicas=1, num_cpus=1, max_ongoing_requests=8,
                              max_queued_requests=16),
            # Small bounded queues: overload is refused at once instead of piling up.
            # In flight at most 2 x 12 + 8 jobs: about 20 s of the pool's work, inside
            # the stage timeout, so a queued job waits rather than times out.
            "runner": PoolConfig(num_replicas=2, num_cpus=0, max_ongoing_requests=12,
                                 max_queued_requests=8),
            "diffusion": PoolConfig(num_replicas=DIFFUSION_REPLICAS, num_cpus=0,
                                    max_queued_requests=32),
        }),
    })


def photo() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()[:128, :128]).save(buffer, format="JPEG")
    return buffer.getvalue()


def rss_by_kind() -> dict[str, int]:
    """Resident bytes of every Ray/Serve/Redis process on this machine, by process kind."""
    kinds: dict[str, int] = defaultdict(int)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            status = (entry / "status").read_text()
        except OSError:
            continue
        kind = next((k for k in ("ApiDeployment", "JobRunnerDeployment", "DiffusionDeployment",
                                 "RetentionDeployment", "FaceDeployment", "ServeController",
                                 "ProxyActor", "raylet", "gcs_server", "redis-server",
                                 "valkey-server") if k in cmd), None)
        if kind is None:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                kinds[kind] += int(line.split()[1]) * 1024
    return dict(kinds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="30 s of load instead of 60")
    parser.add_argument("--overload", type=float, default=10.0, help="x measured capacity")
    args = parser.parse_args()
    from serve.launcher import start_service

    duration_s = 30.0 if args.quick else 60.0
    gpu = SimulatedGpuConfig()
    capacity = DIFFUSION_REPLICAS * BATCH_COST / (gpu.overhead_s + gpu.s_per_unit * BATCH_COST)
    rate = args.overload * capacity
    job_timeout_s = 60.0
    key = crypto.new_device_key()
    data = photo()
    outcomes: dict[str, int] = defaultdict(int)  # final answer (status) or exception name
    retried: dict[str, int] = defaultdict(int)  # what was retried: status or exception name
    accepted: list[tuple[str, str]] = []  # (account, job id)
    rss_peaks: dict[str, int] = defaultdict(int)
    rss_timeline: list[tuple[float, int]] = []
    lock = threading.Lock()

    with tempfile.TemporaryDirectory(prefix="ephemera-load-") as tmp:
        root = Path(tmp)
        settings = load_settings_for(root, job_timeout_s)
        def count_retry(call: object, why: httpx.Response | Exception) -> None:
            with lock:
                retried[retry_label(why)] += 1

        # Refusals are counted as they come (open loop); what a kill cut off is retried.
        with start_service(settings, workdir=root / "work") as service, \
                httpx.Client(base_url=service.base_url, timeout=30,
                             limits=httpx.Limits(max_connections=64)) as http, \
                EphemeraClient(http=http, retry=CUT_OFF_RETRY, on_retry=count_retry) as api:
            def post(n: int) -> None:
                account = f"load-{n % 50}"
                job_id = None
                try:
                    call = job_call([("p.jpg", data)], device_key=key, kind="art_style",
                                    style="watercolor", account_id=account)
                    r = api.send(call)
                    label = answer_label(r)
                    if r.status_code == 202:
                        job_id = call.parse(r).job_id
                except Exception as exc:  # every error is counted, not only httpx's
                    label = type(exc).__name__
                with lock:
                    outcomes[label] += 1
                    if job_id is not None:
                        accepted.append((account, job_id))

            def sample_rss(t0: float) -> None:
                kinds = rss_by_kind()
                for kind, value in kinds.items():
                    rss_peaks[kind] = max(rss_peaks[kind], value)
                rss_timeline.append((time.time() - t0, sum(kinds.values())))

            total = int(rate * duration_s)
            kill_at = {int(total * (i + 1) / (len(KILLS) + 1)): kind for i, kind in enumerate(KILLS)}
            killed = []
            print(f"offering {rate:.1f} jobs/s ({args.overload:g}x the {capacity:.2f} jobs/s the "
                  f"simulated pool can do) for {duration_s:.0f} s: {total} requests", flush=True)
            t0 = time.time()
            last_sample = 0.0
            with ThreadPoolExecutor(64) as pool:
                futures = []
                for n in range(total):
                    time.sleep(max(0.0, t0 + n / rate - time.time()))
                    futures.append(pool.submit(post, n))
                    if n in kill_at:
                        pid = replica_pids(kill_at[n])[0]
                        os.kill(pid, signal.SIGKILL)
                        killed.append(f"{kill_at[n]} at {time.time() - t0:.0f} s")
                    if time.time() - last_sample >= 1.0:
                        sample_rss(t0)
                        last_sample = time.time()
            for future in futures:  # post counts its errors; anything escaping it too
                if (exc := future.exception()) is not None:
                    outcomes[f"{type(exc).__name__} (uncounted)"] += 1
            print(f"load done in {time.time() - t0:.0f} s; killed {', '.join(killed)}", flush=True)
            views: dict[str, JobView] = {}
            drain_deadline = time.time() + job_timeout_s * 3
            while time.time() < drain_deadline:
                for account, job_id in accepted:
                    if job_id in views:
                        continue
                    try:
                        view = api.get_job(account, job_id)
                    except (httpx.HTTPError, ApiError, ValueError):
                        continue
                    if view.status.is_finished and view.inputs_purged_s:
                        views[job_id] = view
                if len(views) == len(accepted):
                    break
                sample_rss(t0)
                time.sleep(1.0)
            # Jobs a dead ingress stored but never handed over: reaped after the timeout.
            store = Path(settings.storage.local_root)
            for _ in range(int(job_timeout_s * 2)):
                left = [p for sub in ("inputs", "face") for p in (store / sub).rglob("*.bin")]
                if not left:
                    break
                time.sleep(1.0)
    succeeded = sum(v.status == "succeeded" for v in views.values())
    failed = sum(v.status == "failed" for v in views.values())
    rejected = sum(n for label, n in outcomes.items() if label != "202")
    fivexx = sum(n for label, n in outcomes.items() if is_5xx(label))
    lost = len(accepted) - len(views)
    reasons = defaultdict(int)
    for v in views.values():
        if v.status == "failed":
            reasons[v.reason] += 1
    print(f"\nanswers: {dict(outcomes)}  (final, after retries; a name: an exception)")
    print(f"retried: {dict(retried)}  (each retry, by the answer or error retried)")
    print("failure reasons:", dict(reasons))
    print(f"\n{'process kind':<22} {'peak RSS MiB':>12}")
    for kind, peak in sorted(rss_peaks.items()):
        print(f"{kind:<22} {peak / 2**20:>12.0f}")
    third = max(1, len(rss_timeline) // 3)
    early = max(v for _, v in rss_timeline[:third])
    late = max(v for _, v in rss_timeline[-third:])
    print(f"total RSS, peak of first third {early / 2**20:.0f} MiB, of last third "
          f"{late / 2**20:.0f} MiB")
    OUT_DIR.mkdir(exist_ok=True)
    (OUT_DIR / "load.json").write_text(json.dumps({
        "simulated": True, "rate_per_s": rate, "duration_s": duration_s, "answers": outcomes,
        "retried": retried, "5xx": fivexx,
        "succeeded": succeeded, "failed": failed, "lost": lost, "inputs_left": len(left),
        "rss_peaks": rss_peaks, "rss_timeline": rss_timeline, "killed": killed}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([t for t, _ in rss_timeline], [v / 2**20 for _, v in rss_timeline])
    ax.axvline(duration_s, color="grey", linestyle=":", label="load ends")
    ax.set(xlabel="s", ylabel="total RSS MiB", title=f"{args.overload:g}x overload, kills")
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT_DIR / "load.png", dpi=110)
    print(f"\naccepted: {len(accepted)}, succeeded: {succeeded}, failed: {failed}, "
          f"rejected: {rejected}, lost: {lost}, inputs left: {len(left)}, 5xx: {fivexx}")
    return 0 if lost == 0 and not left and fivexx == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
