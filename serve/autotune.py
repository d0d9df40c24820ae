"""`ephemera tune POOL --auto`: measure each batching setting of a pool on the running app
under generated traffic at a set offered load, and pick the one with the most throughput
that meets a p95 latency target.

Each setting is applied live through Serve's config path (``serve.tuning.retune``: replicas
reconfigure, none restarts), then ``jobs`` jobs arrive open-loop at ``offered_rps`` (one
POST every 1/rps seconds, whatever the service does: the load an app's users make, not a
closed loop that slows down with the service). Throughput is succeeded jobs over the span
from the first job's creation to the last one's end; latencies are the jobs' own
``finished_s - created_s`` as the API reports them. A setting where any job failed is never
chosen. Perf Analyzer / Model Analyzer do the same for Triton; this is ours because the unit
of work is a whole job (media decode, every stage, the store), not one model call.

The traffic is real jobs (art_style for the diffusion and runner pools, ai_photo for the
face pool) made from a photo that ships with scikit-image, under throwaway accounts
``tune-<run>-<n>``, each deleted (outputs, records, with receipts) after its setting.
"""

from __future__ import annotations

import io
import itertools
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

KIND_FOR_POOL = {"diffusion": ("art_style", "watercolor"), "runner": ("art_style", "watercolor"),
                 "face": ("ai_photo", "portrait")}


@dataclass(frozen=True)
class Measured:
    """One setting under load."""

    setting: dict[str, Any]
    offered_rps: float
    jobs: int
    succeeded: int
    failed: int
    throughput_jobs_s: float
    p50_s: float
    p95_s: float
    wall_s: float
    batch_sizes: list[int] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        return asdict(self)


def sweep_grid(costs: Sequence[int], waits_ms: Sequence[float],
               concurrent: Sequence[int] = (), replicas: Sequence[int] = ()
               ) -> list[dict[str, Any]]:
    """Every combination of the given knobs (``max_batch_cost``, ``max_wait_ms`` and, if
    given, ``max_concurrent_batches`` and ``num_replicas``), in a stable order."""
    if not costs or not waits_ms:
        raise ValueError("give at least one cost and one wait to sweep")
    grid = []
    for count, cost, wait, conc in itertools.product(replicas or [None], costs, waits_ms,
                                                     concurrent or [None]):
        setting: dict[str, Any] = {"max_batch_cost": int(cost), "max_wait_ms": float(wait)}
        if conc is not None:
            setting["max_concurrent_batches"] = int(conc)
        if count is not None:
            setting["num_replicas"] = int(count)
        grid.append(setting)
    return grid


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation, as numpy's default."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def choose(results: Sequence[Measured], p95_target_s: float) -> Measured | None:
    """The best setting: no failed job, p95 within the target, most throughput; ties go to
    the lower p95. None when no setting meets the target."""
    eligible = [r for r in results if r.failed == 0 and r.succeeded == r.jobs
                and r.p95_s <= p95_target_s]
    if not eligible:
        return None
    return max(eligible, key=lambda r: (round(r.throughput_jobs_s, 6), -r.p95_s))


def sample_photo() -> bytes:
    import skimage.data
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(out, format="PNG")
    return out.getvalue()


def drive(base_url: str, token: str | None, *, pool: str, offered_rps: float, jobs: int,
          setting: dict[str, Any], timeout_s: float = 600.0) -> Measured:
    """Offer ``jobs`` jobs at ``offered_rps`` and wait for every one to end."""
    from pipeline.security import crypto
    from serve.client import EphemeraClient

    kind, style = KIND_FOR_POOL[pool]
    photo, key, run = sample_photo(), crypto.new_device_key(), uuid.uuid4().hex[:8]
    started = time.monotonic()

    def post(n: int) -> tuple[str, str]:
        time.sleep(max(0.0, started + n / offered_rps - time.monotonic()))
        account = f"tune-{run}-{n}"
        with EphemeraClient(base_url, token=token, timeout_s=120) as api:
            accepted = api.submit_job([("tune.png", photo)], device_key=key, kind=kind,
                                      style=style, account_id=account)
        return account, accepted.job_id

    with ThreadPoolExecutor(min(32, jobs)) as executor:
        submitted = list(executor.map(post, range(jobs)))
    views = []
    with EphemeraClient(base_url, token=token, timeout_s=60) as api:
        for account, job_id in submitted:
            remaining = max(1.0, timeout_s - (time.monotonic() - started))
            views.append(api.wait_job(account, job_id, timeout_s=remaining, poll_s=0.1,
                                      until_purged=False))
        for account, _ in submitted:  # throwaway accounts: deleted, with receipts
            api.delete_account(account)
    ok = [v for v in views if v.status == "succeeded"]
    latencies = [v.finished_s - v.created_s for v in ok if v.finished_s]
    span = (max(v.finished_s for v in ok if v.finished_s) - min(v.created_s for v in views)
            if ok else float("inf"))
    return Measured(setting=setting, offered_rps=offered_rps, jobs=jobs, succeeded=len(ok),
                    failed=len(views) - len(ok),
                    throughput_jobs_s=len(ok) / span if ok else 0.0,
                    p50_s=percentile(latencies, 50), p95_s=percentile(latencies, 95),
                    wall_s=time.monotonic() - started,
                    batch_sizes=[getattr(v.batch_sizes, _stage(pool)) or 0 for v in ok])


def _stage(pool: str) -> str:
    return "face" if pool == "face" else "diffusion"


def sweep(pool: str, grid: Sequence[dict[str, Any]], *, base_url: str, token: str | None,
          offered_rps: float, jobs: int,
          apply: Callable[[str, dict[str, Any]], dict[str, Any]] | None = None,
          on_result: Callable[[Measured], None] | None = None) -> list[Measured]:
    """Apply each setting live (``apply``, default ``serve.tuning.retune``) and measure it."""
    if apply is None:
        from serve.tuning import retune as apply
    results = []
    for setting in grid:
        apply(pool, setting)
        result = drive(base_url, token, pool=pool, offered_rps=offered_rps, jobs=jobs,
                       setting=setting)
        results.append(result)
        if on_result:
            on_result(result)
    return results


def table(results: Sequence[Measured], chosen: Measured | None, p95_target_s: float) -> str:
    lines = [f"{'setting':<52} {'jobs/s':>7} {'p50 s':>7} {'p95 s':>7} {'failed':>6} "
             f"{'mean batch':>10}"]
    for r in results:
        mark = " <- chosen" if r is chosen else (
            "" if r.p95_s <= p95_target_s and not r.failed else "  (misses target)")
        batch = statistics.mean(r.batch_sizes) if r.batch_sizes else 0.0
        knobs = ", ".join(f"{k}={v:g}" for k, v in r.setting.items())
        lines.append(f"{knobs:<52} {r.throughput_jobs_s:7.3f} {r.p50_s:7.2f} {r.p95_s:7.2f} "
                     f"{r.failed:6d} {batch:10.2f}{mark}")
    return "\n".join(lines)


def plot(results: Sequence[Measured], chosen: Measured | None, p95_target_s: float,
         path: Any, title: str) -> bool:
    """Throughput against p95 per setting, the target line and the chosen one; False when
    matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        label = ", ".join(f"{k.replace('max_', '')}={v:g}" for k, v in r.setting.items())
        ax.scatter(r.p95_s, r.throughput_jobs_s, color="tab:red" if r is chosen else "tab:blue",
                   s=60 if r is chosen else 30)
        ax.annotate(label, (r.p95_s, r.throughput_jobs_s), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.axvline(p95_target_s, color="grey", linestyle="--", label="p95 target")
    ax.set(xlabel="p95 latency (s)", ylabel="throughput (jobs/s)", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
