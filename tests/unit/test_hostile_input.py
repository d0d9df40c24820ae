"""Hostile input, property-based (hypothesis): whatever bytes, sizes, ids or media names a
client sends, validation either accepts a clean re-encoding or raises InvalidUpload with a
4xx; it never crashes, never decodes more than it allows, and never echoes what it got.

Marker `security`. Bounded to a few hundred examples per property, so it runs in seconds.
"""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.core.config import ServiceConfig
from pipeline.core.errors import InvalidUpload
from pipeline.core.records import CleanImage
from pipeline.jobs.intake import check_account_id
from pipeline.media.ingest import check_media, declared_media, decode_clean_png
from pipeline.media.video import CleanVideo
from serve.errors import http_status
from tests.unit.factories import encode, photo

pytestmark = pytest.mark.security
LIMITS = ServiceConfig(max_file_bytes=2 * 1024 * 1024, max_image_pixels=4_000_000)
FAST = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
SMALL_PHOTOS = {fmt: encode(photo(48, 64), fmt) for fmt in ("JPEG", "PNG", "WEBP")}


def _outcome(data: bytes, declared: str | None = None) -> CleanImage | CleanVideo | None:
    """Validation's answer; None for a refusal, which must be a 4xx InvalidUpload."""
    try:
        return check_media(data, index=1, limits=LIMITS, declared=declared)
    except InvalidUpload as exc:
        assert 400 <= http_status(exc) < 500
        return None


@FAST
@given(st.binary(max_size=4096), st.sampled_from([None, "image", "video"]))
def test_arbitrary_bytes_are_refused_cleanly(data, declared):
    result = _outcome(data, declared)
    if isinstance(result, CleanImage):  # random bytes that happen to be a tiny image
        assert decode_clean_png(result.png_bytes).shape[2] == 3


@FAST
@given(st.sampled_from(sorted(SMALL_PHOTOS)), st.data())
def test_truncated_and_corrupted_photos_never_crash(fmt, data):
    original = SMALL_PHOTOS[fmt]
    cut = data.draw(st.integers(0, len(original)))
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(original) - 1),
                                         st.integers(0, 255)), max_size=8))
    damaged = bytearray(original[:cut])
    for position, value in flips:
        if position < len(damaged):
            damaged[position] = value
    result = _outcome(bytes(damaged))
    assert result is None or isinstance(result, CleanImage)


def _png_header(width: int, height: int, extra: bytes = b"") -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", extra) + chunk(b"IEND", b"")


@FAST
@given(st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1), st.binary(max_size=256))
def test_declared_dimensions_never_make_it_decode_a_bomb(width, height, extra):
    result = _outcome(_png_header(width, height, zlib.compress(extra)))
    if result is not None:
        assert width * height <= LIMITS.max_image_pixels


@FAST
@given(st.sampled_from(sorted(SMALL_PHOTOS)), st.binary(min_size=1, max_size=512))
def test_polyglots_with_trailing_payloads_give_pixels_only(fmt, payload):
    """A photo with any payload appended (a zip, a script): the stored PNG holds neither."""
    result = _outcome(SMALL_PHOTOS[fmt] + payload)
    if isinstance(result, CleanImage):
        if len(payload) >= 8:  # unless the payload is PNG structure itself (the signature)
            plain = _outcome(SMALL_PHOTOS[fmt])
            assert payload not in result.png_bytes or payload in plain.png_bytes
        with Image.open(io.BytesIO(result.png_bytes)) as clean:
            assert clean.format == "PNG" and not clean.info.get("exif") and not clean.text


@FAST
@given(st.text(max_size=80))
def test_account_ids_with_any_characters_are_validated_or_refused(text):
    try:
        assert check_account_id(text) == text
    except InvalidUpload as exc:
        assert http_status(exc) == 422
        if len(text) >= 4:  # shorter ones may occur in the fixed message by chance
            assert text not in str(exc)  # never echoed back
        return
    assert all(c.isascii() and (c.isalnum() or c in "_-") for c in text)
    assert ".." not in text and "/" not in text


@FAST
@given(st.one_of(st.none(), st.text(max_size=60)), st.one_of(st.none(), st.text(max_size=60)))
def test_declared_media_never_raises(content_type, filename):
    assert declared_media(content_type, filename) in (None, "image", "video")
