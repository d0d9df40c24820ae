"""The typed client (serve/client.py) against the real service: every answer parses into
the API's models, pages join up, a retried submission is the same job, and a 429 is waited
out as Retry-After says."""

from __future__ import annotations

import asyncio
import io
import time

import httpx
import pytest
import skimage.data
from PIL import Image

from pipeline.security import crypto
from serve.client import NO_RETRIES, ApiError, AsyncEphemeraClient, EphemeraClient, RetryPolicy
from serve.schemas import AgeSignalNoAction, DeletionStarted
from tests.integration.conftest import API_TOKEN
from tests.integration.helpers import encode_image

pytestmark = pytest.mark.integration

PHOTO = encode_image(skimage.data.astronaut(), "PNG")


def _styled(api_kwargs: dict | None = None) -> dict:
    return {"device_key": crypto.new_device_key(), "kind": "art_style", "style": "comic",
            **(api_kwargs or {})}


def test_the_async_client_submits_waits_pages_and_downloads(service):
    account = "acct-async"

    async def scenario():
        async with AsyncEphemeraClient(service.base_url, token=API_TOKEN) as api:
            accepted = await asyncio.gather(*[
                api.submit_job([("me.png", PHOTO)], account_id=account, **_styled())
                for _ in range(3)])
            done = await asyncio.gather(*[api.wait_job(account, a.job_id, timeout_s=180)
                                          for a in accepted])
            listed = [j async for j in api.iter_jobs(account, page_size=1)]
            outputs = [o async for o in api.iter_outputs(account, page_size=2)]
            first = await api.download_output(account, outputs[0].output_id)
            return accepted, done, listed, outputs, first

    accepted, done, listed, outputs, first = asyncio.run(scenario())
    assert all(a.status == "queued" and not a.replayed for a in accepted)
    assert [j.status for j in done] == ["succeeded"] * 3
    assert all(j.inputs_purged_s and j.num_inputs_purged_verified == 1 for j in done)
    ordered = sorted(done, key=lambda j: j.created_s)
    assert [j.job_id for j in listed] == [j.job_id for j in ordered]
    assert sorted(o.output_id for o in outputs) == sorted(o for j in done for o in j.output_ids)
    assert [o.created_s for o in outputs] == sorted(o.created_s for o in outputs)  # oldest first
    image = Image.open(io.BytesIO(first))
    image.load()
    assert image.size[0] > 0 and outputs[0].size_bytes == len(first)


def test_pages_refuse_a_bad_limit_or_cursor_with_the_error_model(client):
    api = EphemeraClient(http=client, retry=NO_RETRIES)
    for call in (lambda: api.list_outputs("acct-pages", limit=0),
                 lambda: api.list_jobs("acct-pages", limit=1001),
                 lambda: api.list_outputs("acct-pages", cursor="nope"),
                 lambda: api.list_jobs("acct-pages", cursor="nope")):
        with pytest.raises(ApiError) as refused:
            call()
        assert refused.value.status == 422 and refused.value.error == "InvalidUpload"
        assert "limit" in refused.value.detail or "cursor" in refused.value.detail
    empty = api.list_jobs("acct-never-used")
    assert empty.jobs == [] and empty.next_cursor is None


def test_a_submission_retried_with_its_key_is_the_same_job(client, store_root):
    api = EphemeraClient(http=client, retry=NO_RETRIES)
    account, fields = "acct-idem-client", _styled()
    first = api.submit_job([("me.png", PHOTO)], account_id=account,
                           idempotency_key="lost-answer-0001", **fields)
    again = api.submit_job([("me.png", PHOTO)], account_id=account,
                           idempotency_key="lost-answer-0001", **fields)
    assert again.job_id == first.job_id and again.replayed and not first.replayed
    assert api.wait_job(account, first.job_id, timeout_s=180).status == "succeeded"
    assert [j.job_id for j in api.iter_jobs(account)] == [first.job_id]
    with pytest.raises(ApiError) as conflict:  # same key, another body
        api.submit_job([("me.png", PHOTO)], account_id=account,
                       idempotency_key="lost-answer-0001", **{**fields, "style": "watercolor"})
    assert conflict.value.status == 409


def test_the_client_waits_out_a_429_as_retry_after_says(service, client):
    """Fill the account's in-flight limit, then submit once more with retries on: the
    client is refused with 429, waits at least Retry-After, and is accepted once a job
    ends; every answer it saw is recorded by an httpx hook."""
    from serve.tuning import retune

    account, limit = "acct-retry-after", service.settings.service.max_jobs_in_flight_per_account
    seen: list[tuple[int, str, float, str | None]] = []

    def record(response: httpx.Response) -> None:
        if response.request.method == "POST":
            seen.append((response.status_code, response.request.headers["Idempotency-Key"],
                         time.monotonic(), response.headers.get("Retry-After")))

    quick = EphemeraClient(http=client, retry=NO_RETRIES)
    retune("diffusion", {"max_wait_ms": 3000, "max_batch_cost": 64})  # jobs stay in flight
    try:
        filled = [quick.submit_job([("me.png", PHOTO)], account_id=account, **_styled())
                  for _ in range(limit)]
        with httpx.Client(base_url=service.base_url, timeout=120,
                          headers={"Authorization": f"Bearer {API_TOKEN}"},
                          event_hooks={"response": [record]}) as watched:
            patient = EphemeraClient(http=watched, retry=RetryPolicy(max_retries=8))
            extra = patient.submit_job([("me.png", PHOTO)], account_id=account, **_styled())
    finally:
        retune("diffusion", {"max_batch_cost": 8, "max_wait_ms": 400})
    statuses = [s for s, *_ in seen]
    assert statuses[0] == 429 and statuses[-1] == 202 and set(statuses) <= {429, 202}
    assert len({key for _, key, _, _ in seen}) == 1  # every retry reused the first key
    for (_, _, at, retry_after), (_, _, next_at, _) in zip(seen, seen[1:], strict=False):
        assert next_at - at >= int(retry_after) - 0.05
    for job in [*filled, extra]:
        assert quick.wait_job(account, job.job_id, timeout_s=180).status == "succeeded"


def test_privacy_answers_parse_into_their_models(client):
    api = EphemeraClient(http=client, retry=NO_RETRIES)
    account = "acct-models"
    job = api.submit_job([("me.png", PHOTO)], account_id=account, **_styled())
    api.wait_job(account, job.job_id, timeout_s=180)
    assert api.opt_out(account, True).opted_out_of_sale_and_sharing
    export = api.export(account)
    assert export.flags.opted_out_of_sale_and_sharing
    assert [j.job_id for j in export.jobs] == [job.job_id]
    assert isinstance(api.age_signal(account, False), AgeSignalNoAction)
    started = api.delete_account(account)
    assert isinstance(started, DeletionStarted) and started.status == "pending"
    receipt = api.wait_deletion(account, started.receipt_id)
    assert receipt.objects and all(o.result == "verified_gone" for o in receipt.objects)
    assert {o.object_class for o in receipt.objects} >= {"output"}
    assert api.list_outputs(account).outputs == []
    assert api.list_jobs(account).jobs == []
    assert all(o.verified_ms >= o.requested_ms for o in receipt.objects)
