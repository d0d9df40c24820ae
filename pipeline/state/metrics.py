"""Service metrics read from Redis, rendered in the Prometheus text format, and the
operator's status table. Shared by every replica, so any ingress answers for all.

Cluster-wide, exported once: every ingress replica serves the same values at GET /metrics
(read from Redis when asked), so Prometheus must scrape them through ONE target, the load
balancer or the Kubernetes Service in front of the proxies, never each replica or node
(N targets would make every ``sum()`` N times too large). None of these families is also
exported through Ray's metrics agent, which runs on every node; a test keeps the two sets
of names apart. Prometheus may use the metrics token (service.yaml metrics_token_env),
which opens /metrics only, instead of the users' API token.

Names follow Prometheus conventions: base units in the name (``_seconds``), counters end
in ``_total``, every metric has HELP and TYPE. Per-process metrics (stage latency, batch
sizes, rejections) go through Ray's metrics agent instead, scraped per node and summed:
see serve/telemetry.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pipeline.core.records import JobStatus, ObjectClass, Stage
from pipeline.state import keys
from pipeline.state.job_store import JobStore

QUANTILES = (0.5, 0.9, 0.99)
PURGE_LAG_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)


@dataclass(frozen=True, slots=True)
class Metric:
    """One metric family: a name, its type and help, and labelled samples."""

    name: str
    kind: str  # "gauge" | "counter" | "histogram"
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)
    suffixed: list[tuple[str, float]] = field(default_factory=list)  # histogram _sum/_count
    sample_suffix: str = ""  # "_bucket" for a histogram's buckets
    lags: list[float] = field(default_factory=list)  # the raw values (status table only)


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
        Metric("ephemera_purge_lag_seconds", "histogram",
               "Time from a job's end until its inputs were verified gone (newest 10,000).",
               [({"le": str(b)}, float(sum(lag <= b for lag in lags)))
                for b in PURGE_LAG_BUCKETS_S] + [({"le": "+Inf"}, float(len(lags)))],
               [("_sum", sum(lags)), ("_count", float(len(lags)))], sample_suffix="_bucket",
               lags=lags),
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
               "Accepted jobs not yet ended, by status and batch bucket: the queue depth.",
               [({"status": status.value, "bucket": bucket}, float(n))
                for (status, bucket), n in sorted(by_status.items())]
               or [({"status": JobStatus.QUEUED.value, "bucket": ""}, 0.0)]),
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
            name = m.name + m.sample_suffix
            lines.append(f"{name}{{{label_text}}} {value:.6f}" if label_text
                         else f"{name} {value:.6f}")
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
        if m.name == "ephemera_purge_lag_seconds":  # a histogram: print its percentiles
            lags = m.lags
            for q in QUANTILES:
                lines.append(f"purge lag p{q * 100:g}: {percentile(lags, q * 100) or 0.0:.3f} s")
            continue
        for labels, value in m.samples:
            tag = ",".join(v for v in labels.values() if v)
            lines.append(f"{m.name}{'[' + tag + ']' if tag else ''}: {value:.3f}")
    return "\n".join(lines)
