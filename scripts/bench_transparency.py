"""Benchmark: the transparency log of deletions on a real Redis: appends, proofs, verification.

Run:  .venv/bin/python scripts/bench_transparency.py [--quick]
      (2 cores: full about 75 s, 40 s of it the audit of 10^6 leaves; --quick about 10 s)

A private redis-server on a free 127.0.0.1 port (pipeline/state/redis_server.py, AOF
everysec as the embedded default runs it), stopped at the end. Everything goes through the
production code: ``TransparencyLog`` (pipeline/state/tlog.py) appends and proves, the
standalone verifier (pipeline/transparency/verifier.py) checks, leaves are ``make_leaf``'s
canonical JSON and heads are signed with the demo key (``signing_key(TransparencyConfig(),
[])``).

One log is grown through 10^3, 10^5 and 10^6 leaves (``--quick``: 10^3 and 10^5, fewer
samples) in appends of 1000 leaves. At each size, as it is reached:
- inclusion proofs of random leaves: generation ms (``inclusion_proof``, Redis round trip
  included), size in bytes (32 per hash), verification ms (``leaf_hash`` + ``verify_inclusion``
  against the signed head's root) and the head's signature check (``verify_checkpoint``);
  "verify" is the two together, per sample; medians;
- a consistency proof between size/2 and size: generation and verification ms, bytes;
- appends of one leaf each (what ``ReceiptStore.append`` does per verified deletion), for the
  batched / batch-1 ratio.
At the end, ``audit`` reads the whole log back (every leaf, node and head). Prints a table,
the targets (>= 10,000 appends/s batched; at 10^6 leaves an inclusion proof <= 1 KiB and its
verification <= 5 ms), writes bench-out/bench_transparency.json and .png, and ends with
`transparency: append R/s, inclusion proof at 1e6 leaves B bytes, verify V ms` (``--quick``:
"at 1e5 leaves", its largest size). Exit status 0 when every target is met.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
import uuid
from hashlib import sha256
from pathlib import Path

import redis

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.core.config import TransparencyConfig
from pipeline.state.redis_server import RedisServer
from pipeline.state.tlog import TransparencyLog, audit
from pipeline.transparency.heads import make_leaf, signing_key
from pipeline.transparency.verifier import (
    VerificationError,
    leaf_hash,
    verify_checkpoint,
    verify_consistency,
    verify_inclusion,
)

OUT_DIR = REPO / "bench-out"
BATCH = 1000
APPEND_TARGET_PER_S = 10_000
PROOF_TARGET_BYTES = 1024
VERIFY_TARGET_MS = 5.0
HASH_BYTES = 32


def label(size: int) -> str:
    exponent = len(str(size)) - 1
    return f"1e{exponent}" if size == 10 ** exponent else str(size)


def new_leaves(count: int, rng: random.Random) -> list[bytes]:
    """``count`` leaves as the receipt store makes them (one verified deletion each)."""
    now = time.time()
    classes = ("input", "output", "face_data", "work_data")
    return [make_leaf(receipt_id=uuid.uuid4().hex,
                      account_ref=sha256(f"acct-{rng.randrange(10**6)}".encode()).hexdigest(),
                      uri_sha256=sha256(uuid.uuid4().bytes).hexdigest(),
                      object_class=classes[rng.randrange(4)], requested_s=now - 30.0,
                      verified_s=now, result="verified_gone")[0]
            for _ in range(count)]


def grow(log: TransparencyLog, target: int, rng: random.Random) -> tuple[int, float]:
    """Append batches of ``BATCH`` leaves until the log holds ``target``: (leaves, append s).
    Leaves are made before each timed append: the time is the log's alone."""
    appended, seconds = 0, 0.0
    while (size := log.size()) < target:
        leaves = new_leaves(min(BATCH, target - size), rng)
        started = time.perf_counter()
        first = log.append(leaves)
        seconds += time.perf_counter() - started
        if first != size:
            raise RuntimeError(f"append at {size} returned index {first}")
        appended += len(leaves)
    return appended, seconds


def ms_since(started: float) -> float:
    return 1000 * (time.perf_counter() - started)


def measure_size(log: TransparencyLog, key, cfg: TransparencyConfig, size: int, samples: int,
                 repeats: int, rng: random.Random) -> dict:
    """Proofs and their verification at ``size`` (the log holds exactly ``size`` leaves)."""
    public = key.public_key()
    started = time.perf_counter()
    head = log.sign_head(key, cfg, force=True)
    sign_ms = ms_since(started)
    if head is None or head.tree_size != size:
        raise RuntimeError(f"no signed head of {size} leaves")

    gen_ms, incl_ms, head_ms, both_ms, proof_bytes = [], [], [], [], []
    indices = [rng.randrange(size) for _ in range(samples)]
    leaves = log.leaves(indices)
    for index, leaf in zip(indices, leaves, strict=True):
        started = time.perf_counter()
        proof = log.inclusion_proof(index, size)
        gen_ms.append(ms_since(started))
        proof_bytes.append(HASH_BYTES * len(proof))
        started = time.perf_counter()
        verify_inclusion(index, size, leaf_hash(leaf), proof, head.root_hash)
        incl_ms.append(ms_since(started))
        started = time.perf_counter()
        checked = verify_checkpoint(head.checkpoint, public)
        head_ms.append(ms_since(started))
        both_ms.append(incl_ms[-1] + head_ms[-1])
        if checked.root_hash != head.root_hash:
            raise RuntimeError("the checkpoint's root is not the head's")
    # The verifier must refuse what it should: an edited proof, and a leaf at another index.
    bad = [bytes(b ^ 0xFF for b in proof[0]), *proof[1:]] if proof else [b"\0" * HASH_BYTES]
    refused = 0
    for args in ((index, size, leaf_hash(leaf), bad, head.root_hash),
                 (index, size, leaf_hash(leaf + b" "), proof, head.root_hash)):
        try:
            verify_inclusion(*args)
        except VerificationError:
            refused += 1
    if refused != 2:
        raise RuntimeError(f"the verifier accepted a forged inclusion proof at {size} leaves")

    first = size // 2
    first_root = log.root(first)
    cons_gen_ms, cons_ver_ms, cons_proof = [], [], []
    for _ in range(repeats):
        started = time.perf_counter()
        cons_proof = log.consistency_proof(first, size)
        cons_gen_ms.append(ms_since(started))
        started = time.perf_counter()
        verify_consistency(first, size, first_root, head.root_hash, cons_proof)
        cons_ver_ms.append(ms_since(started))

    memory = log.redis.info("memory")["used_memory"]
    return {
        "size": size, "samples": samples, "sign_head_ms": sign_ms,
        "inclusion_gen_ms": statistics.median(gen_ms),
        "inclusion_gen_p99_ms": sorted(gen_ms)[int(0.99 * (len(gen_ms) - 1))],
        "inclusion_bytes_median": statistics.median(proof_bytes),
        "inclusion_bytes_max": max(proof_bytes),
        "inclusion_verify_ms": statistics.median(incl_ms),
        "checkpoint_verify_ms": statistics.median(head_ms),
        "verify_ms": statistics.median(both_ms),
        "verify_p99_ms": sorted(both_ms)[int(0.99 * (len(both_ms) - 1))],
        "consistency_first": first, "consistency_repeats": repeats,
        "consistency_gen_ms": statistics.median(cons_gen_ms),
        "consistency_verify_ms": statistics.median(cons_ver_ms),
        "consistency_bytes": HASH_BYTES * len(cons_proof),
        "redis_used_bytes": int(memory),
    }


def single_appends(log: TransparencyLog, count: int, rng: random.Random) -> float:
    """Appends of one leaf each, one after the other: receipts per second."""
    leaves = new_leaves(count, rng)
    started = time.perf_counter()
    for leaf in leaves:
        log.append([leaf])
    return count / (time.perf_counter() - started)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["size"] for r in rows]
    fig, (rate, times, nbytes) = plt.subplots(1, 3, figsize=(15, 4.4))
    rate.plot(sizes, [r["batched_per_s"] for r in rows], marker="o",
              label=f"batches of {BATCH} (growing to this size)")
    rate.plot(sizes, [r["single_per_s"] for r in rows], marker="o", label="batch 1 (at this size)")
    rate.axhline(APPEND_TARGET_PER_S, color="red", linestyle="--",
                 label=f"{APPEND_TARGET_PER_S:,} /s target")
    rate.set_yscale("log")
    rate.set_ylabel("receipts appended / s")
    rate.set_title("append throughput")
    for name, key in (("inclusion proof: generate", "inclusion_gen_ms"),
                      ("inclusion: verify_inclusion", "inclusion_verify_ms"),
                      ("head: verify_checkpoint", "checkpoint_verify_ms"),
                      ("verify (both)", "verify_ms"),
                      ("consistency: generate", "consistency_gen_ms"),
                      ("consistency: verify", "consistency_verify_ms")):
        times.plot(sizes, [r[key] for r in rows], marker="o", label=name)
    times.axhline(VERIFY_TARGET_MS, color="red", linestyle="--",
                  label=f"{VERIFY_TARGET_MS:g} ms verify target")
    times.set_yscale("log")
    times.set_ylabel("ms (median)")
    times.set_title("proofs: time")
    nbytes.plot(sizes, [r["inclusion_bytes_max"] for r in rows], marker="o",
                label="inclusion proof (max)")
    nbytes.plot(sizes, [r["consistency_bytes"] for r in rows], marker="o",
                label="consistency proof (size/2 to size)")
    nbytes.axhline(PROOF_TARGET_BYTES, color="red", linestyle="--", label="1 KiB target")
    nbytes.set_ylim(0, PROOF_TARGET_BYTES * 1.2)
    nbytes.set_ylabel("bytes")
    nbytes.set_title("proofs: size")
    for ax in (rate, times, nbytes):
        ax.set_xscale("log")
        ax.set_xlabel("leaves in the log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("bench_transparency: RFC 6962 log of deletions on a real Redis (127.0.0.1)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="10^3 and 10^5 leaves only, fewer samples")
    parser.add_argument("--seed", type=int, default=6962)
    args = parser.parse_args()
    sizes = [10**3, 10**5] if args.quick else [10**3, 10**5, 10**6]
    samples, repeats, singles = (50, 20, 300) if args.quick else (200, 50, 2000)
    rng = random.Random(args.seed)
    cfg = TransparencyConfig()
    key = signing_key(cfg, [])  # the public demo key: no production marker here
    wall = time.perf_counter()

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="ephemera-tlog-bench-") as tmp, \
            RedisServer(Path(tmp) / "redis") as server:
        client = redis.Redis.from_url(server.url)
        log = TransparencyLog(client)
        total_leaves, total_s = 0, 0.0
        for size in sizes:
            appended, seconds = grow(log, size, rng)
            total_leaves, total_s = total_leaves + appended, total_s + seconds
            row = measure_size(log, key, cfg, size, samples, repeats, rng)
            row.update(appended=appended, append_s=seconds, batched_per_s=appended / seconds,
                       single_per_s=single_appends(log, singles, rng), singles=singles)
            rows.append(row)
            print(f"  {label(size)} leaves: {appended} appended at {row['batched_per_s']:,.0f}/s, "
                  f"proofs measured ({time.perf_counter() - wall:.0f} s so far)", flush=True)
        started = time.perf_counter()
        problems = audit(log, key.public_key())
        audit_s = time.perf_counter() - started
        final_size = log.size()
        client.close()
    batched = total_leaves / total_s
    single = statistics.median(r["single_per_s"] for r in rows)
    last = rows[-1]

    print(f"\n{'leaves':>8} {'append/s':>10} {'b1 /s':>7} {'incl gen':>9} {'incl B':>9} "
          f"{'incl ver':>9} {'head ver':>9} {'verify':>8} {'cons gen':>9} {'cons ver':>9} "
          f"{'cons B':>7} {'sign':>7} {'Redis MiB':>9}")
    print(f"{'':>8} {'batched':>10} {'':>7} {'ms':>9} {'med/max':>9} {'ms':>9} {'ms':>9} "
          f"{'ms':>8} {'ms':>9} {'ms':>9} {'':>7} {'ms':>7}")
    for r in rows:
        print(f"{label(r['size']):>8} {r['batched_per_s']:>10,.0f} {r['single_per_s']:>7,.0f} "
              f"{r['inclusion_gen_ms']:>9.3f} "
              f"{r['inclusion_bytes_median']:>4.0f}/{r['inclusion_bytes_max']:<4.0f} "
              f"{r['inclusion_verify_ms']:>9.3f} {r['checkpoint_verify_ms']:>9.3f} "
              f"{r['verify_ms']:>8.3f} {r['consistency_gen_ms']:>9.3f} "
              f"{r['consistency_verify_ms']:>9.3f} {r['consistency_bytes']:>7} "
              f"{r['sign_head_ms']:>7.2f} {r['redis_used_bytes'] / 2**20:>9.0f}")
    print(f"(medians over {samples} random leaves per size; consistency: size/2 to size, "
          f"median of {repeats}; b1: {singles} appends of one leaf each, as "
          f"ReceiptStore.append does; times include the Redis round trips on 127.0.0.1)")
    print(f"append: {total_leaves:,} leaves in batches of {BATCH} at {batched:,.0f}/s; "
          f"batch 1 at {single:,.0f}/s (batched/b1 = {batched / single:.0f}x)")
    print(f"audit of the whole log ({final_size:,} leaves, every node and head): "
          f"{audit_s:.1f} s, {len(problems)} problems {problems[:3] if problems else ''}")

    at = label(last["size"])
    checks = [
        (f"append (batches of {BATCH})", f"{batched:,.0f}/s", f">= {APPEND_TARGET_PER_S:,}/s",
         batched >= APPEND_TARGET_PER_S),
        (f"inclusion proof at {at} leaves (max)", f"{last['inclusion_bytes_max']} B",
         f"<= {PROOF_TARGET_BYTES} B", last["inclusion_bytes_max"] <= PROOF_TARGET_BYTES),
        (f"verify at {at} leaves (inclusion + head)", f"{last['verify_ms']:.3f} ms",
         f"<= {VERIFY_TARGET_MS:g} ms", last["verify_ms"] <= VERIFY_TARGET_MS),
        ("audit of the whole log", f"{len(problems)} problems", "0", not problems),
    ]
    print("\ntargets" + (" (--quick: proof and verify targets are for 1e6 leaves; checked here "
                         "at 1e5, the full run checks 1e6)" if args.quick else ""))
    for name, value, target, ok in checks:
        print(f"  {name:<42} {value:>14}   target {target:<12} {'PASS' if ok else 'FAIL'}")

    OUT_DIR.mkdir(exist_ok=True)
    (OUT_DIR / "bench_transparency.json").write_text(json.dumps({
        "quick": args.quick, "batch": BATCH, "append_batched_per_s": batched,
        "append_single_per_s": single, "audit_s": audit_s, "audit_problems": problems,
        "wall_s": time.perf_counter() - wall, "sizes": rows,
        "targets": {name: {"value": value, "target": target, "pass": ok}
                    for name, value, target, ok in checks}}, indent=1))
    plot(rows, OUT_DIR / "bench_transparency.png")
    print(f"wrote {(OUT_DIR / 'bench_transparency.json').relative_to(REPO)} and "
          f"{(OUT_DIR / 'bench_transparency.png').relative_to(REPO)} "
          f"(wall {time.perf_counter() - wall:.0f} s)")
    print(f"transparency: append {batched:.0f}/s, inclusion proof at {at} leaves "
          f"{last['inclusion_bytes_max']} bytes, verify {last['verify_ms']:.3f} ms")
    return 0 if all(ok for *_, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
