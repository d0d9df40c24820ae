"""Deletion receipts: each verified deletion is a leaf of the transparency log.

A deletion request (one output, an account, a job's purge) is a record in Redis; each object
it deleted and verified gone is appended to the log (pipeline/state/tlog.py) as a
public leaf holding its class, times, the verifier's result and a salted commitment to
(receipt id, account pseudonym, SHA-256 of the object URI); the opening of that commitment
stays with the request, readable by its account only. A receipt read returns, per object,
the leaf, its index and an inclusion proof against the latest signed tree head, which the
standalone verifier (pipeline/transparency/verifier.py) checks without the service.

``ChainEntry`` and ``verify_chain`` read the hash chain that held receipts before the log,
for its one-time migration (``pipeline.state.tlog.migrate_chain``).

Keys:
  eph:deletion:<receipt_id>          hash: what a deletion request covers and its status
  eph:deletion:<receipt_id>:entries  list of the request's leaf openings (JSON)
  eph:tlog:*                         the log (pipeline/state/keys.py)
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import redis

from pipeline.core.errors import NotFound
from pipeline.core.records import DeletionReceipt
from pipeline.security.pseudonyms import account_ref
from pipeline.state import keys
from pipeline.state.tlog import TransparencyLog
from pipeline.transparency.heads import Opening, head_json, make_leaf
from pipeline.transparency.verifier import leaf_hash, parse_checkpoint

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
        self.log = TransparencyLog(client)

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
               requested_s: float) -> int:
        """Append one verified deletion to the log, its opening to the request, atomically;
        the leaf's index."""
        ref = account_ref(account_id) if account_id else ""
        digest = uri_digest(receipt.uri)
        leaf, salt = make_leaf(receipt_id=receipt_id, account_ref=ref, uri_sha256=digest,
                               object_class=receipt.object_class, requested_s=requested_s,
                               verified_s=receipt.deleted_at_s,
                               result="verified_gone" if receipt.verified_gone
                               else "not_verified")

        def opening(pipe: Any, first: int) -> None:
            pipe.rpush(keys.deletion_entries(receipt_id),
                       Opening(first, salt, ref, digest).to_json())

        return self.log.append([leaf], opening)

    def openings(self, receipt_id: str) -> list[Opening]:
        found: list[Opening] = []
        raw = self.redis.lrange(keys.deletion_entries(receipt_id), 0, -1)
        migrated = [r.decode() for r in raw if r.isdigit()]  # chain seqs from before the log
        carried = dict(zip(migrated, self.redis.hmget(keys.TLOG_MIGRATED, migrated),
                           strict=True)) if migrated else {}
        for value in raw:
            text = carried.get(value.decode()) if value.isdigit() else value
            if text is None:
                continue  # a chain entry not carried into the log yet
            found.append(Opening(**json.loads(text)))
        return found

    def get_request(self, receipt_id: str, *, with_proofs: bool = True) -> dict:
        """The request, its objects (leaf, index, opening) and, with ``with_proofs``, each
        object's inclusion proof against the latest signed head (``head``; a leaf newer
        than that head has ``inclusion_proof: null`` until the next head, within
        retention.yaml transparency.head_interval_s). O(log n) reads per object."""
        raw = self.redis.hgetall(keys.deletion_request(receipt_id))
        if not raw:
            raise NotFound(f"deletion receipt {receipt_id} not found")
        request: dict[str, Any] = {k.decode(): v.decode() for k, v in raw.items()}
        openings = self.openings(receipt_id)
        leaves = self.log.leaves([o.leaf_index for o in openings]) if openings else []
        head_text = self.log.latest_head_text() if with_proofs else None
        head = parse_checkpoint(head_text)[0] if head_text else None
        objects = []
        for item, leaf in zip(openings, leaves, strict=True):
            fields = json.loads(leaf)
            proof = None
            if head is not None and item.leaf_index < head.tree_size:
                proof = [p.hex() for p in self.log.inclusion_proof(item.leaf_index,
                                                                   head.tree_size)]
            objects.append({
                "leaf_index": item.leaf_index, "leaf": base64.b64encode(leaf).decode(),
                "leaf_hash": leaf_hash(leaf).hex(), "object_class": fields["object_class"],
                "requested_ms": fields["requested_ms"], "verified_ms": fields["verified_ms"],
                "result": fields["result"], "inclusion_proof": proof,
                "opening": {"salt": item.salt, "account_ref": item.account_ref,
                            "uri_sha256": item.uri_sha256}})
        request["objects"] = objects
        request["head"] = head_json(head) if head is not None else None
        proven = bool(objects) and all(o["inclusion_proof"] is not None for o in objects)
        request["proof_status"] = "proven" if proven else "pending"
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
