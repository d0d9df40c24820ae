"""Object stores behind one interface, and the one place object URIs are parsed.

An object URI is ``<store_url>/<key>``. Keys never carry personal data: inputs and face
data live under ``inputs/<job_id>/`` and ``face/<job_id>/``, outputs under
``outputs/<account_digest>/<output_id>``, where ids are random and the digest is a hash.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Protocol

from pipeline.errors import StorageError

INPUT_PREFIX = "inputs/"
FACE_PREFIX = "face/"
OUTPUT_PREFIX = "outputs/"


class ObjectStore(Protocol):
    """What every backend provides. Writes are all-or-nothing: no partial object is visible."""

    url: str

    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def list_keys(self, prefix: str) -> list[str]: ...


def object_uri(store: ObjectStore, key: str) -> str:
    return f"{store.url.rstrip('/')}/{key}"


def key_from_uri(store: ObjectStore, uri: str) -> str:
    """The key of ``uri`` in ``store``; refuses a URI that belongs to another store."""
    root = store.url.rstrip("/") + "/"
    if not uri.startswith(root) or ".." in uri[len(root) :].split("/"):
        raise StorageError(f"object URI does not belong to the store at {store.url}")
    return uri[len(root) :]


def input_key(job_id: str, object_id: str) -> str:
    return f"{INPUT_PREFIX}{job_id}/{object_id}.bin"


def face_key(job_id: str, object_id: str) -> str:
    return f"{FACE_PREFIX}{job_id}/{object_id}.bin"


def account_digest(account_id: str) -> str:
    """A stable, non-reversible folder name for an account's outputs."""
    return hashlib.sha256(f"ephemera-account:{account_id}".encode()).hexdigest()[:32]


def output_key(account_id: str, output_id: str, extension: str) -> str:
    return f"{OUTPUT_PREFIX}{account_digest(account_id)}/{output_id}.{extension}"


def delete_verified(store: ObjectStore, key: str) -> bool:
    """Delete ``key`` and check it is gone. Idempotent: an absent object counts as deleted.

    Returns True once verified gone; raises StorageError if it still exists.
    """
    store.delete(key)
    if store.exists(key):
        raise StorageError("object still exists after delete")
    return True


class LocalObjectStore:
    """The embedded default: files under a root directory (``file://`` URLs).

    Writes go to a temporary file in ``.tmp/`` and are renamed into place, so a crash
    never leaves a partial object under its real key.
    """

    def __init__(self, url: str) -> None:
        if not url.startswith("file://"):
            raise ValueError(f"store_url {url!r} is not a file:// URL")
        self.url = url.rstrip("/")
        self.root = Path(url[len("file://") :]).resolve()
        self._tmp = self.root / ".tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        if not key or key.startswith("/") or ".." in key.split("/") or key.startswith(".tmp"):
            raise StorageError(f"invalid object key {key!r}")
        return self.root / key

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            fd, tmp = tempfile.mkstemp(dir=self._tmp)
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                for attempt in range(3):  # a concurrent delete may remove the empty folder
                    path.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        os.replace(tmp, path)
                        break
                    except FileNotFoundError:
                        if attempt == 2:
                            raise
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise StorageError(f"local store write failed: {exc.strerror}") from None

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise StorageError("object not found") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"local store delete failed: {exc.strerror}") from None
        # Drop now-empty job folders so a listing shows what is really left.
        for parent in path.parents:
            if parent == self.root or not parent.is_relative_to(self.root):
                break
            try:
                parent.rmdir()
            except OSError:
                break

    def list_keys(self, prefix: str) -> list[str]:
        keys = []
        for path in self.root.rglob("*"):
            if path.is_file() and not path.is_relative_to(self._tmp):
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)


def open_store(url: str) -> ObjectStore:
    """The store for a configured URL. Only file:// is built in so far."""
    if url.startswith("file://"):
        return LocalObjectStore(url)
    raise ValueError(f"store_url {url!r}: only file:// stores are supported in this build")
