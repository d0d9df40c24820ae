"""Facts read from an upload's bytes before any decoder sees it (pipeline/media/sniff.py)."""

from __future__ import annotations

import io

from PIL import Image

from pipeline.media.sniff import jpeg_data_bytes, jpeg_scan_count, png_data_bytes
from tests.unit.factories import encode, photo, png_chunk


def _jpeg(**kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(photo(96, 128)).save(buffer, format="JPEG", **kwargs)
    return buffer.getvalue()


def test_scans_are_counted_as_the_decoder_would_meet_them():
    assert jpeg_scan_count(_jpeg(), stop_after=100) == 1
    progressive = _jpeg(progressive=True)
    scans = jpeg_scan_count(progressive, stop_after=100)
    assert 2 <= scans <= 12  # what libjpeg writes for a progressive colour photo
    first = progressive.index(b"\xff\xda")
    repeated = progressive[:-2] + progressive[first:-2] * 50 + b"\xff\xd9"
    assert jpeg_scan_count(repeated, stop_after=1000) == scans * 51
    assert jpeg_scan_count(repeated, stop_after=20) == 21  # stops counting past the limit
    assert jpeg_scan_count(b"\x89PNG\r\n\x1a\n", stop_after=10) == 0


def test_only_image_data_counts_towards_what_a_photo_may_declare():
    png = encode(photo(64, 64), "PNG")
    padded = png[:-12] + png_chunk(b"juNk", b"\x00" * 20_000) + png[-12:]
    assert png_data_bytes(padded) == png_data_bytes(png) < len(png)
    jpeg = _jpeg()
    fat = jpeg[:2] + (b"\xff\xfe" + (1002).to_bytes(2, "big") + b"c" * 1000) * 20 + jpeg[2:]
    assert jpeg_data_bytes(fat) == jpeg_data_bytes(jpeg) <= len(jpeg)
