"""A typed Python client of the Ephemera API, sync (``EphemeraClient``) and async
(``AsyncEphemeraClient``), on httpx.

- Every answer is parsed into the API's own models (serve/schemas.py); every error raises
  ``ApiError`` with the service's ``{error, detail}``.
- Retries with exponential backoff and jitter on 429, 500, 502, 503, 504, a 409 that carries
  Retry-After (the first request with the same Idempotency-Key is still being handled) and
  on connection errors and timeouts; a ``Retry-After`` header sets the wait. A policy may
  retry fewer statuses (``retry_status``: load.py counts 429/503 refusals as they come), and
  ``on_retry`` is told of every retried answer or error (load.py counts them apart from the
  final answers).
- ``submit_job`` sends an ``Idempotency-Key`` by default (a fresh one per call, the same one
  on each retry of it), so a retry after a lost answer gets the first job back
  (``replayed: true``) instead of a second job and a second copy of the photos.

    with EphemeraClient("http://127.0.0.1:8000", token=token) as api:
        accepted = api.submit_job([("me.jpg", photo)], device_key=key, kind="ai_photo",
                                  style="portrait", account_id="acct-1")
        job = api.wait_job("acct-1", accepted.job_id)
        images = [api.download_output("acct-1", o) for o in job.output_ids]

The client holds no media after a call returns and never logs a body or a key.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

import httpx
from pydantic import TypeAdapter

from pipeline.core import retry as core_retry
from serve.schemas import (
    AgeSignalNoAction,
    DeletionReceipt,
    DeletionStarted,
    Health,
    JobAccepted,
    JobsPage,
    JobView,
    OptOutResult,
    OutputItem,
    OutputsPage,
    PrivacyExport,
    SignedUrl,
)

T = TypeVar("T")
Upload = bytes | tuple[str, bytes]  # bytes, or (file name, bytes)

# 500 too: Serve's proxy answers 500 for a request cut by an ingress replica's death
# (load.py sees it); every call of this client is safe to repeat (GET, DELETE, or a POST
# with an Idempotency-Key or an idempotent body).
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class ApiError(Exception):
    """A 4xx or 5xx answer (after any retries): the service's ``{error, detail}``."""

    def __init__(self, status: int, error: str, detail: str,
                 retry_after_s: float | None = None) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status, self.error, self.detail = status, error, detail
        self.retry_after_s = retry_after_s

    @classmethod
    def from_response(cls, response: httpx.Response) -> ApiError:
        try:
            body = response.json()
            error, detail = str(body["error"]), str(body["detail"])
        except (ValueError, KeyError, TypeError):
            error, detail = "HTTPError", response.reason_phrase or "no detail"
        return cls(response.status_code, error, detail, retry_after(response))


class JobFailed(Exception):
    """``wait_job`` saw the job end in failure; ``job.reason`` says why."""

    def __init__(self, job: JobView) -> None:
        super().__init__(f"job {job.job_id} failed: {job.reason}")
        self.job = job


def retry_after(response: httpx.Response) -> float | None:
    """The Retry-After header in seconds (the delta form; the service never sends a date)."""
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to wait before trying a request again."""

    max_retries: int = 5
    backoff_s: float = 0.5  # the first wait without Retry-After; doubles each time
    max_backoff_s: float = 30.0  # no wait is longer, Retry-After included
    jitter: float = 0.5  # each computed wait is scaled by a random factor in [1 - jitter, 1]
    retry_status: frozenset[int] = RETRY_STATUS  # answers retried (a 409 with Retry-After too)

    def should_retry(self, response: httpx.Response) -> bool:
        return response.status_code in self.retry_status or (
            response.status_code == 409 and retry_after(response) is not None)

    def delay_s(self, attempt: int, response: httpx.Response | None) -> float:
        """The wait before retry number ``attempt`` (0-based)."""
        hinted = retry_after(response) if response is not None else None
        if hinted is not None:
            return min(hinted, self.max_backoff_s)
        computed = core_retry.backoff_ceiling_s(attempt, base_s=self.backoff_s,
                                                cap_s=self.max_backoff_s)
        return computed * (1.0 - self.jitter * random.random())


NO_RETRIES = RetryPolicy(max_retries=0)

# Told of each retry: the call, and the answer (httpx.Response) or error that is retried.
OnRetry = Callable[["Call[Any]", "httpx.Response | Exception"], None]


class _RetryAnswer(Exception):
    """An answer the policy retries, raised inside ``retry_call`` and unwrapped to the
    answer itself once the tries run out."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(response.status_code)
        self.response = response


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, (_RetryAnswer, httpx.TransportError))


class _Pacing:
    """One request's tries under a client ``RetryPolicy``: ``retry_call`` runs them, and
    every pause is the policy's ``delay_s`` (Retry-After included)."""

    def __init__(self, retry: RetryPolicy, call: Call[Any], on_retry: OnRetry | None) -> None:
        self.retry, self.call, self.notify = retry, call, on_retry
        self.policy = core_retry.RetryPolicy(max_tries=retry.max_retries + 1,
                                             base_s=retry.backoff_s, cap_s=retry.max_backoff_s)
        self.attempt = 0

    def answer(self, response: httpx.Response) -> httpx.Response:
        if self.retry.should_retry(response):
            raise _RetryAnswer(response)
        return response

    def on_retry(self, attempt: int, exc: BaseException) -> None:
        self.attempt = attempt
        if self.notify is not None and isinstance(exc, Exception):
            self.notify(self.call, exc.response if isinstance(exc, _RetryAnswer) else exc)

    def delay_s(self, exc: BaseException) -> float:
        return self.retry.delay_s(self.attempt,
                                  exc.response if isinstance(exc, _RetryAnswer) else None)


@dataclass(frozen=True)
class Call(Generic[T]):
    """One API request and the type its 2xx answer parses into (None: raw bytes)."""

    method: str
    path: str
    model: type[T] | None
    params: dict[str, Any] = field(default_factory=dict)
    json: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    data: dict[str, str] | None = None
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None

    def parse(self, response: httpx.Response) -> T:
        if response.status_code >= 400:
            raise ApiError.from_response(response)
        if self.model is None:
            return response.content  # type: ignore[return-value]
        return _adapter(cast(Any, self.model)).validate_python(response.json())

    def httpx_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"headers": self.headers}
        for name in ("params", "json", "data", "files"):
            value = getattr(self, name)
            if value:
                kwargs[name] = value
        return kwargs


@functools.cache
def _adapter(answer_type: Any) -> TypeAdapter:
    """One validator per answer type, built on first use (not on every call)."""
    return TypeAdapter(answer_type)


def new_idempotency_key() -> str:
    return uuid.uuid4().hex


def job_call(files: Sequence[Upload], *, device_key: bytes, kind: str, style: str,
             account_id: str, resolution_px: int | None = None, country: str | None = None,
             idempotency_key: str | None = None) -> Call[JobAccepted]:
    """POST /v1/jobs: the multipart body, the device key header and the Idempotency-Key."""
    parts = []
    for i, upload in enumerate(files):
        name, data = upload if isinstance(upload, tuple) else (f"upload{i}", upload)
        parts.append(("files", (name, data, "application/octet-stream")))
    form = {"kind": kind, "style": style, "account_id": account_id}
    if resolution_px is not None:
        form["resolution_px"] = str(resolution_px)
    if country is not None:
        form["country"] = country
    headers = {"X-Device-Key": base64.b64encode(device_key).decode(),
               "Idempotency-Key": idempotency_key or new_idempotency_key()}
    return Call("POST", "/v1/jobs", JobAccepted, headers=headers, data=form, files=parts)


def _account(account_id: str) -> str:
    return f"/v1/accounts/{account_id}"


def _page_params(limit: int, cursor: str | None) -> dict[str, Any]:
    return {"limit": limit, **({"cursor": cursor} if cursor else {})}


def job_status_call(account_id: str, job_id: str) -> Call[JobView]:
    return Call("GET", f"{_account(account_id)}/jobs/{job_id}", JobView)


def jobs_call(account_id: str, limit: int, cursor: str | None) -> Call[JobsPage]:
    return Call("GET", f"{_account(account_id)}/jobs", JobsPage,
                params=_page_params(limit, cursor))


def outputs_call(account_id: str, limit: int, cursor: str | None) -> Call[OutputsPage]:
    return Call("GET", f"{_account(account_id)}/outputs", OutputsPage,
                params=_page_params(limit, cursor))


def download_call(account_id: str, output_id: str) -> Call[bytes]:
    return Call("GET", f"{_account(account_id)}/outputs/{output_id}", None)


def url_call(account_id: str, output_id: str) -> Call[SignedUrl]:
    return Call("GET", f"{_account(account_id)}/outputs/{output_id}/url", SignedUrl)


def delete_output_call(account_id: str, output_id: str) -> Call[DeletionStarted]:
    return Call("DELETE", f"{_account(account_id)}/outputs/{output_id}", DeletionStarted)


def delete_account_call(account_id: str) -> Call[DeletionStarted]:
    return Call("DELETE", _account(account_id), DeletionStarted)


def deletion_call(account_id: str, receipt_id: str) -> Call[DeletionReceipt]:
    return Call("GET", f"{_account(account_id)}/deletions/{receipt_id}", DeletionReceipt)


def export_call(account_id: str) -> Call[PrivacyExport]:
    return Call("GET", f"{_account(account_id)}/privacy/export", PrivacyExport)


def opt_out_call(account_id: str, opt_out: bool) -> Call[OptOutResult]:
    return Call("POST", f"{_account(account_id)}/privacy/opt-out", OptOutResult,
                json={"opt_out": opt_out})


def age_signal_call(account_id: str, under_13: bool) -> Call[DeletionStarted | AgeSignalNoAction]:
    return Call("POST", f"{_account(account_id)}/age-signal",
                DeletionStarted | AgeSignalNoAction,  # type: ignore[arg-type]
                json={"under_13": under_13})


def health_call() -> Call[Health]:
    return Call("GET", "/healthz", Health)


def _finished(job: JobView, until_purged: bool) -> bool:
    return job.status.is_finished and (not until_purged or job.inputs_purged_s is not None)


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


class EphemeraClient:
    """The synchronous client. Pass ``http`` to reuse an httpx.Client (its base URL and
    headers are used as they are)."""

    def __init__(self, base_url: str = "", *, token: str | None = None,
                 retry: RetryPolicy = RetryPolicy(), timeout_s: float = 60.0,
                 http: httpx.Client | None = None, on_retry: OnRetry | None = None) -> None:
        self.retry, self.on_retry = retry, on_retry
        self._owned = http is None
        self.http = http or httpx.Client(base_url=base_url, headers=_headers(token),
                                         timeout=timeout_s)

    def __enter__(self) -> EphemeraClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._owned:
            self.http.close()

    def send(self, call: Call[Any]) -> httpx.Response:
        """The last answer to ``call`` after the retry policy ran out (not raised on)."""
        pacing = _Pacing(self.retry, call, self.on_retry)
        try:
            return core_retry.retry_call(
                lambda: pacing.answer(self.http.request(call.method, call.path,
                                                        **call.httpx_kwargs())),
                policy=pacing.policy, retryable=_transient, hint_s=pacing.delay_s,
                on_retry=pacing.on_retry)
        except _RetryAnswer as last:
            return last.response

    def run(self, call: Call[T]) -> T:
        return call.parse(self.send(call))

    def submit_job(self, files: Sequence[Upload], *, device_key: bytes, kind: str, style: str,
                   account_id: str, resolution_px: int | None = None,
                   country: str | None = None, idempotency_key: str | None = None
                   ) -> JobAccepted:
        return self.run(job_call(files, device_key=device_key, kind=kind, style=style,
                                 account_id=account_id, resolution_px=resolution_px,
                                 country=country, idempotency_key=idempotency_key))

    def get_job(self, account_id: str, job_id: str) -> JobView:
        return self.run(job_status_call(account_id, job_id))

    def wait_job(self, account_id: str, job_id: str, *, timeout_s: float = 600.0,
                 poll_s: float = 0.2, until_purged: bool = True, raise_on_failure: bool = False
                 ) -> JobView:
        """Poll until the job ended (and, by default, its inputs were purged)."""
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.get_job(account_id, job_id)
            if _finished(job, until_purged):
                if raise_on_failure and job.status == "failed":
                    raise JobFailed(job)
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} did not end within {timeout_s} s "
                                   f"(status {job.status})")
            time.sleep(poll_s)

    def list_jobs(self, account_id: str, *, limit: int = 100, cursor: str | None = None
                  ) -> JobsPage:
        return self.run(jobs_call(account_id, limit, cursor))

    def iter_jobs(self, account_id: str, *, page_size: int = 100) -> Iterator[JobView]:
        return self._every(lambda cursor: jobs_call(account_id, page_size, cursor), "jobs")

    def _every(self, page_call: Callable[[str | None], Call[Any]], items: str) -> Iterator[Any]:
        """Every item of a paged list, following next_cursor to the end."""
        cursor = None
        while True:
            page = self.run(page_call(cursor))
            yield from getattr(page, items)
            if (cursor := page.next_cursor) is None:
                return

    def list_outputs(self, account_id: str, *, limit: int = 100, cursor: str | None = None
                     ) -> OutputsPage:
        return self.run(outputs_call(account_id, limit, cursor))

    def iter_outputs(self, account_id: str, *, page_size: int = 100) -> Iterator[OutputItem]:
        return self._every(lambda cursor: outputs_call(account_id, page_size, cursor), "outputs")

    def download_output(self, account_id: str, output_id: str) -> bytes:
        return self.run(download_call(account_id, output_id))

    def output_url(self, account_id: str, output_id: str) -> SignedUrl:
        return self.run(url_call(account_id, output_id))

    def delete_output(self, account_id: str, output_id: str) -> DeletionStarted:
        return self.run(delete_output_call(account_id, output_id))

    def delete_account(self, account_id: str) -> DeletionStarted:
        return self.run(delete_account_call(account_id))

    def get_deletion(self, account_id: str, receipt_id: str) -> DeletionReceipt:
        return self.run(deletion_call(account_id, receipt_id))

    def wait_deletion(self, account_id: str, receipt_id: str, *, timeout_s: float = 60.0,
                      poll_s: float = 0.2) -> DeletionReceipt:
        deadline = time.monotonic() + timeout_s
        while (receipt := self.get_deletion(account_id, receipt_id)).status != "complete":
            if time.monotonic() > deadline:
                raise TimeoutError(f"deletion {receipt_id} not complete within {timeout_s} s")
            time.sleep(poll_s)
        return receipt

    def export(self, account_id: str) -> PrivacyExport:
        return self.run(export_call(account_id))

    def opt_out(self, account_id: str, opt_out: bool = True) -> OptOutResult:
        return self.run(opt_out_call(account_id, opt_out))

    def age_signal(self, account_id: str, under_13: bool) -> DeletionStarted | AgeSignalNoAction:
        return self.run(age_signal_call(account_id, under_13))

    def health(self) -> Health:
        return self.run(health_call())


class AsyncEphemeraClient:
    """The asyncio client: the same calls as ``EphemeraClient``, awaited."""

    def __init__(self, base_url: str = "", *, token: str | None = None,
                 retry: RetryPolicy = RetryPolicy(), timeout_s: float = 60.0,
                 http: httpx.AsyncClient | None = None, max_connections: int = 100,
                 on_retry: OnRetry | None = None) -> None:
        self.retry, self.on_retry = retry, on_retry
        self._owned = http is None
        self.http = http or httpx.AsyncClient(
            base_url=base_url, headers=_headers(token), timeout=timeout_s,
            limits=httpx.Limits(max_connections=max_connections))

    async def __aenter__(self) -> AsyncEphemeraClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owned:
            await self.http.aclose()

    async def send(self, call: Call[Any]) -> httpx.Response:
        pacing = _Pacing(self.retry, call, self.on_retry)

        async def attempt() -> httpx.Response:
            return pacing.answer(await self.http.request(call.method, call.path,
                                                         **call.httpx_kwargs()))

        try:
            return await core_retry.retry_call_async(
                attempt, policy=pacing.policy, retryable=_transient, hint_s=pacing.delay_s,
                on_retry=pacing.on_retry)
        except _RetryAnswer as last:
            return last.response

    async def run(self, call: Call[T]) -> T:
        return call.parse(await self.send(call))

    async def submit_job(self, files: Sequence[Upload], *, device_key: bytes, kind: str,
                         style: str, account_id: str, resolution_px: int | None = None,
                         country: str | None = None, idempotency_key: str | None = None
                         ) -> JobAccepted:
        return await self.run(job_call(files, device_key=device_key, kind=kind, style=style,
                                       account_id=account_id, resolution_px=resolution_px,
                                       country=country, idempotency_key=idempotency_key))

    async def get_job(self, account_id: str, job_id: str) -> JobView:
        return await self.run(job_status_call(account_id, job_id))

    async def wait_job(self, account_id: str, job_id: str, *, timeout_s: float = 600.0,
                       poll_s: float = 0.2, until_purged: bool = True,
                       raise_on_failure: bool = False) -> JobView:
        deadline = time.monotonic() + timeout_s
        while True:
            job = await self.get_job(account_id, job_id)
            if _finished(job, until_purged):
                if raise_on_failure and job.status == "failed":
                    raise JobFailed(job)
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} did not end within {timeout_s} s "
                                   f"(status {job.status})")
            await asyncio.sleep(poll_s)

    async def list_jobs(self, account_id: str, *, limit: int = 100, cursor: str | None = None
                        ) -> JobsPage:
        return await self.run(jobs_call(account_id, limit, cursor))

    def iter_jobs(self, account_id: str, *, page_size: int = 100) -> AsyncIterator[JobView]:
        return self._every(lambda cursor: jobs_call(account_id, page_size, cursor), "jobs")

    async def _every(self, page_call: Callable[[str | None], Call[Any]], items: str
                     ) -> AsyncIterator[Any]:
        cursor = None
        while True:
            page = await self.run(page_call(cursor))
            for item in getattr(page, items):
                yield item
            if (cursor := page.next_cursor) is None:
                return

    async def list_outputs(self, account_id: str, *, limit: int = 100,
                           cursor: str | None = None) -> OutputsPage:
        return await self.run(outputs_call(account_id, limit, cursor))

    def iter_outputs(self, account_id: str, *, page_size: int = 100
                     ) -> AsyncIterator[OutputItem]:
        return self._every(lambda cursor: outputs_call(account_id, page_size, cursor), "outputs")

    async def download_output(self, account_id: str, output_id: str) -> bytes:
        return await self.run(download_call(account_id, output_id))

    async def output_url(self, account_id: str, output_id: str) -> SignedUrl:
        return await self.run(url_call(account_id, output_id))

    async def delete_output(self, account_id: str, output_id: str) -> DeletionStarted:
        return await self.run(delete_output_call(account_id, output_id))

    async def delete_account(self, account_id: str) -> DeletionStarted:
        return await self.run(delete_account_call(account_id))

    async def get_deletion(self, account_id: str, receipt_id: str) -> DeletionReceipt:
        return await self.run(deletion_call(account_id, receipt_id))

    async def export(self, account_id: str) -> PrivacyExport:
        return await self.run(export_call(account_id))

    async def opt_out(self, account_id: str, opt_out: bool = True) -> OptOutResult:
        return await self.run(opt_out_call(account_id, opt_out))

    async def age_signal(self, account_id: str, under_13: bool
                         ) -> DeletionStarted | AgeSignalNoAction:
        return await self.run(age_signal_call(account_id, under_13))

    async def health(self) -> Health:
        return await self.run(health_call())
