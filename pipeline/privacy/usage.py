"""Usage data: one event per finished job, kept as Parquet (pyarrow) in the outputs store
under ``usage/day=YYYY-MM-DD/``, purged after ``retention.yaml usage_ttl_days``, and
summarised into de-identified aggregates.

An event holds the job's kind, style, resolution, counts, timings, outcome and the user's
country, and the account's keyed pseudonym (pipeline/security/pseudonyms.py). Never media, face
data, keys, file names, reasons or the raw account id.

Aggregates (``aggregate``) are what may leave the service: rows per (day, kind, style,
country, outcome) with counts and latency percentiles. Accounts that opted out of sale and
sharing are left out entirely; accounts are counted through a second keyed hash whose
secret rotates every month (so counts of different months cannot be linked); a group with
fewer than ``k`` distinct accounts is suppressed.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.records import JobStatus, WorkItem
from pipeline.security.pseudonyms import account_ref, aggregate_secret
from pipeline.storage.base import ObjectStore, delete_verified

USAGE_PREFIX = "usage/"


@dataclass(frozen=True, slots=True)
class UsageEvent:
    day: str  # YYYY-MM-DD (UTC) of the job's end
    account_ref: str  # keyed pseudonym, never the raw id
    kind: str
    style: str
    resolution_px: int
    num_inputs: int
    num_frames: int
    outcome: str  # succeeded | failed
    country: str  # ISO alpha-2 as the backend sent it, or ""
    queue_s: float
    total_s: float


SCHEMA = pa.schema([
    ("day", pa.string()), ("account_ref", pa.string()), ("kind", pa.string()),
    ("style", pa.string()), ("resolution_px", pa.int32()), ("num_inputs", pa.int32()),
    ("num_frames", pa.int32()), ("outcome", pa.string()), ("country", pa.string()),
    ("queue_s", pa.float64()), ("total_s", pa.float64()),
])


class UsageBuffer:
    """One job runner's usage events between two flushes (``write_events``). Best-effort:
    while the store is away it keeps at most ``max_events`` and drops the rest."""

    def __init__(self, max_events: int = 10_000) -> None:
        self.max_events = max_events
        self.events: list[UsageEvent] = []

    def note(self, item: WorkItem, ok: bool, started_s: float, now_s: float) -> None:
        """One event for a finished job: counts, timings, outcome, country and the
        account's pseudonym; nothing of the media, the key or the reason."""
        if len(self.events) >= self.max_events:
            return
        accepted = item.accepted_s or started_s
        self.events.append(UsageEvent(
            day=day_of(now_s), account_ref=account_ref(item.account_id), kind=str(item.kind),
            style=item.style, resolution_px=item.resolution_px,
            num_inputs=len(item.input_uris), num_frames=item.num_frames,
            outcome=str(JobStatus.SUCCEEDED if ok else JobStatus.FAILED),
            country=item.country, queue_s=max(0.0, started_s - accepted),
            total_s=max(0.0, now_s - accepted)))

    def take(self) -> list[UsageEvent]:
        events, self.events = self.events, []
        return events

    def put_back(self, events: list[UsageEvent]) -> None:
        """Events a flush could not write, kept for the next one (oldest first)."""
        self.events = (events + self.events)[: self.max_events]


def day_of(timestamp_s: float) -> str:
    return datetime.fromtimestamp(timestamp_s, UTC).strftime("%Y-%m-%d")


def write_events(store: ObjectStore, events: list[UsageEvent], *, writer_id: str) -> list[str]:
    """One Parquet file per day present in ``events``; returns the keys written."""
    written = []
    for day in sorted({e.day for e in events}):
        rows = [asdict(e) for e in events if e.day == day]
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        key = f"{USAGE_PREFIX}day={day}/{writer_id}-{uuid.uuid4().hex[:12]}.parquet"
        store.put(key, buffer.getvalue())
        written.append(key)
    return written


def read_events(store: ObjectStore) -> pa.Table:
    tables = [pq.read_table(io.BytesIO(store.get(key)))
              for key in store.list_keys(USAGE_PREFIX) if key.endswith(".parquet")]
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()


def expired_usage_keys(store: ObjectStore, *, ttl_days: float, now_s: float) -> list[str]:
    """Usage files whose day is older than the TTL."""
    cutoff = day_of(now_s - ttl_days * 86400.0)
    found = []
    for key in store.list_keys(USAGE_PREFIX):
        day = key[len(USAGE_PREFIX):].split("/", 1)[0].removeprefix("day=")
        if day < cutoff:
            found.append(key)
    return found


def purge_expired(store: ObjectStore, *, ttl_days: float, now_s: float | None = None) -> list[str]:
    """Delete (verified) every usage file past its TTL; the keys deleted."""
    now = time.time() if now_s is None else now_s
    gone = []
    for key in expired_usage_keys(store, ttl_days=ttl_days, now_s=now):
        if delete_verified(store, key):
            gone.append(key)
    return gone


def _aggregate_secret(period: str) -> bytes:
    return hmac.new(aggregate_secret(), f"period:{period}".encode(), hashlib.sha256).digest()


def rotating_hash(account_ref: str, day: str) -> str:
    """The account under the month's secret: stable within a month, unlinkable across."""
    return hmac.new(_aggregate_secret(day[:7]), account_ref.encode(),
                    hashlib.sha256).hexdigest()[:16]


def aggregate(events: pa.Table, *, opted_out_refs: set[str], min_group_size: int) -> pa.Table:
    """De-identified usage: per (day, kind, style, country, outcome), jobs, distinct
    accounts, and p50/p90 of the job time. Opted-out accounts are dropped first; groups
    with fewer than ``min_group_size`` accounts are suppressed."""
    groups: dict[tuple, dict] = {}
    for row in events.to_pylist():
        if row["account_ref"] in opted_out_refs:
            continue
        key = (row["day"], row["kind"], row["style"], row["country"], row["outcome"])
        group = groups.setdefault(key, {"accounts": set(), "times": []})
        group["accounts"].add(rotating_hash(row["account_ref"], row["day"]))
        group["times"].append(row["total_s"])
    rows = []
    for (day, kind, style, country, outcome), group in sorted(groups.items()):
        if len(group["accounts"]) < min_group_size:
            continue
        times = sorted(group["times"])
        rows.append({"day": day, "kind": kind, "style": style, "country": country,
                     "outcome": outcome, "jobs": len(times), "accounts": len(group["accounts"]),
                     "p50_total_s": times[len(times) // 2],
                     "p90_total_s": times[min(len(times) - 1, int(len(times) * 0.9))]})
    schema = pa.schema([("day", pa.string()), ("kind", pa.string()), ("style", pa.string()),
                        ("country", pa.string()), ("outcome", pa.string()),
                        ("jobs", pa.int64()), ("accounts", pa.int64()),
                        ("p50_total_s", pa.float64()), ("p90_total_s", pa.float64())])
    return pa.Table.from_pylist(rows, schema=schema)


def forget_account(store: ObjectStore, account_ref: str) -> int:
    """Rewrite every usage file holding the account's rows without them (account deletion);
    the number of rows removed. A file left empty is deleted."""
    removed = 0
    for key in store.list_keys(USAGE_PREFIX):
        if not key.endswith(".parquet"):
            continue
        table = pq.read_table(io.BytesIO(store.get(key)))
        keep = [row for row in table.to_pylist() if row["account_ref"] != account_ref]
        if len(keep) == table.num_rows:
            continue
        removed += table.num_rows - len(keep)
        if keep:
            buffer = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(keep, schema=SCHEMA), buffer)
            store.put(key, buffer.getvalue())
        else:
            delete_verified(store, key)
    return removed
