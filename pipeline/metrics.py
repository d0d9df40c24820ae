"""Service metrics read from Redis, rendered in the Prometheus text format, and the
operator's status table. Shared by every replica, so any ingress answers for all.

Names follow Prometheus conventions: base units in the name (``_seconds``), counters end
in ``_total``, every metric has HELP and TYPE. Per-process metrics (stage latency, batch
sizes, rejections) go through Ray's metrics agent instead: see serve/telemetry.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pipeline import keys
from pipeline.jobs import JobStore
from pipeline.records import JobStatus, ObjectClass, Stage

QUANTILES = (0.5, 0.9, 0.99)


@dataclass(frozen=True, slots=True)
class Metric:
    """One metric family: a name, its type and help, and labelled samples."""

    name: str
    kind: str  # "gauge" | "counter" | "summary"
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)
    suffixed: list[tuple[str, float]] = field(default_factory=list)  # summary _sum/_count


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100.0 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def service_metrics(jobs: JobStore, now_s: float | None = None) -> list[Metric]:
    """What operators watch, from Redis: purge lag, oldest surviving input and face data,
    purge failures, jobs waiting and running, batch fill per stage."""
    now = time.time() if now_s is None else now_s
    lags = jobs.purge_lags_s()
    ages = {cls: jobs.ledger.oldest_created_s(cls) for cls in (ObjectClass.INPUT,
                                                                ObjectClass.FACE_DATA)}
    by_status = jobs.unfinished_counts()
    fills = {stage: jobs.batch_fills(stage) for stage in Stage}
    return [
        Metric("ephemera_purge_lag_seconds", "summary",
               "Time from a job's end until its inputs were verified gone (newest 10,000).",
               [({"quantile": str(q)}, percentile(lags, q * 100) or 0.0) for q in QUANTILES],
               [("_sum", sum(lags)), ("_count", float(len(lags)))]),
        Metric("ephemera_oldest_object_age_seconds", "gauge",
               "Age of the oldest input or face-data object still stored (0: none).",
               [({"object_class": cls.value}, now - created if created else 0.0)
                for cls, created in ages.items()]),
        Metric("ephemera_purge_failures_total", "counter",
               "Deletions that failed or could not be verified (retried by the sweep).",
               [({}, float(jobs.redis.get(keys.PURGE_FAILURES) or 0))]),
        Metric("ephemera_tracked_objects", "gauge",
               "Objects with a retention record (inputs, face data, pending outputs).",
               [({}, float(jobs.ledger.count()))]),
        Metric("ephemera_jobs_unfinished", "gauge",
               "Accepted jobs not yet ended, by status (queued: waiting for a batch).",
               [({"status": s.value}, float(by_status.get(s, 0)))
                for s in (JobStatus.QUEUED, JobStatus.RUNNING)]),
        Metric("ephemera_batch_fill_ratio", "gauge",
               "Mean cost of recent batches over the pool's max_batch_cost (newest 1,000).",
               [({"stage": stage.value}, sum(f) / len(f) if f else 0.0)
                for stage, f in fills.items()]),
    ]


def render_prometheus(metrics: list[Metric]) -> str:
    lines: list[str] = []
    for m in metrics:
        lines += [f"# HELP {m.name} {m.help}", f"# TYPE {m.name} {m.kind}"]
        for labels, value in m.samples:
            label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
            lines.append(f"{m.name}{{{label_text}}} {value:.6f}" if label_text
                         else f"{m.name} {value:.6f}")
        lines += [f"{m.name}{suffix} {value:.6f}" for suffix, value in m.suffixed]
    return "\n".join(lines) + "\n"


def render_status(deployments: dict[str, dict], metrics: list[Metric] | None) -> str:
    """The `ephemera status` table: replicas per deployment, then the service metrics."""
    lines = [f"{'deployment':<22} {'status':<10} replicas   live config"]
    for name, info in deployments.items():
        replicas = ", ".join(f"{n} {state.lower()}" for state, n in info["replicas"].items())
        config = info.get("user_config") or ""
        lines.append(f"{name:<22} {info['status']:<10} {replicas:<10} {config}")
    for m in metrics or []:
        for labels, value in m.samples:
            tag = ",".join(f"{v}" for v in labels.values())
            lines.append(f"{m.name}{'[' + tag + ']' if tag else ''}: {value:.3f}")
    return "\n".join(lines)
