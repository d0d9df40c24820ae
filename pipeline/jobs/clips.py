"""The clip stage: animated photos (``animate``) and art styles on videos, one chunk of
frames per diffusion call.

A clip of F frames goes through the diffusion pool as ceil(F / video_chunk_frames) calls, so
a long video never holds a GPU for long and photo jobs get model calls in between. Each
chunk runs AnimateDiff's video-to-video pipeline on its frames (the motion module keeps them
consistent; every chunk starts from the same noise seed). A chunk that is not the last is
stored encrypted as WORK_DATA (purged with the inputs); the last chunk reads them back,
encodes the clip (MP4 or animated WebP) and a poster image, and runs the output stage.
"""

from __future__ import annotations

import io
from fractions import Fraction

import numpy as np

from pipeline.core.config import Settings
from pipeline.core.records import JobKind, ObjectClass, WorkItem
from pipeline.media.ingest import decode_clean_png, encode_output
from pipeline.media.video import decode_frames, encode_mp4, encode_webp
from pipeline.models.diffusion import GenerationParams
from pipeline.retention.purge import store_with_inputs
from pipeline.state.job_store import JobStore
from pipeline.storage.base import StoreSet

MEDIA_TYPES = {"mp4": "video/mp4", "webp": "image/webp"}


def clip_size_px(height_px: int, width_px: int, resolution_px: int) -> tuple[int, int]:
    """(width, height) of a clip: the longer side at ``resolution_px``, the aspect kept
    (portrait stays portrait), both sides multiples of 8 as the VAE needs."""
    scale = resolution_px / max(height_px, width_px)
    return (max(8, round(width_px * scale / 8) * 8), max(8, round(height_px * scale / 8) * 8))


def chunk_range(item: WorkItem, chunk_frames: int) -> tuple[int, int]:
    return item.frames_done, min(item.num_frames, item.frames_done + chunk_frames)


def clip_params(item: WorkItem, settings: Settings) -> GenerationParams:
    style = settings.styles.styles[item.style]
    strength = style.motion_strength if item.kind == JobKind.ANIMATE else style.strength
    return GenerationParams(prompt=style.prompt, resolution_px=item.resolution_px,
                            num_inference_steps=settings.models.num_inference_steps,
                            guidance_scale=style.guidance_scale, strength=strength)


def source_frames(plain: bytes, item: WorkItem, start: int, stop: int) -> list[np.ndarray]:
    """The input frames of one chunk: the video's own, or the photo held still."""
    if item.video_input:
        frames = decode_frames(plain, start, stop)
        if len(frames) != stop - start:
            raise ValueError(f"the stored video holds {len(frames)} of frames {start}-{stop}")
        return frames
    photo = decode_clean_png(plain)
    return [photo] * (stop - start)


def pack_frames(frames: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(frames, np.uint8), allow_pickle=False)
    return buffer.getvalue()


def unpack_frames(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def store_chunk(stores: StoreSet, jobs: JobStore, item: WorkItem, frames: np.ndarray,
                settings: Settings) -> str:
    """Generated frames of a chunk, encrypted beside the inputs (record first)."""
    return store_with_inputs(stores, jobs, item, pack_frames(frames), ObjectClass.WORK_DATA,
                             settings.retention)


def encode_clip(frames: np.ndarray, fps: float, output_format: str,
                poster_format: str) -> list[tuple[bytes, str, str]]:
    """The clip and its poster (first frame): (bytes, media type, extension) each."""
    rate = Fraction(fps).limit_denominator(1001)
    clip = encode_mp4(frames, rate) if output_format == "mp4" else encode_webp(frames, rate)
    poster, poster_type = encode_output(frames[0], poster_format)
    return [(clip, MEDIA_TYPES[output_format], output_format),
            (poster, poster_type, poster_format)]
