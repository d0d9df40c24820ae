"""Photos as phones take them (HEIC with several images, AVIF) and videos (MP4, MOV, WebM):
accepted, stripped to pixels/frames, refused with a reason when bad or over a limit.

Videos are made here with PyAV, carrying a location, a creation time, make/model tags and an
audio track, like a phone's clip."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
from PIL import Image

from pipeline.core.config import ServiceConfig
from pipeline.core.errors import InvalidUpload
from pipeline.core.records import CleanImage
from pipeline.jobs.clips import clip_size_px
from pipeline.media.ingest import check_media, declared_media, decode_clean_png
from pipeline.media.video import CleanVideo, decode_frames, encode_mp4, upright
from serve.errors import http_status
from tests.unit.factories import (
    CREATION_TAG,
    LOCATION_TAG,
    MAKE_TAG,
    MODEL_TAG,
    encode,
    heic_with_two_images,
    make_video,
    photo,
)

LIMITS = ServiceConfig()
TAGS = [t.encode() for t in (LOCATION_TAG, "48.8584", CREATION_TAG, "2024-05-01", MAKE_TAG,
                             MODEL_TAG)]


def test_heic_gives_its_primary_image_and_no_metadata():
    primary, other = photo(64, 64), photo(80, 96)
    clean = check_media(heic_with_two_images(primary, other), index=1, limits=LIMITS,
                        declared="image")
    assert isinstance(clean, CleanImage) and clean.source_format == "HEIF"
    assert (clean.width_px, clean.height_px) == (64, 64)  # the primary, not the first
    pixels = decode_clean_png(clean.png_bytes)
    assert np.abs(pixels.astype(int) - primary).mean() < 12  # HEVC is lossy
    assert not any(tag in clean.png_bytes for tag in TAGS)


def test_avif_is_accepted_and_reencoded():
    clean = check_media(encode(photo(64, 80), "AVIF"), index=1, limits=LIMITS)
    assert isinstance(clean, CleanImage) and clean.source_format == "AVIF"
    assert (clean.width_px, clean.height_px) == (80, 64)


@pytest.mark.video
@pytest.mark.parametrize("container", ["mp4", "mov", "webm"])
def test_a_tagged_video_with_audio_is_stripped_to_its_frames(container):
    upload = make_video(container=container, frames=12, width=96, height=64)
    assert sum(tag in upload for tag in TAGS) >= (0 if container == "webm" else 3)

    clean = check_media(upload, index=1, limits=LIMITS, declared="video")

    assert isinstance(clean, CleanVideo)
    # Stored no larger than the largest output (64 px here), even-sided, every frame kept.
    assert max(LIMITS.allowed_resolutions_px) == 64
    assert (clean.width_px, clean.height_px, clean.num_frames, clean.fps) == (64, 42, 12, 24)
    assert not any(tag in clean.mp4_bytes for tag in TAGS)
    with av.open(io.BytesIO(clean.mp4_bytes)) as stripped:
        assert [s.type for s in stripped.streams] == ["video"]  # audio dropped
        assert not {"location", "creation_time", "make", "model"} & set(stripped.metadata)
        assert "creation_time" not in stripped.streams.video[0].metadata
    assert len(decode_frames(clean.mp4_bytes)) == 12


@pytest.mark.video
def test_decode_frames_reads_a_range():
    clip = encode_mp4([np.full((32, 48, 3), 10 * i, np.uint8) for i in range(10)], fps=8)
    frames = decode_frames(clip, 3, 7)
    assert len(frames) == 4 and frames[0].shape == (32, 48, 3)
    assert abs(int(frames[0].mean()) - 30) <= 3 and abs(int(frames[-1].mean()) - 60) <= 3


def test_rotation_is_applied_to_the_pixels():
    pixels = np.zeros((2, 3, 3), np.uint8)
    pixels[0, 0] = 255
    assert upright(pixels, 90).shape == (3, 2, 3)
    assert upright(pixels, 90)[2, 0].max() == 255  # counter-clockwise
    assert upright(pixels, -90).shape == (3, 2, 3)
    assert upright(pixels, 0) is pixels


def test_clip_size_keeps_the_aspect_on_multiples_of_8():
    assert clip_size_px(64, 96, 64) == (64, 40)  # landscape: (width, height)
    assert clip_size_px(1920, 1080, 512) == (288, 512)  # portrait stays portrait
    assert clip_size_px(64, 64, 64) == (64, 64)


def test_declared_media_reads_type_then_suffix():
    assert declared_media("image/jpeg", "x.mp4") == "image"
    assert declared_media("application/octet-stream", "clip.MOV") == "video"
    assert declared_media(None, "photo.heic") == "image"
    assert declared_media("application/octet-stream", "upload") is None


def _long_video() -> bytes:
    return make_video(frames=30, fps=10, tagged=False, audio=False)


def _corrupt_video() -> bytes:
    data = make_video(tagged=False, audio=False)
    return data[:200] + b"\x00" * 64  # a header, then nothing of the movie


def _zero_frames() -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        out.start_encoding()
    assert buffer.getvalue()[4:8] == b"ftyp"
    return buffer.getvalue()


@pytest.mark.video
@pytest.mark.parametrize(("make", "declared", "limits", "status", "words"), [
    (lambda: make_video(tagged=False), "image", LIMITS, 415, "holds a video"),
    (lambda: encode(photo(), "PNG"), "video", LIMITS, 415, "is not a video"),
    (_corrupt_video, None, LIMITS, 400, "corrupt"),
    (_zero_frames, None, LIMITS, 422, "frames"),
    (_long_video, None, ServiceConfig(max_video_duration_s=2.0), 413, "limit of 2.0 s"),
    (_long_video, None, ServiceConfig(max_video_frames=20), 413, "20"),
    (lambda: make_video(width=128, height=96, tagged=False), None,
     ServiceConfig(max_video_pixels=100 * 100), 413, "pixels per frame"),
    (lambda: make_video(fps=50, tagged=False), None, ServiceConfig(max_video_fps=30), 422,
     "frames/s"),
    (lambda: make_video(tagged=False), None, ServiceConfig(max_video_bytes=100), 413, "bytes"),
])
def test_bad_videos_are_refused_naming_the_problem(make, declared, limits, status, words):
    with pytest.raises(InvalidUpload) as caught:
        check_media(make(), index=2, limits=limits, declared=declared)
    assert http_status(caught.value) == status, caught.value
    assert words in str(caught.value) and "file 2" in str(caught.value)


def test_photo_formats_in_the_error_text():
    with pytest.raises(InvalidUpload, match="HEIC or AVIF"):
        check_media(b"GIF89a" + b"\x00" * 64, index=1, limits=LIMITS)
    assert Image.registered_extensions().get(".heic") == "HEIF"


@pytest.mark.video
@pytest.mark.parametrize(("fmt", "media_type"), [("mp4", "video/mp4"), ("webp", "image/webp")])
def test_a_clip_encodes_as_configured_with_a_poster(fmt, media_type):
    from pipeline.jobs.clips import encode_clip

    frames = np.stack([np.full((40, 64, 3), 25 * i, np.uint8) for i in range(6)])
    (clip, clip_type, ext), (poster, poster_type, _) = encode_clip(frames, 12.0, fmt, "png")
    assert (clip_type, ext, poster_type) == (media_type, fmt, "image/png")
    if fmt == "mp4":
        assert len(decode_frames(clip)) == 6
    else:
        with Image.open(io.BytesIO(clip)) as animated:
            assert animated.n_frames == 6 and animated.size == (64, 40)
            assert animated.info["loop"] == 0
    assert Image.open(io.BytesIO(poster)).size == (64, 40)


@pytest.mark.video
def test_frames_are_counted_as_they_are_decoded_not_as_the_header_says():
    upload = make_video(frames=12, width=96, height=64, tagged=False, audio=False)
    tight = LIMITS.model_copy(update={"max_video_total_pixels": 96 * 64 * 5})
    with pytest.raises(InvalidUpload, match="max_video_total_pixels"):
        check_media(upload, index=1, limits=tight, declared="video")
    only_vp9 = LIMITS.model_copy(update={"video_codecs": ["vp9"]})
    with pytest.raises(InvalidUpload, match="h264 video") as info:
        check_media(upload, index=1, limits=only_vp9, declared="video")
    assert info.value.problem == "unsupported_media"
