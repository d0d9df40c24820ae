"""Deletion receipts: an append-only, hash-chained ledger of verified deletions.

Each entry holds the SHA-256 of the object URI (never the URI, never content), its class,
the account's keyed pseudonym (never the raw id), when deletion was requested and
verified, and the verifier's result. Entry
``n`` stores ``prev_hash`` = hash of entry ``n-1``; its own ``hash`` covers every other
field. Editing, removing, reordering or truncating entries breaks the chain, and
``verify_chain`` says where.

Keys:
  eph:receipts:chain        list of JSON entries, append-only
  eph:receipts:head         hash: seq, hash of the last entry (checked against the list)
  eph:deletion:<receipt_id> hash: what a deletion request covers and its status
  eph:deletion:<receipt_id>:entries  list of chain seqs written for it
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import asdict, dataclass

import redis

from pipeline.core.errors import NotFound
from pipeline.core.records import DeletionReceipt
from pipeline.core.retry import retry_on_conflict
from pipeline.security.pseudonyms import account_ref
from pipeline.state import keys

GENESIS_HASH = "0" * 64


@dataclass(frozen=True, slots=True)
class ChainEntry:
    seq: int
    receipt_id: str
    uri_sha256: str
    object_class: str
    account_ref: str  # pipeline.security.pseudonyms.account_ref; "" for objects of no account
    requested_s: float
    verified_s: float
    result: str  # "verified_gone"
    prev_hash: str
    hash: str = ""


def _entry_hash(entry: ChainEntry) -> str:
    fields = asdict(entry)
    fields.pop("hash")
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def uri_digest(uri: str) -> str:
    return hashlib.sha256(uri.encode()).hexdigest()


class ReceiptLedger:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    @staticmethod
    def new_request_id() -> str:
        return uuid.uuid4().hex

    def open_request(self, *, kind: str, account_id: str, subject: str,
                     receipt_id: str | None = None) -> str:
        """Start a deletion request (``kind``: output | account | job_purge); its id.

        Idempotent for a given ``receipt_id``: an existing request is left as it is.
        """
        receipt_id = receipt_id or self.new_request_id()
        key = keys.deletion_request(receipt_id)
        if self.redis.hsetnx(key, "receipt_id", receipt_id):
            self.redis.hset(key, mapping={
                "kind": kind, "account_ref": account_ref(account_id) if account_id else "",
                "subject_sha256": uri_digest(subject), "requested_s": repr(time.time()),
                "status": "pending",
            })
            if account_id and kind in ("output", "account"):  # for the account's export
                self.redis.sadd(keys.account_receipts(account_id), receipt_id)
        return receipt_id

    def close_request(self, receipt_id: str, *, complete: bool) -> None:
        self.redis.hset(keys.deletion_request(receipt_id), mapping={
            "status": "complete" if complete else "pending", "updated_s": repr(time.time())})

    def append(self, receipt_id: str, receipt: DeletionReceipt, *, account_id: str,
               requested_s: float) -> ChainEntry:
        """Append one verified deletion to the chain (optimistic WATCH on the head)."""

        def attempt() -> ChainEntry:
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.watch(keys.RECEIPT_HEAD)
                head = pipe.hgetall(keys.RECEIPT_HEAD)
                seq = int(head.get(b"seq", b"-1")) + 1
                prev = head.get(b"hash", GENESIS_HASH.encode()).decode()
                entry = ChainEntry(
                    seq=seq, receipt_id=receipt_id, uri_sha256=uri_digest(receipt.uri),
                    object_class=receipt.object_class,
                    account_ref=account_ref(account_id) if account_id else "",
                    requested_s=requested_s, verified_s=receipt.deleted_at_s,
                    result="verified_gone" if receipt.verified_gone else "not_verified",
                    prev_hash=prev,
                )
                entry = ChainEntry(**{**asdict(entry), "hash": _entry_hash(entry)})
                pipe.multi()
                pipe.rpush(keys.RECEIPT_CHAIN, json.dumps(asdict(entry), sort_keys=True))
                pipe.hset(keys.RECEIPT_HEAD, mapping={"seq": seq, "hash": entry.hash})
                pipe.rpush(keys.deletion_entries(receipt_id), seq)
                pipe.execute()
                return entry

        return retry_on_conflict(attempt)

    def get_request(self, receipt_id: str) -> dict:
        raw = self.redis.hgetall(keys.deletion_request(receipt_id))
        if not raw:
            raise NotFound(f"deletion receipt {receipt_id} not found")
        request = {k.decode(): v.decode() for k, v in raw.items()}
        seqs = [int(s) for s in self.redis.lrange(keys.deletion_entries(receipt_id), 0, -1)]
        request["objects"] = [json.loads(self.redis.lindex(keys.RECEIPT_CHAIN, s)) for s in seqs]
        return request


def verify_chain(client: redis.Redis) -> list[str]:
    """Problems found in the chain; empty when intact. Reads the whole list."""
    problems: list[str] = []
    prev = GENESIS_HASH
    raw_entries = client.lrange(keys.RECEIPT_CHAIN, 0, -1)
    for position, raw in enumerate(raw_entries):
        try:
            entry = ChainEntry(**json.loads(raw))
        except (ValueError, TypeError):
            problems.append(f"entry {position}: not a chain entry")
            break
        if entry.seq != position:
            problems.append(f"entry {position}: seq {entry.seq}, expected {position} "
                            "(an entry was removed or inserted)")
        if entry.prev_hash != prev:
            problems.append(f"entry {position}: prev_hash does not match entry {position - 1}")
        if _entry_hash(entry) != entry.hash:
            problems.append(f"entry {position}: content was altered (hash mismatch)")
        prev = entry.hash
        if problems:
            break
    head = client.hgetall(keys.RECEIPT_HEAD)
    if not problems and head:
        if int(head[b"seq"]) != len(raw_entries) - 1 or head[b"hash"].decode() != prev:
            problems.append("head does not match the last entry (the chain was truncated)")
    if not problems and not head and raw_entries:
        problems.append("head is missing")
    return problems
