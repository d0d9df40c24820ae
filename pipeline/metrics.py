"""Retention metrics, read from Redis: purge lag, oldest surviving input, purge failures."""

from __future__ import annotations

import time

from pipeline.jobs import JobStore
from pipeline.ledger import PURGE_FAILURES_KEY


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100.0 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def retention_metrics(jobs: JobStore, now_s: float | None = None) -> dict[str, float]:
    """Gauges for operators. Ages are 0 when nothing of that class is stored."""
    now = time.time() if now_s is None else now_s
    lags = jobs.purge_lags_s()
    oldest_input = jobs.ledger.oldest_created_s("input")
    oldest_face = jobs.ledger.oldest_created_s("face_data")
    return {
        "ephemera_purge_lag_p50_s": percentile(lags, 50) or 0.0,
        "ephemera_purge_lag_p99_s": percentile(lags, 99) or 0.0,
        "ephemera_purge_lag_samples": float(len(lags)),
        "ephemera_oldest_input_age_s": now - oldest_input if oldest_input else 0.0,
        "ephemera_oldest_face_data_age_s": now - oldest_face if oldest_face else 0.0,
        "ephemera_purge_failures_total": float(jobs.redis.get(PURGE_FAILURES_KEY) or 0),
        "ephemera_tracked_objects": float(jobs.ledger.count()),
    }


def render_prometheus(metrics: dict[str, float]) -> str:
    return "".join(f"# TYPE {name} gauge\n{name} {value:.6f}\n" for name, value in metrics.items())
