"""Hostile media against the media pool's real code path: cheap checks, then every file
decoded in a sandboxed child process under the default budgets (no Ray: the pool's work is
``check_job_request`` with its ``SandboxPool``; the service path is tested over HTTP in
tests/integration/test_media_pool.py).

Each case of issue #19 is refused with a 4xx naming its limit or accepted within budget
(CPU and peak memory as the child measured them); phone media come out upright and clean.
"""

from __future__ import annotations

import io

import av
import pytest
from PIL import Image

from pipeline.core.config import load_settings
from pipeline.core.errors import InvalidUpload
from pipeline.media.sandbox import DecodeBudget, SandboxedDecoder, SandboxPool
from serve.errors import http_status
from tests.security.corpus import (
    HOSTILE,
    LEGIT,
    Case,
    build,
    phone_jpeg_12mp,
    run_request,
)

pytestmark = pytest.mark.security
SETTINGS = load_settings()
LIMITS = SETTINGS.service
BUDGET = DecodeBudget(memory_bytes=LIMITS.decode_memory_bytes, cpu_s=LIMITS.decode_cpu_s,
                      wall_s=LIMITS.decode_wall_s)
SPECS = HOSTILE + LEGIT


@pytest.fixture(scope="module")
def pool():
    sandbox = SandboxPool(LIMITS, BUDGET, size=1)
    sandbox.start()
    yield sandbox
    sandbox.close()


def run_case(case: Case, pool: SandboxPool):
    return run_request(case, pool.decode, SETTINGS)


@pytest.mark.parametrize("name", [s.name for s in SPECS])
def test_each_case_is_refused_with_a_reason_or_accepted_within_budget(name, pool):
    case = build(name)
    restarts = pool.restarts
    verdict, reports = run_case(case, pool)
    if case.expect == "refused":
        assert isinstance(verdict, InvalidUpload), f"{case.name} was accepted: {case.why}"
        assert 400 <= http_status(verdict) < 500 and str(verdict)
    else:
        assert not isinstance(verdict, InvalidUpload), f"{case.name}: {verdict}"
    for report in reports:
        assert report.cpu_s <= LIMITS.decode_cpu_s
        assert report.peak_extra_bytes <= LIMITS.decode_memory_bytes
    assert pool.restarts == restarts  # the defaults hold every case without a kill


def test_refused_requests_are_refused_before_any_decode_where_their_shape_tells(pool):
    for name in ("four-videos-in-one-request", "video-with-kind-ai-photo",
                 "too-many-tiny-files"):
        verdict, reports = run_case(build(name), pool)
        assert isinstance(verdict, InvalidUpload) and reports == [], name
    verdict, reports = run_case(build("progressive-jpeg-10000-scans"), pool)
    assert "max_jpeg_scans" in str(verdict)
    assert all(r.cpu_s < 0.5 for r in reports)  # counted, not decoded


def test_phone_media_come_out_upright_and_clean(pool):
    jpeg, _ = run_case(build("phone-jpeg-12mp-exif-rotated"), pool)
    heic, _ = run_case(build("phone-heic-exif-rotated"), pool)
    clip, _ = run_case(build("phone-hevc-10s-1080p-portrait"), pool)
    for request, (width, height) in ((jpeg, (3000, 4000)), (heic, (1512, 2016))):
        [image] = request.images
        assert (image.width_px, image.height_px) == (width, height)  # portrait, as shot
        with Image.open(io.BytesIO(image.png_bytes)) as clean:
            assert clean.format == "PNG" and not clean.getexif() and not clean.info
    video = clip.video
    assert video.height_px > video.width_px  # the 90-degree display rotation applied
    assert video.num_frames == 300
    with av.open(io.BytesIO(video.mp4_bytes)) as container:
        stream = container.streams.video[0]
        assert next(container.decode(stream)).rotation == 0
        assert not {k for k in container.metadata if k not in ("major_brand", "minor_version",
                                                               "compatible_brands")}


def test_a_decoder_child_that_breaks_its_budget_dies_alone_and_is_replaced():
    """Tight budgets (a test's, not the defaults): the memory cap refuses a 12 MP photo,
    the wall budget kills the child mid-decode; each is a 413 naming the budget, and the
    next file decodes in a fresh child."""
    photo = phone_jpeg_12mp()
    small = io.BytesIO()
    Image.new("RGB", (64, 64)).save(small, format="PNG")
    for budget, words in ((DecodeBudget(64 << 20, 10, 30), "memory budget of 64 MiB"),
                          (DecodeBudget(512 << 20, 10, 0.2), "time budget of 0.2 s"),
                          (DecodeBudget(512 << 20, 0.3, 30), "CPU budget of 0.3 s")):
        decoder = SandboxedDecoder(LIMITS, budget)
        try:
            report = decoder.decode(photo, index=1, declared="image")
            assert report.media is None and words in str(report.error)
            assert http_status(report.error) == 413
            after = decoder.decode(small.getvalue(), index=2, declared="image")
            assert after.error is None and after.media.width_px == 64
        finally:
            decoder.close()


def test_the_child_writes_no_file_and_answers_in_checked_frames(tmp_path):
    """The sandbox's own limits: RLIMIT_FSIZE 0 (no file can be written by a decode) is in
    force in the child, read from /proc; a child answering garbage is refused, not
    trusted."""
    decoder = SandboxedDecoder(LIMITS, BUDGET)
    try:
        decoder.start()
        limits = open(f"/proc/{decoder._child.pid}/limits").read()
        line = next(row for row in limits.splitlines() if row.startswith("Max file size"))
        assert line.split()[3:5] == ["0", "0"], line
        as_line = next(row for row in limits.splitlines() if row.startswith("Max address"))
        assert as_line.split()[3] != "unlimited", as_line
    finally:
        decoder.close()
    from pipeline.media.sandbox import _report

    with pytest.raises(ValueError):
        _report({"ok": False, "problem": "teapot", "message": "x"}, b"", "file 1")
    with pytest.raises(ValueError):
        _report({"ok": True, "kind": "script"}, b"", "file 1")
