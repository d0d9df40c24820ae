"""Verify an Ephemera deletion receipt without trusting, or even reaching, the service.

A single file with no Ephemera imports: a client app can vendor it as it is. Its only
dependency is the ``cryptography`` package (Ed25519). It checks, against the log's public
key (pinned by the app, or fetched once from ``GET /v1/transparency/key``):

- the signed tree head (a C2SP ``tlog-checkpoint`` signed note, the format of Sigstore's
  Rekor and Go's checksum database): its Ed25519 signature;
- each object of the receipt: its leaf hashes to the leaf hash, the inclusion proof leads
  from that leaf to the head's root (RFC 9162 section 2.1.3.2), the leaf says the object was
  verified gone, and the leaf's ``subject`` commitment opens to this receipt;
- consistency with any head seen before (RFC 9162 section 2.1.4.2): the log only grew.

Hashing is RFC 6962's: SHA-256, a leaf is ``H(0x00 || data)``, a node ``H(0x01 || l || r)``.

    from verifier import verify_receipt, parse_public_key
    report = verify_receipt(receipt_json, parse_public_key(key_json["public_key"]))
    assert report.ok, report.problems
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
SUBJECT_TAG = b"ephemera/tlog/subject/v1\n"
VERIFIED_GONE = "verified_gone"


class VerificationError(ValueError):
    """A check failed: the message says which."""


# ---- RFC 6962 hashing ------------------------------------------------------------------

def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


def subject_commitment(*, salt_hex: str, receipt_id: str, account_ref: str,
                       uri_sha256: str) -> str:
    """The leaf's ``subject``: a salted commitment to (receipt, account pseudonym, object
    URI digest). Without the salt, which only the account's receipt holds, a leaf cannot be
    matched to an account, an object or a photo."""
    body = (SUBJECT_TAG + bytes.fromhex(salt_hex) + b"\n" + receipt_id.encode() + b"\n"
            + account_ref.encode() + b"\n" + uri_sha256.encode())
    return hashlib.sha256(body).hexdigest()


def verify_inclusion(index: int, size: int, leaf: bytes, proof: list[bytes],
                     root: bytes) -> None:
    """RFC 9162 2.1.3.2: ``leaf`` (a leaf hash) is entry ``index`` of the tree of ``size``
    leaves whose root is ``root``. Raises VerificationError."""
    if not 0 <= index < size:
        raise VerificationError(f"leaf index {index} is outside a tree of {size} leaves")
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise VerificationError("inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise VerificationError("inclusion proof is shorter than the tree is deep")
    if r != root:
        raise VerificationError(f"inclusion proof of leaf {index} does not lead to the root "
                                f"of the tree of {size} leaves")


def verify_consistency(first: int, second: int, first_root: bytes, second_root: bytes,
                       proof: list[bytes]) -> None:
    """RFC 9162 2.1.4.2: the tree of ``second`` leaves extends the tree of ``first``
    leaves (nothing in the first was edited, removed, reordered or truncated)."""
    if not 0 < first <= second:
        raise VerificationError(f"no consistency between sizes {first} and {second}")
    if first == second:
        if proof:
            raise VerificationError("a consistency proof between equal sizes must be empty")
        if first_root != second_root:
            raise VerificationError(f"two different roots for {first} leaves: a fork")
        return
    if not proof:
        raise VerificationError("empty consistency proof")
    if first & (first - 1) == 0:  # a power of two: the first root starts the path
        proof = [first_root, *proof]
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = proof[0]
    for c in proof[1:]:
        if sn == 0:
            raise VerificationError("consistency proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise VerificationError("consistency proof is shorter than the tree is deep")
    if fr != first_root:
        raise VerificationError(f"the tree of {second} leaves does not contain the tree of "
                                f"{first} leaves seen before: history was rewritten")
    if sr != second_root:
        raise VerificationError(f"consistency proof does not lead to the root of {second} "
                                "leaves")


# ---- signed tree heads: C2SP tlog-checkpoint signed notes --------------------------------

@dataclass(frozen=True)
class Head:
    origin: str
    tree_size: int
    root_hash: bytes
    timestamp_ms: int
    checkpoint: str  # the signed note, as published


def parse_public_key(text: str) -> Any:
    """An Ed25519 public key from base64 of its 32 raw bytes."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    raw = base64.b64decode(text, validate=True)
    if len(raw) != 32:
        raise VerificationError("an Ed25519 public key is 32 bytes")
    return Ed25519PublicKey.from_public_bytes(raw)


def key_id(key_name: str, public_key: Any) -> bytes:
    """The signed-note key id: the first 4 bytes of SHA-256(name || "\\n" || 0x01 || key)."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(key_name.encode() + b"\n\x01" + raw).digest()[:4]


def parse_checkpoint(checkpoint: str) -> tuple[Head, str, list[tuple[str, bytes]]]:
    """A checkpoint's head, its signed body and its (key name, key id || signature) lines,
    unverified. Raises VerificationError when malformed."""
    body, sep, signatures = checkpoint.partition("\n\n")
    if not sep or not body:
        raise VerificationError("not a signed note: no blank line before the signatures")
    body += "\n"
    lines = body.split("\n")[:-1]
    if len(lines) < 4 or not lines[3].startswith("timestamp "):
        raise VerificationError("checkpoint body must be origin, size, root, timestamp")
    try:
        size = int(lines[1])
        root = base64.b64decode(lines[2], validate=True)
        timestamp = int(lines[3].removeprefix("timestamp "))
        signed = []
        for line in signatures.rstrip("\n").split("\n"):
            parts = line.split(" ")
            if len(parts) != 3 or parts[0] != "\u2014":
                raise VerificationError(f"malformed signature line {line!r}")
            signed.append((parts[1], base64.b64decode(parts[2], validate=True)))
    except ValueError as exc:
        raise VerificationError(f"malformed checkpoint: {exc}") from None
    if size < 0 or len(root) != 32:
        raise VerificationError("malformed checkpoint: size or root hash")
    return Head(lines[0], size, root, timestamp, checkpoint), body, signed


def verify_checkpoint(checkpoint: str, public_key: Any) -> Head:
    """Check the note's Ed25519 signature and parse its body: origin, tree size, base64 root
    hash, then the extension line ``timestamp <unix ms>``. Raises VerificationError."""
    from cryptography.exceptions import InvalidSignature

    head, body, signed = parse_checkpoint(checkpoint)
    checked = False
    for name, blob in signed:
        if len(blob) != 68 or blob[:4] != key_id(name, public_key):
            continue  # another key's signature (a witness's cosignature): not ours
        try:
            public_key.verify(blob[4:], body.encode())
        except InvalidSignature:
            raise VerificationError("the tree head's signature does not verify under the "
                                    "log's public key") from None
        checked = True
    if not checked:
        raise VerificationError("the tree head carries no signature by the log's key")
    return head


# ---- receipts ----------------------------------------------------------------------------

@dataclass
class Report:
    ok: bool = True
    head: Head | None = None
    objects_verified: int = 0
    problems: list[str] = field(default_factory=list)

    def fail(self, problem: str) -> None:
        self.ok = False
        self.problems.append(problem)


def _hexes(values: list[str]) -> list[bytes]:
    return [bytes.fromhex(v) for v in values]


def verify_object(entry: dict[str, Any], receipt_id: str, head: Head) -> None:
    """One object of a receipt against a verified head. Raises VerificationError."""
    leaf = base64.b64decode(entry["leaf"], validate=True)
    digest = leaf_hash(leaf)
    if digest.hex() != entry["leaf_hash"]:
        raise VerificationError(f"leaf {entry['leaf_index']}: its bytes do not hash to the "
                                "leaf hash (the entry was edited)")
    if entry.get("inclusion_proof") is None:
        raise VerificationError(f"leaf {entry['leaf_index']}: no inclusion proof yet")
    verify_inclusion(int(entry["leaf_index"]), head.tree_size, digest,
                     _hexes(entry["inclusion_proof"]), head.root_hash)
    fields = json.loads(leaf)
    if fields.get("result") != VERIFIED_GONE:
        raise VerificationError(f"leaf {entry['leaf_index']}: result is {fields.get('result')!r}")
    opening = entry["opening"]
    expected = subject_commitment(salt_hex=opening["salt"], receipt_id=receipt_id,
                                  account_ref=opening["account_ref"],
                                  uri_sha256=opening["uri_sha256"])
    if fields.get("subject") != expected:
        raise VerificationError(f"leaf {entry['leaf_index']}: its subject does not open to "
                                "this receipt (a leaf of another deletion)")
    for name in ("object_class", "verified_ms"):
        if name in entry and entry[name] != fields.get(name):
            raise VerificationError(f"leaf {entry['leaf_index']}: the receipt's {name} "
                                    "differs from the logged one")


def verify_receipt(receipt: dict[str, Any], public_key: Any,
                   seen: list[tuple[str, dict[str, Any]]] | None = None) -> Report:
    """Verify a receipt as ``GET /v1/accounts/{a}/deletions/{r}`` returns it.

    ``seen``: heads this client saw before, each as (checkpoint, consistency) where
    consistency is ``GET /v1/transparency/consistency?first=<its size>&second=<the
    receipt head's size>``'s answer ({"proof": [hex, ...]}). Every check runs; the report
    lists each failure.
    """
    report = Report()
    try:
        head = verify_checkpoint(receipt["head"]["checkpoint"], public_key)
    except (VerificationError, KeyError, TypeError, ValueError) as exc:
        report.fail(f"head: {exc}")
        return report
    report.head = head
    for entry in receipt.get("objects", []):
        try:
            verify_object(entry, receipt["receipt_id"], head)
            report.objects_verified += 1
        except (VerificationError, KeyError, TypeError, ValueError) as exc:
            report.fail(str(exc))
    if not receipt.get("objects"):
        report.fail("the receipt lists no object")
    for checkpoint, consistency in seen or []:
        try:
            old = verify_checkpoint(checkpoint, public_key)
            check_heads(old, head, _hexes(consistency.get("proof", [])))
        except (VerificationError, KeyError, TypeError, ValueError) as exc:
            report.fail(f"consistency with a head seen before: {exc}")
    return report


def check_heads(old: Head, new: Head, proof: list[bytes]) -> None:
    """Two verified heads of one log: same origin, and the later extends the earlier."""
    if old.origin != new.origin:
        raise VerificationError(f"heads of two logs ({old.origin!r}, {new.origin!r})")
    first, second = (old, new) if old.tree_size <= new.tree_size else (new, old)
    if first.tree_size == 0:
        return
    verify_consistency(first.tree_size, second.tree_size, first.root_hash, second.root_hash,
                       proof)


def main(argv: list[str] | None = None) -> int:
    """``python verifier.py RECEIPT.json PUBLIC_KEY_B64 [SEEN.json]``: exit 0 when verified.
    SEEN.json: a list of {"checkpoint": ..., "consistency": {"proof": [...]}}."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (2, 3):
        print(main.__doc__)
        return 2
    with open(args[0], encoding="utf-8") as f:
        receipt = json.load(f)
    seen: list[tuple[str, dict[str, Any]]] = []
    if len(args) == 3:
        with open(args[2], encoding="utf-8") as f:
            seen = [(s["checkpoint"], s["consistency"]) for s in json.load(f)]
    report = verify_receipt(receipt, parse_public_key(args[1]), seen)
    for problem in report.problems:
        print(f"FAILED: {problem}")
    if report.ok and report.head:
        print(f"verified: {report.objects_verified} object(s) deleted, in the log of "
              f"{report.head.tree_size} entries signed at {report.head.timestamp_ms} ms")
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
