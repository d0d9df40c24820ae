"""ingest.check_upload: metadata never survives, bad uploads are refused with the right status."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageCms
from PIL.PngImagePlugin import PngInfo

from pipeline.core.config import ServiceConfig
from pipeline.core.errors import InvalidUpload
from pipeline.media.ingest import check_upload, decode_clean_png, encode_output
from serve.errors import http_status
from tests.unit.factories import encode, photo, png_declaring

LIMITS = ServiceConfig()
ORIENTATION_TAG = 0x0112
GPS_IFD_TAG = 0x8825
MODEL_TAG = 0x0110


def opened(png_bytes: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png_bytes))
    image.load()
    return image


def jpeg_with_gps() -> bytes:
    exif = Image.Exif()
    exif[GPS_IFD_TAG] = {1: "N", 2: (41.0, 0.0, 59.0), 3: "E", 4: (28.0, 58.0, 45.0)}
    exif[MODEL_TAG] = "SomeCam"
    return encode(photo(), "JPEG", exif=exif.tobytes())


def rejection(data: bytes, *, index: int = 1, limits: ServiceConfig = LIMITS) -> InvalidUpload:
    with pytest.raises(InvalidUpload) as info:
        check_upload(data, index=index, limits=limits)
    return info.value


# --- metadata is stripped -------------------------------------------------------------


def test_jpeg_gps_and_camera_model_are_gone():
    upload = jpeg_with_gps()
    source = Image.open(io.BytesIO(upload)).getexif()
    assert source.get_ifd(GPS_IFD_TAG) and source[MODEL_TAG] == "SomeCam"  # the input has them

    clean = check_upload(upload, index=1, limits=LIMITS)

    out = opened(clean.png_bytes)
    assert out.format == "PNG"
    assert len(out.getexif()) == 0
    assert "exif" not in out.info
    assert b"SomeCam" not in clean.png_bytes
    assert b"Exif" not in clean.png_bytes and b"eXIf" not in clean.png_bytes
    assert clean.source_format == "JPEG"


def _gps_exif() -> bytes:
    exif = Image.Exif()
    exif[GPS_IFD_TAG] = {1: "N", 2: (41.0, 0.0, 59.0), 3: "E", 4: (28.0, 58.0, 45.0)}
    exif[MODEL_TAG] = "SomeCam"
    return exif.tobytes()


def test_webp_with_exif_gps_is_stripped():
    upload = encode(photo(), "WEBP", exif=_gps_exif())
    assert Image.open(io.BytesIO(upload)).getexif().get_ifd(GPS_IFD_TAG)  # the input has it
    clean = check_upload(upload, index=1, limits=LIMITS)
    out = opened(clean.png_bytes)
    assert clean.source_format == "WEBP" and len(out.getexif()) == 0
    assert b"SomeCam" not in clean.png_bytes and b"Exif" not in clean.png_bytes


def test_an_mpo_gives_its_first_image_stripped_of_exif():
    """A phone's multi-picture JPEG (MPO: a photo plus a depth or preview image), both
    carrying EXIF with GPS: only the first image's pixels are kept."""
    first, second = photo(), photo()[::-1].copy()
    buffer = io.BytesIO()
    Image.fromarray(first).save(buffer, format="MPO", save_all=True, exif=_gps_exif(),
                                append_images=[Image.fromarray(second)])
    upload = buffer.getvalue()
    assert Image.open(io.BytesIO(upload)).format == "MPO"
    clean = check_upload(upload, index=1, limits=LIMITS)
    out = np.asarray(opened(clean.png_bytes).convert("RGB")).astype(int)
    assert clean.source_format == "JPEG" and len(opened(clean.png_bytes).getexif()) == 0
    assert b"SomeCam" not in clean.png_bytes
    # The first image, not the second (JPEG-compressed, so close rather than equal).
    assert np.abs(out - first).mean() < 8 < np.abs(out - second).mean()


def test_png_text_and_xmp_chunks_are_gone():
    info = PngInfo()
    info.add_text("Comment", "taken at home")
    info.add_text("Author", "Jane Doe", zip=True)  # zTXt
    info.add_itxt("XML:com.adobe.xmp", '<x:xmpmeta xmlns:x="adobe:ns:meta/">GPS 41N</x:xmpmeta>')
    upload = encode(photo(), "PNG", pnginfo=info)
    assert Image.open(io.BytesIO(upload)).text  # the input has them

    clean = check_upload(upload, index=1, limits=LIMITS)

    assert opened(clean.png_bytes).text == {}
    for marker in (b"tEXt", b"zTXt", b"iTXt", b"XML:com.adobe.xmp", b"Jane", b"home"):
        assert marker not in clean.png_bytes


def test_jpeg_icc_profile_and_comment_are_gone():
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    upload = encode(photo(), "JPEG", icc_profile=icc, comment="holiday at grandma's")
    source = Image.open(io.BytesIO(upload))
    assert "icc_profile" in source.info and source.info.get("comment")  # the input has them

    clean = check_upload(upload, index=1, limits=LIMITS)

    out = opened(clean.png_bytes)
    assert "icc_profile" not in out.info
    assert b"iCCP" not in clean.png_bytes
    assert b"grandma" not in clean.png_bytes
    assert icc[:64] not in clean.png_bytes


def test_exif_orientation_is_applied_and_the_tag_dropped():
    pixels = photo(height=60, width=100)
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = 6  # "rotate 90 CW to display"
    upload = encode(pixels, "JPEG", exif=exif.tobytes())
    decoded = np.asarray(Image.open(io.BytesIO(upload)).convert("RGB"))

    clean = check_upload(upload, index=1, limits=LIMITS)

    assert (clean.width_px, clean.height_px) == (60, 100)
    out = opened(clean.png_bytes)
    assert out.size == (60, 100)
    assert ORIENTATION_TAG not in out.getexif()
    # The same pixels, turned the way the user saw them.
    np.testing.assert_array_equal(decode_clean_png(clean.png_bytes), np.rot90(decoded, k=-1))


def test_webp_is_accepted_and_reencoded_as_png():
    pixels = photo(64, 80)
    clean = check_upload(encode(pixels, "WEBP", lossless=True), index=1, limits=LIMITS)

    assert clean.source_format == "WEBP"
    assert clean.png_bytes.startswith(b"\x89PNG\r\n\x1a\n")
    np.testing.assert_array_equal(decode_clean_png(clean.png_bytes), pixels)


def test_png_pixels_survive_exactly():
    pixels = photo(50, 70)
    clean = check_upload(encode(pixels, "PNG"), index=1, limits=LIMITS)

    assert (clean.width_px, clean.height_px, clean.source_format) == (70, 50, "PNG")
    np.testing.assert_array_equal(decode_clean_png(clean.png_bytes), pixels)


# --- rejections -----------------------------------------------------------------------


def animated_webp() -> bytes:
    frames = [Image.fromarray(photo(64, 64)), Image.fromarray(photo(128, 128)[64:, 64:])]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="WEBP", save_all=True, append_images=frames[1:],
                   duration=100, loop=0)
    return buffer.getvalue()


def truncated_jpeg() -> bytes:
    whole = encode(photo(256, 256), "JPEG")
    return whole[: len(whole) // 2]


REJECTED = {
    "empty": (lambda: b"", 400),
    "text": (lambda: b"my secret diary: meet at 5", 415),
    "truncated_jpeg": (truncated_jpeg, 422),
    "decompression_bomb": (lambda: png_declaring(20_000, 20_000), 413),
    "over_pixel_limit": (lambda: png_declaring(8_000, 6_000), 413),
    "gif": (lambda: encode(photo(64, 64), "GIF"), 415),
    "animated_webp": (animated_webp, 415),
    "too_small": (lambda: encode(photo(16, 200), "PNG"), 422),
}


@pytest.mark.parametrize(("make_upload", "status"), REJECTED.values(), ids=REJECTED.keys())
def test_bad_upload_is_refused_with_its_status(make_upload, status):
    upload = make_upload()

    error = rejection(upload, index=3)

    assert http_status(error) == status
    message = str(error)
    assert message.startswith("file 3 ")  # names the file by position only
    assert "secret" not in message
    if upload:
        assert repr(upload[:12])[2:-1] not in message


def test_decompression_bomb_is_refused_without_decoding():
    bomb = png_declaring(20_000, 20_000)
    assert len(bomb) < 500  # tiny on the wire, 400 M pixels declared

    assert http_status(rejection(bomb)) == 413


def test_file_over_the_byte_limit_is_refused_before_decoding():
    upload = encode(photo(), "PNG")
    limits = ServiceConfig(max_file_bytes=len(upload) - 1)

    error = rejection(upload, limits=limits)

    assert http_status(error) == 413
    assert str(len(upload) - 1) in str(error)


def test_file_at_the_byte_limit_is_accepted():
    upload = encode(photo(), "PNG")
    clean = check_upload(upload, index=1, limits=ServiceConfig(max_file_bytes=len(upload)))
    assert clean.width_px == 128


def test_smallest_allowed_side_is_accepted():
    clean = check_upload(encode(photo(32, 40), "PNG"), index=1, limits=LIMITS)
    assert (clean.width_px, clean.height_px) == (40, 32)


# --- outputs --------------------------------------------------------------------------


@pytest.mark.parametrize(("output_format", "media_type", "pil_format"),
                         [("png", "image/png", "PNG"), ("webp", "image/webp", "WEBP")])
def test_encode_output_decodes_to_the_declared_type(output_format, media_type, pil_format):
    data, declared = encode_output(photo(64, 64), output_format)

    assert declared == media_type
    out = opened(data)
    assert out.format == pil_format and out.size == (64, 64)
    assert len(out.getexif()) == 0


def test_sixteen_bit_greyscale_keeps_its_contrast():
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    clean = check_upload(encode(ramp, "PNG"), index=1, limits=LIMITS)
    pixels = decode_clean_png(clean.png_bytes)
    assert pixels.min() == 0 and pixels.max() == 255
    assert abs(float(pixels.mean()) - 127.5) < 2  # not blown to white


def test_a_header_claiming_far_more_pixels_than_its_bytes_is_refused():
    with pytest.raises(InvalidUpload, match="far more than its bytes") as info:
        check_upload(png_declaring(6320, 6320), index=1, limits=LIMITS)
    assert http_status(info.value) == 413


def test_only_the_allowed_decoders_run():
    tiff = encode(photo(), "TIFF")
    with pytest.raises(InvalidUpload, match="not a readable image") as info:
        check_upload(tiff, index=1, limits=LIMITS)
    assert http_status(info.value) == 415


@pytest.mark.parametrize("subsampling", [0, 2])
def test_a_truncated_jpeg_padded_with_an_end_marker_is_refused(subsampling):
    whole = encode(photo(512, 512), "JPEG", quality=90, subsampling=subsampling)
    padded = whole[: len(whole) // 2] + b"\xff\xd9"
    with pytest.raises(InvalidUpload, match="truncated") as info:
        check_upload(padded, index=1, limits=LIMITS)
    assert http_status(info.value) == 422
    assert check_upload(whole, index=1, limits=LIMITS).height_px == 512
