"""Shared test helpers: photos, submission, waiting, and scanning every stored byte."""

from __future__ import annotations

import base64
import io
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


def replica_pid(deployment: str) -> int:
    """The OS process of the (single) replica of ``deployment`` in the ephemera app."""
    import os

    import ray

    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == "serve" and entry["name"].startswith(
                f"SERVE_REPLICA::ephemera#{deployment}#"):
            actor = ray.get_actor(entry["name"], namespace="serve")
            return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
    raise AssertionError(f"no replica of {deployment}")
