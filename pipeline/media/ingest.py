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
from pipeline.media.sniff import jpeg_data_bytes, jpeg_scan_count, png_data_bytes
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


def check_file_shape(data: bytes, *, index: int, limits: ServiceConfig,
                     declared: str | None = None) -> bool:
    """Whether a file is a video, from its magic bytes alone, after the checks that need no
    decoder: not empty, within its size limit, and not declared as the other kind (a video
    renamed .jpg, an image sent as video/mp4: a client bug worth surfacing)."""
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
    limit = limits.max_video_bytes if is_video else limits.max_file_bytes
    if len(data) > limit:
        what = "the video limit" if is_video else "the limit"
        raise InvalidUpload(f"{where} is {len(data)} bytes, over {what} of {limit} bytes",
                            problem="too_large")
    return is_video


def check_media(data: bytes, *, index: int, limits: ServiceConfig,
                declared: str | None = None) -> CleanImage | CleanVideo:
    """A photo or a video, told apart by its bytes (``check_file_shape``), decoded,
    stripped and re-encoded."""
    if check_file_shape(data, index=index, limits=limits, declared=declared):
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
    except MemoryError:  # over the sandbox's memory budget: said as such
        raise
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
    # the wire and 1.2 GB in memory. Only image data counts: padding a bomb with a junk
    # chunk or a fat comment must not buy it pixels.
    data_bytes = image_data_bytes(data, image_format)
    if width * height > limits.max_pixels_per_byte * data_bytes:
        raise InvalidUpload(
            f"{where} declares {width}x{height} pixels in {data_bytes} bytes of image data, "
            "far more than its bytes can hold; it is refused before decoding",
            problem="too_large")
    if image_format in ("JPEG", "MPO"):
        scans = jpeg_scan_count(data, stop_after=limits.max_jpeg_scans)
        if scans > limits.max_jpeg_scans:
            raise InvalidUpload(
                f"{where} is a JPEG of more than {limits.max_jpeg_scans} scans (max_jpeg_scans; "
                "a phone's progressive photo has about 10); it is refused before decoding",
                problem="too_large")
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
        pixels = rgb_image(upright)  # one decoded copy at a time: the budget is memory
        pixels.info = {}  # what the decoder read (EXIF, ICC, XMP, text) is never written
        del upright
        image.close()
    except MemoryError:  # over the sandbox's memory budget: said as such
        raise
    except Exception:
        broken = True
    if broken:
        raise InvalidUpload(
            f"{where} is truncated or corrupt; upload the complete file", problem="invalid"
        ) from None
    return CleanImage(
        png_bytes=encode_png(pixels),
        width_px=pixels.width,
        height_px=pixels.height,
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


def image_data_bytes(data: bytes, image_format: str) -> int:
    """The bytes of a photo that hold pixels: a PNG's image data chunks, a JPEG less its
    APPn and comment segments, any other format whole."""
    if image_format == "PNG":
        return png_data_bytes(data)
    if image_format in ("JPEG", "MPO"):
        return jpeg_data_bytes(data)
    return len(data)


def rgb_image(image: Image.Image) -> Image.Image:
    """The image as 8-bit RGB (itself when it already is), keeping the contrast of
    high-bit-depth images: Pillow's own conversion clips 16-bit greyscale to white, so it
    is rescaled here first, in integers and in place (no float copy of a full image)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return Image.fromarray(to_rgb8(image), mode="RGB")
    return image.convert("RGB")


def to_rgb8(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 pixels of ``image`` (see ``rgb_image``)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        values = np.array(image, dtype=np.uint16)
        np.right_shift(values, 8, out=values)  # the high byte: 65535 -> 255, in place
        grey = values.astype(np.uint8)
        del values
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode == "I":
        values = np.array(image, dtype=np.int64)
        top = 65535 if values.max() > 255 else 255
        np.clip(values, 0, top, out=values)
        values *= 255
        values += top // 2  # round to nearest
        values //= top
        grey = values.astype(np.uint8)
        del values
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def encode_png(pixels: np.ndarray | Image.Image) -> bytes:
    """Encode (H, W, 3) uint8 pixels (or an RGB image) as a PNG with no ancillary metadata
    chunks: only the pixels are passed on, never the image's info."""
    if isinstance(pixels, Image.Image) and (pixels.info or pixels.mode != "RGB"):
        raise ValueError("encode_png takes RGB pixels only, with no info to carry along")
    buffer = io.BytesIO()
    # Fast deflate: the PNG is encrypted and stored for minutes, so its size matters less
    # than the CPU a 12 MP photo costs at the default level (about 3x).
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels, mode="RGB")
    image.save(buffer, format="PNG", compress_level=1)
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
