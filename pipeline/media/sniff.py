"""Cheap facts about an upload read from its bytes alone, before any decoder sees it."""

from __future__ import annotations

import struct

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def jpeg_scan_count(data: bytes, *, stop_after: int) -> int:
    """How many scans (SOS markers) a JPEG holds, walking its segments without decoding;
    stops counting past ``stop_after``. A baseline photo has 1, a progressive one about 10;
    each scan costs a full pass over the image, so thousands are a CPU bomb."""
    if data[:2] != b"\xff\xd8":
        return 0
    scans, i, n = 0, 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            i += 1  # entropy-coded data between markers
            continue
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x00 or 0xD0 <= marker <= 0xD7 or marker == 0x01:  # stuffing, RSTn, TEM
            i += 2
            continue
        if marker == 0xD9:  # end of image
            break
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker == 0xDA:
            scans += 1
            if scans > stop_after:
                break
        i += 2 + length
    return scans


def png_data_bytes(data: bytes) -> int:
    """The bytes of a PNG's image data (IDAT, and fdAT of an APNG): what its pixels are
    made of. Chunks of anything else (text, padding) do not count towards what the pixels
    may claim per byte."""
    if not data.startswith(PNG_SIGNATURE):
        return len(data)
    total, i = 0, len(PNG_SIGNATURE)
    while i + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[i:i + 8])
        if kind in (b"IDAT", b"fdAT"):
            total += min(length, len(data) - i - 8)
        if kind == b"IEND":
            break
        i += 12 + length
    return total


def jpeg_data_bytes(data: bytes) -> int:
    """A JPEG's bytes less its APPn and COM segments (EXIF, XMP, ICC, comments, padding)."""
    if data[:2] != b"\xff\xd8":
        return len(data)
    skipped, i, n = 0, 2, len(data)
    while i + 4 <= n and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xDA or marker == 0xD9:
            break  # the scans follow: count them whole
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        if 0xE0 <= marker <= 0xEF or marker == 0xFE:
            skipped += 2 + length
        i += 2 + length
    return len(data) - skipped
