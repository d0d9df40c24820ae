"""A monitor of the deletion log: fetch signed heads over time, alarm on a fork or rewrite.

It pins the log's public key on its first run and keeps every head it saw in a state file
(JSON: origin, public key, heads as checkpoint texts): that file is also what a third-party
witness keeps and can publish. Each new head must be signed by the pinned key, must not
shrink the log, must not sign another root for a size already seen (a fork), and must
extend the last head seen, checked by a consistency proof the service supplies (a rewritten,
reordered or truncated history fails it).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.transparency.verifier import (
    VerificationError,
    check_heads,
    parse_public_key,
    verify_checkpoint,
)

FetchConsistency = Callable[[int, int], list[str]]  # (first, second) -> hex proof


@dataclass
class MonitorState:
    origin: str
    public_key: str
    heads: list[str] = field(default_factory=list)  # checkpoint texts, oldest first

    @classmethod
    def load(cls, path: Path) -> MonitorState | None:
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        return cls(data["origin"], data["public_key"], list(data["heads"]))

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps({"format": "ephemera-tlog-witness-v1", "origin": self.origin,
                                   "public_key": self.public_key, "heads": self.heads},
                                  indent=1))
        tmp.replace(path)


def observe(state: MonitorState, checkpoint: str, consistency: FetchConsistency) -> list[str]:
    """Check one fetched head against everything seen; the alarms (empty: all is well). A
    head that passes is added to the state."""
    key = parse_public_key(state.public_key)
    try:
        new = verify_checkpoint(checkpoint, key)
    except VerificationError as exc:
        return [f"ALARM: a head not signed by the pinned key: {exc}"]
    if new.origin != state.origin:
        return [f"ALARM: a head of another log ({new.origin!r})"]
    alarms: list[str] = []
    seen = [verify_checkpoint(text, key) for text in state.heads]
    for old in seen:
        if old.tree_size == new.tree_size and old.root_hash != new.root_hash:
            alarms.append(f"ALARM: fork: two signed roots for {new.tree_size} entries")
    if seen and new.tree_size < seen[-1].tree_size:
        alarms.append(f"ALARM: the log shrank from {seen[-1].tree_size} to {new.tree_size} "
                      "entries (truncated or rolled back)")
    elif seen and not alarms and new.tree_size > seen[-1].tree_size and seen[-1].tree_size:
        last = seen[-1]
        try:
            proof = [bytes.fromhex(p) for p in consistency(last.tree_size, new.tree_size)]
            check_heads(last, new, proof)
        except (VerificationError, ValueError, KeyError) as exc:
            alarms.append(f"ALARM: the head of {new.tree_size} entries does not extend the "
                          f"one of {last.tree_size} seen before: {exc}")
    if not alarms and all(h.checkpoint != checkpoint for h in seen):
        state.heads.append(checkpoint)
    return alarms


def http_source(base_url: str, token: str | None) -> tuple[Callable[[], dict[str, Any]],
                                                          Callable[[], str], FetchConsistency]:
    """(key, head, consistency) fetchers against a running service's API."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    client = httpx.Client(base_url=base_url, headers=headers, timeout=30.0)

    def get(path: str, **params: int) -> dict[str, Any]:
        response = client.get(path, params=params)
        response.raise_for_status()
        return response.json()

    return (lambda: get("/v1/transparency/key"),
            lambda: get("/v1/transparency/head")["checkpoint"],
            lambda first, second: get("/v1/transparency/consistency", first=first,
                                      second=second)["proof"])
