"""Per-process metrics through Ray's metrics agent (``ray.serve.metrics``): each node
exports them for Prometheus on its metrics port, beside Serve's own (queue lengths, batch
wait and size, replica counts); each process counts only its own events, so summing over
nodes is right. Cluster-wide gauges read from Redis live in pipeline/state/metrics.py and
are served at /metrics, scraped through one target; none of them may be declared here
(a test keeps the names apart), or every node would export them again.
"""

from __future__ import annotations

import time

from ray.serve.metrics import Counter, Histogram

from pipeline.core.records import Stage, WorkItem

_LATENCY_BUCKETS_S = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300]
_SIZE_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128]

STAGE_LATENCY = Histogram(
    "ephemera_stage_latency_seconds", description="One stage call as a job runner sees it "
    "(queueing, batching and the model call).", boundaries=_LATENCY_BUCKETS_S,
    tag_keys=("stage", "outcome"))
QUEUE_WAIT = Histogram(
    "ephemera_queue_wait_seconds", description="From a runner sending a job to a stage until "
    "its batch starts.", boundaries=_LATENCY_BUCKETS_S, tag_keys=("stage",))
BATCH_SIZE = Histogram(
    "ephemera_batch_size_jobs", description="Jobs in one model call.", boundaries=_SIZE_BUCKETS,
    tag_keys=("stage",))
REJECTIONS = Counter(
    "ephemera_rejections_total", description="Jobs refused for capacity: 429 (account "
    "limit) or 503 (service full).", tag_keys=("code",))


def observe_stage(stage: Stage, started_s: float, outcome: str) -> None:
    STAGE_LATENCY.observe(time.time() - started_s, tags={"stage": stage.value, "outcome": outcome})


def observe_batch(stage: Stage, items: list[WorkItem]) -> None:
    now = time.time()
    BATCH_SIZE.observe(len(items), tags={"stage": stage.value})
    for item in items:
        if item.sent_s:
            QUEUE_WAIT.observe(max(0.0, now - item.sent_s), tags={"stage": stage.value})


def count_rejection(code: int) -> None:
    REJECTIONS.inc(tags={"code": str(code)})
