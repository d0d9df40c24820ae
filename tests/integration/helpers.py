"""Shared test helpers: photos, submission, waiting, and scanning every stored byte."""

from __future__ import annotations

import base64
import io
import os
import re
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import redis
from PIL import Image

from serve.client import NO_RETRIES, EphemeraClient, job_call

CAMERA_MODEL = b"LeakyCam GPS-9000"
GPS_LATITUDE = (41.0, 0.0, 59.0)


def encode_image(pixels: np.ndarray, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def jpeg_with_gps(pixels: np.ndarray) -> bytes:
    exif = Image.Exif()
    exif[0x0110] = CAMERA_MODEL.decode()
    exif[0x8825] = {1: "N", 2: GPS_LATITUDE, 3: "E", 4: (28.0, 58.0, 45.0)}
    return encode_image(pixels, "JPEG", quality=92, exif=exif.tobytes())


def key_header(key: bytes) -> dict[str, str]:
    return {"X-Device-Key": base64.b64encode(key).decode()}


# Which account each submitted job belongs to, as the app's backend remembers it: every
# read of a job is scoped to its account.
_ACCOUNT_OF: dict[str, str] = {}


def api_over(client: httpx.Client) -> EphemeraClient:
    """The typed client over the test's httpx client, with no retries: a test sees the
    service's first answer."""
    return EphemeraClient(http=client, retry=NO_RETRIES)


def submit(client: httpx.Client, files: list[bytes], *, key: bytes, kind: str = "ai_photo",
           style: str = "portrait", account_id: str = "acct-1",
           names: list[str] | None = None) -> httpx.Response:
    """POST /v1/jobs through the typed client (its multipart body, device-key header and
    Idempotency-Key); the raw answer, so a test can assert a refusal's status."""
    names = names or [f"photo{i}.jpg" for i in range(len(files))]
    call = job_call(list(zip(names, files, strict=True)), device_key=key, kind=kind,
                    style=style, account_id=account_id)
    response = api_over(client).send(call)
    if response.status_code == 202:
        _ACCOUNT_OF[response.json()["job_id"]] = account_id
    return response


def job_url(job_id: str) -> str:
    """The job's status URL under its account."""
    return f"/v1/accounts/{_ACCOUNT_OF[job_id]}/jobs/{job_id}"


def wait_finished(client: httpx.Client, job_id: str, timeout_s: float = 180.0) -> dict:
    """Poll (the client's wait_job) until the job ended and its inputs were purged; the
    job's view, validated against the API's model, as JSON."""
    job = api_over(client).wait_job(_ACCOUNT_OF[job_id], job_id, timeout_s=timeout_s,
                                    poll_s=0.1)
    return job.model_dump(mode="json")


def redis_values(client: redis.Redis) -> list[tuple[str, bytes]]:
    """Every key and value in Redis, as bytes."""
    found: list[tuple[str, bytes]] = []
    for raw_key in client.scan_iter(count=1000):
        key = raw_key.decode()
        kind = client.type(raw_key).decode()
        parts: list[bytes] = [raw_key]
        if kind == "string":
            parts.append(client.get(raw_key) or b"")
        elif kind == "hash":
            for k, v in client.hgetall(raw_key).items():
                parts += [k, v]
        elif kind == "set":
            parts += list(client.smembers(raw_key))
        elif kind == "zset":
            parts += [m for m, _ in client.zrange(raw_key, 0, -1, withscores=True)]
        elif kind == "list":
            parts += client.lrange(raw_key, 0, -1)
        found.append((f"redis:{key}", b"\x00".join(parts)))
    return found


def files_under(*roots: Path) -> list[tuple[str, bytes]]:
    """Every file below the roots (object store, Redis data dir with its AOF)."""
    return [(str(p), p.read_bytes()) for root in roots for p in sorted(root.rglob("*"))
            if p.is_file()]


def find_needles(blobs: list[tuple[str, bytes]], needles: dict[str, bytes]) -> list[str]:
    """Names of needles found anywhere, with where."""
    return [f"{name} in {where}" for name, needle in needles.items() for where, blob in blobs
            if needle and needle in blob]


def windows(data: bytes, size: int = 48, count: int = 4) -> list[bytes]:
    """A few slices from the middle of ``data``: enough to spot any copy of it."""
    step = max(1, (len(data) - size) // (count + 1))
    return [data[step * (i + 1): step * (i + 1) + size] for i in range(count)]


def face_embedding(clean_png: bytes, weights: Path) -> np.ndarray:
    """The identity embedding the face stage computes for this (stripped) photo with the
    service's weights, computed here in-process: float32, unit length."""
    from pipeline.core.config import ModelsConfig
    from pipeline.core.records import FaceBatch
    from pipeline.media.ingest import decode_clean_png
    from pipeline.models.faces import ArcFaceEmbedder, MtcnnDetector, embed_faces, mean_identity
    from pipeline.models.runtime import select_runtime

    runtime = select_runtime(ModelsConfig())
    batch = embed_faces(FaceBatch(["j"], [decode_clean_png(clean_png)]),
                        MtcnnDetector(runtime, min_probability=0.9),
                        ArcFaceEmbedder(weights, runtime))
    return mean_identity([batch.embeddings[0]])


def _number_forms(value: float) -> bytes:
    """A regex for how a printer may write ``value``: fixed-point truncated or rounded to
    4 decimals (numpy, repr, "%.4f" and longer), or scientific with a 4-decimal mantissa."""
    mantissa, exponent = f"{value:.8e}".split("e")
    fixed = {f"{value:.4f}", f"{int(value * 1e4) / 1e4:.4f}"}
    scientific = {f"{float(mantissa):.4f}", mantissa[:mantissa.index(".") + 5]}
    forms = [re.escape(f.encode()) + rb"\d*" for f in sorted(fixed)]
    forms += [re.escape(m.encode()) + rb"\d*e[-+]?\d+" for m in sorted(scientific)]
    return rb"(?:" + rb"|".join(forms) + rb")"


def embedding_patterns(vector: np.ndarray, pairs: int = 12) -> dict[str, re.Pattern[bytes]]:
    """Patterns that find an embedding however it was written out: its raw float32 bytes,
    their base64, or its numbers as text (two neighbours in a row, so no timing or
    counter in a log matches by chance)."""
    raw = vector.astype(np.float32).tobytes()
    found = {f"raw-{i}": re.compile(re.escape(w)) for i, w in enumerate(windows(raw, 32))}
    found |= {f"b64-{i}": re.compile(re.escape(w))
              for i, w in enumerate(windows(base64.b64encode(raw), 32))}
    for i in range(pairs):
        a, b = (float(v) for v in vector[i:i + 2])
        found[f"text-{i}"] = re.compile(_number_forms(a) + rb"[\s,;\[\]()]+" + _number_forms(b))
    return found


def find_patterns(blobs: list[tuple[str, bytes]], patterns: dict[str, re.Pattern[bytes]]
                  ) -> list[str]:
    """Names of patterns found anywhere, with where."""
    return [f"{name} in {where}" for name, pattern in patterns.items() for where, blob in blobs
            if pattern.search(blob)]


def wait_running(client: httpx.Client, job_ids: list[str], stage: str,
                 timeout_s: float = 60.0) -> str:
    """Wait until one of the jobs entered a model call of ``stage``; that job's id."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for job_id in job_ids:
            view = client.get(job_url(job_id)).json()
            if view["status"] == "running" and view["batch_sizes"][stage]:
                return job_id
        time.sleep(0.02)
    raise AssertionError(f"no job reached the {stage} stage")


@contextmanager
def frozen(pid: int) -> Iterator[None]:
    """The process stopped (SIGSTOP) for the duration, then continued: whatever it was
    doing is provably still in flight meanwhile."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def run_in_replica(deployment: str, fn):
    """Run ``fn(actor)`` inside the OS process of the (single) replica of ``deployment`` in
    the ephemera app, and return its result (fault injection and lookups)."""
    import ray

    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == "serve" and entry["name"].startswith(
                f"SERVE_REPLICA::ephemera#{deployment}#"):
            actor = ray.get_actor(entry["name"], namespace="serve")
            return ray.get(actor.__ray_call__.remote(fn), timeout=30)
    raise AssertionError(f"no replica of {deployment}")


def replica_pid(deployment: str) -> int:
    """The OS process of the (single) replica of ``deployment`` in the ephemera app."""
    return run_in_replica(deployment, lambda actor: os.getpid())


def log_leaves(client) -> list[dict]:
    """Every leaf of the deletion transparency log, parsed (public data)."""
    import json

    from pipeline.state.tlog import TransparencyLog

    log = TransparencyLog(client)
    return [json.loads(leaf) for leaf in log.leaves(list(range(log.size())))]
