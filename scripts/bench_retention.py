"""Benchmark: purge lag under a burst of jobs, and account-deletion throughput.

Run:  .venv/bin/python scripts/bench_retention.py [--jobs 200] [--outputs 10000]

1. Purge lag: submits a burst of art_style jobs over HTTP to the local service (tiny models,
   2 denoising steps so the burst is about purging, not generating) and reports, per job,
   the time from its end (succeeded/failed) to its inputs being verified gone: p50, p99, max.
2. Deletion throughput: gives one account N stored outputs (written straight into the
   service's store and index, as the output stage does), then DELETE /v1/accounts/{a} and
   polls the receipt until complete: objects verified gone per second, end to end.

Everything lives in a temporary directory removed at the end. Prints a table; writes
bench-out/bench_retention.json.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import redis
import skimage.data
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.core.config import load_settings  # noqa: E402
from pipeline.core.records import JobRecord, JobStatus, ObjectClass, OutputRecord, RetentionRecord  # noqa: E402
from pipeline.security import crypto  # noqa: E402
from pipeline.state.job_store import JobStore  # noqa: E402
from pipeline.state.metrics import percentile  # noqa: E402
from pipeline.storage.base import object_uri, open_stores, output_key  # noqa: E402
from serve.client import EphemeraClient  # noqa: E402
from serve.launcher import start_service  # noqa: E402


def bench_settings(root: Path):
    base = load_settings()
    return base.model_copy(update={
        "storage": base.storage.model_copy(update={"local_root": str(root / "store")}),
        "models": base.models.model_copy(update={
            "diffusion_model_dir": str(root / "models"), "num_inference_steps": 2}),
        "retention": base.retention.model_copy(update={"sweep_interval_s": 1.0}),
        "service": base.service.model_copy(update={"max_jobs_in_flight_per_account": 10_000}),
    })


def photo_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).resize((128, 128)).save(buffer, format="JPEG")
    return buffer.getvalue()


def purge_lags(api: EphemeraClient, num_jobs: int) -> dict:
    key = crypto.new_device_key()
    photo = photo_jpeg()

    def post(_: int) -> str:
        return api.submit_job([("p.jpg", photo)], device_key=key, kind="art_style",
                              style="comic", account_id="bench").job_id

    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        job_ids = list(pool.map(post, range(num_jobs)))
    pending, views = set(job_ids), {}
    while pending:
        for job_id in list(pending):
            view = api.get_job("bench", job_id)
            if view.inputs_purged_s:
                views[job_id] = view
                pending.discard(job_id)
        time.sleep(0.2)
    lags = [v.inputs_purged_s - v.finished_s for v in views.values()]
    ok = sum(v.status == "succeeded" and v.num_inputs_purged_verified == v.num_inputs
             for v in views.values())
    problems = Counter(f"{v.status}: {v.reason} (purged {v.num_inputs_purged_verified}"
                       f"/{v.num_inputs})" for v in views.values()
                       if v.status != "succeeded"
                       or v.num_inputs_purged_verified != v.num_inputs)
    return {"jobs": num_jobs, "succeeded_and_purged": ok, "problems": dict(problems),
            "burst_wall_s": time.monotonic() - started,
            "purge_lag_p50_s": percentile(lags, 50), "purge_lag_p99_s": percentile(lags, 99),
            "purge_lag_max_s": max(lags)}


def seed_outputs(service, account: str, count: int) -> None:
    store = open_stores(service.settings.storage).outputs
    jobs = JobStore(redis.Redis.from_url(service.settings.service.redis_url))
    png = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 100, 50)).save(png, format="PNG")
    now = time.time()
    job = JobRecord(job_id=uuid.uuid4().hex, account_id=account, kind="art_style",
                    style="comic", resolution_px=64, status=JobStatus.RUNNING, created_s=now,
                    updated_s=now, input_uris=[])
    jobs.create_job(job, [])
    for _ in range(count):
        output_id = uuid.uuid4().hex
        key = output_key(account, output_id, "png")
        out = OutputRecord(output_id, account, job.job_id, object_uri(store, key),
                           "image/png", time.time())
        pending = RetentionRecord(out.uri, ObjectClass.OUTPUT, account, job.job_id, now,
                                  now + 3600)
        jobs.ledger.register([pending])  # as the output stage does: record, write, index
        store.put(key, png.getvalue())
        jobs.add_output(out, pending)
    jobs.finish_job(job.job_id, ok=True)  # outputs are indexed while a job runs, as in the stage


def account_deletion(api: EphemeraClient, service, num_outputs: int) -> dict:
    account = "bench-heavy"
    seed_outputs(service, account, num_outputs)
    started = time.monotonic()
    receipt_id = api.delete_account(account).receipt_id
    # No deadline, as before: polls every 0.2 s until the receipt is complete.
    receipt = api.wait_deletion(account, receipt_id, timeout_s=float("inf"), poll_s=0.2)
    elapsed = time.monotonic() - started
    verified = sum(o.result == "verified_gone" for o in receipt.objects)
    left = api.list_outputs(account).outputs  # the first page, as before
    return {"outputs": num_outputs, "verified_gone": verified, "left_in_index": len(left),
            "elapsed_s": elapsed, "objects_per_s": verified / elapsed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--outputs", type=int, default=10_000)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ephemera-bench-"))
    try:
        with start_service(bench_settings(root), workdir=root / "work") as service, \
                EphemeraClient(service.base_url, timeout_s=120.0) as api:
            lag = purge_lags(api, args.jobs)
            deletion = account_deletion(api, service, args.outputs)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{'measure':<44}{'value':>12}")
    print(f"{'jobs in burst (succeeded and purged)':<44}{lag['succeeded_and_purged']:>8}/{lag['jobs']}")
    for name in ("purge_lag_p50_s", "purge_lag_p99_s", "purge_lag_max_s", "burst_wall_s"):
        print(f"{name:<44}{lag[name]:>12.3f}")
    print(f"{'account outputs deleted (verified)':<44}{deletion['verified_gone']:>8}/{deletion['outputs']}")
    print(f"{'account deletion elapsed_s':<44}{deletion['elapsed_s']:>12.2f}")
    print(f"{'account deletion objects/s':<44}{deletion['objects_per_s']:>12.0f}")
    for problem, count in lag["problems"].items():
        print(f"  {count} jobs: {problem}")
    out = REPO / "bench-out"
    out.mkdir(exist_ok=True)
    (out / "bench_retention.json").write_text(json.dumps({"purge": lag, "deletion": deletion},
                                                          indent=2))
    return 0 if lag["purge_lag_p99_s"] < 5 and deletion["left_in_index"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
