"""Domain errors -> HTTP status codes: the only place that mapping lives. No Ray import."""

RETRY_LATER = (429, 503)  # these carry a Retry-After header

from pipeline.core.errors import (
    EphemeraError,
    Forbidden,
    InvalidUpload,
    NotFound,
    ServiceFull,
    StorageError,
    TooManyJobs,
    Unauthorized,
    Unavailable,
)

HTTP_STATUS_BY_PROBLEM = {
    "malformed": 400,
    "conflict": 409,
    "length_required": 411,
    "too_large": 413,
    "unsupported_media": 415,
    "invalid": 422,
}


def http_status(exc: EphemeraError) -> int:
    if isinstance(exc, InvalidUpload):
        return HTTP_STATUS_BY_PROBLEM[exc.problem]
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, Unauthorized):
        return 401
    if isinstance(exc, Forbidden):
        return 403
    if isinstance(exc, TooManyJobs):
        return 429
    if isinstance(exc, (StorageError, Unavailable, ServiceFull)):
        return 503
    return 500
