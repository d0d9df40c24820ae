"""Hostile media benchmark: a crafted corpus against the running service, 16 at a time.

Run:  .venv/bin/python scripts/bench_hostile.py     (about 3 minutes on 2 cores)

It builds the corpus itself (tests/security/corpus.py: every case of issue #19 and more,
plus the phone media that must still pass), then:
1. Cost per input: each request's files through a ``SandboxPool`` with the service's
   default budgets, the media pool's own code path (``check_job_request``), one at a time,
   so each child's peak extra memory and CPU are that input's alone.
2. The service: the embedded default started locally, every case submitted over HTTP,
   16 at a time (all cases, twice), counting answers by status and checking that the
   ingress and media replicas are the processes they were (``ingress restarts``).
Prints a table (input, verdict, peak extra MiB, CPU s, HTTP status), writes
bench-out/bench_hostile.png, and ends with
`hostile: inputs N, over budget 0, ingress restarts 0, 5xx 0, max extra MiB M, max CPU s C`.
Budgets (service.yaml defaults): decode_memory_bytes 512 MiB and every input under 5 s CPU.
Nothing here is simulated: real decoders, real processes, a real service on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.core.config import load_settings
from pipeline.core.errors import InvalidUpload
from pipeline.media.sandbox import DecodeBudget, SandboxPool
from pipeline.security import crypto
from scripts.bench_scale import replica_pids
from serve.client import NO_RETRIES, EphemeraClient, job_call
from tests.security.corpus import HOSTILE, LEGIT, Case, build, run_request

OUT_DIR = REPO / "bench-out"
CPU_TARGET_S = 5.0


def cost_of(case: Case, pool: SandboxPool, settings) -> tuple[str, float, int]:
    """(verdict, CPU s, peak extra bytes) of one request through the media pool's code."""
    verdict, reports = run_request(case, pool.decode, settings)
    refused = isinstance(verdict, InvalidUpload)
    return (f"refused ({verdict.problem})" if refused else "accepted",
            sum(r.cpu_s for r in reports),
            max((r.peak_extra_bytes for r in reports), default=0))


def sandbox_overhead_ms(pool: SandboxPool, settings, repeats: int = 11) -> tuple[float, float]:
    """Median wall ms to decode a 1 MP phone-style JPEG in this process and in a sandbox
    child (interleaved, A B A B ...)."""
    import io
    import statistics

    from PIL import Image
    from skimage import data as skdata

    from pipeline.jobs.intake import decode_in_process

    buffer = io.BytesIO()
    Image.fromarray(skdata.astronaut()).resize((1152, 864)).save(buffer, format="JPEG",
                                                                  quality=90)
    photo = buffer.getvalue()
    local = decode_in_process(settings.service)
    times: dict[str, list[float]] = {"in process": [], "sandboxed": []}
    for _ in range(repeats):
        for name, decode in (("in process", local), ("sandboxed", pool.decode)):
            started = time.perf_counter()
            assert decode(photo, index=1, declared="image").error is None
            times[name].append(1000 * (time.perf_counter() - started))
    return statistics.median(times["in process"]), statistics.median(times["sandboxed"])


def plot(rows: list[tuple[str, str, float, int, int]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r[0] for r in rows]
    fig, (cpu, mem) = plt.subplots(1, 2, figsize=(13, 0.32 * len(rows) + 1.5), sharey=True)
    cpu.barh(names, [r[2] for r in rows], color="tab:blue")
    cpu.axvline(CPU_TARGET_S, color="red", linestyle="--", label=f"{CPU_TARGET_S:g} s target")
    cpu.set_xlabel("decode CPU (s)")
    cpu.legend()
    mem.barh(names, [r[3] / 2**20 for r in rows], color="tab:orange")
    mem.axvline(512, color="red", linestyle="--", label="512 MiB budget")
    mem.set_xlabel("peak extra memory of the decoding process (MiB)")
    mem.legend()
    cpu.invert_yaxis()
    fig.suptitle("Hostile and phone media through the media pool (real decoders, 2-core CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="times each case is sent")
    args = parser.parse_args()
    from serve.launcher import start_service

    started = time.time()
    cases = [build(s.name) for s in HOSTILE + LEGIT]
    print(f"corpus: {len(cases)} requests built in {time.time() - started:.0f} s", flush=True)
    base = load_settings()
    limits = base.service
    pool = SandboxPool(limits, DecodeBudget(limits.decode_memory_bytes, limits.decode_cpu_s,
                                            limits.decode_wall_s), size=1)
    pool.start()
    costs = {c.name: cost_of(c, pool, base) for c in cases}
    child_restarts = pool.restarts
    local_ms, sandboxed_ms = sandbox_overhead_ms(pool, base)
    pool.close()

    with tempfile.TemporaryDirectory(prefix="ephemera-hostile-") as tmp:
        settings = base.model_copy(update={
            "service": limits.model_copy(update={"max_jobs_in_flight_per_account": 10_000}),
            "storage": base.storage.model_copy(update={"local_root": str(Path(tmp) / "store")}),
        })
        with start_service(settings, workdir=Path(tmp) / "work") as service:
            ingress, media = (set(replica_pids(n)) for n in ("ApiDeployment", "MediaDeployment"))
            statuses: dict[str, Counter] = {c.name: Counter() for c in cases}
            errors = Counter()
            http = httpx.Client(base_url=service.base_url, timeout=300.0)
            api = EphemeraClient(http=http, retry=NO_RETRIES)

            def send(case: Case) -> None:
                call = job_call(case.files, device_key=crypto.new_device_key(),
                                kind=case.kind, style="watercolor",
                                account_id=f"acct-{os.urandom(4).hex()}")
                try:
                    statuses[case.name][api.send(call).status_code] += 1
                except Exception as exc:  # counted, never dropped
                    errors[type(exc).__name__] += 1

            sent_s = time.time()
            with ThreadPoolExecutor(args.concurrency) as threads:
                list(threads.map(send, cases * args.rounds))
            took_s = time.time() - sent_s
            restarts = (len(ingress - set(replica_pids("ApiDeployment")))
                        + len(media - set(replica_pids("MediaDeployment"))))
            http.close()

    rows = []
    print(f"\n{'input':34} {'verdict':28} {'peak MiB':>9} {'CPU s':>6}  HTTP")
    for case in cases:
        verdict, cpu_s, peak = costs[case.name]
        answers = ",".join(f"{k}x{v}" for k, v in sorted(statuses[case.name].items()))
        rows.append((case.name, verdict, cpu_s, peak, 0))
        print(f"{case.name:34} {verdict:28} {peak / 2**20:9.0f} {cpu_s:6.2f}  {answers}")
    OUT_DIR.mkdir(exist_ok=True)
    plot(rows, OUT_DIR / "bench_hostile.png")
    over = sum(1 for _, _, cpu_s, peak, _ in rows
               if cpu_s > CPU_TARGET_S or peak > limits.decode_memory_bytes)
    wrong = [c.name for c in cases if not costs[c.name][0].startswith(c.expect[:7])]
    five_xx = sum(n for counter in statuses.values() for code, n in counter.items()
                  if code >= 500)
    print(f"\nsent {len(cases) * args.rounds} requests, {args.concurrency} at a time, in "
          f"{took_s:.0f} s; sandbox children replaced while costing: {child_restarts}; "
          f"client errors: {dict(errors) or 0}; unexpected verdicts: {wrong or 'none'}")
    print(f"sandbox overhead per photo (1 MP JPEG, median of 11, interleaved): "
          f"{sandboxed_ms - local_ms:.1f} ms ({local_ms:.1f} ms in process, "
          f"{sandboxed_ms:.1f} ms sandboxed)")
    print(f"plot: {OUT_DIR / 'bench_hostile.png'}")
    print(f"hostile: inputs {len(cases)}, over budget {over}, ingress restarts {restarts}, "
          f"5xx {five_xx}, max extra MiB {max(r[3] for r in rows) / 2**20:.0f}, "
          f"max CPU s {max(r[2] for r in rows):.2f}")
    return 0 if not (over or restarts or five_xx or wrong or errors) else 1


if __name__ == "__main__":
    sys.exit(main())
