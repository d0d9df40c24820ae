"""Videos: decode an upload with PyAV within limits, strip it to its frames, and encode clips.

A video upload leaves ``check_video`` only as a fresh H.264 MP4 made from its decoded
frames: no audio (a voice is personal data and no style needs it), no container or stream
tags (location, ISO 6709 keys, creation time, make, model, software), no user-data boxes,
chapters or subtitle tracks, and the rotation applied to the pixels, so the clip needs no
display matrix. Frames are what the diffusion stage reads back.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
from av.video.frame import VideoFrame
from PIL import Image

from pipeline.core.config import ServiceConfig
from pipeline.core.errors import InvalidUpload

# What the containers' demuxers call themselves (PyAV's format names).
VIDEO_CONTAINERS = {"mov,mp4,m4a,3gp,3g2,mj2": "MP4/MOV", "matroska,webm": "WebM"}
# Encoder options that keep the muxer from writing its version or any time stamp.
_BITEXACT = {"fflags": "+bitexact"}


@dataclass(frozen=True, slots=True)
class CleanVideo:
    """A video upload after decoding and stripping: frames only, re-encoded."""

    mp4_bytes: bytes
    width_px: int
    height_px: int
    fps: Fraction
    num_frames: int
    source_format: str  # "MP4/MOV" | "WebM", detected from the bytes


def looks_like_video(data: bytes) -> bool:
    """ISO-BMFF with a video brand, or Matroska/WebM (HEIC and AVIF are ISO-BMFF too)."""
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return True
    return data[4:8] == b"ftyp" and data[8:12] not in (b"heic", b"heix", b"mif1", b"msf1",
                                                       b"avif", b"avis", b"hevc", b"heim")


def check_video(data: bytes, *, index: int, limits: ServiceConfig) -> CleanVideo:
    """Validate one uploaded video against service.yaml's limits and return its stripped
    re-encoding; raises InvalidUpload naming the file and the limit."""
    where = f"file {index}"
    if len(data) > limits.max_video_bytes:
        raise InvalidUpload(f"{where} is {len(data)} bytes, over the video limit of "
                            f"{limits.max_video_bytes} bytes", problem="too_large")
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except Exception:
        raise InvalidUpload(f"{where} is a corrupt or truncated video container; upload the "
                            "complete MP4, MOV or WebM file", problem="malformed") from None
    with container:
        kind = VIDEO_CONTAINERS.get(container.format.name)
        if kind is None:
            raise InvalidUpload(f"{where} is not an MP4, MOV or WebM video",
                                problem="unsupported_media")
        if not container.streams.video:
            raise InvalidUpload(f"{where} holds no video track, so no frames", problem="invalid")
        stream = container.streams.video[0]
        fps, width, height = _declared(stream, where, limits)
        frames = _decode(container, stream, where, limits, fps)
    if not frames:
        raise InvalidUpload(f"{where} holds no decodable frames", problem="invalid")
    height, width = frames[0].shape[:2]  # after rotation
    return CleanVideo(mp4_bytes=encode_mp4(frames, fps), width_px=width, height_px=height,
                      fps=fps, num_frames=len(frames), source_format=kind)


def _declared(stream, where: str, limits: ServiceConfig) -> tuple[Fraction, int, int]:
    """Check what the header declares before decoding a frame."""
    ctx = stream.codec_context
    if ctx is None or not ctx.name:
        raise InvalidUpload(f"{where} uses a video codec this service cannot decode",
                            problem="unsupported_media")
    width, height = int(ctx.width or 0), int(ctx.height or 0)
    if width <= 0 or height <= 0:
        raise InvalidUpload(f"{where} declares no frame size", problem="invalid")
    if width * height > limits.max_video_pixels:
        raise InvalidUpload(f"{where} is {width}x{height} pixels per frame, over the limit of "
                            f"{limits.max_video_pixels}", problem="too_large")
    if min(width, height) < limits.min_image_side_px:
        raise InvalidUpload(f"{where} is {width}x{height} pixels; each side must be at least "
                            f"{limits.min_image_side_px}", problem="invalid")
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = Fraction(rate) if rate else Fraction(0)
    if not 0 < fps <= limits.max_video_fps:
        raise InvalidUpload(f"{where} runs at {float(fps):.3g} frames/s; the limit is "
                            f"{limits.max_video_fps}", problem="invalid")
    if stream.duration is not None and stream.time_base is not None:
        duration_s = float(stream.duration * stream.time_base)
        if duration_s > limits.max_video_duration_s:
            raise InvalidUpload(f"{where} lasts {duration_s:.1f} s, over the limit of "
                                f"{limits.max_video_duration_s} s", problem="too_large")
    if stream.frames and stream.frames > limits.max_video_frames:
        raise InvalidUpload(f"{where} has {stream.frames} frames, over the limit of "
                            f"{limits.max_video_frames}", problem="too_large")
    return fps, width, height


def _decode(container, stream, where: str, limits: ServiceConfig,
            fps: Fraction) -> list[np.ndarray]:
    """Every frame, upright, RGB; stops with a 4xx as soon as a limit is passed (a header
    can lie about its length)."""
    frames: list[np.ndarray] = []
    try:
        for frame in container.decode(stream):
            if len(frames) >= limits.max_video_frames:
                raise InvalidUpload(f"{where} has more than {limits.max_video_frames} frames, "
                                    "the limit", problem="too_large")
            if len(frames) / fps > limits.max_video_duration_s:
                raise InvalidUpload(f"{where} lasts over the limit of "
                                    f"{limits.max_video_duration_s} s", problem="too_large")
            frames.append(upright(frame.to_ndarray(format="rgb24"), frame.rotation))
    except InvalidUpload:
        raise
    except Exception:
        raise InvalidUpload(f"{where} is truncated or corrupt; upload the complete video",
                            problem="invalid") from None
    return frames


def upright(pixels: np.ndarray, rotation_deg: int | float) -> np.ndarray:
    """Apply a display rotation (degrees counter-clockwise, as PyAV reports the display
    matrix) to the pixels, so the stored clip shows what the phone showed."""
    turns = round(float(rotation_deg or 0) / 90) % 4
    return np.ascontiguousarray(np.rot90(pixels, k=turns)) if turns else pixels


def even_size(pixels: np.ndarray) -> np.ndarray:
    """H.264 in yuv420p needs even sides: crop one pixel where needed."""
    height, width = pixels.shape[:2]
    return pixels[: height - height % 2, : width - width % 2]


def encode_mp4(frames: list[np.ndarray] | np.ndarray, fps: Fraction, *, crf: int = 18) -> bytes:
    """H.264 MP4 of RGB frames, no audio, no tags (the muxer writes none, bitexact)."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4", options=_BITEXACT) as out:
        stream = out.add_stream("libx264", rate=fps, options={"crf": str(crf),
                                                              "preset": "veryfast",
                                                              "flags": "+bitexact"})
        first = even_size(np.asarray(frames[0]))
        stream.height, stream.width = first.shape[:2]
        stream.pix_fmt = "yuv420p"
        for pixels in frames:
            frame = VideoFrame.from_ndarray(even_size(np.asarray(pixels)), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return buffer.getvalue()


def decode_frames(data: bytes, start: int = 0, stop: int | None = None) -> list[np.ndarray]:
    """Frames [start, stop) of an MP4 this module wrote, as (H, W, 3) uint8."""
    frames: list[np.ndarray] = []
    with av.open(io.BytesIO(data), mode="r") as container:
        for i, frame in enumerate(container.decode(video=0)):
            if stop is not None and i >= stop:
                break
            if i >= start:
                frames.append(frame.to_ndarray(format="rgb24"))
    return frames


def encode_webp(frames: np.ndarray, fps: Fraction) -> bytes:
    """An animated WebP (Pillow), looping, no metadata."""
    buffer = io.BytesIO()
    images = [Image.fromarray(f) for f in frames]
    images[0].save(buffer, format="WEBP", save_all=True, append_images=images[1:],
                   duration=round(1000 / float(fps)), loop=0, quality=85)
    return buffer.getvalue()
