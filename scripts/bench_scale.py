"""Benchmark: does throughput scale with GPU replicas, and what does a job cost the ingress?

Run:  .venv/bin/python scripts/bench_scale.py --quick     (1 and 8 replicas, 5 repetitions:
                                                          21 minutes here under a load of
                                                          30, mostly rescaling 1 -> 8)
      .venv/bin/python scripts/bench_scale.py             (1, 2, 4, 8 replicas; longer)
      [--repetitions R]                                   (fewer: faster, less to go on)

SIMULATED GPUs. This machine has 2 cores and no GPU, so the diffusion pool runs the GPU
stand-in (models.yaml diffusion_backend: simulated, pipeline/models/simulated.py): each batch
takes overhead_s + s_per_unit x cost, calibrated to Stable Diffusion 1.5 fp16 on an A100
(1.6 s for one 512 px image at 50 steps), scaled by --time-scale, and uses no CPU. Everything
else is real: HTTP, the ingress, the media pool (decode in sandboxes, strip, encrypt, store),
job runners, Serve's batching and routing, Redis, the output stage and the purge. So the
numbers measure the orchestration when GPUs are the bottleneck, not a GPU.

Phases, each on a fresh local service (embedded Redis, local store in a temp folder):
  1. fixed diffusion pools of R replicas: a closed burst of R x --jobs-per-replica art_style
     jobs; throughput = jobs / (last job succeeded - first POST). One service runs every R,
     interleaved: the pool is rescaled live (Serve's declarative deploy, only num_replicas
     changed) between runs, 1, max R, the others, again, --repetitions times (default 5),
     each run after an untimed warm-up burst of R jobs. The ingress and media pools run
     fixed replica counts (2 each, what a burst scales them to), so no run inherits
     replicas a previous one scaled up;
  2. autoscaling (min 1, max 4 replicas): a burst, sampling the replica count until the
     pool has scaled back down.
Every figure is the median over the repetitions, reported with its spread (``median
[min-max] IQR``); scale N/1 is the median of the per-repetition ratios, each from the
repetition's own 1-replica and N-replica runs (adjacent).
The ingress CPU per job is the CPU time of the ApiDeployment replicas from the first POST to
the last 202 of phase 1 at the largest R, divided by its jobs (until #19 it ran to the end of
the phase, so it also counted this script's status polls); the media CPU per job, the same
for the MediaDeployment replicas and their sandboxed decoders (decoding moved there in #19).
Prints a table, a capacity table, the spreads, and ends with `scale N/1 replicas: S`,
`media CPU per job: M ms`, `ingress CPU per job: M ms` (medians); writes
bench-out/bench_scale.json (with every repetition's runs and the spreads) and .png (error
bars: min-max).
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.core.config import (
    AutoscalingConfig,
    PoolConfig,
    Settings,
    SimulatedGpuConfig,
    StageBatchConfig,
    load_settings,
)
from pipeline.security import crypto
from scripts.bench_stats import MIN_REPETITIONS, Spread, interleave, paired_ratios, table
from serve.client import NO_RETRIES, EphemeraClient
from serve.schemas import JobView

OUT_DIR = REPO / "bench-out"
BATCH_COST = 8
RATES_PER_S = (10, 100, 1000)
FIXED_FRONT = {"api": 2, "media": 2}  # replicas of the ingress and media pools


def photo() -> bytes:
    """A real photo (the astronaut, cropped), small so the ingress is not the bottleneck."""
    buffer = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()[:128, :128]).save(buffer, format="JPEG")
    return buffer.getvalue()


def scale_settings(root: Path, pool: PoolConfig, time_scale: float,
                   fixed_front: bool = False) -> Settings:
    base = load_settings()
    front = {name: getattr(base.deployments, name).model_copy(
                 update={"autoscaling": None, "num_replicas": n})
             for name, n in FIXED_FRONT.items()} if fixed_front else {}
    return base.model_copy(update={
        "service": base.service.model_copy(update={"max_jobs_in_flight_per_account": 10_000,
                                                   "ray_num_cpus": 16}),
        "storage": base.storage.model_copy(update={"local_root": str(root / "store")}),
        "models": base.models.model_copy(update={
            "diffusion_backend": "simulated",
            "simulated": SimulatedGpuConfig(time_scale=time_scale)}),
        "batching": base.batching.model_copy(update={
            "diffusion": StageBatchConfig(max_batch_cost=BATCH_COST, max_wait_ms=100)}),
        "deployments": base.deployments.model_copy(update={
            "diffusion": pool,
            # Enough runners for every replica's batches; they only wait on handles.
            "runner": base.deployments.runner.model_copy(update={
                "autoscaling": None, "num_replicas": 2, "max_ongoing_requests": 512}),
            **front,
        }),
    })


def submit_burst(base_url: str, count: int) -> tuple[list[tuple[str, str]], float]:
    """Returns the jobs as (account, job id) and when the burst started."""
    key = crypto.new_device_key()
    data = photo()

    def post(n: int) -> tuple[str, str]:
        # A client (and connection) per job, as before; no retries: a refused POST fails
        # the run instead of adding a backoff to the throughput measured.
        with EphemeraClient(base_url, retry=NO_RETRIES, timeout_s=120) as api:
            account = f"bench-{n % 97}"
            return account, api.submit_job([("p.jpg", data)], device_key=key, kind="art_style",
                                            style="watercolor", account_id=account).job_id

    started = time.time()
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(post, range(count))), started


def wait_succeeded(base_url: str, jobs: list[tuple[str, str]], on_tick=None,
                   until_purged: bool = False) -> list[JobView]:
    """``jobs``: (account, job id) pairs, as ``submit_burst`` returns them; with
    ``until_purged``, also until every job's inputs were purged."""
    views: dict[str, JobView] = {}
    deadline = time.monotonic() + 900
    with EphemeraClient(base_url, retry=NO_RETRIES, timeout_s=60) as api:
        while time.monotonic() < deadline:
            for account, job_id in jobs:
                if job_id not in views:
                    view = api.get_job(account, job_id)
                    if view.status.is_finished and (view.inputs_purged_s or not until_purged):
                        views[job_id] = view
            if on_tick:
                on_tick()
            if len(views) == len(jobs):
                return list(views.values())
            time.sleep(0.5)
    raise RuntimeError(f"{len(jobs) - len(views)} jobs did not finish")


def replica_pids(deployment: str) -> list[int]:
    import ray

    pids = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["name"].startswith(f"SERVE_REPLICA::ephemera#{deployment}#"):
            actor = ray.get_actor(entry["name"], namespace="serve")
            pids.append(ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30))
    return pids


def cpu_s(pids: list[int]) -> float:
    """CPU seconds of these processes and of their live children (the media replica's
    sandboxed decoders are long-lived children: the kernel counts them apart)."""
    ticks = os.sysconf("SC_CLK_TCK")
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stats[int(entry.name)] = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
    wanted = set(pids) | {pid for pid, fields in stats.items() if int(fields[1]) in pids}
    return sum((int(stats[pid][11]) + int(stats[pid][12])) / ticks  # utime + stime
               for pid in wanted if pid in stats)


def set_replicas(replicas: int, timeout_s: float = 180.0) -> None:
    """Rescale the diffusion pool of the running app live (its deployed config with only
    num_replicas changed: Serve adds or drains replicas, the others keep running) and wait
    until exactly ``replicas`` run."""
    from ray import serve

    from serve.app import APP_NAME, DIFFUSION
    from serve.launcher import deploy_config, wait_app_running
    from serve.tuning import deployed_app_config

    deployed, instance = deployed_app_config()
    config = copy.deepcopy(deployed)
    entry = next(d for d in config["deployments"] if d["name"] == DIFFUSION)
    if entry.get("num_replicas") != replicas:
        entry["num_replicas"] = replicas
        http = {k: v for k, v in instance["http_options"].items() if k in ("host", "port")}
        deploy_config({"proxy_location": instance["proxy_location"], "http_options": http,
                       "applications": [config]})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = serve.status().applications[APP_NAME].deployments[DIFFUSION].replica_states
        if dict(states) == {"RUNNING": replicas}:
            wait_app_running(timeout_s)
            return
        time.sleep(0.25)
    raise RuntimeError(f"the diffusion pool did not reach {replicas} replicas in {timeout_s} s")


def run_fixed(base_url: str, replicas: int, jobs_per_replica: int) -> dict:
    """One run on the running service, its diffusion pool rescaled to ``replicas`` first."""
    set_replicas(replicas)
    warm, _ = submit_burst(base_url, replicas)
    wait_succeeded(base_url, warm)
    api, media = replica_pids("ApiDeployment"), replica_pids("MediaDeployment")
    cpu_before, media_before = cpu_s(api), cpu_s(media)
    count = replicas * jobs_per_replica
    job_ids, started = submit_burst(base_url, count)
    # Accepting a job ends with its 202: what it cost is the CPU until the last one.
    # (Measured to the end of the run, as before #19, the figure also counted the
    # ingress answering this benchmark's own status polls, a cost of the poll rate.)
    api_cpu_s = cpu_s([p for p in replica_pids("ApiDeployment") if p in api]) - cpu_before
    media_cpu_s = (cpu_s([p for p in replica_pids("MediaDeployment") if p in media])
                   - media_before)
    views = wait_succeeded(base_url, job_ids)
    wait_succeeded(base_url, job_ids, until_purged=True)  # untimed: clean-up before the next
    succeeded = [v for v in views if v.status == "succeeded"]
    elapsed = max(v.succeeded_s for v in succeeded) - started
    sizes = [v.batch_sizes.diffusion for v in succeeded]
    return {"replicas": replicas, "jobs": count, "succeeded": len(succeeded),
            "elapsed_s": elapsed, "jobs_per_s": len(succeeded) / elapsed,
            "mean_batch": float(np.mean(sizes)), "api_cpu_ms_per_job": 1000 * api_cpu_s / count,
            "media_cpu_ms_per_job": 1000 * media_cpu_s / count}


def run_autoscaling(jobs: int, time_scale: float, root: Path) -> dict:
    from ray import serve

    from serve.launcher import start_service

    pool = PoolConfig(num_cpus=0, autoscaling=AutoscalingConfig(
        min_replicas=1, max_replicas=4, target_ongoing_requests=BATCH_COST,
        upscale_delay_s=1.0, downscale_delay_s=6.0))
    settings = scale_settings(root / "auto", pool, time_scale)
    timeline: list[tuple[float, int]] = []
    with start_service(settings, workdir=root / "auto" / "work") as service:
        t0 = time.time()

        def sample() -> None:
            states = serve.status().applications["ephemera"].deployments[
                "DiffusionDeployment"].replica_states
            timeline.append((time.time() - t0, int(states.get("RUNNING", 0))))

        job_ids, _ = submit_burst(service.base_url, jobs)
        wait_succeeded(service.base_url, job_ids, on_tick=sample)
        done_s = time.time() - t0
        for _ in range(60):  # idle: watch it scale back down
            sample()
            if timeline[-1][1] == 1 and time.time() - t0 > done_s + 8:
                break
            time.sleep(0.5)
    return {"jobs": jobs, "timeline": timeline, "peak_replicas": max(n for _, n in timeline),
            "final_replicas": timeline[-1][1], "burst_done_s": done_s}


def capacity(per_gpu_jobs_s: float, cpu_ms_per_job: float) -> list[dict]:
    return [{"jobs_per_s": rate, "gpus": int(np.ceil(rate / per_gpu_jobs_s)),
             "ingress_cpus": int(np.ceil(rate * cpu_ms_per_job / 1000 / 0.7))}  # 70 % busy
            for rate in RATES_PER_S]


def summarize(replicas: int, runs: list[dict]) -> dict:
    """One replica count over its repetitions: every figure's median (the keys a single
    run had, so readers of the JSON keep working), its spread and the runs themselves."""
    keys = ("elapsed_s", "jobs_per_s", "mean_batch", "api_cpu_ms_per_job",
            "media_cpu_ms_per_job")
    return {"replicas": replicas, "jobs": runs[0]["jobs"],
            "succeeded": min(r["succeeded"] for r in runs),
            **{k: Spread.of(r[k] for r in runs).median for k in keys},
            "spreads": {k: Spread.of(r[k] for r in runs).as_dict() for k in keys},
            "runs": runs}


def plot(results: list[dict], auto: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    reps = [r["replicas"] for r in results]
    spreads = [r["spreads"]["jobs_per_s"] for r in results]
    left.errorbar(reps, [r["jobs_per_s"] for r in results], capsize=4, fmt="o-",
                  yerr=[[s["median"] - s["min"] for s in spreads],
                        [s["max"] - s["median"] for s in spreads]],
                  label=f"measured (median, min-max of {len(results[0]['runs'])})")
    left.plot(reps, [results[0]["jobs_per_s"] * n for n in reps], "--", label="linear")
    left.set(xlabel="diffusion replicas (simulated GPUs)", ylabel="jobs/s",
             title="Scale-out (simulated GPU stage)")
    left.legend()
    xs, ns = zip(*auto["timeline"], strict=True)
    right.step(xs, ns, where="post")
    right.axvline(auto["burst_done_s"], color="grey", linestyle=":", label="burst done")
    right.set(xlabel="s", ylabel="running replicas", title="Autoscaling under a burst")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 and 8 replicas only")
    parser.add_argument("--jobs-per-replica", type=int, default=24)
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="multiplies the simulated GPU time (1.0: A100 seconds)")
    parser.add_argument("--repetitions", type=int, default=MIN_REPETITIONS,
                        help="interleaved repetitions of every replica count")
    args = parser.parse_args()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    replica_counts = [1, 8] if args.quick else [1, 2, 4, 8]
    # 1 beside the largest, so each repetition's scale ratio pairs adjacent runs
    order = [replica_counts[0], replica_counts[-1], *replica_counts[1:-1]]
    OUT_DIR.mkdir(exist_ok=True)
    from serve.launcher import start_service

    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        root = Path(tmp)
        settings = scale_settings(root / "fixed", PoolConfig(num_replicas=order[0], num_cpus=0),
                                  args.time_scale, fixed_front=True)
        with start_service(settings, workdir=root / "fixed" / "work") as service:
            runs = interleave({n: (lambda _, n=n: run_fixed(service.base_url, n,
                                                            args.jobs_per_replica))
                               for n in order}, args.repetitions,
                              log=lambda text: print(text, flush=True))
        results = [summarize(n, runs[n]) for n in replica_counts]
        auto = run_autoscaling(48 if args.quick else 96, args.time_scale, root)
    print("\nSIMULATED GPU stage (cost model, no GPU here); everything else real.")
    print(f"{'replicas':>8} {'jobs':>5} {'ok':>5} {'elapsed s':>10} {'jobs/s':>8} "
          f"{'mean batch':>10} {'api CPU ms/job':>15}")
    for r in results:
        print(f"{r['replicas']:>8} {r['jobs']:>5} {r['succeeded']:>5} {r['elapsed_s']:>10.2f} "
              f"{r['jobs_per_s']:>8.2f} {r['mean_batch']:>10.2f} {r['api_cpu_ms_per_job']:>15.1f}")
    print(f"autoscaling: peak {auto['peak_replicas']} replicas under a burst of {auto['jobs']} "
          f"jobs, {auto['final_replicas']} after it")
    # Capacity at real A100 speed: one replica at full batches, from the cost model.
    gpu = SimulatedGpuConfig()
    per_gpu = BATCH_COST / (gpu.overhead_s + gpu.s_per_unit * BATCH_COST)
    cpu_ms = results[-1]["api_cpu_ms_per_job"]
    print(f"\ncapacity at A100 speed (SD 1.5, 512 px, 50 steps: {per_gpu:.2f} jobs/s per GPU at "
          f"batch {BATCH_COST}; ingress CPUs at 70 % busy):")
    print(f"{'jobs/s':>8} {'GPUs':>6} {'ingress CPUs':>13}")
    capacity_rows = capacity(per_gpu, cpu_ms)
    for row in capacity_rows:
        print(f"{row['jobs_per_s']:>8} {row['gpus']:>6} {row['ingress_cpus']:>13}")
    top = replica_counts[-1]
    scale_spread = Spread.of(paired_ratios([r["jobs_per_s"] for r in runs[top]],
                                           [r["jobs_per_s"] for r in runs[1]]))
    scale = scale_spread.median
    spreads = {f"scale {top}/1 replicas": scale_spread,
               **{f"jobs/s, R={r['replicas']}": Spread.of(x["jobs_per_s"] for x in r["runs"])
                  for r in results},
               "media CPU ms per job": Spread.of(r["media_cpu_ms_per_job"] for r in runs[top]),
               "ingress CPU ms per job": Spread.of(r["api_cpu_ms_per_job"] for r in runs[top])}
    print(f"\nmedian [min-max] IQR over {args.repetitions} interleaved repetitions "
          f"(order {', '.join(map(str, order))} replicas; CPU at {top} replicas):")
    for line in table(spreads):
        print(f"  {line}")
    (OUT_DIR / "bench_scale.json").write_text(json.dumps(
        {"simulated": True, "time_scale": args.time_scale, "repetitions": args.repetitions,
         "order": order, "fixed_front_replicas": FIXED_FRONT, "results": results,
         "autoscaling": auto, "capacity": capacity_rows, "scale": scale,
         "spreads": {k: s.as_dict() for k, s in spreads.items()}}, indent=2))
    plot(results, auto, OUT_DIR / "bench_scale.png")
    print(f"\nscale {replica_counts[-1]}/1 replicas: {scale:.2f}")
    print(f"media CPU per job: {results[-1]['media_cpu_ms_per_job']:.1f} ms (the media "
          "replica's own process; its sandboxed decoder children are counted with it)")
    print(f"ingress CPU per job: {cpu_ms:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
