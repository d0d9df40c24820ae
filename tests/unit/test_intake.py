"""intake: every check before any write; records before objects; only ciphertext stored;
a failed write leaves nothing behind."""

from __future__ import annotations

import pytest

from pipeline.core.errors import InvalidUpload, StorageError
from pipeline.jobs.intake import accept_job, check_account_id, check_job_request
from pipeline.media.ingest import decode_clean_png
from pipeline.security import crypto
from pipeline.storage.base import LocalObjectStore, StoreSet, key_from_uri
from serve.errors import http_status
from tests.unit.factories import MemoryJobStore, encode, make_settings, make_video, photo

SETTINGS = make_settings()


def request_for(num_files: int = 1, **overrides: object):
    fields: dict[str, object] = {
        "account_id": "acct-1", "kind": "art_style", "style": "portrait",
        "resolution_px": None,
        "files": [encode(photo(64 + n, 64), "PNG") for n in range(num_files)],
    }
    fields.update(overrides)
    return check_job_request(settings=SETTINGS, **fields)  # type: ignore[arg-type]


class FailingPuts(LocalObjectStore):
    """A local store whose put fails after ``num_ok`` successful writes."""

    def __init__(self, url: str, num_ok: int) -> None:
        super().__init__(url)
        self.num_ok = num_ok

    def put(self, key: str, data: bytes, *, customer_key: bytes | None = None) -> None:
        if self.num_ok == 0:
            raise StorageError("store unavailable")
        self.num_ok -= 1
        super().put(key, data)


@pytest.mark.parametrize("account_id", ["a", "user_1-X", "x" * 64])
def test_good_account_ids_pass(account_id):
    assert check_account_id(account_id) == account_id


@pytest.mark.parametrize("account_id", [None, "", "x" * 65, "a/b", "../x", "a b", "é"])
def test_bad_account_ids_are_refused(account_id):
    with pytest.raises(InvalidUpload) as info:
        check_account_id(account_id)
    assert http_status(info.value) == 422


def test_account_id_with_trailing_newline_is_refused():
    with pytest.raises(InvalidUpload):
        check_account_id("acct-1\n")


def test_valid_request_gets_the_default_resolution_and_clean_images():
    request = request_for(num_files=2)

    assert request.resolution_px == SETTINGS.service.default_resolution_px
    assert [im.height_px for im in request.images] == [64, 65]


@pytest.mark.parametrize(("overrides", "status", "field"), [
    ({"kind": "sculpt"}, 422, "kind"),
    ({"style": "baroque"}, 422, "style"),
    ({"resolution_px": 512}, 422, "resolution_px"),
    ({"files": []}, 400, "no files"),
    ({"files": [encode(photo(64, 64), "PNG")] * 5}, 413, "at most 4"),
    ({"files": [encode(photo(64, 64), "PNG"), b""]}, 400, "file 2"),
])
def test_bad_request_is_refused_naming_the_problem(overrides, status, field):
    with pytest.raises(InvalidUpload) as info:
        request_for(**overrides)
    assert http_status(info.value) == status
    assert field in str(info.value)


def test_accepted_job_stores_only_ciphertext_after_registering(tmp_path):
    store = LocalObjectStore(f"file://{tmp_path / 'store'}")
    jobs = MemoryJobStore(store)
    request = request_for(num_files=2)
    key = crypto.new_device_key()

    job, item = accept_job(request, key, StoreSet.single(store), jobs, SETTINGS)

    assert jobs.store_keys_at_create == []  # records first, objects after
    assert set(jobs.records) == set(job.input_uris) == set(item.input_uris)
    assert job.status == "queued" and item.job_id == job.job_id
    assert item.device_key == key
    for uri, image in zip(job.input_uris, request.images, strict=True):
        blob = store.get(key_from_uri(store, uri))
        assert b"\x89PNG" not in blob and b"IHDR" not in blob
        assert crypto.decrypt(blob, key, uri=uri) == image.png_bytes
    assert decode_clean_png(request.images[0].png_bytes).shape == (64, 64, 3)


def test_accepted_job_keys_carry_no_account_id(tmp_path):
    store = LocalObjectStore(f"file://{tmp_path / 'store'}")
    request = request_for(account_id="alice-smith")

    job, _ = accept_job(request, crypto.new_device_key(), StoreSet.single(store),
                        MemoryJobStore(store), SETTINGS)

    assert all("alice" not in uri for uri in job.input_uris)
    assert all(k.startswith(f"inputs/{job.job_id}/") for k in store.list_keys(""))


def test_failed_write_deletes_what_was_written_and_discards_the_job(tmp_path):
    store = FailingPuts(f"file://{tmp_path / 'store'}", num_ok=1)
    jobs = MemoryJobStore(store)

    with pytest.raises(StorageError):
        accept_job(request_for(num_files=3), crypto.new_device_key(), StoreSet.single(store),
                   jobs, SETTINGS)

    assert store.list_keys("") == []
    assert len(jobs.discarded) == 1
    assert jobs.jobs == {} and jobs.records == {}


@pytest.mark.parametrize(("overrides", "words"), [
    ({"files": [make_video(tagged=False), encode(photo(), "PNG")]}, "photos or one video"),
    ({"files": [make_video(tagged=False)], "kind": "ai_photo"}, "send a video with kind art_style"),
    ({"files": [encode(photo(), "PNG")] * 2, "kind": "animate"}, "exactly one photo"),
])
def test_media_that_do_not_fit_the_kind_are_refused(overrides, words):
    with pytest.raises(InvalidUpload, match=words) as info:
        request_for(**overrides)
    assert http_status(info.value) == 422


def test_an_accepted_video_is_one_encrypted_clip_costed_per_chunk(tmp_path):
    store = LocalObjectStore(f"file://{tmp_path / 'store'}")
    jobs = MemoryJobStore(store)
    request = request_for(files=[make_video(frames=12)])
    key = crypto.new_device_key()

    job, item = accept_job(request, key, StoreSet.single(store), jobs, SETTINGS)

    assert request.video is not None and request.images == []
    assert job.frames_total == item.num_frames == 12 and item.fps == 24.0
    assert item.video_input and item.batch_key[0] == "art_style-video"
    chunk = SETTINGS.batching.video_chunk_frames
    assert item.cost_units == min(chunk, 12)  # one chunk at the reference resolution
    [uri] = job.input_uris
    assert crypto.decrypt(store.get(key_from_uri(store, uri)), key, uri=uri) == (
        request.video.mp4_bytes)


def test_animate_takes_frames_and_fps_from_its_style(tmp_path):
    store = LocalObjectStore(f"file://{tmp_path / 'store'}")
    request = request_for(kind="animate", style="living")
    _, item = accept_job(request, crypto.new_device_key(), StoreSet.single(store),
                         MemoryJobStore(store), SETTINGS)
    style = SETTINGS.styles.styles["living"]
    assert (item.num_frames, item.fps, item.video_input) == (style.num_frames, style.fps, False)


def test_a_request_over_its_decoded_pixel_budget_is_refused_before_decoding():
    from pipeline.core.config import Settings

    tight = Settings(service=SETTINGS.service.model_copy(update={"max_request_pixels": 10_000}),
                     styles=SETTINGS.styles)
    files = [encode(photo(64, 64), "PNG"), encode(photo(64, 64), "PNG"),
             encode(photo(64, 64), "PNG")]  # 3 x 4,096 pixels
    with pytest.raises(InvalidUpload, match="per-request limit of 10000") as info:
        check_job_request(settings=tight, account_id="acct-1", kind="art_style",
                          style="portrait", resolution_px=None, files=files)
    assert http_status(info.value) == 413
