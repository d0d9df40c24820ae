"""`ephemera tune diffusion --auto` on a local service whose diffusion pool is the SIMULATED GPU.

Run:  .venv/bin/python scripts/bench_autotune.py --quick    (about 3 minutes here)
      .venv/bin/python scripts/bench_autotune.py            (a wider grid; longer)

SIMULATED GPU (models.yaml diffusion_backend: simulated, pipeline/models/simulated.py): a
batch takes overhead_s + s_per_unit x cost, calibrated to SD 1.5 fp16 on an A100, scaled by
--time-scale; no GPU is used. So the sweep shows how batch cost and wait trade throughput
against latency when the GPU is the bottleneck; on a real cluster run `ephemera tune
diffusion --auto` against the running app instead. Everything else is real (HTTP, media
pool, runners, Serve batching, Redis, the store, purges). Writes bench-out/
bench_autotune.json and .png, prints the sweep table and the chosen setting (the same
command and code path as the CLI).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.core.config import SimulatedGpuConfig, StageBatchConfig, load_settings  # noqa: E402
from serve.cli import main as cli  # noqa: E402

OUT_DIR = REPO / "bench-out"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 2 x 2 grid, few jobs")
    parser.add_argument("--time-scale", type=float, default=0.25,
                        help="multiplies the simulated GPU time (1.0: A100 seconds)")
    parser.add_argument("--offered-rps", type=float, default=3.0)
    parser.add_argument("--p95-target-s", type=float, default=8.0)
    args = parser.parse_args()
    from serve.launcher import start_service

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    OUT_DIR.mkdir(exist_ok=True)
    base = load_settings()
    with tempfile.TemporaryDirectory(prefix="bench-autotune-") as tmp:
        settings = base.model_copy(update={
            "service": base.service.model_copy(update={"max_jobs_in_flight_per_account": 10_000}),
            "storage": base.storage.model_copy(update={"local_root": str(Path(tmp) / "store")}),
            "models": base.models.model_copy(update={
                "diffusion_backend": "simulated",
                "simulated": SimulatedGpuConfig(time_scale=args.time_scale)}),
            "batching": base.batching.model_copy(update={
                "diffusion": StageBatchConfig(max_batch_cost=8, max_wait_ms=100)}),
        })
        with start_service(settings, workdir=Path(tmp) / "work"):
            print("SIMULATED GPU diffusion pool (cost model x time scale "
                  f"{args.time_scale:g}); everything else real.", flush=True)
            costs, waits, jobs = (("8,16", "20,400", 12) if args.quick
                                  else ("8,16,32", "20,100,400,1200", 24))
            return cli(["tune", "diffusion", "--auto", "--costs", costs, "--waits-ms", waits,
                        "--jobs", str(jobs), "--offered-rps", str(args.offered_rps),
                        "--p95-target-s", str(args.p95_target_s),
                        "--out", str(OUT_DIR / "bench_autotune.json")])


if __name__ == "__main__":
    sys.exit(main())
