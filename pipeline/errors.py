"""Domain exceptions. ``serve/`` maps them to HTTP status codes; nothing else does."""


class EphemeraError(Exception):
    """Base class: the message is safe to show a client (no secrets, no media)."""


class InvalidUpload(EphemeraError):
    """The request or one of its files is unacceptable (HTTP 400/413/415/422)."""

    def __init__(self, message: str, *, status_code: int = 422) -> None:
        super().__init__(message)
        self.status_code = status_code


class NotFound(EphemeraError):
    """The job, output or account does not exist (HTTP 404)."""


class Forbidden(EphemeraError):
    """The caller may not touch this object (HTTP 403)."""


class Unauthorized(EphemeraError):
    """The caller did not present the service's API token (HTTP 401)."""


class Unavailable(EphemeraError):
    """A part of the service is down; nothing was changed; retry later (HTTP 503)."""


class StorageError(EphemeraError):
    """The object store failed; the operation may be retried (HTTP 503)."""


class NoFaceFound(EphemeraError):
    """An ai_photo input holds no detectable human face: the job fails with this reason."""


class WrongKey(EphemeraError):
    """Ciphertext did not authenticate under the given device key."""
