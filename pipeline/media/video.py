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
from typing import Any

import av
import numpy as np
from av.video.frame import VideoFrame
from PIL import Image

from pipeline.core.config import ServiceConfig
from pipeline.core.errors import InvalidUpload

# What the containers' demuxers call themselves (PyAV's format names).
VIDEO_CONTAINERS = {"mov,mp4,m4a,3gp,3g2,mj2": "MP4/MOV", "matroska,webm": "WebM"}
# Decoders (PyAV's codec context names) of the codecs phones and browsers record, by codec.
DECODER_CODECS = {"h264": "h264", "hevc": "hevc", "vp8": "vp8", "libvpx": "vp8",
                  "vp9": "vp9", "libvpx-vp9": "vp9", "av1": "av1", "libdav1d": "av1",
                  "libaom-av1": "av1"}
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
    re-encoding; raises InvalidUpload naming the file and the limit.

    Streaming: each frame is checked as it is decoded (its size, the frames and pixels so
    far, the duration) and encoded at once, so one decoded frame is held at a time,
    whatever the header declared."""
    where = f"file {index}"
    if len(data) > limits.max_video_bytes:
        raise InvalidUpload(f"{where} is {len(data)} bytes, over the video limit of "
                            f"{limits.max_video_bytes} bytes", problem="too_large")
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except Exception:  # av.error.MemoryError too: FFmpeg says ENOMEM for absurd headers
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
        check_codec(stream, where, limits)
        fps, _, _ = _declared(stream, where, limits)
        mp4_bytes, (height, width), num_frames = _restream(container, stream, where, limits, fps)
    return CleanVideo(mp4_bytes=mp4_bytes, width_px=width, height_px=height, fps=fps,
                      num_frames=num_frames, source_format=kind)


def check_codec(stream, where: str, limits: ServiceConfig) -> str:
    """The stream's codec, if service.yaml ``video_codecs`` allows it: refused before a
    frame is decoded (a TIFF, GIF, PNG or MJPEG track in a MOV is no phone video)."""
    ctx = stream.codec_context
    decoder = ctx.name if ctx is not None else ""
    codec = DECODER_CODECS.get(decoder or "")
    if codec is None or codec not in limits.video_codecs:
        allowed = ", ".join(c.upper() for c in limits.video_codecs)
        raise InvalidUpload(f"{where} holds {decoder or 'an unknown'} video; send {allowed} "
                            "(video_codecs)", problem="unsupported_media")
    return codec


def _declared(stream, where: str, limits: ServiceConfig) -> tuple[Fraction, int, int]:
    """Check what the header declares before decoding a frame."""
    ctx = stream.codec_context
    width, height = int(ctx.width or 0), int(ctx.height or 0)
    if width <= 0 or height <= 0:
        raise InvalidUpload(f"{where} declares no frame size", problem="invalid")
    _check_frame_size(width, height, where, limits)
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


def _check_frame_size(width: int, height: int, where: str, limits: ServiceConfig) -> None:
    if width * height > limits.max_video_pixels:
        raise InvalidUpload(f"{where} is {width}x{height} pixels per frame, over the limit of "
                            f"{limits.max_video_pixels}", problem="too_large")
    if min(width, height) < limits.min_image_side_px:
        raise InvalidUpload(f"{where} is {width}x{height} pixels; each side must be at least "
                            f"{limits.min_image_side_px}", problem="invalid")


def _restream(container, stream, where: str, limits: ServiceConfig,
              fps: Fraction) -> tuple[bytes, tuple[int, int], int]:
    """Decode frame by frame, each upright, RGB and no larger than the largest output size
    (``allowed_resolutions_px``), and encode it at once; stops with a 4xx as soon as a limit
    is passed (a header can lie about its length and about its frame size). Returns the
    MP4, its frame size (height, width) and frame count."""
    writer = Mp4Writer(fps)
    max_side_px = max(limits.allowed_resolutions_px)
    count = total_pixels = 0
    size: tuple[int, int] | None = None
    try:
        for frame in container.decode(stream):
            count += 1
            if count > limits.max_video_frames:
                raise InvalidUpload(f"{where} has more than {limits.max_video_frames} frames, "
                                    "the limit", problem="too_large")
            if (count - 1) / fps > limits.max_video_duration_s:
                raise InvalidUpload(f"{where} lasts over the limit of "
                                    f"{limits.max_video_duration_s} s", problem="too_large")
            _check_frame_size(frame.width, frame.height, f"{where} frame {count}", limits)
            total_pixels += frame.width * frame.height
            if total_pixels > limits.max_video_total_pixels:
                raise InvalidUpload(f"{where} decodes to more than "
                                    f"{limits.max_video_total_pixels} pixels in all "
                                    "(max_video_total_pixels)", problem="too_large")
            # Scaled down to what the largest output needs, in the same pass as the colour
            # conversion: storing full-HD frames would cost CPU and buy nothing.
            scale = min(1.0, max_side_px / max(frame.width, frame.height))
            pixels = even_size(upright(frame.to_ndarray(
                width=max(2, round(frame.width * scale)), height=max(2, round(frame.height * scale)),
                format="rgb24"), frame.rotation))  # even sides, as H.264 stores them
            del frame
            if size is None:
                size = (pixels.shape[0], pixels.shape[1])
            elif (pixels.shape[0], pixels.shape[1]) != size:
                raise InvalidUpload(f"{where} changes its frame size at frame {count}; send "
                                    "a video as a camera records it", problem="invalid")
            writer.add(pixels)
        if size is None:
            raise InvalidUpload(f"{where} holds no decodable frames", problem="invalid")
        return writer.finish(), size, count
    except InvalidUpload:
        raise
    except Exception:
        raise InvalidUpload(f"{where} is truncated or corrupt; upload the complete video",
                            problem="invalid") from None
    finally:
        writer.close()


def upright(pixels: np.ndarray, rotation_deg: int | float) -> np.ndarray:
    """Apply a display rotation (degrees counter-clockwise, as PyAV reports the display
    matrix) to the pixels, so the stored clip shows what the phone showed."""
    turns = round(float(rotation_deg or 0) / 90) % 4
    return np.ascontiguousarray(np.rot90(pixels, k=turns)) if turns else pixels


def even_size(pixels: np.ndarray) -> np.ndarray:
    """H.264 in yuv420p needs even sides: crop one pixel where needed."""
    height, width = pixels.shape[:2]
    return pixels[: height - height % 2, : width - width % 2]


class Mp4Writer:
    """H.264 MP4 of RGB frames added one at a time, no audio, no tags (the muxer writes
    none, bitexact). Opened on the first frame, whose size (cropped even) is the clip's."""

    def __init__(self, fps: Fraction, *, crf: int = 18) -> None:
        self.fps = fps
        self.crf = crf
        self.buffer = io.BytesIO()
        self._out: Any = None  # av's container and stream are untyped
        self._stream: Any = None

    def add(self, pixels: np.ndarray) -> None:
        pixels = even_size(np.asarray(pixels))
        if self._out is None:
            self._out = av.open(self.buffer, mode="w", format="mp4", options=_BITEXACT)
            self._stream = self._out.add_stream(
                "libx264", rate=self.fps,
                options={"crf": str(self.crf), "preset": "veryfast", "flags": "+bitexact"})
            self._stream.height, self._stream.width = pixels.shape[:2]
            self._stream.pix_fmt = "yuv420p"
        frame = VideoFrame.from_ndarray(pixels, format="rgb24")
        self._out.mux(self._stream.encode(frame))

    def finish(self) -> bytes:
        """Flush the encoder and return the MP4."""
        if self._out is None:
            raise ValueError("an MP4 needs at least one frame")
        self._out.mux(self._stream.encode(None))
        self._out.close()
        self._out = None
        return self.buffer.getvalue()

    def close(self) -> None:
        """Drop an unfinished clip (a refused upload)."""
        if self._out is not None:
            try:
                self._out.close()
            except Exception:  # a half-written clip may not close cleanly; it is discarded
                pass
            self._out = None


def encode_mp4(frames: list[np.ndarray] | np.ndarray, fps: Fraction, *, crf: int = 18) -> bytes:
    """H.264 MP4 of RGB frames, no audio, no tags."""
    writer = Mp4Writer(fps, crf=crf)
    try:
        for pixels in frames:
            writer.add(pixels)
        return writer.finish()
    finally:
        writer.close()


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
