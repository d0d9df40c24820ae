"""HTTP API (FastAPI on Ray Serve), under /v1. Validation lives in pipeline/; this module
maps requests to pipeline calls and domain errors to status codes.

The device key arrives in the X-Device-Key header. It is never logged, never echoed in an
error, and never leaves memory: it travels to a job runner with the job and is dropped
when the job ends.
"""


import asyncio
import hashlib
import hmac
import logging
import os
import time
import uuid
from collections.abc import Mapping
from typing import Annotated

import redis
import starlette.formparsers
from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.exceptions import BackPressureError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.core.config import Settings
from pipeline.core.errors import (
    EphemeraError,
    InvalidUpload,
    NotFound,
    ServiceFull,
    TooManyJobs,
    Unavailable,
)
from pipeline.core.records import JOB_KINDS, JobRecord, JobStatus, Stage, Worker
from pipeline.jobs.intake import (
    ACCOUNT_ID_PATTERN,
    Upload,
    check_request_shape,
    new_job_id,
    withdraw_job,
)
from pipeline.media.ingest import declared_media
from pipeline.privacy.rights import (
    PrivacyRequests,
    RequestKind,
    answer_right_to_know,
    block_child_account,
    set_opt_out,
)
from pipeline.retention.deletion import delete_output, request_account_deletion
from pipeline.security.crypto import check_device_key
from pipeline.security.pseudonyms import account_ref
from pipeline.state.cluster_secret import check_process_secrets
from pipeline.state.idempotency import Idempotency, body_digest, check_key
from pipeline.state.job_store import JobStore
from pipeline.state.metrics import render_prometheus, service_metrics
from pipeline.state.receipts import ReceiptLedger
from pipeline.state.tlog import TransparencyLog
from pipeline.storage.base import open_stores
from pipeline.transparency.heads import head_json, key_description, log_public_key
from pipeline.transparency.verifier import verify_checkpoint
from serve.errors import RETRY_LATER, http_status
from serve.leases import keep_lease
from serve.schemas import (
    AgeSignalBody,
    AgeSignalNoAction,
    ConsistencyProof,
    DeletionReceipt,
    DeletionStarted,
    ErrorBody,
    Health,
    JobAccepted,
    JobsPage,
    JobView,
    OptOutBody,
    OptOutResult,
    OutputsPage,
    PrivacyExport,
    SignedUrl,
    TransparencyKey,
    TreeHead,
)
from serve.telemetry import count_rejection

# Starlette spools uploads over 1 MiB to a temporary file on disk. Plaintext photos must
# never touch disk, so keep every part in memory (the request size is capped below).
starlette.formparsers.MultiPartParser.spool_max_size = 1 << 40

log = logging.getLogger("ray.serve")

_RETRY_AFTER = {"Retry-After": {"schema": {"type": "integer"},
                                 "description": "seconds to wait before retrying"}}
_ERRORS: dict[int | str, dict] = {
    code: {"model": ErrorBody, "description": text,
           **({"headers": _RETRY_AFTER} if code in RETRY_LATER else {})} for code, text in (
        (400, "malformed request"), (401, "missing or wrong API token"),
        (403, "not allowed for this account"), (404, "not found for this account"),
        (409, "conflict (account being deleted, Idempotency-Key reused; Retry-After while "
              "the first request with the key is still being handled)"),
        (411, "Content-Length required"), (413, "too large"), (415, "unsupported media"),
        (422, "invalid field or file"), (429, "too many unfinished jobs; see Retry-After"),
        (503, "at capacity or a dependency is down; see Retry-After"))}



def _declared_query_only(request: Request) -> None:
    """A query parameter the route does not take is refused, not ignored: a typo such as
    ``limt=5`` must not silently change what a client gets."""
    dependant = getattr(request.scope.get("route"), "dependant", None)
    if dependant is None:
        return
    known = {param.alias for param in dependant.query_params}
    if set(request.query_params) - known:
        takes = ", ".join(sorted(known)) or "none"
        raise InvalidUpload(f"unknown query parameter; this route takes: {takes}",
                            problem="invalid")


# The interactive docs and the schema are served by the ingress below, behind the same
# token as /v1 (FastAPI's own routes would be open to anyone).
app = FastAPI(title="Ephemera", version="0.1.0", docs_url=None, redoc_url=None,
              openapi_url=None, responses=_ERRORS, dependencies=[Depends(_declared_query_only)],
              redirect_slashes=False)  # a trailing slash is a 404, not a redirect

_JOB_BODY = {
    "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["files", "kind", "style", "account_id"],
        "properties": {
            "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                      "description": "1..max_files_per_job photos (JPEG, PNG, WebP, HEIC, "
                                     "AVIF) or one video (MP4, MOV, WebM; art_style only)"},
            "kind": {"type": "string", "enum": list(JOB_KINDS)},
            "style": {"type": "string", "description": "a style of configs/styles.yaml"},
            "account_id": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
            "resolution_px": {"type": "integer"},
            "country": {"type": "string", "description": "ISO 3166 alpha-2"}}}}}},
    "parameters": [
        {"name": "X-Device-Key", "in": "header", "required": True,
         "schema": {"type": "string"}, "description": "base64 of 32 random bytes held on the "
         "user's device; never stored"},
        {"name": "Idempotency-Key", "in": "header", "required": False,
         "schema": {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{8,128}$"}}],
}


def openapi_document() -> dict:
    """The API contract: every route, the multipart job body, the device-key header, the
    bearer scheme and the {error, detail} body of every error. docs/openapi.json is this,
    committed (a test keeps them equal)."""
    from fastapi.openapi.utils import get_openapi

    document = get_openapi(title=app.title, version=app.version, routes=app.routes)
    document.setdefault("components", {})["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer",
                   "description": "service.yaml api_token_env's token (the app backend's)"}}
    for path, methods in document["paths"].items():
        for operation in methods.values():
            if path != "/healthz":
                operation["security"] = [{"bearer": []}]
    return document


def _retry_after_s() -> int:
    return getattr(app.state, "retry_after_s", 1)


@app.exception_handler(redis.RedisError)
async def _redis_error(request: Request, exc: redis.RedisError) -> JSONResponse:
    return JSONResponse({"error": "Unavailable", "detail": "the job database is unavailable; "
                         "try again shortly"}, status_code=503,
                        headers={"Retry-After": str(_retry_after_s())})


@app.exception_handler(EphemeraError)
async def _domain_error(request: Request, exc: EphemeraError) -> JSONResponse:
    """{error, detail}; Retry-After on every 429 and 503, and on a 409 that asks for a retry."""
    status = http_status(exc)
    retry_s = exc.retry_after_s or (_retry_after_s() if status in RETRY_LATER else None)
    return JSONResponse({"error": type(exc).__name__, "detail": str(exc)}, status_code=status,
                        headers={"Retry-After": str(retry_s)} if retry_s else None)


@app.exception_handler(StarletteHTTPException)
async def _routing_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """No such route (404) or method (405), in the same {error, detail} body. A 405 lists
    every method the path takes: each method is its own route, so Starlette's Allow header
    would name only the first one it matched."""
    if exc.status_code == 405:
        allowed = sorted({method for route in request.app.routes
                          if getattr(route, "path_regex", None) is not None
                          and route.path_regex.match(request.url.path)
                          for method in (getattr(route, "methods", None) or ())})
        return JSONResponse({"error": "MethodNotAllowed", "detail": "this path takes "
                             + ", ".join(allowed)}, status_code=405,
                            headers={"Allow": ", ".join(allowed)})
    error = {404: "NotFound"}.get(exc.status_code, "HTTPError")
    return JSONResponse({"error": error, "detail": str(exc.detail)}, status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


@app.exception_handler(RequestValidationError)
async def _invalid_field(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A query, path or JSON field FastAPI refused: the same {error, detail} as ours, naming
    the field but never echoing its value; a body that is not JSON at all is a 400."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return JSONResponse({"error": "InvalidUpload", "detail": "body must be a JSON object"},
                            status_code=400)
    detail = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}"
                       for e in errors[:5])
    return JSONResponse({"error": "InvalidUpload", "detail": detail}, status_code=422)


_OPEN_PATHS = frozenset({"/healthz"})  # a load balancer's probe: says only "ok"
METRICS_PATH = "/metrics"


def token_allows(path: str, method: str, sent: str, api_sha256: bytes | None,
                 metrics_sha256: bytes | None) -> bool:
    """Whether a request with bearer token ``sent`` may go on. /healthz is open; with no
    API token configured (``None``: the loopback demo) everything is. Otherwise the API
    token opens every route, and the metrics token (service.yaml metrics_token_env) opens
    GET /metrics only, never /v1. Tokens are compared by their sha256 digest in constant
    time; an empty expected digest (settings never read) opens nothing."""
    if path in _OPEN_PATHS or api_sha256 is None:
        return True
    if not sent:
        return False
    digest = hashlib.sha256(sent.encode()).digest()
    allowed = bool(api_sha256) & hmac.compare_digest(digest, api_sha256)
    if metrics_sha256 and path == METRICS_PATH and method == "GET":
        allowed |= hmac.compare_digest(digest, metrics_sha256)
    return allowed


@app.middleware("http")
async def _require_token(request: Request, call_next):
    """The app backend authenticates users; it authenticates itself with a bearer token.
    Checked before anything else reads the request (body, path or query), on every route
    but /healthz, /docs and /openapi.json included (``token_allows``). Fails closed: a
    replica whose settings were never read refuses everything."""
    header = request.headers.get("authorization", "")
    sent = header[len("Bearer "):] if header.startswith("Bearer ") else ""
    if not token_allows(request.url.path, request.method, sent,
                        getattr(app.state, "api_token_sha256", b""),
                        getattr(app.state, "metrics_token_sha256", None)):
        return JSONResponse({"error": "Unauthorized", "detail": "missing or wrong API "
                             "token; send Authorization: Bearer <token>"}, status_code=401)
    return await call_next(request)


HANDOFF_CONFIRM_S = 2.0  # wait this long to learn whether a runner took the job

async def _assigned(response) -> None:
    """Returns once Serve routed the call to a replica; raises BackPressureError if the
    caller-side queue is full."""
    await response._to_object_ref()


async def _settled(response) -> None:
    try:
        await response
    except Exception:  # the runner records every outcome; a dead runner is reaped
        pass



def expected_token_digests(settings: Settings,
                           environ: Mapping[str, str] = os.environ) -> tuple[bytes | None,
                                                                            bytes | None]:
    """The sha256 digests of the API token and the metrics token, read from the variables
    service.yaml names (``None`` where none is named). Raises ValueError for a token under
    16 characters, or a metrics token equal to the API token."""
    digests: list[bytes | None] = []
    for setting in ("api_token_env", "metrics_token_env"):
        name = getattr(settings.service, setting)
        if name is None:
            digests.append(None)
            continue
        token = environ.get(name, "")
        if len(token) < 16:
            raise ValueError(f"service.yaml {setting} names {name}, which holds no token of "
                             f"at least 16 characters; set it or set {setting}: null")
        digests.append(hashlib.sha256(token.encode()).digest())
    api, metrics = digests
    if metrics is not None and metrics == api:
        raise ValueError("the metrics token (service.yaml metrics_token_env) is the API token; "
                         "give Prometheus a token of its own")
    return api, metrics


def _accepted(account_id: str, job_id: str, *, replayed: bool) -> JSONResponse:
    url = f"/v1/accounts/{account_id}/jobs/{job_id}"
    return JSONResponse({"job_id": job_id, "status": JobStatus.QUEUED.value, "status_url": url,
                         "replayed": replayed}, status_code=202, headers={"Location": url})


MAX_PAGE = 1000
AccountId = Annotated[str, Path(pattern=f"^{ACCOUNT_ID_PATTERN.pattern}$",
                                description="the app's account id (never shown to others)")]
PageLimit = Annotated[int, Query(ge=1, le=MAX_PAGE, description="items per page")]


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def belongs_to(job: JobRecord, account_id: str) -> bool:
    """Whether ``job`` is this account's: by id, or by pseudonym once minimised."""
    if job.account_id:
        return job.account_id == account_id
    return bool(job.account_ref) and job.account_ref == account_ref(account_id)


def job_view(job: JobRecord, account_id: str) -> dict:
    """What a client sees of a job: never a URI of an input, never a key."""
    return {
        "job_id": job.job_id,
        "status": job.status,
        "kind": job.kind or None,
        "style": job.style or None,
        "resolution_px": job.resolution_px,
        "reason": job.reason or None,
        "num_inputs": len(job.input_uris),
        "output_ids": job.output_ids,
        "output_urls": [f"/v1/accounts/{account_id}/outputs/{o}" for o in job.output_ids],
        "created_s": job.created_s,
        "succeeded_s": job.succeeded_s,
        "finished_s": job.finished_s,
        "inputs_purged_s": job.inputs_purged_s,
        "num_inputs_purged_verified": job.num_inputs_purged_verified,
        "attempts": job.attempts,
        "batch_sizes": {s.value: getattr(job, f"{s.value}_batch_size") for s in Stage},
        "progress": ({"frames_done": job.frames_done, "frames_total": job.frames_total}
                     if job.frames_total else None),
        "minimised_s": job.minimised_s,
    }


@serve.deployment
@serve.ingress(app)
class ApiDeployment:
    def __init__(self, settings: Settings, media, runner, retention) -> None:
        self.settings = settings
        self.media = media
        self.runner = runner
        self._handed_off: set[asyncio.Task] = set()
        self.retention = retention
        self._background: set[asyncio.Task] = set()
        self.redis = redis.Redis.from_url(settings.service.redis_url)
        check_process_secrets(settings, self.redis)  # before any pseudonym is computed
        self.tlog_public = log_public_key(settings.retention.transparency,
                                          settings.production_markers)
        self.jobs = JobStore(self.redis)
        self.stores = open_stores(settings.storage)
        self.idempotency = Idempotency(self.redis, window_s=settings.service.idempotency_window_s)
        # Jobs this replica registers carry its id; its lease tells the reaper whether a job
        # not yet handed to a runner can still be (the pid lets the fault tests find it).
        self.ingress_id = f"ingress-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.jobs.heartbeat(Worker.INGRESS, self.ingress_id,
                            lease_s=settings.service.heartbeat_lease_s, now_s=time.time())
        self._lease: asyncio.Task | None = None
        limits = settings.service
        self.max_request_bytes = max(limits.max_files_per_job * limits.max_file_bytes,
                                     limits.max_video_bytes) + (1 << 20)
        # Read by the module's middleware and error handlers (one ingress per process).
        # Through the imported module: Serve ships this class by value, with copies of the
        # globals it names, so a bare `app` here would be a copy the middleware never sees.
        import serve.api as module

        (module.app.state.api_token_sha256,
         module.app.state.metrics_token_sha256) = expected_token_digests(settings)
        module.app.state.retry_after_s = settings.service.retry_after_s

    async def check_health(self) -> None:
        """Serve calls this every few seconds: it (re)starts the lease renewal."""
        self._keep_lease()

    def _keep_lease(self) -> None:
        if self._lease is None or self._lease.done():
            self._lease = asyncio.get_running_loop().create_task(keep_lease(
                self.jobs, Worker.INGRESS, self.ingress_id,
                self.settings.service.heartbeat_lease_s))

    @app.get("/openapi.json", include_in_schema=False)
    def openapi_document(self) -> JSONResponse:
        return JSONResponse(openapi_document())

    @app.get("/docs", include_in_schema=False)
    def docs(self):
        from fastapi.openapi.docs import get_swagger_ui_html

        return get_swagger_ui_html(openapi_url="/openapi.json", title="Ephemera API")

    @app.get("/healthz", response_model=Health)
    def healthz(self) -> dict:
        self.redis.ping()
        return {"status": "ok"}

    @app.get(METRICS_PATH, response_class=Response, description="The cluster-wide gauges "
             "(from Redis; scrape them through one target, see pipeline/state/metrics.py). "
             "Takes the API token or the metrics token (service.yaml metrics_token_env), "
             "which opens nothing else.", responses={200: {
                 "description": "Prometheus text exposition of the service's gauges",
                 "content": {"text/plain": {"schema": {"type": "string"}}}}})
    def metrics(self) -> Response:
        return Response(render_prometheus(service_metrics(self.jobs)),
                        media_type="text/plain; version=0.0.4")

    @app.post("/v1/jobs", status_code=202, openapi_extra=_JOB_BODY, responses={202: {
        "model": JobAccepted, "description": "accepted; stored encrypted and queued",
        "headers": {"Location": {"schema": {"type": "string"}}}}})
    async def create_job(self, request: Request) -> JSONResponse:
        self._keep_lease()
        if "content-length" not in request.headers:  # a chunked body could be unbounded
            raise InvalidUpload("send the upload with a Content-Length header", problem="length_required")
        try:
            declared = int(request.headers["content-length"])
        except ValueError:
            raise InvalidUpload("Content-Length must be a number of bytes",
                                problem="malformed") from None
        if declared > self.max_request_bytes:
            raise InvalidUpload(
                f"request is {declared} bytes, over the limit of {self.max_request_bytes}",
                problem="too_large")
        device_key = check_device_key(request.headers.get("x-device-key"))
        try:
            form = await request.form(max_files=64, max_fields=32)
        except Exception:
            raise InvalidUpload("body must be multipart/form-data with files in 'files'",
                                problem="malformed") from None
        uploads = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
        files = [await f.read() for f in uploads]
        declared = [declared_media(f.content_type, f.filename) for f in uploads]
        await form.close()
        resolution = form.get("resolution_px")
        try:
            resolution_px = int(resolution) if resolution not in (None, "") else None
        except (TypeError, ValueError):
            raise InvalidUpload("resolution_px must be an integer", problem="invalid") from None
        idem_key = check_key(request.headers.get("idempotency-key"))
        fields = {"account_id": _text(form.get("account_id")), "kind": _text(form.get("kind")),
                  "style": _text(form.get("style")), "resolution_px": resolution_px,
                  "country": _text(form.get("country"))}
        # Cheap checks only (fields, sizes, magic bytes): no decoder runs in the ingress.
        account = check_request_shape(**fields, files=files, settings=self.settings,
                                      declared=declared).account_id
        digest = body_digest(**fields, files=files)
        job_id = new_job_id()  # named in the claim: a retry after a crash looks it up
        upload = Upload(**fields, files=files, declared=declared, device_key=device_key,
                        job_id=job_id, ingress_id=self.ingress_id)
        del files, uploads
        if idem_key is not None:
            first = await asyncio.to_thread(self.idempotency.claim, account, idem_key, digest,
                                            job_id=job_id, ingress_id=self.ingress_id,
                                            now_s=time.time())
            if first is not None:  # a retry of a request that already made its job
                return _accepted(account, first, replayed=True)
        # Shielded: a client that disconnects now must not leave a job registered but
        # never queued; the accept-and-submit step always runs to its end.
        work = asyncio.ensure_future(self._accept_and_submit(upload))
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            # The client went away; the shielded work still ends (a job, or nothing kept).
            # Its key is settled by that end, so a retry finds the job, not a free key.
            if idem_key is not None:
                work.add_done_callback(lambda done: self._spawn(self._settle_claim(
                    done, account, idem_key, digest, job_id)))
            raise
        except BaseException as exc:
            if idem_key is not None:
                await asyncio.to_thread(self.idempotency.release, account, idem_key)
            if isinstance(exc, (TooManyJobs, ServiceFull)):
                exc.retry_after_s = self.settings.service.retry_after_s
                count_rejection(http_status(exc))
            raise
        if idem_key is not None:
            await asyncio.to_thread(self.idempotency.complete, account, idem_key, digest, job_id)
        return _accepted(account, job_id, replayed=False)

    async def _accept_and_submit(self, upload: Upload) -> None:
        """Have the media pool check, decode, strip, encrypt and store the upload and register
        the job, then hand it to a job runner. A media replica lost mid-request, or every
        runner and this caller's queue for them full (Serve back-pressure): the job is
        withdrawn, 503, nothing kept."""
        job_id = upload.job_id
        try:
            outcome = await self.media.ingest.remote(upload)
        except BackPressureError:
            raise ServiceFull("the service is at capacity; nothing was kept, try again "
                              "shortly") from None
        except (Exception, asyncio.CancelledError) as exc:
            log.warning("the media pool failed on an upload: %s", type(exc).__name__)
            await asyncio.to_thread(withdraw_job, job_id, self.stores, self.jobs)
            raise Unavailable("the media service was interrupted; nothing was kept, try "
                              "again shortly") from None
        del upload  # the files and the key
        if outcome.error is not None:
            raise outcome.error
        item = outcome.item
        response = self.runner.run_job.remote(item)
        del item  # the runner holds the device key from here on
        try:
            await asyncio.wait_for(asyncio.shield(_assigned(response)), HANDOFF_CONFIRM_S)
        except TimeoutError:
            pass  # queued at this caller, within max_queued_requests: a runner takes it soon
        except BackPressureError:
            await asyncio.to_thread(withdraw_job, job_id, self.stores, self.jobs)
            raise ServiceFull("the service is at capacity; nothing was kept, try again "
                              "shortly") from None
        except (Exception, asyncio.CancelledError) as exc:
            # Includes Serve cancelling the hand-off because the client went away: the job
            # must not stay stored with no runner to drive it.
            log.warning("handing a job to a runner failed: %s", type(exc).__name__)
            response.cancel()
            await asyncio.to_thread(withdraw_job, job_id, self.stores, self.jobs)
            raise Unavailable("the job runners are unavailable; nothing was kept, try again "
                              "shortly") from None
        task = asyncio.get_running_loop().create_task(_settled(response))
        self._handed_off.add(task)  # keep the response referenced until the job ends
        task.add_done_callback(self._handed_off.discard)

    @app.get("/v1/accounts/{account_id}/jobs", response_model=JobsPage)
    def list_jobs(self, account_id: AccountId, limit: PageLimit = 100,
                  cursor: str | None = None) -> dict:
        """The account's jobs, oldest first; pass ``next_cursor`` back for more. A job
        leaves the list when its record is minimised (``job_record_grace_s`` after its
        inputs were purged); it can still be read by id until it expires."""
        jobs, next_cursor = self.jobs.page_jobs(account_id, limit=limit, after=cursor)
        return {"account_id": account_id, "next_cursor": next_cursor,
                "jobs": [job_view(j, account_id) for j in jobs]}

    @app.get("/v1/accounts/{account_id}/jobs/{job_id}", response_model=JobView)
    def get_job(self, account_id: AccountId, job_id: str) -> dict:
        """Another account's job is reported exactly like a missing one."""
        try:
            job = self.jobs.get_job(job_id)
        except NotFound:
            job = None
        if job is None or not belongs_to(job, account_id):
            raise NotFound(f"job {job_id} not found for this account")
        return job_view(job, account_id)

    @app.get("/v1/accounts/{account_id}/outputs", response_model=OutputsPage)
    def list_outputs(self, account_id: AccountId, limit: PageLimit = 100,
                     cursor: str | None = None) -> dict:
        """Oldest first, ``limit`` (1-1000) per page; pass ``next_cursor`` back for more."""
        outputs, next_cursor = self.jobs.page_outputs(account_id, limit=limit, after=cursor)
        return {"account_id": account_id, "next_cursor": next_cursor, "outputs": [
            {"output_id": o.output_id, "job_id": o.job_id, "media_type": o.media_type,
             "created_s": o.created_s, "size_bytes": o.size_bytes,
             "url": f"/v1/accounts/{account_id}/outputs/{o.output_id}"}
            for o in outputs]}

    def _find_output(self, account_id: str, output_id: str):
        """The caller's output record, its store and key; NotFound for another account's."""
        out = self.jobs.get_output(account_id, output_id)
        store, key = self.stores.locate(out.uri)
        return out, store, key

    @app.get("/v1/accounts/{account_id}/outputs/{output_id}", response_class=Response,
             responses={200: {"description": "the output's bytes; Cache-Control: private, "
                              "no-store", "content": {media: {"schema": {
                                  "type": "string", "format": "binary"}} for media in (
                                  "image/png", "image/jpeg", "image/webp", "video/mp4")}}})
    def get_output(self, account_id: AccountId, output_id: str) -> Response:
        out, store, key = self._find_output(account_id, output_id)
        data = store.get(key)  # a store outage is a 503, not a 404
        return Response(content=data, media_type=out.media_type,
                        headers={"Cache-Control": "private, no-store"})

    @app.get("/v1/accounts/{account_id}/outputs/{output_id}/url", response_model=SignedUrl)
    def get_output_url(self, account_id: AccountId, output_id: str) -> dict:
        """A short-lived signed download URL, where the output store can sign one."""
        _, store, key = self._find_output(account_id, output_id)
        ttl_s = self.settings.storage.signed_url_ttl_s
        url = store.signed_url(key, ttl_s)
        if url is None:
            raise NotFound("this output store does not sign URLs; download the output from "
                           f"/v1/accounts/{account_id}/outputs/{output_id}")
        return {"url": url, "expires_in_s": ttl_s}

    @app.delete("/v1/accounts/{account_id}/outputs/{output_id}", response_model=DeletionStarted)
    def delete_output(self, account_id: AccountId, output_id: str) -> dict:
        """Deleted and verified before this returns; the receipt lists the object."""
        receipt_id = delete_output(account_id, output_id, self.stores, self.jobs)
        return {"receipt_id": receipt_id, "status": "complete",
                "receipt_url": f"/v1/accounts/{account_id}/deletions/{receipt_id}"}

    @app.delete("/v1/accounts/{account_id}", status_code=202, response_model=DeletionStarted)
    async def delete_account(self, account_id: AccountId) -> dict:
        """Recorded durably at once, carried out by a retention actor within seconds."""
        receipt_id = await self._start_account_deletion(account_id, RequestKind.DELETE)
        return {"receipt_id": receipt_id, "status": "pending",
                "receipt_url": f"/v1/accounts/{account_id}/deletions/{receipt_id}"}

    async def _start_account_deletion(self, account_id: str, kind: RequestKind) -> str:
        """A deletion as a privacy request: recorded, then carried out in the background."""
        requests = PrivacyRequests(self.redis)
        privacy_request = await asyncio.to_thread(requests.open, kind, account_id)
        receipt_id = await asyncio.to_thread(request_account_deletion, account_id, self.jobs)
        await asyncio.to_thread(requests.attach_receipt, privacy_request.request_id, receipt_id)
        self._spawn(self._delete_account(account_id, receipt_id))
        return receipt_id

    def _spawn(self, coro) -> None:
        """Run ``coro`` in the background, keeping a reference until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _settle_claim(self, work: asyncio.Future, account: str, key: str, digest: str,
                            job_id: str) -> None:
        """An Idempotency-Key claim whose client went away: completed with the job if the
        shielded accept made one, released if it kept nothing."""
        made = not work.cancelled() and work.exception() is None
        if made:
            await asyncio.to_thread(self.idempotency.complete, account, key, digest, job_id)
        else:
            await asyncio.to_thread(self.idempotency.release, account, key)

    @app.get("/v1/accounts/{account_id}/privacy/export", response_model=PrivacyExport)
    def export_account(self, account_id: AccountId) -> dict:
        """Right to know: every category and piece held for the account, recorded as a
        request by pseudonym; an id the service holds nothing of is answered empty and
        leaves nothing behind."""
        return answer_right_to_know(account_id, self.jobs, self.stores.outputs)

    @app.post("/v1/accounts/{account_id}/privacy/opt-out", response_model=OptOutResult)
    async def opt_out(self, account_id: AccountId, body: OptOutBody) -> dict:
        """Opt out of (or back into) sale and sharing: body {"opt_out": true|false}."""
        opted_out = body.opt_out
        requests = PrivacyRequests(self.redis)
        kind = RequestKind.OPT_OUT if opted_out else RequestKind.OPT_IN
        record = await asyncio.to_thread(requests.open, kind, account_id)
        await asyncio.to_thread(set_opt_out, self.redis, account_id, opted_out)
        await asyncio.to_thread(requests.complete, record.request_id)
        return {"account_id": account_id, "opted_out_of_sale_and_sharing": opted_out,
                "request_id": record.request_id}

    @app.post("/v1/accounts/{account_id}/age-signal", status_code=202,
              response_model=DeletionStarted,
              responses={200: {"model": AgeSignalNoAction, "description": "under_13 false"}})
    async def age_signal(self, account_id: AccountId,
                         body: AgeSignalBody) -> JSONResponse:
        """{"under_13": true}: the account belongs to a child. Everything is deleted at
        once (with a receipt) and no job is accepted for the account again."""
        if not body.under_13:
            return JSONResponse({"account_id": account_id, "status": "no action"})
        await asyncio.to_thread(block_child_account, self.redis, account_id)
        receipt_id = await self._start_account_deletion(account_id, RequestKind.UNDER_13)
        return JSONResponse({"receipt_id": receipt_id, "status": "pending",
                             "receipt_url": f"/v1/accounts/{account_id}/deletions/{receipt_id}",
                             "new_jobs": "refused"}, status_code=202)

    async def _delete_account(self, account_id: str, receipt_id: str) -> None:
        try:
            await self.retention.delete_account.remote(account_id, receipt_id)
        except Exception:
            pass  # still pending in Redis: the retention actors' next round resumes it

    @app.get("/v1/transparency/key", response_model=TransparencyKey)
    def transparency_key(self) -> dict:
        """The deletion log's public key: apps pin it and verify receipts with it."""
        return key_description(self.settings.retention.transparency, self.tlog_public)

    @app.get("/v1/transparency/head", response_model=TreeHead)
    def transparency_head(self) -> dict:
        """The latest signed tree head of the deletion log."""
        text = TransparencyLog(self.redis).latest_head_text()
        if text is None:
            raise NotFound("the deletion log has no signed head yet")
        return head_json(verify_checkpoint(text, self.tlog_public))

    @app.get("/v1/transparency/consistency", response_model=ConsistencyProof)
    def transparency_consistency(
            self, first: Annotated[int, Query(ge=1, le=1 << 62)],
            second: Annotated[int, Query(ge=1, le=1 << 62)]) -> dict:
        """Proof that the log of ``second`` entries extends the log of ``first`` (O(log n))."""
        if first > second:
            raise InvalidUpload(f"first ({first}) must not exceed second ({second})")
        log = TransparencyLog(self.redis)
        if second > log.size():
            raise NotFound(f"the deletion log holds fewer than {second} entries")
        return {"first": first, "second": second,
                "proof": [p.hex() for p in log.consistency_proof(first, second)]}

    @app.get("/v1/accounts/{account_id}/deletions/{receipt_id}", response_model=DeletionReceipt)
    def get_deletion(self, account_id: AccountId, receipt_id: str) -> dict:
        """A deletion receipt of this account; another account's is reported as missing."""
        missing = NotFound(f"deletion receipt {receipt_id} not found for this account")
        try:
            receipt = ReceiptLedger(self.redis).get_request(receipt_id)
        except NotFound:
            raise missing from None
        if receipt.get("account_ref") != account_ref(account_id):
            raise missing
        return receipt

