"""The transparency log of verified deletions, in Redis: appends, signed heads, proofs.

Layout (pipeline/state/keys.py, ``TLOG_*``): the leaf count; per level, strings of 32-byte
perfect-subtree hashes written with SETRANGE at ``index * 32`` (chunks of 2**16 nodes); the
leaves' bytes in hashes of 2**16 fields; the signed heads in a sorted set by tree size. An
append WATCHes the leaf count, reads the right edge (at most log2(n) nodes), computes the new
nodes in Python (Redis's Lua has no SHA-256) and writes leaves, nodes and the count in one
MULTI: appends from any number of processes serialise, none is lost or reordered. The tree
maths is pipeline/transparency/merkle.py; leaves and heads pipeline/transparency/heads.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from pipeline.core.config import TransparencyConfig
from pipeline.core.retry import retry_on_conflict
from pipeline.state import keys
from pipeline.transparency import merkle
from pipeline.transparency.heads import Opening, checkpoint, make_leaf
from pipeline.transparency.verifier import (
    Head,
    VerificationError,
    leaf_hash,
    node_hash,
    verify_checkpoint,
)

CHUNK_BITS = 16
HASH_BYTES = 32


class SettledSize:
    """The log size as it was ``settle_s`` ago: what a signer may sign. Redis appends to its
    AOF every second (``appendfsync everysec``), so a crash loses up to about a second of
    appends; a head never covers leaves younger than that, so no signed head can ever
    point past what survives a crash (a monitor would call that a truncation)."""

    def __init__(self, settle_s: float) -> None:
        self.settle_s = settle_s
        self.samples: list[tuple[float, int]] = []

    def observe(self, now_s: float, size: int) -> int:
        """Record the size seen at ``now_s``; the largest size seen ``settle_s`` ago or more
        (0 until then)."""
        self.samples.append((now_s, size))
        settled = [s for s in self.samples if s[0] <= now_s - self.settle_s]
        if settled:  # keep the newest settled sample and everything after it
            self.samples = self.samples[len(settled) - 1:]
            return settled[-1][1]
        return 0


class LogCorrupt(RuntimeError):
    """The stored log is not a Merkle tree any more (an edited node, a missing leaf)."""


# ---- leaves ------------------------------------------------------------------------------


class TransparencyLog:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def size(self) -> int:
        return int(self.redis.get(keys.TLOG_SIZE) or 0)

    def nodes(self, wanted: Sequence[merkle.Node]) -> list[bytes]:
        """Perfect-subtree hashes, one round trip, O(1) each (GETRANGE)."""
        mask = (1 << CHUNK_BITS) - 1
        with self.redis.pipeline(transaction=False) as pipe:
            for level, index in wanted:
                offset = (index & mask) * HASH_BYTES
                pipe.getrange(keys.tlog_nodes(level, index >> CHUNK_BITS), offset,
                              offset + HASH_BYTES - 1)
            found = pipe.execute()
        for node, value in zip(wanted, found, strict=True):
            if len(value) != HASH_BYTES:
                raise LogCorrupt(f"node {node} is missing from the log")
        return found

    def leaves(self, indices: Sequence[int]) -> list[bytes]:
        with self.redis.pipeline(transaction=False) as pipe:
            for index in indices:
                pipe.hget(keys.tlog_leaves(index >> CHUNK_BITS), str(index))
            found = pipe.execute()
        missing = [i for i, value in zip(indices, found, strict=True) if value is None]
        if missing:
            raise LogCorrupt(f"leaves {missing[:5]} are missing from the log")
        return found

    def append(self, leaves: Sequence[bytes],
               also: Callable[[Any, int], None] | None = None) -> int:
        """Append ``leaves`` atomically; the index of the first. ``also(pipe, first)`` adds
        writes to the same transaction (a receipt's openings)."""
        if not leaves:
            return self.size()

        def attempt() -> int:
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.watch(keys.TLOG_SIZE)
                size = int(pipe.get(keys.TLOG_SIZE) or 0)
                edge_nodes = merkle.right_edge(size)
                edge = dict(zip(edge_nodes, self.nodes(edge_nodes), strict=True))
                created = merkle.extend(size, edge, leaves)
                pipe.multi()
                _write_nodes(pipe, created)
                chunks: dict[int, dict[str, bytes]] = {}
                for offset, data in enumerate(leaves):
                    index = size + offset
                    chunks.setdefault(index >> CHUNK_BITS, {})[str(index)] = data
                for chunk, mapping in chunks.items():
                    pipe.hset(keys.tlog_leaves(chunk), mapping=mapping)
                pipe.set(keys.TLOG_SIZE, size + len(leaves))
                if also is not None:
                    also(pipe, size)
                pipe.execute()
                return size

        return retry_on_conflict(attempt)

    def root(self, size: int) -> bytes:
        return merkle.root(size, self.nodes)

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        self._check_size(size)
        return merkle.inclusion_proof(index, size, self.nodes)

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        self._check_size(second)
        return merkle.consistency_proof(first, second, self.nodes)

    def _check_size(self, size: int) -> None:
        if size > self.size():
            raise ValueError(f"the log holds fewer than {size} entries")

    # -- signed heads ----------------------------------------------------------------------

    def latest_head_text(self) -> str | None:
        found = self.redis.zrevrange(keys.TLOG_HEADS, 0, 0)
        return found[0].decode() if found else None

    def head_texts(self) -> list[str]:
        """Every head kept, oldest first: what witnesses and monitors may copy."""
        return [h.decode() for h in self.redis.zrange(keys.TLOG_HEADS, 0, -1)]

    def sign_head(self, key: Ed25519PrivateKey, cfg: TransparencyConfig, *,
                  force: bool = False, size: int | None = None) -> Head | None:
        """Sign and publish a head for ``size`` (default: the current size) when the policy
        calls for one: the log grew and the last head is ``head_interval_s`` old or
        ``head_max_entries`` behind (or ``force``). Heads only grow: of two signers
        racing, one publishes."""
        public = key.public_key()
        size = self.size() if size is None else min(size, self.size())
        latest_text = self.latest_head_text()
        latest = verify_checkpoint(latest_text, public) if latest_text else None
        now_ms = int(time.time() * 1000)
        if latest is not None:
            behind = size - latest.tree_size
            due = behind >= cfg.head_max_entries or (
                behind > 0 and now_ms - latest.timestamp_ms >= cfg.head_interval_s * 1000)
            if behind <= 0 or not (due or force):
                return None
            now_ms = max(now_ms, latest.timestamp_ms + 1)
        elif size == 0 and not force:
            return None
        text = checkpoint(key, cfg.origin, size, self.root(size), now_ms)

        def publish() -> bool:
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.watch(keys.TLOG_HEADS)
                top = pipe.zrevrange(keys.TLOG_HEADS, 0, 0, withscores=True)
                if top and top[0][1] >= size:
                    return False
                pipe.multi()
                pipe.zadd(keys.TLOG_HEADS, {text: size})
                pipe.zremrangebyrank(keys.TLOG_HEADS, 0, -cfg.heads_kept - 1)
                pipe.execute()
                return True

        return verify_checkpoint(text, public) if retry_on_conflict(publish) else None


def _write_nodes(pipe: Any, created: list[tuple[merkle.Node, bytes]]) -> None:
    """SETRANGE runs of consecutive nodes of one level and chunk (idempotent, positioned)."""
    mask = (1 << CHUNK_BITS) - 1
    runs: dict[tuple[int, int], tuple[int, bytearray]] = {}
    for (level, index), h in sorted(created):
        chunk = index >> CHUNK_BITS
        start, data = runs.setdefault((level, chunk), (index & mask, bytearray()))
        data += h
    for (level, chunk), (start, data) in runs.items():
        pipe.setrange(keys.tlog_nodes(level, chunk), start * HASH_BYTES, bytes(data))


def audit(log: TransparencyLog, public: Ed25519PublicKey) -> list[str]:
    """The operator's full check (``ephemera retention verify-ledger``): every leaf hashes
    to its stored node, every stored parent to its children, every kept head's signature
    verifies and its root is the root of that many leaves. Reads the whole log."""
    problems: list[str] = []
    size = log.size()
    batch = 1 << 14
    level_hashes: list[bytes] = []
    for start in range(0, size, batch):
        indices = list(range(start, min(size, start + batch)))
        try:
            data = log.leaves(indices)
            stored = log.nodes([(0, i) for i in indices])
        except LogCorrupt as exc:
            return [str(exc)]
        for index, leaf, node in zip(indices, data, stored, strict=True):
            if leaf_hash(leaf) != node:
                problems.append(f"leaf {index}: its bytes do not match its hash (edited)")
        level_hashes += stored
    level, hashes = 0, level_hashes
    while len(hashes) > 1:
        parents = [node_hash(hashes[i], hashes[i + 1]) for i in range(0, len(hashes) - 1, 2)]
        level += 1
        try:
            stored = log.nodes([(level, i) for i in range(len(parents))])
        except LogCorrupt as exc:
            return [*problems, str(exc)]
        problems += [f"node ({level}, {i}) does not hash its children"
                     for i, (a, b) in enumerate(zip(parents, stored, strict=True)) if a != b]
        hashes = parents
    for text in log.head_texts():
        try:
            head = verify_checkpoint(text, public)
        except VerificationError as exc:
            problems.append(f"a kept head: {exc}")
            continue
        if head.tree_size > size:
            problems.append(f"head of {head.tree_size} leaves, but the log holds {size} "
                            "(truncated)")
        elif head.tree_size and log.root(head.tree_size) != head.root_hash:
            problems.append(f"head of {head.tree_size} leaves signs another root (rewritten)")
    return problems


def migrate_chain(client: redis.Redis, *, batch: int = 1000) -> int:
    """Carry the hash chain of receipts (before the log) into the log, in chain order,
    resumably: each batch's leaves, their openings (by chain seq) and the progress mark go
    in one transaction, under a lock so that two replicas starting together cannot carry
    an entry twice. The chain is verified first and deleted at the end. Returns the number
    of entries carried (0 when another process is migrating)."""
    raw = client.lrange(keys.RECEIPT_CHAIN, 0, -1)
    if not raw:
        return 0
    # One migrator at a time (every retention replica tries at start): the others leave it.
    if not client.set(keys.TLOG_MIGRATION_LOCK, "1", nx=True, px=600_000):
        return 0
    try:
        raw = client.lrange(keys.RECEIPT_CHAIN, 0, -1)  # as it is now, under the lock
        return _migrate(client, raw, batch) if raw else 0
    finally:
        client.delete(keys.TLOG_MIGRATION_LOCK)


def _migrate(client: redis.Redis, raw: list[bytes], batch: int) -> int:
    from pipeline.state.receipts import ChainEntry, verify_chain

    problems = verify_chain(client)
    if problems:
        raise LogCorrupt(f"the receipt chain is broken, not migrated: {problems}")
    log = TransparencyLog(client)
    done = int(client.get(keys.TLOG_MIGRATION_DONE) or -1)
    carried = 0
    entries = [ChainEntry(**json.loads(r)) for r in raw]
    todo = [e for e in entries if e.seq > done]
    for start in range(0, len(todo), batch):
        part = todo[start:start + batch]
        made = [make_leaf(receipt_id=e.receipt_id, account_ref=e.account_ref,
                          uri_sha256=e.uri_sha256, object_class=e.object_class,
                          requested_s=e.requested_s, verified_s=e.verified_s, result=e.result)
                for e in part]

        def also(pipe: Any, first: int, part: list[ChainEntry] = part,
                 made: list[tuple[bytes, str]] = made) -> None:
            pipe.hset(keys.TLOG_MIGRATED, mapping={
                str(e.seq): Opening(first + i, salt, e.account_ref, e.uri_sha256).to_json()
                for i, (e, (_, salt)) in enumerate(zip(part, made, strict=True))})
            pipe.set(keys.TLOG_MIGRATION_DONE, part[-1].seq)

        log.append([leaf for leaf, _ in made], also)
        carried += len(part)
    client.delete(keys.RECEIPT_CHAIN, keys.RECEIPT_HEAD)
    return carried
