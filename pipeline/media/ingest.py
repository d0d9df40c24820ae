"""Ingest: decode an upload safely, then strip every byte of metadata by re-encoding pixels.

Runs before anything is stored or processed. The only thing that leaves this module for a
photo is a fresh PNG holding the pixels alone (EXIF orientation already applied), so GPS
tags, EXIF, XMP, IPTC, ICC profiles, comments and PNG text chunks cannot survive. Photos
come as JPEG, PNG, WebP, HEIC/HEIF (the iPhone default; a file with several images gives
its primary one) or AVIF; videos go to ``pipeline/media/video.py``.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pillow_heif
from PIL import Image, ImageOps

from pipeline.core.config import ServiceConfig
from pipeline.core.errors import InvalidUpload
from pipeline.core.records import CleanImage
from pipeline.media.video import CleanVideo, check_video, looks_like_video

pillow_heif.register_heif_opener()  # HEIC/HEIF; Pillow itself reads AVIF

# MPO: a JPEG with extra frames (depth maps, previews) as phones write it; the first
# frame is the photo. HEIF: pillow-heif opens the primary image first (bursts, depth).
ALLOWED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "HEIF", "AVIF")
STILL_WITH_EXTRA_FRAMES = ("MPO", "HEIF")
DECODERS = ("JPEG", "PNG", "WEBP", "HEIF", "AVIF")  # Pillow's opener ids; JPEG also opens MPO
PHOTO_FORMATS_TEXT = "JPEG, PNG, WebP, HEIC or AVIF"


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".heic", ".heif", ".avif")
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".webm")


def declared_media(content_type: str | None, filename: str | None) -> str | None:
    """"image", "video" or None (unsaid): what the client's part header and file name
    claim. The name is read for its suffix only and never stored or echoed."""
    declared = (content_type or "").split(";")[0].strip().lower()
    if declared.startswith(("image/", "video/")):
        return declared.split("/")[0]
    name = (filename or "").lower()
    if name.endswith(IMAGE_SUFFIXES):
        return "image"
    if name.endswith(VIDEO_SUFFIXES):
        return "video"
    return None


def declared_pixels(data: bytes) -> int:
    """What a photo's header claims (width x height), read without decoding; 0 for
    anything that is not an allowed photo."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=DECODERS) as image:
                return int(image.size[0]) * int(image.size[1])
    except Exception:
        return 0


def check_media(data: bytes, *, index: int, limits: ServiceConfig,
                declared: str | None = None) -> CleanImage | CleanVideo:
    """A photo or a video, told apart by its bytes; a file declared as the other (a video
    renamed .jpg, an image sent as video/mp4) is refused: a client bug worth surfacing."""
    where = f"file {index}"
    if not data:
        raise InvalidUpload(f"{where} is empty; select a photo or a video", problem="malformed")
    is_video = looks_like_video(data)
    if is_video and declared == "image":
        raise InvalidUpload(f"{where} is named or typed as an image but holds a video",
                            problem="unsupported_media")
    if not is_video and declared == "video":
        raise InvalidUpload(f"{where} is named or typed as a video but is not a video",
                            problem="unsupported_media")
    if is_video:
        return check_video(data, index=index, limits=limits)
    return check_upload(data, index=index, limits=limits)


def check_upload(data: bytes, *, index: int, limits: ServiceConfig) -> CleanImage:
    """Validate one uploaded file and return its metadata-free re-encoding.

    ``index`` (1-based) names the file in error messages; file names are never echoed,
    since they can carry personal data. Raises InvalidUpload with an HTTP status.
    """
    where = f"file {index}"
    if not data:
        raise InvalidUpload(f"{where} is empty; select a {PHOTO_FORMATS_TEXT} photo",
                            problem="malformed")
    if len(data) > limits.max_file_bytes:
        raise InvalidUpload(
            f"{where} is {len(data)} bytes, over the limit of {limits.max_file_bytes} bytes",
            problem="too_large",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Only the allowed decoders ever see the bytes (no TIFF, PSD, EPS, ...).
            image = Image.open(io.BytesIO(data), formats=DECODERS)
            image_format = image.format or ""
            width, height = image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidUpload(f"{where} declares too many pixels to decode", problem="too_large") from None
    except Exception:
        raise InvalidUpload(
            f"{where} is not a readable image; send {PHOTO_FORMATS_TEXT}", problem="unsupported_media"
        ) from None
    if image_format not in ALLOWED_FORMATS:
        raise InvalidUpload(
            f"{where} is {image_format or 'an unknown format'}; send {PHOTO_FORMATS_TEXT}",
            problem="unsupported_media",
        )
    # Check the declared size before decoding a single pixel: a 20000x20000 PNG is tiny on
    # the wire and 1.2 GB in memory.
    if width * height > limits.max_pixels_per_byte * len(data):
        raise InvalidUpload(
            f"{where} declares {width}x{height} pixels in {len(data)} bytes, far more than "
            "its bytes can hold; it is refused before decoding", problem="too_large")
    if width * height > limits.max_image_pixels:
        raise InvalidUpload(
            f"{where} is {width}x{height} pixels, over the limit of "
            f"{limits.max_image_pixels} pixels",
            problem="too_large",
        )
    if min(width, height) < limits.min_image_side_px:
        raise InvalidUpload(
            f"{where} is {width}x{height} pixels; each side must be at least "
            f"{limits.min_image_side_px}",
            problem="invalid",
        )
    if image_format not in STILL_WITH_EXTRA_FRAMES and getattr(image, "n_frames", 1) > 1:
        raise InvalidUpload(f"{where} is animated; send a still photo", problem="unsupported_media")
    try:
        if image_format != "HEIF":  # pillow-heif opens at the primary image; stay there
            image.seek(0)
        image.load()  # raises on truncated or corrupt data (LOAD_TRUNCATED_IMAGES is off)
        broken = image_format in ("JPEG", "MPO") and padded_truncation(image)
        upright = ImageOps.exif_transpose(image)  # keep what the user saw, drop the tag
        pixels = to_rgb8(upright)
    except Exception:
        broken = True
    if broken:
        raise InvalidUpload(
            f"{where} is truncated or corrupt; upload the complete file", problem="invalid"
        ) from None
    return CleanImage(
        png_bytes=encode_png(pixels),
        width_px=pixels.shape[1],
        height_px=pixels.shape[0],
        source_format="JPEG" if image_format == "MPO" else image_format,
    )


PADDING_ROWS = 8  # one MCU row


def padded_truncation(image: Image.Image) -> bool:
    """A baseline JPEG cut short with an end marker appended decodes without an error, its
    missing rows filled with flat grey (128, 128, 128): refuse that, as a truncated file."""
    width, height = image.size
    if height <= PADDING_ROWS:
        return False
    bottom = np.asarray(image.crop((0, height - PADDING_ROWS, width, height)).convert("RGB"))
    return bool((bottom == 128).all())


def to_rgb8(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8, keeping the contrast of high-bit-depth images: Pillow's own
    conversion clips 16-bit greyscale to white, so it is rescaled here first."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.uint32 if image.mode == "I" else np.uint16)
        top = 65535 if image.mode != "I" or values.max() > 255 else 255
        grey = (values.astype(np.float64) * (255.0 / top)).round().clip(0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def encode_png(pixels: np.ndarray) -> bytes:
    """Encode (H, W, 3) uint8 pixels as a PNG with no ancillary metadata chunks."""
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def decode_clean_png(data: bytes) -> np.ndarray:
    """Decode a PNG written by ``encode_png`` back to (H, W, 3) uint8 pixels."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def encode_output(pixels: np.ndarray, output_format: str) -> tuple[bytes, str]:
    """Encode a generated image; returns (bytes, media type). No metadata is written."""
    buffer = io.BytesIO()
    image = Image.fromarray(pixels, mode="RGB")
    if output_format == "webp":
        image.save(buffer, format="WEBP", quality=90)
        return buffer.getvalue(), "image/webp"
    image.save(buffer, format="PNG")
    return buffer.getvalue(), "image/png"
