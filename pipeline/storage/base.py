"""Object stores behind one interface, and the one place object URIs are parsed.

An object URI is ``<store.url>/<key>``: ``file:///srv/store/key``, ``s3://bucket/key`` or
``gs://bucket/key``. Keys never carry personal data: inputs and face data live under
``inputs/<job_id>/`` and ``face/<job_id>/``, outputs under
``outputs/<account_digest>/<output_id>``, where ids are random and the digest is a hash.

A ``StoreSet`` holds every configured store: input stores by region (the user's country
picks one), the output store, and ``locate(uri)`` to find the store of any object.
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from pipeline.core.config import StorageConfig, resolve_path
from pipeline.core.errors import StorageError
from pipeline.core.retry import RetryPolicy, retry_call

INPUT_PREFIX = "inputs/"
FACE_PREFIX = "face/"
WORK_PREFIX = "work/"
OUTPUT_PREFIX = "outputs/"


class ObjectStore(Protocol):
    """What every backend provides. Writes are all-or-nothing: no partial object is visible.

    ``customer_key`` is the device key of an input or face-data object; a backend configured
    for it also encrypts server-side with it (SSE-C, CSEK), else ignores it. Every failure
    is a StorageError after the backend's own retries.
    """

    url: str
    provider: str  # "local" | "aws" | "gcp"
    region: str
    bucket: str

    def put(self, key: str, data: bytes, *, customer_key: bytes | None = None) -> None: ...
    def get(self, key: str, *, customer_key: bytes | None = None) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def list_keys(self, prefix: str) -> list[str]: ...
    def signed_url(self, key: str, ttl_s: int) -> str | None: ...


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


def work_key(job_id: str, object_id: str) -> str:
    return f"{WORK_PREFIX}{job_id}/{object_id}.bin"


def account_digest(account_id: str) -> str:
    """The folder of an account's outputs: its keyed pseudonym (pipeline/security/pseudonyms.py),
    so a guessable account id cannot be found in a bucket listing."""
    from pipeline.security.pseudonyms import account_ref

    return account_ref(account_id)


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


FOLDER_RACE = RetryPolicy(max_tries=3, base_s=0.001, cap_s=0.01)  # local: a moment is plenty


def _move_into_place(tmp: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, path)


class LocalObjectStore:
    """The embedded default: files under a root directory (``file://`` URLs).

    Writes go to a temporary file in ``.tmp/`` and are renamed into place, so a crash
    never leaves a partial object under its real key.
    """

    provider = "local"
    region = "local"

    def __init__(self, url: str) -> None:
        if not url.startswith("file://"):
            raise ValueError(f"local store URL {url!r} is not a file:// URL")
        self.root = Path(url[len("file://") :]).resolve()
        self.url = f"file://{self.root}"
        self.bucket = self.root.name
        self._tmp = self.root / ".tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        if not key or key.startswith("/") or ".." in key.split("/") or key.startswith(".tmp"):
            raise StorageError(f"invalid object key {key!r}")
        return self.root / key

    def put(self, key: str, data: bytes, *, customer_key: bytes | None = None) -> None:
        path = self._path(key)
        try:
            fd, tmp = tempfile.mkstemp(dir=self._tmp)
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                # A concurrent delete may remove the (empty) folder between the two steps.
                retry_call(functools.partial(_move_into_place, tmp, path), policy=FOLDER_RACE,
                           retryable=lambda exc: isinstance(exc, FileNotFoundError))
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise StorageError(f"local store write failed: {exc.strerror}") from None

    def get(self, key: str, *, customer_key: bytes | None = None) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            self._check_mounted()
            raise StorageError("object not found") from None
        except OSError as exc:  # the folder is gone or unreadable: the store is down
            raise StorageError(f"local store read failed: {exc.strerror}") from None

    def exists(self, key: str) -> bool:
        self._check_mounted()  # "absent" from a missing store would verify nothing
        return self._path(key).is_file()

    def _check_mounted(self) -> None:
        if not self.root.is_dir():
            raise StorageError("the local store's folder is missing (unmounted?)")

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

    def signed_url(self, key: str, ttl_s: int) -> str | None:
        return None  # a local folder has no URLs: the API serves the bytes itself

    def clean_temporary(self, older_than_s: float) -> int:
        """Delete half-written temporary files a crash left behind; how many."""
        cutoff = time.time() - older_than_s
        removed = 0
        for path in self._tmp.iterdir():
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def list_keys(self, prefix: str) -> list[str]:
        self._check_mounted()  # an empty listing of a missing store would hide orphans
        keys = []
        for path in self.root.rglob("*"):
            if path.is_file() and not path.is_relative_to(self._tmp):
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)


def open_store(url: str) -> ObjectStore:
    """A single local store by URL (tools and tests)."""
    if url.startswith("file://"):
        return LocalObjectStore(url)
    raise ValueError(f"store URL {url!r}: only file:// can be opened by URL; configure "
                     "S3 and GCS in storage.yaml")


class StoreSet:
    """Every configured store, and which one to use for what."""

    def __init__(self, input_stores: Mapping[str, ObjectStore], outputs: ObjectStore,
                 route: Callable[[str | None], str]) -> None:
        self.input_stores = input_stores  # region -> store
        self.outputs = outputs
        self._route = route

    @classmethod
    def single(cls, store: ObjectStore) -> StoreSet:
        """Everything in one store (the embedded default, tools, tests)."""
        return cls({store.region: store}, store, lambda country: store.region)

    def for_inputs(self, country: str | None) -> ObjectStore:
        """The input store of the region nearest ``country`` (fallback when unknown)."""
        return self.input_stores[self._route(country)]

    def all(self) -> list[ObjectStore]:
        unique: dict[str, ObjectStore] = {s.url: s for s in self.input_stores.values()}
        unique.setdefault(self.outputs.url, self.outputs)
        return list(unique.values())

    def locate(self, uri: str) -> tuple[ObjectStore, str]:
        """The store holding ``uri`` and the object's key there."""
        for store in sorted(self.all(), key=lambda s: len(s.url), reverse=True):
            if uri.startswith(store.url.rstrip("/") + "/"):
                return store, key_from_uri(store, uri)
        raise StorageError("object URI belongs to no configured store")


def open_stores(cfg: StorageConfig) -> StoreSet:
    """Build the configured stores (network clients are created here, once per process)."""
    local = LocalObjectStore(f"file://{resolve_path(cfg.local_root)}") if "local" in (
        cfg.inputs, cfg.outputs) else None
    s3 = None
    if cfg.s3 is not None and "s3" in (cfg.inputs, cfg.outputs):
        from pipeline.storage.s3 import S3ObjectStore

        s3 = S3ObjectStore(cfg.s3)
    outputs: ObjectStore = s3 if cfg.outputs == "s3" else local  # type: ignore[assignment]
    if cfg.inputs == "gcs":
        from pipeline.storage.gcs import open_gcs_stores
        from pipeline.storage.residency import region_for_country

        gcs_cfg = cfg.gcs
        if gcs_cfg is None:
            raise ValueError("storage.yaml inputs: gcs but has no gcs: section")
        return StoreSet(open_gcs_stores(gcs_cfg), outputs,
                        lambda country: region_for_country(country, gcs_cfg))
    inputs: ObjectStore = s3 if cfg.inputs == "s3" else local  # type: ignore[assignment]
    return StoreSet({inputs.region: inputs}, outputs, lambda country: inputs.region)
