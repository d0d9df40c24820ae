"""Domain exceptions. ``serve/`` maps them to HTTP status codes; nothing else does."""

from __future__ import annotations

from typing import Literal


def _rebuild(cls: type[EphemeraError], args: tuple, state: dict) -> EphemeraError:
    exc = cls.__new__(cls)
    Exception.__init__(exc, *args)
    exc.__dict__.update(state)
    return exc


class EphemeraError(Exception):
    """Base class: the message is safe to show a client (no secrets, no media)."""

    retry_after_s: int | None = None  # set where a retry is expected (429, 503)

    def __reduce__(self):  # crosses processes (a pool's answer) with its fields intact
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))


Problem = Literal["malformed", "too_large", "unsupported_media", "invalid", "conflict",
                  "length_required"]


class InvalidUpload(EphemeraError):
    """The request or one of its files is unacceptable; ``problem`` says how (serve/ maps
    it to an HTTP status)."""

    def __init__(self, message: str, *, problem: Problem = "invalid") -> None:
        super().__init__(message)
        self.problem = problem


class NotFound(EphemeraError):
    """The job, output or account does not exist (HTTP 404)."""


class Forbidden(EphemeraError):
    """The caller may not touch this object (HTTP 403)."""


class Unauthorized(EphemeraError):
    """The caller did not present the service's API token (HTTP 401)."""


class Unavailable(EphemeraError):
    """A part of the service is down; nothing was changed; retry later (HTTP 503)."""


class TooManyJobs(EphemeraError):
    """This account has too many unfinished jobs; retry after one ends (HTTP 429)."""


class ServiceFull(EphemeraError):
    """Every queue is full; nothing was kept; retry later (HTTP 503 with Retry-After)."""


class StorageError(EphemeraError):
    """The object store failed; the operation may be retried (HTTP 503)."""


class WrongKey(EphemeraError):
    """Ciphertext did not authenticate under the given device key."""


class ModelError(EphemeraError):
    """A configured model is missing, malformed or of the wrong shape (a deployment error,
    never a user's: the replica refuses to start with this message)."""
