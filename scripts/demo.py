"""End-to-end demo on the embedded default: local Ray, local Redis, local object store,
tiny CPU models, real sample photos (scikit-image), all over HTTP through the typed client (serve/client.py).

Run:  make demo        (or: .venv/bin/python scripts/demo.py)

Submits scikit-image's astronaut for ai_photo, art_style and animate, a cat photo with no
human face and a blurred astronaut (the failure paths), a JPEG with EXIF GPS tags and a
phone-style video with location tags and audio (both written here); saves outputs to
./out/ and prints a table ending with ``inputs purged: N/N verified``.
"""

from __future__ import annotations

import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image, ImageFilter

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.core.config import load_settings  # noqa: E402
from pipeline.security import crypto  # noqa: E402
from pipeline.storage.base import open_stores  # noqa: E402
from serve.client import EphemeraClient  # noqa: E402
from serve.launcher import start_service  # noqa: E402

ACCOUNT = "demo-account"

GPS_LATITUDE = (41.0, 0.0, 59.0)  # the demo's own tag, easy to search for


def jpeg_with_gps(pixels: np.ndarray) -> bytes:
    """A JPEG carrying EXIF GPS (lat/lon), a camera model and a description."""
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0110] = "DemoCam GPS-1"  # Model
    exif[0x010E] = "home address"  # ImageDescription
    gps = {1: "N", 2: GPS_LATITUDE, 3: "E", 4: (28.0, 58.0, 45.0)}
    exif[0x8825] = gps
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92, exif=exif.tobytes())
    return buffer.getvalue()


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


CONTAINER_FIELDS = {"major_brand", "minor_version", "compatible_brands"}  # format, not data


def phone_video() -> bytes:
    """A 12-frame clip as a phone writes it: location, creation time, make and model tags
    and an audio track (made here with PyAV)."""
    import av
    from av.audio.frame import AudioFrame
    from av.video.frame import VideoFrame

    photo = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((192, 128)))
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mov", options={"movflags": "use_metadata_tags"}) as out:
        out.metadata.update({"location": "+27.9881+086.9250+8848.000/",
                             "com.apple.quicktime.location.ISO6709": "+27.9881+086.9250/",
                             "creation_time": "2024-05-01T10:00:00Z", "make": "Apple",
                             "model": "iPhone 15 Pro"})
        video = out.add_stream("libx264", rate=24)
        video.width, video.height, video.pix_fmt = 96, 64, "yuv420p"
        sound = out.add_stream("aac", rate=48000)
        for i in range(12):
            pixels = np.ascontiguousarray(photo[i: i + 64, 2 * i: 2 * i + 96])
            out.mux(video.encode(VideoFrame.from_ndarray(pixels, format="rgb24")))
        out.mux(video.encode(None))
        tone = AudioFrame(format="fltp", layout="stereo", samples=960)
        for plane in tone.planes:
            plane.update(np.full(960, 0.1, np.float32).tobytes())
        tone.sample_rate, tone.pts = 48000, 0
        out.mux(sound.encode(tone))
        out.mux(sound.encode(None))
    return buffer.getvalue()


def has_metadata(plain: bytes) -> bool:
    """Whether a stored (decrypted) input still carries tags: EXIF/text for a photo;
    container tags or an audio track for a video."""
    if plain[4:8] == b"ftyp":
        import av

        with av.open(io.BytesIO(plain)) as clip:
            tags = set(clip.metadata) - CONTAINER_FIELDS
            return bool(tags) or any(s.type == "audio" for s in clip.streams)
    with Image.open(io.BytesIO(plain)) as image:
        return bool(image.getexif()) or bool(image.info.get("exif")) or bool(image.text)


def check_output(path: Path, media_type: str) -> None:
    """The output decodes: every frame of a clip, or the image."""
    if media_type == "video/mp4":
        import av

        with av.open(str(path)) as clip:
            if not sum(1 for _ in clip.decode(video=0)):
                raise RuntimeError(f"{path} holds no frames")
        return
    Image.open(path).load()


EXTENSIONS = {"video/mp4": "mp4", "image/webp": "webp", "image/png": "png"}


@dataclass
class DemoJob:
    name: str
    kind: str
    style: str
    files: list[tuple[str, bytes, str]]
    job_id: str = ""
    stripped: str = "?"


def demo_jobs() -> list[DemoJob]:
    astronaut = skimage.data.astronaut()
    return [
        DemoJob("astronaut", "ai_photo", "portrait",
                [("astronaut.png", encode(astronaut, "PNG"), "image/png")]),
        DemoJob("astronaut", "art_style", "watercolor",
                [("astronaut.webp", encode(astronaut, "WEBP"), "image/webp")]),
        DemoJob("cat (no face)", "ai_photo", "portrait",
                [("chelsea.jpg", encode(skimage.data.chelsea(), "JPEG"), "image/jpeg")]),
        DemoJob("blurred face", "ai_photo", "portrait",
                [("blurred.png", encode(np.asarray(Image.fromarray(astronaut).filter(
                    ImageFilter.GaussianBlur(4))), "PNG"), "image/png")]),
        DemoJob("astronaut+GPS", "ai_photo", "comic",
                [("gps.jpg", jpeg_with_gps(astronaut), "image/jpeg")]),
        DemoJob("astronaut", "animate", "living",
                [("astronaut.png", encode(astronaut, "PNG"), "image/png")]),
        DemoJob("phone video+GPS+audio", "art_style", "watercolor",
                [("clip.mov", phone_video(), "video/quicktime")]),
    ]


def main() -> int:
    settings = load_settings()
    out_dir = REPO / "out"
    out_dir.mkdir(exist_ok=True)
    print("starting local Redis, Ray and Serve ...", flush=True)
    started = time.monotonic()
    with start_service(settings, workdir=REPO / "data") as service:
        print(f"service up at {service.base_url} in {time.monotonic() - started:.1f} s", flush=True)
        stores = open_stores(service.settings.storage)
        import redis

        jobs_redis = redis.Redis.from_url(service.settings.service.redis_url)
        key = crypto.new_device_key()
        jobs = demo_jobs()
        with EphemeraClient(service.base_url) as api:
            for job in jobs:
                accepted = api.submit_job([(name, data) for name, data, _ in job.files],
                                          device_key=key, kind=job.kind, style=job.style,
                                          account_id=ACCOUNT)
                job.job_id = accepted.job_id
                job.stripped = check_stored_inputs(stores, jobs_redis, job.job_id, key)
            final = {job.job_id: api.wait_job(ACCOUNT, job.job_id, timeout_s=300.0)
                     for job in jobs}
            media_types = {o.output_id: o.media_type for o in api.iter_outputs(ACCOUNT)}
            rows, purged, total = [], 0, 0
            for job in jobs:
                view = final[job.job_id]
                saved = []
                for n, output_id in enumerate(view.output_ids):
                    media_type = media_types[output_id]
                    path = out_dir / f"{job.job_id[:8]}-{job.kind}-{n}.{EXTENSIONS[media_type]}"
                    path.write_bytes(api.download_output(ACCOUNT, output_id))
                    check_output(path, media_type)
                    saved.append(path.relative_to(REPO).as_posix())
                gone = inputs_gone(stores, jobs_redis, job.job_id)
                ok = gone and view.num_inputs_purged_verified == view.num_inputs
                total += view.num_inputs
                purged += view.num_inputs if ok else 0
                lag = (view.inputs_purged_s - view.finished_s
                       if view.inputs_purged_s and view.finished_s else None)
                status = view.status + (f" ({view.reason})" if view.reason else "")
                rows.append((job.job_id[:8], f"{job.kind}/{job.style}", job.name, status,
                             ", ".join(saved) or "-", job.stripped,
                             "yes" if ok else "NO", f"{lag:.2f}" if lag is not None else "-"))
            verified = delete_and_verify(api, view.output_ids[-1]) if view.output_ids else ""
        print(RANDOM_WEIGHTS_NOTE)
        print_table(rows)
        print(verified)
        print(f"inputs purged: {purged}/{total} verified")
        return 0 if purged == total else 1


def delete_and_verify(api: EphemeraClient, output_id: str) -> str:
    """Delete one output as a user would, then check the receipt as their phone would: the
    standalone verifier (pipeline/transparency/verifier.py) against the log's public key."""
    from pipeline.transparency import verifier

    key = api.http.get("/v1/transparency/key").json()["public_key"]
    started = api.delete_output(ACCOUNT, output_id)
    deadline = time.monotonic() + 30
    while True:
        receipt = api.http.get(started.receipt_url).json()
        if receipt["proof_status"] == "proven" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    report = verifier.verify_receipt(receipt, verifier.parse_public_key(key))
    if not report.ok or report.head is None:
        return f"deletion receipt NOT verified: {report.problems}"
    return (f"deleted output {output_id[:8]}: receipt verified offline (leaf "
            f"{receipt['objects'][0]['leaf_index']} of a signed log of {report.head.tree_size})")


def check_stored_inputs(stores, jobs_redis, job_id: str, key: bytes) -> str:
    """As the device: decrypt what the service stored and look for any metadata."""
    import json

    uris = json.loads(jobs_redis.hget(f"eph:job:{job_id}", "input_uris"))
    verdicts = []
    for uri in uris:
        try:
            store, object_key = stores.locate(uri)
            blob = store.get(object_key, customer_key=key)
        except Exception:
            verdicts.append("purged before check")
            continue
        plain = crypto.decrypt(blob, key, uri=uri)
        verdicts.append("no" if has_metadata(plain) else "yes")
    return ", ".join(verdicts)


def inputs_gone(stores, jobs_redis, job_id: str) -> bool:
    """Independent check: no input or face-data object of the job is left in any store."""
    leftovers = [k for store in stores.all() for prefix in ("inputs/", "face/", "work/")
                 for k in store.list_keys(f"{prefix}{job_id}/")]
    return not leftovers and not jobs_redis.scard(f"eph:ret:job:{job_id}")


RANDOM_WEIGHTS_NOTE = (
    "note: the demo's diffusion and face-embedding models are the real architectures with "
    "RANDOM weights,\n      so the output pictures are noise; point configs/models.yaml at "
    "real weights for real pictures (README, 'Serving real models').")


def print_table(rows: list[tuple]) -> None:
    header = ("job", "kind/style", "photo", "status", "output file", "metadata stripped",
              "inputs purged+verified", "s success->purge")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print(line.format(*header))
    print(line.format(*["-" * w for w in widths]))
    for row in rows:
        print(line.format(*row))


if __name__ == "__main__":
    sys.exit(main())
