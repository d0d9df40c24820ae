"""Usage data: Parquet events by day, TTL expiry, account forgetting, and de-identified
aggregates (opt-outs dropped, rotating account hashes, small groups suppressed)."""

from __future__ import annotations

import pytest

from pipeline.privacy.usage import (
    UsageEvent,
    aggregate,
    day_of,
    expired_usage_keys,
    forget_account,
    read_events,
    rotating_hash,
    write_events,
)
from pipeline.storage.base import LocalObjectStore

pytestmark = pytest.mark.privacy
DAY_S = 86400.0
NOW = 1_790_000_000.0  # 2026-09-21


def event(ref: str, *, day: str = "2026-09-21", kind: str = "ai_photo",
          outcome: str = "succeeded", total_s: float = 2.0) -> UsageEvent:
    return UsageEvent(day=day, account_ref=ref, kind=kind, style="portrait", resolution_px=512,
                      num_inputs=1, num_frames=0, outcome=outcome, country="DE", queue_s=0.1,
                      total_s=total_s)


@pytest.fixture
def store(tmp_path) -> LocalObjectStore:
    return LocalObjectStore(f"file://{tmp_path}")


def test_events_round_trip_through_parquet_one_file_per_day(store):
    events = [event("a"), event("b", day="2026-09-20")]
    keys = write_events(store, events, writer_id="runner-1")
    assert sorted(k.split("/")[1] for k in keys) == ["day=2026-09-20", "day=2026-09-21"]
    assert sorted(read_events(store).to_pylist(), key=lambda r: r["day"]) == sorted(
        [vars_of(e) for e in events], key=lambda r: r["day"])


def vars_of(e: UsageEvent) -> dict:
    from dataclasses import asdict

    return asdict(e)


def test_aggregates_drop_opt_outs_and_suppress_small_groups():
    import pyarrow as pa

    from pipeline.privacy.usage import SCHEMA

    rows = [vars_of(event(f"acct-{i}", total_s=float(i))) for i in range(6)]  # 6 accounts
    rows += [vars_of(event("acct-0", kind="animate"))] * 3  # one account: a group of 1
    table = aggregate(pa.Table.from_pylist(rows, schema=SCHEMA), opted_out_refs={"acct-5"},
                      min_group_size=5)
    [group] = table.to_pylist()
    assert (group["kind"], group["jobs"], group["accounts"]) == ("ai_photo", 5, 5)
    assert group["p50_total_s"] == 2.0
    assert "account_ref" not in table.column_names
    fewer = aggregate(pa.Table.from_pylist(rows, schema=SCHEMA),
                      opted_out_refs={"acct-4", "acct-5"}, min_group_size=5)
    assert fewer.num_rows == 0  # 4 accounts left: suppressed


def test_account_hashes_rotate_every_month():
    assert rotating_hash("acct-1", "2026-09-01") == rotating_hash("acct-1", "2026-09-30")
    assert rotating_hash("acct-1", "2026-09-30") != rotating_hash("acct-1", "2026-10-01")


def test_files_past_the_ttl_are_found_by_their_day(store):
    write_events(store, [event("a", day=day_of(NOW - 91 * DAY_S)),
                         event("b", day=day_of(NOW - 89 * DAY_S))], writer_id="w")
    [old] = expired_usage_keys(store, ttl_days=90, now_s=NOW)
    assert day_of(NOW - 91 * DAY_S) in old


def test_forgetting_an_account_rewrites_its_files(store):
    write_events(store, [event("gone"), event("kept")], writer_id="w")
    write_events(store, [event("gone", day="2026-09-20")], writer_id="w")
    assert forget_account(store, "gone") == 2
    assert [r["account_ref"] for r in read_events(store).to_pylist()] == ["kept"]
    assert len(store.list_keys("usage/")) == 1  # the file left empty was deleted
