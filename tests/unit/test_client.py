"""The typed client's retry policy and error mapping, against a scripted HTTP server on
loopback (a stand-in for the service: the real service cannot be made to answer 503 then
200 on cue; tests/integration/test_client.py drives the client against the real one)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from pipeline.security.crypto import new_device_key
from serve.client import ApiError, EphemeraClient, RetryPolicy
from serve.schemas import JobAccepted

FAST = RetryPolicy(max_retries=3, backoff_s=0.01, max_backoff_s=0.05)
ACCEPTED = (202, {}, {"job_id": "j1", "status": "queued", "replayed": False,
                      "status_url": "/v1/accounts/a/jobs/j1"})


class ScriptedServer:
    """Answers each request with the next scripted (status, headers, body); records what
    it was sent."""

    def __init__(self, answers: list[tuple[int, dict, dict]]) -> None:
        self.answers, self.seen = list(answers), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                self.rfile.read(length)
                outer.seen.append((self.command, self.path, dict(self.headers)))
                status, headers, body = outer.answers.pop(0)
                payload = json.dumps(body).encode()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_DELETE = _answer

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def scripted():
    servers: list[ScriptedServer] = []

    def start(*answers: tuple[int, dict, dict]) -> ScriptedServer:
        servers.append(ScriptedServer(list(answers)))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _submit(api: EphemeraClient, **kwargs) -> JobAccepted:
    return api.submit_job([("a.jpg", b"\xff\xd8 not really")], device_key=new_device_key(),
                          kind="ai_photo", style="portrait", account_id="a", **kwargs)


def test_a_503_with_retry_after_is_retried_with_the_same_idempotency_key(scripted):
    server = scripted((503, {"Retry-After": "0"}, {"error": "ServiceFull", "detail": "full"}),
                      (429, {"Retry-After": "0"}, {"error": "TooManyJobs", "detail": "busy"}),
                      (500, {}, {"error": "HTTPError", "detail": "replica died"}),
                      ACCEPTED)
    with EphemeraClient(server.url, token="t" * 20, retry=FAST) as api:
        accepted = _submit(api)
    assert accepted.job_id == "j1" and not accepted.replayed
    keys = {headers["Idempotency-Key"] for _, _, headers in server.seen}
    assert len(server.seen) == 4 and len(keys) == 1  # one key, reused by every retry
    assert all(headers["Authorization"] == "Bearer " + "t" * 20 for _, _, headers in server.seen)


def test_each_submission_gets_its_own_idempotency_key_unless_given(scripted):
    server = scripted(ACCEPTED, ACCEPTED, ACCEPTED)
    with EphemeraClient(server.url, retry=FAST) as api:
        _submit(api), _submit(api), _submit(api, idempotency_key="mine-0001")
    sent = [headers["Idempotency-Key"] for _, _, headers in server.seen]
    assert len(set(sent[:2])) == 2 and sent[2] == "mine-0001"


def test_a_refusal_is_not_retried_and_raises_the_services_error(scripted):
    server = scripted((422, {}, {"error": "InvalidUpload", "detail": "not an image"}),
                      (409, {}, {"error": "InvalidUpload", "detail": "different request"}))
    with EphemeraClient(server.url, retry=FAST) as api:
        with pytest.raises(ApiError) as refused:
            _submit(api)
        assert (refused.value.status, refused.value.error) == (422, "InvalidUpload")
        assert refused.value.detail == "not an image"
        with pytest.raises(ApiError) as conflict:
            _submit(api)
        assert conflict.value.status == 409
    assert len(server.seen) == 2  # neither was sent twice


def test_a_409_asking_for_a_retry_is_retried(scripted):
    server = scripted((409, {"Retry-After": "0"}, {"error": "InvalidUpload", "detail": "busy"}),
                      ACCEPTED)
    with EphemeraClient(server.url, retry=FAST) as api:
        assert _submit(api).job_id == "j1"
    assert len(server.seen) == 2


def test_retries_run_out_with_the_last_answer(scripted):
    busy = (503, {"Retry-After": "0"}, {"error": "Unavailable", "detail": "down"})
    server = scripted(*[busy] * 4)
    with EphemeraClient(server.url, retry=FAST) as api:
        with pytest.raises(ApiError) as down:
            api.get_job("a", "j1")
    assert down.value.status == 503 and down.value.retry_after_s == 0
    assert len(server.seen) == FAST.max_retries + 1


def test_a_connection_refused_is_retried_then_raised():
    from pipeline.state.redis_server import free_port

    waits: list[int] = []

    class Counted(RetryPolicy):
        def delay_s(self, attempt: int, response: httpx.Response | None) -> float:
            waits.append(attempt)
            return 0.01

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with EphemeraClient(url, retry=Counted(max_retries=2)) as api, \
            pytest.raises(httpx.ConnectError):
        api.health()
    assert waits == [0, 1]


def test_backoff_doubles_is_capped_and_defers_to_retry_after():
    policy = RetryPolicy(backoff_s=0.5, max_backoff_s=4.0, jitter=0.0)
    assert [policy.delay_s(n, None) for n in range(5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    hinted = httpx.Response(503, headers={"Retry-After": "3"})
    assert policy.delay_s(0, hinted) == 3.0
    assert policy.delay_s(0, httpx.Response(503, headers={"Retry-After": "60"})) == 4.0
    jittered = RetryPolicy(backoff_s=1.0, jitter=0.5)
    assert all(0.5 <= jittered.delay_s(0, None) <= 1.0 for _ in range(50))


def _page(ids: list[str], next_cursor: str | None) -> tuple[int, dict, dict]:
    return (200, {}, {"account_id": "a", "next_cursor": next_cursor, "outputs": [
        {"output_id": i, "job_id": "j", "media_type": "image/png", "created_s": 1.0,
         "size_bytes": 3, "url": f"/v1/accounts/a/outputs/{i}"} for i in ids]})


def test_iterating_follows_every_cursor_sync_and_async(scripted):
    import asyncio

    from serve.client import AsyncEphemeraClient

    pages = [_page(["o1", "o2"], "o2"), _page(["o3"], None)]
    server = scripted(*pages, *pages)
    with EphemeraClient(server.url, retry=FAST) as api:
        assert [o.output_id for o in api.iter_outputs("a", page_size=2)] == ["o1", "o2", "o3"]

    async def collect() -> list[str]:
        async with AsyncEphemeraClient(server.url, retry=FAST) as api:
            return [o.output_id async for o in api.iter_outputs("a", page_size=2)]

    assert asyncio.run(collect()) == ["o1", "o2", "o3"]
    paths = [path for _, path, _ in server.seen]
    assert paths == ["/v1/accounts/a/outputs?limit=2", "/v1/accounts/a/outputs?limit=2&cursor=o2"] * 2


def test_a_policy_may_leave_refusals_unretried_and_retry_a_cut_request(scripted):
    """load.py's policy: a 500 (Serve's proxy answering for a request cut by an ingress's
    death) is retried with the same Idempotency-Key and reported to ``on_retry``; a 503
    refusal is the final answer, not retried."""
    told: list[tuple[str, int]] = []
    cut_only = RetryPolicy(max_retries=3, backoff_s=0.01, retry_status=frozenset({500, 502, 504}))
    server = scripted((500, {}, {"error": "HTTPError", "detail": "replica died"}),
                      (502, {}, {"error": "HTTPError", "detail": "bad gateway"}), ACCEPTED,
                      (503, {"Retry-After": "5"}, {"error": "ServiceFull", "detail": "full"}))
    with EphemeraClient(server.url, retry=cut_only,
                        on_retry=lambda call, why: told.append((call.path, why.status_code))
                        ) as api:
        assert _submit(api).job_id == "j1"
        with pytest.raises(ApiError) as refused:
            _submit(api)
    assert refused.value.status == 503 and refused.value.retry_after_s == 5
    assert told == [("/v1/jobs", 500), ("/v1/jobs", 502)]  # the 503 was not retried
    keys = [headers["Idempotency-Key"] for _, _, headers in server.seen]
    assert len(keys) == 4 and len(set(keys[:3])) == 1 and keys[3] != keys[0]


def test_on_retry_is_told_of_connection_errors_sync_and_async():
    import asyncio

    from pipeline.state.redis_server import free_port
    from serve.client import AsyncEphemeraClient

    told: list[object] = []
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with EphemeraClient(url, retry=FAST, on_retry=lambda _, why: told.append(why)) as api, \
            pytest.raises(httpx.ConnectError):
        api.health()

    async def health() -> None:
        async with AsyncEphemeraClient(url, retry=FAST,
                                       on_retry=lambda _, why: told.append(why)) as api:
            await api.health()

    with pytest.raises(httpx.ConnectError):
        asyncio.run(health())
    assert len(told) == 2 * FAST.max_retries
    assert all(isinstance(why, httpx.ConnectError) for why in told)
