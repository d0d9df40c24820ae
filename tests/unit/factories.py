"""Small builders shared by the unit tests: encoded images, work items, stage results.

Plain functions, no fixtures: a test says what it needs in one call.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

from pipeline.core.config import (
    CONFIG_DIR,
    MODEL_PINS,
    ModelsConfig,
    ServiceConfig,
    Settings,
    StyleConfig,
    StylesConfig,
)
from pipeline.core.records import JobRecord, JobStatus, RetentionRecord, StageResult, WorkItem
from pipeline.models.runtime import Runtime, select_runtime
from pipeline.storage.base import ObjectStore


def photo(height: int = 128, width: int = 128) -> np.ndarray:
    """A real photo (the astronaut, a human face) cropped to (height, width, 3) uint8."""
    return np.ascontiguousarray(data.astronaut()[:height, :width])


def encode(pixels: np.ndarray, image_format: str, **save_kwargs: object) -> bytes:
    """Encode pixels with PIL in ``image_format``, passing extra options to ``save``."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format, **save_kwargs)
    return buffer.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk with a correct CRC."""
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_declaring(width: int, height: int) -> bytes:
    """A valid-looking greyscale PNG header declaring ``width`` x ``height`` pixels.

    A few dozen bytes on the wire; the pixels are never allocated.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + png_chunk(b"IEND", b"")
    )


def cpu_runtime() -> Runtime:
    """CPU, float32, SDPA: what unit tests run on, whatever the host has."""
    return select_runtime(ModelsConfig(), cuda_available=False, xformers_installed=False)


def make_item(job_id: str = "job1", *, kind: str = "ai_photo", style: str = "portrait",
              resolution_px: int = 64, attempts: int = 0, face_uri: str | None = None,
              device_key: bytes = b"k" * 32, num_inputs: int = 1,
              deadline_s: float = float("inf"), cost_units: int = 1,
              num_frames: int = 0) -> WorkItem:
    """A WorkItem with plausible defaults."""
    return WorkItem(
        job_id=job_id, account_id="acct-1", kind=kind, style=style,
        resolution_px=resolution_px,
        input_uris=tuple(f"file:///store/inputs/{job_id}/{n}.bin" for n in range(num_inputs)),
        device_key=device_key, seed=7, face_uri=face_uri, attempts=attempts,
        deadline_s=deadline_s, cost_units=cost_units, num_frames=num_frames,
        fps=8.0 if num_frames else 0.0,
    )


def make_job_record(job_id: str = "job1", *, status: str = "queued", runner_id: str = "",
                    ingress_id: str = "", created_s: float = 1000.0) -> JobRecord:
    return JobRecord(job_id=job_id, account_id="acct-1", kind="ai_photo", style="portrait",
                     resolution_px=64, status=JobStatus(status), created_s=created_s,
                     updated_s=created_s, input_uris=[], runner_id=runner_id,
                     ingress_id=ingress_id)


def ok_result(job_id: str = "job1", **kwargs: object) -> StageResult:
    return StageResult(job_id=job_id, ok=True, **kwargs)  # type: ignore[arg-type]


def failed_result(job_id: str = "job1", *, reason: str = "boom",
                  retryable: bool = False) -> StageResult:
    return StageResult(job_id=job_id, ok=False, reason=reason, retryable=retryable)


def make_settings(**service: object) -> Settings:
    """Settings with defaults, one style ("portrait"), and service overrides."""
    return Settings(
        service=ServiceConfig(**service),  # type: ignore[arg-type]
        styles=StylesConfig(styles={
            "portrait": StyleConfig(prompt="a portrait"),
            "living": StyleConfig(prompt="a moving photo", num_frames=6, fps=12),
        }),
    )



def fake_pins() -> dict[str, str]:
    """A well-formed sha256 pin for each model (models.yaml keys): for a production-shaped
    config in a test that loads no model. A test that loads one stages it and pins its
    manifest (pipeline.models.tiny.stage_tiny_models)."""
    return {pin: hashlib.sha256(pin.encode()).hexdigest() for pin in MODEL_PINS.values()}


def pinned_production_configs(tmp_path: Path) -> Path:
    """A copy of configs/production as it is once its models are staged: the four null
    pins filled in (with ``fake_pins``), every other line as shipped."""
    target = tmp_path / "production"
    shutil.copytree(CONFIG_DIR / "production", target)
    models = target / "models.yaml"
    text = models.read_text()
    for pin, value in fake_pins().items():
        assert f"{pin}: null" in text, pin
        text = text.replace(f"{pin}: null", f"{pin}: {value}")
    models.write_text(text)
    return target


class MemoryJobStore:
    """In-memory stand-in for pipeline.state.job_store.JobStore's create/discard, recording each call.

    ``store_keys_at_create`` holds what the object store held when the job was registered,
    so a test can check that records are written before any object.
    """

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self.jobs: dict[str, JobRecord] = {}
        self.records: dict[str, RetentionRecord] = {}
        self.discarded: list[str] = []
        self.store_keys_at_create: list[str] | None = None

    def create_job(self, job: JobRecord, records: list[RetentionRecord], *,
                   max_in_flight: int | None = None) -> None:
        self.max_in_flight = max_in_flight
        self.store_keys_at_create = self.store.list_keys("")
        self.jobs[job.job_id] = job
        self.records.update({r.uri: r for r in records})

    def discard_job(self, job_id: str, records: list[RetentionRecord]) -> None:
        self.jobs.pop(job_id, None)
        self.discarded.append(job_id)
        for rec in records:
            self.records.pop(rec.uri, None)


LOCATION_TAG = "+48.8584+002.2945+035.000/"  # the Eiffel tower, as phones write ISO 6709
CREATION_TAG = "2024-05-01T10:00:00Z"
MAKE_TAG, MODEL_TAG = "Apple", "iPhone 15 Pro"


def make_video(*, frames: int = 12, width: int = 96, height: int = 64, fps: int = 24,
               container: str = "mp4", tagged: bool = True, audio: bool = True) -> bytes:
    """A phone-style clip written with PyAV: moving real-photo frames, and optionally the
    tags a phone writes (location, ISO 6709 key, creation time, make, model) and an audio
    track. ``container``: mp4, mov or webm."""
    import av
    from av.audio.frame import AudioFrame
    from av.video.frame import VideoFrame

    codec = {"webm": "libvpx-vp9"}.get(container, "libx264")
    audio_codec = {"webm": "libopus"}.get(container, "aac")
    photo = np.asarray(Image.fromarray(data.astronaut()).resize((width * 2, height * 2)))
    buffer = io.BytesIO()
    options = {"movflags": "use_metadata_tags"} if container != "webm" else {}
    with av.open(buffer, mode="w", format=container, options=options) as out:
        if tagged:
            out.metadata.update({"location": LOCATION_TAG, "creation_time": CREATION_TAG,
                                 "com.apple.quicktime.location.ISO6709": LOCATION_TAG,
                                 "make": MAKE_TAG, "model": MODEL_TAG})
        video = out.add_stream(codec, rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        sound = out.add_stream(audio_codec, rate=48000) if audio else None
        for i in range(frames):
            pixels = np.ascontiguousarray(photo[i: i + height, i: i + width])
            out.mux(video.encode(VideoFrame.from_ndarray(pixels, format="rgb24")))
        out.mux(video.encode(None))
        if sound is not None:
            tone = AudioFrame(format="fltp", layout="stereo", samples=960)
            for plane in tone.planes:
                plane.update(np.full(960, 0.1, np.float32).tobytes())
            tone.sample_rate, tone.pts = 48000, 0
            out.mux(sound.encode(tone))
            out.mux(sound.encode(None))
    return buffer.getvalue()


def heic_with_two_images(primary: np.ndarray, other: np.ndarray) -> bytes:
    """A HEIC holding two images (a burst, a depth map) whose second one is the primary,
    with EXIF carrying a GPS-like tag (pillow-heif writes it)."""
    import pillow_heif

    pillow_heif.register_heif_opener()
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x010F] = MAKE_TAG
    exif[0x0110] = MODEL_TAG
    Image.fromarray(other).save(buffer, format="HEIF", save_all=True,
                                append_images=[Image.fromarray(primary)], primary_index=1,
                                exif=exif.tobytes())
    return buffer.getvalue()
