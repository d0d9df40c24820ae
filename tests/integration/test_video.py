"""Clips over HTTP on the real service: a styled phone video (location, creation time,
make/model tags and an audio track) and an animated photo; bad videos refused with nothing
kept. Videos are made in the test with PyAV."""

from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np
import pytest
import skimage.data
from PIL import Image

from pipeline.security import crypto
from pipeline.state import keys
from tests.integration.helpers import (
    encode_image,
    files_under,
    find_needles,
    redis_values,
    submit,
    wait_finished,
)
from tests.unit.factories import LOCATION_TAG, MODEL_TAG, make_video

pytestmark = [pytest.mark.integration, pytest.mark.video]


def _outputs(client, view) -> dict[str, bytes]:
    """Each output's media type -> bytes, fetched as the user would."""
    found = {}
    for url in view["output_urls"]:
        response = client.get(url)
        assert response.status_code == 200
        found[response.headers["content-type"]] = response.content
    return found


def _decode_clip(data: bytes) -> tuple[list[np.ndarray], list[str], float]:
    with av.open(io.BytesIO(data)) as clip:
        kinds = [s.type for s in clip.streams]
        rate = float(clip.streams.video[0].average_rate)
        frames = [f.to_ndarray(format="rgb24") for f in clip.decode(video=0)]
    return frames, kinds, rate


def _ray_logs() -> Path:
    """This test session's Ray logs: every actor's and replica's stdout, stderr and logs."""
    import ray

    return Path(ray._private.worker._global_node.get_logs_dir_path())


def _nothing_left(store_root, redis_client, job_id: str) -> None:
    for prefix in ("inputs", "face", "work"):
        assert [p for p in (store_root / prefix / job_id).rglob("*") if p.is_file()] == []
    assert redis_client.scard(keys.retention_job(job_id)) == 0


def test_a_phone_video_gets_an_art_style_without_its_tags_or_audio(
        client, store_root, redis_client, redis_server):
    upload = make_video(frames=12, width=96, height=64, fps=24)  # two chunks of 8 + 4
    response = submit(client, [upload], key=crypto.new_device_key(), kind="art_style",
                      style="watercolor", account_id="acct-video", names=["clip.mov"])
    assert response.status_code == 202, response.text
    view = wait_finished(client, response.json()["job_id"])
    assert view["status"] == "succeeded", view
    assert view["progress"] == {"frames_done": 12, "frames_total": 12}

    outputs = _outputs(client, view)
    assert set(outputs) == {"video/mp4", "image/png"}
    frames, kinds, rate = _decode_clip(outputs["video/mp4"])
    assert kinds == ["video"] and len(frames) == 12 and rate == 24.0
    assert frames[0].shape == (40, 64, 3)  # landscape kept: 64 px on the long side
    poster = Image.open(io.BytesIO(outputs["image/png"]))
    assert poster.size == (64, 40)

    needles = {"location": LOCATION_TAG.encode(), "model": MODEL_TAG.encode(),
               "lat": b"48.8584"}
    stored = files_under(store_root, redis_server.data_dir) + redis_values(redis_client)
    assert find_needles(stored, needles) == []
    assert find_needles(files_under(_ray_logs()), needles) == []  # every replica's logs
    for data in outputs.values():
        assert not any(n in data for n in needles.values())
    _nothing_left(store_root, redis_client, view["job_id"])


def test_animate_turns_one_photo_into_a_clip_of_the_styles_frames(client, store_root,
                                                                  redis_client, service):
    style = service.settings.styles.styles["living"]
    response = submit(client, [encode_image(skimage.data.astronaut(), "PNG")],
                      key=crypto.new_device_key(), kind="animate", style="living",
                      account_id="acct-animate")
    assert response.status_code == 202, response.text
    view = wait_finished(client, response.json()["job_id"])
    assert view["status"] == "succeeded", view
    outputs = _outputs(client, view)
    frames, kinds, rate = _decode_clip(outputs["video/mp4"])
    assert len(frames) == style.num_frames and rate == style.fps and kinds == ["video"]
    assert frames[0].shape == (64, 64, 3)
    _nothing_left(store_root, redis_client, view["job_id"])


def _stored(store_root) -> set:
    """Every stored input object: all a refused request could have left. (Outputs, usage
    and temp files of earlier tests' jobs change in the background of the shared service.)"""
    return {p for p in (store_root / "inputs").rglob("*") if p.is_file()}


def _corrupt() -> bytes:
    return make_video(tagged=False, audio=False)[:300]


@pytest.mark.parametrize(("files", "names", "kind", "status", "words"), [
    ([make_video(tagged=False)], ["holiday.jpg"], "art_style", 415, "holds a video"),
    ([b"\x89PNG\r\n\x1a\n" + b"\x00" * 32], ["clip.mp4"], "art_style", 415, "not a video"),
    ([_corrupt()], ["clip.mp4"], "art_style", 400, "corrupt or truncated"),
    ([make_video(tagged=False)], ["clip.mp4"], "ai_photo", 422, "kind art_style"),
    ([make_video(tagged=False, frames=4)] * 2, ["a.mp4", "b.mp4"], "art_style", 422,
     "one video"),
])
def test_bad_videos_are_refused_and_nothing_is_kept(client, store_root, redis_client, files,
                                                    names, kind, status, words):
    before_files = _stored(store_root)
    before_jobs = redis_client.scard(keys.ACTIVE_JOBS)
    response = submit(client, files, key=crypto.new_device_key(), kind=kind, style="watercolor",
                      account_id="acct-bad-video", names=names)
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]
    assert not _stored(store_root) - before_files  # no input object left behind
    assert redis_client.scard(keys.ACTIVE_JOBS) <= before_jobs
    assert not redis_client.exists(keys.account_jobs("acct-bad-video"))
    assert client.get("/v1/accounts/acct-bad-video/outputs").json()["outputs"] == []
