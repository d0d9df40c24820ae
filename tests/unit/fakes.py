"""In-memory stand-ins for the Redis-backed parts that purging talks to, so its logic is
tested without servers. tests/integration/test_purge_on_redis.py runs the same tests on
the real RetentionLedger and ReceiptLedger: the two must behave alike."""

from __future__ import annotations

import time
from collections.abc import Callable

from pipeline.core.errors import StorageError
from pipeline.core.records import DeletionReceipt, RetentionRecord
from pipeline.storage.base import LocalObjectStore


class RecordingSink:
    """A receipt sink that remembers what was appended (and passes it on to ``inner``, a
    real ReceiptLedger, when given). ``fail_next`` appends raise, as a crash would."""

    def __init__(self, inner=None) -> None:
        self.inner = inner
        self.appended: list[tuple[str, DeletionReceipt, str]] = []
        self.fail_next = 0

    def append(self, receipt_id: str, receipt: DeletionReceipt, *, account_id: str,
               requested_s: float) -> object:
        if self.fail_next:
            self.fail_next -= 1
            raise ConnectionError("injected: the worker died before its receipt was written")
        self.appended.append((receipt_id, receipt, account_id))
        if self.inner is not None:
            return self.inner.append(receipt_id, receipt, account_id=account_id,
                                     requested_s=requested_s)
        return None


class MemoryLedger:
    """RetentionLedger's semantics in a dict: a claim is exclusive until its lease runs
    out; completing a record drops it, its due entry and its claim; ``defer`` moves only a
    record still due (ZADD XX)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.records: dict[str, RetentionRecord] = {}
        self.due: dict[str, float] = {}
        self.claims: dict[str, tuple[str, float]] = {}  # uri -> (owner, lease expiry)
        self.purge_failures = 0
        self.chain = RecordingSink()

    def register(self, records: list[RetentionRecord]) -> None:
        for rec in records:
            self.records[rec.uri] = rec
            self.due[rec.uri] = rec.deadline_s

    def get(self, uri: str) -> RetentionRecord | None:
        return self.records.get(uri)

    def records_for_job(self, job_id: str) -> list[RetentionRecord]:
        return sorted((r for r in self.records.values() if r.job_id == job_id),
                      key=lambda r: r.uri)

    def due_uris(self, now_s: float, limit: int = 100) -> list[str]:
        due = sorted((d, u) for u, d in self.due.items() if d <= now_s)
        return [u for _, u in due[:limit]]

    def try_claim(self, uri: str, owner: str, lease_s: float) -> bool:
        now = self.clock()
        held = self.claims.get(uri)
        if held is not None and held[1] > now:
            return False
        self.claims[uri] = (owner, now + lease_s)
        return True

    def release(self, uri: str) -> None:
        self.claims.pop(uri, None)

    def complete(self, rec: RetentionRecord) -> None:
        self.records.pop(rec.uri, None)
        self.due.pop(rec.uri, None)
        self.claims.pop(rec.uri, None)

    def defer(self, uri: str, until_s: float) -> None:
        if uri in self.due:
            self.due[uri] = until_s

    def note_purge_failure(self) -> None:
        self.purge_failures += 1

    def receipts(self) -> RecordingSink:
        return self.chain


class FlakyStore(LocalObjectStore):
    """Fault injection around the real local store: the next ``failures`` deletes fail."""

    def __init__(self, url: str, failures: int) -> None:
        super().__init__(url)
        self.failures = failures

    def delete(self, key: str) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise StorageError("injected outage")
        super().delete(key)
