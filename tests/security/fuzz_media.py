"""Coverage-guided fuzzing (atheris, libFuzzer) of the media decoder and metadata stripper.

The target is ``check_media``: every upload's bytes go through it before anything is
stored. For any input it must either refuse with InvalidUpload (a 4xx) or return a clean
re-encoding: a PNG of pixels alone (no EXIF, text, ICC), within the pixel limit, or an
H.264 MP4 with no tags. Anything else (another exception, a dirty result) is a crash.

Run it (outside CI, as long as you like):

    .venv/bin/python -m tests.security.fuzz_media -max_total_time=300

It seeds libFuzzer with small real files of every accepted format, each carrying EXIF/GPS
or text metadata, and writes a crashing input to tests/security/crashers/crash-<sha1>.
Keep every such file: test_fuzz.py replays each one as a regression test. pytest -m
security also runs this fuzzer for a short while (test_fuzz.py).
"""

from __future__ import annotations

import io
import sys
import tempfile
from pathlib import Path

import numpy as np

CRASHERS = Path(__file__).resolve().parent / "crashers"
DECLARED = (None, "image", "video")  # what the file's name or type said it was
MAX_PIXELS = 1_000_000


def check_one(data: bytes) -> None:
    """One fuzz input: its first byte picks what the client declared, the rest is the
    file. Returns on a clean refusal or a clean result; raises on anything else."""
    from PIL import Image

    from pipeline.core.config import ServiceConfig
    from pipeline.core.errors import InvalidUpload
    from pipeline.core.records import CleanImage
    from pipeline.media.ingest import check_media
    from serve.errors import http_status

    if not data:
        return
    declared, body = DECLARED[data[0] % len(DECLARED)], data[1:]
    limits = ServiceConfig(max_file_bytes=1 << 20, max_image_pixels=MAX_PIXELS,
                           max_video_frames=16, max_video_pixels=64 * 64)
    try:
        result = check_media(body, index=1, limits=limits, declared=declared)
    except InvalidUpload as exc:
        status = http_status(exc)
        if not 400 <= status < 500:
            raise AssertionError(f"refusal with status {status}") from exc
        return
    if isinstance(result, CleanImage):
        with Image.open(io.BytesIO(result.png_bytes)) as clean:
            assert clean.format == "PNG", clean.format
            assert not clean.info.get("exif") and not clean.info.get("icc_profile")
            assert not getattr(clean, "text", None), "text chunks survived"
            pixels = np.asarray(clean)
        assert pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.dtype == np.uint8
        assert pixels.shape[0] * pixels.shape[1] <= MAX_PIXELS
    else:
        import av

        with av.open(io.BytesIO(result.mp4_bytes)) as container:
            assert not container.metadata.get("location"), "location survived"
            assert [s.type for s in container.streams] == ["video"]


def seeds(folder: Path) -> Path:
    """Small real files of every accepted format, with metadata to strip."""
    import pillow_heif
    from PIL import Image

    from tests.unit.factories import encode, make_video

    pillow_heif.register_heif_opener()
    pixels = np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0110] = "FuzzCam"
    exif[0x8825] = {1: "N", 2: (41.0, 0.0, 59.0)}
    files = {fmt.lower(): encode(pixels, fmt, **kwargs) for fmt, kwargs in (
        ("JPEG", {"exif": exif.tobytes()}), ("PNG", {}), ("WEBP", {"exif": exif.tobytes()}),
        ("HEIF", {}), ("AVIF", {}))}
    files["mp4"] = make_video(frames=3, width=32, height=24)  # location tags and audio
    for name, data in files.items():
        for declared in range(len(DECLARED)):
            (folder / f"{name}-{declared}").write_bytes(bytes([declared]) + data)
    return folder


def main(argv: list[str]) -> None:
    import atheris

    with atheris.instrument_imports(include=["pipeline", "PIL", "pillow_heif"]):
        from PIL import Image

        import pipeline.media.ingest  # noqa: F401
        import pipeline.media.video  # noqa: F401

        Image.init()  # Pillow imports its format plugins lazily: import them instrumented

    CRASHERS.mkdir(exist_ok=True)
    corpus = Path(tempfile.mkdtemp(prefix="fuzz-media-"))
    # A hang (-timeout, s per input) or a memory blowup (-rss_limit_mb) is a crash too.
    args = [argv[0], f"-artifact_prefix={CRASHERS}/", "-max_len=65536", "-rss_limit_mb=2048",
            "-timeout=10",
            *argv[1:], str(seeds(corpus))]
    atheris.Setup(args, check_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
