"""A hostile media corpus, built here from scratch (nothing downloaded), and the phone media
that must still pass. Used by ``-m security`` tests and ``scripts/bench_hostile.py``.

Each case is one request: its files, the job kind, and what a serious service must answer
(``refused``: a 4xx naming the limit; ``accepted``: within the decoding budgets).
"""

from __future__ import annotations

import functools
import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from PIL import Image
from skimage import data as skdata

from tests.unit.factories import png_chunk


@dataclass(frozen=True)
class Case:
    name: str
    files: list[tuple[str, bytes]]  # (file name, bytes)
    kind: str
    expect: str  # "refused" | "accepted"
    why: str  # what it tries, or what it proves


def _png_1bit(width: int, height: int, *, junk_bytes: int = 0) -> bytes:
    """A 1-bit greyscale PNG of zeros (a few KB on the wire, width x height pixels), with a
    private junk chunk of ``junk_bytes`` appended to pad it out."""
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    junk = png_chunk(b"juNk", b"\x00" * junk_bytes) if junk_bytes else b""
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat)
            + junk + png_chunk(b"IEND", b""))


def _png_16bit(width: int, height: int) -> bytes:
    values = (np.arange(width, dtype=np.uint32)[None, :] * 7 % 65536).astype(np.uint16)
    image = Image.fromarray(np.repeat(values, height, axis=0))  # uint16: mode I;16
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _progressive_jpeg_with_scans(side: int, copies: int) -> bytes:
    """A grey progressive JPEG whose scans are repeated ``copies`` times: each scan is a
    full pass of the decoder over the image."""
    buffer = io.BytesIO()
    Image.new("L", (side, side), 128).save(buffer, format="JPEG", progressive=True)
    raw = buffer.getvalue()
    starts = [i for i in range(len(raw) - 1) if raw[i:i + 2] == b"\xff\xda"]
    ends = [*starts[1:], raw.rindex(b"\xff\xd9")]
    smallest = min((raw[s:e] for s, e in zip(starts, ends, strict=True)), key=len)
    return raw[:ends[-1]] + smallest * copies + b"\xff\xd9"


def _clip(codec: str, *, frames: int, width: int, height: int, fps: int = 30,
          container: str = "mp4", pix_fmt: str = "yuv420p", rotation: int | None = None,
          picture: Callable[[int], np.ndarray] | None = None,
          options: dict[str, str] | None = None) -> bytes:
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=fps, options=options or {})
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i in range(frames):
            pixels = picture(i) if picture else np.zeros((height, width, 3), np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        out.mux(stream.encode(None))
    return buffer.getvalue()


def _mjpeg_growing_mkv() -> bytes:
    """MJPEG in Matroska: a 64x64 first frame, then 12000x12000 ones (the header says 64x64)."""
    import av

    big = io.BytesIO()
    Image.new("RGB", (12000, 12000)).save(big, format="JPEG", quality=10)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="matroska") as out:
        stream = out.add_stream("mjpeg", rate=1)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuvj420p"
        first = io.BytesIO()
        Image.new("RGB", (64, 64)).save(first, format="JPEG")
        for pts, payload in enumerate((first.getvalue(), big.getvalue(), big.getvalue())):
            packet = av.Packet(payload)
            packet.stream, packet.pts, packet.dts = stream, pts, pts
            packet.time_base = Fraction(1, 1)
            out.mux(packet)
    return buffer.getvalue()


def _image_codec_in_mov(codec: str, pix_fmt: str) -> bytes:
    return _clip(codec, frames=2, width=64, height=64, container="mov", pix_fmt=pix_fmt)


def _jpeg_with_huge_metadata() -> bytes:
    """A small photo with 300 APP segments of 64 KB (XMP-like junk): 19 MB of metadata."""
    buffer = io.BytesIO()
    Image.fromarray(_astronaut(256, 256)).save(buffer, format="JPEG")
    raw = buffer.getvalue()
    segment = b"\xff\xe1" + struct.pack(">H", 65535) + b"http://ns.adobe.com/xap/1.0/\x00" \
        + b"x" * (65533 - 29)
    return raw[:2] + segment * 300 + raw[2:]


def _animated_webp(frames: int) -> bytes:
    images = [Image.new("RGB", (256, 256), (i % 256, 0, 0)) for i in range(frames)]
    buffer = io.BytesIO()
    images[0].save(buffer, format="WEBP", save_all=True, append_images=images[1:], duration=10)
    return buffer.getvalue()


def _heif_declaring(width: int, height: int) -> bytes:
    """A HEIC whose header declares width x height (built small, then its ispe patched)."""
    import pillow_heif

    pillow_heif.register_heif_opener()
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="HEIF")
    raw = bytearray(buffer.getvalue())
    at = raw.find(b"ispe")
    if at < 0:
        raise RuntimeError("pillow-heif wrote no ispe box")
    struct.pack_into(">II", raw, at + 8, width, height)
    return bytes(raw)


def _astronaut(width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(skdata.astronaut()).resize((width, height)))


def phone_jpeg_12mp() -> bytes:
    """A 4000x3000 JPEG of a real photo, stored sideways with EXIF orientation 6 as a
    phone held upright writes it, with GPS and camera tags."""
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "PhoneMaker"
    exif[0x8825] = {1: "N", 2: (52.0, 31.0, 12.0)}
    buffer = io.BytesIO()
    Image.fromarray(_astronaut(4000, 3000)).save(buffer, format="JPEG", quality=92,
                                                 exif=exif.tobytes())
    return buffer.getvalue()


def phone_heic() -> bytes:
    import pillow_heif

    pillow_heif.register_heif_opener()
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(_astronaut(2016, 1512)).save(buffer, format="HEIF", exif=exif.tobytes())
    return buffer.getvalue()


def phone_hevc_clip(seconds: int = 10) -> bytes:
    """An iPhone-style portrait clip: 1920x1080 HEVC at 30 fps stored landscape with a
    display rotation of 90 degrees."""
    base = _astronaut(1920 + 300, 1080)

    def picture(i: int) -> np.ndarray:
        return np.ascontiguousarray(base[:, i:i + 1920])

    return _clip("libx265", frames=30 * seconds, width=1920, height=1080, rotation=90,
                 picture=picture, container="mov",
                 options={"x265-params": "log-level=none", "preset": "ultrafast"})


@dataclass(frozen=True)
class Spec:
    """A case before its bytes are built (building them all takes about 30 s)."""

    name: str
    kind: str
    expect: str
    why: str
    files: Callable[[], list[tuple[str, bytes]]]

    def build(self) -> Case:
        return Case(self.name, self.files(), self.kind, self.expect, self.why)


@functools.cache
def _black_1080p() -> bytes:
    return _clip("libx264", frames=450, width=1920, height=1080)


HOSTILE: list[Spec] = [
    Spec("h264-1080p-450-black-frames", "art_style", "accepted",
         "a 50 KB file that decodes to 450 full-HD frames: streamed, scaled",
         lambda: [("clip.mp4", _black_1080p())]),
    Spec("mjpeg-mkv-frames-grow-to-144mp", "art_style", "refused",
         "MJPEG is no phone codec; frames are checked one by one",
         lambda: [("clip.mkv", _mjpeg_growing_mkv())]),
    Spec("progressive-jpeg-10000-scans", "art_style", "refused",
         "scans counted before decoding",
         lambda: [("scan.jpg", _progressive_jpeg_with_scans(6320, 10_000))]),
    Spec("four-videos-in-one-request", "art_style", "refused",
         "request shape checked before any decode",
         lambda: [(f"v{i}.mp4", _black_1080p()) for i in range(4)]),
    Spec("video-with-kind-ai-photo", "ai_photo", "refused",
         "kind vs media checked before any decode", lambda: [("clip.mp4", _black_1080p())]),
    Spec("png-codec-in-mov", "art_style", "refused", "codec allowlist",
         lambda: [("clip.mov", _image_codec_in_mov("png", "rgb24"))]),
    Spec("tiff-codec-in-mov", "art_style", "refused", "codec allowlist",
         lambda: [("clip.mov", _image_codec_in_mov("tiff", "rgb24"))]),
    Spec("gif-codec-in-mov", "art_style", "refused", "codec allowlist",
         lambda: [("clip.mov", _image_codec_in_mov("gif", "rgb8"))]),
    Spec("mpeg4-part2-in-mkv", "art_style", "refused", "codec allowlist",
         lambda: [("clip.mkv", _clip("mpeg4", frames=3, width=64, height=64,
                                     container="matroska"))]),
    Spec("png-1bit-40mp", "art_style", "refused", "pixels per byte of image data",
         lambda: [("bomb.png", _png_1bit(8000, 5000))]),
    Spec("png-1bit-40mp-padded-20kb", "art_style", "refused",
         "padding does not count as image data",
         lambda: [("bomb.png", _png_1bit(8000, 5000, junk_bytes=20_000))]),
    Spec("png-16bit-40mp", "art_style", "accepted", "no float copy of a full image",
         lambda: [("deep.png", _png_16bit(8000, 5000))]),
    Spec("jpeg-19mb-of-app-segments", "art_style", "accepted",
         "metadata is stripped; it costs only its bytes",
         lambda: [("meta.jpg", _jpeg_with_huge_metadata())]),
    Spec("animated-webp-500-frames", "art_style", "refused", "no animation",
         lambda: [("anim.webp", _animated_webp(500))]),
    Spec("jpeg-with-zip-appended", "art_style", "accepted",
         "the stored PNG holds pixels only", lambda: [("poly.jpg", _jpeg_plus_zip())]),
    Spec("too-many-tiny-files", "art_style", "refused", "file count checked first",
         lambda: [(f"t{i}.png", _tiny_png()) for i in range(64)]),
    Spec("heif-declaring-3600mp", "art_style", "refused",
         "dimensions from the decoder's header",
         lambda: [("bomb.heic", _heif_declaring(60000, 60000))]),
]
LEGIT: list[Spec] = [
    Spec("phone-jpeg-12mp-exif-rotated", "art_style", "accepted", "upright, no EXIF",
         lambda: [("IMG_0001.jpg", phone_jpeg_12mp())]),
    Spec("phone-heic-exif-rotated", "art_style", "accepted", "upright, no EXIF",
         lambda: [("IMG_0002.heic", phone_heic())]),
    Spec("phone-hevc-10s-1080p-portrait", "art_style", "accepted", "upright, no tags",
         lambda: [("IMG_0003.mov", phone_hevc_clip())]),
]


@functools.cache
def build(name: str) -> Case:
    """One case by name, built once per process."""
    return next(s for s in HOSTILE + LEGIT if s.name == name).build()


def hostile_cases() -> list[Case]:
    """Every case of issue #19 and more; each is one request."""
    return [build(s.name) for s in HOSTILE]


def legit_cases() -> list[Case]:
    return [build(s.name) for s in LEGIT]


def _tiny_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg_plus_zip() -> bytes:
    import zipfile

    buffer = io.BytesIO()
    Image.fromarray(_astronaut(256, 256)).save(buffer, format="JPEG")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("payload.sh", "echo owned\n" * 100)
    return buffer.getvalue() + archive.getvalue()


def run_request(case: Case, decode, settings):
    """One case through the media pool's code path (``check_job_request``) with ``decode``
    (a SandboxPool's, normally): (the JobRequest or the InvalidUpload, the decode reports)."""
    from pipeline.core.errors import InvalidUpload
    from pipeline.jobs.intake import check_job_request
    from pipeline.media.ingest import declared_media

    reports = []

    def recording(data, **kwargs):
        report = decode(data, **kwargs)
        reports.append(report)
        return report

    try:
        verdict = check_job_request(
            account_id="acct-hostile", kind=case.kind, style="watercolor", resolution_px=None,
            files=[data for _, data in case.files], settings=settings,
            declared=[declared_media(None, name) for name, _ in case.files], decode=recording)
    except InvalidUpload as exc:
        verdict = exc
    return verdict, reports
